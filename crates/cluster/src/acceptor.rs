//! A TCP listener that serves each connection on a thread of its own until it is dropped:
//! what the coordinator and every worker's peer endpoint run.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Acceptor {
    pub addr: String,
    stop: Arc<AtomicBool>,
}

impl Acceptor {
    /// Binds `listen` (e.g. `127.0.0.1:0`) and calls `handle` for each connection.
    pub fn start(
        listen: &str,
        handle: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> std::io::Result<Acceptor> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = Arc::new(handle);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let handle = handle.clone();
                std::thread::spawn(move || handle(stream));
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
