//! A worker of a multi-worker run: joins the coordinator, trains its assigned batches, takes
//! part in each round's collective, and applies a round only when the coordinator says it
//! committed. When it is told it left the quorum (it hung, or its link did) it rejoins and
//! takes the committed state from a healthy peer — no checkpoint file involved.
//!
//! The parts: [`RoundClient`] speaks the protocol (cluster), a [`SyncStrategy`] decides what
//! the replica contributes and how it applies the result (DiLoCo or DDP), and the guarded
//! step ([`GuardedStep`]) is the single-worker one. [`session`] only strings them together.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::Device;
use std::sync::Arc;

use holdfast_cluster::coordinator::{
    AuditReport, AuditTask, HeldState, StateReport, WorkerRoundStats,
};
use holdfast_cluster::fingerprint::{Fingerprint, payload_hash};
use holdfast_cluster::membership::{CoordinatorConnector, MembershipConnector};
use holdfast_cluster::mesh::Quantized;
use holdfast_cluster::peer::Snapshot;
use holdfast_cluster::quant::Precision as WirePrecision;
use holdfast_cluster::round::{
    Assignment, JoinOptions, Joined, Next, ProtocolError, RoundClient, Synced,
};
use holdfast_cluster::wire::Auth;
use holdfast_model::weights::param_specs;

use crate::chaos::NumberFaults;
use crate::config::Precision;
use crate::guarded::GuardedStep;
use crate::replica::Replica;
use crate::run::{Prepared, prepare_data};
use crate::sync::feedback::ErrorFeedback;
use crate::sync::{Contribution, RoundWork, SyncStrategy, strategy};
use crate::{RunConfig, TrainError};

const POLL: Duration = Duration::from_millis(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for a state transfer's handshake and each of its frames.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub coordinator: CoordinatorAt,
    /// Stable name: ranks are ordered by it, and a restarted worker with the same name
    /// replaces its old incarnation at once.
    pub name: String,
    pub secret: Vec<u8>,
    /// Address to listen on for peers; by default the interface that reaches the coordinator.
    pub listen_ip: Option<String>,
    pub device: Device,
    pub cache_dir: PathBuf,
    /// Chaos: run this many times slower (1 = normal).
    pub slow_factor: f64,
    /// Chaos: numeric faults this worker injects into its own training.
    pub faults: NumberFaults,
}

/// Where a worker finds its coordinator.
#[derive(Clone, Debug)]
pub enum CoordinatorAt {
    /// At this address, always.
    Address(String),
    /// Whichever coordinator leads run `run` in this etcd cluster, looked up at every join.
    Etcd { endpoints: Vec<String>, run: String },
}

fn connector(at: &CoordinatorAt, auth: &Auth) -> Result<Box<dyn MembershipConnector>, TrainError> {
    Ok(match at {
        CoordinatorAt::Address(addr) => Box::new(CoordinatorConnector {
            addr: addr.clone(),
            auth: auth.clone(),
            timeout: CONNECT_TIMEOUT,
        }),
        #[cfg(feature = "etcd")]
        CoordinatorAt::Etcd { endpoints, run } => {
            Box::new(holdfast_cluster::membership::EtcdConnector {
                endpoints: endpoints.clone(),
                run: run.clone(),
                auth: auth.clone(),
                timeout: CONNECT_TIMEOUT,
            })
        }
        #[cfg(not(feature = "etcd"))]
        CoordinatorAt::Etcd { .. } => return Err(TrainError::Config(WITHOUT_ETCD.into())),
    })
}

/// Why `--etcd` is refused by a build without the `etcd` feature.
pub const WITHOUT_ETCD: &str = "this holdfast was built without etcd support; build it with `cargo build --release --features etcd` (needs protoc: Debian's protobuf-compiler)";

/// The committed state this worker published last, kept across sessions: a coordinator that
/// takes over (or the same one, after a lost connection) counts the worker as one of its
/// holders instead of having it fetch a state it has.
struct Held {
    state: HeldState,
    snapshot: Arc<Snapshot>,
}

enum SessionEnd {
    Finished,
    Evicted(String),
}

