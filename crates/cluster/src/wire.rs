//! Framed, authenticated TCP.
//!
//! Every frame is a 20-byte header — magic `HFST`, protocol version (u16), kind (u8), a zero
//! byte, run id (u64), payload length (u32), all little-endian — then the payload. A reader
//! checks the header and bounds the length *before* allocating, and every read and write has
//! a deadline, so a peer that stalls or lies costs a timeout, never a hang or an OOM.
//!
//! Before anything else crosses a connection, both ends prove they hold the run's shared
//! secret: each sends a fresh 32-byte nonce and answers the other's with a MAC (BLAKE3 in
//! keyed mode, key derived from the secret) over both nonces, its role and the run id. The
//! secret itself never crosses the wire.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 4] = *b"HFST";
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 20;
/// Largest control message (JSON); tensor data travels in its own bounded chunks.
pub const MAX_CONTROL_LEN: usize = 1 << 20;
/// Largest data frame: one chunk of a collective or of a state transfer.
pub const MAX_DATA_LEN: usize = 8 << 20;

const KEY_CONTEXT: &str = "holdfast 2026-11 peer authentication v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Accepted = 4,
    Refused = 5,
    /// A JSON control message.
    Control = 6,
    /// Raw little-endian f32 values or opaque bytes.
    Data = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Proof,
            4 => Kind::Accepted,
            5 => Kind::Refused,
            6 => Kind::Control,
            7 => Kind::Data,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer}: timed out after {after:?}")]
    Timeout { peer: String, after: Duration },
    #[error("{peer}: protocol error: {what}")]
    Protocol { peer: String, what: String },
    #[error("{peer}: authentication failed: {what}")]
    Auth { peer: String, what: String },
    #[error("{peer}: refused: {why}")]
    Refused { peer: String, why: String },
}

impl WireError {
    /// True when the peer went silent rather than away (the failure a hang produces).
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Timeout { .. })
    }
}

/// The shared secret of a run, as a MAC key.
#[derive(Clone)]
pub struct Auth {
    key: [u8; 32],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(<secret>)")
    }
}

impl Auth {
    pub fn new(secret: &[u8]) -> Auth {
        Auth {
            key: blake3::derive_key(KEY_CONTEXT, secret),
        }
    }

    fn mac(&self, role: &[u8], first: &[u8; 32], second: &[u8; 32], run_id: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(role);
        h.update(first);
        h.update(second);
        h.update(&run_id.to_le_bytes());
        h.finalize()
    }
}

/// A random value from the OS, for nonces, run ids and secrets.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b
}

/// `values` as little-endian bytes: the payload of a data frame.
pub fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One authenticated connection. Reads and writes time out after `timeout`.
pub struct Conn {
    stream: TcpStream,
    peer: String,
    run_id: u64,
    timeout: Duration,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({}, run {:016x})", self.peer, self.run_id)
    }
}

