//! DiLoCo: each replica trains H guarded inner steps from the outer weights and contributes
//! its pseudo-gradient (outer − local); the committed average takes one outer Nesterov step.

use super::outer::{OuterNesterov, pseudo_gradient};
use super::{Contribution, RoundWork, SyncStrategy, counted_mean, payload_buffer, timed, weighted};
use crate::config::SyncSection;
use crate::guarded::{GuardedStep, Outcome};
use crate::replica::{Replica, flatten};
#[cfg(test)]
use crate::{config::TrainSection, data::Dataset, sync::testing::summed};

pub struct Diloco {
    outer: OuterNesterov,
}

impl Diloco {
    pub fn new(s: &SyncSection) -> Diloco {
        Diloco {
            outer: OuterNesterov {
                lr: s.outer_lr as f32,
                momentum: s.outer_momentum as f32,
            },
        }
    }
}

impl SyncStrategy for Diloco {
    fn has_velocity(&self) -> bool {
        true
    }

    fn contribute(
        &self,
        r: &mut Replica,
        work: &RoundWork,
        stepper: &mut GuardedStep,
    ) -> Contribution {
        let (mut c, compute_s) = timed(|| inner_steps(r, work, stepper));
        c.compute_s = compute_s;
        let mut delta = payload_buffer(r.outer.len());
        pseudo_gradient(&r.outer, &flatten(&r.weights.tensors), &mut delta);
        // A replica that made no progress (rolled back, or every step refused) is not a vote
        // for standing still: the outer step is the mean of the replicas that moved.
        let moved = delta.iter().any(|&d| d != 0.0);
        c.payload = weighted(delta, moved);
        c
    }

    fn apply(&self, r: &mut Replica, sum: Vec<f32>, work: &RoundWork) -> bool {
        let moved = match counted_mean(sum) {
            Some(average) => {
                let outer = self.outer.damped(work.step_scale as f32);
                outer.apply_round(&mut r.outer, &mut r.velocity, &average)
            }
            // No replica made progress: no step, and the momentum that led here is cleared.
            None => {
                r.velocity.fill(0.0);
                false
            }
        };
        r.reset_local_to_outer();
        moved
    }
}

