//! `holdfast train --workers N`: an embedded coordinator in this process and N worker
//! processes of this same binary, supervised (a worker that dies is started again after a
//! delay, and rejoins through live recovery), with chaos faults delivered as real signals.
//! A worker that exits on its own with an error (bad input, say) is not restarted: a restart
//! would meet the same error. One killed by a signal or a panic is. Unstable training is not
//! such an error: the coordinator judges it from every replica's rounds and ends the run.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use holdfast_cluster::chaos::{ChaosPlan, Signal};
use holdfast_cluster::wire::random_bytes;
use holdfast_train::RunConfig;
use holdfast_train::coordinate::{ClusterRun, ClusterSummary, Restore};
use holdfast_train::run::Prepared;
use indicatif::{ProgressBar, ProgressStyle};

pub const SECRET_ENV: &str = "HOLDFAST_SECRET";
const SUPERVISE_EVERY: Duration = Duration::from_millis(50);
/// How long the launcher waits, with no live worker holding the committed state and none of
/// them stopped (which could come back with it), before it ends the run.
const STATE_LOST_GRACE: Duration = Duration::from_secs(5);
/// The status a Rust process exits with when a thread's panic ends it.
const RUST_PANIC_EXIT_CODE: i32 = 101;
/// How long finished workers get to exit before they are killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

pub struct LaunchOptions {
    pub workers: usize,
    pub chaos: ChaosPlan,
    pub respawn_after: Option<Duration>,
    pub device: String,
    pub progress: bool,
}

struct Slot {
    name: String,
    child: Option<Child>,
    respawn_at: Option<Instant>,
    slow_factor: f64,
    /// Numeric faults for the worker to inject, as a spec (empty: none).
    inject: String,
    stopped: bool,
    /// Why the worker gave up, when it exited on its own with an error.
    failure: Option<String>,
}

/// Kills every worker still running when the launcher leaves, however it leaves.
struct Workers(Vec<Slot>);

impl Drop for Workers {
    fn drop(&mut self) {
        for s in &mut self.0 {
            if let Some(c) = s.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn spawn_worker(
    slot: &Slot,
    coordinator: &str,
    secret: &str,
    cache_dir: &Path,
    log_dir: &Path,
    device: &str,
    threads: usize,
) -> Result<Child> {
    let log_path = log_dir.join(format!("{}.log", slot.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    // This very binary, even if the file was replaced or deleted since it started.
    let exe = match Path::new("/proc/self/exe").exists() {
        true => PathBuf::from("/proc/self/exe"),
        false => std::env::current_exe().context("locating the holdfast binary")?,
    };
    let mut cmd = Command::new(exe);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL this child when
    // the launcher dies, so a crashed launcher leaves no orphan workers behind.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.args([
        "worker",
        "--join",
        coordinator,
        "--name",
        &slot.name,
        "--device",
        device,
    ])
    .arg("--cache-dir")
    .arg(cache_dir)
    .args(["--slow-factor", &slot.slow_factor.to_string()])
    .args(match slot.inject.is_empty() {
        true => vec![],
        false => vec!["--inject".to_string(), slot.inject.clone()],
    })
    .env(SECRET_ENV, secret)
    // Several workers share the cores of one machine.
    .env("RAYON_NUM_THREADS", threads.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .context("starting a worker process")
}

fn signal(child: &Child, sig: Signal) {
    let signo = match sig {
        Signal::Kill => libc::SIGKILL,
        Signal::Stop => libc::SIGSTOP,
        Signal::Continue => libc::SIGCONT,
    };
    // SAFETY: kill(2) on the pid of a child we have not reaped yet: it names our own process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signo);
    }
}

pub fn run(
    run_dir: &Path,
    cfg: &RunConfig,
    prepared: &Prepared,
    cache_dir: &Path,
    device: burn::tensor::Device,
    opts: &LaunchOptions,
    restore: Option<Restore>,
) -> Result<ClusterSummary> {
    let secret: String = random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut cluster = ClusterRun::start(
        run_dir,
        cfg,
        &prepared.model,
        "127.0.0.1:0",
        secret.as_bytes(),
        opts.workers,
        device,
        restore,
    )?;
    let addr = cluster.server.addr.clone();
    let log_dir = run_dir.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut workers = Workers(
        (0..opts.workers)
            .map(|i| Slot {
                name: format!("worker-{i}"),
                child: None,
                respawn_at: Some(Instant::now()),
                slow_factor: opts.chaos.slow_factor(i),
                inject: opts.chaos.number_faults(i).to_spec(),
                stopped: false,
                failure: None,
            })
            .collect(),
    );
    let bar = if opts.progress {
        ProgressBar::new(cfg.cluster_steps())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    // Workers of one machine share its cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / opts.workers).max(1);
    let started = Instant::now();
    let mut chaos_clock = Duration::ZERO;
    let mut chaos_started: Option<Instant> = None;
    let mut state_lost_since: Option<Instant> = None;
    loop {
        let p = cluster.poll()?;
        bar.set_position(p.step);
        bar.set_message(format!(
            "loss {}  {} live  {} faults",
            p.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            p.live_workers,
            p.faults
        ));
        if p.complete {
            break;
        }
        // Every replica of the state is gone (all workers died within one round): restarted
        // workers cannot rebuild it, so say so instead of waiting for ever.
        if p.state_lost && !workers.0.iter().any(|s| s.stopped) {
            let since = *state_lost_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STATE_LOST_GRACE {
                return Err(state_lost_error(run_dir, p.committed_rounds, opts.workers));
            }
        } else {
            state_lost_since = None;
        }
        // Chaos time starts with the first round, so `at=` means "into training".
        if p.committed_rounds > 0 || p.live_workers >= opts.workers {
            chaos_started.get_or_insert_with(Instant::now);
        }
        if let Some(t0) = chaos_started {
            let now = t0.elapsed();
            for action in opts.chaos.due(chaos_clock, now, opts.workers) {
                let slot = &mut workers.0[action.worker];
                if let Some(child) = slot.child.as_ref() {
                    eprintln!(
                        "[{:7.1}s] chaos: {:?} {}",
                        started.elapsed().as_secs_f64(),
                        action.signal,
                        slot.name
                    );
                    signal(child, action.signal);
                    slot.stopped = action.signal == Signal::Stop;
                }
            }
            chaos_clock = now;
        }
        for slot in &mut workers.0 {
            if let Some(child) = slot.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!(
                    "[{:7.1}s] {} exited ({status})",
                    started.elapsed().as_secs_f64(),
                    slot.name
                );
                slot.child = None;
                if restarts_after(status) {
                    slot.respawn_at = opts.respawn_after.map(|d| Instant::now() + d);
                } else if !status.success() {
                    slot.failure =
                        Some(last_error_line(&log_dir.join(format!("{}.log", slot.name))));
                }
            }
            if slot.child.is_none() && slot.respawn_at.is_some_and(|t| Instant::now() >= t) {
                match spawn_worker(
                    slot,
                    &addr,
                    &secret,
                    cache_dir,
                    &log_dir,
                    &opts.device,
                    threads,
                ) {
                    Ok(child) => {
                        slot.child = Some(child);
                        slot.respawn_at = None;
                        slot.stopped = false;
                    }
                    // The others train on; try again later rather than end the run.
                    Err(e) => {
                        eprintln!("warning: {}: {e:#}; retrying in 5 s", slot.name);
                        slot.respawn_at = Some(Instant::now() + Duration::from_secs(5));
                    }
                }
            }
        }
        if workers
            .0
            .iter()
            .all(|s| s.child.is_none() && s.respawn_at.is_none())
        {
            let logs = log_dir.display();
            let why = match workers
                .0
                .iter()
                .find_map(|s| Some((&s.name, s.failure.as_ref()?)))
            {
                Some((name, failure)) => format!("{name}: {failure} (logs: {logs})"),
                None => format!("see {logs}"),
            };
            bail!("every worker has exited and none will be restarted; {why}");
        }
        std::thread::sleep(SUPERVISE_EVERY);
    }
    bar.finish_and_clear();
    let summary = cluster.finish(prepared)?;
    // Released workers exit on their own; a stopped one cannot, so it is woken first.
    let deadline = Instant::now() + EXIT_GRACE;
    for slot in &mut workers.0 {
        let Some(child) = slot.child.as_mut() else {
            continue;
        };
        if slot.stopped {
            signal(child, Signal::Continue);
        }
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                slot.child = None;
                break;
            }
            std::thread::sleep(SUPERVISE_EVERY);
        }
    }
    Ok(summary)
}

/// The run's end when no live worker holds the state after `rounds` committed rounds: the way
/// to go on from the newest checkpoint, if one was written.
fn state_lost_error(run_dir: &Path, rounds: u64, workers: usize) -> anyhow::Error {
    let lost = format!(
        "every worker holding the training state after round {rounds} was lost at once, so the \
         run cannot go on live"
    );
    let checkpointed = run_dir
        .join("checkpoints")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some());
    if checkpointed {
        anyhow::anyhow!(
            "{lost}; restart it from its newest checkpoint with `holdfast train --resume {} \
             --workers {workers}`",
            run_dir.display()
        )
    } else {
        anyhow::anyhow!("{lost}, and no checkpoint had been written yet; start it again")
    }
}

