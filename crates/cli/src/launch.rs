//! `holdfast train --workers N`: an embedded coordinator in this process and N worker
//! processes of this same binary, supervised (a worker that dies is started again after a
//! delay, and rejoins through live recovery), with chaos faults delivered as real signals.
//! A worker that exits on its own with an error (bad input, say) is not restarted: a restart
//! would meet the same error. One killed by a signal or a panic is. Unstable training is not
//! such an error: the coordinator judges it from every replica's rounds and ends the run.

use std::ops::ControlFlow;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use holdfast_cluster::coordinator::Event;
use holdfast_cluster::wire::{Auth, fresh_secret};
use holdfast_train::RunConfig;
use holdfast_train::chaos::{ChaosPlan, Signal};
use holdfast_train::coordinate::{ClusterRun, ClusterSummary, Progress, Restore, Start};
use holdfast_train::run::Prepared;
use holdfast_train::supervise::{Action, Exit, Seen, Supervisor};
use indicatif::{ProgressBar, ProgressStyle};

pub const SECRET_ENV: &str = "HOLDFAST_SECRET";
const SUPERVISE_EVERY: Duration = Duration::from_millis(50);
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
    slow_factor: f64,
    /// Numeric faults for the worker to inject, as a spec (empty: none).
    inject: String,
}

/// What every worker process is started with.
struct SpawnSpec {
    coordinator: String,
    secret: String,
    cache_dir: PathBuf,
    log_dir: PathBuf,
    device: String,
    /// Compute threads per worker.
    threads: usize,
}

/// Kills every worker still running when the launcher leaves, however it leaves.
struct Workers(Vec<Slot>);

impl Workers {
    /// `n` workers, none started yet, with the chaos each is to carry.
    fn planned(chaos: &ChaosPlan, n: usize) -> Workers {
        Workers(
            (0..n)
                .map(|i| Slot {
                    name: format!("worker-{i}"),
                    child: None,
                    slow_factor: chaos.slow_factor(i),
                    inject: chaos.number_faults(i).to_spec(),
                })
                .collect(),
        )
    }
}

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

fn spawn_worker(slot: &Slot, spec: &SpawnSpec) -> Result<Child> {
    let log_path = spec.log_dir.join(format!("{}.log", slot.name));
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
        &spec.coordinator,
        "--name",
        &slot.name,
        "--device",
        &spec.device,
    ])
    .arg("--cache-dir")
    .arg(&spec.cache_dir)
    .args(["--slow-factor", &slot.slow_factor.to_string()])
    .args(match slot.inject.is_empty() {
        true => vec![],
        false => vec!["--inject".to_string(), slot.inject.clone()],
    })
    .env(SECRET_ENV, &spec.secret)
    // Several workers share the cores of one machine.
    .env("RAYON_NUM_THREADS", spec.threads.to_string())
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

/// How one launch of a run ended, short of an error.
pub enum Ended {
    Complete(Box<ClusterSummary>),
    /// Every worker holding the state after `rounds` committed rounds was lost at once.
    StateLost {
        rounds: u64,
    },
}

