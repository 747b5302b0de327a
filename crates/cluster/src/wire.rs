//! Framed, authenticated and encrypted TCP.
//!
//! Every frame starts with a 20-byte header — magic `HFST`, protocol version (u16), kind (u8),
//! a zero byte, run id (u64), body length (u32), all little-endian. A reader checks the header
//! and bounds the length *before* allocating, and every read and write has a deadline, so a
//! peer that stalls or lies costs a timeout, never a hang or an OOM.
//!
//! A connection opens with a Noise handshake (`Noise_NNpsk0_25519_AESGCM_SHA256`, by the
//! `snow` crate): fresh ephemeral keys on both sides, the run's shared secret as the pre-shared
//! key, the run id in the first two messages. Only a holder of the secret completes it, and it
//! yields session keys of this connection alone. The whole handshake has one deadline. After
//! it, every frame is `Sealed`: its kind and payload travel encrypted and authenticated in
//! Noise transport messages, whose implicit nonces count the frames — a tampered, replayed,
//! reordered or spliced frame fails authentication, and the connection is dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 4] = *b"HFST";
pub const PROTOCOL_VERSION: u16 = 2;
pub const HEADER_LEN: usize = 20;
/// Largest control message (JSON); tensor data travels in its own bounded chunks.
pub const MAX_CONTROL_LEN: usize = 1 << 20;
/// Largest data frame: one chunk of a collective or of a state transfer.
pub const MAX_DATA_LEN: usize = 8 << 20;

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const PROLOGUE: &[u8] = b"holdfast wire v2";
const KEY_CONTEXT: &str = "holdfast 2026-11 peer authentication v1";
/// Largest Noise message, and the AEAD tag each carries.
const NOISE_MAX: usize = 65535;
const TAG_LEN: usize = 16;
/// The largest handshake message (an ephemeral key, a run id, a tag).
const HANDSHAKE_MAX: usize = 128;
/// Secrets weaker than this are refused: the handshake can be searched offline for the secret.
pub const MIN_SECRET_BITS: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake, first message (cleartext frame holding a Noise message).
    Hello = 1,
    /// Handshake, second message.
    Challenge = 2,
    /// A refusal, in cleartext before the handshake ends, sealed after.
    Refused = 5,
    /// A JSON control message.
    Control = 6,
    /// Raw little-endian f32 values or opaque bytes.
    Data = 7,
    /// After the handshake: the encrypted kind and payload of one of the above.
    Sealed = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            5 => Kind::Refused,
            6 => Kind::Control,
            7 => Kind::Data,
            8 => Kind::Sealed,
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

/// A shared secret too weak to protect a run.
#[derive(Debug, thiserror::Error)]
#[error(
    "the shared secret has about {bits} bits; at least {MIN_SECRET_BITS} are needed (`holdfast secret` prints a fresh 256-bit one)"
)]
pub struct WeakSecret {
    pub bits: usize,
}

/// The run's shared secret, as the handshake's pre-shared key.
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
    /// A key from `secret`, which must carry at least [`MIN_SECRET_BITS`]: a hex string counts
    /// 4 bits a digit, anything else 8 bits a byte (an upper bound: use a random secret).
    pub fn new(secret: &[u8]) -> Result<Auth, WeakSecret> {
        let hex = !secret.is_empty() && secret.iter().all(u8::is_ascii_hexdigit);
        let bits = secret.len() * if hex { 4 } else { 8 };
        if bits < MIN_SECRET_BITS {
            return Err(WeakSecret { bits });
        }
        Ok(Auth {
            key: blake3::derive_key(KEY_CONTEXT, secret),
        })
    }

    fn handshake(&self, initiator: bool) -> Result<snow::HandshakeState, snow::Error> {
        let params = NOISE_PARAMS.parse().expect("valid Noise parameters");
        let builder = snow::Builder::new(params)
            .prologue(PROLOGUE)?
            .psk(0, &self.key)?;
        if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
    }
}

/// A 128-bit secret for tests.
#[cfg(test)]
pub(crate) const TEST_SECRET: &[u8] = b"00112233445566778899aabbccddeeff";

