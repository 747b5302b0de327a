//! What the binary's tests share: running `holdfast` bounded in time, and reading its result.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Says that a test did not run, where a person sees it: the test harness swallows what a
/// passing test prints with `eprintln!`, but not what is written to the process's stderr.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// The longest any one `holdfast` command of a test may run.
pub const LIMIT: Duration = Duration::from_secs(240);

/// A child process killed (and reaped) when the test lets go of it, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion with captured output; fails the test if it runs past `limit`.
pub fn bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("holdfast starts");
    let mut guard = KillOnDrop(child);
    let started = Instant::now();
    while guard.0.try_wait().expect("wait").is_none() {
        assert!(started.elapsed() < limit, "holdfast ran past {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = std::mem::replace(&mut guard.0, Command::new("true").spawn().expect("true"));
    child.wait_with_output().expect("output")
}

/// `holdfast ARGS` in `cwd`, bounded by [`LIMIT`].
pub fn holdfast(cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    cmd.args(args).current_dir(cwd);
    bounded(cmd, LIMIT)
}

/// Asserts success without a panic; returns stdout.
pub fn ok(o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "expected success\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    out.into_owned()
}

/// Asserts a non-zero exit whose stderr names the problem, without a panic.
pub fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure mentioning '{needle}'"
    );
    assert!(
        err.contains(needle),
        "stderr should mention '{needle}':\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The JSON values of a `.jsonl` file (a run's ledger, events or metrics), one a line.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}
