//! DDP: each replica contributes one step's gradients; the committed average is applied by
//! AdamW on every replica, so the replicas stay one state.

use std::time::Instant;

use super::{Contribution, RoundWork, SyncStrategy, counted_mean, payload_buffer, weighted};
use crate::config::TrainSection;
use crate::guard::Verdict;
use crate::guarded::GuardedStep;
use crate::replica::{Replica, flatten, flatten_into, unflatten};
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
        let started = Instant::now();
        let j = stepper.judge(&r.weights, &b);
        work.pace(started);
        let compute_s = started.elapsed().as_secs_f64();
        let rolled_back = matches!(j.verdict, Verdict::Rollback { .. } | Verdict::Stop { .. });
        let mut c = Contribution {
            loss: j.loss,
            tokens: j.tokens as u64,
            compute_s,
            ..Default::default()
        };
        let mut values = payload_buffer(r.outer.len());
        match j.verdict {
            Verdict::Apply => flatten_into(&j.grads, &mut values),
            Verdict::Skip { reason } | Verdict::Rollback { reason } | Verdict::Stop { reason } => {
                tracing::warn!("step {}: contributing nothing: {reason}", b.step);
                c.skipped_steps = 1;
                c.rollbacks = u64::from(rolled_back);
                // Zeros, weight 0: nothing of the refused gradient leaves this replica.
                values.resize(r.outer.len(), 0.0);
            }
        }
        c.payload = weighted(values, work.weight(c.skipped_steps == 0, 1));
        c
    }

    /// With no counted gradient, AdamW does not step at all: a step on zeros would still
    /// decay the weights and age the moments.
    fn apply(&self, r: &mut Replica, sum: Vec<f32>, work: &RoundWork) -> bool {
        let Some(average) = counted_mean(sum) else {
            return false;
        };
        let device = r.weights.tensors[0].device();
        let grads = unflatten(&average, &r.weights.specs, &device);
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
    use crate::sync::testing::*;

    fn contribution(batch: u64, nan: bool) -> Contribution {
        let (data, train) = (data(), train());
        let mut faults = NumberFaults {
            nan_steps: if nan { vec![10] } else { vec![] },
            ..Default::default()
        };
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        Ddp.contribute(
            &mut replica(false),
            &work(&data, &train, &[batch]),
            &mut stepper,
        )
    }

    fn moments(r: &Replica) -> Vec<f32> {
        r.opt
            .exp_avg
            .iter()
            .chain(&r.opt.exp_avg_sq)
            .flat_map(|t| crate::replica::flatten(std::slice::from_ref(t)))
            .collect()
    }

    #[test]
    fn replicas_contribute_gradients_and_apply_the_same_average() {
        let (ca, cb) = (contribution(0, false), contribution(1, false));
        assert!(ca.payload.iter().any(|&g| g != 0.0) && ca.payload != cb.payload);
        assert_eq!(ca.payload.last(), Some(&1.0), "a gradient counts");
        let (data, train) = (data(), train());
        let w = work(&data, &train, &[]);
        let (mut a, mut b) = (replica(false), replica(false));
        let before = a.outer.clone();
        assert!(Ddp.apply(&mut a, summed(&[&ca, &cb]), &w));
        assert!(Ddp.apply(&mut b, summed(&[&ca, &cb]), &w));
        assert_ne!(a.outer, before, "AdamW stepped");
        assert_eq!(a.state_hash(), b.state_hash(), "one state on every replica");
        assert_eq!(moments(&a), moments(&b));
        assert_eq!(flatten(&a.weights.tensors), a.outer);
    }

    #[test]
    fn a_refused_step_is_left_out_of_the_average_not_averaged_in_as_zeros() {
        let refused = contribution(1, true);
        assert!(refused.payload.iter().all(|&g| g == 0.0), "zeros, weight 0");
        assert_eq!((refused.skipped_steps, refused.rollbacks), (1, 0));
        let good = contribution(0, false);
        let (data, train) = (data(), train());
        let w = work(&data, &train, &[]);
        let (mut with_refusal, mut alone) = (replica(false), replica(false));
        assert!(Ddp.apply(&mut with_refusal, summed(&[&good, &refused]), &w));
        assert!(Ddp.apply(&mut alone, summed(&[&good]), &w));
        assert_eq!(with_refusal.outer, alone.outer);
        assert_eq!(
            moments(&with_refusal),
            moments(&alone),
            "AdamW saw the good gradient, not half of it"
        );
    }

    #[test]
    fn when_every_step_is_refused_adamw_does_not_step() {
        let refused = contribution(1, true);
        let (data, train) = (data(), train());
        let mut r = replica(false);
        let (before, t) = (r.outer.clone(), r.opt.t);
        assert!(!Ddp.apply(
            &mut r,
            summed(&[&refused, &refused]),
            &work(&data, &train, &[])
        ));
        assert_eq!(
            (r.outer == before, r.opt.t),
            (true, t),
            "no decay, no aged moments"
        );
    }
}
