//! The coordinator's side of a multi-worker run, around the pure state machine in
//! `holdfast_cluster::coordinator`: it serves workers, writes the run directory — the ledger
//! of committed rounds (`ledger.jsonl`, one line per round: who trained which batch ids, and
//! what the round cost), membership events (`events.jsonl`), checkpoints — and at the end
//! collects the final state from a healthy worker, evaluates it and lets the workers go.
//! Checkpoints come from live peers (in DiLoCo every worker's own state too), so no worker
//! needs the coordinator's disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use holdfast_cluster::coordinator::{
    AuditVerdict, CheckpointSource, Coordinator, Durable, Event, Liveness, Options, RoundRecord,
};
use holdfast_cluster::fingerprint::{OUTLIER_RATIO, STEP_OUTLIER_RATIO};
use holdfast_cluster::pace::RoundBound;
use holdfast_cluster::peer::{PeerServer, Snapshot, fetch_state_from};
use holdfast_cluster::server::{CoordinatorServer, LeaseChanges, Recorder};
use holdfast_cluster::wire::{Auth, random_bytes};
use holdfast_model::ModelConfig;
use serde::Serialize;

use crate::checkpoint::{ClusterExtras, ClusterPosition};
use crate::config::SyncMode;
use crate::replica::{OwnState, Replica, flatten};
use crate::run::{EvalReport, FINAL_EXACT_MATCH_PROBLEMS, Prepared, evaluate};
use crate::sync::strategy;
use crate::{RunConfig, TrainError, TrainState, append_jsonl, checkpoint};

pub use crate::run::{EVENTS_FILE, LEDGER_FILE, SUMMARY_FILE};
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds after the one every replica rolled back in that take a rewind's damped step: long
/// enough for the replicas to leave the region where they failed.
const DAMP_ROUNDS: u64 = 4;

/// What the progress display shows.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub committed_rounds: u64,
    /// Where the committed batches have taken the schedule (steps per worker).
    pub step: u64,
    pub live_workers: usize,
    pub last_loss: Option<f64>,
    pub faults: u64,
    /// Every batch committed and the final state voted on: [`ClusterRun::finish`] may run.
    pub complete: bool,
    /// No live worker holds the committed state (see the coordinator's `state_lost`).
    pub state_lost: bool,
    /// What happened since the last poll, with the seconds since the run started: for the
    /// caller to show (removals, corruption, undone rounds, divergences) as it sees fit.
    pub events: Vec<(f64, Event)>,
}

/// A finished multi-worker run.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterSummary {
    pub workers: usize,
    pub sync: String,
    /// Absent when rounds close by time or tokens: their steps vary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_round: Option<u64>,
    pub rounds: u64,
    /// Batch ids committed: the whole budget.
    pub committed_batches: u64,
    pub wall_s: f64,
    /// From the first round's start to the last round's commit: the wall time of training,
    /// without the final checkpoint's fetch and evaluation that follow it.
    pub training_s: f64,
    pub committed_tokens: u64,
    /// Committed tokens per second of wall time, from the first round's start.
    pub goodput_tokens_per_s: f64,
    pub discarded_batches: u64,
    pub faults: u64,
    pub aborted_attempts: u64,
    pub divergences: u64,
    /// Replica states that disagreed with the majority, and the workers caught (with how
    /// often): suspect hardware.
    pub corruptions: u64,
    /// Contributions voided for a fingerprint far above their peers' (corruption in compute);
    /// their workers are counted among the suspects too.
    pub outliers: u64,
    /// Replay audits held, and those whose replays disagreed with what the member sent.
    pub audits: u64,
    pub failed_audits: u64,
    pub suspects: std::collections::BTreeMap<String, u32>,
    /// Workers far slower than their peers in most of their recent rounds, with their median
    /// ratio of seconds per batch over their peers' (see the coordinator's `SLOW_RATIO`).
    pub slow_workers: std::collections::BTreeMap<String, f64>,
    /// Inner steps the workers' guards did not apply, and their rollbacks (in committed
    /// rounds that were not undone).
    pub guard_skips: u64,
    pub guard_rollbacks: u64,
    /// Rounds every replica rolled back in, each answered by rewinding the run, and the
    /// batches of those rounds left out.
    pub rewinds: u64,
    pub skipped_batches: u64,
    pub bytes_sent: u64,
    pub bytes_sent_per_token: f64,
    /// Share of the training time (`training_s`) the workers spent computing (their mean per
    /// round, summed over the committed rounds), not waiting on sync or on each other.
    pub compute_utilisation: f64,
    /// Median time a clean round's sync held training up, and the worst for a round with a fault.
    pub median_sync_s: f64,
    pub max_fault_sync_s: f64,
    pub final_loss: f64,
    pub eval: EvalReport,
    pub checkpoint: PathBuf,
}