impl From<ProtocolError> for TrainError {
    fn from(e: ProtocolError) -> Self {
        TrainError::Cluster(e.to_string())
    }
}

/// Runs until the coordinator says the run is finished. Errors when the coordinator is gone
/// or refuses this worker.
pub fn run_worker(o: &WorkerOptions) -> Result<(), TrainError> {
    let auth = Auth::new(&o.secret).map_err(|e| TrainError::Cluster(e.to_string()))?;
    let membership = connector(&o.coordinator, &auth)?;
    let mut held: Option<Held> = None;
    let mut prepared: Option<(RunConfig, Prepared)> = None;
    // Injected faults fire once each, whatever rounds are retried or redone.
    let mut faults = o.faults.clone();
    let mut contact = Contact::default();
    // Training is bit-reproducible for a backend and thread count, so a replay audit of this
    // worker needs auditors on the same.
    let backend = format!("{:?}", o.device);
    loop {
        let join = JoinOptions {
            name: &o.name,
            auth: &auth,
            listen_ip: o.listen_ip.as_deref(),
            peer_timeout: PEER_TIMEOUT,
            held: held.as_ref().map(|h| h.state.clone()),
            backend: &backend,
            threads: crate::run::compute_threads(),
        };
        let ended = RoundClient::join(membership.as_ref(), &join)
            .map_err(TrainError::from)
            .and_then(|joined| {
                contact.joined();
                session(o, joined, &mut prepared, &mut faults, &mut held)
            });
        match ended {
            Ok(SessionEnd::Finished) => return Ok(()),
            Ok(SessionEnd::Evicted(reason)) => {
                tracing::warn!("{}: out of the quorum ({reason}); rejoining", o.name);
            }
            Err(e) => {
                contact.lost(e, std::time::Instant::now())?;
                std::thread::sleep(REJOIN_EVERY);
            }
        }
    }
}

/// How long a worker that has been a member goes on trying to rejoin a coordinator it lost
/// (a partition, or the coordinator restarting) before it gives up.
const REJOIN_PATIENCE: Duration = Duration::from_secs(60);
const REJOIN_EVERY: Duration = Duration::from_millis(500);

/// Whether losing the coordinator ends the worker: at once before it ever joined (a wrong
/// address or secret will not mend), else after [`REJOIN_PATIENCE`] without a successful join.
#[derive(Default)]
struct Contact {
    ever_joined: bool,
    lost_since: Option<std::time::Instant>,
}

impl Contact {
    fn joined(&mut self) {
        (self.ever_joined, self.lost_since) = (true, None);
    }

    /// A session or a join ended with `e` at `now`: `e` back when the worker should give up. Only the cluster's own failures (an
    /// unreachable or vanished coordinator) are retried; bad data or config are not.
    fn lost(&mut self, e: TrainError, now: std::time::Instant) -> Result<(), TrainError> {
        let since = *self.lost_since.get_or_insert(now);
        let transient = matches!(e, TrainError::Cluster(_));
        if !self.ever_joined || !transient || now.duration_since(since) > REJOIN_PATIENCE {
            return Err(e);
        }
        tracing::warn!("lost the coordinator ({e}); rejoining");
        Ok(())
    }
}

/// The job's config and data, prepared once and kept across rejoins.
fn prepare<'p>(
    prepared: &'p mut Option<(RunConfig, Prepared)>,
    job: &str,
    o: &WorkerOptions,
) -> Result<&'p (RunConfig, Prepared), TrainError> {
    let cfg = RunConfig::from_toml_str(job, "job from the coordinator")?;
    if prepared.as_ref().is_none_or(|(c, _)| *c != cfg) {
        let data = prepare_data(&cfg, &o.cache_dir, None)?;
        *prepared = Some((cfg, data));
    }
    Ok(prepared.as_ref().expect("prepared above"))
}

