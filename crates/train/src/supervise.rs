//! The launcher's supervision policy for `train --workers N`, as a pure function of time,
//! the run's progress and the workers' exits: which workers to start, which chaos signals to
//! deliver, and when the run cannot go on. The process handling (spawning, signalling,
//! reaping) stays with the caller.
//!
//! - A worker killed by a signal or a panic is started again after `respawn_after`; one that
//!   exits with an error of its own is not (a restart would meet the same error).
//! - Chaos time starts with the first round (or once every worker is live), so `at=` means
//!   "into training".
//! - No live worker holding the committed state, and none stopped (a stopped one may come
//!   back with it), for `STATE_LOST_GRACE`: the state is lost.

use std::time::{Duration, Instant};

use crate::chaos::{ChaosPlan, Signal};

/// How long the state may stay lost (no live holder, none stopped) before the run ends.
pub const STATE_LOST_GRACE: Duration = Duration::from_secs(5);
/// How long a worker that could not be started waits before the next try.
pub const SPAWN_RETRY: Duration = Duration::from_secs(5);

/// How long the state has stayed lost, against [`STATE_LOST_GRACE`].
#[derive(Clone, Debug, Default)]
pub struct LossClock {
    since: Option<Instant>,
}

impl LossClock {
    /// Whether the state, lost at `now` or not (`lost`), has stayed lost for the grace; a
    /// moment it is not lost starts the clock again.
    pub fn expired(&mut self, now: Instant, lost: bool) -> bool {
        if !lost {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        now.duration_since(since) >= STATE_LOST_GRACE
    }
}

/// What the launcher does once every worker holding the state was lost at once.
#[derive(Clone, Debug, PartialEq)]
pub enum AfterStateLost {
    /// Restart the run cold from its newest checkpoint: this is restart `attempt` (from 1).
    RestartCold { attempt: u32 },
    /// End the run; `reason` says why it is not restarted.
    End { reason: String },
}

/// Restart cold while restarts remain and a checkpoint exists to restart from, after
/// `restarts_done` of at most `max`.
pub fn after_state_lost(restarts_done: u32, max: u32, checkpointed: bool) -> AfterStateLost {
    if !checkpointed {
        return AfterStateLost::End {
            reason: "no checkpoint had been written yet".into(),
        };
    }
    if restarts_done >= max {
        return AfterStateLost::End {
            reason: format!(
                "it was restarted cold {restarts_done} time(s), the most sync.max_cold_restarts allows"
            ),
        };
    }
    AfterStateLost::RestartCold {
        attempt: restarts_done + 1,
    }
}

/// How a worker process ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Exit {
    /// Killed by a signal (a crash, the OOM killer, chaos) or by a panic: start it again.
    Crashed,
    /// Exited with an error of its own (it said why, and would say it again).
    GaveUp {
        why: String,
    },
    Finished,
}

/// What the run looks like now (from the coordinator).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Seen {
    pub committed_rounds: u64,
    pub live_workers: usize,
    /// No live worker holds the committed state.
    pub state_lost: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Start {
        worker: usize,
    },
    Signal {
        worker: usize,
        signal: Signal,
    },
    /// Every worker that held the state is gone: the run ends.
    StateLost,
    /// Every worker has exited and none will be started again; `gave_up` names the first
    /// that exited with an error, and why.
    AllExited {
        gave_up: Option<(usize, String)>,
    },
}

#[derive(Clone, Debug, Default)]
struct Slot {
    running: bool,
    start_at: Option<Instant>,
    stopped: bool,
    gave_up: Option<String>,
}

pub struct Supervisor {
    chaos: ChaosPlan,
    respawn_after: Option<Duration>,
    slots: Vec<Slot>,
    chaos_started: Option<Instant>,
    chaos_clock: Duration,
    state_lost: LossClock,
}

impl Supervisor {
    /// `workers` workers, all to be started at `now`; `respawn_after` None: never restart.
    pub fn new(
        workers: usize,
        chaos: ChaosPlan,
        respawn_after: Option<Duration>,
        now: Instant,
    ) -> Self {
        let slot = Slot {
            start_at: Some(now),
            ..Default::default()
        };
        Supervisor {
            chaos,
            respawn_after,
            slots: vec![slot; workers],
            chaos_started: None,
            chaos_clock: Duration::ZERO,
            state_lost: LossClock::default(),
        }
    }

    /// The worker's process is running from now.
    pub fn started(&mut self, worker: usize) {
        let s = &mut self.slots[worker];
        (s.running, s.start_at, s.stopped) = (true, None, false);
    }

