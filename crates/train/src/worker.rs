//! A worker of a multi-worker run: joins the coordinator, trains its assigned batches, takes
//! part in each round's collective, and applies a round only when the coordinator says it
//! committed. When it is told it left the quorum (it hung, or its link did) it rejoins and
//! takes the committed state from a healthy peer — no checkpoint file involved.
//!
//! The training step itself is the single-worker one ([`compute_grads`], [`apply_grads`]);
//! everything here wraps it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use holdfast_cluster::chaos::NumberFaults;
use holdfast_cluster::coordinator::{Reply, Request, StateReport, WorkerRoundStats};
use holdfast_cluster::diloco::{OuterNesterov, average_in_place, pseudo_gradient};
use holdfast_cluster::membership::{CoordinatorConnector, Membership, MembershipConnector};
use holdfast_cluster::peer::{FetchError, PeerServer, Snapshot, fetch_state};
use holdfast_cluster::ring::{RingSpec, all_reduce_sum};
use holdfast_cluster::wire::{Auth, WireError};

use crate::config::TrainSection;
use crate::guard::{Guard, Verdict};
use crate::optim::grad_norm;
use crate::replica::{MAX_STATE_BYTES, Replica, flatten, unflatten};
use crate::run::{Prepared, prepare_data};
use crate::step::{apply_clipped, apply_grads, compute_grads, inject};
use crate::{RunConfig, TrainError};

const POLL: Duration = Duration::from_millis(10);
/// How long a starting worker keeps trying to reach its coordinator.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for a state transfer's handshake and each of its frames.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// A state larger than this is refused before it is received.

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The coordinator's address.
    pub coordinator: String,
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

enum SessionEnd {
    Finished,
    Evicted(String),
}

fn cluster_err(context: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Cluster(format!("{context}: {e}"))
}

fn connect(
    membership: &dyn MembershipConnector,
    run_id: u64,
) -> Result<Box<dyn Membership>, TrainError> {
    let started = Instant::now();
    loop {
        match membership.connect(run_id) {
            Ok(c) => return Ok(c),
            // A refused connection may be a service still starting; anything else
            // (wrong secret, wrong run) will not get better by waiting.
            Err(WireError::Io { ref source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && started.elapsed() < CONNECT_PATIENCE =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(cluster_err(&membership.describe(), e)),
        }
    }
}

/// Runs until the coordinator says the run is finished. Errors when the coordinator is gone
/// or refuses this worker.
pub fn run_worker(o: &WorkerOptions) -> Result<(), TrainError> {
    let auth = Auth::new(&o.secret);
    let membership = CoordinatorConnector {
        addr: o.coordinator.clone(),
        auth: auth.clone(),
        timeout: CONNECT_TIMEOUT,
    };
    let mut prepared: Option<(RunConfig, Prepared)> = None;
    // Injected faults fire once each, whatever rounds are retried or redone.
    let mut faults = o.faults.clone();
    loop {
        match session(o, &membership, &auth, &mut prepared, &mut faults)? {
            SessionEnd::Finished => return Ok(()),
            SessionEnd::Evicted(reason) => {
                tracing::warn!("{}: out of the quorum ({reason}); rejoining", o.name);
            }
        }
    }
}

/// Stops the heartbeat thread when the session ends, however it ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn start_heartbeat(
    membership: &dyn MembershipConnector,
    run_id: u64,
    worker: u64,
    every: Duration,
) -> Result<StopOnDrop, TrainError> {
    let mut client = connect(membership, run_id)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match client.call(&Request::Heartbeat { worker }) {
                Ok(Reply::Ok) => {}
                _ => break,
            }
            std::thread::sleep(every);
        }
    });
    Ok(StopOnDrop(stop))
}

