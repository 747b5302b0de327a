//! The worker's half of the coordinator protocol: join, heartbeat, ask for the next round,
//! take part in its collective and learn whether it committed. The coordinator
//! ([`crate::coordinator`]) is the other half; both live here so that one crate owns the
//! protocol end to end.
//!
//! A round's sync is two-phase: `Ready` → the coordinator forms a ring (`Ring`) → all-reduce
//! → `Reduced` → `Commit` (apply it) or `Retry` (a member failed: go again on a re-formed
//! ring). Only a committed sum leaves [`RoundClient::sync`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::coordinator::{
    AuditTask, HeldState, Liveness, Reply, Request, StateReport, WorkerId, WorkerRoundStats,
};
use crate::membership::{Membership, MembershipConnector};
use crate::mesh::{Quantized, QuantizedSum, all_reduce_quantized};
use crate::peer::{PeerServer, Snapshot, fetch_state_from};
use crate::ring::{RingSpec, RingStats, all_reduce_sum};
use crate::wire::{Auth, WireError};

const POLL: Duration = Duration::from_millis(10);
/// How long a starting worker keeps trying to reach its coordinator.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// The protocol failed in a way retrying will not mend: the coordinator is gone, refused
/// this worker, or answered out of turn.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct ProtocolError {
    pub context: String,
    pub message: String,
}

fn protocol_error(context: &str, message: impl std::fmt::Display) -> ProtocolError {
    ProtocolError {
        context: context.to_string(),
        message: message.to_string(),
    }
}

