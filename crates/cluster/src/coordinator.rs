//! The coordinator's decisions, as a pure state machine: every input is a request from a
//! worker or the passage of time (`now` is an argument), every output a reply and a list of
//! events. No sockets, no clocks, no tensors: the server around it (see `server.rs`) only does
//! I/O, and most of this file is tests.
//!
//! A *round* is one sync of the replicas (one DiLoCo outer step, or one DDP step). Its quorum
//! is fixed when it starts: every live member. A worker that joins later waits for the next
//! round. Each member of the round gets its batch ids; it trains on them, says `Ready`, and
//! when every member of the round is ready an *attempt* begins: the ring is the round's
//! members in rank order. When every ring member reports `Reduced`, the round commits; only
//! then does anyone apply the result. A member that falls silent for the failure timeout is
//! removed: its batches go back to the pool (trained later by someone else, so committed
//! weights see each batch exactly once), a running attempt is aborted, and the survivors retry
//! on a ring without it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fingerprint::{self, Fingerprint, Outlier};
use crate::pace::RoundBound;

pub type WorkerId = u64;

/// A member is slow in a round when its seconds per batch are this many times its peers'
/// median; slow in [`SLOW_ROUNDS`] of its last [`SLOW_WINDOW`] rounds, it is reported.
pub const SLOW_RATIO: f64 = 2.0;
pub const SLOW_ROUNDS: usize = 5;
pub const SLOW_WINDOW: usize = 8;

/// Undos to one round in a row, for want of a majority among the replicas' states, after
/// which a run stops (see `Coordinator::count_no_majority`).
pub const NO_MAJORITY_LIMIT: u32 = 3;

#[derive(Clone, Debug)]
pub struct Options {
    /// A member silent for longer than this is out of the quorum.
    pub failure_timeout: Duration,
    /// Workers that must have joined before round 0 starts.
    pub min_workers: usize,
    /// Batch ids each member trains on per round ([`RoundBound::Fixed`]).
    pub batches_per_round: u64,
    /// What closes a round: with a bound other than [`RoundBound::Fixed`], members ask for
    /// `batches_per_step` ids at a time as they train.
    pub round_bound: RoundBound,
    pub batches_per_step: u64,
    /// The run's budget: batch ids `0..budget_batches`, each committed exactly once. It is
    /// counted in batches, not rounds: a round a fault shrank (a member removed, its batches
    /// handed back) commits fewer, and the run goes on until all are in.
    pub budget_batches: u64,
    /// The learning-rate schedule's length in steps that budget spans: a round's first step
    /// is `committed batches × schedule_steps / budget_batches`, so the schedule follows the
    /// data trained, not the rounds run.
    pub schedule_steps: u64,
    /// Compare the replicas' state hashes after every round before starting the next: a
    /// minority is quarantined (re-fetches the majority's state); without a majority, the
    /// rounds since the last agreed state are undone.
    pub vote: bool,
    /// A worker caught this many times is removed as suspect hardware.
    pub max_corruption_flags: u32,
    /// A round in which every member's guard rolled its replica back (no replica could make
    /// progress) rewinds the run to before the outer step that led there and damps the next
    /// `damp_rounds` rounds' steps; the run is declared unstable when such a round comes
    /// again after this many rewinds with no clean damped stretch between them.
    pub max_rewinds: u32,
    pub damp_rounds: u64,
    /// Judge each round's contributions by their fingerprints before committing it (see
    /// [`crate::fingerprint`]): an outlier's attempt is voided, the worker removed (it rejoins
    /// by live recovery) and the round redone without its contribution. None: not judged.
    pub outlier_ratio: Option<f64>,
    /// The chance that a round (of at least three members) is audited: two members replay a
    /// third's contribution from the state it started from, and a replay both auditors agree
    /// on that differs from what it sent voids the attempt and removes it. 0: never.
    pub audit_probability: f64,
    /// How a member shows it is alive.
    pub liveness: Liveness,
    /// Every member must run on one backend (see [`Request::Join`]): under DDP each replica
    /// applies its optimizer on its own device, and two backends round differently, so their
    /// replicas would part. A worker on another backend than the run's is refused at join.
    pub one_backend: bool,
}

/// How the coordinator tells a live member from a dead one; told to each worker at welcome.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Liveness {
    /// The worker heartbeats to the coordinator; one silent for the failure timeout is out.
    #[default]
    Heartbeats,
    /// The worker keeps an etcd lease of the failure timeout alive on the key `prefix` +
    /// its id, and the coordinator watches the prefix ([`Coordinator::lease_changed`]): a key
    /// that goes (the lease expired or was revoked) is a member out, and a member with no
    /// key a failure timeout after joining is out too. Silence alone is not.
    Lease { prefix: String },
}

/// A worker's etcd lease key appeared or went, as the coordinator's watch saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberLease {
    pub worker: WorkerId,
    pub alive: bool,
}

/// A replay audit: recompute `of`'s contribution this round from the state it started from
/// (served by its peer endpoint `donor`) and its `batches`, and report its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditTask {
    pub of: String,
    pub donor: String,
    pub batches: Vec<u64>,
}

/// An auditor's replay of another member's contribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub of: String,
    pub blake3: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerRoundStats {
    pub tokens: u64,
    pub loss: f64,
    pub compute_s: f64,
    pub comm_s: f64,
    pub wait_s: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Stability guards: steps not applied, and rollbacks to the round's start.
    #[serde(default)]
    pub skipped_steps: u64,
    #[serde(default)]
    pub rollbacks: u64,
    /// Of the contribution sent to the all-reduce (absent from older workers).
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    /// BLAKE3 of the contribution sent (see [`fingerprint::payload_hash`]).
    #[serde(default)]
    pub payload_blake3: Option<String>,
    /// This member's replay of another's contribution, when it was told to audit one.
    #[serde(default)]
    pub audit: Option<AuditReport>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditVerdict {
    Passed,
    Failed,
    Inconclusive,
}

/// See [`Coordinator::checkpoint_source`].
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointSource {
    /// The committed position the state starts (see [`Coordinator::committed_position`]).
    pub position: (u64, u64, Vec<u64>),
    /// The hash the state must have (none with the vote off).
    pub agreed: Option<String>,
    /// Members holding it, best first.
    pub peers: Vec<StateHolder>,
}

/// A member that holds a state, and the peer address it serves it on.
#[derive(Clone, Debug, PartialEq)]
pub struct StateHolder {
    pub name: String,
    pub addr: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    /// The round this state starts.
    pub next_round: u64,
    pub blake3: String,
}

/// The state a worker holds when it joins: a coordinator that took over from another (or the
/// same one, after the worker lost it for a moment) can count it as a holder of the committed
/// state instead of having every worker fetch one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldState {
    /// The run it belongs to: a state of another run is never taken for this one's.
    pub run_id: u64,
    pub next_round: u64,
    pub blake3: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Join {
        name: String,
        data_addr: String,
        #[serde(default)]
        held: Option<HeldState>,
        /// The backend this worker computes on (see [`Options::one_backend`]) and its compute
        /// threads: a replay of its steps gives its bits only on the same two, so audits pair
        /// only workers of one such class. Older workers send neither and are one class.
        #[serde(default)]
        backend: String,
        #[serde(default)]
        threads: usize,
    },
    Heartbeat {
        worker: WorkerId,
    },
    NextRound {
        worker: WorkerId,
        state: Option<StateReport>,
    },
    /// The next step's batch ids of an on-demand round (see [`RoundBound`]).
    Batches {
        worker: WorkerId,
        round: u64,
    },
    Ready {
        worker: WorkerId,
        round: u64,
    },
    Reduced {
        worker: WorkerId,
        round: u64,
        attempt: u32,
        stats: WorkerRoundStats,
    },
    Failed {
        worker: WorkerId,
        round: u64,
        attempt: u32,
        error: String,
    },
    Leave {
        worker: WorkerId,
    },
}

impl Request {
    /// What a worker asks again while this request is answered [`Reply::Wait`]: the same
    /// question (a state report goes once), or `None` for a request that is never waited on.
    pub fn asked_again(&self) -> Option<Request> {
        match self {
            Request::NextRound { worker, .. } => Some(Request::NextRound {
                worker: *worker,
                state: None,
            }),
            Request::Ready { .. } | Request::Reduced { .. } => Some(self.clone()),
            Request::Join { .. }
            | Request::Heartbeat { .. }
            | Request::Batches { .. }
            | Request::Failed { .. }
            | Request::Leave { .. } => None,
        }
    }

    /// The worker a request comes from (none for a join, which asks for an id).
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            Request::Join { .. } => None,
            Request::Heartbeat { worker }
            | Request::NextRound { worker, .. }
            | Request::Batches { worker, .. }
            | Request::Ready { worker, .. }
            | Request::Reduced { worker, .. }
            | Request::Failed { worker, .. }
            | Request::Leave { worker } => Some(*worker),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Welcome {
        worker: WorkerId,
        run_id: u64,
        /// The job description every worker runs (the run's config), opaque here.
        job: String,
        /// Silence after which this coordinator puts a member out: the worker heartbeats
        /// well within it, and gives up on a silent ring neighbour after it.
        failure_timeout_ms: u64,
        /// How this worker shows it is alive; absent from older coordinators: heartbeats.
        #[serde(default)]
        liveness: Liveness,
    },
    Ok,
    Wait {
        reason: String,
    },
    Round {
        round: u64,
        rank: usize,
        quorum: usize,
        batches: Vec<u64>,
        /// Where to fetch the state that starts this round, when this worker lacks it.
        /// `None` in round 0: everyone starts from the seeded initial state.
        donor: Option<String>,
        /// The learning-rate schedule's step this round starts at (see
        /// [`Options::schedule_steps`]).
        #[serde(default)]
        first_step: u64,
        /// Below 1 after a rewind (see [`Options::max_rewinds`]): the factor on this round's
        /// step (DiLoCo's outer learning rate, taken without momentum; DDP's learning rate).
        #[serde(default = "full_step")]
        step_scale: f64,
        /// A contribution of another member this one replays, besides its own.
        #[serde(default)]
        audit: Option<AuditTask>,
        /// This member's own contribution is audited: it reports its hash (only then, to keep
        /// a pass over the contribution off the other rounds).
        #[serde(default)]
        audited: bool,
        /// The round takes the rest of the budget: no later round follows unless one of its
        /// members fails (a worker then has no later report to carry late figures in).
        #[serde(default)]
        last: bool,
        /// `batches` is the first step's: ask for more ([`Request::Batches`]) until none come.
        #[serde(default)]
        on_demand: bool,
    },
    /// The next step's batch ids of an on-demand round; none: the round is closed to this
    /// member, which says it is ready.
    Batches {
        round: u64,
        batches: Vec<u64>,
    },
    Ring {
        round: u64,
        attempt: u32,
        rank: usize,
        members: Vec<String>,
    },
    Commit {
        round: u64,
    },
    Retry {
        round: u64,
        reason: String,
    },
    Evicted {
        reason: String,
    },
    Finished,
}

fn full_step() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerMember {
    pub name: String,
    pub batches: Vec<u64>,
    /// Its seconds of training in the round: a slow worker shows here.
    #[serde(default)]
    pub compute_s: f64,
}

/// What a replay of a worker's steps must run on to give its bits (see [`Request::Join`]);
/// empty for an older worker, which says nothing.
fn replay_class(backend: &str, threads: usize) -> String {
    if backend.is_empty() {
        String::new()
    } else {
        format!("{backend}, {threads} threads")
    }
}

/// Each member's seconds per batch in a round (members that trained no batch, or took no
/// time, are left out).
fn seconds_per_batch(members: &[LedgerMember]) -> Vec<(String, f64)> {
    members
        .iter()
        .filter(|m| !m.batches.is_empty() && m.compute_s > 0.0)
        .map(|m| (m.name.clone(), m.compute_s / m.batches.len() as f64))
        .collect()
}

/// Each member's seconds per batch over the median of its peers' (`per_batch`, from
/// [`seconds_per_batch`]; a member with no peer is left out).
fn speed_ratios(per_batch: &[(String, f64)]) -> Vec<(String, f64)> {
    per_batch
        .iter()
        .filter_map(|(name, own)| {
            let mut peers: Vec<f64> = per_batch
                .iter()
                .filter(|(n, _)| n != name)
                .map(|p| p.1)
                .collect();
            peers.sort_by(f64::total_cmp);
            let median = *peers.get(peers.len() / 2)?;
            Some((name.clone(), own / median))
        })
        .collect()
}

impl RoundRecord {
    /// The batch ids the round trained, member by member.
    pub fn batches(&self) -> impl Iterator<Item = u64> + '_ {
        self.members.iter().flat_map(|m| m.batches.iter().copied())
    }
}

/// A committed round: what went into the weights, and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub attempts: u32,
    pub quorum: usize,
    pub members: Vec<LedgerMember>,
    pub tokens: u64,
    pub discarded_batches: u64,
    pub loss: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Means over the ring members.
    pub compute_s: f64,
    pub comm_s: f64,
    pub wait_s: f64,
    /// From the round's start to its commit.
    pub wall_s: f64,
    /// From the first member's `Ready` to the commit: time the sync held training up.
    pub sync_s: f64,
    /// Stability guards on the members: steps not applied, rollbacks to the round's start.
    #[serde(default)]
    pub guard_skips: u64,
    #[serde(default)]
    pub guard_rollbacks: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Joined {
        name: String,
        worker: WorkerId,
        /// See [`replay_class`].
        #[serde(skip_serializing_if = "String::is_empty")]
        replay_class: String,
    },
    Removed {
        name: String,
        worker: WorkerId,
        reason: String,
    },
    RoundStarted {
        round: u64,
        members: Vec<String>,
    },
    AttemptAborted {
        round: u64,
        attempt: u32,
        reason: String,
    },
    Committed(RoundRecord),
    /// A round's replay audit (see [`Options::audit_probability`]).
    Audit {
        round: u64,
        of: String,
        verdict: AuditVerdict,
        /// The audited member's hash of what it sent, and its auditors' replays.
        sent: Option<String>,
        replays: Vec<String>,
    },
    /// A contribution whose fingerprint stood out (see [`crate::fingerprint`]): its attempt
    /// was voided and its worker removed.
    ContributionOutlier {
        round: u64,
        #[serde(flatten)]
        outlier: Outlier,
    },
    /// A replica's state hash after a commit (equal across replicas that are in sync).
    StateReported {
        next_round: u64,
        name: String,
        blake3: String,
    },
    /// A replica's state disagreed with the majority: it re-fetches the majority's state.
    Corruption {
        next_round: u64,
        name: String,
        blake3: String,
        majority: String,
        flags: u32,
    },
    /// No majority among the replicas' states: rounds `from..to` are undone, their batches
    /// returned to the pool, and every replica reloads the state that starts `from`.
    RoundsVoided {
        from: u64,
        to: u64,
        reason: String,
    },
    /// Every replica rolled back in a round: the run went back (a `RoundsVoided` follows
    /// when that undid rounds) and the next rounds' steps are damped.
    Rewound(Rewind),
    /// The batches of `round`, in which every replica rolled back, left out when a rewind
    /// undid it: suspect data is not trained again (as a single worker's guard skips the data
    /// since its snapshot). They count as spent in the budget and the schedule.
    BatchesSkipped {
        round: u64,
        batches: Vec<u64>,
    },
    /// Every replica rolled back again after `max_rewinds` rewinds (the rounds, with their
    /// mean losses, each rewind tried included): the run stops instead of looping.
    RunUnstable {
        rounds: Vec<u64>,
        losses: Vec<f64>,
        reason: String,
    },
    /// A member far slower than its peers in most of its recent rounds (see [`SLOW_RATIO`]):
    /// suspect hardware, as a corrupting one is. Reported once per member; `ratio` is its
    /// median seconds per batch over its peers' in the slow rounds of the window.
    SlowWorker {
        name: String,
        ratio: f64,
        rounds: Vec<u64>,
    },
    /// Replicas reported different states for the same round: they are not in sync.
    Divergence {
        next_round: u64,
        hashes: BTreeMap<String, String>,
    },
}

#[derive(Clone, Debug)]
struct Member {
    name: String,
    data_addr: String,
    /// See [`Request::Join`].
    replay_class: String,
    joined: Instant,
    last_seen: Instant,
    /// Its etcd lease key was seen ([`Liveness::Lease`]).
    leased: bool,
    /// The round the state this member holds starts (set when it commits a round).
    state_round: Option<u64>,
    /// The oldest state this member can serve: the one it started its latest unbroken run of
    /// committed rounds from (a worker serves the state it fetched or built from the seed,
    /// and the newest few it committed since).
    serves_from: Option<u64>,
}

#[derive(Clone, Debug)]
enum Phase {
    Gathering {
        ready: BTreeSet<WorkerId>,
    },
    Reducing {
        ring: Vec<WorkerId>,
        reduced: BTreeMap<WorkerId, WorkerRoundStats>,
    },
}

#[derive(Clone, Debug)]
struct ActiveRound {
    round: u64,
    /// Rank order.
    members: Vec<WorkerId>,
    batches: BTreeMap<WorkerId, Vec<u64>>,
    attempt: u32,
    phase: Phase,
    started: Instant,
    first_ready: Option<Instant>,
    discarded: u64,
    first_step: u64,
    /// The member audited this round and its two auditors.
    audit: Option<(WorkerId, [WorkerId; 2])>,
    /// No batch was left in the pool for a later round.
    last: bool,
    /// On-demand rounds: the members that may still ask for batches, and when each last did.
    pulling: BTreeSet<WorkerId>,
    last_pull: BTreeMap<WorkerId, Instant>,
    /// Members that have said they are ready in some attempt: their contribution is done.
    contributed: BTreeSet<WorkerId>,
}

/// Batch ids not yet committed: fresh ones, and ones handed back by a member that failed.
#[derive(Clone, Debug, Default)]
struct BatchPool {
    next_fresh: u64,
    returned: BTreeSet<u64>,
}

impl BatchPool {
    /// Up to `k` ids: handed-back ones first, then fresh ones below `budget`.
    fn take(&mut self, k: u64, budget: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while (out.len() as u64) < k {
            match self.returned.pop_first() {
                Some(b) => out.push(b),
                None if self.next_fresh < budget => {
                    out.push(self.next_fresh);
                    self.next_fresh += 1;
                }
                None => break,
            }
        }
        out
    }

    /// Ids committed, when none is handed out (between rounds).
    fn committed(&self) -> u64 {
        self.next_fresh - self.returned.len() as u64
    }

    /// Batches still to hand out.
    fn left(&self, budget: u64) -> u64 {
        self.returned.len() as u64 + budget.saturating_sub(self.next_fresh)
    }

    fn exhausted(&self, budget: u64) -> bool {
        self.left(budget) == 0
    }
}

