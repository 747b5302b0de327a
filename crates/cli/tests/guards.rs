//! Stability guards through the real binary: injected NaN and loss spikes are caught, the run
//! finishes near a clean one, and the guards can be turned off.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{KillOnDrop, LIMIT, bounded, holdfast, jsonl, ok};

/// 200 steps of the default task (loss is on a smooth stretch there), batch 16.
fn run(d: &Path, name: &str, extra: &[&str]) -> (String, Vec<Value>) {
    let mut args = vec![
        "train",
        "--run-dir",
        name,
        "--steps",
        "200",
        "--batch-size",
        "16",
        "--no-progress",
    ];
    args.extend(extra);
    let out = ok(&holdfast(d, &args));
    (out, jsonl(&d.join(name).join("metrics.jsonl")))
}

/// The last evaluation's validation loss (JSON writes a NaN as null).
fn final_val_loss(metrics: &[Value]) -> f64 {
    let eval = metrics.iter().rev().find(|e| e["event"] == "eval").unwrap();
    eval["val_loss"].as_f64().unwrap_or(f64::NAN)
}

fn guard_events<'a>(metrics: &'a [Value], action: &str) -> Vec<&'a Value> {
    metrics
        .iter()
        .filter(|e| e["event"] == "guard" && e["action"] == action)
        .collect()
}

fn manifest(d: &Path, name: &str) -> Value {
    let p = d.join(name).join("checkpoints/step-00000200/manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn injected_nan_and_spike_are_caught_and_the_run_ends_near_a_clean_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, clean) = run(d, "clean", &[]);
    assert!(guard_events(&clean, "skip").is_empty() && guard_events(&clean, "rollback").is_empty());
    let clean_loss = final_val_loss(&clean);

    // One NaN step: not applied, nothing else changes.
    let (out, nan) = run(d, "nan", &["--chaos", "nan:at=120"]);
    let skips = guard_events(&nan, "skip");
    assert_eq!(skips.len(), 1, "{skips:?}");
    assert!(skips[0]["reason"].as_str().unwrap().contains("non-finite"));
    assert!(out.contains("1 updates skipped"), "{out}");
    let l = final_val_loss(&nan);
    assert!(
        l.is_finite() && (l - clean_loss).abs() <= 0.05 * clean_loss,
        "{l} vs clean {clean_loss}"
    );

    // A five-step spike: skipped, then rolled back, and the data window is not replayed.
    let (_, spike) = run(d, "spike", &["--chaos", "spike:at=150,scale=30,steps=5"]);
    let rollbacks = guard_events(&spike, "rollback");
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    assert!(
        rollbacks[0]["reason"]
            .as_str()
            .unwrap()
            .contains("above its running mean")
    );
    assert_eq!(guard_events(&spike, "skip").len(), 4);
    let l = final_val_loss(&spike);
    assert!(
        (l - clean_loss).abs() <= 0.05 * clean_loss,
        "{l} vs clean {clean_loss}"
    );
    // 200 applied steps drew 205 batches of 16 rows: the 5 spiking ones were skipped.
    assert_eq!(manifest(d, "clean")["cursor"]["next_sample"], 200 * 16);
    assert_eq!(manifest(d, "spike")["cursor"]["next_sample"], 205 * 16);
}

#[test]
fn with_guards_off_a_nan_poisons_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, m) = run(d, "off", &["--no-guards", "--chaos", "nan:at=120"]);
    assert!(guard_events(&m, "skip").is_empty());
    assert!(
        final_val_loss(&m).is_nan(),
        "guards off: the NaN update went into the weights"
    );
}

#[test]
fn endless_non_finite_steps_stop_the_run_with_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let nans: Vec<String> = (100..130).map(|s| format!("nan:at={s}")).collect();
    let spec = nans.join(";");
    let o = holdfast(
        d,
        &[
            "train",
            "--run-dir",
            "bad",
            "--steps",
            "200",
            "--batch-size",
            "8",
            "--no-progress",
            "--chaos",
            &spec,
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("training is unstable") && err.contains("rollbacks within"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_run_killed_while_checkpointing_resumes_from_the_last_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A checkpoint after every step, so that a kill lands in a write more often than not.
    let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args([
            "train",
            "--run-dir",
            "k",
            "--steps",
            "400",
            "--batch-size",
            "8",
            "--checkpoint-every",
            "1",
        ])
        .arg("--no-progress")
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let started = std::time::Instant::now();
    let ckpts = d.join("k/checkpoints");
    while std::fs::read_dir(&ckpts).map_or(0, |r| r.count()) < 3 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no checkpoints"
        );
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(37));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let out = holdfast(
        d,
        &["train", "--resume", "k", "--steps", "410", "--no-progress"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming"), "{err}");
    assert!(
        !err.contains("warning"),
        "only complete checkpoints are visible: {err}"
    );
    // The resumed run's own checkpoints verify (every checksum is checked on load).
    let eval = holdfast(d, &["eval", "k"]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let v: Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(v["step"], 410);
}

#[test]
fn a_failed_checkpoint_write_is_a_clear_error_and_the_previous_checkpoint_stays() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&holdfast(
        d,
        &[
            "train",
            "--run-dir",
            "full",
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--checkpoint-every",
            "10",
            "--no-progress",
        ],
    ));
    // A full disk, as the process sees it: writes past 64 KiB fail (EFBIG instead of ENOSPC).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    cmd.args([
        "train",
        "--resume",
        "full",
        "--steps",
        "40",
        "--no-progress",
    ])
    .current_dir(d);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = bounded(cmd, LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the write failure must fail the run");
    assert!(
        err.contains(".safetensors") && err.contains("too large"),
        "names the file and the cause: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let eval = holdfast(d, &["eval", "full"]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let v: Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(v["step"], 20, "the previous checkpoint is intact and used");
}
