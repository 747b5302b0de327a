//! Quantized all-reduce (sum) over a full mesh: a reduce-scatter in which every rank sends
//! each segment of its values, quantized, straight to the segment's owner; the owner decodes
//! the contributions and sums them in `f32` in rank order, quantizes the sum, and sends it to
//! every other rank, which all decode the same bytes the same way. Every member ends with
//! bit-identical values, and each sends (n−1)/n of its values twice, as in a ring, but
//! quantized and without re-quantizing partial sums on the way.
//!
//! What quantization drops comes back as a residual, for error feedback: the caller adds it
//! to its next contribution. It holds this rank's own encoding error, and on the segment it
//! owned, the encoding error of the sum.
//!
//! Deadlines and failure are as in [`crate::ring`]: a dead or silent peer fails every
//! survivor within the timeout, and the caller's buffer is then garbage.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::peer::{Inbox, PeerHello};
use crate::quant::Precision;
use crate::ring::{RingSpec, RingStats, segment};
use crate::wire::{self, Auth, Conn, Kind, MAX_DATA_LEN, WireError};

/// How a quantized collective treats its buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantized {
    pub precision: Precision,
    /// Trailing values (the contributions' weights) sent and summed exactly as `f32`.
    pub exact_tail: usize,
}

/// A quantized collective's traffic and its error-feedback residual.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedSum {
    pub stats: RingStats,
    /// One value per quantized value of the buffer (the exact tail has none).
    pub residual: Vec<f32>,
}

/// Sums `buf` element-wise over the members, in place, its values travelling as `q` says.
pub fn all_reduce_quantized(
    buf: &mut [f32],
    q: Quantized,
    spec: &RingSpec,
    auth: &Auth,
    run_id: u64,
    inbox: &Inbox,
    timeout: Duration,
) -> Result<QuantizedSum, WireError> {
    let started = Instant::now();
    assert!(
        q.exact_tail <= buf.len(),
        "the exact tail lies in the buffer"
    );
    let split = buf.len() - q.exact_tail;
    let n = spec.members.len();
    if n <= 1 {
        return Ok(QuantizedSum {
            residual: vec![0.0; split],
            ..Default::default()
        });
    }
    let (values, tail) = buf.split_at_mut(split);
    let own = Encoded::of(values, q.precision, n)?;
    let mut residual = own.error(values);
    let outgoing = connect_all(spec, auth, run_id, timeout)?;
    let incoming = accept_all(spec, inbox, timeout)?;
    let mut mesh = Mesh {
        spec,
        precision: q.precision,
        len: split,
        incoming,
    };
    let mut segments = own.segments;
    let mine_encoded = std::mem::take(&mut segments[spec.rank]);
    let (bytes_sent, sum_error) = with_writers(outgoing, |send| {
        // Each segment goes to its owner as it is: no copy.
        for (to, bytes) in segments.into_iter().enumerate() {
            if to != spec.rank {
                send(to, wire::f32_le_bytes(tail));
                send(to, bytes);
            }
        }
        let tails = mesh.gather_tails(tail)?;
        let (sum, sum_error) = mesh.reduce_own_segment(&mine_encoded)?;
        for to in (0..n).filter(|&to| to != spec.rank) {
            send(to, sum.clone());
        }
        mesh.receive_sums(values, &sum)?;
        for (t, v) in tail.iter_mut().enumerate() {
            // Rank order, as every rank sums them.
            *v = tails.iter().fold(0.0, |acc, x| acc + x[t]);
        }
        Ok(sum_error)
    })?;
    let mine = segment(split, n, spec.rank);
    for (r, e) in residual[mine].iter_mut().zip(sum_error) {
        *r += e;
    }
    Ok(QuantizedSum {
        stats: RingStats {
            bytes_sent,
            bytes_received: mesh.incoming.iter().map(|c| c.bytes_received).sum(),
            seconds: started.elapsed().as_secs_f64(),
        },
        residual,
    })
}

