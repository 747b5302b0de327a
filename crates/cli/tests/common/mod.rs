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

/// The run's summary.json.
pub fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join("summary.json")).expect("summary.json")).unwrap()
}

/// Every batch id of the budget in the ledger once: committed, or skipped by a rewind (a
/// `skipped_batches` line). Rounds undone (a `voided_rounds` marker) do not count. Returns
/// the committed rounds.
pub fn assert_exactly_once(run: &Path) -> Vec<serde_json::Value> {
    let mut ledger: Vec<serde_json::Value> = Vec::new();
    let mut skipped: Vec<u64> = Vec::new();
    for line in jsonl(&run.join("ledger.jsonl")) {
        if let Some(v) = line.get("voided_rounds") {
            let (from, to) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
            ledger.retain(|r| !(from..to).contains(&r["round"].as_u64().unwrap()));
        } else if let Some(b) = line.get("skipped_batches") {
            skipped.extend(b.as_array().unwrap().iter().map(|b| b.as_u64().unwrap()));
        } else {
            ledger.push(line);
        }
    }
    let mut ids: Vec<u64> = ledger
        .iter()
        .flat_map(|r| r["members"].as_array().unwrap().iter())
        .flat_map(|m| {
            m["batches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap())
        })
        .chain(skipped)
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a batch was committed twice");
    assert_eq!(
        ids,
        (0..n as u64).collect::<Vec<_>>(),
        "a batch was skipped"
    );
    assert_eq!(n as u64, budget_batches(run), "the whole budget committed");
    ledger
}

/// The run's budget in batches, from its config and worker count: a fault may cost rounds,
/// never data.
pub fn budget_batches(run: &Path) -> u64 {
    let cfg = holdfast_train::RunConfig::from_toml_file(&run.join("config.toml")).unwrap();
    cfg.budget_batches(summary(run)["workers"].as_u64().unwrap() as usize)
}

/// `count` worker processes named host-0, host-1, … in `d`, joining as `how` says (`--join
/// ADDR`, or `--etcd E --run NAME`) with the run's `secret`, one thread each.
pub fn start_workers(d: &Path, how: &[&str], secret: &str, count: usize) -> Vec<KillOnDrop> {
    (0..count)
        .map(|i| start_worker(d, how, secret, &format!("host-{i}")))
        .collect()
}

/// One `holdfast worker` named `name`, joining `how` (flags), on one compute thread.
pub fn start_worker(d: &Path, how: &[&str], secret: &str, name: &str) -> KillOnDrop {
    let c = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("worker")
        .args(how)
        .args(["--name", name])
        .env("HOLDFAST_SECRET", secret)
        .env("RAYON_NUM_THREADS", "1")
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(c)
}

/// A script of `bench/`.
pub fn bench_script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench")
        .join(name)
}

/// Removes the namespaces and processes of a run of `bench/SCRIPT` (its `clean`, with the
/// run's prefix in the variable `VAR`), however the test ends: a run killed for overrunning
/// cannot clean up after itself.
pub struct Namespaces {
    pub script: &'static str,
    pub var: &'static str,
    pub prefix: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(bench_script(self.script))
            .arg("clean")
            .env(self.var, &self.prefix)
            .status();
    }
}