/// How a coordinator begins.
pub enum Start {
    /// A new run, from the seeded state.
    Fresh,
    /// Restarting cold from a checkpoint.
    Restore(Box<Restore>),
    /// Taking over from a coordinator that led the run and recorded where it stood (see
    /// [`Coordinator::take_over`]): the state comes from the workers that rejoin.
    TakeOver(Durable),
}

/// The control plane a coordinator answers to when it is one of several (etcd): it records
/// where the run stands, and it says which workers live.
pub trait ControlPlane {
    /// Records every change of where the run stands (see
    /// [`CoordinatorServer::start_recording`]).
    fn recorder(&self) -> Recorder;
    /// How the workers of the run with id `run_id` show they live, and the changes to that as
    /// they come.
    fn follow_members(&self, run_id: u64) -> (Liveness, LeaseChanges);
}

/// A checkpoint to restart a multi-worker run from.
pub struct Restore {
    pub state: TrainState,
    pub cluster: ClusterExtras,
}

pub struct ClusterRun {
    pub server: CoordinatorServer,
    /// Serve the checkpoint a cold restart begins from (the shared state, then each worker's
    /// own), until workers hold it.
    _restored: Vec<PeerServer>,
    run_dir: PathBuf,
    cfg: RunConfig,
    /// The model trained (its vocabulary set by the tokenizer), to read workers' states with.
    model: ModelConfig,
    auth: Auth,
    run_id: u64,
    device: Device,
    started: Instant,
    first_round: Option<Instant>,
    last_commit: Option<Instant>,
    records: Vec<RoundRecord>,
    /// Events a checkpoint drained (to write their ledger lines first), for the next poll.
    undelivered: Vec<Event>,
    faults: u64,
    aborted: u64,
    divergences: u64,
    corruptions: u64,
    outliers: u64,
    audits: u64,
    failed_audits: u64,
    suspects: std::collections::BTreeMap<String, u32>,
    slow_workers: std::collections::BTreeMap<String, f64>,
    rewinds: u64,
    skipped_batches: u64,
    checkpoints: Cadence,
    pub workers: usize,
    /// Why this coordinator may no longer write the run directory, if it may not (see
    /// [`ClusterRun::fenced_by`]).
    fence: Option<Fence>,
}

/// Asked before the run directory is written: `Some(reason)` once this coordinator is no
/// longer in charge of the run.
pub type Fence = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The ledger of a run taken over at `d`: the lines of rounds `d` undid go, and the committed
/// rounds the last leader recorded in `d` but had not written yet are added. Returns how
/// many were added; a gap older than `d` holds is an error that names it.
fn take_over_ledger(path: &Path, d: &Durable) -> Result<usize, TrainError> {
    truncate_ledger(path, d.next_round)?;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let next = (text.lines())
        .filter_map(|l| serde_json::from_str::<RoundRecord>(l).ok())
        .map(|r| r.round + 1)
        .max()
        .unwrap_or(0);
    let missing: Vec<&RoundRecord> = d.recent.iter().filter(|r| r.round >= next).collect();
    if let Some(first) = missing.first()
        && first.round > next
    {
        return Err(TrainError::Cluster(format!(
            "{}: rounds {next}..{} are neither in it nor among the rounds etcd keeps",
            path.display(),
            first.round
        )));
    }
    for r in &missing {
        append_jsonl(path, r)?;
    }
    Ok(missing.len())
}

/// The coordinator of a run taken over at `d`, its ledger mended and the takeover recorded.
fn take_over(
    run_dir: &Path,
    cfg: &RunConfig,
    opts: Options,
    d: Durable,
) -> Result<Coordinator, TrainError> {
    let added = take_over_ledger(&run_dir.join(LEDGER_FILE), &d)?;
    let took_over = serde_json::json!({
        "event": "took_over",
        "next_round": d.next_round,
        "ledger_lines_added": added,
    });
    record_start(run_dir, took_over)?;
    Ok(Coordinator::take_over(
        opts,
        cfg.to_toml(),
        d,
        Instant::now(),
    ))
}

