//! The coordinator over TCP: accepts authenticated workers, feeds their requests to the pure
//! [`Coordinator`], and ticks it so silent members are removed even when nobody asks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::acceptor::{Acceptor, MAX_UNAUTHENTICATED};
use crate::coordinator::{Coordinator, Durable, MemberLease, Reply, Request, WorkerId};
use crate::wire::{self, Auth, Conn, WireError};

/// How long a worker's control connection may stay quiet: liveness is judged by heartbeats,
/// not by this, so it only bounds a connection nobody will ever use again.
const IDLE_CONTROL_TIMEOUT: Duration = Duration::from_secs(3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request the coordinator cannot decide yet is held here before it is answered
/// `Wait`: asked again in-process, a worker hears a decision as soon as it is made instead of
/// up to a round trip later — several round trips a round on a slow link. Well within the
/// worker's read timeout.
const HOLD: Duration = Duration::from_millis(500);
const RECHECK: Duration = Duration::from_millis(2);

/// Records what a standby needs (see [`Durable`]) somewhere that outlives this process, before
/// any worker hears of the change: an `Err` (with the reason) means this coordinator may no
/// longer decide anything, e.g. because another leads now.
pub type Recorder = Box<dyn FnMut(&Durable) -> Result<(), String> + Send>;

/// The workers' lease changes as they come ([`crate::coordinator::Liveness::Lease`]): the next one seen, if any.
pub type LeaseChanges = Box<dyn FnMut() -> Option<MemberLease> + Send>;

/// The recorder, what it last recorded, and why this coordinator stopped deciding, if it did.
struct Records {
    recorder: Option<Recorder>,
    recorded: Option<u64>,
    stopped: Option<String>,
}

impl Records {
    /// Records `c`'s durable state if it changed since the last time: `Err` once this
    /// coordinator has stopped deciding.
    fn record(&mut self, c: &Coordinator) -> Result<(), String> {
        if let Some(why) = &self.stopped {
            return Err(why.clone());
        }
        let Some(recorder) = self.recorder.as_mut() else {
            return Ok(());
        };
        if self.recorded == Some(c.durable_version()) {
            return Ok(());
        }
        match recorder(&c.durable()) {
            Ok(()) => {
                self.recorded = Some(c.durable_version());
                Ok(())
            }
            Err(why) => {
                tracing::error!("stopped coordinating: {why}");
                self.stopped = Some(why.clone());
                Err(why)
            }
        }
    }
}

/// The coordinator and its records, always locked in that order.
struct Shared {
    state: Arc<Mutex<Coordinator>>,
    records: Mutex<Records>,
}

pub struct CoordinatorServer {
    pub addr: String,
    pub state: Arc<Mutex<Coordinator>>,
    shared: Arc<Shared>,
    _acceptor: Acceptor,
}

impl CoordinatorServer {
    pub fn start(
        listen: &str,
        auth: Auth,
        run_id: u64,
        coordinator: Coordinator,
    ) -> std::io::Result<Self> {
        Self::start_recording(listen, auth, run_id, coordinator, None, None)
    }

    /// Like [`CoordinatorServer::start`], with every change to the coordinator's durable state
    /// given to `recorder` before a reply tells any worker of it. Once `recorder` fails, every
    /// request is answered [`Reply::Evicted`] (the workers look for the new leader) and
    /// [`CoordinatorServer::stopped`] says why. A coordinator that judges liveness by
    /// [`crate::coordinator::Liveness::Lease`] learns of its workers' leases from `leases`, and
    /// cannot start without them.
    pub fn start_recording(
        listen: &str,
        auth: Auth,
        run_id: u64,
        coordinator: Coordinator,
        recorder: Option<Recorder>,
        mut leases: Option<LeaseChanges>,
    ) -> std::io::Result<Self> {
        if coordinator.judges_by_lease() && leases.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a coordinator that judges liveness by leases needs their changes",
            ));
        }
        let state = Arc::new(Mutex::new(coordinator));
        let shared = Arc::new(Shared {
            state: state.clone(),
            records: Mutex::new(Records {
                recorder,
                recorded: None,
                stopped: None,
            }),
        });
        let st = shared.clone();
        let acceptor =
            Acceptor::start(
                listen,
                MAX_UNAUTHENTICATED,
                move |stream, pending| match wire::accept(stream, &auth, run_id, HANDSHAKE_TIMEOUT)
                {
                    Ok(conn) => {
                        drop(pending);
                        serve(conn, &st)
                    }
                    Err(e) => tracing::warn!("refused a connection: {e}"),
                },
            )?;
        let (st, stop) = (shared.clone(), acceptor.stop_flag());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut c = st.state.lock().expect("coordinator lock");
                while let Some(change) = leases.as_mut().and_then(|next| next()) {
                    c.lease_changed(Instant::now(), change);
                }
                c.tick(Instant::now());
                // Only this thread's record: a failure is every request's answer from now on.
                let _ = st.records.lock().expect("records lock").record(&c);
                drop(c);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Ok(CoordinatorServer {
            addr: acceptor.addr.clone(),
            state,
            shared,
            _acceptor: acceptor,
        })
    }

    /// Why this coordinator stopped deciding (its recorder failed), if it did.
    pub fn stopped(&self) -> Option<String> {
        let records = self.shared.records.lock().expect("records lock");
        records.stopped.clone()
    }
}

