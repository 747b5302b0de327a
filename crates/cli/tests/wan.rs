//! A run over the emulated slow link of `bench/wan.sh`: the coordinator and each worker in a
//! network namespace of its own, links shaped by tc tbf, every connection relayed with a
//! one-way delay. Needs root, `ip`, `tc` and `iptables`; where they are missing the test says
//! so and does not run, unless HOLDFAST_REQUIRE_WAN is set (CI sets it), when it fails.

use std::process::Command;

mod common;
use common::{bounded, ok, skipped};

fn wan_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/wan.sh")
}

/// Removes the namespaces and processes of a run, however the test ends (a run killed for
/// overrunning cannot clean up after itself).
struct Namespaces(String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(wan_script())
            .arg("clean")
            .env("WAN_PREFIX", &self.0)
            .status();
    }
}

#[test]
fn a_quantized_run_completes_over_a_rate_limited_delayed_link() {
    let prefix = format!("hfwt{}", std::process::id());
    let _cleanup = Namespaces(prefix.clone());
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("wan");
    let mut cmd = Command::new("bash");
    cmd.arg(wan_script())
        .args(["run", run.to_str().unwrap(), "3"])
        .args(["--steps", "60", "--inner-steps", "10", "--batch-size", "8"])
        .args(["--sync-precision", "int8", "--seed", "3"])
        .env("HOLDFAST", env!("CARGO_BIN_EXE_holdfast"))
        .env("RATE", "10mbit")
        .env("DELAY_MS", "25")
        .env("WAN_PREFIX", &prefix);
    let out = bounded(cmd, std::time::Duration::from_secs(120));
    if out.status.code() == Some(3) {
        let why = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            std::env::var_os("HOLDFAST_REQUIRE_WAN").is_none(),
            "HOLDFAST_REQUIRE_WAN is set and the link cannot be made: {why}"
        );
        skipped(&why);
        return;
    }
    let line = ok(&out);
    let s: serde_json::Value = serde_json::from_str(line.trim()).expect("a summary line");
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
