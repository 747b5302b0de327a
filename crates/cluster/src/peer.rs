//! A worker's peer endpoint: one listener that takes authenticated connections from other
//! workers (ring neighbours for a collective) and from anyone after its training state (a
//! rejoining worker's live recovery, or the coordinator collecting a checkpoint).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::acceptor::{Acceptor, MAX_UNAUTHENTICATED, Unauthenticated};
use crate::wire::{self, Auth, Conn, Kind, MAX_DATA_LEN, WireError};

/// First message on a peer connection: what the caller wants.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "want", rename_all = "snake_case")]
pub enum PeerHello {
    /// "I am rank `from_rank` of this attempt's collective" (a ring predecessor, or one of a
    /// mesh's peers).
    Ring {
        round: u64,
        attempt: u32,
        from_rank: usize,
    },
    /// "Send me your training state", optionally only the state that starts `next_round`.
    State { next_round: Option<u64> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum StateHeader {
    Sending {
        next_round: u64,
        bytes: u64,
        blake3: String,
    },
    Unavailable {
        have: Option<u64>,
    },
}

/// A serialised training state, valid at the start of `next_round`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub next_round: u64,
    pub bytes: Vec<u8>,
}

type RingKey = (u64, u32);

/// Collective connections that arrived before the collective asked for them.
#[derive(Default)]
pub struct Inbox {
    waiting: Mutex<HashMap<RingKey, Vec<(usize, Conn)>>>,
    arrived: Condvar,
}

impl Inbox {
    fn put(&self, key: RingKey, from_rank: usize, conn: Conn) {
        let mut w = self.waiting.lock().expect("inbox lock");
        // Older attempts are over; their connections are only noise now.
        w.retain(|k, _| *k >= key);
        let arrived = w.entry(key).or_default();
        // A rank that connects again replaces its earlier connection.
        arrived.retain(|(from, _)| *from != from_rank);
        arrived.push((from_rank, conn));
        self.arrived.notify_all();
    }

    /// Waits until `deadline` for the ring predecessor's connection of `key` (the first to
    /// arrive: the caller checks its rank).
    pub fn take(&self, key: RingKey, deadline: Instant) -> Option<(usize, Conn)> {
        self.take_where(key, deadline, |_| true)
    }

    /// Waits until `deadline` for rank `from`'s connection of `key`.
    pub fn take_from(&self, key: RingKey, from: usize, deadline: Instant) -> Option<Conn> {
        self.take_where(key, deadline, |rank| rank == from)
            .map(|(_, conn)| conn)
    }

    fn take_where(
        &self,
        key: RingKey,
        deadline: Instant,
        wanted: impl Fn(usize) -> bool,
    ) -> Option<(usize, Conn)> {
        let mut w = self.waiting.lock().expect("inbox lock");
        loop {
            if let Some(arrived) = w.get_mut(&key)
                && let Some(i) = arrived.iter().position(|(from, _)| wanted(*from))
            {
                return Some(arrived.remove(i));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            w = self
                .arrived
                .wait_timeout(w, deadline - now)
                .expect("inbox lock")
                .0;
        }
    }
}

/// The listening side of a worker. Dropping it stops accepting.
pub struct PeerServer {
    pub addr: String,
    pub inbox: Arc<Inbox>,
    snapshots: Arc<Snapshots>,
    _acceptor: Acceptor,
}

/// The newest published states, newest last: the older ones stay servable so that replicas
/// can be rewound to them when their newest states disagree, or when every replica rolled
/// back from the newest (the rewind goes to the state before the last outer step: two back).
type Snapshots = Mutex<std::collections::VecDeque<Arc<Snapshot>>>;
const KEEP_SNAPSHOTS: usize = 3;

impl PeerServer {
    /// Binds `listen` (e.g. `127.0.0.1:0`) and serves peers of `run_id` in the background.
    pub fn start(
        listen: &str,
        auth: Auth,
        run_id: u64,
        timeout: Duration,
    ) -> std::io::Result<PeerServer> {
        let inbox = Arc::new(Inbox::default());
        let snapshots: Arc<Snapshots> = Arc::default();
        let (i, snaps) = (inbox.clone(), snapshots.clone());
        let acceptor = Acceptor::start(listen, MAX_UNAUTHENTICATED, move |stream, pending| {
            if let Err(e) = serve_peer(stream, pending, &auth, run_id, timeout, &i, &snaps) {
                tracing::debug!("peer connection: {e}");
            }
        })?;
        Ok(PeerServer {
            addr: acceptor.addr.clone(),
            inbox,
            snapshots,
            _acceptor: acceptor,
        })
    }

    /// Publishes the state peers get from now on.
    pub fn publish(&self, snapshot: Snapshot) {
        self.publish_shared(Arc::new(snapshot));
    }