/// From join to the run's end or this worker's eviction: next round → take a state if told
/// to → contribute → sync → apply → publish.
fn session(
    o: &WorkerOptions,
    Joined { mut client, job }: Joined,
    prepared: &mut Option<(RunConfig, Prepared)>,
    faults: &mut NumberFaults,
    held: &mut Option<Held>,
) -> Result<SessionEnd, TrainError> {
    let (cfg, data) = prepare(prepared, &job, o)?;
    crate::set_flush_denormals(cfg.train.flush_denormals);
    tracing::info!("{} joined as worker {}", o.name, client.worker());
    let strategy = strategy(cfg, &param_specs(&data.model));
    let mut stepper = GuardedStep::new(cfg.guard.clone(), faults);
    let mut replica = take_held(&client, held, data, &o.device)?;
    let mut report: Option<StateReport> = None;
    let quantized = quantized(cfg.sync.precision);
    // What the steps that overlapped the last round's sync did: reported with this round.
    let mut overlapped = Contribution::default();
    loop {
        *held = holding(&client, replica.as_ref(), report.as_ref(), held.take());
        let a = match client.next_round(report.take())? {
            Next::Round(a) => a,
            Next::Finished => return Ok(SessionEnd::Finished),
            Next::Evicted(reason) => return Ok(SessionEnd::Evicted(reason)),
        };
        let fresh = || {
            Replica::fresh(
                &data.model,
                cfg.train.seed,
                &o.device,
                strategy.has_velocity(),
            )
        };
        let holder = Holder {
            name: &o.name,
            fragments: strategy.fragments(),
            with_local: strategy.keeps_local_weights(),
        };
        let r = match take_state(&client, &mut replica, &a, data, &o.device, fresh, &holder) {
            Taken::Ready(r) => r,
            Taken::TryAgain => continue,
            Taken::Stale(reason) => return Ok(SessionEnd::Evicted(reason)),
        };
        let work = RoundWork {
            round: a.round,
            data: &data.dataset,
            train: &cfg.train,
            batches: &a.batches,
            more: None,
            by_batches: cfg.sync.on_demand(),
            first_step: a.first_step,
            step_scale: a.step_scale,
            slow_factor: o.slow_factor,
        };
        // An audit first: in an on-demand round its time comes out of this worker's own
        // share, not after the round's deadline.
        let audit = a.audit.as_ref().and_then(|task| {
            let replayed = replay(&client, task, &a, cfg, data, &o.device, strategy.as_ref());
            replayed
                .inspect_err(|e| tracing::warn!("round {}: audit of {}: {e}", a.round, task.of))
                .ok()
        });
        let mut contribution = {
            let asking = RefCell::new(&mut client);
            let ask = || ask_for_batches(&asking, a.round);
            let work = RoundWork {
                more: a.on_demand.then_some(&ask as &dyn Fn() -> Vec<u64>),
                ..work
            };
            strategy.contribute(r, &work, &mut stepper)
        };
        corrupt_if_planned(stepper.faults(), &mut contribution.payload, a.round);
        let fragment = strategy.fragment_of(a.round);
        let sent = sendable(
            &mut r.feedback[fragment],
            &contribution.payload,
            quantized.is_some(),
        );
        let stats = round_stats(&contribution, &sent, a.audited, audit);
        let synced = sync_overlapping(
            &mut client,
            &a,
            (sent.values(), quantized, stats),
            &mut overlapped,
            || strategy.overlap(r, &work, &mut stepper, &contribution),
        );
        let sum = match synced? {
            Synced::Committed { sum, residual, .. } => {
                r.feedback[fragment].commit(residual);
                sum
            }
            Synced::Evicted(reason) => return Ok(SessionEnd::Evicted(reason)),
        };
        if !strategy.apply(r, sum, &work) {
            tracing::warn!("round {}: no replica made progress; no outer step", a.round);
        }
        r.next_round = a.round + 1;
        flip_a_bit_if_planned(stepper.faults(), r, a.round);
        report = Some(publish(&client, r, holder.with_local));
    }
}

/// The next step's batches of on-demand round `round`. A failed ask closes the round here:
/// the sync that follows meets the same failure and deals with it.
fn ask_for_batches(client: &RefCell<&mut RoundClient>, round: u64) -> Vec<u64> {
    (client.borrow_mut().more_batches(round)).unwrap_or_else(|e| {
        tracing::warn!("round {round}: asking for batches: {e}");
        Vec::new()
    })
}

