//! The coordinator over TCP: accepts authenticated workers, feeds their requests to the pure
//! [`Coordinator`], and ticks it so silent members are removed even when nobody asks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::acceptor::{Acceptor, MAX_UNAUTHENTICATED};
use crate::coordinator::{Coordinator, Reply, Request, WorkerId};
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

pub struct CoordinatorServer {
    pub addr: String,
    pub state: Arc<Mutex<Coordinator>>,
    _acceptor: Acceptor,
}

impl CoordinatorServer {
    pub fn start(
        listen: &str,
        auth: Auth,
        run_id: u64,
        coordinator: Coordinator,
    ) -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(coordinator));
        let st = state.clone();
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
        let (st, stop) = (state.clone(), acceptor.stop_flag());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                st.lock().expect("coordinator lock").tick(Instant::now());
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Ok(CoordinatorServer {
            addr: acceptor.addr.clone(),
            state,
            _acceptor: acceptor,
        })
    }
}

fn serve(mut conn: Conn, state: &Mutex<Coordinator>) {
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
            let reply = decide(state, req);
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
    let mut c = state.lock().expect("coordinator lock");
    for id in speaks_for {
        c.disconnected(Instant::now(), id);
    }
}

/// The coordinator's answer to `req`; one that would be `Wait` is asked again until it is
/// decided or [`HOLD`] has passed.
fn decide(state: &Mutex<Coordinator>, mut req: Request) -> Reply {
    let held = Instant::now();
    loop {
        let again = req.asked_again();
        let reply = state
            .lock()
            .expect("coordinator lock")
            .handle(Instant::now(), req);
        match (reply, again) {
            (Reply::Wait { .. }, Some(next)) if held.elapsed() < HOLD => {
                std::thread::sleep(RECHECK);
                req = next;
            }
            (reply, _) => return reply,
        }
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