/// Writes how this coordinator began (`detail`) as the first event of its stretch.
fn record_start(run_dir: &Path, detail: serde_json::Value) -> Result<(), TrainError> {
    let line = serde_json::json!({"elapsed_s": 0.0, "detail": detail});
    append_jsonl(&run_dir.join(EVENTS_FILE), &line)
}

/// Keeps the ledger lines of rounds before `next_round` (atomically).
fn truncate_ledger(path: &Path, next_round: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| match serde_json::from_str::<RoundRecord>(l) {
            Ok(r) => r.round < next_round,
            // An undo marker stays when it undid rounds before the restart point.
            Err(_) => serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["voided_rounds"][1]
                    .as_u64()
                    .is_some_and(|to| to <= next_round)
            }),
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::atomic_write(path, kept.as_bytes())
}

/// When periodic checkpoints come: every `checkpoint_every` steps, counted in rounds of H
/// steps, or in steps of the schedule when rounds close by time or tokens (their lengths
/// vary).
#[derive(Debug)]
struct Cadence {
    by_step: bool,
    every: u64,
    next: u64,
}

impl Cadence {
    /// A period after `rounds` committed rounds at schedule step `step`.
    fn after(cfg: &RunConfig, rounds: u64, step: u64) -> Cadence {
        let by_step = cfg.sync.on_demand();
        let every = match by_step {
            true => cfg.train.checkpoint_every.max(1),
            false => (cfg.train.checkpoint_every)
                .div_ceil(cfg.sync.steps_per_round())
                .max(1),
        };
        let at = if by_step { step } else { rounds };
        Cadence {
            by_step,
            every,
            next: at + every,
        }
    }

    /// Whether one is due at `rounds` committed and schedule step `step`; when it is, the
    /// next is a period on.
    fn due(&mut self, rounds: u64, step: u64) -> bool {
        let at = if self.by_step { step } else { rounds };
        if at < self.next {
            return false;
        }
        self.next = at + self.every;
        true
    }
}

/// The coordinator's options for a run of `cfg` and `model` that waits for `min_workers`.
fn coordinator_options(cfg: &RunConfig, model: &ModelConfig, min_workers: usize) -> Options {
    let per_round = cfg.sync.steps_per_round();
    let per_step = cfg.train.grad_accum as u64;
    Options {
        failure_timeout: Duration::from_millis(cfg.sync.failure_timeout_ms),
        min_workers,
        batches_per_round: per_round * cfg.train.grad_accum as u64,
        budget_batches: cfg.budget_batches(min_workers),
        schedule_steps: cfg.cluster_steps(),
        vote: cfg.guard.enabled,
        max_corruption_flags: cfg.guard.max_corruption_flags.max(1),
        max_rewinds: cfg.guard.max_rollbacks,
        damp_rounds: DAMP_ROUNDS,
        outlier_ratio: cfg.guard.enabled.then_some(match cfg.sync.mode {
            SyncMode::Diloco => OUTLIER_RATIO,
            SyncMode::Ddp => STEP_OUTLIER_RATIO,
        }),
        audit_probability: if cfg.guard.enabled {
            cfg.guard.audit_probability
        } else {
            0.0
        },
        liveness: Liveness::Heartbeats,
        one_backend: cfg.sync.mode == SyncMode::Ddp,
        round_bound: round_bound(cfg, model),
        batches_per_step: per_step,
    }
}

/// What closes a round of `cfg`: `inner_steps` each, a deadline, or a number of tokens (in
/// whole steps' batches).
fn round_bound(cfg: &RunConfig, model: &ModelConfig) -> RoundBound {
    let s = &cfg.sync;
    if s.round_seconds > 0.0 {
        let round = Duration::from_secs_f64(s.round_seconds);
        let grace = s.round_grace_seconds.map_or(round, Duration::from_secs_f64);
        return RoundBound::Time { round, grace };
    }
    if s.round_tokens > 0 {
        let per_step = cfg.train.grad_accum as u64;
        let steps = s.round_tokens / (cfg.batch_tokens(model) * per_step);
        return RoundBound::Batches {
            batches: steps.max(1) * per_step,
        };
    }
    RoundBound::Fixed
}

/// What a coordinator under `plane` (if any) needs of it for the run `run_id`: the recorder
/// and the workers' lease changes, with their liveness set in `opts`.
fn answer_to(
    plane: Option<&dyn ControlPlane>,
    run_id: u64,
    opts: &mut Options,
) -> (Option<Recorder>, Option<LeaseChanges>) {
    let Some(plane) = plane else {
        return (None, None);
    };
    let (liveness, leases) = plane.follow_members(run_id);
    opts.liveness = liveness;
    (Some(plane.recorder()), Some(leases))
}

