//! DDP: each replica contributes one step's gradients; the committed average is applied by
//! AdamW on every replica, so the replicas stay one state.

use super::{Contribution, RoundWork, SyncStrategy, timed};
use crate::config::TrainSection;
use crate::guard::Verdict;
use crate::guarded::GuardedStep;
use crate::replica::{Replica, flatten, unflatten};
use crate::step::apply_grads;

pub struct Ddp;

impl SyncStrategy for Ddp {
    fn has_velocity(&self) -> bool {
        false
    }

    /// A step the guard refuses cannot be undone locally (the replicas share one state), so
    /// this replica contributes zeros rather than poison the average. Past its rollback limit
    /// it goes on doing so: whether the run is unstable is the coordinator's call.
    fn contribute(
        &self,
        r: &mut Replica,
        work: &RoundWork,
        stepper: &mut GuardedStep,
    ) -> Contribution {
        let firsts = work.firsts(work.batches);
        let b = work.step(0, &firsts);
        let (j, compute_s) = timed(|| {
            let (j, took) = timed(|| stepper.judge(&r.weights, &b));
            work.pace(std::time::Duration::from_secs_f64(took));
            j
        });
        let rolled_back = matches!(j.verdict, Verdict::Rollback { .. } | Verdict::Stop { .. });
        let mut c = Contribution {
            payload: flatten(&j.grads),
            loss: j.loss,
            tokens: j.tokens as u64,
            compute_s,
            ..Default::default()
        };
        match j.verdict {
            Verdict::Apply => {}
            Verdict::Skip { reason } | Verdict::Rollback { reason } | Verdict::Stop { reason } => {
                tracing::warn!("step {}: contributing zeros: {reason}", b.step);
                c.skipped_steps = 1;
                c.rollbacks = u64::from(rolled_back);
                c.payload.fill(0.0);
            }
        }
        c
    }

    fn apply(&self, r: &mut Replica, average: &[f32], work: &RoundWork) -> bool {
        let device = r.weights.tensors[0].device();
        let grads = unflatten(average, &r.weights.specs, &device);
        let h = work.train;
        let damped = TrainSection {
            lr: h.lr * work.step_scale,
            min_lr: h.min_lr * work.step_scale,
            ..h.clone()
        };
        apply_grads(&mut r.weights, &mut r.opt, grads, work.first_step, &damped);
        r.outer = flatten(&r.weights.tensors);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::NumberFaults;
    use crate::guard::GuardSection;
    use crate::sync::outer::average_in_place;
    use crate::sync::testing::*;

    #[test]
    fn replicas_contribute_gradients_and_apply_the_same_average() {
        let (data, train) = (data(), train());
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let (mut a, mut b) = (replica(false), replica(false));
        let ca = Ddp.contribute(&mut a, &work(&data, &train, &[0]), &mut stepper);
        let cb = Ddp.contribute(&mut b, &work(&data, &train, &[1]), &mut stepper);
        assert!(ca.payload.iter().any(|&g| g != 0.0) && ca.payload != cb.payload);
        assert_eq!(
            flatten(&a.weights.tensors),
            a.outer,
            "contributing changes nothing"
        );
        let mut avg: Vec<f32> = ca
            .payload
            .iter()
            .zip(&cb.payload)
            .map(|(x, y)| x + y)
            .collect();
        average_in_place(&mut avg, 2);
        let before = a.outer.clone();
        let w = work(&data, &train, &[]);
        assert!(Ddp.apply(&mut a, &avg, &w) && Ddp.apply(&mut b, &avg, &w));
        assert_ne!(a.outer, before, "AdamW stepped");
        assert_eq!(a.state_hash(), b.state_hash(), "one state on every replica");
        assert_eq!(flatten(&a.weights.tensors), a.outer);
    }

    #[test]
    fn a_refused_step_contributes_zeros() {
        let (data, train) = (data(), train());
        let mut faults = NumberFaults {
            nan_steps: vec![10],
            ..Default::default()
        };
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let mut r = replica(false);
        let c = Ddp.contribute(&mut r, &work(&data, &train, &[0]), &mut stepper);
        assert!(c.payload.iter().all(|&g| g == 0.0));
        assert_eq!((c.skipped_steps, c.rollbacks), (1, 0));
    }
}
