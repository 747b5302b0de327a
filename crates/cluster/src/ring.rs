//! Fault-tolerant ring all-reduce (sum) on a flat `f32` buffer: reduce-scatter then
//! all-gather, in chunks, with a writer thread so sending and receiving overlap.
//!
//! Every read and write has a deadline: if a peer dies or hangs, this returns an error within
//! the timeout on every survivor, and the caller's buffer must then be treated as garbage —
//! the caller keeps its own copy and retries the round on a re-formed ring. Each segment of
//! the result is summed at exactly one rank, in ring order fixed by the quorum, and then
//! copied to the others, so every member ends with bit-identical values.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::peer::{Inbox, PeerHello};
use crate::wire::{self, Auth, Kind, WireError, f32_le_bytes};

/// Floats per data frame (1 MiB).
pub const CHUNK: usize = 1 << 18;

#[derive(Clone, Debug)]
pub struct RingSpec {
    pub round: u64,
    pub attempt: u32,
    /// Peer addresses in rank order.
    pub members: Vec<String>,
    pub rank: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RingStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub seconds: f64,
}

pub(crate) fn segment(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    (i * len / n)..((i + 1) * len / n)
}

fn chunks(r: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    r.clone()
        .step_by(CHUNK)
        .map(move |s| s..(s + CHUNK).min(r.end))
}