/// A round the coordinator handed this worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub round: u64,
    /// Batch ids to train, in order.
    pub batches: Vec<u64>,
    /// Take the round's starting state from this peer first (live recovery, quarantine or
    /// rewind).
    pub donor: Option<String>,
    /// The schedule step of the round's first batch.
    pub first_step: u64,
    /// Scale of this round's step (below 1 after a rewind).
    pub step_scale: f64,
    /// Another member's contribution to replay and report the hash of.
    pub audit: Option<AuditTask>,
    /// This member's own contribution is audited: report its hash.
    pub audited: bool,
    /// The round takes the rest of the budget (see [`Reply::Round`]).
    pub last: bool,
    /// `batches` are the first step's: ask for more ([`RoundClient::more_batches`]).
    pub on_demand: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    Round(Assignment),
    Finished,
    /// This worker is out of the quorum: it should rejoin.
    Evicted(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Synced {
    /// The round committed: the element-wise sum over `contributors` members.
    Committed {
        sum: Vec<f32>,
        contributors: usize,
        stats: WorkerRoundStats,
        /// What quantization dropped of this worker's part in the committed attempt (empty
        /// when the values travelled as `f32`): the caller feeds it back next round.
        residual: Vec<f32>,
    },
    Evicted(String),
}

/// Opens a channel, waiting while the service refuses connections (it may still be
/// starting); anything else (wrong secret, wrong run) will not get better by waiting.
pub fn connect_patiently(
    membership: &dyn MembershipConnector,
    run_id: u64,
) -> Result<Box<dyn Membership>, ProtocolError> {
    let started = Instant::now();
    loop {
        match membership.connect(run_id) {
            Ok(c) => return Ok(c),
            Err(WireError::Io { ref source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && started.elapsed() < CONNECT_PATIENCE =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(protocol_error(&membership.describe(), e)),
        }
    }
}

/// Stops the heartbeat thread when the client is dropped, however the session ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One worker's membership in a run, from join until it finishes or is evicted.
pub struct RoundClient {
    channel: Box<dyn Membership>,
    service: String,
    auth: Auth,
    worker: WorkerId,
    peer: PeerServer,
    peer_timeout: Duration,
    failure_timeout: Duration,
    /// Shows the coordinator this worker lives (heartbeats or an etcd lease) until dropped.
    _alive: Box<dyn Send>,
}

/// What joining gave: the client, and the job (the run's config) the coordinator hands out.
pub struct Joined {
    pub client: RoundClient,
    pub job: String,
}

/// How a worker joins.
pub struct JoinOptions<'a> {
    pub name: &'a str,
    pub auth: &'a Auth,
    /// Address to listen on for peers; by default the interface that reaches the service.
    pub listen_ip: Option<&'a str>,
    /// Deadline of a state transfer's handshake and frames.
    pub peer_timeout: Duration,
    /// The state this worker holds from an earlier session, if any.
    pub held: Option<HeldState>,
    /// Its backend and compute threads (see [`Request::Join`]).
    pub backend: &'a str,
    pub threads: usize,
}

impl RoundClient {
    /// Connects, starts the peer listener, joins, and starts showing it lives as the coordinator
    /// says: heartbeats, or an etcd lease.
    pub fn join(
        membership: &dyn MembershipConnector,
        o: &JoinOptions,
    ) -> Result<Joined, ProtocolError> {
        let mut channel = connect_patiently(membership, 0)?;
        let run_id = channel.run_id();
        let ip = o
            .listen_ip
            .map(str::to_string)
            .or_else(|| channel.local_ip().map(|ip| ip.to_string()))
            .unwrap_or_else(|| "127.0.0.1".into());
        let peer = PeerServer::start(&format!("{ip}:0"), o.auth.clone(), run_id, o.peer_timeout)
            .map_err(|e| protocol_error(&format!("listening on {ip}"), e))?;
        let service = membership.describe();
        let join = Request::Join {
            name: o.name.to_string(),
            data_addr: peer.addr.clone(),
            held: o.held.clone(),
            backend: o.backend.to_string(),
            threads: o.threads,
        };
        let (worker, job, failure_timeout, liveness) = match channel.call(&join) {
            Ok(Reply::Welcome {
                worker,
                job,
                failure_timeout_ms,
                liveness,
                ..
            }) => (
                worker,
                job,
                Duration::from_millis(failure_timeout_ms),
                liveness,
            ),
            Ok(Reply::Evicted { reason }) => return Err(protocol_error("join refused", reason)),
            Ok(other) => return Err(protocol_error("join", unexpected(&other))),
            Err(e) => return Err(protocol_error(&service, e)),
        };
        let alive = match liveness {
            // Heartbeats at a quarter of the coordinator's timeout: one lost or late is no loss.
            Liveness::Heartbeats => {
                let every = failure_timeout / 4;
                Box::new(start_heartbeat(membership, run_id, worker, every)?) as Box<dyn Send>
            }
            Liveness::Lease { prefix } => membership
                .register(&format!("{prefix}{worker}"), o.name, failure_timeout)
                .map_err(|e| protocol_error(&service, e))?,
        };
        let client = RoundClient {
            channel,
            service,
            auth: o.auth.clone(),
            worker,
            peer,
            peer_timeout: o.peer_timeout,
            failure_timeout,
            _alive: alive,
        };
        Ok(Joined { client, job })
    }

    pub fn worker(&self) -> WorkerId {
        self.worker
    }

    pub fn run_id(&self) -> u64 {
        self.channel.run_id()
    }

    fn call(&mut self, req: &Request) -> Result<Reply, ProtocolError> {
        self.channel
            .call(req)
            .map_err(|e| protocol_error(&self.service, e))
    }

    /// Sends `req` until the answer is something other than `Wait`.
    fn call_until_decided(&mut self, req: &Request) -> Result<Reply, ProtocolError> {
        loop {
            match self.call(req)? {
                Reply::Wait { .. } => std::thread::sleep(POLL),
                other => return Ok(other),
            }
        }
    }

    /// The next round to run, reporting the state this worker holds now (for the vote and
    /// for donors).
    pub fn next_round(&mut self, mut state: Option<StateReport>) -> Result<Next, ProtocolError> {
        let reply = loop {
            // The report goes once: the coordinator records each report it gets.
            let req = Request::NextRound {
                worker: self.worker,
                state: state.take(),
            };
            match self.call(&req)? {
                Reply::Wait { .. } => std::thread::sleep(POLL),
                other => break other,
            }
        };
        match reply {
            Reply::Round {
                round,
                batches,
                donor,
                first_step,
                step_scale,
                audit,
                audited,
                last,
                on_demand,
                ..
            } => Ok(Next::Round(Assignment {
                round,
                batches,
                donor,
                first_step,
                step_scale,
                audit,
                audited,
                last,
                on_demand,
            })),
            Reply::Finished => Ok(Next::Finished),
            Reply::Evicted { reason } => Ok(Next::Evicted(reason)),
            other => Err(protocol_error("next round", unexpected(&other))),
        }
    }

    /// The next step's batch ids of on-demand round `round`; none once the round is closed to
    /// this worker (or it is out of the round: saying it is ready then tells it so).
    pub fn more_batches(&mut self, round: u64) -> Result<Vec<u64>, ProtocolError> {
        let req = Request::Batches {
            worker: self.worker,
            round,
        };
        match self.call(&req)? {
            Reply::Batches { batches, .. } => Ok(batches),
            Reply::Evicted { .. } => Ok(Vec::new()),
            other => Err(protocol_error("batches", unexpected(&other))),
        }
    }

    /// Takes the state that starts `round` from `donor` (which publishes it just after it
    /// applies the commit, so it may not have it yet). One announced larger than `max_bytes`
    /// is refused unread.
    pub fn fetch_state(
        &self,
        donor: &str,
        round: u64,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ProtocolError> {
        let timeout = self.peer_timeout;
        fetch_state_from(
            &[donor.to_string()],
            &self.auth,
            self.run_id(),
            round,
            max_bytes,
            timeout,
            timeout,
        )
        .map(|(_, snapshot)| snapshot.bytes)
        .map_err(|e| protocol_error("live recovery", e))
    }

    /// Serves `bytes` as the state that starts round `next_round`, to recovering peers.
    pub fn publish(&self, next_round: u64, bytes: Vec<u8>) {
        self.peer.publish(Snapshot { next_round, bytes });
    }

    /// Serves a state kept from an earlier session (see [`RoundClient::newest_published`]).
    pub fn republish(&self, snapshot: Arc<Snapshot>) {
        self.peer.publish_shared(snapshot);
    }

    /// The newest state this worker serves: the one it holds, to keep across a rejoin.
    pub fn newest_published(&self) -> Option<Arc<Snapshot>> {
        self.peer.newest()
    }

    /// Sums `contribution` over the round's members, retrying on re-formed rings until the
    /// round commits or this worker is out: in `f32` on a ring, or `quantized` on a mesh.
    /// `stats` (what this worker did this round) go to the coordinator with its result,
    /// completed with the traffic and waiting measured here.
    /// `finish_stats` completes the round's stats once the collective is done, before they
    /// go to the coordinator: a worker that trains on while the collective runs adds what it
    /// trained (and may block until it has).
    pub fn sync(
        &mut self,
        round: u64,
        contribution: &[f32],
        quantized: Option<Quantized>,
        mut stats: WorkerRoundStats,
        finish_stats: impl FnOnce(&mut WorkerRoundStats),
    ) -> Result<Synced, ProtocolError> {
        let worker = self.worker;
        let mut finish_stats = Some(finish_stats);
        loop {
            let waited = Instant::now();
            let ring = match self.call_until_decided(&Request::Ready { worker, round })? {
                Reply::Ring {
                    attempt,
                    rank,
                    members,
                    ..
                } => RingSpec {
                    round,
                    attempt,
                    members,
                    rank,
                },
                Reply::Evicted { reason } => return Ok(Synced::Evicted(reason)),
                other => return Err(protocol_error("ready", unexpected(&other))),
            };
            stats.wait_s += waited.elapsed().as_secs_f64();
            let mut sum = contribution.to_vec();
            let started = Instant::now();
            let outcome = self.all_reduce(&mut sum, &ring, quantized);
            stats.comm_s += started.elapsed().as_secs_f64();
            let (traffic, residual) = match outcome {
                Ok(traffic) => traffic,
                Err(e) => match self.report_failure(round, ring.attempt, &e)? {
                    Some(reason) => return Ok(Synced::Evicted(reason)),
                    None => continue,
                },
            };
            stats.bytes_sent += traffic.bytes_sent;
            stats.bytes_received += traffic.bytes_received;
            if let Some(finish) = finish_stats.take() {
                finish(&mut stats);
            }
            let waited = Instant::now();
            let req = Request::Reduced {
                worker,
                round,
                attempt: ring.attempt,
                stats: stats.clone(),
            };
            let verdict = self.call_until_decided(&req)?;
            stats.wait_s += waited.elapsed().as_secs_f64();
            match verdict {
                Reply::Commit { .. } => {
                    let contributors = ring.members.len();
                    return Ok(Synced::Committed {
                        sum,
                        contributors,
                        stats,
                        residual,
                    });
                }
                Reply::Retry { .. } => continue,
                Reply::Evicted { reason } => return Ok(Synced::Evicted(reason)),
                other => return Err(protocol_error("reduced", unexpected(&other))),
            }
        }
    }

    /// One attempt's collective: its traffic, and what quantization dropped.
    fn all_reduce(
        &self,
        sum: &mut [f32],
        ring: &RingSpec,
        quantized: Option<Quantized>,
    ) -> Result<(RingStats, Vec<f32>), WireError> {
        let (auth, inbox, timeout) = (&self.auth, &self.peer.inbox, self.failure_timeout);
        match quantized {
            None => all_reduce_sum(sum, ring, auth, self.run_id(), inbox, timeout)
                .map(|stats| (stats, Vec::new())),
            Some(q) => all_reduce_quantized(sum, q, ring, auth, self.run_id(), inbox, timeout)
                .map(|QuantizedSum { stats, residual }| (stats, residual)),
        }
    }

    /// Tells the coordinator an attempt failed here; `Some(reason)` when that put this
    /// worker out.
    fn report_failure(
        &mut self,
        round: u64,
        attempt: u32,
        error: &WireError,
    ) -> Result<Option<String>, ProtocolError> {
        tracing::warn!("round {round} attempt {attempt} failed: {error}");
        let req = Request::Failed {
            worker: self.worker,
            round,
            attempt,
            error: error.to_string(),
        };
        Ok(match self.call(&req)? {
            Reply::Evicted { reason } => Some(reason),
            _ => None,
        })
    }
}

fn unexpected(reply: &Reply) -> String {
    format!("unexpected reply {reply:?}")
}

fn start_heartbeat(
    membership: &dyn MembershipConnector,
    run_id: u64,
    worker: WorkerId,
    every: Duration,
) -> Result<StopOnDrop, ProtocolError> {
    let mut channel = connect_patiently(membership, run_id)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match channel.call(&Request::Heartbeat { worker }) {
                Ok(Reply::Ok) => {}
                _ => break,
            }
            std::thread::sleep(every);
        }
    });
    Ok(StopOnDrop(stop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{Coordinator, Liveness, MemberLease, Options};
    use crate::membership::CoordinatorConnector;
    use crate::pace::RoundBound;
    use crate::server::{CoordinatorClient, CoordinatorServer};
    use crate::wire::TEST_SECRET;

    const RUN: u64 = 0x5eed;

    fn coordinator(workers: usize, rounds: u64) -> CoordinatorServer {
        let opts = Options {
            failure_timeout: Duration::from_secs(5),
            min_workers: workers,
            batches_per_round: 1,
            budget_batches: rounds * workers as u64,
            schedule_steps: rounds,
            vote: false,
            max_corruption_flags: 3,
            max_rewinds: 3,
            damp_rounds: 4,
            outlier_ratio: None,
            audit_probability: 0.0,
            liveness: Liveness::Heartbeats,
            one_backend: false,
            round_bound: RoundBound::Fixed,
            batches_per_step: 1,
        };
        let c = Coordinator::new(opts, RUN, "the job".into());
        CoordinatorServer::start("127.0.0.1:0", Auth::new(TEST_SECRET).unwrap(), RUN, c).unwrap()
    }

    fn join(addr: &str, name: &str) -> Joined {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let connector = CoordinatorConnector {
            addr: addr.to_string(),
            auth: auth.clone(),
            timeout: Duration::from_secs(5),
        };
        let o = JoinOptions {
            name,
            auth: &auth,
            listen_ip: Some("127.0.0.1"),
            peer_timeout: Duration::from_secs(5),
            held: None,
            backend: "",
            threads: 0,
        };
        RoundClient::join(&connector, &o).unwrap()
    }

    /// Runs every round of a worker whose contribution is `value` per element; returns the
    /// sums it committed, its batches, and how it ended.
    fn worker(addr: String, name: &'static str, value: f32) -> (Vec<Vec<f32>>, Vec<u64>, Next) {
        let Joined { mut client, job } = join(&addr, name);
        assert_eq!(job, "the job");
        let (mut sums, mut batches) = (Vec::new(), Vec::new());
        let mut report = None;
        loop {
            let a = match client.next_round(report.take()).unwrap() {
                Next::Round(a) => a,
                end => return (sums, batches, end),
            };
            batches.extend(&a.batches);
            let stats = WorkerRoundStats {
                tokens: 10,
                ..Default::default()
            };
            match client
                .sync(a.round, &[value, 2.0 * value], None, stats, |_| {})
                .unwrap()
            {
                Synced::Committed {
                    sum,
                    contributors,
                    stats,
                    ..
                } => {
                    assert_eq!(contributors, 2);
                    assert!(stats.bytes_sent > 0 && stats.tokens == 10, "{stats:?}");
                    sums.push(sum);
                }
                Synced::Evicted(reason) => panic!("evicted: {reason}"),
            }
            client.publish(a.round + 1, vec![a.round as u8]);
            report = Some(StateReport {
                next_round: a.round + 1,
                blake3: "same".into(),
            });
        }
    }

    #[test]
    fn two_workers_run_every_round_and_commit_the_sum() {
        let server = coordinator(2, 3);
        let (a, b) = (server.addr.clone(), server.addr.clone());
        let one = std::thread::spawn(move || worker(a, "w0", 1.0));
        let two = std::thread::spawn(move || worker(b, "w1", 10.0));
        // The coordinator's owner lets the workers go once every batch is in.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.state.lock().unwrap().is_complete() {
            assert!(Instant::now() < deadline, "the run did not complete");
            std::thread::sleep(POLL);
        }
        // Held a while, so the workers' last NextRound is answered Wait many times over.
        std::thread::sleep(Duration::from_millis(200));
        server.state.lock().unwrap().release();
        let (one, two) = (one.join().unwrap(), two.join().unwrap());
        for (sums, _, end) in [&one, &two] {
            assert_eq!(*end, Next::Finished);
            assert_eq!(*sums, vec![vec![11.0, 22.0]; 3], "three committed rounds");
        }
        let reports = server
            .state
            .lock()
            .unwrap()
            .drain_events()
            .into_iter()
            .filter(|e| matches!(e, crate::coordinator::Event::StateReported { .. }))
            .count();
        assert_eq!(reports, 6, "each worker reports each round's state once");
        let mut all: Vec<u64> = one.1.iter().chain(&two.1).copied().collect();
        all.sort();
        assert_eq!(all, (0..6).collect::<Vec<_>>(), "every batch once");
    }

    #[test]
    fn a_request_the_coordinator_cannot_decide_yet_is_answered_once_it_is() {
        let server = coordinator(2, 1);
        let auth = Auth::new(TEST_SECRET).unwrap();
        let raw = || {
            CoordinatorClient::connect(&server.addr, &auth, RUN, Duration::from_secs(5)).unwrap()
        };
        let join = |c: &mut CoordinatorClient, name: &str| {
            let req = Request::Join {
                name: name.into(),
                data_addr: "127.0.0.1:1".into(),
                held: None,
                backend: String::new(),
                threads: 0,
            };
            match c.call(&req).unwrap() {
                Reply::Welcome { worker, .. } => worker,
                other => panic!("{other:?}"),
            }
        };
        let mut first = raw();
        let worker = join(&mut first, "w0");
        let mut second = raw();
        let asked = Instant::now();
        let late = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(150));
                join(&mut second, "w1")
            });
            first.call(&Request::NextRound {
                worker,
                state: None,
            })
        });
        // One call, answered when the second worker made the round possible: not `Wait`,
        // which would cost the worker another round trip to learn it.
        assert!(matches!(late, Ok(Reply::Round { .. })), "{late:?}");
        assert!(asked.elapsed() >= Duration::from_millis(150));
    }

    #[test]
    fn a_state_is_fetched_from_the_peer_that_published_it() {
        let server = coordinator(2, 1);
        let one = join(&server.addr, "w0").client;
        let two = join(&server.addr, "w1").client;
        one.publish(4, vec![1, 2, 3]);
        let donor = one.peer.addr.clone();
        assert_eq!(two.fetch_state(&donor, 4, 3).unwrap(), vec![1, 2, 3]);
        let err = two.fetch_state("127.0.0.1:1", 4, 3).unwrap_err();
        assert_eq!(err.context, "live recovery", "{err}");
        // A state larger than the model's is refused before it is received.
        let err = two.fetch_state(&donor, 4, 2).unwrap_err().to_string();
        assert!(err.contains("3 bytes exceeds the limit of 2"), "{err}");
    }

    /// One worker's round on a raw control connection: the reply to its `Reduced`.
    fn raw_round(c: &mut CoordinatorClient, worker: WorkerId) -> Reply {
        let Reply::Round { round, .. } = c
            .call(&Request::NextRound {
                worker,
                state: None,
            })
            .unwrap()
        else {
            panic!("no round")
        };
        let Reply::Ring { attempt, .. } = c.call(&Request::Ready { worker, round }).unwrap() else {
            panic!("no ring")
        };
        let reduced = Request::Reduced {
            worker,
            round,
            attempt,
            stats: WorkerRoundStats::default(),
        };
        c.call(&reduced).unwrap()
    }

    /// A server of one worker and 3 rounds, its options edited by `edit`.
    fn serve(
        edit: impl FnOnce(&mut Options),
        recorder: Option<crate::server::Recorder>,
        leases: Option<crate::server::LeaseChanges>,
    ) -> std::io::Result<CoordinatorServer> {
        let mut opts = coordinator(1, 3).state.lock().unwrap().options().clone();
        edit(&mut opts);
        let c = Coordinator::new(opts, RUN, "the job".into());
        let auth = Auth::new(TEST_SECRET).unwrap();
        CoordinatorServer::start_recording("127.0.0.1:0", auth, RUN, c, recorder, leases)
    }

    /// A plain connection to `server` that joined as w0, and the welcome it got.
    fn join_raw(server: &CoordinatorServer) -> (CoordinatorClient, WorkerId, Liveness) {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let mut conn =
            CoordinatorClient::connect(&server.addr, &auth, RUN, Duration::from_secs(5)).unwrap();
        let join = Request::Join {
            name: "w0".into(),
            data_addr: "127.0.0.1:1".into(),
            held: None,
            backend: String::new(),
            threads: 0,
        };
        match conn.call(&join).unwrap() {
            Reply::Welcome {
                worker, liveness, ..
            } => (conn, worker, liveness),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_commit_is_recorded_before_it_is_answered_and_a_failed_record_stops_the_coordinator() {
        let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = recorded.clone();
        // Records the start and the first commit, then is refused (another leads, say).
        let recorder: crate::server::Recorder = Box::new(move |d| {
            if d.next_round >= 2 {
                return Err("another coordinator leads".into());
            }
            log.lock().unwrap().push(d.next_round);
            Ok(())
        });
        let server = serve(|_| {}, Some(recorder), None).unwrap();
        let (mut conn, worker, _) = join_raw(&server);
        assert_eq!(raw_round(&mut conn, worker), Reply::Commit { round: 0 });
        assert_eq!(
            *recorded.lock().unwrap(),
            vec![0, 1],
            "round 0's commit was recorded before the worker heard of it"
        );
        let refused = raw_round(&mut conn, worker);
        assert!(
            matches!(&refused, Reply::Evicted { reason } if reason.contains("another coordinator leads")),
            "{refused:?}"
        );
        assert_eq!(
            server.stopped().as_deref(),
            Some("another coordinator leads")
        );
        let after = conn.call(&Request::NextRound {
            worker,
            state: None,
        });
        assert!(matches!(after, Ok(Reply::Evicted { .. })), "{after:?}");
    }

    fn by_lease(opts: &mut Options) {
        opts.liveness = Liveness::Lease {
            prefix: "holdfast/t/members/1-5eed/".into(),
        };
    }

    #[test]
    fn a_lease_judged_coordinator_puts_out_the_worker_whose_lease_went_and_refuses_a_plain_join() {
        let (tx, rx) = std::sync::mpsc::channel();
        let leases: crate::server::LeaseChanges = Box::new(move || rx.try_recv().ok());
        let server = serve(by_lease, None, Some(leases)).unwrap();
        let (mut conn, worker, liveness) = join_raw(&server);
        assert!(matches!(liveness, Liveness::Lease { .. }));
        tx.send(MemberLease {
            worker,
            alive: true,
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let heartbeat = Request::Heartbeat { worker };
        assert_eq!(conn.call(&heartbeat).unwrap(), Reply::Ok);
        tx.send(MemberLease {
            worker,
            alive: false,
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(matches!(
            conn.call(&heartbeat).unwrap(),
            Reply::Evicted { .. }
        ));
        // A worker that cannot keep a lease (it came by address, not through etcd) is told so.
        let auth = Auth::new(TEST_SECRET).unwrap();
        let connector = CoordinatorConnector {
            addr: server.addr.clone(),
            auth: auth.clone(),
            timeout: Duration::from_secs(5),
        };
        let o = JoinOptions {
            name: "w1",
            auth: &auth,
            listen_ip: Some("127.0.0.1"),
            peer_timeout: Duration::from_secs(5),
            held: None,
            backend: "",
            threads: 0,
        };
        let err = RoundClient::join(&connector, &o).err().expect("refused");
        assert!(err.to_string().contains("--etcd"), "{err}");
    }

    #[test]
    fn a_lease_judged_coordinator_will_not_start_without_the_leases() {
        assert!(serve(by_lease, None, None).is_err());
    }
}
