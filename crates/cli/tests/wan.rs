//! Runs over the emulated network of `bench/wan.sh`: the coordinator and each worker in a
//! network namespace of its own, links shaped by tc tbf, every connection relayed with a
//! one-way delay, and a worker's link cut (iptables) and healed. Needs root, `ip`, `tc` and `iptables`; where they are missing the test says
//! so and does not run, unless HOLDFAST_REQUIRE_WAN is set (CI sets it), when it fails.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{bounded, jsonl, ok, skipped};

/// `bench/wan.sh run DIR/wan 3 ARGS` with `env`, its namespaces named after `tag`: the summary
/// line it printed, or None when the link cannot be made here (said so, unless required).
fn wan_run(dir: &Path, tag: &str, args: &[&str], env: &[(&str, &str)]) -> Option<Value> {
    let prefix = format!("hfw{tag}{}", std::process::id());
    let _cleanup = common::Namespaces {
        script: "wan.sh",
        var: "WAN_PREFIX",
        prefix: prefix.clone(),
    };
    let run = dir.join("wan");
    let mut cmd = Command::new("bash");
    cmd.arg(common::bench_script("wan.sh"))
        .args(["run", run.to_str().unwrap(), "3"])
        .args(args)
        .env("HOLDFAST", env!("CARGO_BIN_EXE_holdfast"))
        .env("WAN_PREFIX", &prefix)
        .envs(env.iter().copied());
    let out = bounded(cmd, std::time::Duration::from_secs(120));
    if out.status.code() == Some(3) {
        let why = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            std::env::var_os("HOLDFAST_REQUIRE_WAN").is_none(),
            "HOLDFAST_REQUIRE_WAN is set and the link cannot be made: {why}"
        );
        skipped(&why);
        return None;
    }
    let line = ok(&out);
    Some(serde_json::from_str(line.trim()).expect("a summary line"))
}

#[test]
fn a_quantized_run_completes_over_a_rate_limited_delayed_link() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--steps",
        "60",
        "--inner-steps",
        "10",
        "--batch-size",
        "8",
        "--sync-precision",
        "int8",
        "--seed",
        "3",
    ];
    let link = [("RATE", "10mbit"), ("DELAY_MS", "25")];
    let Some(s) = wan_run(dir.path(), "t", &args, &link) else {
        return;
    };
    assert_eq!(
        (s["workers"].as_u64(), s["rounds"].as_u64()),
        (Some(3), Some(6)),
        "{s}"
    );
    let utilisation = s["compute_utilisation"].as_f64().unwrap();
    assert!(utilisation > 0.0 && utilisation < 1.0, "{s}");
    // From the coordinator's first `ready` to its commit, a sync crosses the 25 ms link at
    // least three times one way (the answer, the mesh's two phases, the report): far from
    // loopback's milliseconds.
    assert!(s["median_sync_s"].as_f64().unwrap() >= 0.075, "{s}");
}

#[test]
fn a_worker_partitioned_past_the_failure_timeout_is_dropped_and_rejoins_once_healed() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--steps",
        "800",
        "--inner-steps",
        "10",
        "--batch-size",
        "8",
        "--seed",
        "3",
    ];
    // Worker 2 cut off 2 s into the run for 5 s: well past the 2 s failure timeout.
    let link = [("RATE", "1gbit"), ("DELAY_MS", "1"), ("PARTITION", "2@2+5")];
    let Some(s) = wan_run(dir.path(), "p", &args, &link) else {
        return;
    };
    let logs = dir.path().join("wan/logs");
    let cut = std::fs::read_to_string(logs.join("partition.log")).unwrap();
    assert!(cut.contains("cut h2") && cut.contains("healed h2"), "{cut}");
    let run = dir.path().join("wan/run");
    let events: Vec<Value> = jsonl(&run.join("events.jsonl"))
        .into_iter()
        .map(|e| e["detail"].clone())
        .filter(|e| e["name"] == "worker-2")
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let removed = kinds.iter().position(|&k| k == "removed");
    let rejoined = kinds.iter().rposition(|&k| k == "joined");
    assert!(
        removed.is_some() && rejoined > removed,
        "worker-2 was removed, then joined again: {kinds:?}"
    );
    // Every batch of the budget committed once, the partitioned worker's among them.
    let mut batches = Vec::new();
    let mut members_by_round = Vec::new();
    for round in jsonl(&run.join("ledger.jsonl")) {
        let Some(members) = round["members"].as_array() else {
            continue;
        };
        let mut names = BTreeSet::new();
        for m in members {
            names.insert(m["name"].as_str().unwrap().to_string());
            batches.extend(
                m["batches"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap()),
            );
        }
        members_by_round.push(names);
    }
    let unique: BTreeSet<u64> = batches.iter().copied().collect();
    assert_eq!(unique.len(), batches.len(), "a batch committed twice");
    let budget: BTreeSet<u64> = (0..unique.len() as u64).collect();
    assert_eq!(unique, budget, "a batch id missing: {s}");
    // The last round may be partly filled (the budget's remainder), so the last two.
    let last_two = &members_by_round[members_by_round.len() - 2..];
    assert!(
        last_two.iter().any(|m| m.contains("worker-2")),
        "back in the quorum by the end: {last_two:?}"
    );
}