/// The replica kept from the last session, served again from this one's peer endpoint; none
/// when this session is another run's (a coordinator restarted from a checkpoint).
fn take_held(
    client: &RoundClient,
    held: &mut Option<Held>,
    data: &Prepared,
    device: &Device,
) -> Result<Option<Replica>, TrainError> {
    let Some(h) = held.take().filter(|h| h.state.run_id == client.run_id()) else {
        return Ok(None);
    };
    let r = Replica::decode(
        &h.snapshot.bytes,
        &data.model,
        device,
        "its own earlier state",
    )?;
    client.republish(h.snapshot.clone());
    *held = Some(h);
    Ok(Some(r))
}

/// What to keep of this session if it ends now: the newest state served, when it is the
/// replica's (a replica in the middle of a round has moved past it, but the state it serves
/// is still the committed one it started from). `report` or `previous` spare hashing it again.
fn holding(
    client: &RoundClient,
    replica: Option<&Replica>,
    report: Option<&StateReport>,
    previous: Option<Held>,
) -> Option<Held> {
    let snapshot = client.newest_published()?;
    if let Some(p) = previous.filter(|p| Arc::ptr_eq(&p.snapshot, &snapshot)) {
        return Some(p);
    }
    let r = replica.filter(|r| r.next_round == snapshot.next_round)?;
    let blake3 = match report {
        Some(s) if s.next_round == r.next_round => s.blake3.clone(),
        _ => r.state_hash(),
    };
    Some(Held {
        state: HeldState {
            run_id: client.run_id(),
            next_round: r.next_round,
            blake3,
        },
        snapshot,
    })
}

/// How this worker holds a replica.
struct Holder<'a> {
    /// Its name: the owner of the states it publishes.
    name: &'a str,
    /// The strategy's fragments, one error feedback each.
    fragments: usize,
    /// Whether its local weights may differ from the outer ones and travel with its state.
    with_local: bool,
}

enum Taken<'r> {
    Ready(&'r mut Replica),
    /// The donor could not serve it (it may have died); the coordinator names another.
    TryAgain,
    /// This worker holds another round's state: it must rejoin.
    Stale(String),
}

/// The state that starts the round: the donor's when the coordinator names one, else the one
/// held (or the seeded initial state), made this worker's own (a state taken from another
/// comes without its residuals: see `feedback`). A state taken here is also published: a
/// rewind may need it once newer ones exist.
fn take_state<'r>(
    client: &RoundClient,
    replica: &'r mut Option<Replica>,
    a: &Assignment,
    data: &Prepared,
    device: &Device,
    fresh: impl FnOnce() -> Replica,
    holder: &Holder,
) -> Taken<'r> {
    let mut acquired = replica.is_none();
    if let Some(donor) = &a.donor {
        match fetch_replica(client, donor, a.round, data, device) {
            Ok(r) => {
                *replica = Some(r);
                acquired = true;
            }
            Err(e) => {
                tracing::warn!("live recovery from {donor} failed: {e}");
                std::thread::sleep(POLL);
                return Taken::TryAgain;
            }
        }
    }
    let r = replica.get_or_insert_with(fresh);
    if r.next_round != a.round {
        return Taken::Stale(format!(
            "holds the state of round {}, asked to run round {}",
            r.next_round, a.round
        ));
    }
    r.make_own(holder.name, holder.fragments);
    if acquired {
        client.publish(a.round, r.encode(holder.with_local));
    }
    Taken::Ready(r)
}

fn fetch_replica(
    client: &RoundClient,
    donor: &str,
    round: u64,
    data: &Prepared,
    device: &Device,
) -> Result<Replica, TrainError> {
    let bytes = client.fetch_state(donor, round, Replica::encoded_bound(&data.model))?;
    let r = Replica::decode(&bytes, &data.model, device, donor)?;
    if r.next_round != round {
        return Err(TrainError::Cluster(format!(
            "live recovery: {donor} sent round {}, wanted {round}",
            r.next_round
        )));
    }
    Ok(r)
}

