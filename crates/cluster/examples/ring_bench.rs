//! The ring all-reduce on loopback: `cargo run --release -p holdfast-cluster --example
//! ring_bench -- [RANKS] [MILLION_FLOATS] [REPEATS]` prints one JSON line per repeat (seconds
//! and effective bus bandwidth, 2(n-1)/n of the buffer per rank). On one machine every rank
//! shares its cores, so this measures the cost of framing and encryption, not a network.

use std::time::{Duration, Instant};

use holdfast_cluster::peer::PeerServer;
use holdfast_cluster::ring::{RingSpec, all_reduce_sum};
use holdfast_cluster::wire::Auth;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (ranks, floats, repeats) = (arg(1, 4), arg(2, 8) * 1_000_000, arg(3, 5));
    let auth = Auth::new(b"00112233445566778899aabbccddeeff").expect("a strong secret");
    let timeout = Duration::from_secs(60);
    let servers: Vec<PeerServer> = (0..ranks)
        .map(|_| PeerServer::start("127.0.0.1:0", auth.clone(), 1, timeout).expect("listen"))
        .collect();
    let members: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    for attempt in 0..repeats as u32 {
        let started = Instant::now();
        std::thread::scope(|s| {
            for (rank, server) in servers.iter().enumerate() {
                let spec = RingSpec {
                    round: 0,
                    attempt,
                    members: members.clone(),
                    rank,
                };
                let (auth, inbox) = (auth.clone(), server.inbox.clone());
                s.spawn(move || {
                    let mut buf = vec![rank as f32; floats];
                    all_reduce_sum(&mut buf, &spec, &auth, 1, &inbox, timeout).expect("ring");
                });
            }
        });
        let seconds = started.elapsed().as_secs_f64();
        let bus = 2.0 * (ranks - 1) as f64 / ranks as f64 * (floats * 4) as f64;
        println!(
            "{{\"ranks\": {ranks}, \"floats\": {floats}, \"seconds\": {seconds:.4}, \"bus_gb_per_s\": {:.3}}}",
            bus / seconds / 1e9
        );
    }
}
