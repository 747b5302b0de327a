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
//! - `nan:at=STEP[,worker=N]` — that optimizer step's loss and gradients become NaN;
//! - `spike:at=STEP,scale=X[,steps=K][,worker=N]` — K steps (default 5) from STEP have their
//!   loss and gradients multiplied by X;
//! - `bitflip:worker=N,at=ROUND` — after round ROUND commits, flip a bit in one parameter of
//!   that worker's replica.
//! - `sdc:worker=N,at=ROUND[,bit=B]` — silent corruption in compute: in round ROUND, flip bit B
//!   (0–31 of the f32; default 30, the exponent's highest) of one value of what that worker
//!   sends to the all-reduce (its pseudo-gradient, or its gradients in DDP).
//!
//! Durations: `500ms`, `30s`, `2m`, or a bare number of seconds. Rounds count from 0; steps
//! count batches drawn from 0 (a skipped or rolled-back step still drew its batch). A step's
//! fault fires once: in a multi-worker run a step trained again (its round redone after a
//! rollback or a rewind) runs clean, as after a transient hardware fault.

use std::time::Duration;

/// The shortest period of `kill:every`.
pub const MIN_KILL_PERIOD: Duration = Duration::from_millis(100);

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
    Nan {
        worker: Option<usize>,
        step: u64,
    },
    Spike {
        worker: Option<usize>,
        step: u64,
        scale: f64,
        steps: u64,
    },
    Bitflip {
        worker: usize,
        round: u64,
    },
    Sdc {
        worker: usize,
        round: u64,
        bit: u8,
    },
}

impl Fault {
    /// Faults the launcher delivers as signals (the others happen inside a worker).
    pub fn is_process_fault(&self) -> bool {
        matches!(
            self,
            Fault::Kill { .. } | Fault::Hang { .. } | Fault::Slow { .. }
        )
    }
}

/// The numeric faults one process injects into its own training.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NumberFaults {
    pub nan_steps: Vec<u64>,
    /// (first step, scale, steps)
    pub spikes: Vec<(u64, f64, u64)>,
    pub bitflip_rounds: Vec<u64>,
    /// (round, bit) of each corruption of a contribution.
    pub sdc: Vec<(u64, u8)>,
}

impl NumberFaults {
    pub fn is_empty(&self) -> bool {
        *self == NumberFaults::default()
    }

    pub fn nan_at(&self, step: u64) -> bool {
        self.nan_steps.contains(&step)
    }

    /// Factor applied to the loss and gradients of `step`.
    pub fn scale_at(&self, step: u64) -> f64 {
        self.spikes
            .iter()
            .filter(|(s, _, n)| step >= *s && step < s + n)
            .map(|(_, x, _)| x)
            .product()
    }

    /// Marks `step`'s faults as delivered: a step that is trained again (its round retried,
    /// rolled back or rewound) runs clean, as after a transient hardware fault.
    pub fn spend(&mut self, step: u64) {
        self.nan_steps.retain(|&s| s != step);
        if self.scale_at(step) == 1.0 {
            // Nothing to split: the common case, on every training step.
            return;
        }
        self.spikes = self
            .spikes
            .iter()
            .flat_map(|&(s, x, n)| {
                if step < s || step >= s + n {
                    return vec![(s, x, n)];
                }
                [(s, x, step - s), (step + 1, x, s + n - step - 1)]
                    .into_iter()
                    .filter(|w| w.2 > 0)
                    .collect()
            })
            .collect();
    }

    pub fn bitflip_after(&self, round: u64) -> bool {
        self.bitflip_rounds.contains(&round)
    }

    /// The bit to flip in round `round`'s contribution, once: a round retried or redone
    /// sends a clean one, as after a transient fault.
    pub fn take_sdc(&mut self, round: u64) -> Option<u8> {
        let at = self.sdc.iter().position(|&(r, _)| r == round)?;
        Some(self.sdc.remove(at).1)
    }

    /// The same faults as a spec string (for a worker process's command line).
    pub fn to_spec(&self) -> String {
        let mut parts: Vec<String> = self
            .nan_steps
            .iter()
            .map(|s| format!("nan:at={s}"))
            .collect();
        parts.extend(
            self.spikes
                .iter()
                .map(|(s, x, n)| format!("spike:at={s},scale={x},steps={n}")),
        );
        parts.extend(
            self.bitflip_rounds
                .iter()
                .map(|r| format!("bitflip:worker=0,at={r}")),
        );
        parts.extend(
            self.sdc
                .iter()
                .map(|(r, b)| format!("sdc:worker=0,at={r},bit={b}")),
        );
        parts.join(";")
    }
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
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is too long a duration"))
}