/// One answer to a round in which every replica rolled back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rewind {
    /// The round every replica rolled back in, and its mean loss.
    pub round: u64,
    pub loss: f64,
    /// The state gone back to: the one that starts this round.
    pub from: u64,
    /// The factor on the steps of the rounds before `damped_until`.
    pub step_scale: f64,
    pub damped_until: u64,
}

/// What a standby coordinator needs to continue a run from its last commit, recorded with
/// every commit (see [`Coordinator::durable`]); the rest it learns again from the workers that
/// rejoin it with the states they hold. Contribution fingerprints are not in it: a takeover
/// judges outliers from a fresh history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Durable {
    pub run_id: u64,
    /// Where the run stands after its last commit (see [`Coordinator::committed_position`]).
    pub next_round: u64,
    pub next_fresh_batch: u64,
    pub pending_batches: Vec<u64>,
    /// The newest committed rounds still standing (a few): for the ledger lines a leader that
    /// died may not have written yet, and for undoing those rounds.
    pub recent: Vec<RoundRecord>,
    pub last_agreed: Option<u64>,
    /// State hashes a majority agreed on, by the round they start.
    pub agreed: BTreeMap<u64, String>,
    /// Each worker's corruption flags, by name (absent from older records: none).
    #[serde(default)]
    pub corruption_flags: BTreeMap<String, u32>,
    /// The rewinds of the unstable episode under way: the damping of the rounds after the last.
    #[serde(default)]
    pub rewinds: Vec<Rewind>,
}

/// Committed rounds kept for undoing them (and in [`Durable::recent`]).
const RECENT_ROUNDS: usize = 8;

pub struct Coordinator {
    opts: Options,
    run_id: u64,
    job: String,
    members: BTreeMap<WorkerId, Member>,
    /// The run's backend under [`Options::one_backend`]: the first worker's.
    backend: Option<String>,
    next_id: WorkerId,
    /// The next round to commit.
    round: u64,
    active: Option<ActiveRound>,
    pool: BatchPool,
    last_commit: Option<(u64, BTreeSet<WorkerId>)>,
    released: bool,
    state_hashes: BTreeMap<u64, BTreeMap<String, String>>,
    events: Vec<Event>,
    /// The batch pool as it stood right after the last commit (or the start).
    pool_at_commit: BatchPool,
    /// A cold restart: a peer address serving the checkpointed state of this round, for
    /// as long as no member holds it.
    restored: Option<(u64, String)>,
    /// With `restored`: addresses serving a worker's own checkpointed state of that round (its
    /// inner optimizer state, say), by worker name.
    restored_own: BTreeMap<String, String>,
    /// After an undo: the round gone back to, and the members that serve its state, in the
    /// order they are asked (any live one will do).
    undo_donors: Option<(u64, Vec<WorkerId>)>,
    /// The newest round whose starting state every replica agreed on.
    last_agreed: Option<u64>,
    /// The round whose starting state has been voted on.
    voted: Option<u64>,
    /// The state hash a majority of replicas agreed on, by the round it starts (the newest
    /// few).
    agreed: BTreeMap<u64, String>,
    /// The records of recently committed rounds that still stand, by round: their batches go
    /// back to the pool when they are undone.
    recent_records: BTreeMap<u64, RoundRecord>,
    /// Counts the changes to [`Coordinator::durable`]: commits and undos.
    durable_version: u64,
    /// After a takeover: until when the first round waits for the minimum of workers to
    /// rejoin (the first holder to come back would otherwise start it alone).
    gathering_until: Option<Instant>,
    /// After a takeover, before its first commit: members that rejoined holding the state one
    /// round before the recorded one (the last leader recorded a commit, then died before any
    /// worker heard of it).
    one_behind: BTreeSet<WorkerId>,
    corruption_flags: BTreeMap<String, u32>,
    /// Each member's recent contribution fingerprints, by name.
    fingerprints: BTreeMap<String, VecDeque<Fingerprint>>,
    /// The rewinds of the current unstable episode.
    rewinds: Vec<Rewind>,
    /// Why the run was declared unstable, once it has been.
    unstable: Option<String>,
    /// The round the last votes without a majority undid to, and how many times in a row.
    no_majority: Option<(u64, u32)>,
    /// Per member, its last [`SLOW_WINDOW`] rounds: the round and, when it was slow in it,
    /// its ratio; and the members reported slow already.
    speed: BTreeMap<String, VecDeque<(u64, Option<f64>)>>,
    reported_slow: BTreeSet<String>,
    /// Each member's seconds per batch in the last round it committed: the share of an
    /// audited member in an on-demand round, and its first step's estimate.
    batch_seconds: BTreeMap<String, f64>,
}

impl Coordinator {
    pub fn new(opts: Options, run_id: u64, job: String) -> Coordinator {
        Coordinator {
            opts,
            run_id,
            job,
            members: BTreeMap::new(),
            backend: None,
            next_id: 1,
            round: 0,
            active: None,
            pool: BatchPool::default(),
            last_commit: None,
            released: false,
            state_hashes: BTreeMap::new(),
            events: Vec::new(),
            pool_at_commit: BatchPool::default(),
            restored: None,
            restored_own: BTreeMap::new(),
            undo_donors: None,
            last_agreed: Some(0),
            voted: None,
            agreed: BTreeMap::new(),
            recent_records: BTreeMap::new(),
            durable_version: 0,
            gathering_until: None,
            one_behind: BTreeSet::new(),
            corruption_flags: BTreeMap::new(),
            fingerprints: BTreeMap::new(),
            rewinds: Vec::new(),
            unstable: None,
            no_majority: None,
            speed: BTreeMap::new(),
            reported_slow: BTreeSet::new(),
            batch_seconds: BTreeMap::new(),
        }
    }

    /// Workers caught with a state that disagreed with the majority, and how often.
    pub fn corruption_flags(&self) -> &BTreeMap<String, u32> {
        &self.corruption_flags
    }

    /// A coordinator restarting a run cold from a checkpoint of the state that starts
    /// `next_round`, served by `state_addr`, with the checkpoint's batch pool.
    pub fn restore(
        opts: Options,
        run_id: u64,
        job: String,
        next_round: u64,
        next_fresh_batch: u64,
        pending_batches: Vec<u64>,
        state_addr: String,
    ) -> Coordinator {
        let mut c = Coordinator::new(opts, run_id, job);
        c.round = next_round;
        c.pool = BatchPool {
            next_fresh: next_fresh_batch,
            returned: pending_batches.into_iter().collect(),
        };
        c.pool_at_commit = c.pool.clone();
        c.restored = Some((next_round, state_addr));
        c.last_agreed = Some(next_round);
        c.voted = Some(next_round);
        c
    }

    /// A restored coordinator whose checkpoint also kept workers' own states: `addrs` serve
    /// them by worker name. A worker of that name that needs the restored round's state gets
    /// its own, so that a run restarted cold continues each worker where it stood; any other
    /// gets the shared one.
    pub fn serving_own_states(mut self, addrs: BTreeMap<String, String>) -> Coordinator {
        self.restored_own = addrs;
        self
    }

    /// A standby that takes over a run at its last commit, as `d` recorded it: it waits (up to
    /// one failure timeout after `now`) for the minimum of workers to rejoin, counts those that
    /// hold the committed state as its holders (see [`HeldState`]), and with the vote on has
    /// them vote on it before the next round.
    pub fn take_over(opts: Options, job: String, d: Durable, now: Instant) -> Coordinator {
        let mut c = Coordinator::new(opts, d.run_id, job);
        c.round = d.next_round;
        c.pool = BatchPool {
            next_fresh: d.next_fresh_batch,
            returned: d.pending_batches.into_iter().collect(),
        };
        c.pool_at_commit = c.pool.clone();
        c.recent_records = d.recent.into_iter().map(|r| (r.round, r)).collect();
        if d.next_round > 0 {
            // Not a fresh start: the committed state comes from the workers that hold it.
            c.last_commit = Some((d.next_round - 1, BTreeSet::new()));
        }
        c.last_agreed = d.last_agreed;
        c.agreed = d.agreed;
        c.corruption_flags = d.corruption_flags;
        c.rewinds = d.rewinds;
        c.gathering_until = Some(now + c.opts.failure_timeout);
        c
    }

    /// What a standby needs to continue from the last commit (see [`Durable`]).
    pub fn durable(&self) -> Durable {
        let (next_round, next_fresh_batch, pending_batches) = self.committed_position();
        Durable {
            run_id: self.run_id,
            next_round,
            next_fresh_batch,
            pending_batches,
            recent: self.recent_records.values().cloned().collect(),
            last_agreed: self.last_agreed,
            agreed: self.agreed.clone(),
            corruption_flags: self.corruption_flags.clone(),
            rewinds: self.rewinds.clone(),
        }
    }

    /// Adds a corruption flag to `name`'s count and returns it; a standby carries it on.
    fn flag(&mut self, name: &str) -> u32 {
        self.durable_version += 1;
        let flags = self.corruption_flags.entry(name.to_string()).or_default();
        *flags += 1;
        *flags
    }

    /// Changes with every change to [`Coordinator::durable`]: a caller that records it before
    /// answering a request records every commit before any worker hears of it.
    pub fn durable_version(&self) -> u64 {
        self.durable_version
    }

    /// The address serving `worker`'s own checkpointed state of `round`, if there is one.
    fn restored_own_state(&self, round: u64, worker: WorkerId) -> Option<String> {
        self.restored.as_ref().filter(|(r, _)| *r == round)?;
        self.restored_own.get(&self.members[&worker].name).cloned()
    }

    /// Where the run stands after its last commit: the next round, the next fresh batch id
    /// and the batch ids handed out but not committed. With that round's state, this is all a
    /// cold restart needs.
    pub fn committed_position(&self) -> (u64, u64, Vec<u64>) {
        let p = &self.pool_at_commit;
        (
            self.round,
            p.next_fresh,
            p.returned.iter().copied().collect(),
        )
    }

    /// Nobody has trained yet: every worker starts from the seeded initial state.
    fn fresh_start(&self) -> bool {
        self.last_commit.is_none() && self.restored.is_none()
    }

    /// A cold restart from a checkpoint before its first commit: its first round waits for
    /// the expected workers.
    fn cold_restart_pending(&self) -> bool {
        self.last_commit.is_none() && self.restored.is_some()
    }

    /// The address serving the state that starts `round`: a member that holds it, a live
    /// member that serves it after an undo, or the restored checkpoint.
    fn donor_for(&self, round: u64, among: &[WorkerId]) -> Option<String> {
        let undo_donors = self
            .undo_donors
            .iter()
            .filter(|(r, _)| *r == round)
            .flat_map(|(_, ids)| ids);
        among
            .iter()
            .find(|id| self.members[id].state_round == Some(round))
            .or(undo_donors
                .into_iter()
                .find(|id| self.members.contains_key(id)))
            .map(|d| self.members[d].data_addr.clone())
            .or_else(|| {
                self.restored
                    .as_ref()
                    .filter(|(r, _)| *r == round)
                    .map(|(_, addr)| addr.clone())
            })
    }

    /// Whether member `id` starts `round` from the state it holds and serves (it committed
    /// the round before, or the run starts from the seed); any other takes it from a donor.
    fn starts_from_its_own(&self, id: WorkerId, round: u64) -> bool {
        self.fresh_start() || self.members[&id].state_round == Some(round)
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Rounds committed so far.
    pub fn committed_rounds(&self) -> u64 {
        self.round
    }

    pub fn live_members(&self) -> usize {
        self.members.len()
    }

    /// No live member holds the state the next round starts from, and nothing else serves it:
    /// every replica that trained left (a member that comes back with it, e.g. after a hang,
    /// ends this). The run cannot continue live; the caller decides how long to wait.
    pub fn state_lost(&self) -> bool {
        !self.fresh_start()
            && self.active.is_none()
            && !self.is_complete()
            && self
                .donor_for(
                    self.round,
                    &self.members.keys().copied().collect::<Vec<_>>(),
                )
                .is_none()
    }

    /// Every batch of the budget is committed.
    pub fn is_complete(&self) -> bool {
        self.active.is_none() && self.pool.exhausted(self.opts.budget_batches)
    }

    /// Every batch is committed and the final state can be read: with the vote on, once the
    /// replicas' final states are voted on (a vote that undoes rounds makes the run
    /// incomplete again).
    pub fn final_state_ready(&self) -> bool {
        self.is_complete() && self.checkpoint_source().is_some()
    }

    /// Batch ids committed so far.
    pub fn committed_batches(&self) -> u64 {
        self.pool_at_commit.committed()
    }

    /// The schedule step the committed batches have reached (see [`Options::schedule_steps`]).
    pub fn schedule_step(&self) -> u64 {
        let o = &self.opts;
        let step = u128::from(self.committed_batches()) * u128::from(o.schedule_steps)
            / u128::from(o.budget_batches.max(1));
        step as u64
    }

    /// Why the run cannot go on, when every replica kept rolling back (see
    /// [`Options::max_rewinds`]). No round starts after that.
    pub fn unstable(&self) -> Option<&str> {
        self.unstable.as_deref()
    }

    /// Lets workers go once the caller has what it needs from them (the final state).
    pub fn release(&mut self) {
        self.released = true;
    }

    /// Where a checkpoint reads the newest committed state from. With the vote on, only a
    /// state a majority agreed on is checkpointed, from a peer that reported it: none until
    /// the vote on it is held (a corrupted replica must not reach the disk first).
    pub fn checkpoint_source(&self) -> Option<CheckpointSource> {
        let synced = self
            .ranked(self.members.keys().copied())
            .into_iter()
            .filter(|id| self.members[id].state_round == Some(self.round));
        let agreed = if self.opts.vote {
            // Only a vote inserts an agreed hash, and an undo drops those past the round it
            // goes back to: one for this round means this round's state was voted on.
            Some(self.agreed.get(&self.round)?)
        } else {
            None
        };
        let reported = |id: &WorkerId| {
            let name = &self.members[id].name;
            self.state_hashes.get(&self.round).and_then(|r| r.get(name))
        };
        let peers = synced
            .filter(|id| agreed.is_none() || reported(id) == agreed)
            .map(|id| StateHolder {
                name: self.members[&id].name.clone(),
                addr: self.members[&id].data_addr.clone(),
            })
            .collect();
        Some(CheckpointSource {
            position: self.committed_position(),
            agreed: agreed.cloned(),
            peers,
        })
    }

    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn ranked(&self, ids: impl Iterator<Item = WorkerId>) -> Vec<WorkerId> {
        let mut v: Vec<WorkerId> = ids.collect();
        v.sort_by(|a, b| (&self.members[a].name, a).cmp(&(&self.members[b].name, b)));
        v
    }

    /// Removes members silent for longer than the failure timeout, and those of a timed
    /// round not ready by its deadline and grace.
    pub fn tick(&mut self, now: Instant) {
        let mut out: Vec<(WorkerId, String)> = self
            .members
            .iter()
            .filter_map(|(id, m)| Some((*id, self.why_dead(m, now)?)))
            .collect();
        out.extend(self.late_members(now));
        for (id, why) in out {
            self.remove(id, now, why);
        }
    }

    /// The members of a timed round that have not said they are ready, in any attempt, by its
    /// deadline and grace (one retried after an aborted attempt is not late: its part is done).
    fn late_members(&self, now: Instant) -> Vec<(WorkerId, String)> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        let Some(at) = self.opts.round_bound.give_up_at(a.started) else {
            return Vec::new();
        };
        if now < at {
            return Vec::new();
        }
        let why = format!(
            "not ready {:.1} s after round {} started, past its deadline and grace",
            now.saturating_duration_since(a.started).as_secs_f64(),
            a.round
        );
        (a.members.iter())
            .filter(|id| !a.contributed.contains(id))
            .map(|&id| (id, why.clone()))
            .collect()
    }

    /// Why `m` counts as dead at `now` by the run's [`Liveness`], if it does.
    fn why_dead(&self, m: &Member, now: Instant) -> Option<String> {
        let timeout = self.opts.failure_timeout;
        match self.opts.liveness {
            Liveness::Heartbeats => {
                let quiet = now.saturating_duration_since(m.last_seen);
                (quiet > timeout).then(|| format!("silent for {} ms", quiet.as_millis()))
            }
            Liveness::Lease { .. } => {
                let waited = now.saturating_duration_since(m.joined);
                (!m.leased && waited > timeout)
                    .then(|| format!("no etcd lease {} ms after joining", waited.as_millis()))
            }
        }
    }

    /// Whether members show they live by an etcd lease ([`Liveness::Lease`]).
    pub fn judges_by_lease(&self) -> bool {
        matches!(self.opts.liveness, Liveness::Lease { .. })
    }

    /// A worker's lease key came or went ([`Liveness::Lease`]). Gone, the worker is out: its
    /// process died or hung, it was cut off from etcd for the failure timeout, or it left.
    /// After the run is complete that is just goodbye.
    pub fn lease_changed(&mut self, now: Instant, change: MemberLease) {
        let worker = change.worker;
        if change.alive {
            if let Some(m) = self.members.get_mut(&worker) {
                m.leased = true;
            }
        } else if self.is_complete() {
            self.members.remove(&worker);
        } else {
            let why = "its etcd lease expired or was revoked (process gone, hung or cut off)";
            self.remove(worker, now, why.into());
        }
    }

    /// A worker's connection closed: its process exited or its link broke. Faster than
    /// waiting for the heartbeat timeout; after the run is complete it is just goodbye.
    pub fn disconnected(&mut self, now: Instant, worker: WorkerId) {
        if self.is_complete() {
            self.members.remove(&worker);
        } else {
            self.remove(
                worker,
                now,
                "connection closed (process exited or link lost)".into(),
            );
        }
    }

    fn remove(&mut self, id: WorkerId, now: Instant, reason: String) {
        let Some(m) = self.members.remove(&id) else {
            return;
        };
        self.events.push(Event::Removed {
            name: m.name.clone(),
            worker: id,
            reason: reason.clone(),
        });
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if !active.members.contains(&id) {
            return;
        }
        active.members.retain(|&w| w != id);
        if let Some(batches) = active.batches.remove(&id) {
            active.discarded += batches.len() as u64;
            self.pool.returned.extend(batches);
        }
        match &mut active.phase {
            Phase::Gathering { ready } => {
                ready.remove(&id);
            }
            Phase::Reducing { ring, .. } if ring.contains(&id) => {
                self.events.push(Event::AttemptAborted {
                    round: active.round,
                    attempt: active.attempt,
                    reason: format!("{} left the ring: {reason}", m.name),
                });
                active.phase = Phase::Gathering {
                    ready: BTreeSet::new(),
                };
            }
            Phase::Reducing { .. } => {}
        }
        if active.members.is_empty() {
            self.active = None;
        } else {
            self.maybe_start_attempt(now);
        }
    }

