//! Fault injection plans: `--chaos SPEC` parsed into timed actions on worker processes. Pure:
//! which actions fall due between two instants is a function of the plan alone, so a run's
//! faults are reproducible and the launcher only delivers signals.
//!
//! Grammar: faults separated by `;`, each `KIND:key=value,...`:
//! - `kill:worker=N,at=DUR` or `kill:every=DUR[,worker=N]` — SIGKILL (round-robin over workers
//!   when no worker is named);
//! - `hang:worker=N,for=DUR[,at=DUR]` — SIGSTOP, then SIGCONT after `for` (`at` defaults to 5s);
//! - `slow:worker=N,factor=F` — the worker runs F times slower (F ≥ 1) for the whole run.
//!
//! Durations: `500ms`, `30s`, `2m`, or a bare number of seconds.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    Kill {
        worker: Option<usize>,
        at: Duration,
        every: Option<Duration>,
    },
    Hang {
        worker: usize,
        at: Duration,
        duration: Duration,
    },
    Slow {
        worker: usize,
        factor: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Stop,
    Continue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    pub worker: usize,
    pub signal: Signal,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChaosPlan {
    pub faults: Vec<Fault>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s or m)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("`{s}` is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl ChaosPlan {
    /// Parses a spec for a run of `workers` workers.
    pub fn parse(spec: &str, workers: usize) -> Result<ChaosPlan, String> {
        let mut faults = Vec::new();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (kind, args) = item
                .split_once(':')
                .ok_or_else(|| format!("chaos `{item}`: expected KIND:key=value,..."))?;
            let mut worker = None;
            let (mut at, mut every, mut duration, mut factor) = (None, None, None, None);
            for kv in args.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("chaos `{item}`: `{kv}` is not key=value"))?;
                let bad = |e: String| format!("chaos `{item}`: {k}: {e}");
                match k {
                    "worker" => {
                        let w: usize = v
                            .parse()
                            .map_err(|_| bad(format!("`{v}` is not a worker index")))?;
                        if w >= workers {
                            return Err(bad(format!(
                                "worker {w} does not exist (the run has {workers}: 0..{})",
                                workers.saturating_sub(1)
                            )));
                        }
                        worker = Some(w);
                    }
                    "at" => at = Some(parse_duration(v).map_err(bad)?),
                    "every" => every = Some(parse_duration(v).map_err(bad)?),
                    "for" => duration = Some(parse_duration(v).map_err(bad)?),
                    "factor" => {
                        let f: f64 = v
                            .parse()
                            .map_err(|_| bad(format!("`{v}` is not a number")))?;
                        if !(f.is_finite() && f >= 1.0) {
                            return Err(bad(format!("{f} must be at least 1")));
                        }
                        factor = Some(f);
                    }
                    _ => return Err(format!("chaos `{item}`: unknown key `{k}`")),
                }
            }
            let need = |what: &str| format!("chaos `{item}`: needs {what}");
            faults.push(match kind {
                "kill" => match (at, every) {
                    (_, Some(e)) if e.is_zero() => {
                        return Err(format!("chaos `{item}`: every must be > 0"));
                    }
                    (None, None) => return Err(need("at=DUR or every=DUR")),
                    (at, every) => Fault::Kill {
                        worker,
                        at: at.or(every).expect("one is set"),
                        every,
                    },
                },
                "hang" => Fault::Hang {
                    worker: worker.ok_or_else(|| need("worker=N"))?,
                    at: at.unwrap_or(Duration::from_secs(5)),
                    duration: duration.ok_or_else(|| need("for=DUR"))?,
                },
                "slow" => Fault::Slow {
                    worker: worker.ok_or_else(|| need("worker=N"))?,
                    factor: factor.ok_or_else(|| need("factor=F"))?,
                },
                _ => {
                    return Err(format!(
                        "chaos `{item}`: unknown fault `{kind}` (kill, hang, slow)"
                    ));
                }
            });
        }
        Ok(ChaosPlan { faults })
    }

    /// The slow-down factor of `worker` (1 when none is planned).
    pub fn slow_factor(&self, worker: usize) -> f64 {
        self.faults
            .iter()
            .filter_map(|f| match f {
                Fault::Slow { worker: w, factor } if *w == worker => Some(*factor),
                _ => None,
            })
            .fold(1.0, f64::max)
    }

    /// Signals due in the interval `(after, until]` of run time, in time order.
    pub fn due(&self, after: Duration, until: Duration, workers: usize) -> Vec<Action> {
        let mut timed: Vec<(Duration, Action)> = Vec::new();
        let within = |t: Duration| t > after && t <= until;
        for f in &self.faults {
            match *f {
                Fault::Kill {
                    worker,
                    at,
                    every: None,
                } if within(at) => timed.push((
                    at,
                    Action {
                        worker: worker.unwrap_or(0),
                        signal: Signal::Kill,
                    },
                )),
                Fault::Kill {
                    worker,
                    every: Some(e),
                    ..
                } => {
                    // The k-th kill (k ≥ 1) is at k·e; without a named worker, round-robin.
                    let first = (after.as_nanos() / e.as_nanos()) as u64 + 1;
                    let last = (until.as_nanos() / e.as_nanos()) as u64;
                    for k in first..=last {
                        let w = worker.unwrap_or(((k - 1) % workers.max(1) as u64) as usize);
                        timed.push((
                            e * k as u32,
                            Action {
                                worker: w,
                                signal: Signal::Kill,
                            },
                        ));
                    }
                }
                Fault::Hang {
                    worker,
                    at,
                    duration,
                } => {
                    if within(at) {
                        timed.push((
                            at,
                            Action {
                                worker,
                                signal: Signal::Stop,
                            },
                        ));
                    }
                    if within(at + duration) {
                        timed.push((
                            at + duration,
                            Action {
                                worker,
                                signal: Signal::Continue,
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        timed.sort_by_key(|(t, _)| *t);
        timed.into_iter().map(|(_, a)| a).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn parses_the_documented_examples() {
        let p = ChaosPlan::parse(
            "kill:worker=2,at=30s; kill:every=20s; hang:worker=1,for=10s; slow:worker=3,factor=4",
            4,
        )
        .unwrap();
        assert_eq!(
            p.faults,
            vec![
                Fault::Kill {
                    worker: Some(2),
                    at: S(30),
                    every: None
                },
                Fault::Kill {
                    worker: None,
                    at: S(20),
                    every: Some(S(20))
                },
                Fault::Hang {
                    worker: 1,
                    at: S(5),
                    duration: S(10)
                },
                Fault::Slow {
                    worker: 3,
                    factor: 4.0
                },
            ]
        );
        assert_eq!(p.slow_factor(3), 4.0);
        assert_eq!(p.slow_factor(0), 1.0);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (spec, want) in [
            ("kill:worker=9,at=1s", "does not exist"),
            ("kill:worker=1", "needs at=DUR"),
            ("hang:worker=1", "needs for=DUR"),
            ("slow:worker=1,factor=0.5", "at least 1"),
            ("explode:worker=1", "unknown fault"),
            ("kill:worker=1,at=soon", "not a duration"),
            ("kill:worker=1,at=3h", "unknown unit"),
            ("kill", "expected KIND"),
            ("kill:every=0s", "every must be > 0"),
        ] {
            let err = ChaosPlan::parse(spec, 4).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn actions_fall_due_once_each_in_order() {
        let p = ChaosPlan::parse("hang:worker=1,at=2s,for=3s; kill:every=2s", 3).unwrap();
        let mut seen = Vec::new();
        // Polled at irregular instants, each action appears exactly once.
        let ticks = [0, 700, 1999, 2000, 2500, 4100, 5000, 6000, 6001];
        for w in ticks.windows(2) {
            seen.extend(p.due(Duration::from_millis(w[0]), Duration::from_millis(w[1]), 3));
        }
        use Signal::*;
        let a = |worker, signal| Action { worker, signal };
        assert_eq!(
            seen,
            vec![
                a(1, Stop),
                a(0, Kill),
                a(1, Kill),
                a(1, Continue),
                a(2, Kill)
            ]
        );
    }
}
