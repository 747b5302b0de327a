use super::*;

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// The `(kind, t)` of every mark in a page.
fn marks(html: &str) -> Vec<(String, f64)> {
    html.split("<g class=\"mark\" data-kind=\"")
        .skip(1)
        .map(|rest| {
            let (kind, rest) = rest.split_once('"').unwrap();
            let t = rest.split("data-t=\"").nth(1).unwrap();
            (
                kind.to_string(),
                t.split('"').next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

fn round(round: u64, tokens: u64, loss: f64, elapsed_s: f64, rollbacks: u64) -> Value {
    serde_json::json!({"round": round, "attempts": 1, "quorum": 2, "members": [], "tokens": tokens,
        "discarded_batches": 0, "loss": loss, "bytes_sent": 1000, "bytes_received": 1000,
        "compute_s": 1.0, "comm_s": 0.1, "wait_s": 0.2, "wall_s": 1.5, "sync_s": 0.3,
        "guard_skips": 0, "guard_rollbacks": rollbacks, "elapsed_s": elapsed_s})
}

fn event(elapsed_s: f64, detail: Value) -> Value {
    serde_json::json!({"elapsed_s": elapsed_s, "detail": detail})
}

/// A multi-worker run's files: three committed rounds (the third voided and redone; a rollback
/// in round 1), a removal and a rejoin, a new coordinator's clock restart, and a summary.
fn write_cluster_run(dir: &Path) {
    std::fs::write(dir.join(CONFIG_FILE), "[train]\nsteps = 6\n").unwrap();
    write_lines(
        &dir.join(LEDGER_FILE),
        &[
            round(0, 100, 2.0, 1.5, 0),
            round(1, 100, 1.8, 3.0, 1),
            round(2, 100, 1.7, 4.5, 0),
            serde_json::json!({"voided_rounds": [2, 3], "reason": "no majority"}),
            round(2, 100, 1.6, 6.0, 0),
        ],
    );
    write_lines(
        &dir.join(EVENTS_FILE),
        &[
            event(0.0, serde_json::json!({"started": "fresh"})),
            event(
                0.1,
                serde_json::json!({"event": "joined", "name": "w0", "worker": 0}),
            ),
            event(
                0.1,
                serde_json::json!({"event": "joined", "name": "w1", "worker": 1}),
            ),
            event(
                1.5,
                serde_json::json!({"event": "state_reported", "next_round": 1, "name": "w0", "blake3": "ab"}),
            ),
            event(
                2.2,
                serde_json::json!({"event": "removed", "name": "w1", "worker": 1, "reason": "killed <signal 9>"}),
            ),
            event(
                2.2,
                serde_json::json!({"event": "attempt_aborted", "round": 1, "attempt": 1, "reason": "ring broke"}),
            ),
            event(
                4.6,
                serde_json::json!({"event": "rounds_voided", "from": 2, "to": 3, "reason": "no majority"}),
            ),
            // A coordinator taking over starts its clock again.
            event(0.0, serde_json::json!({"took_over": true})),
            event(
                0.5,
                serde_json::json!({"event": "joined", "name": "w1", "worker": 2}),
            ),
        ],
    );
    std::fs::write(
        dir.join(SUMMARY_FILE),
        serde_json::json!({"workers": 2, "wall_s": 7.0, "eval": {"val_loss": 1.55}}).to_string(),
    )
    .unwrap();
}

#[test]
fn a_cluster_report_marks_every_event_at_its_time_and_draws_each_chart() {
    let dir = tempfile::tempdir().unwrap();
    write_cluster_run(dir.path());
    let html = render(dir.path()).unwrap();
    assert!(!html.contains("<script"), "no script");
    let got = marks(&html);
    let want = [
        ("coordinator_start", 0.0),
        ("joined", 0.1),
        ("joined", 0.1),
        ("removed", 2.2),
        ("attempt_aborted", 2.2),
        ("rounds_voided", 4.6),
        ("coordinator_start", 4.6),
        ("joined", 5.1),
        ("guard_rollback", 3.0),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (kind, t) in want {
        assert!(
            got.iter().any(|(k, at)| k == kind && (at - t).abs() < 1e-6),
            "no {kind} at {t}: {got:?}"
        );
    }
    // Text from the files is escaped, the routine reports counted, not listed.
    assert!(html.contains("killed &lt;signal 9&gt;"));
    assert!(html.contains("1 routine state reports"));
    for title in [
        "Loss",
        "Throughput",
        "Sync stalls",
        "Bytes sent per token",
        "Timeline",
        "Summary",
    ] {
        assert!(html.contains(&format!(">{title}<")), "no {title}");
    }
    // The voided round is not in the loss curve: three committed rounds, 300 tokens.
    assert!(html.contains("validation (final): 300 → 1.55"), "{html}");
}

#[test]
fn a_single_worker_report_places_guard_actions_at_their_steps_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), "").unwrap();
    let step = |s: u64, t: f64| {
        serde_json::json!({"event": "step", "step": s, "loss": 3.0 - s as f64 * 0.1, "lr": 0.001,
            "grad_norm": 1.0, "tokens_per_s": 64.0 * s as f64 / t, "elapsed_s": t})
    };
    write_lines(
        &dir.path().join(METRICS_FILE),
        &[
            step(1, 0.5),
            step(2, 1.0),
            serde_json::json!({"event": "guard", "step": 3, "action": "rollback", "reason": "spike", "to_step": 2}),
            step(3, 1.5),
            serde_json::json!({"event": "eval", "step": 3, "val_loss": 2.5}),
        ],
    );
    let html = render(dir.path()).unwrap();
    assert_eq!(marks(&html), vec![("rollback".to_string(), 1.5)]);
    assert!(
        html.contains("validation: 192 → 2.5"),
        "64 tokens a step, step 3"
    );
}

#[test]
fn a_malformed_line_is_refused_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CONFIG_FILE), "").unwrap();
    std::fs::write(
        dir.path().join(METRICS_FILE),
        "{\"event\": \"step\"}\n{oops\n",
    )
    .unwrap();
    let err = render(dir.path()).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl:2"), "{err}");
    let not_a_run = render(&dir.path().join("nothing")).unwrap_err().to_string();
    assert!(not_a_run.contains("is not a run directory"), "{not_a_run}");
}