    /// Starting the worker failed: the others train on, and it is tried again later.
    pub fn start_failed(&mut self, worker: usize, now: Instant) {
        self.slots[worker].start_at = Some(now + SPAWN_RETRY);
    }

    pub fn exited(&mut self, worker: usize, exit: Exit, now: Instant) {
        let s = &mut self.slots[worker];
        s.running = false;
        match exit {
            Exit::Crashed => s.start_at = self.respawn_after.map(|d| now + d),
            Exit::GaveUp { why } => s.gave_up = Some(why),
            Exit::Finished => {}
        }
    }

    /// Whether the worker was stopped (hung by chaos) and not continued since.
    pub fn is_stopped(&self, worker: usize) -> bool {
        self.slots[worker].stopped
    }

    /// What to do now.
    pub fn decide(&mut self, now: Instant, seen: &Seen) -> Vec<Action> {
        if self.state_is_lost(now, seen) {
            return vec![Action::StateLost];
        }
        let mut actions = self.chaos_due(now, seen);
        for (worker, s) in self.slots.iter().enumerate() {
            if !s.running && s.start_at.is_some_and(|t| now >= t) {
                actions.push(Action::Start { worker });
            }
        }
        if self
            .slots
            .iter()
            .all(|s| !s.running && s.start_at.is_none())
        {
            let gave_up = self
                .slots
                .iter()
                .enumerate()
                .find_map(|(i, s)| Some((i, s.gave_up.clone()?)));
            actions.push(Action::AllExited { gave_up });
        }
        actions
    }

    /// A stopped (hung) worker may come back with the state: no loss while one is.
    fn state_is_lost(&mut self, now: Instant, seen: &Seen) -> bool {
        let lost = seen.state_lost && !self.slots.iter().any(|s| s.stopped);
        self.state_lost.expired(now, lost)
    }