impl ChaosPlan {
    /// The faults of a single-process run: only numeric ones (kill, hang and slow act on
    /// worker processes, and bitflip on a multi-worker replica), refused rather than ignored.
    pub fn single_process(spec: &str) -> Result<NumberFaults, String> {
        let plan = ChaosPlan::parse(spec, 1)?;
        if plan.has_process_faults() {
            return Err("kill, hang and slow act on worker processes; they need --workers".into());
        }
        let faults = plan.number_faults(0);
        if !faults.bitflip_rounds.is_empty() || !faults.sdc.is_empty() {
            return Err(
                "bitflip and sdc corrupt a multi-worker replica or contribution; they need --workers".into(),
            );
        }
        Ok(faults)
    }

    /// Parses a spec for a run of `workers` workers.
    pub fn parse(spec: &str, workers: usize) -> Result<ChaosPlan, String> {
        let mut faults = Vec::new();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (kind, args) = item
                .split_once(':')
                .ok_or_else(|| format!("chaos `{item}`: expected KIND:key=value,..."))?;
            let mut worker = None;
            let (mut at_raw, mut every, mut duration, mut factor) = (None, None, None, None);
            let (mut scale, mut steps, mut bit) = (None, None, None);
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
                    "at" => at_raw = Some(v),
                    "scale" => {
                        let x: f64 = v
                            .parse()
                            .map_err(|_| bad(format!("`{v}` is not a number")))?;
                        if !x.is_finite() {
                            return Err(bad(format!("{x} must be finite")));
                        }
                        scale = Some(x);
                    }
                    "steps" => {
                        let n: u64 = v
                            .parse()
                            .ok()
                            .filter(|&n| n >= 1)
                            .ok_or_else(|| bad(format!("`{v}` is not a step count ≥ 1")))?;
                        steps = Some(n);
                    }
                    "bit" => {
                        let b: u8 = v.parse().ok().filter(|&b| b < 32).ok_or_else(|| {
                            bad(format!("`{v}` is not a bit of an f32 (0 to 31)"))
                        })?;
                        bit = Some(b);
                    }
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
            let at = at_raw
                .filter(|_| matches!(kind, "kill" | "hang"))
                .map(|v| parse_duration(v).map_err(|e| format!("chaos `{item}`: at: {e}")))
                .transpose()?;
            let at_count = || -> Result<u64, String> {
                let v = at_raw.ok_or_else(|| need("at=N"))?;
                v.parse()
                    .map_err(|_| format!("chaos `{item}`: at: `{v}` is not a step or round number"))
            };
            faults.push(match kind {
                "kill" => match (at, every) {
                    // A worker takes longer than this to restart; a shorter period would only
                    // queue kills (and millions of them per poll at a nanosecond).
                    (_, Some(e)) if e < MIN_KILL_PERIOD => {
                        return Err(format!(
                            "chaos `{item}`: every must be at least {MIN_KILL_PERIOD:?}"
                        ));
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
                "nan" => Fault::Nan {
                    worker,
                    step: at_count()?,
                },
                "spike" => Fault::Spike {
                    worker,
                    step: at_count()?,
                    scale: scale.ok_or_else(|| need("scale=X"))?,
                    steps: steps.unwrap_or(5),
                },
                "bitflip" => Fault::Bitflip {
                    worker: worker.ok_or_else(|| need("worker=N"))?,
                    round: at_count()?,
                },
                "sdc" => Fault::Sdc {
                    worker: worker.ok_or_else(|| need("worker=N"))?,
                    round: at_count()?,
                    bit: bit.unwrap_or(30),
                },
                _ => {
                    return Err(format!(
                        "chaos `{item}`: unknown fault `{kind}` (kill, hang, slow, nan, spike, bitflip, sdc)"
                    ));
                }
            });
        }
        Ok(ChaosPlan { faults })
    }

    /// The numeric faults `worker` injects into its own training (a fault without a worker
    /// applies to every worker).
    pub fn number_faults(&self, worker: usize) -> NumberFaults {
        let mine = |w: &Option<usize>| w.is_none_or(|w| w == worker);
        let mut out = NumberFaults::default();
        for f in &self.faults {
            match f {
                Fault::Nan { worker: w, step } if mine(w) => out.nan_steps.push(*step),
                Fault::Spike {
                    worker: w,
                    step,
                    scale,
                    steps,
                } if mine(w) => out.spikes.push((*step, *scale, *steps)),
                Fault::Bitflip { worker: w, round } if *w == worker => {
                    out.bitflip_rounds.push(*round)
                }
                Fault::Sdc {
                    worker: w,
                    round,
                    bit,
                } if *w == worker => out.sdc.push((*round, *bit)),
                _ => {}
            }
        }
        out
    }

    pub fn has_process_faults(&self) -> bool {
        self.faults.iter().any(Fault::is_process_fault)
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
                    let end = at.saturating_add(duration);
                    if within(end) {
                        timed.push((
                            end,
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
            ("kill:every=0s", "every must be at least"),
            ("kill:every=1ms", "every must be at least"),
            ("kill:worker=1,at=99999999999999999999s", "too long"),
            ("nan:at=soon", "not a step or round number"),
            ("spike:at=5", "needs scale=X"),
            ("spike:at=5,scale=2,steps=0", "step count"),
            ("bitflip:at=3", "needs worker=N"),
            ("sdc:worker=1", "needs at=N"),
            ("sdc:worker=1,at=2,bit=32", "0 to 31"),
        ] {
            let err = ChaosPlan::parse(spec, 4).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn number_faults_go_to_their_worker_and_survive_the_command_line() {
        let p = ChaosPlan::parse(
            "nan:at=7; spike:worker=1,at=10,scale=50,steps=2; bitflip:worker=2,at=3; sdc:worker=1,at=4,bit=27; sdc:worker=1,at=6",
            3,
        )
        .unwrap();
        assert!(!p.has_process_faults());
        let w1 = p.number_faults(1);
        assert_eq!(
            w1.nan_steps,
            vec![7],
            "a fault without a worker hits every worker"
        );
        assert_eq!(
            (
                w1.scale_at(9),
                w1.scale_at(10),
                w1.scale_at(11),
                w1.scale_at(12)
            ),
            (1.0, 50.0, 50.0, 1.0)
        );
        assert!(p.number_faults(2).bitflip_after(3) && !w1.bitflip_after(3));
        assert_eq!(w1.sdc, vec![(4, 27), (6, 30)], "bit 30 unless named");
        let mut spent = w1.clone();
        assert_eq!((spent.take_sdc(4), spent.take_sdc(4)), (Some(27), None));
        let again = ChaosPlan::parse(&w1.to_spec(), 1).unwrap().number_faults(0);
        assert_eq!(again, w1);
        assert!(
            p.due(Duration::ZERO, Duration::from_secs(100), 3)
                .is_empty()
        );
    }

    #[test]
    fn a_spent_step_runs_clean_and_the_rest_of_its_window_still_fires() {
        let mut f = NumberFaults {
            nan_steps: vec![3, 9],
            spikes: vec![(10, 50.0, 4)],
            bitflip_rounds: vec![],
            sdc: vec![],
        };
        f.spend(3);
        f.spend(11);
        assert!(!f.nan_at(3) && f.nan_at(9));
        assert_eq!(f.spikes, vec![(10, 50.0, 1), (12, 50.0, 2)]);
        assert_eq!(
            (10..15).map(|s| f.scale_at(s)).collect::<Vec<_>>(),
            vec![50.0, 1.0, 50.0, 50.0, 1.0]
        );
        f.spend(10);
        assert_eq!(f.spikes, vec![(12, 50.0, 2)]);
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

    #[test]
    fn a_single_process_takes_numeric_faults_and_refuses_the_rest() {
        let f = ChaosPlan::single_process("nan:at=3; spike:at=5,scale=100").unwrap();
        assert_eq!((f.nan_steps, f.spikes), (vec![3], vec![(5, 100.0, 5)]));
        for spec in [
            "kill:worker=0,at=1s",
            "slow:worker=0,factor=2",
            "bitflip:worker=0,at=2",
            "sdc:worker=0,at=2",
        ] {
            let err = ChaosPlan::single_process(spec).unwrap_err();
            assert!(err.contains("--workers"), "{spec}: {err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

        /// Any spec is parsed or refused with a message, never a panic; a parsed plan's
        /// actions, faults and command-line form can all be computed.
        #[test]
        fn fuzz_any_chaos_spec_is_parsed_or_refused(
            raw in ".{0,48}",
            shaped in "((kill|hang|slow|nan|spike|bitflip|sdc|x):((worker|at|every|for|factor|scale|steps|bit|y)=[-0-9a-z.e]{0,7},?){0,4}; ?){1,3}",
            workers in 1usize..6,
        ) {
            for spec in [raw.as_str(), shaped.as_str()] {
                let _ = ChaosPlan::single_process(spec);
                if let Ok(plan) = ChaosPlan::parse(spec, workers) {
                    let _ = plan.due(Duration::ZERO, Duration::from_secs(600), workers);
                    for w in 0..workers {
                        let faults = plan.number_faults(w);
                        let back = ChaosPlan::parse(&faults.to_spec(), 1).map(|p| p.number_faults(0));
                        proptest::prop_assert_eq!(back, Ok(faults));
                        let _ = plan.slow_factor(w);
                    }
                }
            }
        }
    }
}