/// A run restarting cold from a checkpoint.
struct RestoredRun<'a> {
    cfg: &'a RunConfig,
    listen: &'a str,
    auth: &'a Auth,
    run_id: u64,
}

impl RestoredRun<'_> {
    /// [`RestoredRun::coordinator`], with the run directory's ledger cut back to the
    /// checkpoint (rounds committed after it are trained again) and the restart recorded.
    fn restart(
        &self,
        run_dir: &Path,
        opts: Options,
        r: Restore,
    ) -> Result<(Coordinator, Vec<PeerServer>), TrainError> {
        let own_states = r.cluster.workers.len();
        let (c, servers) = self.coordinator(opts, r)?;
        truncate_ledger(&run_dir.join(LEDGER_FILE), c.committed_rounds())?;
        let restart = serde_json::json!({
            "event": "restarted_cold",
            "next_round": c.committed_rounds(),
            "workers_own_states": own_states,
        });
        record_start(run_dir, restart)?;
        Ok((c, servers))
    }

    /// The coordinator of the checkpoint's position, and the peer servers it names as donors:
    /// one for the shared state, and in DiLoCo one for each worker whose own state the
    /// checkpoint kept (see [`Coordinator::serving_own_states`]).
    fn coordinator(
        &self,
        opts: Options,
        r: Restore,
    ) -> Result<(Coordinator, Vec<PeerServer>), TrainError> {
        let ip = self
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| TrainError::Cluster(format!("--listen {}: {e}", self.listen)))?
            .ip();
        if ip.is_unspecified() {
            return Err(TrainError::Cluster(format!(
                "restarting from a checkpoint needs a specific --listen address (not {ip}) to serve it from"
            )));
        }
        let Restore { state, cluster } = r;
        let specs = state.weights.specs.clone();
        let shared = self.shared_replica(state, &cluster)?;
        let serve = |replica: &Replica, with_local: bool| {
            let peer = PeerServer::start(
                &format!("{ip}:0"),
                self.auth.clone(),
                self.run_id,
                FETCH_TIMEOUT,
            )
            .map_err(|e| TrainError::Cluster(format!("serving the checkpoint on {ip}: {e}")))?;
            peer.publish(Snapshot {
                next_round: replica.next_round,
                bytes: replica.encode(with_local),
            });
            Ok::<_, TrainError>(peer)
        };
        // Restored from the outer weights: local = outer.
        let mut servers = vec![serve(&shared, false)?];
        let mut own_addrs = BTreeMap::new();
        if self.cfg.sync.mode == SyncMode::Diloco {
            let with_local = strategy(self.cfg, &specs).keeps_local_weights();
            for own in &cluster.workers {
                let mut own = own.clone();
                if !with_local {
                    own.local = None;
                }
                let peer = serve(&shared.with_own_state(&own), with_local)?;
                own_addrs.insert(own.name.clone(), peer.addr.clone());
                servers.push(peer);
            }
        }
        let p = cluster.position;
        let c = Coordinator::restore(
            opts,
            self.run_id,
            self.cfg.to_toml(),
            p.next_round,
            p.next_fresh_batch,
            p.pending_batches,
            servers[0].addr.clone(),
        )
        .serving_own_states(own_addrs);
        Ok((c, servers))
    }

    /// The state every replica shares, checked against the hash saved with it. A run resumed
    /// in another mode (a DDP warm-up continued as DiLoCo, say) starts DiLoCo's outer momentum
    /// at zero; DDP carries none.
    fn shared_replica(
        &self,
        state: TrainState,
        cluster: &ClusterExtras,
    ) -> Result<Replica, TrainError> {
        let n = state.weights.specs.iter().map(|s| s.numel()).sum();
        let mut replica = Replica {
            outer: flatten(&state.weights.tensors),
            weights: state.weights,
            opt: state.opt,
            velocity: cluster.outer_velocity.clone(),
            next_round: cluster.position.next_round,
            owner: String::new(),
            feedback: Vec::new(),
        };
        if let Some(saved) = &cluster.position.state_blake3
            && *saved != replica.state_hash()
        {
            return Err(TrainError::Cluster(format!(
                "the checkpoint's replica state hashes to {}, but {saved} was saved with it",
                replica.state_hash()
            )));
        }
        match self.cfg.sync.mode {
            SyncMode::Diloco if replica.velocity.len() == n => {}
            SyncMode::Diloco => replica.velocity = vec![0.0; n],
            SyncMode::Ddp => replica.velocity.clear(),
        }
        Ok(replica)
    }
}