impl Drop for CoordinatorServer {
    /// Connections already accepted outlive the acceptor: their workers are told to rejoin,
    /// so that a coordinator started again on this address (a cold restart) gets them.
    fn drop(&mut self) {
        let mut records = self.shared.records.lock().expect("records lock");
        records.stopped.get_or_insert_with(|| "it closed".into());
    }
}

fn serve(mut conn: Conn, shared: &Shared) {
    // The workers this connection spoke for: when it closes, they are gone.
    let mut speaks_for: Vec<WorkerId> = Vec::new();
    if conn.set_timeout(IDLE_CONTROL_TIMEOUT).is_ok() {
        loop {
            let req: Request = match conn.recv_json() {
                Ok(r) => r,
                Err(WireError::Io { .. }) => break,
                Err(e) => {
                    tracing::warn!("dropping a worker connection: {e}");
                    conn.refuse(&e.to_string());
                    break;
                }
            };
            let worker = req.worker();
            let reply = decide(shared, req);
            let id = match &reply {
                Reply::Welcome { worker, .. } => Some(*worker),
                Reply::Evicted { .. } => None,
                _ => worker,
            };
            if let Some(id) = id.filter(|id| !speaks_for.contains(id)) {
                speaks_for.push(id);
            }
            if conn.send_json(&reply).is_err() {
                break;
            }
        }
    }
    let mut c = shared.state.lock().expect("coordinator lock");
    for id in speaks_for {
        c.disconnected(Instant::now(), id);
    }
    let _ = shared.records.lock().expect("records lock").record(&c);
}

/// The coordinator's answer to `req`; one that would be `Wait` is asked again until it is
/// decided or [`HOLD`] has passed.
fn decide(shared: &Shared, mut req: Request) -> Reply {
    let held = Instant::now();
    loop {
        let again = req.asked_again();
        let reply = {
            let mut c = shared.state.lock().expect("coordinator lock");
            let mut records = shared.records.lock().expect("records lock");
            match records.record(&c) {
                Ok(()) => {
                    let reply = c.handle(Instant::now(), req);
                    match records.record(&c) {
                        Ok(()) => reply,
                        Err(why) => stopped(why),
                    }
                }
                Err(why) => stopped(why),
            }
        };
        match (reply, again) {
            (Reply::Wait { .. }, Some(next)) if held.elapsed() < HOLD => {
                std::thread::sleep(RECHECK);
                req = next;
            }
            (reply, _) => return reply,
        }
    }
}

/// The answer of a coordinator that stopped deciding: the worker rejoins, and finds the leader.
fn stopped(why: String) -> Reply {
    Reply::Evicted {
        reason: format!("this coordinator stopped: {why}"),
    }
}

/// A worker's side of the control connection.
pub struct CoordinatorClient {
    conn: Conn,
}

impl CoordinatorClient {
    pub fn connect(
        addr: &str,
        auth: &Auth,
        run_id: u64,
        timeout: Duration,
    ) -> Result<Self, WireError> {
        Ok(CoordinatorClient {
            conn: wire::connect(addr, auth, run_id, timeout)?,
        })
    }

    pub fn run_id(&self) -> u64 {
        self.conn.run_id()
    }

    /// The local address this connection leaves from: the interface that reaches the
    /// coordinator, and so the one to advertise to peers.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.conn.local_addr().map(|a| a.ip())
    }

    pub fn call(&mut self, req: &Request) -> Result<Reply, WireError> {
        self.conn.send_json(req)?;
        self.conn.recv_json()
    }
}