/// Whether a worker that exited with `status` is started again: yes when it was killed (a
/// crash, the OOM killer, chaos) or panicked; no when it exited with an error of its own (it
/// said why in its log, and would say it again) or finished.
fn restarts_after(status: std::process::ExitStatus) -> bool {
    status.signal().is_some() || status.code() == Some(RUST_PANIC_EXIT_CODE)
}

/// The last line of a worker's log that starts with `error`, or a pointer to the log.
fn last_error_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| l.starts_with("error"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("exited with an error; see {}", log.display()))
}

pub fn secret_from_env_or_file(file: Option<&PathBuf>) -> Result<Vec<u8>> {
    if let Some(path) = file {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading --secret-file {}", path.display()))?;
        let s = s.trim();
        if s.is_empty() {
            bail!("--secret-file {} is empty", path.display());
        }
        return Ok(s.as_bytes().to_vec());
    }
    match std::env::var(SECRET_ENV) {
        Ok(s) if !s.is_empty() => Ok(s.into_bytes()),
        _ => bail!(
            "no shared secret: set {SECRET_ENV} or pass --secret-file (every peer of a run needs the same one)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::ExitStatus;

    #[test]
    fn killed_or_panicked_workers_restart_and_ones_that_gave_up_do_not() {
        // Raw wait statuses: a signal number in the low bits, an exit code in the next byte.
        let killed = ExitStatus::from_raw(9);
        let panicked = ExitStatus::from_raw(101 << 8);
        let gave_up = ExitStatus::from_raw(1 << 8);
        let finished = ExitStatus::from_raw(0);
        assert!(restarts_after(killed));
        assert!(restarts_after(panicked));
        assert!(!restarts_after(gave_up));
        assert!(!restarts_after(finished));
    }

    #[test]
    fn a_failed_worker_is_reported_by_its_last_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker-1.log");
        std::fs::write(
            &log,
            "warn: a\nerror: first\nmore\nerror: training is unstable: x\n",
        )
        .unwrap();
        assert_eq!(last_error_line(&log), "error: training is unstable: x");
        let missing = last_error_line(&dir.path().join("none.log"));
        assert!(missing.contains("none.log"), "{missing}");
    }
}