impl Conn {
    fn raw(stream: TcpStream, timeout: Duration, run_id: u64) -> Result<Conn, WireError> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into());
        let io = |source| WireError::Io {
            peer: peer.clone(),
            source,
        };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(Conn {
            stream,
            peer,
            run_id,
            timeout,
            bytes_sent: 0,
            bytes_received: 0,
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// Changes the per-read/write deadline (a long collective may use a longer one).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), WireError> {
        self.timeout = timeout;
        let r = self
            .stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| self.stream.set_write_timeout(Some(timeout)));
        r.map_err(|e| self.io_err(e))
    }

    fn io_err(&self, e: std::io::Error) -> WireError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Timeout {
                peer: self.peer.clone(),
                after: self.timeout,
            },
            _ => WireError::Io {
                peer: self.peer.clone(),
                source: e,
            },
        }
    }

    fn protocol(&self, what: impl Into<String>) -> WireError {
        WireError::Protocol {
            peer: self.peer.clone(),
            what: what.into(),
        }
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= MAX_DATA_LEN.max(MAX_CONTROL_LEN))
            .ok_or_else(|| {
                self.protocol(format!("frame of {} bytes is too long", payload.len()))
            })?;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header[6] = kind as u8;
        header[8..16].copy_from_slice(&self.run_id.to_le_bytes());
        header[16..20].copy_from_slice(&len.to_le_bytes());
        self.stream
            .write_all(&header)
            .and_then(|_| self.stream.write_all(payload))
            .map_err(|e| self.io_err(e))?;
        self.bytes_sent += (HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    /// Reads one frame, refusing a payload over `max_len` before allocating it.
    pub fn recv(&mut self, max_len: usize) -> Result<(Kind, Vec<u8>), WireError> {
        let mut header = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut header)
            .map_err(|e| self.io_err(e))?;
        if header[0..4] != MAGIC {
            return Err(self.protocol("not a holdfast frame (bad magic)"));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != PROTOCOL_VERSION {
            return Err(self.protocol(format!(
                "protocol version {version}, this build speaks {PROTOCOL_VERSION}"
            )));
        }
        let kind = Kind::from_u8(header[6])
            .ok_or_else(|| self.protocol(format!("unknown frame kind {}", header[6])))?;
        let run_id = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        // Handshake frames are checked by the handshake (the run id is bound into the MACs);
        // after it, every frame must name this run.
        let handshake = matches!(kind, Kind::Hello | Kind::Challenge | Kind::Refused);
        if !handshake && run_id != self.run_id {
            return Err(self.protocol(format!(
                "frame for run {run_id:016x}, this is run {:016x}",
                self.run_id
            )));
        }
        let len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
        if len > max_len {
            return Err(self.protocol(format!(
                "frame of {len} bytes exceeds the limit of {max_len}"
            )));
        }
        let mut payload = vec![0u8; len];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| self.io_err(e))?;
        self.bytes_received += (HEADER_LEN + len) as u64;
        if kind == Kind::Refused {
            return Err(WireError::Refused {
                peer: self.peer.clone(),
                why: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok((kind, payload))
    }

    fn expect(&mut self, want: Kind, max_len: usize) -> Result<Vec<u8>, WireError> {
        let (kind, payload) = self.recv(max_len)?;
        if kind != want {
            return Err(self.protocol(format!("expected {want:?}, got {kind:?}")));
        }
        Ok(payload)
    }

    pub fn send_json<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(msg).expect("control messages serialise");
        self.send(Kind::Control, &bytes)
    }

    pub fn recv_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, WireError> {
        let payload = self.expect(Kind::Control, MAX_CONTROL_LEN)?;
        serde_json::from_slice(&payload)
            .map_err(|e| self.protocol(format!("malformed control message: {e}")))
    }

    pub fn send_f32(&mut self, values: &[f32]) -> Result<(), WireError> {
        self.send(Kind::Data, &f32_le_bytes(values))
    }

    /// Receives exactly `out.len()` f32 values in one data frame.
    pub fn recv_f32_into(&mut self, out: &mut [f32]) -> Result<(), WireError> {
        let payload = self.expect(Kind::Data, out.len() * 4)?;
        if payload.len() != out.len() * 4 {
            return Err(self.protocol(format!(
                "data frame of {} bytes, expected {}",
                payload.len(),
                out.len() * 4
            )));
        }
        for (o, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
            *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        Ok(())
    }

    pub fn refuse(&mut self, why: &str) {
        let _ = self.send(Kind::Refused, why.as_bytes());
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// A second handle on the same socket, for a writer thread.
    pub fn try_clone(&self) -> Result<Conn, WireError> {
        let stream = self.stream.try_clone().map_err(|e| self.io_err(e))?;
        Ok(Conn {
            stream,
            peer: self.peer.clone(),
            run_id: self.run_id,
            timeout: self.timeout,
            bytes_sent: 0,
            bytes_received: 0,
        })
    }
}

/// Connects to `addr` and authenticates. `run_id` 0 accepts whichever run the server runs (a
/// worker joining a coordinator); otherwise the server must be in that run.
pub fn connect(addr: &str, auth: &Auth, run_id: u64, timeout: Duration) -> Result<Conn, WireError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| WireError::Io {
            peer: addr.to_string(),
            source,
        })?
        .collect();
    let target = addrs.first().ok_or_else(|| WireError::Protocol {
        peer: addr.to_string(),
        what: "address resolves to nothing".into(),
    })?;
    let stream = TcpStream::connect_timeout(target, timeout).map_err(|source| {
        if source.kind() == std::io::ErrorKind::TimedOut {
            WireError::Timeout {
                peer: addr.to_string(),
                after: timeout,
            }
        } else {
            WireError::Io {
                peer: addr.to_string(),
                source,
            }
        }
    })?;
    let mut conn = Conn::raw(stream, timeout, run_id)?;
    let client_nonce: [u8; 32] = random_bytes();
    conn.send(Kind::Hello, &client_nonce)?;
    // Challenge: server nonce (32) ‖ server MAC (32) ‖ run id (8).
    let challenge = conn.expect(Kind::Challenge, 72)?;
    if challenge.len() != 72 {
        return Err(conn.protocol("short challenge"));
    }
    let server_nonce: [u8; 32] = challenge[0..32].try_into().expect("32 bytes");
    let server_mac: [u8; 32] = challenge[32..64].try_into().expect("32 bytes");
    let server_run = u64::from_le_bytes(challenge[64..72].try_into().expect("8 bytes"));
    if run_id != 0 && server_run != run_id {
        return Err(WireError::Auth {
            peer: conn.peer.clone(),
            what: format!("peer is in run {server_run:016x}, expected {run_id:016x}"),
        });
    }
    if auth.mac(b"server", &client_nonce, &server_nonce, server_run) != server_mac {
        return Err(WireError::Auth {
            peer: conn.peer.clone(),
            what: "peer does not hold this run's secret".into(),
        });
    }
    conn.run_id = server_run;
    let proof = auth.mac(b"client", &server_nonce, &client_nonce, server_run);
    conn.send(Kind::Proof, proof.as_bytes())?;
    conn.expect(Kind::Accepted, 0)?;
    Ok(conn)
}

/// Authenticates an accepted connection as the server side of run `run_id`. The whole
/// handshake must finish within `timeout`.
pub fn accept(
    stream: TcpStream,
    auth: &Auth,
    run_id: u64,
    timeout: Duration,
) -> Result<Conn, WireError> {
    let started = Instant::now();
    let mut conn = Conn::raw(stream, timeout, run_id)?;
    let hello = match conn.expect(Kind::Hello, 32) {
        Ok(h) => h,
        Err(e) => {
            conn.refuse("expected an authenticated holdfast hello");
            return Err(e);
        }
    };
    if hello.len() != 32 {
        conn.refuse("malformed hello");
        return Err(conn.protocol("malformed hello"));
    }
    let client_nonce: [u8; 32] = hello.try_into().expect("32 bytes");
    let server_nonce: [u8; 32] = random_bytes();
    let mut challenge = Vec::with_capacity(72);
    challenge.extend_from_slice(&server_nonce);
    challenge.extend_from_slice(
        auth.mac(b"server", &client_nonce, &server_nonce, run_id)
            .as_bytes(),
    );
    challenge.extend_from_slice(&run_id.to_le_bytes());
    conn.send(Kind::Challenge, &challenge)?;
    let proof = conn.expect(Kind::Proof, 32)?;
    let want = auth.mac(b"client", &server_nonce, &client_nonce, run_id);
    // blake3::Hash compares in constant time.
    if proof.len() != 32 || blake3::Hash::from_bytes(proof.try_into().expect("32 bytes")) != want {
        conn.refuse("authentication failed");
        return Err(WireError::Auth {
            peer: conn.peer.clone(),
            what: "wrong secret".into(),
        });
    }
    if started.elapsed() > timeout {
        return Err(WireError::Timeout {
            peer: conn.peer.clone(),
            after: timeout,
        });
    }
    conn.send(Kind::Accepted, &[])?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn server(
        secret: &'static [u8],
        run_id: u64,
    ) -> (String, std::thread::JoinHandle<Result<Conn, WireError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, &Auth::new(secret), run_id, Duration::from_secs(2))
        });
        (addr, h)
    }

    #[test]
    fn authenticated_exchange_round_trips_messages_and_floats() {
        let (addr, h) = server(b"s3cret", 42);
        let mut c = connect(&addr, &Auth::new(b"s3cret"), 0, Duration::from_secs(2)).unwrap();
        assert_eq!(c.run_id(), 42);
        let mut s = h.join().unwrap().unwrap();
        c.send_json(&serde_json::json!({"hi": 1})).unwrap();
        let v: serde_json::Value = s.recv_json().unwrap();
        assert_eq!(v["hi"], 1);
        s.send_f32(&[1.5, -0.0, f32::MAX]).unwrap();
        let mut out = [0f32; 3];
        c.recv_f32_into(&mut out).unwrap();
        assert_eq!(
            out.map(f32::to_bits),
            [1.5f32, -0.0, f32::MAX].map(f32::to_bits)
        );
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (addr, h) = server(b"right", 7);
        let err = connect(&addr, &Auth::new(b"wrong"), 0, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, WireError::Auth { .. }), "{err}");
        // The client gave up at the server's MAC; the server sees no valid proof.
        assert!(h.join().unwrap().is_err());
    }

    #[test]
    fn wrong_run_is_refused() {
        let (addr, _h) = server(b"k", 7);
        let err = connect(&addr, &Auth::new(b"k"), 8, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused_without_allocation() {
        // Garbage instead of a hello.
        let (addr, h) = server(b"k", 1);
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let err = h.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");

        // A hello header announcing 4 GiB.
        let (addr, h) = server(b"k", 1);
        let mut raw = TcpStream::connect(&addr).unwrap();
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header[6] = Kind::Hello as u8;
        header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        raw.write_all(&header).unwrap();
        let err = h.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn silent_peer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, &Auth::new(b"k"), 1, Duration::from_millis(200))
        });
        let _silent = TcpStream::connect(&addr).unwrap();
        let started = Instant::now();
        let err = h.join().unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