impl ClusterRun {
    /// Starts serving a run whose directory already exists (see `run::create_run_dir`), as
    /// `start` says. `model` is the prepared run's model. Under a control `plane`, every commit
    /// is recorded before any worker hears of it (see [`CoordinatorServer::start_recording`])
    /// and the workers' liveness is the plane's.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        run_dir: &Path,
        cfg: &RunConfig,
        model: &ModelConfig,
        listen: &str,
        secret: &[u8],
        min_workers: usize,
        device: Device,
        start: Start,
        plane: Option<&dyn ControlPlane>,
    ) -> Result<ClusterRun, TrainError> {
        let mut opts = coordinator_options(cfg, model, min_workers);
        let run_id = match &start {
            Start::TakeOver(d) => d.run_id,
            _ => u64::from_le_bytes(random_bytes()),
        };
        let (recorder, leases) = answer_to(plane, run_id, &mut opts);
        let auth = Auth::new(secret).map_err(|e| TrainError::Cluster(e.to_string()))?;
        let (coordinator, restored) = match start {
            Start::Fresh => (Coordinator::new(opts, run_id, cfg.to_toml()), Vec::new()),
            Start::TakeOver(d) => (take_over(run_dir, cfg, opts, d)?, Vec::new()),
            Start::Restore(r) => {
                let restored = RestoredRun {
                    cfg,
                    listen,
                    auth: &auth,
                    run_id,
                };
                restored.restart(run_dir, opts, *r)?
            }
        };
        // A restarted run's first checkpoint comes a period after the one it restarted from,
        // not at once: that state is on disk already, and has no vote to wait for yet.
        let checkpoints = Cadence::after(
            cfg,
            coordinator.committed_rounds(),
            coordinator.schedule_step(),
        );
        let server = CoordinatorServer::start_recording(
            listen,
            auth.clone(),
            run_id,
            coordinator,
            recorder,
            leases,
        )
        .map_err(|e| TrainError::Cluster(format!("listening on {listen}: {e}")))?;
        Ok(ClusterRun {
            server,
            _restored: restored,
            run_dir: run_dir.to_path_buf(),
            cfg: cfg.clone(),
            model: model.clone(),
            auth,
            run_id,
            device,
            started: Instant::now(),
            first_round: None,
            last_commit: None,
            records: Vec::new(),
            undelivered: Vec::new(),
            faults: 0,
            aborted: 0,
            divergences: 0,
            corruptions: 0,
            outliers: 0,
            audits: 0,
            failed_audits: 0,
            suspects: Default::default(),
            slow_workers: Default::default(),
            rewinds: 0,
            skipped_batches: 0,
            checkpoints,
            workers: min_workers,
            fence: None,
        })
    }

    /// Stops the run (an error from [`ClusterRun::poll`]) before it writes anything once
    /// `fence` says this coordinator is no longer in charge: a leader that lost its election
    /// must not add to a ledger its successor writes.
    pub fn fenced_by(mut self, fence: Fence) -> ClusterRun {
        self.fence = Some(fence);
        self
    }

    /// Records what happened since the last call and writes periodic checkpoints.
    pub fn poll(&mut self) -> Result<Progress, TrainError> {
        let fenced = self.fence.as_ref().and_then(|f| f());
        if let Some(why) = self.server.stopped().or(fenced) {
            return Err(TrainError::Cluster(format!(
                "this coordinator stopped: {why}"
            )));
        }
        let (events, progress, unstable, run_complete) = {
            let mut c = self.server.state.lock().expect("coordinator lock");
            let events = c.drain_events();
            let unstable = c.unstable().map(str::to_string);
            let progress = Progress {
                committed_rounds: c.committed_rounds(),
                step: c.schedule_step(),
                live_workers: c.live_members(),
                complete: c.final_state_ready(),
                state_lost: c.state_lost(),
                ..Default::default()
            };
            (events, progress, unstable, c.is_complete())
        };
        let elapsed_s = self.started.elapsed().as_secs_f64();
        self.record_events(&events, elapsed_s)?;
        if let Some(why) = unstable {
            return Err(TrainError::Unstable(why));
        }
        if !run_complete && (self.checkpoints).due(progress.committed_rounds, progress.step) {
            // A failed periodic checkpoint is worth a warning, not the run.
            match self.checkpoint() {
                Ok((path, _)) => tracing::info!("checkpoint {}", path.display()),
                Err(e) => tracing::warn!("periodic checkpoint failed: {e}"),
            }
        }
        let mut events = events;
        events.append(&mut self.undelivered);
        let last = self.records.last();
        Ok(Progress {
            last_loss: last.map(|r| r.loss),
            faults: self.faults,
            events: events.into_iter().map(|e| (elapsed_s, e)).collect(),
            ..progress
        })
    }

    /// Writes `events` to the ledger (committed rounds, skipped batches, voided rounds) and to
    /// the events file, and counts them.
    fn record_events(&mut self, events: &[Event], elapsed_s: f64) -> Result<(), TrainError> {
        for e in events {
            match e {
                Event::Committed(r) => {
                    // When it was recorded, for the report's timeline.
                    let mut line = serde_json::to_value(r).expect("a record serializes");
                    line["elapsed_s"] = elapsed_s.into();
                    append_jsonl(&self.run_dir.join(LEDGER_FILE), &line)?;
                    self.records.push(r.clone());
                    self.last_commit = Some(Instant::now());
                    continue;
                }
                Event::RoundStarted { .. } => {
                    self.first_round.get_or_insert_with(Instant::now);
                    continue;
                }
                Event::Removed { .. } => self.faults += 1,
                Event::Joined { name, .. } => tracing::info!("{name} joined"),
                // Reported as this call's error, once the event is written.
                Event::StateReported { .. } | Event::RunUnstable { .. } => {}
                Event::AttemptAborted { round, reason, .. } => {
                    self.aborted += 1;
                    tracing::info!("round {round}: attempt aborted: {reason}");
                }
                Event::Corruption { name, flags, .. } => {
                    self.corruptions += 1;
                    *self.suspects.entry(name.clone()).or_default() = *flags;
                }
                // Shown by the caller, from `Progress::events`.
                Event::Rewound(_) => self.rewinds += 1,
                Event::BatchesSkipped { round, batches } => {
                    self.skipped_batches += batches.len() as u64;
                    let line = serde_json::json!({"skipped_batches": batches, "round": round});
                    append_jsonl(&self.run_dir.join(LEDGER_FILE), &line)?;
                }
                Event::RoundsVoided { from, to, reason } => {
                    let marker = serde_json::json!({"voided_rounds": [from, to], "reason": reason});
                    append_jsonl(&self.run_dir.join(LEDGER_FILE), &marker)?;
                    self.records.retain(|r| r.round < *from);
                }
                Event::Divergence { .. } => self.divergences += 1,
                Event::SlowWorker { name, ratio, .. } => {
                    tracing::warn!("{name} is {ratio:.1}× slower than its peers: suspect hardware");
                    self.slow_workers.insert(name.clone(), *ratio);
                }
                Event::ContributionOutlier { outlier, .. } => {
                    self.outliers += 1;
                    *self.suspects.entry(outlier.name.clone()).or_default() += 1;
                }
                Event::Audit { of, verdict, .. } => {
                    self.audits += 1;
                    if *verdict == AuditVerdict::Failed {
                        self.failed_audits += 1;
                        *self.suspects.entry(of.clone()).or_default() += 1;
                    }
                }
            }
            append_jsonl(
                &self.run_dir.join(EVENTS_FILE),
                &serde_json::json!({"elapsed_s": elapsed_s, "detail": e}),
            )?;
        }
        Ok(())
    }

    /// Fetches the newest committed state from a healthy worker and saves it as a checkpoint.
    /// With the vote on, only a state a majority of replicas agreed on is saved, and the bytes
    /// fetched are checked against that hash.
    fn checkpoint(&mut self) -> Result<(PathBuf, TrainState), TrainError> {
        let started = Instant::now();
        // The vote waits for a silent replica until it is removed; the fetch comes after.
        let patience = Duration::from_millis(self.cfg.sync.failure_timeout_ms) + FETCH_TIMEOUT;
        // A worker learns of a commit a moment after the coordinator records it, and
        // publishes the new state only once it has applied it: ask for exactly the newest
        // committed round, and ask again (the round and its peers may move on meanwhile)
        // until someone has it.
        let ((next_round, next_fresh_batch, pending_batches), (mut replica, workers), step) = loop {
            let (source, step) = {
                let c = self.server.state.lock().expect("coordinator lock");
                (c.checkpoint_source(), c.schedule_step())
            };
            let fetched = match &source {
                Some(source) => self.fetch_agreed(source),
                None => Err(TrainError::Cluster(
                    "the newest committed state has not been voted on".into(),
                )),
            };
            match fetched {
                Ok(replica) => break (source.expect("fetched").position, replica, step),
                Err(e) if started.elapsed() > patience => {
                    return Err(TrainError::Cluster(format!("checkpoint: {e}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The rounds the state holds may have committed since the last poll: their ledger
        // lines go first, so that no checkpoint holds a round the ledger lacks (a cold restart
        // keeps the ledger up to the checkpoint and would otherwise lose those rounds' batches).
        let since_poll = self
            .server
            .state
            .lock()
            .expect("coordinator lock")
            .drain_events();
        self.record_events(&since_poll, self.started.elapsed().as_secs_f64())?;
        self.undelivered.extend(since_poll);
        let extras = ClusterExtras {
            position: ClusterPosition {
                next_round,
                next_fresh_batch,
                pending_batches,
                state_blake3: Some(replica.state_hash()),
            },
            outer_velocity: replica.velocity.clone(),
            workers,
        };
        // The model is the weights the replicas agree on: in streaming DiLoCo one replica's
        // local weights also hold its own progress since each fragment's last sync.
        replica.reset_local_to_outer();
        // Named by the schedule step its committed batches reached, not by rounds: a fault
        // costs rounds, not data.
        let state = replica.into_train_state(
            self.cfg.train.seed,
            step,
            next_fresh_batch * self.cfg.train.batch_size as u64,
        );
        let path = checkpoint::save_with(
            &self.run_dir,
            &state,
            &self.cfg,
            self.cfg.train.keep_checkpoints,
            Some(&extras),
        )?;
        Ok((path, state))
    }

    /// The state `source` names, from the first of its peers that serves it with the agreed
    /// hash; a peer that serves another is passed over (and named in the error). In DiLoCo,
    /// also every agreeing holder's own state (its inner optimizer, say), which differs from
    /// worker to worker: a holder that cannot serve it restarts cold from the shared state.
    fn fetch_agreed(
        &self,
        source: &CheckpointSource,
    ) -> Result<(Replica, Vec<OwnState>), TrainError> {
        let fetched = if self.cfg.sync.mode == SyncMode::Diloco {
            // All at once: a holder that hangs costs one fetch timeout, not one per holder.
            std::thread::scope(|s| {
                let fetches: Vec<_> = (source.peers.iter())
                    .map(|holder| s.spawn(move || self.fetch_checked(source, &holder.addr)))
                    .collect();
                (fetches.into_iter())
                    .map(|f| f.join().expect("a fetch does not panic"))
                    .collect()
            })
        } else {
            // Every replica holds the same: the first that serves it will do.
            let mut fetched = Vec::new();
            for holder in &source.peers {
                fetched.push(self.fetch_checked(source, &holder.addr));
                if fetched.last().is_some_and(Result::is_ok) {
                    break;
                }
            }
            fetched
        };
        let mut shared: Option<Replica> = None;
        let mut own = Vec::new();
        let mut last = TrainError::Cluster("no live replica holds it".into());
        for (holder, result) in source.peers.iter().zip(fetched) {
            match result {
                Ok(r) => {
                    if r.owner == holder.name {
                        own.push(r.own_state());
                    }
                    shared.get_or_insert(r);
                }
                Err(e) => {
                    tracing::warn!("checkpoint: {e}");
                    last = e;
                }
            }
        }
        shared.map(|r| (r, own)).ok_or(last)
    }

    /// The replica `addr` serves for the state `source` names, if it has the agreed hash.
    fn fetch_checked(&self, source: &CheckpointSource, addr: &str) -> Result<Replica, TrainError> {
        let round = source.position.0;
        let r = self.fetch_from(addr, round)?;
        match &source.agreed {
            Some(agreed) if r.state_hash() != *agreed => Err(TrainError::Cluster(format!(
                "{addr} served a state of round {round} with hash {}, not the agreed {agreed}",
                r.state_hash()
            ))),
            _ => Ok(r),
        }
    }

    /// The replica that `addr` serves for the start of `round`.
    fn fetch_from(&self, addr: &str, round: u64) -> Result<Replica, TrainError> {
        let (peer, snap) = fetch_state_from(
            std::slice::from_ref(&addr.to_string()),
            &self.auth,
            self.run_id,
            round,
            Replica::encoded_bound(&self.model),
            FETCH_TIMEOUT,
            Duration::ZERO,
        )
        .map_err(|e| TrainError::Cluster(e.to_string()))?;
        Replica::decode(&snap.bytes, &self.model, &self.device, &peer)
    }

    /// Once the run is complete: final checkpoint from a healthy worker, evaluation, summary;
    /// then the workers are released.
    pub fn finish(&mut self, data: &Prepared) -> Result<ClusterSummary, TrainError> {
        let (path, state) = self.checkpoint()?;
        self.server
            .state
            .lock()
            .expect("coordinator lock")
            .release();
        let eval = evaluate(
            &state.weights,
            &data.dataset,
            &self.cfg,
            FINAL_EXACT_MATCH_PROBLEMS,
        );
        let wall_s = self.first_round.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let training_s = match (self.first_round, self.last_commit) {
            (Some(first), Some(last)) => last.saturating_duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        let committed_tokens: u64 = self.records.iter().map(|r| r.tokens).sum();
        let bytes_sent: u64 = self.records.iter().map(|r| r.bytes_sent).sum();
        let mut clean: Vec<f64> = self
            .records
            .iter()
            .filter(|r| r.attempts <= 1 && r.discarded_batches == 0)
            .map(|r| r.sync_s)
            .collect();
        clean.sort_by(f64::total_cmp);
        let summary = ClusterSummary {
            workers: self.workers,
            sync: self.cfg.sync.mode.to_string(),
            steps_per_round: (!self.cfg.sync.on_demand()).then(|| self.cfg.sync.steps_per_round()),
            rounds: self.records.len() as u64,
            committed_batches: self
                .records
                .iter()
                .flat_map(|r| &r.members)
                .map(|m| m.batches.len() as u64)
                .sum(),
            wall_s,
            training_s,
            committed_tokens,
            goodput_tokens_per_s: committed_tokens as f64 / wall_s.max(1e-9),
            discarded_batches: self.records.iter().map(|r| r.discarded_batches).sum(),
            faults: self.faults,
            aborted_attempts: self.aborted,
            divergences: self.divergences,
            corruptions: self.corruptions,
            outliers: self.outliers,
            audits: self.audits,
            failed_audits: self.failed_audits,
            suspects: self.suspects.clone(),
            slow_workers: self.slow_workers.clone(),
            guard_skips: self.records.iter().map(|r| r.guard_skips).sum(),
            guard_rollbacks: self.records.iter().map(|r| r.guard_rollbacks).sum(),
            rewinds: self.rewinds,
            skipped_batches: self.skipped_batches,
            bytes_sent,
            bytes_sent_per_token: bytes_sent as f64 / committed_tokens.max(1) as f64,
            compute_utilisation: self.records.iter().map(|r| r.compute_s).sum::<f64>()
                / training_s.max(1e-9),
            median_sync_s: clean.get(clean.len() / 2).copied().unwrap_or(0.0),
            max_fault_sync_s: self
                .records
                .iter()
                .filter(|r| r.attempts > 1 || r.discarded_batches > 0)
                .map(|r| r.sync_s)
                .fold(0.0, f64::max),
            final_loss: self.records.last().map_or(f64::NAN, |r| r.loss),
            eval,
            checkpoint: path,
        };
        crate::atomic_write(
            &self.run_dir.join(SUMMARY_FILE),
            serde_json::to_string_pretty(&summary)
                .expect("json")
                .as_bytes(),
        )?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_come_every_h_rounds_or_by_steps_when_rounds_vary() {
        let mut cfg = RunConfig::default();
        cfg.train.checkpoint_every = 100;
        cfg.sync.inner_steps = 50;
        let mut by_round = Cadence::after(&cfg, 0, 0);
        assert!(!by_round.due(1, 500), "rounds count, not steps");
        assert!(by_round.due(2, 0) && !by_round.due(3, 0) && by_round.due(4, 0));
        cfg.sync.round_seconds = 2.0;
        let mut by_step = Cadence::after(&cfg, 0, 0);
        assert!(!by_step.due(9, 99), "steps count, not rounds");
        assert!(by_step.due(1, 130));
        assert!(
            !by_step.due(2, 229) && by_step.due(3, 230),
            "a period after the last"
        );
    }
}
