//! How much each member trains in a round: a fixed share each (the round waits for the
//! slowest), or batches handed out on demand until the round closes at a deadline or a batch
//! count (faster members train more). The decisions are pure functions of the round's
//! figures and `now`, used by the coordinator ([`crate::coordinator`]).

use std::time::{Duration, Instant};

/// The part of a timed round an audited member's share is sized to fill at its last known
/// speed: finishing early costs only its own idle time, finishing late everyone's (its speed
/// varies; its auditors' replays compete with it for shared cores, say).
pub const AUDITED_SHARE: f64 = 0.75;

/// What closes a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RoundBound {
    /// Each member gets the same number of batch ids when the round starts.
    Fixed,
    /// Members ask for a step's batch ids at a time until `round` after the round started.
    /// A member not ready `grace` after that is removed: its batches go back to the pool.
    Time { round: Duration, grace: Duration },
    /// Members ask for a step's batch ids at a time until the round has handed out `batches`.
    Batches { batches: u64 },
}

impl RoundBound {
    /// Whether members ask for their batches as they train.
    pub fn on_demand(&self) -> bool {
        !matches!(self, RoundBound::Fixed)
    }

    /// When a member not ready yet is out of a round that started at `started`.
    pub fn give_up_at(&self, started: Instant) -> Option<Instant> {
        match self {
            RoundBound::Time { round, grace } => Some(started + *round + *grace),
            _ => None,
        }
    }

    /// Whether a member asking at `now` gets another step's batches: before the deadline,
    /// and only if it would finish that step nearer the deadline than it stands now (its
    /// `step_s`, the time its last step took, when known); or while the round's batch count
    /// (`handed` so far) is not reached.
    pub fn hands_out(
        &self,
        started: Instant,
        now: Instant,
        handed: u64,
        step_s: Option<Duration>,
    ) -> bool {
        match self {
            RoundBound::Fixed => false,
            RoundBound::Time { round, .. } => {
                let deadline = started + *round;
                now < deadline && step_s.is_none_or(|s| now + s / 2 <= deadline)
            }
            RoundBound::Batches { batches } => handed < *batches,
        }
    }

    /// How many batches a member whose batches take `batch_s` each is given in a round of
    /// `members`, in whole steps of `per_step`, when it cannot ask as it trains (it is
    /// audited, and its auditors need its batches up front): [`AUDITED_SHARE`] of a timed
    /// round at that speed, or its part of a counted one. None when its speed is not known.
    pub fn share(&self, members: u64, per_step: u64, batch_s: Option<f64>) -> Option<u64> {
        let batches = match self {
            RoundBound::Fixed => return None,
            RoundBound::Time { round, .. } => {
                let each = batch_s.filter(|s| *s > 0.0)?;
                (AUDITED_SHARE * round.as_secs_f64() / each) as u64
            }
            RoundBound::Batches { batches } => batches / members.max(1),
        };
        let per_step = per_step.max(1);
        Some((batches / per_step).max(1) * per_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_timed_round_hands_out_a_step_only_when_it_ends_nearer_the_deadline() {
        let t0 = Instant::now();
        let b = RoundBound::Time {
            round: 10 * S,
            grace: 2 * S,
        };
        assert!(
            b.hands_out(t0, t0, 0, None),
            "speed unknown: until the deadline"
        );
        assert!(b.hands_out(t0, t0 + 9 * S, 99, None));
        assert!(
            !b.hands_out(t0, t0 + 10 * S, 0, None),
            "closed at the deadline"
        );
        // A step of 4 s at 7 s would end at 11 s: 1 s past, nearer than 3 s before.
        assert!(b.hands_out(t0, t0 + 7 * S, 0, Some(4 * S)));
        // At 8.5 s it would end 2.5 s past, farther than the 1.5 s left.
        assert!(!b.hands_out(t0, t0 + 8500 * S / 1000, 0, Some(4 * S)));
        assert_eq!(b.give_up_at(t0), Some(t0 + 12 * S));
    }

    #[test]
    fn a_counted_round_closes_at_its_batches_and_a_fixed_one_never_hands_out() {
        let t0 = Instant::now();
        let b = RoundBound::Batches { batches: 8 };
        assert!(b.hands_out(t0, t0 + 1000 * S, 7, Some(S)));
        assert!(!b.hands_out(t0, t0, 8, None));
        assert_eq!(b.give_up_at(t0), None);
        assert!(!RoundBound::Fixed.hands_out(t0, t0, 0, None));
        assert!(!RoundBound::Fixed.on_demand() && b.on_demand());
    }

    #[test]
    fn a_members_share_is_whole_steps_and_needs_its_speed_in_a_timed_round() {
        let timed = RoundBound::Time {
            round: 10 * S,
            grace: S,
        };
        assert_eq!(timed.share(4, 2, None), None);
        assert_eq!(timed.share(4, 2, Some(0.0)), None);
        assert_eq!(
            timed.share(4, 2, Some(0.5)),
            Some(14),
            "15 batches: 7 steps"
        );
        assert_eq!(timed.share(4, 2, Some(60.0)), Some(2), "at least one step");
        let counted = RoundBound::Batches { batches: 10 };
        assert_eq!(counted.share(4, 1, None), Some(2));
        assert_eq!(RoundBound::Fixed.share(4, 1, Some(1.0)), None);
    }
}