    fn maybe_start_round(&mut self, now: Instant) {
        if self.active.is_some() || self.is_complete() || self.unstable.is_some() {
            return;
        }
        if self.opts.vote && self.voted != Some(self.round) && !self.vote(now) {
            return;
        }
        let ids = self.ranked(self.members.keys().copied());
        let quorate = ids.len() >= self.opts.min_workers.max(1);
        if !quorate && self.gathering_until.is_some_and(|t| now < t) {
            return;
        }
        self.undo_an_unheard_commit();
        let members_hold_state = ids
            .iter()
            .any(|id| self.members[id].state_round == Some(self.round));
        let enough = if members_hold_state {
            // Whoever lacks the committed state gets it from a member.
            true
        } else if self.fresh_start() {
            quorate
        } else {
            // A cold restart waits for the expected workers, then all load the checkpoint;
            // after an undo the live members load the state it went back to.
            (quorate || !self.cold_restart_pending()) && self.donor_for(self.round, &ids).is_some()
        };
        if !enough {
            return;
        }
        self.active = Some(self.open_round(now, ids));
    }

    /// A round of members `ids` (in rank order) from `now`: those that got batches (near the
    /// budget's end some get none and sit the round out; they fetch its state when the next
    /// one starts). A fixed round hands each its share; an on-demand one a step's worth, and
    /// the rest as they ask (`pulling`).
    fn open_round(&mut self, now: Instant, ids: Vec<WorkerId>) -> ActiveRound {
        let budget = self.opts.budget_batches;
        let first = match self.opts.round_bound.on_demand() {
            true => self.opts.batches_per_step.max(1),
            false => self.fixed_share(ids.len()),
        };
        let mut batches: BTreeMap<WorkerId, Vec<u64>> = ids
            .iter()
            .map(|&id| (id, self.pool.take(first, budget)))
            .filter(|(_, b)| !b.is_empty())
            .collect();
        let ids: Vec<WorkerId> = ids
            .into_iter()
            .filter(|id| batches.contains_key(id))
            .collect();
        self.events.push(Event::RoundStarted {
            round: self.round,
            members: ids.iter().map(|id| self.members[id].name.clone()).collect(),
        });
        let mut pulling = BTreeSet::new();
        let mut audit = self.draw_audit(self.round, &ids);
        if self.opts.round_bound.on_demand() {
            pulling.extend(ids.iter().copied());
            if let Some((of, _)) = audit {
                if self.give_audited_share(of, ids.len(), first, &mut batches) {
                    pulling.remove(&of);
                } else {
                    audit = None;
                }
            }
        }
        ActiveRound {
            round: self.round,
            members: ids,
            batches,
            attempt: 0,
            phase: Phase::Gathering {
                ready: BTreeSet::new(),
            },
            started: now,
            first_ready: None,
            discarded: 0,
            first_step: self.schedule_step(),
            audit,
            last: self.pool.exhausted(budget),
            pulling,
            last_pull: BTreeMap::new(),
            contributed: BTreeSet::new(),
        }
    }

    /// Each member's batches in a round of fixed length: a full round's, or, when the pool
    /// holds less than that for every one of `members` (the budget's remainder, or batches a
    /// removed member handed back), what is left split evenly in whole steps. Every member
    /// then trains the short round, so its state still has replicas to vote on, and the
    /// round takes a fraction of a full one instead of a full one's time on one member.
    fn fixed_share(&self, members: usize) -> u64 {
        let full = self.opts.batches_per_round;
        let step = self.opts.batches_per_step.max(1);
        let left = self.pool.left(self.opts.budget_batches);
        let members = members.max(1) as u64;
        if left >= full.saturating_mul(members) {
            return full;
        }
        (left.div_ceil(step).div_ceil(members) * step).clamp(1, full.max(1))
    }

    /// Gives `of`, audited in an on-demand round of `members` that handed it `first` batches,
    /// the rest of a share sized by its speed in its last round: its auditors need its batches
    /// up front, so it cannot ask as it trains. False when its speed is not known yet (the
    /// round is then not audited).
    fn give_audited_share(
        &mut self,
        of: WorkerId,
        members: usize,
        first: u64,
        batches: &mut BTreeMap<WorkerId, Vec<u64>>,
    ) -> bool {
        let speed = self.batch_seconds.get(&self.members[&of].name).copied();
        let per_step = self.opts.batches_per_step;
        let Some(share) = self.opts.round_bound.share(members as u64, per_step, speed) else {
            return false;
        };
        let rest = self
            .pool
            .take(share.saturating_sub(first), self.opts.budget_batches);
        batches.entry(of).or_default().extend(rest);
        true
    }

    /// After a takeover that no member holding the recorded state rejoined: when members hold
    /// the state one round before, the last leader recorded that round's commit and died before
    /// telling anyone. No replica applied it, so it is undone (its batches go back to the pool)
    /// and those members carry on from the state they hold.
    fn undo_an_unheard_commit(&mut self) {
        self.one_behind.retain(|id| self.members.contains_key(id));
        let round = self.round;
        let someone_holds_it = (self.members.values()).any(|m| m.state_round == Some(round));
        if someone_holds_it
            || self.one_behind.is_empty()
            || round == 0
            || !self.recent_records.contains_key(&(round - 1))
        {
            return;
        }
        let holders: Vec<WorkerId> = std::mem::take(&mut self.one_behind).into_iter().collect();
        let reason = format!(
            "round {} was recorded as committed, but no worker that came back had applied it",
            round - 1
        );
        self.undo_to(round - 1, holders.clone(), reason);
        for id in holders {
            let m = self.members.get_mut(&id).expect("live members");
            (m.state_round, m.serves_from) = (Some(round - 1), Some(round - 1));
        }
    }

