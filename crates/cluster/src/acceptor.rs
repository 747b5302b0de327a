//! A TCP listener that serves each connection on a thread of its own until it is dropped:
//! what the coordinator and every worker's peer endpoint run.
//!
//! Connections that have not authenticated yet are capped: past the cap a new connection is
//! closed at once, so a flood of idle or trickling strangers costs a bounded number of threads
//! (each also bounded in time by the handshake's deadline).

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Connections allowed to be mid-handshake at once, per listener.
pub const MAX_UNAUTHENTICATED: usize = 64;

pub struct Acceptor {
    pub addr: String,
    stop: Arc<AtomicBool>,
}

/// Held by a connection until it has authenticated (drop it then); counts against the cap.
pub struct Unauthenticated(Arc<AtomicUsize>);

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Acceptor {
    /// Binds `listen` (e.g. `127.0.0.1:0`) and calls `handle` for each connection, with at most
    /// `max_unauthenticated` of them holding their [`Unauthenticated`] at once.
    pub fn start(
        listen: &str,
        max_unauthenticated: usize,
        handle: impl Fn(TcpStream, Unauthenticated) + Send + Sync + 'static,
    ) -> std::io::Result<Acceptor> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = Arc::new(handle);
        let pending = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let admitted = pending.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < max_unauthenticated).then_some(n + 1)
                });
                if admitted.is_err() {
                    tracing::warn!(
                        "closed a connection: {max_unauthenticated} others have not authenticated yet"
                    );
                    continue;
                }
                let (handle, guard) = (handle.clone(), Unauthenticated(pending.clone()));
                std::thread::spawn(move || handle(stream, guard));
            }
        });
        Ok(Acceptor { addr, stop })
    }

    /// Set once the acceptor is dropped, for companion threads to stop with it.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        if let Ok(addr) = self.addr.parse() {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::mpsc;

    #[test]
    fn connections_past_the_unauthenticated_cap_are_closed_at_once() {
        // The handler holds its guard until told to "authenticate".
        let (tx, rx) = mpsc::channel::<mpsc::Sender<()>>();
        let tx = std::sync::Mutex::new(tx);
        let a = Acceptor::start("127.0.0.1:0", 2, move |stream, guard| {
            let (done_tx, done_rx) = mpsc::channel();
            tx.lock().unwrap().send(done_tx).unwrap();
            let _ = done_rx.recv();
            drop(guard);
            // Authenticated: keep the connection open a while.
            std::thread::sleep(Duration::from_millis(500));
            drop(stream);
        })
        .unwrap();
        let open = |a: &Acceptor| {
            let s = TcpStream::connect(&a.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            s
        };
        // Closed at once: EOF; still open: the read times out.
        let closed = |mut s: TcpStream| matches!(s.read(&mut [0u8; 1]), Ok(0));
        let (s1, s2) = (open(&a), open(&a));
        let (h1, _h2) = (rx.recv().unwrap(), rx.recv().unwrap());
        assert!(closed(open(&a)), "a third stranger is turned away");
        h1.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let s4 = open(&a);
        assert!(!closed(s4), "a slot is free once one authenticated");
        drop((s1, s2));
    }
}