/// A fresh random secret, as hex: what `holdfast secret` prints.
pub fn fresh_secret() -> String {
    random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

/// A sealed frame's body: the kind alone in one Noise message, then the payload in as many
/// as it takes (so the payload is encrypted where it lies, without a copy to prefix it).
const KIND_MESSAGE_LEN: usize = 1 + TAG_LEN;

/// The sealed size of a `payload`-byte frame: one tag per Noise message.
fn sealed_len(payload: usize) -> usize {
    KIND_MESSAGE_LEN + payload + payload.div_ceil(NOISE_MAX - TAG_LEN) * TAG_LEN
}

/// One authenticated, encrypted connection. Reads and writes time out after `timeout`.
pub struct Conn {
    stream: TcpStream,
    peer: String,
    run_id: u64,
    timeout: Duration,
    /// The session's keys and frame counters; None only during the handshake.
    noise: Option<snow::TransportState>,
    /// A frame failed authentication: nothing more is read or sent.
    broken: bool,
    /// The handshake's deadline: every read before it ends is bounded by what is left.
    deadline: Option<Instant>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({}, run {:016x})", self.peer, self.run_id)
    }
}

/// Shuts a connection down from another thread (the handle owns no session state).
pub struct ShutdownHandle(TcpStream);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
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
            noise: None,
            broken: false,
            deadline: None,
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

    /// Fills `buf`. Before the handshake's deadline, each read waits only for what is left
    /// of it: a peer trickling a byte at a time cannot stretch the handshake.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        let Some(deadline) = self.deadline else {
            return self.stream.read_exact(buf).map_err(|e| self.io_err(e));
        };
        let mut at = 0;
        while at < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Timeout {
                    peer: self.peer.clone(),
                    after: self.timeout,
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io_err(e))?;
            match self.stream.read(&mut buf[at..]) {
                Ok(0) => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(self.io_err(eof));
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(())
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

    /// A frame that failed authentication: the connection is dropped.
    fn forged(&mut self) -> WireError {
        self.broken = true;
        self.shutdown();
        WireError::Auth {
            peer: self.peer.clone(),
            what: "a frame failed authentication (tampered, replayed, reordered or from another session); connection dropped".into(),
        }
    }

    fn write_frame(&mut self, kind: Kind, body: &[u8]) -> Result<(), WireError> {
        let len = u32::try_from(body.len())
            .map_err(|_| self.protocol(format!("frame of {} bytes is too long", body.len())))?;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header[6] = kind as u8;
        header[8..16].copy_from_slice(&self.run_id.to_le_bytes());
        header[16..20].copy_from_slice(&len.to_le_bytes());
        self.stream
            .write_all(&header)
            .and_then(|_| self.stream.write_all(body))
            .map_err(|e| self.io_err(e))?;
        self.bytes_sent += (HEADER_LEN + body.len()) as u64;
        Ok(())
    }

    /// Reads one frame's header and body, refusing a body over `max_len` before allocating.
    fn read_frame(&mut self, max_len: usize) -> Result<(Kind, Vec<u8>), WireError> {
        let mut header = [0u8; HEADER_LEN];
        self.read_full(&mut header)?;
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
        if header[7] != 0 {
            return Err(self.protocol("reserved header byte is not zero"));
        }
        // Before the handshake ends the run id is the handshake's to check; after, every frame
        // names this run (the header is not sealed, so it is checked whole instead).
        let run_id = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if self.noise.is_some() && run_id != self.run_id {
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
        let mut body = vec![0u8; len];
        self.read_full(&mut body)?;
        self.bytes_received += (HEADER_LEN + len) as u64;
        Ok((kind, body))
    }

    /// Sends one frame: sealed once the handshake is done.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        if payload.len() > MAX_DATA_LEN.max(MAX_CONTROL_LEN) {
            return Err(self.protocol(format!("frame of {} bytes is too long", payload.len())));
        }
        if self.broken {
            return Err(self.protocol("the connection was dropped after a forged frame"));
        }
        let Some(noise) = self.noise.as_mut() else {
            return self.write_frame(kind, payload);
        };
        let mut sealed = vec![0u8; sealed_len(payload.len())];
        let mut at = 0;
        for chunk in std::iter::once(&[kind as u8][..]).chain(payload.chunks(NOISE_MAX - TAG_LEN)) {
            at += noise
                .write_message(chunk, &mut sealed[at..])
                .expect("a Noise message within its size limit");
        }
        debug_assert_eq!(at, sealed.len());
        self.write_frame(Kind::Sealed, &sealed)
    }

    /// Reads one frame, refusing a payload over `max_len` before allocating it.
    pub fn recv(&mut self, max_len: usize) -> Result<(Kind, Vec<u8>), WireError> {
        if self.broken {
            return Err(self.protocol("the connection was dropped after a forged frame"));
        }
        let sealed = self.noise.is_some();
        let limit = if sealed { sealed_len(max_len) } else { max_len };
        let (kind, body) = self.read_frame(limit)?;
        let (kind, payload) = match (sealed, kind) {
            (false, Kind::Sealed) => {
                return Err(self.protocol("a sealed frame before the handshake"));
            }
            (false, kind) => (kind, body),
            (true, Kind::Sealed) => self.open(&body)?,
            // After the handshake nothing travels in the clear: an injected frame.
            (true, _) => return Err(self.forged()),
        };
        if payload.len() > max_len {
            return Err(self.protocol(format!(
                "frame of {} bytes exceeds the limit of {max_len}",
                payload.len()
            )));
        }
        if kind == Kind::Refused {
            return Err(WireError::Refused {
                peer: self.peer.clone(),
                why: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok((kind, payload))
    }

    /// Decrypts and authenticates a sealed body into its kind and payload.
    fn open(&mut self, body: &[u8]) -> Result<(Kind, Vec<u8>), WireError> {
        let noise = self
            .noise
            .as_mut()
            .expect("sealed only after the handshake");
        let Some((kind_message, rest)) = body.split_at_checked(KIND_MESSAGE_LEN) else {
            return Err(self.forged());
        };
        let mut kind = [0u8; KIND_MESSAGE_LEN];
        let mut ok = noise.read_message(kind_message, &mut kind) == Ok(1);
        let tags = rest.len().div_ceil(NOISE_MAX) * TAG_LEN;
        let mut payload = vec![0u8; rest.len().saturating_sub(tags)];
        let mut at = 0;
        for chunk in rest.chunks(NOISE_MAX) {
            if !ok {
                break;
            }
            match noise.read_message(chunk, &mut payload[at..]) {
                Ok(n) => at += n,
                Err(_) => ok = false,
            }
        }
        let kind = Kind::from_u8(kind[0]).filter(|k| {
            ok && at == payload.len() && matches!(k, Kind::Control | Kind::Data | Kind::Refused)
        });
        match kind {
            Some(kind) => Ok((kind, payload)),
            None => Err(self.forged()),
        }
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

    /// A handle that can shut this connection down from another thread (a writer thread may
    /// be blocked on it).
    pub fn shutdown_handle(&self) -> Result<ShutdownHandle, WireError> {
        let stream = self.stream.try_clone().map_err(|e| self.io_err(e))?;
        Ok(ShutdownHandle(stream))
    }

    /// Restores the per-operation deadline after the handshake's.
    fn finish_handshake(&mut self, hs: snow::HandshakeState) -> Result<(), WireError> {
        let transport = hs
            .into_transport_mode()
            .map_err(|e| self.protocol(format!("handshake: {e}")))?;
        self.noise = Some(transport);
        self.deadline = None;
        let timeout = self.timeout;
        self.set_timeout(timeout)
    }
}

/// Connects to `addr` and authenticates. `run_id` 0 accepts whichever run the server runs (a
/// worker joining a coordinator); otherwise the server must be in that run. The handshake
/// must finish within `timeout`.
pub fn connect(addr: &str, auth: &Auth, run_id: u64, timeout: Duration) -> Result<Conn, WireError> {
    let deadline = Instant::now() + timeout;
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
    conn.deadline = Some(deadline);
    let mut hs = auth
        .handshake(true)
        .map_err(|e| conn.protocol(format!("handshake: {e}")))?;
    let mut msg = [0u8; HANDSHAKE_MAX];
    let n = hs
        .write_message(&run_id.to_le_bytes(), &mut msg)
        .map_err(|e| conn.protocol(format!("handshake: {e}")))?;
    conn.send(Kind::Hello, &msg[..n])?;
    let reply = conn.expect(Kind::Challenge, HANDSHAKE_MAX)?;
    let mut payload = [0u8; HANDSHAKE_MAX];
    let server_run = match hs.read_message(&reply, &mut payload) {
        Ok(8) => u64::from_le_bytes(payload[..8].try_into().expect("8 bytes")),
        _ => {
            return Err(WireError::Auth {
                peer: conn.peer.clone(),
                what: "peer does not hold this run's secret".into(),
            });
        }
    };
    if run_id != 0 && server_run != run_id {
        return Err(WireError::Auth {
            peer: conn.peer.clone(),
            what: format!("peer is in run {server_run:016x}, expected {run_id:016x}"),
        });
    }
    conn.run_id = server_run;
    conn.finish_handshake(hs)?;
    Ok(conn)
}

/// Authenticates an accepted connection as the server side of run `run_id`. The whole
/// handshake must finish within `timeout`, however slowly its bytes arrive.
pub fn accept(
    stream: TcpStream,
    auth: &Auth,
    run_id: u64,
    timeout: Duration,
) -> Result<Conn, WireError> {
    let deadline = Instant::now() + timeout;
    let mut conn = Conn::raw(stream, timeout, run_id)?;
    conn.deadline = Some(deadline);
    let mut hs = auth
        .handshake(false)
        .map_err(|e| conn.protocol(format!("handshake: {e}")))?;
    let hello = match conn.expect(Kind::Hello, HANDSHAKE_MAX) {
        Ok(h) => h,
        Err(e) => {
            conn.refuse("expected an authenticated holdfast hello");
            return Err(e);
        }
    };
    let mut payload = [0u8; HANDSHAKE_MAX];
    let wanted = match hs.read_message(&hello, &mut payload) {
        Ok(8) => u64::from_le_bytes(payload[..8].try_into().expect("8 bytes")),
        _ => {
            conn.refuse("authentication failed: not this run's secret");
            return Err(WireError::Auth {
                peer: conn.peer.clone(),
                what: "wrong secret".into(),
            });
        }
    };
    if wanted != 0 && wanted != run_id {
        conn.refuse(&format!(
            "this peer is in run {run_id:016x}, not {wanted:016x}"
        ));
        return Err(WireError::Auth {
            peer: conn.peer.clone(),
            what: format!("wants run {wanted:016x}, this is {run_id:016x}"),
        });
    }
    let mut msg = [0u8; HANDSHAKE_MAX];
    let n = hs
        .write_message(&run_id.to_le_bytes(), &mut msg)
        .map_err(|e| conn.protocol(format!("handshake: {e}")))?;
    conn.send(Kind::Challenge, &msg[..n])?;
    conn.finish_handshake(hs)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// 128-bit secrets, as hex.
    const RIGHT: &[u8] = b"0123456789abcdef0123456789abcdef";
    const WRONG: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn auth(secret: &[u8]) -> Auth {
        Auth::new(secret).unwrap()
    }

    fn server_with(
        secret: &'static [u8],
        run_id: u64,
        timeout: Duration,
    ) -> (String, std::thread::JoinHandle<Result<Conn, WireError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, &auth(secret), run_id, timeout)
        });
        (addr, h)
    }

    fn server(
        secret: &'static [u8],
        run_id: u64,
    ) -> (String, std::thread::JoinHandle<Result<Conn, WireError>>) {
        server_with(secret, run_id, Duration::from_secs(2))
    }

    #[test]
    fn authenticated_exchange_round_trips_messages_and_floats() {
        let (addr, h) = server(RIGHT, 42);
        let mut c = connect(&addr, &auth(RIGHT), 0, Duration::from_secs(2)).unwrap();
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
        // A frame larger than one Noise message goes through whole.
        let big: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        c.send_f32(&big).unwrap();
        let mut back = vec![0f32; big.len()];
        s.recv_f32_into(&mut back).unwrap();
        assert_eq!(back, big);
    }

    #[test]
    fn nothing_readable_crosses_the_wire() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut bytes = Vec::new();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let _ = s.read_to_end(&mut bytes);
            bytes
        });
        // The handshake fails (nobody answers), but the client's hello went out: it holds
        // the run id sealed, not in the clear.
        let _ = connect(
            &addr,
            &auth(RIGHT),
            0x5eed_5eed_5eed_5eed,
            Duration::from_millis(300),
        );
        let bytes = h.join().unwrap();
        let id = 0x5eed_5eed_5eed_5eedu64.to_le_bytes();
        assert!(!bytes[HEADER_LEN..].windows(8).any(|w| w == id));
    }

    #[test]
    fn weak_secrets_are_refused() {
        for weak in [
            &b""[..],
            b"short",
            b"0123456789abcdef0123456789abcde",
            b"fifteen chars!!",
        ] {
            let err = Auth::new(weak).unwrap_err();
            assert!(err.to_string().contains("holdfast secret"), "{err}");
        }
        assert!(Auth::new(RIGHT).is_ok());
        assert!(Auth::new(b"sixteen chars!!!").is_ok());
        assert!(Auth::new(fresh_secret().as_bytes()).is_ok());
        assert_ne!(fresh_secret(), fresh_secret());
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (addr, h) = server(RIGHT, 7);
        let err = connect(&addr, &auth(WRONG), 0, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("authentication failed"), "{err}");
        assert!(matches!(h.join().unwrap(), Err(WireError::Auth { .. })));
    }

    #[test]
    fn wrong_run_is_refused() {
        let (addr, h) = server(RIGHT, 7);
        let err = connect(&addr, &auth(RIGHT), 8, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("not 0000000000000008"), "{err}");
        assert!(h.join().unwrap().is_err());
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused_without_allocation() {
        // Garbage instead of a hello.
        let (addr, h) = server(RIGHT, 1);
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let err = h.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");

        // A hello header announcing 4 GiB.
        let (addr, h) = server(RIGHT, 1);
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
        let (addr, h) = server_with(RIGHT, 1, Duration::from_millis(200));
        let _silent = TcpStream::connect(&addr).unwrap();
        let started = Instant::now();
        let err = h.join().unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_trickled_handshake_meets_one_deadline() {
        // A byte every 50 ms never trips a per-read timeout of 300 ms; the handshake's own
        // deadline ends it.
        let (addr, h) = server_with(RIGHT, 1, Duration::from_millis(300));
        let mut raw = TcpStream::connect(&addr).unwrap();
        let started = Instant::now();
        let trickle = std::thread::spawn(move || {
            for b in MAGIC.iter().chain(&[0u8; 40]) {
                if raw.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let err = h.join().unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        trickle.join().unwrap();
    }

    /// Reads one whole frame (header and body) off a raw stream.
    fn raw_frame(s: &mut TcpStream) -> Vec<u8> {
        let mut frame = vec![0u8; HEADER_LEN];
        s.read_exact(&mut frame).unwrap();
        let len = u32::from_le_bytes(frame[16..20].try_into().unwrap()) as usize;
        frame.resize(HEADER_LEN + len, 0);
        s.read_exact(&mut frame[HEADER_LEN..]).unwrap();
        frame
    }

    /// A client and a server whose first two sealed client frames pass through `mangle` on
    /// the way (a man in the middle without the secret). The client has sent messages 1 and 2.
    fn through_mangler(mangle: fn(Vec<Vec<u8>>) -> Vec<Vec<u8>>) -> Conn {
        let (server_addr, h) = server(RIGHT, 3);
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_addr = proxy.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut client, _) = proxy.accept().unwrap();
            let mut server = TcpStream::connect(server_addr).unwrap();
            let mut back = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut back.1, &mut back.0));
            let hello = raw_frame(&mut client);
            server.write_all(&hello).unwrap();
            let sealed = vec![raw_frame(&mut client), raw_frame(&mut client)];
            for frame in mangle(sealed) {
                let _ = server.write_all(&frame);
            }
        });
        let mut c = connect(&proxy_addr, &auth(RIGHT), 3, Duration::from_secs(2)).unwrap();
        c.send_json(&serde_json::json!({"n": 1})).unwrap();
        c.send_json(&serde_json::json!({"n": 2})).unwrap();
        h.join().unwrap().unwrap()
    }

    fn next(s: &mut Conn) -> Result<u64, WireError> {
        let v: serde_json::Value = s.recv_json()?;
        Ok(v["n"].as_u64().unwrap())
    }

    fn assert_forged(r: Result<u64, WireError>) {
        let err = r.unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }

    #[test]
    fn tampered_replayed_reordered_and_injected_frames_are_refused() {
        let mut s = through_mangler(|f| f);
        assert_eq!((next(&mut s).unwrap(), next(&mut s).unwrap()), (1, 2));

        let mut s = through_mangler(|mut f| {
            let last = f[0].len() - 1;
            f[0][last] ^= 1;
            f
        });
        assert_forged(next(&mut s));
        assert!(next(&mut s).is_err(), "the connection is dropped");

        let mut s = through_mangler(|f| vec![f[0].clone(), f[0].clone(), f[1].clone()]);
        assert_eq!(next(&mut s).unwrap(), 1);
        assert_forged(next(&mut s));

        let mut s = through_mangler(|f| vec![f[1].clone(), f[0].clone()]);
        assert_forged(next(&mut s));

        // A cleartext control frame, as the old protocol sent them.
        let mut s = through_mangler(|f| {
            let body = br#"{"n": 99}"#;
            let mut frame = f[0][..HEADER_LEN].to_vec();
            frame[6] = Kind::Control as u8;
            frame[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(body);
            vec![frame, f[0].clone()]
        });
        assert_forged(next(&mut s));
    }

    #[test]
    fn a_frame_from_another_session_is_refused() {
        // Session A's first sealed frame, read raw where it arrives.
        let (addr, h) = server(RIGHT, 3);
        let mut a = connect(&addr, &auth(RIGHT), 3, Duration::from_secs(2)).unwrap();
        let a_server = h.join().unwrap().unwrap();
        a.send_json(&serde_json::json!({"n": 1})).unwrap();
        let frame = raw_frame(&mut a_server.stream.try_clone().unwrap());
        // Spliced into session B (same ends, same secret): B's keys cannot open it.
        let (addr, h) = server(RIGHT, 3);
        let b = connect(&addr, &auth(RIGHT), 3, Duration::from_secs(2)).unwrap();
        let mut b_server = h.join().unwrap().unwrap();
        b.stream.try_clone().unwrap().write_all(&frame).unwrap();
        assert_forged(next(&mut b_server));
    }

    /// Feeds `bytes` to the server side of a handshake, as a stranger would.
    fn accept_bytes(bytes: &[u8]) -> Result<Conn, WireError> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut raw = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s, _) = listener.accept().unwrap();
        let _ = raw.write_all(bytes);
        let _ = raw.shutdown(std::net::Shutdown::Write);
        accept(s, &auth(RIGHT), 1, Duration::from_millis(300))
    }

    fn header(kind: u8, len: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h[6] = kind;
        h[16..20].copy_from_slice(&len.to_le_bytes());
        h
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// A stranger's bytes, raw or behind a well-formed header, never pass the handshake
        /// and never panic it.
        #[test]
        fn fuzz_a_strangers_handshake_is_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            kind in 0u8..10,
        ) {
            proptest::prop_assert!(accept_bytes(&bytes).is_err());
            let mut framed = header(kind, bytes.len() as u32);
            framed.extend(&bytes);
            proptest::prop_assert!(accept_bytes(&framed).is_err());
        }

        /// Inside a session, forged or damaged frames are refused, never a panic.
        #[test]
        fn fuzz_forged_and_damaged_session_frames_are_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255),
                1..4,
            ),
            kind in 0u8..10,
        ) {
            let (addr, h) = server(RIGHT, 3);
            let c = connect(&addr, &auth(RIGHT), 3, Duration::from_secs(2)).unwrap();
            let mut s = h.join().unwrap().unwrap();
            let mut sender = c.stream.try_clone().unwrap();
            let mut forged = header(kind, bytes.len() as u32);
            forged[8..16].copy_from_slice(&3u64.to_le_bytes());
            forged.extend(&bytes);
            sender.write_all(&forged).unwrap();
            proptest::prop_assert!(s.recv(MAX_CONTROL_LEN).is_err());

            // A real sealed frame, damaged on the way.
            let (addr, h) = server(RIGHT, 3);
            let mut c = connect(&addr, &auth(RIGHT), 3, Duration::from_secs(2)).unwrap();
            let mut s = h.join().unwrap().unwrap();
            c.send_f32(&[1.0; 40]).unwrap();
            let mut frame = raw_frame(&mut s.stream.try_clone().unwrap());
            for (at, mask) in flips {
                let i = at.index(frame.len());
                frame[i] ^= mask;
            }
            c.stream.try_clone().unwrap().write_all(&frame).unwrap();
            c.shutdown();
            proptest::prop_assert!(s.recv(MAX_DATA_LEN).is_err());
        }
    }
}