    /// Compares the states the members report for the round about to start. Returns false
    /// while reports are missing. A minority is quarantined; with no majority, the rounds
    /// since the last agreed state are undone.
    fn vote(&mut self, now: Instant) -> bool {
        let round = self.round;
        let holders: Vec<WorkerId> = self
            .ranked(self.members.keys().copied())
            .into_iter()
            .filter(|id| self.members[id].state_round == Some(round))
            .collect();
        if holders.is_empty() {
            self.voted = Some(round);
            return true;
        }
        let reports = self.state_hashes.get(&round);
        let hashes: Vec<(WorkerId, Option<String>)> = holders
            .iter()
            .map(|id| {
                let h = reports.and_then(|r| r.get(&self.members[id].name)).cloned();
                (*id, h)
            })
            .collect();
        if hashes.iter().any(|(_, h)| h.is_none()) {
            return false;
        }
        let hashes: Vec<(WorkerId, String)> = hashes
            .into_iter()
            .map(|(id, h)| (id, h.expect("checked")))
            .collect();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, h) in &hashes {
            *counts.entry(h.clone()).or_default() += 1;
        }
        self.voted = Some(round);
        let majority = counts
            .iter()
            .find(|(_, n)| **n * 2 > holders.len())
            .map(|(h, _)| h.clone());
        if let Some(majority) = &majority {
            self.no_majority = None;
            self.last_agreed = Some(round);
            self.agreed.insert(round, majority.clone());
            while self.agreed.len() > 8 {
                self.agreed.pop_first();
            }
        }
        if counts.len() == 1 {
            return true;
        }
        match majority {
            Some(majority) => {
                self.outvote(now, round, hashes, &majority);
                true
            }
            None => {
                // No way to tell which replica is right: undo to the last agreed state,
                // which every replica still holds.
                let from = self.last_agreed.unwrap_or(0).min(round.saturating_sub(1));
                let reason = format!(
                    "no majority among {} replica states {counts:?}",
                    holders.len()
                );
                self.undo_to(from, holders, reason.clone());
                self.count_no_majority(from, round, reason);
                true
            }
        }
    }

    /// Counts an undo to `from` for want of a majority; the same undo [`NO_MAJORITY_LIMIT`]
    /// times in a row stops the run: replicas that part the same way every time compute
    /// differently (other kernels, faulty hardware), and redoing the rounds will not mend it.
    fn count_no_majority(&mut self, from: u64, round: u64, last: String) {
        let streak = match self.no_majority {
            Some((f, n)) if f == from => n + 1,
            _ => 1,
        };
        self.no_majority = Some((from, streak));
        if streak < NO_MAJORITY_LIMIT {
            return;
        }
        let reason = format!(
            "the replicas' states parted with no majority {streak} times in a row after redoing \
             rounds {from}..{round} ({last}): they compute differently; stopping instead of looping"
        );
        self.unstable = Some(reason.clone());
        self.events.push(Event::RunUnstable {
            rounds: (from..round).collect(),
            losses: Vec::new(),
            reason,
        });
    }

    /// Flags each replica whose state for `round` is not the `majority`'s: quarantined, it
    /// takes the majority's state like a rejoining worker; flagged too often, it is removed.
    fn outvote(
        &mut self,
        now: Instant,
        round: u64,
        hashes: Vec<(WorkerId, String)>,
        majority: &str,
    ) {
        for (id, hash) in hashes {
            if hash == majority {
                continue;
            }
            let name = self.members[&id].name.clone();
            let flags = self.flag(&name);
            self.events.push(Event::Corruption {
                next_round: round,
                name: name.clone(),
                blake3: hash,
                majority: majority.to_string(),
                flags,
            });
            if flags >= self.opts.max_corruption_flags {
                self.remove(
                    id,
                    now,
                    format!(
                        "suspect hardware: its state disagreed with the majority {flags} times"
                    ),
                );
            } else if let Some(m) = self.members.get_mut(&id) {
                m.state_round = None;
            }
        }
    }

    /// Undoes the committed rounds from `from` on: their batches go back to the pool and
    /// every member reloads the state that starts `from`, served by any live one of `donors`
    /// (when none is left, the state is lost: see [`Coordinator::state_lost`]).
    fn undo_to(&mut self, from: u64, donors: Vec<WorkerId>, reason: String) {
        let to = self.round;
        for r in from..to {
            if let Some(record) = self.recent_records.remove(&r) {
                self.pool.returned.extend(record.batches());
            }
        }
        self.durable_version += 1;
        self.pool_at_commit = self.pool.clone();
        // Reports of the undone states must not be counted again.
        self.state_hashes.retain(|r, _| *r <= from);
        self.agreed.retain(|r, _| *r <= from);
        // `last_commit` stays: a member still waiting on the round that led to a rewind
        // learns it committed, then fetches the state rewound to.
        self.round = from;
        self.undo_donors = Some((from, donors));
        for m in self.members.values_mut() {
            m.state_round = None;
        }
        self.voted = Some(from);
        self.last_agreed = self.last_agreed.map(|a| a.min(from));
        self.events.push(Event::RoundsVoided { from, to, reason });
    }

    fn maybe_start_attempt(&mut self, _now: Instant) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if let Phase::Gathering { ready } = &active.phase
            && active.members.iter().all(|id| ready.contains(id))
        {
            active.attempt += 1;
            active.phase = Phase::Reducing {
                ring: active.members.clone(),
                reduced: BTreeMap::new(),
            };
        }
    }

    fn wait_reason(&self) -> String {
        if self.is_complete() {
            return "run complete; final state being collected".into();
        }
        match &self.active {
            Some(a) => format!("round {} is running; joining at the next", a.round),
            None if self.fresh_start() || self.restored.is_some() => format!(
                "{} of {} workers have joined",
                self.members.len(),
                self.opts.min_workers
            ),
            None => format!(
                "no live member holds the state of round {}; waiting for one",
                self.round
            ),
        }
    }

    /// Answers one request at time `now`.
    pub fn handle(&mut self, now: Instant, req: Request) -> Reply {
        self.tick(now);
        if let Request::Join {
            name,
            data_addr,
            held,
            backend,
            threads,
        } = req
        {
            let replay_class = replay_class(&backend, threads);
            if let Some(refusal) = self.refuse_backend(backend) {
                return refusal;
            }
            return self.join(now, name, data_addr, held, replay_class);
        }
        let worker = req
            .worker()
            .expect("every request but a join names its worker");
        // A Reduced for a round that already committed may come from a member that has
        // been removed since, or that was still waiting when a rewind undid the round: it
        // still learns the round committed. (A round being redone is not that round.)
        if let Request::Reduced { round, .. } = &req
            && self.active.as_ref().is_none_or(|a| a.round != *round)
        {
            match &self.last_commit {
                Some((r, ids)) if r == round && ids.contains(&worker) => {
                    return Reply::Commit { round: *round };
                }
                _ if *round < self.round => {
                    return Reply::Evicted {
                        reason: format!("round {round} committed without you"),
                    };
                }
                _ => {}
            }
        }
        let Some(member) = self.members.get_mut(&worker) else {
            return Reply::Evicted {
                reason: "not a member of the quorum (timed out or replaced); rejoin".into(),
            };
        };
        member.last_seen = now;
        match req {
            Request::Join { .. } => unreachable!("handled above"),
            Request::Heartbeat { .. } => Reply::Ok,
            Request::Leave { .. } => {
                self.remove(worker, now, "left".into());
                Reply::Ok
            }
            Request::NextRound { state, .. } => self.next_round(now, worker, state),
            Request::Batches { round, .. } => self.more_batches(now, worker, round),
            Request::Ready { round, .. } => self.ready(now, worker, round),
            Request::Reduced {
                round,
                attempt,
                stats,
                ..
            } => self.reduced(now, worker, round, attempt, stats),
            Request::Failed {
                round,
                attempt,
                error,
                ..
            } => self.failed(worker, round, attempt, error),
        }
    }

    /// Under [`Options::one_backend`], a refusal for a worker on another backend than the
    /// run's (the first worker's); None lets it join.
    fn refuse_backend(&mut self, backend: String) -> Option<Reply> {
        if !self.opts.one_backend {
            return None;
        }
        let run = self.backend.get_or_insert_with(|| backend.clone());
        (*run != backend).then(|| Reply::Evicted {
            reason: format!(
                "this run syncs every step (DDP) and each replica applies its optimizer on its own \
                 device, so every worker must compute on the run's backend, {run}; this one is on \
                 {backend} (DiLoCo runs mix backends)"
            ),
        })
    }

    fn join(
        &mut self,
        now: Instant,
        name: String,
        data_addr: String,
        held: Option<HeldState>,
        replay_class: String,
    ) -> Reply {
        let same_name: Vec<WorkerId> = self
            .members
            .iter()
            .filter(|(_, m)| m.name == name)
            .map(|(id, _)| *id)
            .collect();
        for id in same_name {
            self.remove(
                id,
                now,
                "replaced by a new incarnation of the same worker".into(),
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        self.events.push(Event::Joined {
            name: name.clone(),
            worker: id,
            replay_class: replay_class.clone(),
        });
        self.members.insert(
            id,
            Member {
                name,
                data_addr,
                replay_class,
                joined: now,
                last_seen: now,
                leased: false,
                state_round: None,
                serves_from: None,
            },
        );
        if let Some(held) = held {
            self.count_as_holder(id, held);
        }
        Reply::Welcome {
            worker: id,
            run_id: self.run_id,
            job: self.job.clone(),
            failure_timeout_ms: self.opts.failure_timeout.as_millis() as u64,
            liveness: self.opts.liveness.clone(),
        }
    }

    /// Counts a joining worker that holds the committed state as one of its holders, unless
    /// the vote on that state is over and its hash is not the one agreed (then, like any
    /// other, it fetches the state).
    fn count_as_holder(&mut self, id: WorkerId, held: HeldState) {
        let round = self.round;
        if held.run_id != self.run_id {
            return;
        }
        if self.gathering_until.is_some() && held.next_round.checked_add(1) == Some(round) {
            self.one_behind.insert(id);
            return;
        }
        if held.next_round != round {
            return;
        }
        let voted_otherwise = self.opts.vote
            && self.voted == Some(round)
            && self.agreed.get(&round) != Some(&held.blake3);
        if voted_otherwise {
            return;
        }
        let m = self.members.get_mut(&id).expect("just joined");
        m.state_round = Some(round);
        m.serves_from = Some(round);
        self.record_state(
            id,
            StateReport {
                next_round: round,
                blake3: held.blake3,
            },
        );
    }

    fn record_state(&mut self, worker: WorkerId, report: StateReport) {
        if self.members[&worker].state_round != Some(report.next_round) {
            // A state the run no longer holds (its round was undone): not a vote.
            return;
        }
        let name = self.members[&worker].name.clone();
        self.events.push(Event::StateReported {
            next_round: report.next_round,
            name: name.clone(),
            blake3: report.blake3.clone(),
        });
        let hashes = self.state_hashes.entry(report.next_round).or_default();
        hashes.insert(name, report.blake3);
        let distinct: BTreeSet<&String> = hashes.values().collect();
        // With the vote on, a disagreement is judged (and reported) when the next round starts.
        if distinct.len() > 1 && !self.opts.vote {
            self.events.push(Event::Divergence {
                next_round: report.next_round,
                hashes: hashes.clone(),
            });
        }
        // Keep a bounded window.
        while self.state_hashes.len() > 8 {
            self.state_hashes.pop_first();
        }
    }

    fn next_round(&mut self, now: Instant, worker: WorkerId, state: Option<StateReport>) -> Reply {
        if let Some(report) = state {
            self.record_state(worker, report);
        }
        if self.is_complete() && self.opts.vote && self.voted != Some(self.round) {
            // The final state is voted on too: it is the one checkpointed and served. A
            // disagreement with no majority undoes rounds, and the run goes on.
            self.vote(now);
        }
        if self.is_complete() {
            return if self.released {
                Reply::Finished
            } else {
                Reply::Wait {
                    reason: self.wait_reason(),
                }
            };
        }
        self.maybe_start_round(now);
        let Some(active) = &self.active else {
            return Reply::Wait {
                reason: self.wait_reason(),
            };
        };
        let Some(rank) = active.members.iter().position(|&w| w == worker) else {
            return Reply::Wait {
                reason: self.wait_reason(),
            };
        };
        let donor = if self.starts_from_its_own(worker, active.round) {
            None
        } else {
            let own = self.restored_own_state(active.round, worker);
            match own.or_else(|| self.donor_for(active.round, &active.members)) {
                Some(addr) => Some(addr),
                None => {
                    return Reply::Wait {
                        reason: format!("no live member holds the state of round {}", active.round),
                    };
                }
            }
        };
        Reply::Round {
            round: active.round,
            rank,
            quorum: active.members.len(),
            batches: active.batches[&worker].clone(),
            donor,
            first_step: active.first_step,
            step_scale: self.step_scale(active.round),
            audit: self.audit_task(active, worker),
            audited: active.audit.is_some_and(|(of, _)| of == worker),
            last: active.last,
            on_demand: active.pulling.contains(&worker),
        }
    }

    /// The next step's batches of on-demand round `round` for `worker`, or none once the
    /// round is closed to it (see [`RoundBound::hands_out`]; the time its last step took is
    /// the time since it last asked, or for its first ask its speed in its last round).
    fn more_batches(&mut self, now: Instant, worker: WorkerId, round: u64) -> Reply {
        let (bound, budget) = (self.opts.round_bound, self.opts.budget_batches);
        let per_step = self.opts.batches_per_step.max(1);
        let known = (self.batch_seconds.get(&self.members[&worker].name))
            .map(|s| Duration::from_secs_f64(s * per_step as f64));
        let Some(a) =
            (self.active.as_mut()).filter(|a| a.round == round && a.members.contains(&worker))
        else {
            return self.not_in_round(round);
        };
        let step_s = (a.last_pull.get(&worker))
            .map(|t| now.saturating_duration_since(*t))
            .or(known);
        // What its members hold, and what removed members handed back.
        let held: u64 = a.batches.values().map(|b| b.len() as u64).sum();
        let handed = held + a.discarded;
        let open = a.pulling.contains(&worker) && bound.hands_out(a.started, now, handed, step_s);
        let batches = match open {
            true => self.pool.take(per_step, budget),
            false => Vec::new(),
        };
        if batches.is_empty() {
            a.pulling.remove(&worker);
        } else {
            a.last_pull.insert(worker, now);
            a.batches.entry(worker).or_default().extend(&batches);
        }
        Reply::Batches { round, batches }
    }

    /// What `worker` audits in `active`, if anything.
    fn audit_task(&self, active: &ActiveRound, worker: WorkerId) -> Option<AuditTask> {
        let (of, auditors) = active.audit?;
        let (member, batches) = (self.members.get(&of)?, active.batches.get(&of)?);
        auditors.contains(&worker).then(|| AuditTask {
            of: member.name.clone(),
            donor: member.data_addr.clone(),
            batches: batches.clone(),
        })
    }

    /// Whether round `round` of members `ids` is audited, and whom: drawn from the run id and
    /// the round, so every decision is reproducible from the run's own record.
    fn draw_audit(&self, round: u64, ids: &[WorkerId]) -> Option<(WorkerId, [WorkerId; 2])> {
        let n = ids.len();
        if n < 3 || self.opts.audit_probability <= 0.0 {
            return None;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"holdfast audit draw");
        h.update(&self.run_id.to_le_bytes());
        h.update(&round.to_le_bytes());
        let bytes = h.finalize();
        let word = |i: usize| u64::from_le_bytes(bytes.as_bytes()[i..i + 8].try_into().expect("8"));
        let chance = word(0) as f64 / 2f64.powi(64);
        if chance >= self.opts.audit_probability {
            return None;
        }
        // A replay gives the audited member's bits only on its backend and thread count: a
        // member is audited only by the next two of its class in rank order, and one with
        // fewer than two of its class is not audited.
        let class = |i: usize| self.members[&ids[i]].replay_class.as_str();
        let peers_of = |at: usize| -> Vec<WorkerId> {
            (1..n)
                .map(|k| (at + k) % n)
                .filter(|&j| class(j) == class(at))
                .map(|j| ids[j])
                .collect()
        };
        // Auditors replay from the state the audited member serves for this round. One that
        // takes the round's state from a donor (outvoted, rejoining) may still serve the one
        // it held before, under the same round: replayed from that, its honest contribution
        // would look corrupt. Only members that start from their own state are audited.
        let candidates: Vec<usize> = (0..n)
            .filter(|&i| self.starts_from_its_own(ids[i], round) && peers_of(i).len() >= 2)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let at = candidates[(word(8) % candidates.len() as u64) as usize];
        let peers = peers_of(at);
        Some((ids[at], [peers[0], peers[1]]))
    }

    fn not_in_round(&self, round: u64) -> Reply {
        Reply::Evicted {
            reason: format!("not a member of round {round}; rejoin"),
        }
    }

    fn ready(&mut self, now: Instant, worker: WorkerId, round: u64) -> Reply {
        match &mut self.active {
            Some(a) if a.round == round && a.members.contains(&worker) => {
                a.first_ready.get_or_insert(now);
                a.pulling.remove(&worker);
                a.contributed.insert(worker);
                if let Phase::Gathering { ready } = &mut a.phase {
                    ready.insert(worker);
                }
            }
            _ => return self.not_in_round(round),
        }
        self.maybe_start_attempt(now);
        let a = self.active.as_ref().expect("checked above");
        match &a.phase {
            Phase::Reducing { ring, .. } => Reply::Ring {
                round,
                attempt: a.attempt,
                rank: ring
                    .iter()
                    .position(|&w| w == worker)
                    .expect("ring = members"),
                members: ring
                    .iter()
                    .map(|id| self.members[id].data_addr.clone())
                    .collect(),
            },
            Phase::Gathering { ready } => Reply::Wait {
                reason: format!("{} of {} members ready", ready.len(), a.members.len()),
            },
        }
    }

    fn reduced(
        &mut self,
        now: Instant,
        worker: WorkerId,
        round: u64,
        attempt: u32,
        stats: WorkerRoundStats,
    ) -> Reply {
        let Some(a) = self
            .active
            .as_mut()
            .filter(|a| a.round == round && a.members.contains(&worker))
        else {
            return self.not_in_round(round);
        };
        let current = a.attempt;
        match &mut a.phase {
            Phase::Reducing { ring, reduced } if current == attempt => {
                reduced.insert(worker, stats);
                if ring.iter().all(|id| reduced.contains_key(id)) {
                    if self.void_outliers(now, round) || self.void_failed_audit(now, round) {
                        return match self.members.contains_key(&worker) {
                            true => Reply::Retry {
                                round,
                                reason: "a contribution was an outlier; redone without it".into(),
                            },
                            false => Reply::Evicted {
                                reason: "your contribution was an outlier (suspect hardware)"
                                    .into(),
                            },
                        };
                    }
                    self.commit(now);
                    Reply::Commit { round }
                } else {
                    Reply::Wait {
                        reason: format!("{} of {} reduced", reduced.len(), ring.len()),
                    }
                }
            }
            _ => Reply::Retry {
                round,
                reason: format!("attempt {attempt} was aborted"),
            },
        }
    }

    /// The fingerprints of a fully reduced attempt, by member name.
    fn round_fingerprints(&self) -> Vec<(WorkerId, String, Fingerprint)> {
        let Some(Phase::Reducing { ring, reduced }) = self.active.as_ref().map(|a| &a.phase) else {
            return Vec::new();
        };
        ring.iter()
            .filter_map(|id| {
                let fp = reduced.get(id)?.fingerprint?;
                Some((*id, self.members[id].name.clone(), fp))
            })
            .collect()
    }

    /// How far apart honest fingerprints of an on-demand round's members may be for the
    /// batches they trained: their fingerprints are of progress per batch, and progress over
    /// n batches grows between √n (noise) and n (drift), so per batch it differs by up to the
    /// square root of the ratio of their batch counts. 1 in fixed rounds.
    fn batch_spread(&self) -> f64 {
        let Some(a) = self
            .active
            .as_ref()
            .filter(|_| self.opts.round_bound.on_demand())
        else {
            return 1.0;
        };
        let counts = (a.batches.values()).map(|b| b.len()).filter(|&n| n > 0);
        let (min, max) = counts.fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
        if max == 0 {
            return 1.0;
        }
        (max as f64 / min as f64).sqrt()
    }

    /// Judges a fully reduced attempt by its contributions' fingerprints. Outliers are
    /// reported and removed, which aborts the attempt: the others redo it without them (their
    /// batches go back to the pool). True when any was found.
    fn void_outliers(&mut self, now: Instant, round: u64) -> bool {
        let Some(ratio) = self.opts.outlier_ratio else {
            return false;
        };
        let judged = self.round_fingerprints();
        let named: Vec<(String, Fingerprint)> =
            judged.iter().map(|(_, n, f)| (n.clone(), *f)).collect();
        let ratio = ratio * self.batch_spread();
        let found = fingerprint::outliers(&named, &self.fingerprints, ratio);
        for o in &found {
            let Some((id, ..)) = judged.iter().find(|(_, n, _)| *n == o.name) else {
                continue;
            };
            self.flag(&o.name);
            self.events.push(Event::ContributionOutlier {
                round,
                outlier: o.clone(),
            });
            let reason = format!(
                "suspect hardware: its contribution's {} was {:.3e}, {:.2e}× the median of {} ({:.3e})",
                o.statistic,
                o.value,
                o.value / o.reference,
                o.against,
                o.reference
            );
            self.remove(*id, now, reason);
        }
        !found.is_empty()
    }

    /// Judges the round's replay audit, once every member has reduced: the audited member's
    /// own hash against its two auditors' replays. Both auditors agreeing against it is a
    /// failure: reported, and the member removed, which aborts the attempt (the others redo it
    /// without it). A member whose guard acted this round, or a missing replay, or auditors
    /// that disagree with each other, make the audit inconclusive. True on a failure.
    fn void_failed_audit(&mut self, now: Instant, round: u64) -> bool {
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        let (Some((of, auditors)), Phase::Reducing { reduced, .. }) = (active.audit, &active.phase)
        else {
            return false;
        };
        // An audited member already removed (its audit failed an earlier attempt) is not in
        // this one.
        let (Some(member), Some(own)) = (self.members.get(&of), reduced.get(&of)) else {
            return false;
        };
        let name = member.name.clone();
        let replays: Vec<String> = auditors
            .iter()
            .filter_map(|a| reduced.get(a)?.audit.as_ref())
            .filter(|r| r.of == name)
            .map(|r| r.blake3.clone())
            .collect();
        let guarded = own.skipped_steps > 0 || own.rollbacks > 0;
        let verdict = match (&own.payload_blake3, replays.as_slice()) {
            (Some(sent), [a, b]) if !guarded && a == b && a != sent => AuditVerdict::Failed,
            (Some(sent), [a, b]) if a == sent && b == sent => AuditVerdict::Passed,
            _ => AuditVerdict::Inconclusive,
        };
        self.events.push(Event::Audit {
            round,
            of: name.clone(),
            verdict,
            sent: own.payload_blake3.clone(),
            replays,
        });
        if verdict != AuditVerdict::Failed {
            return false;
        }
        self.flag(&name);
        let reason = "suspect hardware: two replays of its contribution agree with each other, not with what it sent".to_string();
        self.remove(of, now, reason);
        true
    }

    fn failed(&mut self, worker: WorkerId, round: u64, attempt: u32, error: String) -> Reply {
        let name = self.members[&worker].name.clone();
        match self.active.as_mut() {
            Some(a) if a.round == round && a.members.contains(&worker) => {
                if a.attempt == attempt && matches!(a.phase, Phase::Reducing { .. }) {
                    self.events.push(Event::AttemptAborted {
                        round,
                        attempt,
                        reason: format!("{name}: {error}"),
                    });
                    a.phase = Phase::Gathering {
                        ready: BTreeSet::new(),
                    };
                }
                Reply::Retry {
                    round,
                    reason: format!("attempt {attempt} failed"),
                }
            }
            _ => self.not_in_round(round),
        }
    }

    fn commit(&mut self, now: Instant) {
        let judged: Vec<(String, Fingerprint)> = self
            .round_fingerprints()
            .into_iter()
            .map(|(_, n, f)| (n, f))
            .collect();
        fingerprint::remember(&mut self.fingerprints, &judged);
        let a = self.active.take().expect("an active round commits");
        let Phase::Reducing { ring, reduced } = a.phase else {
            unreachable!("commit happens while reducing")
        };
        let n = ring.len() as f64;
        let mean = |f: fn(&WorkerRoundStats) -> f64| reduced.values().map(f).sum::<f64>() / n;
        let record = RoundRecord {
            round: a.round,
            attempts: a.attempt,
            quorum: ring.len(),
            members: ring
                .iter()
                .map(|id| LedgerMember {
                    name: self.members[id].name.clone(),
                    batches: a.batches[id].clone(),
                    compute_s: reduced.get(id).map_or(0.0, |s| s.compute_s),
                })
                .collect(),
            tokens: reduced.values().map(|s| s.tokens).sum(),
            discarded_batches: a.discarded,
            loss: mean(|s| s.loss),
            bytes_sent: reduced.values().map(|s| s.bytes_sent).sum(),
            bytes_received: reduced.values().map(|s| s.bytes_received).sum(),
            compute_s: mean(|s| s.compute_s),
            comm_s: mean(|s| s.comm_s),
            wait_s: mean(|s| s.wait_s),
            wall_s: now.saturating_duration_since(a.started).as_secs_f64(),
            guard_skips: reduced.values().map(|s| s.skipped_steps).sum(),
            guard_rollbacks: reduced.values().map(|s| s.rollbacks).sum(),
            sync_s: a
                .first_ready
                .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()),
        };
        for id in &ring {
            if let Some(m) = self.members.get_mut(id) {
                if m.state_round != Some(a.round) {
                    // It fetched this round's state, or built it from the seed.
                    m.serves_from = Some(a.round);
                }
                m.state_round = Some(a.round + 1);
            }
        }
        self.last_commit = Some((a.round, ring.iter().copied().collect()));
        self.round = a.round + 1;
        self.pool_at_commit = self.pool.clone();
        self.recent_records.insert(a.round, record.clone());
        while self.recent_records.len() > RECENT_ROUNDS {
            self.recent_records.pop_first();
        }
        self.durable_version += 1;
        self.gathering_until = None;
        self.one_behind.clear();
        let every_member_rolled_back = reduced.values().all(|s| s.rollbacks > 0);
        let (round, loss) = (record.round, record.loss);
        let per_batch = seconds_per_batch(&record.members);
        let speeds = speed_ratios(&per_batch);
        self.batch_seconds.extend(per_batch);
        // Committed first: a rewind that undoes this round is recorded after it.
        self.events.push(Event::Committed(record));
        self.judge_speed(round, speeds);
        self.judge_stability(every_member_rolled_back, round, loss);
    }

    /// Keeps each member's recent speed against its peers', and reports one slow in
    /// [`SLOW_ROUNDS`] of its last [`SLOW_WINDOW`] rounds.
    fn judge_speed(&mut self, round: u64, ratios: Vec<(String, f64)>) {
        for (name, ratio) in ratios {
            let window = self.speed.entry(name.clone()).or_default();
            window.push_back((round, (ratio >= SLOW_RATIO).then_some(ratio)));
            while window.len() > SLOW_WINDOW {
                window.pop_front();
            }
            let slow: Vec<(u64, f64)> = window
                .iter()
                .filter_map(|&(r, ratio)| Some((r, ratio?)))
                .collect();
            if slow.len() < SLOW_ROUNDS || !self.reported_slow.insert(name.clone()) {
                continue;
            }
            let mut sorted: Vec<f64> = slow.iter().map(|s| s.1).collect();
            sorted.sort_by(f64::total_cmp);
            self.events.push(Event::SlowWorker {
                name,
                ratio: sorted[sorted.len() / 2],
                rounds: slow.iter().map(|s| s.0).collect(),
            });
        }
    }

    /// The run's stability is the coordinator's call, not each worker's: one replica that
    /// rolls back contributes nothing to its round and the others carry the run. When every
    /// replica rolled back, the state they all started from is the suspect: the run rewinds
    /// to before the outer step that made it and damps the steps that follow (halving them
    /// with each rewind of the episode). Only when that fails `max_rewinds` times does it
    /// stop, naming the rounds, their losses and what was tried.
    fn judge_stability(&mut self, every_member_rolled_back: bool, round: u64, loss: f64) {
        if !every_member_rolled_back {
            if self
                .rewinds
                .last()
                .is_none_or(|r| round + 1 >= r.damped_until)
            {
                // The damped stretch passed cleanly: the episode is over.
                self.rewinds.clear();
                self.durable_version += 1;
            }
            return;
        }
        if self.rewinds.len() as u32 >= self.opts.max_rewinds {
            self.declare_unstable(round, loss);
            return;
        }
        let Some((donors, from)) = self.rewind_target(round) else {
            self.declare_unstable(round, loss);
            return;
        };
        let rewind = Rewind {
            round,
            loss,
            from,
            step_scale: 0.5f64.powi(self.rewinds.len() as i32 + 1),
            damped_until: round + 1 + self.opts.damp_rounds,
        };
        let reason = format!(
            "every replica rolled back in round {round} (mean loss {loss:.4}): rewinding to round \
             {from}, skipping its batches, steps ×{} until round {}",
            rewind.step_scale, rewind.damped_until
        );
        self.rewinds.push(rewind.clone());
        self.durable_version += 1;
        self.events.push(Event::Rewound(rewind));
        if from < self.round {
            let skipped = (self.recent_records.remove(&round))
                .map(|r| r.batches().collect())
                .unwrap_or_default();
            self.undo_to(from, donors, reason);
            self.events.push(Event::BatchesSkipped {
                round,
                batches: skipped,
            });
        }
    }

    /// The state to rewind to after every replica rolled back in `round` (just committed):
    /// the one before the outer step that led to it (the previous round's; the failed round
    /// took none), as far back as a member can still serve.
    fn rewind_target(&self, round: u64) -> Option<(Vec<WorkerId>, u64)> {
        let serving: Vec<(WorkerId, u64)> = self
            .ranked(self.members.keys().copied())
            .into_iter()
            .filter(|id| self.members[id].state_round == Some(self.round))
            .filter_map(|id| self.members[&id].serves_from.map(|r| (id, r)))
            .collect();
        let oldest = serving.iter().map(|(_, r)| *r).min()?;
        let from = round.saturating_sub(1).max(oldest).min(self.round);
        let donors = serving
            .into_iter()
            .filter(|(_, r)| *r <= from)
            .map(|(id, _)| id)
            .collect();
        Some((donors, from))
    }

    /// The factor on `round`'s step: below 1 while a rewind's damping lasts.
    fn step_scale(&self, round: u64) -> f64 {
        match self.rewinds.last() {
            Some(r) if round < r.damped_until => r.step_scale,
            _ => 1.0,
        }
    }

    fn declare_unstable(&mut self, round: u64, loss: f64) {
        let mut rounds: Vec<u64> = self.rewinds.iter().map(|r| r.round).collect();
        let mut losses: Vec<f64> = self.rewinds.iter().map(|r| r.loss).collect();
        rounds.push(round);
        losses.push(loss);
        let tried: Vec<String> = self
            .rewinds
            .iter()
            .map(|r| format!("rewound to round {} with steps ×{}", r.from, r.step_scale))
            .collect();
        let reason = format!(
            "every replica rolled back in rounds {rounds:?} (mean losses {:?}); tried: {}; \
             limit {} rewinds: stopping instead of looping",
            losses
                .iter()
                .map(|l| (l * 1e4).round() / 1e4)
                .collect::<Vec<_>>(),
            if tried.is_empty() {
                "nothing (no member could serve an earlier state)".to_string()
            } else {
                tried.join(", ")
            },
            self.opts.max_rewinds
        );
        self.unstable = Some(reason.clone());
        self.events.push(Event::RunUnstable {
            rounds,
            losses,
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(2000);

    fn addrs(peers: &[StateHolder]) -> Vec<&str> {
        peers.iter().map(|p| p.addr.as_str()).collect()
    }

    fn coord(min_workers: usize, rounds: u64) -> (Coordinator, Instant) {
        coord_judging(min_workers, rounds, Liveness::Heartbeats)
    }

    fn coord_judging(
        min_workers: usize,
        rounds: u64,
        liveness: Liveness,
    ) -> (Coordinator, Instant) {
        let opts = Options {
            failure_timeout: T,
            min_workers,
            batches_per_round: 2,
            budget_batches: rounds * 2 * min_workers as u64,
            schedule_steps: rounds,
            vote: false,
            max_corruption_flags: 2,
            max_rewinds: 2,
            damp_rounds: 3,
            outlier_ratio: None,
            audit_probability: 0.0,
            liveness,
            one_backend: false,
            round_bound: RoundBound::Fixed,
            batches_per_step: 1,
        };
        (Coordinator::new(opts, 77, "job".into()), Instant::now())
    }

    fn join(c: &mut Coordinator, now: Instant, name: &str) -> WorkerId {
        join_as(c, now, name, "")
    }

    /// Joins `name` as a worker on `backend`.
    fn join_as(c: &mut Coordinator, now: Instant, name: &str, backend: &str) -> WorkerId {
        match c.handle(
            now,
            Request::Join {
                name: name.into(),
                data_addr: format!("{name}:1"),
                held: None,
                backend: backend.into(),
                threads: 1,
            },
        ) {
            Reply::Welcome {
                worker,
                run_id,
                job,
                ..
            } => {
                assert_eq!((run_id, job.as_str()), (77, "job"));
                worker
            }
            r => panic!("{r:?}"),
        }
    }

    fn next(c: &mut Coordinator, now: Instant, w: WorkerId) -> Reply {
        c.handle(
            now,
            Request::NextRound {
                worker: w,
                state: None,
            },
        )
    }

    fn ready(c: &mut Coordinator, now: Instant, w: WorkerId, round: u64) -> Reply {
        c.handle(now, Request::Ready { worker: w, round })
    }

    fn reduced(c: &mut Coordinator, now: Instant, w: WorkerId, round: u64, attempt: u32) -> Reply {
        let stats = WorkerRoundStats {
            tokens: 10,
            ..Default::default()
        };
        reduced_with(c, now, w, (round, attempt), stats)
    }

    /// `w` reports attempt `at.1` of round `at.0` reduced, with `stats`.
    fn reduced_with(
        c: &mut Coordinator,
        now: Instant,
        w: WorkerId,
        at: (u64, u32),
        stats: WorkerRoundStats,
    ) -> Reply {
        let (round, attempt) = at;
        let req = Request::Reduced {
            worker: w,
            round,
            attempt,
            stats,
        };
        c.handle(now, req)
    }

    /// Drives every worker in `ws` through one clean round.
    fn clean_round(c: &mut Coordinator, now: Instant, ws: &[WorkerId], round: u64) {
        let stats = WorkerRoundStats {
            tokens: 10,
            ..Default::default()
        };
        round_reporting(c, now, ws, round, &vec![stats; ws.len()]);
        assert_eq!(c.committed_rounds(), round + 1);
    }

    /// Runs `round` to its commit, each member of `ws` reporting its `stats`.
    fn round_reporting(
        c: &mut Coordinator,
        now: Instant,
        ws: &[WorkerId],
        round: u64,
        stats: &[WorkerRoundStats],
    ) {
        for &w in ws {
            assert!(matches!(next(c, now, w), Reply::Round { round: r, .. } if r == round));
        }
        let mut attempt = 0;
        for &w in ws {
            if let Reply::Ring { attempt: a, .. } = ready(c, now, w, round) {
                attempt = a;
            }
        }
        for (&w, stats) in ws.iter().zip(stats) {
            let req = Request::Reduced {
                worker: w,
                round,
                attempt,
                stats: stats.clone(),
            };
            c.handle(now, req);
        }
    }

    fn committed(c: &mut Coordinator) -> Vec<RoundRecord> {
        c.drain_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Committed(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Runs `round` to its commit with every member reporting `rollbacks`.
    fn round_with_rollbacks(
        c: &mut Coordinator,
        now: Instant,
        ws: &[WorkerId],
        round: u64,
        rollbacks: &[u64],
    ) {
        let stats: Vec<WorkerRoundStats> = rollbacks
            .iter()
            .map(|&rollbacks| WorkerRoundStats {
                loss: 4.5,
                rollbacks,
                ..Default::default()
            })
            .collect();
        round_reporting(c, now, ws, round, &stats);
    }

    /// The round's reply to `w`: (first step, step scale, donor).
    fn round_reply(c: &mut Coordinator, now: Instant, w: WorkerId) -> (u64, f64, Option<String>) {
        match next(c, now, w) {
            Reply::Round {
                first_step,
                step_scale,
                donor,
                ..
            } => (first_step, step_scale, donor),
            r => panic!("{r:?}"),
        }
    }

    fn rewinds(c: &mut Coordinator) -> Vec<(u64, u64, f64, u64)> {
        c.drain_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Rewound(r) => Some((r.round, r.from, r.step_scale, r.damped_until)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_round_every_replica_rolled_back_in_rewinds_the_run_and_damps_what_follows() {
        let (mut c, t0) = coord(2, 20);
        let ws = [join(&mut c, t0, "w0"), join(&mut c, t0, "w1")];
        // One replica rolling back, round after round, changes nothing: the other carries it.
        for round in 0..4 {
            round_with_rollbacks(&mut c, t0, &ws, round, &[1, 0]);
        }
        assert!(rewinds(&mut c).is_empty());
        // Every replica rolled back in round 4: back to the state before round 3's outer step,
        // rounds 3 and 4 undone (round 3's batches trained again, round 4's skipped), steps
        // halved up to round 8.
        round_with_rollbacks(&mut c, t0, &ws, 4, &[1, 2]);
        let events = c.drain_events();
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Rewound(Rewind {
                round: 4,
                from: 3,
                step_scale: 0.5,
                damped_until: 8,
                ..
            })
        )));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::RoundsVoided { from: 3, to: 5, .. }))
        );
        assert!(events.iter().any(|e| matches!(e,
            Event::BatchesSkipped { round: 4, batches } if *batches == vec![16, 17, 18, 19])));
        assert_eq!(c.committed_rounds(), 3);
        // Rounds 0–2 and the skipped ones are spent; round 3's go back to the pool.
        assert_eq!(c.committed_batches(), 16);
        // w0 was still waiting on round 4 when it committed: it learns so (it must not be
        // evicted), and its report of the state round 4 made does not count.
        assert_eq!(reduced(&mut c, t0, ws[0], 4, 1), Reply::Commit { round: 4 });
        let stale = Some(StateReport {
            next_round: 5,
            blake3: "undone".into(),
        });
        let req = Request::NextRound {
            worker: ws[0],
            state: stale,
        };
        assert!(matches!(c.handle(t0, req), Reply::Round { round: 3, .. }));
        assert!(
            !c.drain_events()
                .iter()
                .any(|e| matches!(e, Event::StateReported { .. }))
        );
        let (first_step, scale, donor) = round_reply(&mut c, t0, ws[0]);
        assert_eq!(
            (first_step, scale, donor.as_deref()),
            (4, 0.5, Some("w0:1"))
        );
        for round in 3..8 {
            assert_eq!(round_reply(&mut c, t0, ws[1]).1, 0.5, "round {round}");
            round_with_rollbacks(&mut c, t0, &ws, round, &[0, 1]);
        }
        assert_eq!(round_reply(&mut c, t0, ws[0]).1, 1.0, "damping over");
        // The damped stretch passed cleanly: a later failure starts a new episode.
        round_with_rollbacks(&mut c, t0, &ws, 8, &[1, 1]);
        assert_eq!(rewinds(&mut c), vec![(8, 7, 0.5, 12)]);
        assert_eq!(c.unstable(), None);
    }

    #[test]
    fn the_run_is_declared_unstable_when_its_rewinds_do_not_help() {
        let (mut c, t0) = coord(2, 20);
        let ws = [join(&mut c, t0, "w0"), join(&mut c, t0, "w1")];
        for round in 0..4 {
            clean_round(&mut c, t0, &ws, round);
        }
        // Round 4 fails after each of the two rewinds the limit allows, each damping harder.
        for scale in [0.5, 0.25] {
            round_with_rollbacks(&mut c, t0, &ws, 4, &[1, 1]);
            assert_eq!(rewinds(&mut c), vec![(4, 3, scale, 8)]);
            clean_round(&mut c, t0, &ws, 3);
            assert_eq!(round_reply(&mut c, t0, ws[0]).1, scale);
        }
        round_with_rollbacks(&mut c, t0, &ws, 4, &[1, 1]);
        let why = c.unstable().expect("a third failure, limit 2 rewinds");
        assert!(
            why.contains("rounds [4, 4, 4]")
                && why.contains("4.5")
                && why.contains(
                    "rewound to round 3 with steps ×0.5, rewound to round 3 with steps ×0.25"
                ),
            "{why}"
        );
        assert!(
            c.drain_events().iter().any(
                |e| matches!(e, Event::RunUnstable { rounds, .. } if *rounds == vec![4, 4, 4])
            )
        );
        // No round starts after that.
        assert!(matches!(next(&mut c, t0, ws[0]), Reply::Wait { .. }));
    }

    #[test]
    fn a_failed_first_round_is_redone_from_the_seeded_state_with_a_damped_step() {
        let (mut c, t0) = coord(2, 20);
        let ws = [join(&mut c, t0, "w0"), join(&mut c, t0, "w1")];
        round_with_rollbacks(&mut c, t0, &ws, 0, &[1, 1]);
        assert_eq!(rewinds(&mut c), vec![(0, 0, 0.5, 4)]);
        assert_eq!(c.committed_rounds(), 0);
        assert_eq!(c.committed_batches(), 4, "round 0's batches skipped");
        assert_eq!(
            round_reply(&mut c, t0, ws[1]),
            (1, 0.5, Some("w0:1".into()))
        );
    }

    #[test]
    fn after_a_rewind_any_live_member_that_serves_the_state_is_its_donor() {
        let (mut c, t0) = coord(3, 20);
        let ws = [
            join(&mut c, t0, "w0"),
            join(&mut c, t0, "w1"),
            join(&mut c, t0, "w2"),
        ];
        for round in 0..3 {
            clean_round(&mut c, t0, &ws, round);
        }
        round_with_rollbacks(&mut c, t0, &ws, 3, &[1, 1, 1]);
        assert_eq!(rewinds(&mut c), vec![(3, 2, 0.5, 7)]);
        // The first donor dies before anyone fetched from it: the next one serves.
        c.disconnected(t0, ws[0]);
        assert_eq!(round_reply(&mut c, t0, ws[1]).2.as_deref(), Some("w1:1"));
        c.disconnected(t0, ws[1]);
        assert_eq!(round_reply(&mut c, t0, ws[2]).2.as_deref(), Some("w2:1"));
        // With every member that served it gone, the state is lost (the launcher says so),
        // rather than every newcomer being sent to a dead address.
        c.disconnected(t0, ws[2]);
        join(&mut c, t0, "w0");
        assert!(c.state_lost());
    }

    #[test]
    fn a_rewind_goes_no_further_back_than_a_member_can_serve() {
        let (mut c, t0) = coord(2, 20);
        let ws = [join(&mut c, t0, "w0"), join(&mut c, t0, "w1")];
        for round in 0..3 {
            clean_round(&mut c, t0, &ws, round);
        }
        // w0 comes back: its new incarnation fetches the state of round 3 from w1.
        let ws = [join(&mut c, t0, "w0"), ws[1]];
        clean_round(&mut c, t0, &ws, 3);
        round_with_rollbacks(&mut c, t0, &ws, 4, &[1, 1]);
        assert_eq!(rewinds(&mut c), vec![(4, 3, 0.5, 8)]);
        // Both fetched the state of round 3: that is as far back as they serve, even when
        // round 3 is the one that fails.
        round_with_rollbacks(&mut c, t0, &ws, 3, &[1, 1]);
        assert_eq!(rewinds(&mut c), vec![(3, 3, 0.25, 7)]);
    }

    #[test]
    fn round_zero_waits_for_the_minimum_and_assigns_disjoint_batches() {
        let (mut c, t0) = coord(2, 10);
        let a = join(&mut c, t0, "w0");
        assert!(matches!(next(&mut c, t0, a), Reply::Wait { reason } if reason.contains("1 of 2")));
        let b = join(&mut c, t0, "w1");
        let (
            Reply::Round {
                rank: ra,
                batches: ba,
                donor: da,
                quorum,
                ..
            },
            Reply::Round {
                rank: rb,
                batches: bb,
                ..
            },
        ) = (next(&mut c, t0, a), next(&mut c, t0, b))
        else {
            panic!()
        };
        assert_eq!((ra, rb, quorum, da), (0, 1, 2, None));
        assert_eq!((ba, bb), (vec![0, 1], vec![2, 3]));
    }

    #[test]
    fn ring_forms_only_when_all_are_ready_and_commit_needs_every_member() {
        let (mut c, t0) = coord(2, 10);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        next(&mut c, t0, a);
        next(&mut c, t0, b);
        assert!(matches!(ready(&mut c, t0, a, 0), Reply::Wait { .. }));
        let Reply::Ring {
            attempt,
            rank,
            members,
            ..
        } = ready(&mut c, t0, b, 0)
        else {
            panic!()
        };
        assert_eq!(
            (attempt, rank, members),
            (1, 1, vec!["w0:1".to_string(), "w1:1".to_string()])
        );
        assert!(
            matches!(ready(&mut c, t0, a, 0), Reply::Ring { rank: 0, .. }),
            "polling is idempotent"
        );
        assert!(matches!(reduced(&mut c, t0, a, 0, 1), Reply::Wait { .. }));
        assert_eq!(
            c.committed_rounds(),
            0,
            "no commit before every member reduced"
        );
        assert_eq!(reduced(&mut c, t0, b, 0, 1), Reply::Commit { round: 0 });
        assert_eq!(
            reduced(&mut c, t0, a, 0, 1),
            Reply::Commit { round: 0 },
            "late poll learns the commit"
        );
        let rec = committed(&mut c);
        assert_eq!(rec.len(), 1);
        assert_eq!((rec[0].quorum, rec[0].tokens, rec[0].attempts), (2, 20, 1));
    }

    fn by_lease() -> Liveness {
        Liveness::Lease {
            prefix: "holdfast/run/members/1-4d/".into(),
        }
    }

    fn lease(c: &mut Coordinator, now: Instant, worker: WorkerId, alive: bool) {
        c.lease_changed(now, MemberLease { worker, alive });
    }

    fn removals(c: &mut Coordinator) -> Vec<(String, String)> {
        let events = c.drain_events().into_iter();
        let removed = events.filter_map(|e| match e {
            Event::Removed { name, reason, .. } => Some((name, reason)),
            _ => None,
        });
        removed.collect()
    }

    #[test]
    fn under_leases_silence_keeps_a_member_in_and_a_lease_gone_puts_it_out() {
        let (mut c, t0) = coord_judging(2, 10, by_lease());
        let ws: Vec<_> = ["w0", "w1"].iter().map(|n| join(&mut c, t0, n)).collect();
        for &w in &ws {
            lease(&mut c, t0, w, true);
            next(&mut c, t0, w);
        }
        // Both train for three failure timeouts without a word: their leases say they live.
        let t1 = t0 + 3 * T;
        c.tick(t1);
        assert_eq!(c.live_members(), 2);
        lease(&mut c, t1, ws[1], false);
        assert_eq!(c.live_members(), 1);
        let removed = removals(&mut c);
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert_eq!(removed[0].0, "w1");
        assert!(removed[0].1.contains("etcd lease expired"), "{removed:?}");
        // A lease event for a worker that is no longer a member changes nothing.
        lease(&mut c, t1, ws[1], true);
        lease(&mut c, t1, ws[1], false);
        assert_eq!((c.live_members(), removals(&mut c).len()), (1, 0));
    }

    #[test]
    fn under_leases_a_member_whose_lease_never_appears_is_out_after_the_failure_timeout() {
        let (mut c, t0) = coord_judging(2, 10, by_lease());
        let w0 = join(&mut c, t0, "w0");
        join(&mut c, t0, "w1");
        lease(&mut c, t0, w0, true);
        c.tick(t0 + T);
        assert_eq!(
            c.live_members(),
            2,
            "within the timeout it may still register"
        );
        c.tick(t0 + T + Duration::from_millis(1));
        assert_eq!(c.live_members(), 1);
        let removed = removals(&mut c);
        assert_eq!(removed[0].0, "w1");
        assert!(removed[0].1.contains("no etcd lease"), "{removed:?}");
    }

    #[test]
    fn a_welcome_tells_the_worker_how_it_shows_it_lives() {
        for liveness in [Liveness::Heartbeats, by_lease()] {
            let (mut c, t0) = coord_judging(1, 1, liveness.clone());
            let join = Request::Join {
                name: "w0".into(),
                data_addr: "w0:1".into(),
                held: None,
                backend: String::new(),
                threads: 0,
            };
            let Reply::Welcome { liveness: told, .. } = c.handle(t0, join) else {
                panic!()
            };
            assert_eq!(told, liveness);
        }
        // A coordinator from before leases says nothing: heartbeats.
        let old = r#"{"type":"welcome","worker":1,"run_id":2,"job":"","failure_timeout_ms":5}"#;
        let reply: Reply = serde_json::from_str(old).unwrap();
        assert!(matches!(
            reply,
            Reply::Welcome {
                liveness: Liveness::Heartbeats,
                ..
            }
        ));
    }

    #[test]
    fn a_silent_member_is_removed_its_attempt_aborted_and_its_batches_retrained() {
        let (mut c, t0) = coord(3, 10);
        let ws: Vec<_> = ["w0", "w1", "w2"]
            .iter()
            .map(|n| join(&mut c, t0, n))
            .collect();
        for &w in &ws {
            next(&mut c, t0, w);
        }
        for &w in &ws {
            ready(&mut c, t0, w, 0);
        }
        // w2 hangs mid-collective; the others finish theirs but cannot commit without it.
        let t1 = t0 + Duration::from_millis(500);
        assert!(matches!(
            reduced(&mut c, t1, ws[0], 0, 1),
            Reply::Wait { .. }
        ));
        assert!(matches!(
            reduced(&mut c, t1, ws[1], 0, 1),
            Reply::Wait { .. }
        ));
        // Past the timeout for w2 (heartbeats from the others keep them in).
        let t2 = t0 + T + Duration::from_millis(100);
        c.handle(t2, Request::Heartbeat { worker: ws[0] });
        c.handle(t2, Request::Heartbeat { worker: ws[1] });
        assert_eq!(c.live_members(), 2);
        // The survivors' reduced results are from the aborted attempt: retry, no commit.
        assert!(matches!(
            reduced(&mut c, t2, ws[0], 0, 1),
            Reply::Retry { .. }
        ));
        assert_eq!(c.committed_rounds(), 0);
        ready(&mut c, t2, ws[0], 0);
        let Reply::Ring {
            attempt, members, ..
        } = ready(&mut c, t2, ws[1], 0)
        else {
            panic!()
        };
        assert_eq!((attempt, members.len()), (2, 2));
        reduced(&mut c, t2, ws[0], 0, 2);
        assert_eq!(reduced(&mut c, t2, ws[1], 0, 2), Reply::Commit { round: 0 });
        let events = c.drain_events();
        assert!(events.iter().any(|e| matches!(e, Event::Removed { name, reason, .. } if name == "w2" && reason.contains("silent"))));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::AttemptAborted { attempt: 1, .. }))
        );
        let Some(Event::Committed(rec)) = events.iter().find(|e| matches!(e, Event::Committed(_)))
        else {
            panic!()
        };
        assert_eq!(rec.discarded_batches, 2);
        assert_eq!(
            rec.members
                .iter()
                .map(|m| m.batches.clone())
                .collect::<Vec<_>>(),
            vec![vec![0, 1], vec![2, 3]]
        );
        // w2's batches 4, 5 come first in the next round.
        let Reply::Round { batches, donor, .. } = next(&mut c, t2, ws[0]) else {
            panic!()
        };
        assert_eq!((batches, donor), (vec![4, 5], None));
        // The removed worker is told so on every request.
        assert!(matches!(next(&mut c, t2, ws[2]), Reply::Evicted { .. }));
        assert!(matches!(
            reduced(&mut c, t2, ws[2], 0, 1),
            Reply::Evicted { .. }
        ));
    }

    #[test]
    fn a_failed_collective_aborts_the_attempt_for_everyone() {
        let (mut c, t0) = coord(2, 10);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        next(&mut c, t0, a);
        next(&mut c, t0, b);
        ready(&mut c, t0, a, 0);
        ready(&mut c, t0, b, 0);
        // a completed its collective, b saw an error: a must not commit.
        assert!(matches!(reduced(&mut c, t0, a, 0, 1), Reply::Wait { .. }));
        let r = c.handle(
            t0,
            Request::Failed {
                worker: b,
                round: 0,
                attempt: 1,
                error: "reset".into(),
            },
        );
        assert!(matches!(r, Reply::Retry { .. }));
        assert!(matches!(reduced(&mut c, t0, a, 0, 1), Reply::Retry { .. }));
        assert_eq!(c.committed_rounds(), 0);
        ready(&mut c, t0, a, 0);
        assert!(matches!(
            ready(&mut c, t0, b, 0),
            Reply::Ring { attempt: 2, .. }
        ));
    }

    #[test]
    fn the_state_is_lost_only_when_every_holder_has_left_after_a_commit() {
        let (mut c, t0) = coord(2, 10);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        // Before anyone trained, everyone starts from the seeded state: nothing to lose.
        c.handle(t0, Request::Leave { worker: a });
        assert!(!c.state_lost());
        let a = join(&mut c, t0, "w0");
        for w in [a, b] {
            next(&mut c, t0, w);
        }
        for w in [a, b] {
            ready(&mut c, t0, w, 0);
        }
        for w in [a, b] {
            reduced(&mut c, t0, w, 0, 1);
        }
        assert_eq!(c.committed_rounds(), 1);
        assert!(!c.state_lost(), "both members hold round 1's state");
        c.handle(t0, Request::Leave { worker: a });
        assert!(!c.state_lost(), "b still holds it and can serve a newcomer");
        let fresh = join(&mut c, t0, "w2");
        c.handle(t0, Request::Leave { worker: b });
        assert!(c.state_lost(), "only a member that never trained is left");
        assert!(
            matches!(next(&mut c, t0, fresh), Reply::Wait { reason } if reason.contains("no live member holds"))
        );
    }

    #[test]
    fn a_late_joiner_waits_for_the_next_round_and_gets_a_donor() {
        let (mut c, t0) = coord(2, 10);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        next(&mut c, t0, a);
        next(&mut c, t0, b);
        let late = join(&mut c, t0, "w2");
        assert!(
            matches!(next(&mut c, t0, late), Reply::Wait { reason } if reason.contains("next"))
        );
        for w in [a, b] {
            ready(&mut c, t0, w, 0);
        }
        for w in [a, b] {
            reduced(&mut c, t0, w, 0, 1);
        }
        let Reply::Round {
            round,
            quorum,
            donor,
            rank,
            ..
        } = next(&mut c, t0, late)
        else {
            panic!()
        };
        assert_eq!(
            (round, quorum, donor, rank),
            (1, 3, Some("w0:1".to_string()), 2)
        );
        assert!(matches!(
            next(&mut c, t0, a),
            Reply::Round { donor: None, .. }
        ));
        let source = c.checkpoint_source().expect("voted");
        assert_eq!(addrs(&source.peers), ["w0:1", "w1:1"]);
    }

    #[test]
    fn a_restarted_worker_replaces_its_old_incarnation() {
        let (mut c, t0) = coord(2, 10);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        next(&mut c, t0, a);
        next(&mut c, t0, b);
        let b2 = join(&mut c, t0, "w1");
        assert_ne!(b, b2);
        assert_eq!(c.live_members(), 2);
        assert!(matches!(ready(&mut c, t0, b, 0), Reply::Evicted { .. }));
        // The round goes on with w0 alone; w1's batches return to the pool.
        let Reply::Ring { members, .. } = ready(&mut c, t0, a, 0) else {
            panic!()
        };
        assert_eq!(members, vec!["w0:1".to_string()]);
        assert_eq!(reduced(&mut c, t0, a, 0, 1), Reply::Commit { round: 0 });
        let Reply::Round { batches, donor, .. } = next(&mut c, t0, b2) else {
            panic!()
        };
        assert_eq!((batches, donor), (vec![4, 5], Some("w0:1".to_string())));
    }

    #[test]
    fn a_fixed_round_short_of_batches_splits_them_in_whole_steps_over_every_member() {
        // Rounds of 3 steps of 2 batches; the budget leaves 10 batches (5 steps) for the last
        // round of three members: 2, 2 and 1 steps, not 3 steps on one member and 2 on another
        // while the third (and its vote) sits out.
        let (mut c, t0) = coord(3, 1);
        c.opts.batches_per_round = 6;
        c.opts.batches_per_step = 2;
        c.opts.budget_batches = 28;
        let ws: Vec<_> = ["w0", "w1", "w2"]
            .iter()
            .map(|n| join(&mut c, t0, n))
            .collect();
        let batches = |c: &mut Coordinator| -> Vec<usize> {
            ws.iter()
                .map(|&w| match next(c, t0, w) {
                    Reply::Round { batches, .. } => batches.len(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(batches(&mut c), [6, 6, 6]);
        let stats = vec![WorkerRoundStats::default(); 3];
        round_reporting(&mut c, t0, &ws, 0, &stats);
        assert_eq!(batches(&mut c), [4, 4, 2]);
        round_reporting(&mut c, t0, &ws, 1, &stats);
        assert!(c.is_complete());
        assert_eq!(c.committed_batches(), 28);
    }

    #[test]
    fn every_batch_is_committed_exactly_once_and_the_run_finishes_after_release() {
        let (mut c, t0) = coord(3, 4);
        let ws: Vec<_> = ["w0", "w1", "w2"]
            .iter()
            .map(|n| join(&mut c, t0, n))
            .collect();
        clean_round(&mut c, t0, &ws, 0);
        // Round 1: w1 dies after training; its batches must reappear later.
        for &w in &ws {
            next(&mut c, t0, w);
        }
        for w in [ws[0], ws[2]] {
            c.handle(t0 + T / 2, Request::Heartbeat { worker: w });
        }
        let t1 = t0 + T + Duration::from_millis(1);
        for w in [ws[0], ws[2]] {
            c.handle(t1, Request::Heartbeat { worker: w });
        }
        for w in [ws[0], ws[2]] {
            ready(&mut c, t1, w, 1);
        }
        for w in [ws[0], ws[2]] {
            reduced(&mut c, t1, w, 1, 1);
        }
        let mut t = t1;
        let mut first_steps = vec![];
        for round in 2.. {
            if c.is_complete() {
                break;
            }
            // Near the budget's end a member may get no batches: it sits the round out.
            let mut members = vec![];
            for w in [ws[0], ws[2]] {
                if let Reply::Round { first_step, .. } = next(&mut c, t, w) {
                    members.push(w);
                    first_steps.push(first_step);
                }
            }
            let stats = vec![WorkerRoundStats::default(); members.len()];
            round_reporting(&mut c, t, &members, round, &stats);
            t += Duration::from_millis(10);
        }
        // The budget is 24 batches (4 rounds of 3 × 2), counted in batches: the shrunk round
        // 1 committed 4, and w1's 2 were taken first by round 2; rounds 2–4 take 4 each and
        // round 5 the last 2, one each.
        assert_eq!(c.committed_rounds(), 6);
        assert_eq!(c.committed_batches(), 24);
        // The schedule (4 steps over 24 batches) follows the batches committed before each
        // round (10, 14, 18, 22), not the round's index.
        assert_eq!(first_steps, vec![1, 1, 2, 2, 3, 3, 3, 3]);
        let records = committed(&mut c);
        let mut all: Vec<u64> = records
            .iter()
            .flat_map(|r| r.members.iter().flat_map(|m| m.batches.clone()))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a batch was committed twice");
        assert_eq!(
            all,
            (0..n as u64).collect::<Vec<_>>(),
            "a batch was skipped"
        );
        assert!(matches!(next(&mut c, t, ws[0]), Reply::Wait { .. }));
        c.release();
        assert_eq!(next(&mut c, t, ws[0]), Reply::Finished);
    }

    #[test]
    fn diverging_state_reports_are_flagged_when_not_voting() {
        let (mut c, t0) = coord(2, 10);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        // Reports count for states their senders hold: the ones after round 2.
        for round in 0..3 {
            clean_round(&mut c, t0, &[a, b], round);
        }
        let rep = |h: &str| {
            Some(StateReport {
                next_round: 3,
                blake3: h.into(),
            })
        };
        c.handle(
            t0,
            Request::NextRound {
                worker: a,
                state: rep("aa"),
            },
        );
        c.handle(
            t0,
            Request::NextRound {
                worker: b,
                state: rep("aa"),
            },
        );
        assert!(
            !c.drain_events()
                .iter()
                .any(|e| matches!(e, Event::Divergence { .. }))
        );
        c.handle(
            t0,
            Request::NextRound {
                worker: b,
                state: rep("bb"),
            },
        );
        assert!(
            c.drain_events()
                .iter()
                .any(|e| matches!(e, Event::Divergence { next_round: 3, .. }))
        );
    }

    #[test]
    fn a_closed_connection_removes_the_member_at_once_but_not_after_the_run() {
        let (mut c, t0) = coord(2, 1);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        next(&mut c, t0, a);
        next(&mut c, t0, b);
        c.disconnected(t0, b);
        assert_eq!(c.live_members(), 1);
        assert!(c.drain_events().iter().any(
            |e| matches!(e, Event::Removed { reason, .. } if reason.contains("connection closed"))
        ));
        let Reply::Ring { members, .. } = ready(&mut c, t0, a, 0) else {
            panic!()
        };
        assert_eq!(members.len(), 1);
        reduced(&mut c, t0, a, 0, 1);
        // w1's batches must still be trained: one more round before the run is complete.
        assert!(!c.is_complete());
        clean_round(&mut c, t0, &[a], 1);
        assert!(c.is_complete());
        c.drain_events();
        c.disconnected(t0, a);
        assert!(
            c.drain_events().is_empty(),
            "leaving a finished run is not a fault"
        );
    }

    #[test]
    fn a_cold_restart_hands_everyone_the_checkpoint_and_keeps_the_pool() {
        let opts = Options {
            failure_timeout: T,
            min_workers: 2,
            batches_per_round: 2,
            budget_batches: 40,
            schedule_steps: 10,
            vote: false,
            max_corruption_flags: 2,
            max_rewinds: 2,
            damp_rounds: 3,
            outlier_ratio: None,
            audit_probability: 0.0,
            liveness: Liveness::Heartbeats,
            one_backend: false,
            round_bound: RoundBound::Fixed,
            batches_per_step: 1,
        };
        let t0 = Instant::now();
        let own = BTreeMap::from([
            ("w1".to_string(), "own-w1:1".to_string()),
            ("gone".to_string(), "own-gone:1".to_string()),
        ]);
        let mut c =
            Coordinator::restore(opts, 77, "job".into(), 6, 30, vec![3, 17], "ckpt:1".into())
                .serving_own_states(own);
        let a = join(&mut c, t0, "w0");
        assert!(matches!(next(&mut c, t0, a), Reply::Wait { reason } if reason.contains("1 of 2")));
        let b = join(&mut c, t0, "w1");
        let (
            Reply::Round {
                round,
                batches: ba,
                donor: da,
                ..
            },
            Reply::Round {
                batches: bb,
                donor: db,
                ..
            },
        ) = (next(&mut c, t0, a), next(&mut c, t0, b))
        else {
            panic!()
        };
        assert_eq!(round, 6);
        assert_eq!(
            (da.as_deref(), db.as_deref()),
            (Some("ckpt:1"), Some("own-w1:1")),
            "a worker the checkpoint kept its own state of gets that one"
        );
        assert_eq!(
            (ba, bb),
            (vec![3, 17], vec![30, 31]),
            "pending batches first, then fresh ones"
        );
        ready(&mut c, t0, a, 6);
        ready(&mut c, t0, b, 6);
        reduced(&mut c, t0, a, 6, 1);
        reduced(&mut c, t0, b, 6, 1);
        assert_eq!(c.committed_position(), (7, 32, vec![]));
        // From now on the members hold the state; a newcomer gets it from them.
        let late = join(&mut c, t0, "w2");
        let Reply::Round { donor, .. } = next(&mut c, t0, late) else {
            panic!()
        };
        assert_eq!(donor.as_deref(), Some("w0:1"));
    }

    #[test]
    fn committed_position_ignores_batches_of_the_running_round() {
        let (mut c, t0) = coord(1, 10);
        let a = join(&mut c, t0, "w0");
        clean_round(&mut c, t0, &[a], 0);
        next(&mut c, t0, a);
        assert_eq!(c.committed_position(), (1, 2, vec![]));
    }

    fn voting(workers: &[&str]) -> (Coordinator, Instant, Vec<WorkerId>) {
        let opts = Options {
            failure_timeout: T,
            min_workers: workers.len(),
            batches_per_round: 2,
            budget_batches: 20 * workers.len() as u64,
            schedule_steps: 10,
            vote: true,
            max_corruption_flags: 2,
            max_rewinds: 2,
            damp_rounds: 3,
            outlier_ratio: None,
            audit_probability: 0.0,
            liveness: Liveness::Heartbeats,
            one_backend: false,
            round_bound: RoundBound::Fixed,
            batches_per_step: 1,
        };
        let t0 = Instant::now();
        let mut c = Coordinator::new(opts, 77, "job".into());
        let ws = workers.iter().map(|n| join(&mut c, t0, n)).collect();
        (c, t0, ws)
    }

    fn report(c: &mut Coordinator, t: Instant, w: WorkerId, next_round: u64, hash: &str) -> Reply {
        let state = Some(StateReport {
            next_round,
            blake3: hash.into(),
        });
        c.handle(t, Request::NextRound { worker: w, state })
    }

    #[test]
    fn an_outvoted_member_is_not_audited_while_it_takes_the_majority_s_state() {
        // Every round audited; over many run ids the draw would pick each member in turn.
        for run_id in 0..30 {
            let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
            c.run_id = run_id;
            c.opts.audit_probability = 1.0;
            clean_round(&mut c, t0, &ws, 0);
            report(&mut c, t0, ws[0], 1, "flipped");
            report(&mut c, t0, ws[1], 1, "good");
            // The last report settles the vote and opens round 1.
            let mut replies = vec![report(&mut c, t0, ws[2], 1, "good")];
            replies.extend([ws[0], ws[1]].map(|w| next(&mut c, t0, w)));
            let mut audited = None;
            for (reply, i) in replies.into_iter().zip([2, 0, 1]) {
                let Reply::Round { audited: a, .. } = reply else {
                    panic!("run {run_id}: {reply:?}")
                };
                if a {
                    audited = Some(i);
                }
            }
            assert!(audited.is_some(), "run {run_id}: the round is audited");
            assert_ne!(
                audited,
                Some(0),
                "run {run_id}: w0 serves its flipped state"
            );
        }
    }

    #[test]
    fn the_next_round_waits_for_every_replicas_state_then_quarantines_a_minority() {
        let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
        clean_round(&mut c, t0, &ws, 0);
        assert!(
            matches!(report(&mut c, t0, ws[0], 1, "good"), Reply::Wait { .. }),
            "w1, w2 not reported yet"
        );
        assert!(matches!(
            report(&mut c, t0, ws[2], 1, "flipped"),
            Reply::Wait { .. }
        ));
        let Reply::Round { donor, .. } = report(&mut c, t0, ws[1], 1, "good") else {
            panic!()
        };
        assert_eq!(donor, None);
        let events = c.drain_events();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Corruption { name, flags: 1, .. } if name == "w2")),
            "{events:?}"
        );
        // The minority replica heals from a majority member.
        let Reply::Round { donor, .. } = next(&mut c, t0, ws[2]) else {
            panic!()
        };
        assert_eq!(donor.as_deref(), Some("w0:1"));
        assert_eq!(c.corruption_flags().get("w2"), Some(&1));
    }

    /// `c` as a standby continues it: its record through JSON, as etcd keeps it.
    fn standby_of(c: &Coordinator, now: Instant) -> Coordinator {
        let json = serde_json::to_string(&c.durable()).unwrap();
        let d: Durable = serde_json::from_str(&json).unwrap();
        Coordinator::take_over(c.options().clone(), "job".into(), d, now)
    }

    #[test]
    fn a_takeover_carries_the_corruption_flags_and_a_rewinds_damping_on() {
        let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
        clean_round(&mut c, t0, &ws, 0);
        let before = c.durable_version();
        for (w, hash) in [(ws[0], "good"), (ws[1], "good"), (ws[2], "flipped")] {
            report(&mut c, t0, w, 1, hash);
        }
        assert!(c.durable_version() > before, "a flag is recorded at once");
        assert_eq!(standby_of(&c, t0).corruption_flags().get("w2"), Some(&1));

        let (mut c, t0) = coord(2, 20);
        let ws = [join(&mut c, t0, "w0"), join(&mut c, t0, "w1")];
        for round in 0..4 {
            round_with_rollbacks(&mut c, t0, &ws, round, &[1, 0]);
        }
        round_with_rollbacks(&mut c, t0, &ws, 4, &[1, 2]);
        assert_eq!(rewinds(&mut c), vec![(4, 3, 0.5, 8)]);
        let s = standby_of(&c, t0);
        assert_eq!(
            (3..9).map(|r| s.step_scale(r)).collect::<Vec<_>>(),
            [0.5, 0.5, 0.5, 0.5, 0.5, 1.0],
            "the standby damps the rounds the rewind damps"
        );
        // Without them in the record (one written before they were), none.
        let mut old = serde_json::to_value(c.durable()).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("rewinds");
        fields.remove("corruption_flags");
        let d: Durable = serde_json::from_value(old).unwrap();
        assert!(d.rewinds.is_empty() && d.corruption_flags.is_empty());
    }

    #[test]
    fn a_repeat_offender_is_removed_as_suspect_hardware() {
        let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
        for round in 0..2 {
            clean_round(&mut c, t0, &ws, round);
            report(&mut c, t0, ws[0], round + 1, "good");
            report(&mut c, t0, ws[1], round + 1, "good");
            report(&mut c, t0, ws[2], round + 1, &format!("bad{round}"));
        }
        let events = c.drain_events();
        assert!(events.iter().any(|e| matches!(e, Event::Removed { name, reason, .. } if name == "w2" && reason.contains("suspect hardware"))));
        assert_eq!(c.live_members(), 2);
    }

    #[test]
    fn two_disagreeing_replicas_undo_to_the_last_agreed_state() {
        let (mut c, t0, ws) = voting(&["w0", "w1"]);
        clean_round(&mut c, t0, &ws, 0);
        report(&mut c, t0, ws[0], 1, "same");
        report(&mut c, t0, ws[1], 1, "same");
        // Round 1 trains batches 4..8, then the two replicas disagree.
        for &w in &ws {
            ready(&mut c, t0, w, 1);
        }
        for &w in &ws {
            reduced(&mut c, t0, w, 1, 1);
        }
        assert_eq!(c.committed_rounds(), 2);
        report(&mut c, t0, ws[0], 2, "left");
        let Reply::Round {
            round,
            batches,
            donor,
            ..
        } = report(&mut c, t0, ws[1], 2, "right")
        else {
            panic!()
        };
        assert_eq!(round, 1, "round 1 is done again");
        assert_eq!(
            batches,
            vec![6, 7],
            "with the undone round's batches, in rank order"
        );
        assert_eq!(
            donor.as_deref(),
            Some("w0:1"),
            "every replica reloads the agreed state of round 1"
        );
        let events = c.drain_events();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::RoundsVoided { from: 1, to: 2, .. })),
            "{events:?}"
        );
        assert_eq!(c.committed_position(), (1, 8, vec![4, 5, 6, 7]));
        // Redone, the two agree; the stale reports of the undone state are not counted.
        for &w in &ws {
            next(&mut c, t0, w);
        }
        for &w in &ws {
            ready(&mut c, t0, w, 1);
        }
        for &w in &ws {
            reduced(&mut c, t0, w, 1, 1);
        }
        c.drain_events();
        assert!(matches!(
            report(&mut c, t0, ws[0], 2, "agreed"),
            Reply::Wait { .. }
        ));
        assert!(matches!(
            report(&mut c, t0, ws[1], 2, "agreed"),
            Reply::Round { round: 2, .. }
        ));
        assert!(
            !c.drain_events()
                .iter()
                .any(|e| matches!(e, Event::RoundsVoided { .. }))
        );
    }

    #[test]
    fn a_checkpoint_reads_only_a_state_the_majority_agreed_on() {
        let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
        clean_round(&mut c, t0, &ws, 0);
        assert_eq!(
            c.checkpoint_source(),
            None,
            "round 1's state is not voted yet"
        );
        report(&mut c, t0, ws[0], 1, "flipped");
        report(&mut c, t0, ws[1], 1, "good");
        assert_eq!(c.checkpoint_source(), None, "w2 has not reported");
        report(&mut c, t0, ws[2], 1, "good");
        let source = c.checkpoint_source().expect("voted");
        assert_eq!(source.agreed.as_deref(), Some("good"));
        assert_eq!(source.position, (1, 6, vec![]));
        assert_eq!(
            addrs(&source.peers),
            vec!["w1:1", "w2:1"],
            "never the outvoted replica, though it ranks first"
        );
        assert_eq!(source.peers[0].name, "w1");
    }

    #[test]
    fn without_the_vote_a_checkpoint_reads_any_synced_replica() {
        let (mut c, t0) = coord(2, 3);
        let ws = [join(&mut c, t0, "w0"), join(&mut c, t0, "w1")];
        clean_round(&mut c, t0, &ws, 0);
        report(&mut c, t0, ws[0], 1, "a");
        let source = c.checkpoint_source().expect("no vote to wait for");
        assert_eq!((source.agreed, source.peers.len()), (None, 2));
    }

    /// Runs the voting run of `ws` to its end, every replica reporting `hash(worker index)`
    /// for the final state.
    fn vote_to_the_end(c: &mut Coordinator, t0: Instant, ws: &[WorkerId], hash: &[&str]) {
        for round in 0..10 {
            clean_round(c, t0, ws, round);
            let last = round == 9;
            for (i, &w) in ws.iter().enumerate() {
                let h = if last { hash[i] } else { "same" };
                report(c, t0, w, round + 1, h);
            }
        }
    }

    #[test]
    fn the_final_state_is_voted_on_like_every_other() {
        let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
        vote_to_the_end(&mut c, t0, &ws, &["flipped", "good", "good"]);
        assert!(c.is_complete());
        let events = c.drain_events();
        assert!(
            events.iter().any(|e| matches!(e,
                Event::Corruption { name, next_round: 10, .. } if name == "w0")),
            "{events:?}"
        );
        let source = c.checkpoint_source().expect("voted");
        assert_eq!(
            (source.agreed.as_deref(), source.peers.len()),
            (Some("good"), 2)
        );

        // Two final replicas that disagree: the last round is done again.
        let (mut c, t0, ws) = voting(&["w0", "w1"]);
        vote_to_the_end(&mut c, t0, &ws, &["left", "right"]);
        assert!(!c.is_complete());
        let source = c.checkpoint_source().expect("round 9's state was agreed");
        assert_eq!(
            (source.position.0, source.agreed.as_deref()),
            (9, Some("same"))
        );
        assert!(matches!(
            next(&mut c, t0, ws[0]),
            Reply::Round { round: 9, .. }
        ));
    }

    #[test]
    fn an_outlying_contribution_is_voided_and_the_round_redone_without_it() {
        let (mut c, t0, ws) = voting(&["w0", "w1", "w2"]);
        c.opts.outlier_ratio = Some(8.0);
        let stats = |norm: f64, max_abs: f64| WorkerRoundStats {
            tokens: 10,
            fingerprint: Some(Fingerprint { norm, max_abs }),
            ..Default::default()
        };
        for &w in &ws {
            next(&mut c, t0, w);
        }
        for &w in &ws {
            ready(&mut c, t0, w, 0);
        }
        let honest = |c: &mut Coordinator, w| reduced_with(c, t0, w, (0, 1), stats(1.0, 0.01));
        honest(&mut c, ws[0]);
        honest(&mut c, ws[1]);
        // w2's contribution has one value blown up by a flipped exponent bit.
        let reply = reduced_with(&mut c, t0, ws[2], (0, 1), stats(1.0e12, 1.0e12));
        assert!(matches!(reply, Reply::Evicted { .. }));
        assert_eq!(
            c.committed_rounds(),
            0,
            "nothing of that attempt is applied"
        );
        assert!(matches!(honest(&mut c, ws[0]), Reply::Retry { .. }));
        let events = c.drain_events();
        assert!(
            events.iter().any(|e| matches!(e,
                Event::ContributionOutlier { round: 0, outlier } if outlier.name == "w2")),
            "{events:?}"
        );
        assert_eq!(c.corruption_flags().get("w2"), Some(&1));
        // The other two redo it; w2's batches wait in the pool for a later round.
        for &w in &ws[..2] {
            ready(&mut c, t0, w, 0);
        }
        for &w in &ws[..2] {
            reduced_with(&mut c, t0, w, (0, 2), stats(1.0, 0.01));
        }
        let record = committed(&mut c).pop().expect("round 0 committed");
        assert_eq!(record.quorum, 2);
        assert_eq!(c.committed_position(), (1, 6, vec![4, 5]));
    }

    /// A voting coordinator of `workers` that audits every round.
    fn auditing(workers: &[&str]) -> (Coordinator, Instant, Vec<WorkerId>) {
        let (mut c, t0, ws) = voting(workers);
        c.opts.audit_probability = 1.0;
        (c, t0, ws)
    }

    fn with_hashes(sent: &str, audit: Option<(&str, &str)>) -> WorkerRoundStats {
        WorkerRoundStats {
            tokens: 10,
            payload_blake3: Some(sent.into()),
            audit: audit.map(|(of, h)| AuditReport {
                of: of.into(),
                blake3: h.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_ddp_run_refuses_a_worker_on_another_backend_and_takes_one_on_its_own() {
        let (mut c, t0) = coord_judging(2, 1, Liveness::Heartbeats);
        c.opts.one_backend = true;
        let joining = |name: &str, backend: &str| Request::Join {
            name: name.into(),
            data_addr: format!("{name}:1"),
            held: None,
            backend: backend.into(),
            threads: 1,
        };
        assert!(matches!(
            c.handle(t0, joining("a", "Flex")),
            Reply::Welcome { .. }
        ));
        match c.handle(t0, joining("b", "NdArray")) {
            Reply::Evicted { reason } => {
                assert!(
                    reason.contains("run's backend, Flex; this one is on NdArray"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.members.len(), 1, "the refused worker is no member");
        assert!(matches!(
            c.handle(t0, joining("c", "Flex")),
            Reply::Welcome { .. }
        ));
        // DiLoCo mixes them: the outer step is host arithmetic in one order.
        c.opts.one_backend = false;
        assert!(matches!(
            c.handle(t0, joining("b", "NdArray")),
            Reply::Welcome { .. }
        ));
    }

    /// Who is audited, and by whom, in rounds 0..200 of members joined as `(name, backend)`.
    fn audits_of(members: &[(&str, &str)]) -> Vec<(String, [String; 2])> {
        let (mut c, t0, _) = auditing(&[]);
        let ids: Vec<WorkerId> = members
            .iter()
            .map(|(name, class)| join_as(&mut c, t0, name, class))
            .collect();
        let name = |c: &Coordinator, id: &WorkerId| c.members[id].name.clone();
        (0..200)
            .filter_map(|round| c.draw_audit(round, &ids))
            .map(|(of, [a, b])| (name(&c, &of), [name(&c, &a), name(&c, &b)]))
            .collect()
    }

    #[test]
    fn a_replay_audit_pairs_only_workers_that_replay_the_same_bits() {
        // Three flex workers and one on ndarray: only the flex ones audit or are audited.
        let mixed = audits_of(&[
            ("a", "flex"),
            ("b", "flex"),
            ("c", "ndarray"),
            ("d", "flex"),
        ]);
        assert!(mixed.len() > 100, "every round audits: {}", mixed.len());
        for (of, auditors) in &mixed {
            assert!(
                of != "c" && !auditors.contains(&"c".to_string()),
                "{of} by {auditors:?}"
            );
        }
        let audited: BTreeSet<&str> = mixed.iter().map(|(of, _)| of.as_str()).collect();
        assert_eq!(audited, BTreeSet::from(["a", "b", "d"]));
        // No class with three members: no audit at all.
        assert!(audits_of(&[("a", "flex"), ("b", "flex"), ("c", "ndarray")]).is_empty());
        // One class (older workers say none): the next two in rank order, as before.
        let same = audits_of(&[("a", ""), ("b", ""), ("c", "")]);
        for (of, auditors) in &same {
            let next = |k: usize| {
                ["a", "b", "c"][(["a", "b", "c"].iter().position(|n| n == of).unwrap() + k) % 3]
            };
            assert_eq!(auditors, &[next(1).to_string(), next(2).to_string()]);
        }
    }

    #[test]
    fn two_replays_against_one_contribution_void_it_and_remove_its_worker() {
        let (mut c, t0, ws) = auditing(&["w0", "w1", "w2"]);
        let tasks: Vec<Option<AuditTask>> = ws
            .iter()
            .map(|&w| match next(&mut c, t0, w) {
                Reply::Round { audit, .. } => audit,
                r => panic!("{r:?}"),
            })
            .collect();
        // One member is audited by the two others, from its own state and batches.
        let audited: Vec<&AuditTask> = tasks.iter().flatten().collect();
        assert_eq!(audited.len(), 2);
        assert_eq!(audited[0], audited[1]);
        let of = audited[0].of.clone();
        let of_id = ws[["w0", "w1", "w2"].iter().position(|n| *n == of).unwrap()];
        assert!(tasks[["w0", "w1", "w2"].iter().position(|n| *n == of).unwrap()].is_none());
        assert_eq!(audited[0].donor, format!("{of}:1"));
        for &w in &ws {
            ready(&mut c, t0, w, 0);
        }
        for &w in &ws {
            let stats = if w == of_id {
                with_hashes("corrupted", None)
            } else {
                with_hashes("mine", Some((&of, "replayed")))
            };
            reduced_with(&mut c, t0, w, (0, 1), stats);
        }
        assert_eq!(
            c.committed_rounds(),
            0,
            "the audited attempt is not applied"
        );
        let events = c.drain_events();
        assert!(
            events.iter().any(|e| matches!(e,
                Event::Audit { verdict: AuditVerdict::Failed, of: o, .. } if *o == of)),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Removed { name, .. } if *name == of))
        );
        // The other two redo the attempt (their stats, audit reports included, as before) and
        // it commits without the removed member's contribution.
        let others: Vec<WorkerId> = ws.iter().copied().filter(|&w| w != of_id).collect();
        for &w in &others {
            ready(&mut c, t0, w, 0);
        }
        for &w in &others {
            reduced_with(
                &mut c,
                t0,
                w,
                (0, 2),
                with_hashes("mine", Some((&of, "replayed"))),
            );
        }
        assert_eq!(committed(&mut c).pop().map(|r| r.quorum), Some(2));
    }

    #[test]
    fn an_audit_passes_on_agreement_and_is_inconclusive_after_a_guard_action() {
        for (guard_acted, want) in [
            (false, AuditVerdict::Passed),
            (true, AuditVerdict::Inconclusive),
        ] {
            let (mut c, t0, ws) = auditing(&["w0", "w1", "w2"]);
            let mut of = String::new();
            for &w in &ws {
                if let Reply::Round { audit: Some(t), .. } = next(&mut c, t0, w) {
                    of = t.of;
                }
            }
            for &w in &ws {
                ready(&mut c, t0, w, 0);
            }
            for (i, &w) in ws.iter().enumerate() {
                let mut stats = if ["w0", "w1", "w2"][i] == of {
                    with_hashes(if guard_acted { "skipped" } else { "h" }, None)
                } else {
                    with_hashes("mine", Some((&of, "h")))
                };
                stats.skipped_steps = u64::from(guard_acted && ["w0", "w1", "w2"][i] == of);
                reduced_with(&mut c, t0, w, (0, 1), stats);
            }
            assert_eq!(c.committed_rounds(), 1);
            let events = c.drain_events();
            assert!(
                events
                    .iter()
                    .any(|e| matches!(e, Event::Audit { verdict, .. } if *verdict == want)),
                "{events:?}"
            );
        }
        // Two members are too few to tell which of a pair is wrong: never audited.
        let (mut c, t0, ws) = auditing(&["w0", "w1"]);
        assert!(matches!(
            next(&mut c, t0, ws[0]),
            Reply::Round { audit: None, .. }
        ));
    }

    #[test]
    fn requests_from_strangers_are_answered_with_eviction() {
        let (mut c, t0) = coord(1, 1);
        for req in [
            Request::Heartbeat { worker: 99 },
            Request::NextRound {
                worker: 99,
                state: None,
            },
            Request::Ready {
                worker: 99,
                round: 0,
            },
            Request::Failed {
                worker: 99,
                round: 0,
                attempt: 1,
                error: String::new(),
            },
        ] {
            assert!(matches!(c.handle(t0, req), Reply::Evicted { .. }));
        }
    }

    fn join_holding(c: &mut Coordinator, now: Instant, name: &str, held: HeldState) -> WorkerId {
        let req = Request::Join {
            name: name.into(),
            data_addr: format!("{name}:1"),
            held: Some(held),
            backend: String::new(),
            threads: 0,
        };
        match c.handle(now, req) {
            Reply::Welcome { worker, .. } => worker,
            r => panic!("{r:?}"),
        }
    }

    fn holding(run_id: u64, next_round: u64) -> HeldState {
        HeldState {
            run_id,
            next_round,
            blake3: format!("h{next_round}"),
        }
    }

    /// Two rounds of a 2-worker run of 4 rounds, and a standby that took it over from what
    /// the leader recorded (read back as a standby reads it from etcd).
    fn taken_over() -> (Coordinator, Instant, Vec<RoundRecord>) {
        let (mut c, t0) = coord(2, 4);
        let (a, b) = (join(&mut c, t0, "w0"), join(&mut c, t0, "w1"));
        clean_round(&mut c, t0, &[a, b], 0);
        clean_round(&mut c, t0, &[a, b], 1);
        let before = committed(&mut c);
        let d = c.durable();
        assert_eq!((d.next_round, d.recent.len()), (2, 2));
        let d: Durable = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        let s = Coordinator::take_over(c.options().clone(), "job".into(), d, t0);
        (s, t0, before)
    }

    #[test]
    fn a_standby_takes_over_at_the_last_commit_and_commits_every_batch_once() {
        let (mut s, t0, before) = taken_over();
        let a = join_holding(&mut s, t0, "w0", holding(77, 2));
        assert!(
            matches!(next(&mut s, t0, a), Reply::Wait { .. }),
            "the first round waits for the minimum of workers to rejoin"
        );
        let b = join(&mut s, t0, "w1");
        let (
            Reply::Round {
                round, donor: da, ..
            },
            Reply::Round { donor: db, .. },
        ) = (next(&mut s, t0, a), next(&mut s, t0, b))
        else {
            panic!()
        };
        assert_eq!(round, 2);
        assert_eq!(
            (da.as_deref(), db.as_deref()),
            (None, Some("w0:1")),
            "the worker that held the committed state keeps it and serves it"
        );
        clean_round(&mut s, t0, &[a, b], 2);
        clean_round(&mut s, t0, &[a, b], 3);
        assert!(s.is_complete());
        let mut batches: Vec<u64> = (before.iter().chain(&committed(&mut s)))
            .flat_map(|r| r.members.iter().flat_map(|m| m.batches.clone()))
            .collect();
        batches.sort();
        assert_eq!(batches, (0..16).collect::<Vec<_>>(), "every batch once");
    }

    #[test]
    fn a_held_state_counts_only_for_the_same_run_and_its_committed_round() {
        let (mut s, t0, _) = taken_over();
        let other_run = join_holding(&mut s, t0, "w0", holding(99, 2));
        // Two rounds behind: a state nobody can continue from (one behind, see below, can be).
        let older = join_holding(&mut s, t0, "w1", holding(77, 0));
        let waiting = next(&mut s, t0, other_run);
        assert!(
            matches!(&waiting, Reply::Wait { reason } if reason.contains("round 2")),
            "{waiting:?}"
        );
        assert!(s.state_lost(), "nobody holds the committed state yet");
        let holder = join_holding(&mut s, t0, "w2", holding(77, 2));
        assert!(!s.state_lost());
        let Reply::Round { donor, .. } = next(&mut s, t0, older) else {
            panic!()
        };
        assert_eq!(donor.as_deref(), Some("w2:1"));
        let Reply::Round { donor, .. } = next(&mut s, t0, holder) else {
            panic!()
        };
        assert_eq!(donor, None);
    }

    #[test]
    fn after_a_failure_timeout_a_takeover_starts_with_the_holders_that_came_back() {
        let (mut s, t0, _) = taken_over();
        let a = join_holding(&mut s, t0, "w0", holding(77, 2));
        assert!(matches!(next(&mut s, t0, a), Reply::Wait { .. }));
        let later = t0 + T + Duration::from_millis(10);
        s.handle(t0 + T / 2, Request::Heartbeat { worker: a });
        let Reply::Round { round, quorum, .. } = next(&mut s, later, a) else {
            panic!()
        };
        assert_eq!((round, quorum), (2, 1));
    }

    #[test]
    fn the_durable_state_changes_with_every_commit_and_undo() {
        let (mut c, t0, ws) = voting(&["a", "b"]);
        let v0 = c.durable_version();
        clean_round(&mut c, t0, &ws, 0);
        let v1 = c.durable_version();
        assert_ne!(v0, v1);
        assert_eq!(c.durable().next_round, 1);
        // Two replicas that disagree, no majority: the round is undone.
        report(&mut c, t0, ws[0], 1, "x");
        report(&mut c, t0, ws[1], 1, "y");
        assert_ne!(c.durable_version(), v1);
        let d = c.durable();
        assert_eq!((d.next_round, d.recent.len()), (0, 0), "{d:?}");
        assert_eq!(d.pending_batches, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_worker_slow_in_most_of_its_recent_rounds_is_reported_once() {
        let (mut c, t0, ws) = voting(&["a", "b", "c"]);
        let mut reported = Vec::new();
        for round in 0..8 {
            // c takes four times a's time, but for round 2; b one and a half times.
            let c_s = if round == 2 { 1.0 } else { 4.0 };
            let stats: Vec<WorkerRoundStats> = [1.0, 1.5, c_s]
                .into_iter()
                .map(|compute_s| WorkerRoundStats {
                    tokens: 10,
                    compute_s,
                    ..Default::default()
                })
                .collect();
            round_reporting(&mut c, t0, &ws, round, &stats);
            for e in c.drain_events() {
                if let Event::SlowWorker {
                    name,
                    ratio,
                    rounds,
                } = e
                {
                    reported.push((round, name, ratio, rounds));
                }
            }
            for &w in &ws {
                report(&mut c, t0, w, round + 1, "same");
            }
        }
        // Slow in rounds 0, 1, 3, 4 and 5: reported at round 5's commit, and not again.
        // Its 2 s a batch against its peers' median (0.5 and 0.75: the upper, 0.75).
        assert_eq!(reported.len(), 1, "{reported:?}");
        let (at, name, ratio, rounds) = &reported[0];
        assert_eq!(
            (*at, name.as_str(), rounds.clone()),
            (5, "c", vec![0, 1, 3, 4, 5])
        );
        assert!((ratio - 8.0 / 3.0).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn replicas_that_part_the_same_way_every_time_stop_the_run_instead_of_looping() {
        let (mut c, t0, ws) = voting(&["a", "b"]);
        for attempt in 1..=NO_MAJORITY_LIMIT {
            assert_eq!(c.unstable(), None, "attempt {attempt}");
            clean_round(&mut c, t0, &ws, 0);
            report(&mut c, t0, ws[0], 1, "flex bits");
            report(&mut c, t0, ws[1], 1, "ndarray bits");
        }
        let why = c.unstable().expect("the third undo to round 0 in a row");
        assert!(why.contains("3 times in a row"), "{why}");
        assert!(
            c.drain_events()
                .iter()
                .any(|e| matches!(e, Event::RunUnstable { rounds, .. } if *rounds == vec![0])),
        );
        // Two undos, then agreement: the count starts afresh for the next undo.
        let (mut c, t0, ws) = voting(&["a", "b"]);
        let vote = |c: &mut Coordinator, next_round: u64, hashes: [&str; 2]| {
            report(c, t0, ws[0], next_round, hashes[0]);
            report(c, t0, ws[1], next_round, hashes[1]);
        };
        for _ in 0..2 {
            clean_round(&mut c, t0, &ws, 0);
            vote(&mut c, 1, ["x", "y"]);
        }
        clean_round(&mut c, t0, &ws, 0);
        vote(&mut c, 1, ["same", "same"]);
        for _ in 0..2 {
            clean_round(&mut c, t0, &ws, 1);
            vote(&mut c, 2, ["x", "y"]);
        }
        assert_eq!(c.unstable(), None);
    }

    #[test]
    fn a_commit_recorded_but_never_heard_of_is_undone_after_a_takeover() {
        let (mut s, t0, before) = taken_over();
        // The last leader recorded round 1's commit and died before telling anyone: the
        // workers come back holding the state that starts round 1.
        let a = join_holding(&mut s, t0, "w0", holding(77, 1));
        let b = join_holding(&mut s, t0, "w1", holding(77, 1));
        let (
            Reply::Round {
                round,
                donor: da,
                batches: ba,
                ..
            },
            Reply::Round { donor: db, .. },
        ) = (next(&mut s, t0, a), next(&mut s, t0, b))
        else {
            panic!()
        };
        assert_eq!(
            (round, da, db),
            (1, None, None),
            "both carry on from what they hold"
        );
        assert_eq!(
            ba, before[1].members[0].batches,
            "round 1's batches are trained again"
        );
        let voided: Vec<(u64, u64)> = (s.drain_events().into_iter())
            .filter_map(|e| match e {
                Event::RoundsVoided { from, to, .. } => Some((from, to)),
                _ => None,
            })
            .collect();
        assert_eq!(voided, vec![(1, 2)]);
        assert_eq!(s.durable().next_round, 1);
        for r in 1..4 {
            clean_round(&mut s, t0, &[a, b], r);
        }
        assert!(s.is_complete());
        let mut batches: Vec<u64> = (before[..1].iter().chain(&committed(&mut s)))
            .flat_map(|r| r.members.iter().flat_map(|m| m.batches.clone()))
            .collect();
        batches.sort();
        assert_eq!(batches, (0..16).collect::<Vec<_>>(), "every batch once");
    }

    /// A coordinator whose rounds close `round` after they start, with `grace`.
    fn timed(workers: usize, round_s: u64, grace_s: u64) -> (Coordinator, Instant) {
        let (mut c, t0) = coord(workers, 100);
        // Long enough that members asking seconds apart stay members between their asks.
        c.opts.failure_timeout = Duration::from_secs(60);
        c.opts.round_bound = RoundBound::Time {
            round: Duration::from_secs(round_s),
            grace: Duration::from_secs(grace_s),
        };
        (c, t0)
    }

    fn ask(c: &mut Coordinator, now: Instant, w: WorkerId, round: u64) -> Vec<u64> {
        match c.handle(now, Request::Batches { worker: w, round }) {
            Reply::Batches { batches, .. } => batches,
            r => panic!("{r:?}"),
        }
    }

    /// Asks for `w`'s batches every `every` from `t0` until the round closes to it; returns
    /// them, the first step's included, and when it was closed.
    fn pull_all(
        c: &mut Coordinator,
        (t0, every): (Instant, Duration),
        w: WorkerId,
        first: Vec<u64>,
    ) -> (Vec<u64>, Instant) {
        let (mut got, mut now) = (first, t0);
        loop {
            now += every;
            let more = ask(c, now, w, 0);
            if more.is_empty() {
                return (got, now);
            }
            got.extend(more);
        }
    }

    fn first_batches(reply: Reply) -> (Vec<u64>, bool) {
        match reply {
            Reply::Round {
                batches, on_demand, ..
            } => (batches, on_demand),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_timed_round_hands_a_faster_member_more_batches_and_each_batch_once() {
        let (mut c, t0) = timed(2, 10, 5);
        let (fast, slow) = (join(&mut c, t0, "fast"), join(&mut c, t0, "slow"));
        let (f0, on_demand) = first_batches(next(&mut c, t0, fast));
        assert!(on_demand && f0.len() == 1);
        let (s0, _) = first_batches(next(&mut c, t0, slow));
        // Interleaved in time: the slow one's asks come every 4 s, the fast one's every 1 s.
        let (slow_got, slow_closed) = pull_all(&mut c, (t0, Duration::from_secs(4)), slow, s0);
        let (fast_got, fast_closed) = pull_all(&mut c, (t0, Duration::from_secs(1)), fast, f0);
        assert_eq!(
            fast_got.len(),
            10,
            "one batch a second for 10 s: {fast_got:?}"
        );
        // The slow one asks at 4 s and 8 s: from 8 s a 4 s step ends 2 s past the deadline, no
        // farther than the 2 s before it, so it is handed out; at 12 s the round is closed.
        assert_eq!(slow_got.len(), 3, "{slow_got:?}");
        assert!(fast_closed <= t0 + Duration::from_secs(10));
        assert!(slow_closed <= t0 + Duration::from_secs(12));
        assert!(ask(&mut c, t0, fast, 0).is_empty(), "closed stays closed");
        let now = t0 + Duration::from_secs(12);
        ready(&mut c, now, fast, 0);
        let Reply::Ring { attempt, .. } = ready(&mut c, now, slow, 0) else {
            panic!("both ready")
        };
        reduced(&mut c, now, fast, 0, attempt);
        assert_eq!(
            reduced(&mut c, now, slow, 0, attempt),
            Reply::Commit { round: 0 }
        );
        let record = committed(&mut c).remove(0);
        let trained: Vec<(String, usize)> = (record.members.iter())
            .map(|m| (m.name.clone(), m.batches.len()))
            .collect();
        assert_eq!(trained, [("fast".into(), 10), ("slow".into(), 3)]);
        let mut all: Vec<u64> = record.batches().collect();
        all.sort();
        assert_eq!(
            all,
            (0..13).collect::<Vec<_>>(),
            "each batch once, none skipped"
        );
    }

    #[test]
    fn a_timed_round_stops_handing_a_member_steps_that_would_end_far_past_its_deadline() {
        let (mut c, t0) = timed(1, 10, 5);
        let w = join(&mut c, t0, "w");
        next(&mut c, t0, w);
        let at = |s: u64| t0 + Duration::from_millis(s);
        assert_eq!(
            ask(&mut c, at(6000), w, 0).len(),
            1,
            "first ask: speed unknown"
        );
        // Its last step took 3 s: one more from 9 s would end at 12 s, 2 s past; refused.
        assert!(ask(&mut c, at(9000), w, 0).is_empty());
    }

    #[test]
    fn a_member_not_ready_past_a_timed_rounds_grace_is_removed_and_its_batches_go_back() {
        let (mut c, t0) = timed(2, 10, 5);
        let (a, b) = (join(&mut c, t0, "a"), join(&mut c, t0, "b"));
        let (first_a, _) = first_batches(next(&mut c, t0, a));
        let (stuck, _) = first_batches(next(&mut c, t0, b));
        let (got_a, _) = pull_all(&mut c, (t0, Duration::from_secs(2)), a, first_a);
        let late = t0 + Duration::from_secs(14);
        c.handle(late, Request::Heartbeat { worker: b });
        assert!(matches!(ready(&mut c, late, a, 0), Reply::Wait { .. }));
        let past = t0 + Duration::from_secs(15);
        c.handle(past, Request::Heartbeat { worker: b });
        let removed = c.drain_events().into_iter().find_map(|e| match e {
            Event::Removed { name, reason, .. } => Some((name, reason)),
            _ => None,
        });
        let (name, reason) = removed.expect("b removed");
        assert_eq!(name, "b");
        assert!(reason.contains("past its deadline and grace"), "{reason}");
        let Reply::Ring { attempt, .. } = ready(&mut c, past, a, 0) else {
            panic!("a alone is the ring")
        };
        assert_eq!(
            reduced(&mut c, past, a, 0, attempt),
            Reply::Commit { round: 0 }
        );
        let (again, _) = first_batches(next(&mut c, past, a));
        assert_eq!(again, stuck, "b's batch goes back to the pool first");
        assert!(!got_a.contains(&stuck[0]));
    }

    #[test]
    fn a_member_removed_mid_round_leaves_its_batches_to_those_still_asking() {
        let (mut c, t0) = timed(2, 10, 5);
        let (a, b) = (join(&mut c, t0, "a"), join(&mut c, t0, "b"));
        next(&mut c, t0, a);
        let (of_b, _) = first_batches(next(&mut c, t0, b));
        c.handle(t0, Request::Leave { worker: b });
        assert_eq!(ask(&mut c, t0 + Duration::from_secs(1), a, 0), of_b);
    }

    #[test]
    fn a_counted_round_closes_once_its_batches_are_handed_out() {
        let (mut c, t0) = coord(2, 100);
        c.opts.failure_timeout = Duration::from_secs(60);
        c.opts.round_bound = RoundBound::Batches { batches: 5 };
        let (a, b) = (join(&mut c, t0, "a"), join(&mut c, t0, "b"));
        let (fa, _) = first_batches(next(&mut c, t0, a));
        let (fb, _) = first_batches(next(&mut c, t0, b));
        let (got_a, _) = pull_all(&mut c, (t0, Duration::from_secs(1)), a, fa);
        let (got_b, _) = pull_all(&mut c, (t0, Duration::from_secs(1)), b, fb);
        assert_eq!((got_a.len(), got_b.len()), (4, 1));
    }

    #[test]
    fn an_audited_member_of_an_on_demand_round_gets_its_share_up_front_once_its_speed_is_known() {
        let (mut c, t0) = timed(3, 10, 5);
        c.opts.audit_probability = 1.0;
        let ws: Vec<WorkerId> = ["a", "b", "c"]
            .iter()
            .map(|n| join(&mut c, t0, n))
            .collect();
        let replies: Vec<Reply> = ws.iter().map(|&w| next(&mut c, t0, w)).collect();
        for r in &replies {
            let Reply::Round {
                audit, on_demand, ..
            } = r
            else {
                panic!("{r:?}")
            };
            assert!(on_demand, "no speed known: not audited");
            assert_eq!(*audit, None);
        }
        let now = t0 + Duration::from_secs(10);
        let mut attempt = 0;
        for &w in &ws {
            if let Reply::Ring { attempt: at, .. } = ready(&mut c, now, w, 0) {
                attempt = at;
            }
        }
        for &w in &ws {
            let stats = WorkerRoundStats {
                compute_s: 10.0,
                ..Default::default()
            };
            reduced_with(&mut c, now, w, (0, attempt), stats);
        }
        assert_eq!(c.committed_rounds(), 1);
        // Each trained one batch in 10 s: a share of one.
        let replies: Vec<Reply> = ws.iter().map(|&w| next(&mut c, now, w)).collect();
        let audited: Vec<(bool, usize)> = (replies.iter())
            .filter_map(|r| match r {
                Reply::Round {
                    audited: true,
                    on_demand,
                    batches,
                    ..
                } => Some((*on_demand, batches.len())),
                _ => None,
            })
            .collect();
        assert_eq!(audited, [(false, 1)], "it cannot ask as it trains");
        let tasks: Vec<&AuditTask> = (replies.iter())
            .filter_map(|r| match r {
                Reply::Round { audit, .. } => audit.as_ref(),
                _ => None,
            })
            .collect();
        assert_eq!(tasks.len(), 2);
    }

    /// An on-demand round in which `a` trains 16 batches and `b` one, reporting per-batch
    /// fingerprints of norm 1 and `b_norm`: whether `b` was judged an outlier.
    fn b_is_an_outlier(b_norm: f64) -> bool {
        let (mut c, t0) = timed(2, 100, 5);
        c.opts.outlier_ratio = Some(8.0);
        let (a, b) = (join(&mut c, t0, "a"), join(&mut c, t0, "b"));
        let (first, _) = first_batches(next(&mut c, t0, a));
        next(&mut c, t0, b);
        let mut got = first;
        while got.len() < 16 {
            got.extend(ask(&mut c, t0 + Duration::from_secs(1), a, 0));
        }
        ready(&mut c, t0, b, 0);
        let Reply::Ring { attempt, .. } = ready(&mut c, t0, a, 0) else {
            panic!("both ready")
        };
        let stats = |norm: f64| WorkerRoundStats {
            fingerprint: Some(Fingerprint { norm, max_abs: 0.1 }),
            ..Default::default()
        };
        reduced_with(&mut c, t0, a, (0, attempt), stats(1.0));
        reduced_with(&mut c, t0, b, (0, attempt), stats(b_norm));
        let events = c.drain_events();
        events
            .iter()
            .any(|e| matches!(e, Event::ContributionOutlier { outlier, .. } if outlier.name == "b"))
    }

    #[test]
    fn members_that_trained_different_amounts_are_judged_with_room_for_it() {
        // 16 batches against 1: per batch, honest progress may differ by √16 = 4 more.
        assert!(!b_is_an_outlier(20.0), "20× is within 8 × 4");
        assert!(b_is_an_outlier(1000.0));
    }

    #[test]
    fn a_member_retrying_an_aborted_attempt_after_the_grace_is_not_late() {
        let (mut c, t0) = timed(2, 10, 5);
        let (a, b) = (join(&mut c, t0, "a"), join(&mut c, t0, "b"));
        next(&mut c, t0, a);
        next(&mut c, t0, b);
        let at = t0 + Duration::from_secs(9);
        ready(&mut c, at, a, 0);
        let Reply::Ring { attempt, .. } = ready(&mut c, at, b, 0) else {
            panic!("both ready")
        };
        let past = t0 + Duration::from_secs(16);
        let failed = Request::Failed {
            worker: a,
            round: 0,
            attempt,
            error: "ring broke".into(),
        };
        assert!(matches!(c.handle(past, failed), Reply::Retry { .. }));
        c.handle(past, Request::Heartbeat { worker: b });
        assert_eq!(c.live_members(), 2, "{:?}", c.drain_events());
        ready(&mut c, past, a, 0);
        assert!(matches!(ready(&mut c, past, b, 0), Reply::Ring { .. }));
    }
}