fn session(
    o: &WorkerOptions,
    membership: &dyn MembershipConnector,
    auth: &Auth,
    prepared: &mut Option<(RunConfig, Prepared)>,
    faults: &mut NumberFaults,
) -> Result<SessionEnd, TrainError> {
    let mut client = connect(membership, 0)?;
    let run_id = client.run_id();
    let ip = o
        .listen_ip
        .clone()
        .or_else(|| client.local_ip().map(|ip| ip.to_string()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let peer = PeerServer::start(&format!("{ip}:0"), auth.clone(), run_id, PEER_TIMEOUT)
        .map_err(|e| cluster_err(&format!("listening on {ip}"), e))?;
    let call = |client: &mut Box<dyn Membership>, req: &Request| {
        client
            .call(req)
            .map_err(|e| cluster_err(&membership.describe(), e))
    };
    let (worker, job) = match call(
        &mut client,
        &Request::Join {
            name: o.name.clone(),
            data_addr: peer.addr.clone(),
        },
    )? {
        Reply::Welcome { worker, job, .. } => (worker, job),
        other => return Err(cluster_err("join", format!("unexpected reply {other:?}"))),
    };
    let cfg = RunConfig::from_toml_str(&job, "job from the coordinator")?;
    if prepared.as_ref().is_none_or(|(c, _)| *c != cfg) {
        *prepared = Some((cfg.clone(), prepare_data(&cfg, &o.cache_dir, None)?));
    }
    let (cfg, data) = prepared.as_ref().expect("prepared above");
    crate::set_flush_denormals(cfg.train.flush_denormals);
    let timeout = Duration::from_millis(cfg.sync.failure_timeout_ms);
    let _heartbeat = start_heartbeat(membership, run_id, worker, timeout / 4)?;
    tracing::info!("{} joined as worker {worker} of run {run_id:016x}", o.name);

    let h = &cfg.train;
    let diloco = cfg.sync.mode == "diloco";
    let outer_opt = OuterNesterov {
        lr: cfg.sync.outer_lr as f32,
        momentum: cfg.sync.outer_momentum as f32,
    };
    let mut replica: Option<Replica> = None;
    let mut report: Option<StateReport> = None;
    let mut guard = Guard::new(cfg.guard.clone());
    loop {
        let reply = call(
            &mut client,
            &Request::NextRound {
                worker,
                state: report.take(),
            },
        )?;
        let (round, batches, donor, first_step, step_scale) = match reply {
            Reply::Round {
                round,
                batches,
                donor,
                first_step,
                step_scale,
                ..
            } => (round, batches, donor, first_step, step_scale),
            Reply::Wait { .. } => {
                std::thread::sleep(POLL);
                continue;
            }
            Reply::Finished => return Ok(SessionEnd::Finished),
            Reply::Evicted { reason } => return Ok(SessionEnd::Evicted(reason)),
            other => {
                return Err(cluster_err(
                    "next round",
                    format!("unexpected reply {other:?}"),
                ));
            }
        };
        // A state this worker takes (fetched, or built from the seed) it also serves: a
        // rewind may need it once newer ones exist.
        let mut acquired = replica.is_none();
        if let Some(donor) = donor {
            match fetch_replica(&donor, auth, run_id, round, &data.model, &o.device) {
                Ok(r) => {
                    replica = Some(r);
                    acquired = true;
                }
                Err(e) => {
                    // The donor may have died; the coordinator will name another next time.
                    tracing::warn!("{}: live recovery from {donor} failed: {e}", o.name);
                    std::thread::sleep(POLL);
                    continue;
                }
            }
        }
        let r =
            replica.get_or_insert_with(|| Replica::fresh(&data.model, h.seed, &o.device, diloco));
        if r.next_round != round {
            return Ok(SessionEnd::Evicted(format!(
                "holds the state of round {}, asked to run round {round}",
                r.next_round
            )));
        }
        if acquired {
            peer.publish(Snapshot {
                next_round: round,
                bytes: r.encode(),
            });
        }

        // Compute: DiLoCo trains H local steps; DDP computes one step's gradients.
        let compute_started = Instant::now();
        let mut stats = WorkerRoundStats::default();
        let firsts = |ids: &[u64]| {
            ids.iter()
                .map(|b| b * h.batch_size as u64)
                .collect::<Vec<_>>()
        };
        let mut loss_sum = 0.0;
        let payload = if diloco {
            // The round's loss is the mean of every finite loss its steps measured, applied or
            // not: a round whose steps were all refused must not report a loss of 0.
            let mut measured = 0u32;
            // What a rollback returns to: this round's start (the outer weights).
            let round_start = (r.weights.clone(), r.opt.clone(), guard.clone());
            for (i, ids) in batches.chunks(h.grad_accum).enumerate() {
                let step_started = Instant::now();
                let step = first_step + i as u64;
                let (grads, loss, tokens) = compute_grads(
                    &r.weights,
                    &data.dataset,
                    h.seed,
                    &firsts(ids),
                    h.batch_size,
                );
                let (grads, loss) = inject(faults, step, grads, loss);
                faults.spend(step);
                stats.tokens += tokens as u64;
                if loss.is_finite() {
                    loss_sum += loss;
                    measured += 1;
                }
                let norm = grad_norm(&grads);
                match guard.observe(step, loss, norm) {
                    Verdict::Apply => {}
                    Verdict::Skip { reason } => {
                        tracing::warn!("{}: step {step}: not applied: {reason}", o.name);
                        stats.skipped_steps += 1;
                        continue;
                    }
                    // Past its rollback limit a replica goes on rolling back: whether the
                    // run is unstable is the coordinator's call, from every replica's rounds.
                    Verdict::Rollback { reason } | Verdict::Stop { reason } => {
                        // Back to the round's start: this replica contributes no change,
                        // and the rest of its batches this round are skipped.
                        tracing::warn!(
                            "{}: step {step}: rolled back to round {round}'s start: {reason}",
                            o.name
                        );
                        (r.weights, r.opt) = (round_start.0.clone(), round_start.1.clone());
                        guard.restore_statistics(&round_start.2);
                        stats.rollbacks += 1;
                        break;
                    }
                }
                apply_clipped(&mut r.weights, &mut r.opt, grads, norm, step, h);
                slow_down(o.slow_factor, step_started.elapsed());
            }
            loss_sum /= f64::from(measured.max(1));
            let mut d = Vec::new();
            pseudo_gradient(&r.outer, &flatten(&r.weights.tensors), &mut d);
            d
        } else {
            let step_started = Instant::now();
            let (grads, loss, tokens) = compute_grads(
                &r.weights,
                &data.dataset,
                h.seed,
                &firsts(&batches),
                h.batch_size,
            );
            let (grads, loss) = inject(faults, first_step, grads, loss);
            faults.spend(first_step);
            loss_sum = loss;
            stats.tokens = tokens as u64;
            slow_down(o.slow_factor, step_started.elapsed());
            let mut g = flatten(&grads);
            let norm = grad_norm(&grads);
            let verdict = guard.observe(first_step, loss, norm);
            let rolled_back = matches!(verdict, Verdict::Rollback { .. } | Verdict::Stop { .. });
            match verdict {
                Verdict::Apply => {}
                // Replicas share one state in DDP: a bad step cannot be undone locally, so
                // this replica contributes nothing rather than poison the average. Past its
                // rollback limit it goes on doing so: whether the run is unstable is the
                // coordinator's call.
                Verdict::Skip { reason }
                | Verdict::Rollback { reason }
                | Verdict::Stop { reason } => {
                    tracing::warn!("{}: round {round}: contributing zeros: {reason}", o.name);
                    stats.skipped_steps += 1;
                    stats.rollbacks += u64::from(rolled_back);
                    g.iter_mut().for_each(|v| *v = 0.0);
                }
            }
            g
        };
        stats.loss = loss_sum;
        stats.compute_s = compute_started.elapsed().as_secs_f64();

        // Sync: retried on a re-formed ring until the round commits or this worker is out.
        let mut wait_s = 0.0;
        let mut comm_s = 0.0;
        let (sum, contributors) = loop {
            let waited = Instant::now();
            let (attempt, rank, members) =
                match poll(&mut client, &Request::Ready { worker, round }, &call)? {
                    Reply::Ring {
                        attempt,
                        rank,
                        members,
                        ..
                    } => (attempt, rank, members),
                    Reply::Evicted { reason } => return Ok(SessionEnd::Evicted(reason)),
                    other => {
                        return Err(cluster_err("ready", format!("unexpected reply {other:?}")));
                    }
                };
            wait_s += waited.elapsed().as_secs_f64();
            let n = members.len();
            let spec = RingSpec {
                round,
                attempt,
                members,
                rank,
            };
            let mut buf = payload.clone();
            let comm_started = Instant::now();
            let outcome = all_reduce_sum(&mut buf, &spec, auth, run_id, &peer.inbox, timeout);
            comm_s += comm_started.elapsed().as_secs_f64();
            let ring = match outcome {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("{}: round {round} attempt {attempt} failed: {e}", o.name);
                    let req = Request::Failed {
                        worker,
                        round,
                        attempt,
                        error: e.to_string(),
                    };
                    match call(&mut client, &req)? {
                        Reply::Evicted { reason } => return Ok(SessionEnd::Evicted(reason)),
                        _ => continue,
                    }
                }
            };
            stats.bytes_sent += ring.bytes_sent;
            stats.bytes_received += ring.bytes_received;
            stats.comm_s = comm_s;
            stats.wait_s = wait_s;
            let waited = Instant::now();
            let req = Request::Reduced {
                worker,
                round,
                attempt,
                stats: stats.clone(),
            };
            let verdict = poll(&mut client, &req, &call)?;
            wait_s += waited.elapsed().as_secs_f64();
            match verdict {
                Reply::Commit { .. } => break (buf, n),
                Reply::Retry { .. } => continue,
                Reply::Evicted { reason } => return Ok(SessionEnd::Evicted(reason)),
                other => {
                    return Err(cluster_err(
                        "reduced",
                        format!("unexpected reply {other:?}"),
                    ));
                }
            }
        };

        // Apply the committed round, identically on every replica.
        let mut avg = sum;
        average_in_place(&mut avg, contributors);
        if diloco {
            let outer_opt = outer_opt.damped(step_scale as f32);
            if !outer_opt.apply_round(&mut r.outer, &mut r.velocity, &avg) {
                tracing::warn!(
                    "{}: round {round}: no replica made progress; no outer step, momentum cleared",
                    o.name
                );
            }
            r.reset_local_to_outer();
        } else {
            let grads = unflatten(&avg, &r.weights.specs, &o.device);
            let damped = TrainSection {
                lr: h.lr * step_scale,
                min_lr: h.min_lr * step_scale,
                ..h.clone()
            };
            apply_grads(&mut r.weights, &mut r.opt, grads, first_step, &damped);
            r.outer = flatten(&r.weights.tensors);
        }
        r.next_round = round + 1;
        if faults.bitflip_after(round) {
            // Once: a round that is undone and redone is not corrupted again.
            faults.bitflip_rounds.retain(|&r| r != round);
            // Chaos: silent data corruption of one parameter of this replica.
            r.outer[0] = f32::from_bits(r.outer[0].to_bits() ^ (1 << 22));
            r.reset_local_to_outer();
            tracing::warn!(
                "{}: chaos: flipped a bit of parameter 0 after round {round}",
                o.name
            );
        }
        peer.publish(Snapshot {
            next_round: r.next_round,
            bytes: r.encode(),
        });
        report = Some(StateReport {
            next_round: r.next_round,
            blake3: r.state_hash(),
        });
    }
}

/// Sends `req` until the answer is something other than `Wait`.
fn poll(
    client: &mut Box<dyn Membership>,
    req: &Request,
    call: &impl Fn(&mut Box<dyn Membership>, &Request) -> Result<Reply, TrainError>,
) -> Result<Reply, TrainError> {
    loop {
        match call(client, req)? {
            Reply::Wait { .. } => std::thread::sleep(POLL),
            other => return Ok(other),
        }
    }
}

fn slow_down(factor: f64, step: Duration) {
    if factor > 1.0 {
        std::thread::sleep(step.mul_f64(factor - 1.0));
    }
}

fn fetch_replica(
    donor: &str,
    auth: &Auth,
    run_id: u64,
    round: u64,
    cfg: &holdfast_model::ModelConfig,
    device: &Device,
) -> Result<Replica, TrainError> {
    // The donor publishes the state just after it applies the commit; give it a moment.
    let started = Instant::now();
    let snap = loop {
        match fetch_state(
            donor,
            auth,
            run_id,
            Some(round),
            MAX_STATE_BYTES,
            PEER_TIMEOUT,
        ) {
            Ok(s) => break s,
            Err(FetchError::Unavailable { .. }) if started.elapsed() < PEER_TIMEOUT => {
                std::thread::sleep(POLL)
            }
            Err(e) => return Err(cluster_err("live recovery", e)),
        }
    };
    let r = Replica::decode(&snap.bytes, cfg, device, donor)?;
    if r.next_round != round {
        return Err(cluster_err(
            "live recovery",
            format!("{donor} sent round {}, wanted {round}", r.next_round),
        ));
    }
    Ok(r)
}