/// A replay audit: `task.of`'s contribution this round, recomputed here from the state it
/// started from (fetched from its peer endpoint) and its batches, with no faults and no
/// slow-down of this worker's own; the hash of what it would have sent.
fn replay(
    client: &RoundClient,
    task: &AuditTask,
    a: &Assignment,
    cfg: &RunConfig,
    data: &Prepared,
    device: &Device,
    strategy: &dyn SyncStrategy,
) -> Result<AuditReport, TrainError> {
    let mut replica = fetch_replica(client, &task.donor, a.round, data, device)?;
    let work = RoundWork {
        round: a.round,
        data: &data.dataset,
        train: &cfg.train,
        batches: &task.batches,
        more: None,
        by_batches: cfg.sync.on_demand(),
        first_step: a.first_step,
        step_scale: a.step_scale,
        slow_factor: 1.0,
    };
    let mut no_faults = NumberFaults::default();
    let mut stepper = GuardedStep::new(cfg.guard.clone(), &mut no_faults);
    let replayed = strategy.contribute(&mut replica, &work, &mut stepper);
    Ok(AuditReport {
        of: task.of.clone(),
        blake3: payload_hash(&replayed.payload),
    })
}

/// How the values of a round travel: quantized ones on a mesh, with their weight (last) exact.
fn quantized(p: Precision) -> Option<Quantized> {
    let precision = match p {
        Precision::F32 => return None,
        Precision::Int8 => WirePrecision::Int8,
        Precision::Int4 => WirePrecision::Int4,
        Precision::E2m1 => WirePrecision::E2m1,
    };
    Some(Quantized {
        precision,
        exact_tail: 1,
    })
}

/// What a worker sends for its contribution.
enum Sent<'a> {
    /// The contribution itself (sync in `f32`).
    AsComputed(&'a [f32]),
    /// The contribution plus its residual (quantized sync).
    Compensated(Vec<f32>),
    /// A refusal (zeros, weight 0) in place of values that are not finite, which cannot be
    /// quantized.
    Refusal(Vec<f32>),
}

impl Sent<'_> {
    fn values(&self) -> &[f32] {
        match self {
            Sent::AsComputed(v) => v,
            Sent::Compensated(v) | Sent::Refusal(v) => v,
        }
    }
}

/// What this worker sends for `payload`: with quantized sync, the payload plus its residual.
fn sendable<'a>(feedback: &mut ErrorFeedback, payload: &'a [f32], quantized: bool) -> Sent<'a> {
    if !quantized {
        return Sent::AsComputed(payload);
    }
    if payload.iter().any(|v| !v.is_finite()) {
        tracing::warn!("a contribution that is not finite is sent as a refusal");
        // A refusal carries no residual: the residual waits for the next round.
        return Sent::Refusal(feedback.compensate(&vec![0.0; payload.len()]));
    }
    Sent::Compensated(feedback.compensate(payload))
}

/// What the coordinator hears of this worker's round besides the traffic: among it, the
/// fingerprint of the values it sends (per batch trained when they are weighed by batches;
/// their weight, last, left out; a refusal sent for values that are not finite is
/// fingerprinted as what it stands for), their hash when they are `audited` (before any
/// residual is added: that is what a replay recomputes), and its replay of another's
/// contribution when it audits one.
fn round_stats(
    c: &Contribution,
    sent: &Sent,
    audited: bool,
    audit: Option<AuditReport>,
) -> WorkerRoundStats {
    let fingerprinted = match sent {
        Sent::Refusal(_) => &c.payload,
        other => other.values(),
    };
    let (values, weight) = fingerprinted.split_at(fingerprinted.len().saturating_sub(1));
    let weight = weight.first().copied().unwrap_or(1.0);
    WorkerRoundStats {
        fingerprint: Some(Fingerprint::of(values).per_batch(weight)),
        payload_blake3: audited.then(|| payload_hash(&c.payload)),
        audit,
        tokens: c.tokens,
        loss: c.loss,
        compute_s: c.compute_s,
        skipped_steps: c.skipped_steps,
        rollbacks: c.rollbacks,
        ..Default::default()
    }
}