/// Sums `buf` element-wise over the ring's members, in place.
pub fn all_reduce_sum(
    buf: &mut [f32],
    spec: &RingSpec,
    auth: &Auth,
    run_id: u64,
    inbox: &Inbox,
    timeout: Duration,
) -> Result<RingStats, WireError> {
    let started = Instant::now();
    let n = spec.members.len();
    if n <= 1 {
        return Ok(RingStats::default());
    }
    let rank = spec.rank;
    let next_addr = &spec.members[(rank + 1) % n];
    let mut next = wire::connect(next_addr, auth, run_id, timeout)?;
    next.send_json(&PeerHello::Ring {
        round: spec.round,
        attempt: spec.attempt,
        from_rank: rank,
    })?;
    let prev_rank = (rank + n - 1) % n;
    let (from, mut prev) = inbox
        .take((spec.round, spec.attempt), Instant::now() + timeout)
        .ok_or_else(|| WireError::Timeout {
            peer: spec.members[prev_rank].clone(),
            after: timeout,
        })?;
    if from != prev_rank {
        return Err(WireError::Protocol {
            peer: prev.peer().to_string(),
            what: format!("ring predecessor claims rank {from}, expected {prev_rank}"),
        });
    }
    // The peer server accepted this connection with its own deadline (a state transfer's,
    // longer): a predecessor that hangs mid-collective must cost this one's timeout, no more.
    prev.set_timeout(timeout)?;
    let next_handle = next.shutdown_handle()?;
    let len = buf.len();
    let result = std::thread::scope(|s| {
        // Chunks travel to the writer already encoded: one copy per chunk on this path.
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let writer = s.spawn(move || -> Result<u64, WireError> {
            for frame in rx {
                next.send(Kind::Data, &frame)?;
            }
            Ok(next.bytes_sent)
        });
        let mut body = || -> Result<(), WireError> {
            let send = |v: &[f32]| {
                // A closed channel means the writer failed; its error is reported below.
                let _ = tx.send(f32_le_bytes(v));
            };
            for c in chunks(segment(len, n, rank)) {
                send(&buf[c]);
            }
            let mut incoming = vec![0f32; CHUNK];
            // Reduce-scatter: after step s this rank holds the partial sum of segment
            // (rank - s - 1) over s + 2 ranks; after n - 1 steps, segment rank + 1 is complete.
            for step in 0..n - 1 {
                let seg = (rank + n - step - 1) % n;
                for c in chunks(segment(len, n, seg)) {
                    let tmp = &mut incoming[..c.len()];
                    prev.recv_f32_into(tmp)?;
                    for (dst, add) in buf[c.clone()].iter_mut().zip(tmp.iter()) {
                        *dst += *add;
                    }
                    if step < n - 2 {
                        send(&buf[c]);
                    }
                }
            }
            for c in chunks(segment(len, n, (rank + 1) % n)) {
                send(&buf[c]);
            }
            // All-gather: pass the completed segments around the ring.
            for step in 0..n - 1 {
                let seg = (rank + n - step) % n;
                for c in chunks(segment(len, n, seg)) {
                    prev.recv_f32_into(&mut buf[c.clone()])?;
                    if step < n - 2 {
                        send(&buf[c]);
                    }
                }
            }
            Ok(())
        };
        let outcome = body();
        drop(tx);
        if outcome.is_err() {
            // Unblock a writer stuck on a peer that stopped reading.
            next_handle.shutdown();
        }
        let sent = writer.join().expect("ring writer does not panic");
        outcome.and(sent)
    });
    let bytes_sent = result?;
    Ok(RingStats {
        bytes_sent,
        bytes_received: prev.bytes_received,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerServer;
    use crate::wire::TEST_SECRET;

    fn servers(n: usize, auth: &Auth) -> Vec<PeerServer> {
        servers_with_deadline(n, auth, Duration::from_secs(2))
    }

    fn servers_with_deadline(n: usize, auth: &Auth, deadline: Duration) -> Vec<PeerServer> {
        (0..n)
            .map(|_| PeerServer::start("127.0.0.1:0", auth.clone(), 9, deadline).unwrap())
            .collect()
    }

    fn inputs(n: usize, len: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|r| {
                (0..len)
                    .map(|i| ((i * 7 + r * 13) % 101) as f32 * 0.37 - 11.0 + r as f32 * 1e-3)
                    .collect()
            })
            .collect()
    }

    fn run(
        servers: &[PeerServer],
        data: Vec<Vec<f32>>,
        attempt: u32,
        timeout: Duration,
    ) -> Vec<Result<Vec<f32>, WireError>> {
        let members: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        run_via(servers, &members, data, attempt, timeout)
    }

    /// [`run`], each rank reaching its successor at `members` (which may pass through a
    /// proxy).
    fn run_via(
        servers: &[PeerServer],
        members: &[String],
        data: Vec<Vec<f32>>,
        attempt: u32,
        timeout: Duration,
    ) -> Vec<Result<Vec<f32>, WireError>> {
        let auth = Auth::new(TEST_SECRET).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = data
                .into_iter()
                .enumerate()
                .map(|(rank, mut buf)| {
                    let spec = RingSpec {
                        round: 3,
                        attempt,
                        members: members.to_vec(),
                        rank,
                    };
                    let (auth, inbox) = (auth.clone(), servers[rank].inbox.clone());
                    s.spawn(move || {
                        all_reduce_sum(&mut buf, &spec, &auth, 9, &inbox, timeout).map(|_| buf)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_exactly_and_identically_on_every_rank() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        for (n, len) in [(2, 10), (3, 1000), (4, 3 * CHUNK + 17), (5, 3)] {
            let srv = servers(n, &auth);
            let data = inputs(n, len);
            let out = run(&srv, data.clone(), 0, Duration::from_secs(5));
            let first = out[0].as_ref().unwrap();
            for o in &out {
                let o = o.as_ref().unwrap();
                assert_eq!(
                    o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "ranks disagree (n={n})"
                );
            }
            for i in 0..len {
                let want: f64 = data.iter().map(|d| d[i] as f64).sum();
                assert!((first[i] as f64 - want).abs() < 1e-3, "n={n} i={i}");
            }
            // Same inputs, same ring: the same bits again.
            let again = run(&srv, data, 1, Duration::from_secs(5));
            assert_eq!(again[0].as_ref().unwrap(), first);
        }
    }

    /// Ranks 0 and 1 of a three-rank ring of `srv` run round 1's collective; rank 2 is up to
    /// the test.
    fn survivors_of_a_three_rank_ring(
        srv: &[PeerServer],
        auth: &Auth,
        timeout: Duration,
    ) -> Vec<Result<RingStats, WireError>> {
        let members: Vec<String> = srv.iter().map(|s| s.addr.clone()).collect();
        std::thread::scope(|s| {
            (0..2)
                .map(|rank| {
                    let spec = RingSpec {
                        round: 1,
                        attempt: 0,
                        members: members.clone(),
                        rank,
                    };
                    let (auth, inbox) = (auth.clone(), srv[rank].inbox.clone());
                    s.spawn(move || {
                        let mut buf = vec![1.0f32; 1000];
                        all_reduce_sum(&mut buf, &spec, &auth, 9, &inbox, timeout)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        })
    }

    #[test]
    fn a_peer_that_hangs_after_connecting_fails_every_survivor_within_the_timeout() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        // The servers' own deadline (a worker's is a state transfer's, 10 s) is far longer
        // than the collective's: the collective's must rule.
        let srv = servers_with_deadline(3, &auth, Duration::from_secs(30));
        let timeout = Duration::from_millis(300);
        // Rank 2 joins the ring (connects to rank 0 as its predecessor) and then hangs: it
        // holds the connection open for 10 s and sends nothing.
        let hung_addr = srv[0].addr.clone();
        let hung_auth = auth.clone();
        let _hung = std::thread::spawn(move || {
            let mut conn = wire::connect(&hung_addr, &hung_auth, 9, Duration::from_secs(5))?;
            conn.send_json(&PeerHello::Ring {
                round: 1,
                attempt: 0,
                from_rank: 2,
            })?;
            std::thread::sleep(Duration::from_secs(10));
            Ok::<_, WireError>(())
        });
        let started = Instant::now();
        let results = survivors_of_a_three_rank_ring(&srv, &auth, timeout);
        let took = started.elapsed();
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!(
            took < Duration::from_secs(3),
            "survivors gave up after {took:?}"
        );
    }

    #[test]
    fn a_missing_peer_fails_every_survivor_within_the_timeout() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let srv = servers(3, &auth);
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        // Rank 2 never shows up (hung before the collective): ranks 0 and 1 must give up.
        let results = survivors_of_a_three_rank_ring(&srv, &auth, timeout);
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    /// One whole frame off a raw stream; None at its end.
    fn raw_frame(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut frame = vec![0u8; wire::HEADER_LEN];
        s.read_exact(&mut frame).ok()?;
        let len = u32::from_le_bytes(frame[16..20].try_into().unwrap()) as usize;
        frame.resize(wire::HEADER_LEN + len, 0);
        s.read_exact(&mut frame[wire::HEADER_LEN..]).ok()?;
        Some(frame)
    }

    /// A man in the middle of the link into `target`, without the secret: it passes the
    /// handshake and the ring hello through, then flips one bit of the first data frame.
    fn tampering_proxy(target: String) -> String {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut from, _) = listener.accept().unwrap();
            let mut to = std::net::TcpStream::connect(target).unwrap();
            let mut back = (from.try_clone().unwrap(), to.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut back.1, &mut back.0));
            for i in 0.. {
                let Some(mut frame) = raw_frame(&mut from) else {
                    break;
                };
                if i == 2 {
                    let last = frame.len() - 1;
                    frame[last] ^= 1;
                }
                if to.write_all(&frame).is_err() {
                    break;
                }
            }
        });
        addr
    }

    #[test]
    fn a_tampered_link_fails_the_attempt_for_every_rank_and_a_retry_sums_exactly() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let srv = servers(3, &auth);
        let data = inputs(3, 1000);
        let mut members: Vec<String> = srv.iter().map(|s| s.addr.clone()).collect();
        members[1] = tampering_proxy(members[1].clone());
        let out = run_via(&srv, &members, data.clone(), 0, Duration::from_secs(1));
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
        assert!(
            out.iter()
                .any(|r| matches!(r, Err(e) if e.to_string().contains("failed authentication"))),
            "{out:?}"
        );
        // The next attempt, on a clean link, sums exactly as if nothing had happened.
        let again = run(&srv, data.clone(), 1, Duration::from_secs(5));
        let first = again[0].as_ref().unwrap();
        for i in 0..1000 {
            let want: f64 = data.iter().map(|d| d[i] as f64).sum();
            assert!((first[i] as f64 - want).abs() < 1e-3, "i={i}");
        }
        assert!(again.iter().all(|r| r.as_ref().ok() == Some(first)));
    }
}