    /// [`PeerServer::publish`] for a snapshot shared with its publisher.
    pub fn publish_shared(&self, snapshot: Arc<Snapshot>) {
        let mut s = self.snapshots.lock().expect("snapshot lock");
        s.retain(|old| old.next_round < snapshot.next_round);
        s.push_back(snapshot);
        while s.len() > KEEP_SNAPSHOTS {
            s.pop_front();
        }
    }
}

impl PeerServer {
    /// The newest state published, if any.
    pub fn newest(&self) -> Option<Arc<Snapshot>> {
        self.snapshots
            .lock()
            .expect("snapshot lock")
            .back()
            .cloned()
    }
}

fn serve_peer(
    stream: std::net::TcpStream,
    pending: Unauthenticated,
    auth: &Auth,
    run_id: u64,
    timeout: Duration,
    inbox: &Inbox,
    snapshots: &Snapshots,
) -> Result<(), WireError> {
    let mut conn = wire::accept(stream, auth, run_id, timeout)?;
    drop(pending);
    match conn.recv_json::<PeerHello>()? {
        PeerHello::Ring {
            round,
            attempt,
            from_rank,
        } => {
            inbox.put((round, attempt), from_rank, conn);
            Ok(())
        }
        PeerHello::State { next_round } => {
            let (snap, newest) = {
                let all = snapshots.lock().expect("snapshot lock");
                let pick = match next_round {
                    None => all.back().cloned(),
                    Some(r) => all.iter().find(|s| s.next_round == r).cloned(),
                };
                (pick, all.back().map(|s| s.next_round))
            };
            match snap {
                Some(s) => {
                    conn.send_json(&StateHeader::Sending {
                        next_round: s.next_round,
                        bytes: s.bytes.len() as u64,
                        blake3: blake3::hash(&s.bytes).to_hex().to_string(),
                    })?;
                    for part in s.bytes.chunks(MAX_DATA_LEN) {
                        conn.send(Kind::Data, part)?;
                    }
                    Ok(())
                }
                None => conn.send_json(&StateHeader::Unavailable { have: newest }),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("peer holds the state for round {have:?}, not {want:?}")]
    Unavailable {
        want: Option<u64>,
        have: Option<u64>,
    },
    #[error("state from {peer} is damaged: {what}")]
    Damaged { peer: String, what: String },
}

/// Fetches a peer's training state, verifying its length and BLAKE3 hash.
pub fn fetch_state(
    addr: &str,
    auth: &Auth,
    run_id: u64,
    next_round: Option<u64>,
    max_bytes: u64,
    timeout: Duration,
) -> Result<Snapshot, FetchError> {
    let mut conn = wire::connect(addr, auth, run_id, timeout)?;
    conn.send_json(&PeerHello::State { next_round })?;
    let (round, len, hash) = match conn.recv_json::<StateHeader>()? {
        StateHeader::Sending {
            next_round,
            bytes,
            blake3,
        } => (next_round, bytes, blake3),
        StateHeader::Unavailable { have } => {
            return Err(FetchError::Unavailable {
                want: next_round,
                have,
            });
        }
    };
    let damaged = |what: String| FetchError::Damaged {
        peer: addr.to_string(),
        what,
    };
    if len > max_bytes {
        return Err(damaged(format!(
            "{len} bytes exceeds the limit of {max_bytes}"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    while (bytes.len() as u64) < len {
        let (kind, part) = conn.recv(MAX_DATA_LEN)?;
        if kind != Kind::Data || part.is_empty() || bytes.len() as u64 + part.len() as u64 > len {
            return Err(damaged("unexpected frame in state transfer".into()));
        }
        bytes.extend_from_slice(&part);
    }
    if blake3::hash(&bytes).to_hex().as_str() != hash {
        return Err(damaged("BLAKE3 mismatch".into()));
    }
    Ok(Snapshot {
        next_round: round,
        bytes,
    })
}

/// Fetches the state that starts `round` from the first of `peers` that has it. A peer that
/// does not have it yet (it publishes just after it applies a commit) is asked again until
/// `patience` runs out; when every peer fails otherwise (gone, refused, damaged), the last
/// error comes back at once. A state announced larger than `max_bytes` (the caller knows the
/// model, so its real size) is refused before any of it is received or reserved.
pub fn fetch_state_from(
    peers: &[String],
    auth: &Auth,
    run_id: u64,
    round: u64,
    max_bytes: u64,
    timeout: Duration,
    patience: Duration,
) -> Result<(String, Snapshot), FetchError> {
    let started = Instant::now();
    loop {
        let mut waiting = None;
        let mut failed = None;
        for peer in peers {
            match fetch_state(peer, auth, run_id, Some(round), max_bytes, timeout) {
                Ok(s) => return Ok((peer.clone(), s)),
                Err(e @ FetchError::Unavailable { .. }) => waiting = Some(e),
                Err(e) => failed = Some(e),
            }
        }
        match (waiting, failed) {
            (Some(e), _) if started.elapsed() < patience => {
                tracing::debug!("state of round {round} not published yet: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            (Some(e), _) | (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(FetchError::Unavailable {
                    want: Some(round),
                    have: None,
                });
            }
        }
    }
}