/// Syncs round `a` on a thread of its own while `overlap` trains the round's last steps here.
/// What those steps did is reported with the next round (`overlapped` carries it), so that
/// the commit need not wait for them — except in the run's last round, whose report waits:
/// no later one would carry them.
fn sync_overlapping(
    client: &mut RoundClient,
    a: &Assignment,
    (values, quantized, stats): (&[f32], Option<Quantized>, WorkerRoundStats),
    overlapped: &mut Contribution,
    overlap: impl FnOnce() -> Contribution,
) -> Result<Synced, ProtocolError> {
    let earlier = std::mem::take(overlapped);
    let (tail_tx, tail_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let sync = s.spawn(|| {
            // Moved in: a receiver is not shared between threads.
            let tail_rx = tail_rx;
            let add = move |stats: &mut WorkerRoundStats| {
                add_overlapped(stats, &earlier);
                if a.last
                    && let Ok(tail) = tail_rx.recv()
                {
                    add_overlapped(stats, &tail);
                }
            };
            client.sync(a.round, values, quantized, stats, add)
        });
        let tail = overlap();
        if a.last {
            // The sync may have ended without waiting for it (evicted): nobody to tell.
            let _ = tail_tx.send(tail);
        } else {
            *overlapped = tail;
        }
        sync.join().expect("the sync thread does not panic")
    })
}

/// Adds what steps that overlapped a sync did to a round's report. Their loss is not averaged
/// in (the report's is the mean of the steps before its contribution).
fn add_overlapped(stats: &mut WorkerRoundStats, o: &Contribution) {
    stats.tokens += o.tokens;
    stats.compute_s += o.compute_s;
    stats.skipped_steps += o.skipped_steps;
    stats.rollbacks += o.rollbacks;
}

/// Chaos: silent corruption in compute — one bit of one value this worker sends in `round`,
/// once (a retried or redone round sends a clean contribution).
fn corrupt_if_planned(faults: &mut NumberFaults, payload: &mut [f32], round: u64) {
    let Some(bit) = faults.take_sdc(round) else {
        return;
    };
    let values = payload.len().saturating_sub(1);
    if values == 0 {
        return;
    }
    // A value that moves: one a replica made no progress on is left alone.
    let start = (round as usize).wrapping_mul(7919) % values;
    let i = (start..values)
        .chain(0..start)
        .find(|&i| payload[i] != 0.0)
        .unwrap_or(start);
    let before = payload[i];
    payload[i] = f32::from_bits(before.to_bits() ^ (1 << bit));
    tracing::warn!(
        "chaos: flipped bit {bit} of value {i} of round {round}'s contribution ({before:e} → {:e})",
        payload[i]
    );
}

/// Chaos: silent data corruption of one parameter of this replica after `round`, once (a
/// round that is undone and redone is not corrupted again).
fn flip_a_bit_if_planned(faults: &mut NumberFaults, r: &mut Replica, round: u64) {
    if !faults.bitflip_after(round) {
        return;
    }
    faults.bitflip_rounds.retain(|&x| x != round);
    r.outer[0] = f32::from_bits(r.outer[0].to_bits() ^ (1 << 22));
    r.reset_local_to_outer();
    tracing::warn!("chaos: flipped a bit of parameter 0 after round {round}");
}

/// Serves the replica's new state to peers (`with_local`: see [`Replica::encode`]) and returns
/// what to report of it.
fn publish(client: &RoundClient, r: &Replica, with_local: bool) -> StateReport {
    client.publish(r.next_round, r.encode(with_local));
    StateReport {
        next_round: r.next_round,
        blake3: r.state_hash(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_that_lost_its_coordinator_rejoins_for_a_while_and_no_one_else_does() {
        let t0 = std::time::Instant::now();
        let gone = || TrainError::Cluster("coordinator: timed out".into());
        let mut c = Contact::default();
        assert!(c.lost(gone(), t0).is_err(), "never joined: a wrong address");
        c.joined();
        assert!(c.lost(gone(), t0).is_ok());
        assert!(c.lost(gone(), t0 + REJOIN_PATIENCE).is_ok());
        let late = t0 + REJOIN_PATIENCE + Duration::from_secs(1);
        assert!(c.lost(gone(), late).is_err(), "patience ran out");
        c.joined();
        assert!(c.lost(gone(), late).is_ok(), "a join starts it again");
        let bad = TrainError::Data("no such file".into());
        assert!(c.lost(bad, late).is_err(), "bad input does not mend");
    }
}