/// A buffer's values, encoded segment by segment (segment `s` for rank `s`).
struct Encoded {
    precision: Precision,
    segments: Vec<Vec<u8>>,
}

impl Encoded {
    fn of(values: &[f32], precision: Precision, n: usize) -> Result<Encoded, WireError> {
        let segments = (0..n)
            .map(|s| {
                let range = segment(values.len(), n, s);
                let mut bytes = Vec::new();
                precision
                    .encode(&values[range.clone()], &mut bytes)
                    .map(|()| bytes)
                    .map_err(|e| WireError::Protocol {
                        peer: "this worker".into(),
                        what: format!(
                            "its contribution cannot be sent: value {} is {}",
                            range.start + e.index,
                            e.value
                        ),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Encoded {
            precision,
            segments,
        })
    }

    /// `values − decoded`: what encoding dropped.
    fn error(&self, values: &[f32]) -> Vec<f32> {
        let n = self.segments.len();
        let mut decoded = vec![0.0f32; values.len()];
        for (s, bytes) in self.segments.iter().enumerate() {
            let range = segment(values.len(), n, s);
            self.precision
                .decode(bytes, &mut decoded[range])
                .expect("own encoding decodes");
        }
        values.iter().zip(decoded).map(|(v, d)| v - d).collect()
    }
}

/// The receiving half of one attempt: one connection from every other rank.
struct Mesh<'a> {
    spec: &'a RingSpec,
    precision: Precision,
    /// Quantized values in the buffer.
    len: usize,
    /// Connection from rank t at index t (this rank's own slot is skipped).
    incoming: Vec<Conn>,
}

impl Mesh<'_> {
    fn from(&mut self, t: usize) -> &mut Conn {
        let i = if t < self.spec.rank { t } else { t - 1 };
        &mut self.incoming[i]
    }

    /// Every rank's exact tail, in rank order (this rank's own included).
    fn gather_tails(&mut self, own: &[f32]) -> Result<Vec<Vec<f32>>, WireError> {
        (0..self.spec.members.len())
            .map(|t| {
                if t == self.spec.rank {
                    return Ok(own.to_vec());
                }
                let mut tail = vec![0.0f32; own.len()];
                let bytes = recv_exactly(self.from(t), own.len() * 4)?;
                Precision::F32
                    .decode(&bytes, &mut tail)
                    .expect("length checked");
                Ok(tail)
            })
            .collect()
    }

    /// Sums this rank's segment over every rank in rank order (`own` is this rank's part,
    /// encoded); returns the sum encoded and what encoding it dropped.
    fn reduce_own_segment(&mut self, own: &[u8]) -> Result<(Vec<u8>, Vec<f32>), WireError> {
        let (rank, n, p) = (self.spec.rank, self.spec.members.len(), self.precision);
        let mine = segment(self.len, n, rank);
        let mut sum = vec![0.0f32; mine.len()];
        let want = p.encoded_len(sum.len());
        for t in 0..n {
            if t == rank {
                p.decode_add(own, &mut sum).expect("own encoding decodes");
                continue;
            }
            let conn = self.from(t);
            let bytes = recv_exactly(conn, want)?;
            p.decode_add(&bytes, &mut sum)
                .map_err(|e| malformed(conn, e))?;
        }
        let encoded = Encoded::of(&sum, p, 1).map_err(|_| WireError::Protocol {
            peer: "this worker".into(),
            what: "the sum of its segment overflowed".into(),
        })?;
        let error = encoded.error(&sum);
        Ok((encoded.segments.into_iter().next().expect("one"), error))
    }

    /// Decodes every segment's sum into `values`: this rank's own from `own_sum`, the others
    /// as their owners send them.
    fn receive_sums(&mut self, values: &mut [f32], own_sum: &[u8]) -> Result<(), WireError> {
        let (rank, n, p) = (self.spec.rank, self.spec.members.len(), self.precision);
        for t in 0..n {
            let range = segment(self.len, n, t);
            let out = &mut values[range];
            if t == rank {
                p.decode(own_sum, out).expect("own encoding");
                continue;
            }
            let conn = self.from(t);
            let bytes = recv_exactly(conn, p.encoded_len(out.len()))?;
            p.decode(&bytes, out).map_err(|e| malformed(conn, e))?;
        }
        Ok(())
    }
}

fn malformed(conn: &Conn, e: crate::quant::Malformed) -> WireError {
    WireError::Protocol {
        peer: conn.peer().to_string(),
        what: format!("quantized data: {e}"),
    }
}

/// Reads `want` bytes sent as data frames of at most [`MAX_DATA_LEN`].
fn recv_exactly(conn: &mut Conn, want: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let (kind, frame) = conn.recv((want - out.len()).min(MAX_DATA_LEN))?;
        if kind != Kind::Data || frame.is_empty() {
            return Err(WireError::Protocol {
                peer: conn.peer().to_string(),
                what: format!("expected data, got {kind:?} of {} bytes", frame.len()),
            });
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

/// A connection to every other rank, announced as this rank's.
fn connect_all(
    spec: &RingSpec,
    auth: &Auth,
    run_id: u64,
    timeout: Duration,
) -> Result<Vec<(usize, Conn)>, WireError> {
    let hello = PeerHello::Ring {
        round: spec.round,
        attempt: spec.attempt,
        from_rank: spec.rank,
    };
    (0..spec.members.len())
        .filter(|&to| to != spec.rank)
        .map(|to| {
            let mut conn = wire::connect(&spec.members[to], auth, run_id, timeout)?;
            conn.send_json(&hello)?;
            Ok((to, conn))
        })
        .collect()
}

/// Every other rank's connection of this attempt, in rank order.
fn accept_all(spec: &RingSpec, inbox: &Inbox, timeout: Duration) -> Result<Vec<Conn>, WireError> {
    let deadline = Instant::now() + timeout;
    (0..spec.members.len())
        .filter(|&t| t != spec.rank)
        .map(|t| {
            let mut conn = inbox
                .take_from((spec.round, spec.attempt), t, deadline)
                .ok_or_else(|| WireError::Timeout {
                    peer: spec.members[t].clone(),
                    after: timeout,
                })?;
            // Accepted with the peer server's deadline (a state transfer's, longer).
            conn.set_timeout(timeout)?;
            Ok(conn)
        })
        .collect()
}

/// Runs `body` with one writer thread per outgoing connection, so that sends to one peer never
/// wait on reads from another; `send(to, bytes)` queues bytes for rank `to`, split into data
/// frames. Returns the bytes sent and `body`'s result, or the first error.
fn with_writers<T>(
    outgoing: Vec<(usize, Conn)>,
    body: impl FnOnce(&dyn Fn(usize, Vec<u8>)) -> Result<T, WireError>,
) -> Result<(u64, T), WireError> {
    let handles = outgoing
        .iter()
        .map(|(_, c)| c.shutdown_handle())
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::scope(|s| {
        let mut queues = Vec::new();
        let writers: Vec<_> = outgoing
            .into_iter()
            .map(|(to, mut conn)| {
                let (tx, rx) = mpsc::channel::<Vec<u8>>();
                queues.push((to, tx));
                s.spawn(move || -> Result<u64, WireError> {
                    for bytes in rx {
                        for frame in bytes.chunks(MAX_DATA_LEN) {
                            conn.send(Kind::Data, frame)?;
                        }
                    }
                    Ok(conn.bytes_sent)
                })
            })
            .collect();
        let send = |to: usize, bytes: Vec<u8>| {
            if let Some((_, tx)) = queues.iter().find(|(t, _)| *t == to) {
                // A closed queue means its writer failed; its error is reported below.
                let _ = tx.send(bytes);
            }
        };
        let outcome = body(&send);
        drop(queues);
        if outcome.is_err() {
            // Unblock writers stuck on peers that stopped reading.
            handles.iter().for_each(|h| h.shutdown());
        }
        let mut sent = 0;
        let mut first_error = None;
        for w in writers {
            match w.join().expect("mesh writer does not panic") {
                Ok(bytes) => sent += bytes,
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        let value = outcome?;
        match first_error {
            Some(e) => Err(e),
            None => Ok((sent, value)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerServer;
    use crate::quant::{BLOCK, PRECISIONS};
    use crate::wire::TEST_SECRET;

    fn servers(n: usize, auth: &Auth, deadline: Duration) -> Vec<PeerServer> {
        (0..n)
            .map(|_| PeerServer::start("127.0.0.1:0", auth.clone(), 9, deadline).unwrap())
            .collect()
    }

    /// Rank `r`'s values (heavy-tailed, as pseudo-gradients are), then its weight.
    fn contribution(r: usize, len: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..len)
            .map(|i| {
                let x = ((i * 7919 + r * 104_729) % 1009) as f32 / 1009.0 - 0.5;
                x * x
                    * x
                    * if (i + r).is_multiple_of(101) {
                        3.0
                    } else {
                        0.01
                    }
            })
            .collect();
        v.push(if r == 1 { 0.0 } else { 1.0 });
        v
    }

    /// Runs ranks `ranks` of a collective over `srv`'s members, each on its contribution.
    fn run(
        srv: &[PeerServer],
        ranks: std::ops::Range<usize>,
        len: usize,
        q: Quantized,
        timeout: Duration,
    ) -> Vec<Result<(Vec<f32>, QuantizedSum), WireError>> {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let members: Vec<String> = srv.iter().map(|s| s.addr.clone()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .map(|rank| {
                    let spec = RingSpec {
                        round: 4,
                        attempt: 1,
                        members: members.clone(),
                        rank,
                    };
                    let (auth, inbox) = (auth.clone(), srv[rank].inbox.clone());
                    s.spawn(move || {
                        let mut buf = contribution(rank, len);
                        all_reduce_quantized(&mut buf, q, &spec, &auth, 9, &inbox, timeout)
                            .map(|sum| (buf, sum))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn decoded(p: Precision, values: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        p.encode(values, &mut bytes).unwrap();
        let mut out = vec![0.0; values.len()];
        p.decode(&bytes, &mut out).unwrap();
        out
    }

    /// What the collective must produce, computed here without a network: per segment, the
    /// decoded contributions summed in rank order, then the sum encoded and decoded.
    fn expected(n: usize, len: usize, p: Precision) -> Vec<f32> {
        let all: Vec<Vec<f32>> = (0..n).map(|r| contribution(r, len)).collect();
        let mut out = Vec::new();
        for s in 0..n {
            let range = segment(len, n, s);
            let mut sum = vec![0.0f32; range.len()];
            for c in &all {
                for (acc, v) in sum.iter_mut().zip(decoded(p, &c[range.clone()])) {
                    *acc += v;
                }
            }
            out.extend(decoded(p, &sum));
        }
        out.push(all.iter().fold(0.0, |acc, c| acc + c[len]));
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_rank_ends_with_the_same_bits_the_owners_fixed_order_gives() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        for p in PRECISIONS {
            for (n, len) in [(2, 10), (3, 1000), (4, 5 * BLOCK + 3), (5, 3), (5, 4099)] {
                let srv = servers(n, &auth, Duration::from_secs(2));
                let q = Quantized {
                    precision: p,
                    exact_tail: 1,
                };
                let out = run(&srv, 0..n, len, q, Duration::from_secs(5));
                let want = expected(n, len, p);
                for (rank, o) in out.iter().enumerate() {
                    let (buf, _) = o.as_ref().unwrap();
                    assert_eq!(bits(buf), bits(&want), "{p} n={n} len={len} rank {rank}");
                }
                assert_eq!(want[len], (n - 1) as f32, "weights summed exactly");
            }
        }
    }

    #[test]
    fn the_residuals_hold_exactly_what_quantization_dropped() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let (n, len) = (4, 3 * BLOCK + 17);
        for p in PRECISIONS {
            let srv = servers(n, &auth, Duration::from_secs(2));
            let q = Quantized {
                precision: p,
                exact_tail: 1,
            };
            let out: Vec<_> = run(&srv, 0..n, len, q, Duration::from_secs(5))
                .into_iter()
                .map(Result::unwrap)
                .collect();
            // Σ contributions = result + Σ residuals, up to f32 rounding.
            for i in 0..len {
                let truth: f64 = (0..n).map(|r| contribution(r, len)[i] as f64).sum();
                let kept = out[0].0[i] as f64;
                let dropped: f64 = out.iter().map(|(_, s)| s.residual[i] as f64).sum();
                assert!((truth - kept - dropped).abs() < 1e-6, "{p} value {i}");
                if p == Precision::F32 {
                    assert_eq!(dropped, 0.0);
                }
            }
            let sent = out[0].1.stats.bytes_sent as f64;
            let payload = 2.0 * p.encoded_len(len) as f64 * (n - 1) as f64 / n as f64;
            assert!(
                sent >= payload,
                "{p}: {sent} bytes counted, {payload} encoded"
            );
        }
    }

    /// Ranks 0 and 1 of a three-rank mesh over `srv` run the collective in `precision`; each
    /// must fail, and within a few timeouts (rank 2 is up to the test).
    fn assert_survivors_fail_within_the_timeout(srv: &[PeerServer], precision: Precision) {
        let q = Quantized {
            precision,
            exact_tail: 1,
        };
        let started = Instant::now();
        let out = run(srv, 0..2, 1000, q, Duration::from_millis(300));
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "survivors gave up after {took:?}"
        );
    }

    #[test]
    fn a_peer_that_never_comes_fails_every_survivor_within_the_timeout() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let srv = servers(3, &auth, Duration::from_secs(30));
        assert_survivors_fail_within_the_timeout(&srv, Precision::Int4);
    }

    #[test]
    fn a_peer_that_hangs_after_connecting_fails_every_survivor_within_the_timeout() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let srv = servers(3, &auth, Duration::from_secs(30));
        // Rank 2 connects to both others and announces itself, then sends nothing for 10 s.
        let addrs: Vec<String> = srv[..2].iter().map(|s| s.addr.clone()).collect();
        let hung_auth = auth.clone();
        let _hung = std::thread::spawn(move || {
            let conns: Vec<Conn> = addrs
                .iter()
                .map(|a| {
                    let mut c = wire::connect(a, &hung_auth, 9, Duration::from_secs(5))?;
                    c.send_json(&PeerHello::Ring {
                        round: 4,
                        attempt: 1,
                        from_rank: 2,
                    })?;
                    Ok::<_, WireError>(c)
                })
                .collect::<Result<_, _>>()?;
            std::thread::sleep(Duration::from_secs(10));
            drop(conns);
            Ok::<_, WireError>(())
        });
        assert_survivors_fail_within_the_timeout(&srv, Precision::Int8);
    }

    #[test]
    fn a_non_finite_contribution_is_refused_before_anything_is_sent() {
        let auth = Auth::new(TEST_SECRET).unwrap();
        let srv = servers(2, &auth, Duration::from_secs(2));
        let spec = RingSpec {
            round: 1,
            attempt: 0,
            members: srv.iter().map(|s| s.addr.clone()).collect(),
            rank: 0,
        };
        let q = Quantized {
            precision: Precision::Int8,
            exact_tail: 1,
        };
        let mut buf = vec![1.0, f32::NAN, 1.0];
        let err = all_reduce_quantized(
            &mut buf,
            q,
            &spec,
            &auth,
            9,
            &srv[0].inbox,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(err.to_string().contains("value 1 is NaN"), "{err}");
    }
}