pub fn run(
    run_dir: &Path,
    cfg: &RunConfig,
    prepared: &Prepared,
    cache_dir: &Path,
    device: burn::tensor::Device,
    opts: &LaunchOptions,
    restore: Option<Restore>,
) -> Result<Ended> {
    let secret = fresh_secret();
    let mut cluster = ClusterRun::start(
        run_dir,
        cfg,
        &prepared.model,
        "127.0.0.1:0",
        secret.as_bytes(),
        opts.workers,
        device,
        restore.map_or(Start::Fresh, |r| Start::Restore(Box::new(r))),
        None,
    )?;
    let spawn = SpawnSpec {
        coordinator: cluster.server.addr.clone(),
        secret,
        cache_dir: cache_dir.to_path_buf(),
        log_dir: run_dir.join("logs"),
        device: opts.device.clone(),
        // Workers of one machine share its cores.
        threads: (std::thread::available_parallelism().map_or(1, |n| n.get()) / opts.workers)
            .max(1),
    };
    std::fs::create_dir_all(&spawn.log_dir)
        .with_context(|| format!("creating {}", spawn.log_dir.display()))?;
    let mut workers = Workers::planned(&opts.chaos, opts.workers);
    let mut supervisor = Supervisor::new(
        opts.workers,
        opts.chaos.clone(),
        opts.respawn_after,
        Instant::now(),
    );
    let bar = progress_bar(opts.progress, cfg.cluster_steps());
    let started = Instant::now();
    let lost_after = drive(&mut cluster, &bar, |p| {
        let now = Instant::now();
        reap(&mut workers, &mut supervisor, &spawn.log_dir, started);
        let seen = Seen {
            committed_rounds: p.committed_rounds,
            live_workers: p.live_workers,
            state_lost: p.state_lost,
        };
        for action in supervisor.decide(now, &seen) {
            match action {
                Action::StateLost => return Ok(ControlFlow::Break(p.committed_rounds)),
                Action::AllExited { gave_up } => {
                    return Err(all_exited_error(&workers, gave_up, &spawn.log_dir));
                }
                other => act(other, &mut workers, &mut supervisor, &spawn, started),
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    bar.finish_and_clear();
    if let Some(rounds) = lost_after {
        return Ok(Ended::StateLost { rounds });
    }
    let summary = cluster.finish(prepared)?;
    let stopped: Vec<usize> = (0..opts.workers)
        .filter(|&w| supervisor.is_stopped(w))
        .collect();
    let_workers_exit(&mut workers, &stopped);
    Ok(Ended::Complete(Box::new(summary)))
}

/// Polls the run until it is complete (`None`), showing its progress and what happened;
/// `tick` acts on each poll that is not the last (supervising local workers, say), and ends
/// the drive early when every replica was lost, with the rounds committed by then.
pub fn drive(
    cluster: &mut ClusterRun,
    bar: &ProgressBar,
    mut tick: impl FnMut(&Progress) -> Result<ControlFlow<u64>>,
) -> Result<Option<u64>> {
    loop {
        let p = cluster.poll()?;
        for (elapsed_s, event) in &p.events {
            if let Some(line) = describe_event(event) {
                let line = format!("[{elapsed_s:7.1}s] {line}");
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
            }
        }
        bar.set_position(p.step);
        bar.set_message(format!(
            "loss {}  {} live  {} faults",
            p.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
            p.live_workers,
            p.faults
        ));
        if p.complete {
            return Ok(None);
        }
        if let ControlFlow::Break(rounds) = tick(&p)? {
            return Ok(Some(rounds));
        }
        std::thread::sleep(SUPERVISE_EVERY);
    }
}

/// The events a person watching the run wants to see as they happen.
fn describe_event(e: &Event) -> Option<String> {
    Some(match e {
        Event::Removed { name, reason, .. } => format!("{name} left the quorum: {reason}"),
        Event::Corruption {
            next_round,
            name,
            flags,
            ..
        } => format!(
            "{name}: its state for round {next_round} disagrees with the majority (corruption flag {flags}); it re-fetches the majority's state"
        ),
        Event::RoundsVoided { from, to, reason } => {
            format!("rounds {from}..{to} undone: {reason}")
        }
        Event::Divergence { next_round, hashes } => {
            format!("warning: replicas disagree on the state of round {next_round}: {hashes:?}")
        }
        Event::Rewound(r) => format!(
            "every replica rolled back in round {}: rewound to round {}, steps ×{}",
            r.round, r.from, r.step_scale
        ),
        _ => return None,
    })
}

pub fn progress_bar(show: bool, steps: u64) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    bar
}

/// Tells the supervisor about every worker process that ended.
fn reap(workers: &mut Workers, supervisor: &mut Supervisor, log_dir: &Path, started: Instant) {
    for (i, slot) in workers.0.iter_mut().enumerate() {
        let Some(Ok(Some(status))) = slot.child.as_mut().map(|c| c.try_wait()) else {
            continue;
        };
        eprintln!(
            "[{:7.1}s] {} exited ({status})",
            started.elapsed().as_secs_f64(),
            slot.name
        );
        slot.child = None;
        let exit = if restarts_after(status) {
            Exit::Crashed
        } else if status.success() {
            Exit::Finished
        } else {
            Exit::GaveUp {
                why: last_error_line(&log_dir.join(format!("{}.log", slot.name))),
            }
        };
        supervisor.exited(i, exit, Instant::now());
    }
}

/// The run's end when every worker has exited and none will be started again, naming the
/// first that gave up and why.
fn all_exited_error(
    workers: &Workers,
    gave_up: Option<(usize, String)>,
    log_dir: &Path,
) -> anyhow::Error {
    let logs = log_dir.display();
    let why = match gave_up {
        Some((w, failure)) => format!("{}: {failure} (logs: {logs})", workers.0[w].name),
        None => format!("see {logs}"),
    };
    anyhow::anyhow!("every worker has exited and none will be restarted; {why}")
}

/// Starts or signals a worker process, as the supervisor decided.
fn act(
    action: Action,
    workers: &mut Workers,
    supervisor: &mut Supervisor,
    spawn: &SpawnSpec,
    started: Instant,
) {
    match action {
        Action::Start { worker } => match spawn_worker(&workers.0[worker], spawn) {
            Ok(child) => {
                workers.0[worker].child = Some(child);
                supervisor.started(worker);
            }
            // The others train on; the supervisor tries again later rather than end the run.
            Err(e) => {
                tracing::warn!("{}: {e:#}; retrying", workers.0[worker].name);
                supervisor.start_failed(worker, Instant::now());
            }
        },
        Action::Signal {
            worker,
            signal: sig,
        } => {
            let slot = &workers.0[worker];
            if let Some(child) = slot.child.as_ref() {
                eprintln!(
                    "[{:7.1}s] chaos: {sig:?} {}",
                    started.elapsed().as_secs_f64(),
                    slot.name
                );
                signal(child, sig);
            }
        }
        // Ending the run is the caller's to do.
        Action::StateLost | Action::AllExited { .. } => {}
    }
}

/// Released workers exit on their own; a stopped one cannot, so it is woken first. Any still
/// running after the grace are killed when `workers` is dropped.
fn let_workers_exit(workers: &mut Workers, stopped: &[usize]) {
    let deadline = Instant::now() + EXIT_GRACE;
    for (i, slot) in workers.0.iter_mut().enumerate() {
        let Some(child) = slot.child.as_mut() else {
            continue;
        };
        if stopped.contains(&i) {
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
}

/// Whether the run has a checkpoint to restart from.
pub fn checkpointed(run_dir: &Path) -> bool {
    run_dir
        .join("checkpoints")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
}

/// The run's end when no live worker holds the state after `rounds` committed rounds: the way
/// to go on from the newest checkpoint (`resume`, the command), if one was written.
pub fn state_lost_error(run_dir: &Path, rounds: u64, resume: &str) -> anyhow::Error {
    let lost = format!(
        "every worker holding the training state after round {rounds} was lost at once, so the \
         run cannot go on live"
    );
    if checkpointed(run_dir) {
        anyhow::anyhow!("{lost}; restart it from its newest checkpoint with `{resume}`")
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
        return strong(s.as_bytes(), &format!("--secret-file {}", path.display()));
    }
    match std::env::var(SECRET_ENV) {
        Ok(s) if !s.is_empty() => strong(s.as_bytes(), SECRET_ENV),
        _ => bail!(
            "no shared secret: set {SECRET_ENV} or pass --secret-file (every peer of a run needs the same one; `holdfast secret` prints one)"
        ),
    }
}

/// `secret`, when it is strong enough to protect a run.
fn strong(secret: &[u8], source: &str) -> Result<Vec<u8>> {
    Auth::new(secret).with_context(|| format!("{source}: weak secret"))?;
    Ok(secret.to_vec())
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
    fn a_lost_state_names_the_resume_command_only_when_a_checkpoint_exists() {
        let dir = tempfile::tempdir().unwrap();
        let resume = "holdfast train --resume RUN --workers 3";
        let none = state_lost_error(dir.path(), 7, resume).to_string();
        assert!(
            none.contains("after round 7") && none.contains("no checkpoint"),
            "{none}"
        );
        std::fs::create_dir_all(dir.path().join("checkpoints/step-00000040")).unwrap();
        let some = state_lost_error(dir.path(), 7, resume).to_string();
        assert!(
            some.contains("--resume") && some.contains("--workers 3"),
            "{some}"
        );
    }

    #[test]
    fn a_secret_file_is_trimmed_and_an_empty_or_weak_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        let secret = fresh_secret();
        std::fs::write(&file, format!("  {secret}\n")).unwrap();
        assert_eq!(
            secret_from_env_or_file(Some(&file)).unwrap(),
            secret.as_bytes()
        );
        std::fs::write(&file, "s3cret\n").unwrap();
        let err = secret_from_env_or_file(Some(&file)).unwrap_err();
        assert!(format!("{err:#}").contains("weak secret"), "{err:#}");
        std::fs::write(&file, "\n").unwrap();
        let err = secret_from_env_or_file(Some(&file))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty"), "{err}");
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