/// The round's inner steps. A rollback goes back to the round's start (the outer weights):
/// the replica then contributes no change, and the rest of its batches this round are
/// skipped. Past its rollback limit a replica goes on rolling back: whether the run is
/// unstable is the coordinator's call, from every replica's rounds.
fn inner_steps(r: &mut Replica, work: &RoundWork, stepper: &mut GuardedStep) -> Contribution {
    let mut c = Contribution::default();
    let mut measured = 0u32;
    stepper.mark_good(&r.weights, &r.opt, work.first_step);
    for (i, ids) in work.batches.chunks(work.train.grad_accum).enumerate() {
        let firsts = work.firsts(ids);
        let b = work.step(i, &firsts);
        let started = std::time::Instant::now();
        let report = stepper.step(&mut r.weights, &mut r.opt, &b, work.train);
        work.pace(started);
        c.tokens += report.tokens as u64;
        if report.loss.is_finite() {
            c.loss += report.loss;
            measured += 1;
        }
        match report.outcome {
            Outcome::Applied { .. } => {}
            Outcome::Skipped { reason } => {
                tracing::warn!("step {}: not applied: {reason}", b.step);
                c.skipped_steps += 1;
            }
            Outcome::RolledBack { reason, .. } | Outcome::Stop { reason } => {
                tracing::warn!(
                    "step {}: rolled back to the round's start: {reason}",
                    b.step
                );
                c.rollbacks += 1;
                break;
            }
        }
    }
    c.loss /= f64::from(measured.max(1));
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::NumberFaults;
    use crate::guard::GuardSection;
    use crate::sync::testing::*;

    fn strategy() -> Diloco {
        Diloco::new(&SyncSection {
            outer_lr: 1.0,
            ..Default::default()
        })
    }

    /// Three NaN steps from the round's first roll a replica back to its start.
    fn rolled_back(data: &Dataset, train: &TrainSection) -> Contribution {
        let mut faults = NumberFaults {
            nan_steps: vec![10, 11, 12],
            ..Default::default()
        };
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let c = strategy().contribute(
            &mut replica(true),
            &work(data, train, &[0, 1, 2, 3]),
            &mut stepper,
        );
        assert_eq!((c.skipped_steps, c.rollbacks), (2, 1), "{c:?}");
        c
    }

    fn trained(data: &Dataset, train: &TrainSection, batches: &[u64]) -> Contribution {
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        strategy().contribute(
            &mut replica(true),
            &work(data, train, batches),
            &mut stepper,
        )
    }

    #[test]
    fn a_replica_contributes_its_progress_and_the_average_moves_every_replica_alike() {
        let (data, train) = (data(), train());
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let (mut a, mut b) = (replica(true), replica(true));
        let s = strategy();
        let ca = s.contribute(&mut a, &work(&data, &train, &[0, 1, 2]), &mut stepper);
        let cb = s.contribute(&mut b, &work(&data, &train, &[3, 4, 5]), &mut stepper);
        let mut delta = Vec::new();
        pseudo_gradient(&a.outer, &flatten(&a.weights.tensors), &mut delta);
        assert!(delta.iter().any(|&d| d != 0.0), "three steps moved it");
        assert_eq!(ca.payload, weighted(delta, true), "the progress, weight 1");
        assert!(ca.loss > 0.0 && ca.tokens > 0 && ca.skipped_steps + ca.rollbacks == 0);
        assert_ne!(ca.payload, cb.payload, "other batches, other progress");

        let sum = summed(&[&ca, &cb]);
        let mean = counted_mean(sum.clone()).unwrap();
        let before = a.outer.clone();
        let w = work(&data, &train, &[]);
        assert!(s.apply(&mut a, sum.clone(), &w) && s.apply(&mut b, sum, &w));
        assert_eq!(
            a.state_hash(),
            b.state_hash(),
            "replicas stay bit-identical"
        );
        // lr 1, no momentum: the outer weights land on the mean of the replicas' weights.
        let expected: Vec<f32> = before.iter().zip(&mean).map(|(o, d)| o - d).collect();
        assert_eq!(a.outer, expected);
        assert_eq!(
            flatten(&a.weights.tensors),
            a.outer,
            "local weights reset to outer"
        );
    }

    #[test]
    fn a_rolled_back_replica_does_not_dilute_the_step_of_the_others() {
        let (data, train) = (data(), train());
        let back = rolled_back(&data, &train);
        let (values, weight) = back.payload.split_at(back.payload.len() - 1);
        assert!(
            values.iter().all(|&d| d == 0.0),
            "back at the round's start"
        );
        assert_eq!(weight, [0.0], "a refusal does not count");
        assert_eq!(back.loss, 0.0, "no finite loss measured");

        let good = trained(&data, &train, &[4, 5]);
        let s = strategy();
        let w = work(&data, &train, &[]);
        let (mut with_refusal, mut alone) = (replica(true), replica(true));
        s.apply(&mut with_refusal, summed(&[&good, &back]), &w);
        s.apply(&mut alone, summed(&[&good]), &w);
        assert_eq!(
            with_refusal.outer, alone.outer,
            "the outer step is the moving replica's whole progress, not half of it"
        );
    }

    #[test]
    fn a_round_in_which_no_replica_moved_takes_no_step_and_clears_the_momentum() {
        let (data, train) = (data(), train());
        let s = strategy();
        let mut r = replica(true);
        r.velocity.fill(0.25);
        let before = r.outer.clone();
        let back = rolled_back(&data, &train);
        assert!(!s.apply(&mut r, summed(&[&back, &back]), &work(&data, &train, &[])));
        assert_eq!(r.outer, before);
        assert!(r.velocity.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_damped_round_takes_a_scaled_step() {
        let s = strategy();
        let (data, train) = (data(), train());
        let mut r = replica(true);
        let before = r.outer.clone();
        let sum = weighted(vec![1.0f32; before.len()], true);
        let mut w = work(&data, &train, &[]);
        w.step_scale = 0.5;
        s.apply(&mut r, sum, &w);
        assert_eq!(r.outer[0], before[0] - 0.5);
    }
}