    fn chaos_due(&mut self, now: Instant, seen: &Seen) -> Vec<Action> {
        if seen.committed_rounds > 0 || seen.live_workers >= self.slots.len() {
            self.chaos_started.get_or_insert(now);
        }
        let Some(t0) = self.chaos_started else {
            return Vec::new();
        };
        let clock = now.duration_since(t0);
        let due = self.chaos.due(self.chaos_clock, clock, self.slots.len());
        self.chaos_clock = clock;
        let mut actions = Vec::new();
        for a in due {
            let s = &mut self.slots[a.worker];
            // A signal for a worker with no process (it is being restarted) is dropped.
            if s.running {
                s.stopped = a.signal == Signal::Stop;
                actions.push(Action::Signal {
                    worker: a.worker,
                    signal: a.signal,
                });
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn supervisor(
        workers: usize,
        chaos: &str,
        respawn: Option<Duration>,
        t0: Instant,
    ) -> Supervisor {
        let plan = if chaos.is_empty() {
            ChaosPlan::default()
        } else {
            ChaosPlan::parse(chaos, workers).unwrap()
        };
        Supervisor::new(workers, plan, respawn, t0)
    }

    fn all_started(s: &mut Supervisor, t: Instant) {
        let n = s.slots.len();
        let starts = s.decide(t, &Seen::default());
        assert_eq!(
            starts,
            (0..n)
                .map(|worker| Action::Start { worker })
                .collect::<Vec<_>>()
        );
        (0..n).for_each(|w| s.started(w));
    }

    #[test]
    fn crashed_workers_restart_after_the_delay_and_ones_that_gave_up_do_not() {
        let t0 = Instant::now();
        let mut s = supervisor(2, "", Some(S(1)), t0);
        all_started(&mut s, t0);
        s.exited(0, Exit::Crashed, t0 + S(2));
        assert_eq!(s.decide(t0 + S(2), &Seen::default()), vec![]);
        assert_eq!(
            s.decide(t0 + S(3), &Seen::default()),
            vec![Action::Start { worker: 0 }]
        );
        s.started(0);
        s.exited(
            1,
            Exit::GaveUp {
                why: "error: bad data".into(),
            },
            t0 + S(4),
        );
        assert_eq!(s.decide(t0 + S(10), &Seen::default()), vec![]);
        s.exited(0, Exit::Finished, t0 + S(11));
        assert_eq!(
            s.decide(t0 + S(11), &Seen::default()),
            vec![Action::AllExited {
                gave_up: Some((1, "error: bad data".into()))
            }]
        );
    }

    #[test]
    fn without_respawn_a_crash_is_final() {
        let t0 = Instant::now();
        let mut s = supervisor(1, "", None, t0);
        all_started(&mut s, t0);
        s.exited(0, Exit::Crashed, t0 + S(1));
        assert_eq!(
            s.decide(t0 + S(9), &Seen::default()),
            vec![Action::AllExited { gave_up: None }]
        );
    }

    #[test]
    fn a_worker_that_cannot_start_is_tried_again_later() {
        let t0 = Instant::now();
        let mut s = supervisor(1, "", Some(S(1)), t0);
        assert_eq!(
            s.decide(t0, &Seen::default()),
            vec![Action::Start { worker: 0 }]
        );
        s.start_failed(0, t0);
        assert_eq!(s.decide(t0 + S(4), &Seen::default()), vec![]);
        assert_eq!(
            s.decide(t0 + S(5), &Seen::default()),
            vec![Action::Start { worker: 0 }]
        );
    }

    #[test]
    fn chaos_time_starts_with_training_and_signals_only_running_workers() {
        let t0 = Instant::now();
        let mut s = supervisor(
            2,
            "hang:worker=1,at=2s,for=3s; kill:worker=0,at=4s",
            Some(S(1)),
            t0,
        );
        all_started(&mut s, t0);
        // Not everyone is live yet and no round committed: the chaos clock has not started.
        let waiting = Seen {
            live_workers: 1,
            ..Default::default()
        };
        assert_eq!(s.decide(t0 + S(10), &waiting), vec![]);
        let training = Seen {
            live_workers: 2,
            ..Default::default()
        };
        let t1 = t0 + S(10);
        assert_eq!(s.decide(t1, &training), vec![]);
        let hang = Action::Signal {
            worker: 1,
            signal: Signal::Stop,
        };
        assert_eq!(s.decide(t1 + S(2), &training), vec![hang]);
        assert!(s.is_stopped(1));
        // The kill at 4 s finds worker 0 gone already: nothing to signal.
        s.exited(0, Exit::Crashed, t1 + S(3));
        let cont = Action::Signal {
            worker: 1,
            signal: Signal::Continue,
        };
        assert_eq!(
            s.decide(t1 + S(5), &training),
            vec![cont, Action::Start { worker: 0 }]
        );
        assert!(!s.is_stopped(1));
    }

    #[test]
    fn a_lost_state_ends_the_run_after_the_grace_unless_a_stopped_worker_may_hold_it() {
        let t0 = Instant::now();
        let mut s = supervisor(2, "hang:worker=1,at=1s,for=60s", Some(S(1)), t0);
        all_started(&mut s, t0);
        let lost = Seen {
            committed_rounds: 3,
            live_workers: 2,
            state_lost: true,
        };
        assert_eq!(s.decide(t0, &lost), vec![]);
        assert_eq!(
            s.decide(t0 + S(1), &lost),
            vec![Action::Signal {
                worker: 1,
                signal: Signal::Stop
            }]
        );
        // Worker 1 is stopped and may hold the state: no verdict however long it lasts.
        assert_eq!(s.decide(t0 + S(30), &lost), vec![]);
        let mut s = supervisor(2, "", Some(S(1)), t0);
        all_started(&mut s, t0);
        assert_eq!(s.decide(t0, &lost), vec![]);
        assert_eq!(s.decide(t0 + S(4), &lost), vec![]);
        let found = Seen {
            state_lost: false,
            ..lost
        };
        assert_eq!(
            s.decide(t0 + S(5), &found),
            vec![],
            "found again: the grace restarts"
        );
        assert_eq!(s.decide(t0 + S(6), &lost), vec![]);
        assert_eq!(s.decide(t0 + S(11), &lost), vec![Action::StateLost]);
    }

    #[test]
    fn a_lost_state_restarts_cold_while_restarts_remain_and_a_checkpoint_exists() {
        assert_eq!(
            after_state_lost(0, 3, true),
            AfterStateLost::RestartCold { attempt: 1 }
        );
        assert_eq!(
            after_state_lost(2, 3, true),
            AfterStateLost::RestartCold { attempt: 3 }
        );
        let end = |done, max, checkpointed| match after_state_lost(done, max, checkpointed) {
            AfterStateLost::End { reason } => reason,
            restart => panic!("{restart:?}"),
        };
        assert!(end(3, 3, true).contains("restarted cold 3 time(s)"));
        assert!(end(0, 0, true).contains("max_cold_restarts"));
        assert!(end(0, 3, false).contains("no checkpoint"));
    }
}
