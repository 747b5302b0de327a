//! The guarded step: compute → inject chaos faults → gradient norm → guard verdict →
//! apply / skip / roll back / stop. One implementation, used by single-worker training
//! ([`crate::run::train`], [`crate::train_step`]) and by every multi-worker sync strategy.

use burn::tensor::Tensor;
use holdfast_model::Weights;

use crate::chaos::NumberFaults;
use crate::config::TrainSection;
use crate::data::Dataset;
use crate::guard::{Guard, GuardSection, Verdict};
use crate::optim::{AdamW, grad_norm};
use crate::state::TrainState;
use crate::step::{apply_clipped, compute_grads, inject};

/// The batches of one optimizer step.
#[derive(Clone, Copy)]
pub struct StepBatches<'a> {
    pub data: &'a Dataset,
    pub seed: u64,
    /// First sample of each micro-batch.
    pub firsts: &'a [u64],
    pub rows: usize,
    /// The schedule step: its learning rate and the guard's step number.
    pub step: u64,
    /// Which chaos faults fire: the step, or (single worker) the batch draw.
    pub fault_key: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The update was applied with this learning rate.
    Applied { lr: f64 },
    /// The update was not applied.
    Skipped { reason: String },
    /// The weights and moments went back to the last good state, taken at `to_step`.
    RolledBack { reason: String, to_step: u64 },
    /// Past the guard's rollback limit (the weights were rolled back as well).
    Stop { reason: String },
}

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    pub outcome: Outcome,
    /// The measured loss, NaN or spiking as it was.
    pub loss: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// A step's gradients and the guard's verdict on them, not yet applied.
pub struct Judged {
    pub grads: Vec<Tensor<2>>,
    pub loss: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub verdict: Verdict,
}

/// A state to roll back to.
struct GoodState {
    weights: Weights,
    opt: AdamW,
    guard: Guard,
    step: u64,
}

/// The guard and the faults of one training loop, and its last good state.
pub struct GuardedStep<'f> {
    guard: Guard,
    faults: &'f mut NumberFaults,
    good: Option<GoodState>,
}

impl<'f> GuardedStep<'f> {
    pub fn new(cfg: GuardSection, faults: &'f mut NumberFaults) -> Self {
        GuardedStep {
            guard: Guard::new(cfg),
            faults,
            good: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.guard.enabled()
    }

    /// No recent anomaly: a state now is a good one to keep.
    pub fn is_calm(&self) -> bool {
        self.guard.is_calm()
    }

    pub fn faults(&mut self) -> &mut NumberFaults {
        self.faults
    }

    /// Remembers `weights` and `opt` at `step` as the state a rollback returns to (tensor
    /// clones share storage until one side is updated).
    pub fn mark_good(&mut self, weights: &Weights, opt: &AdamW, step: u64) {
        self.good = Some(GoodState {
            weights: weights.clone(),
            opt: opt.clone(),
            guard: self.guard.clone(),
            step,
        });
    }

    /// Computes the step's gradients, injects its faults (once: a step trained again runs
    /// clean) and judges them.
    pub fn judge(&mut self, weights: &Weights, b: &StepBatches) -> Judged {
        let (grads, loss, tokens) = compute_grads(weights, b.data, b.seed, b.firsts, b.rows);
        let (grads, loss) = inject(self.faults, b.fault_key, grads, loss);
        self.faults.spend(b.fault_key);
        let norm = grad_norm(&grads);
        let verdict = self.guard.observe(b.step, loss, norm);
        Judged {
            grads,
            loss,
            grad_norm: norm,
            tokens,
            verdict,
        }
    }

    /// One whole step: judged, then applied (clipped AdamW), skipped or rolled back.
    pub fn step(
        &mut self,
        weights: &mut Weights,
        opt: &mut AdamW,
        b: &StepBatches,
        h: &TrainSection,
    ) -> StepReport {
        let j = self.judge(weights, b);
        let outcome = match j.verdict {
            Verdict::Apply => Outcome::Applied {
                lr: apply_clipped(weights, opt, j.grads, j.grad_norm, b.step, h),
            },
            Verdict::Skip { reason } => Outcome::Skipped { reason },
            Verdict::Rollback { reason } => Outcome::RolledBack {
                reason,
                to_step: self.restore(weights, opt).unwrap_or(b.step),
            },
            Verdict::Stop { reason } => {
                self.restore(weights, opt);
                Outcome::Stop { reason }
            }
        };
        StepReport {
            outcome,
            loss: j.loss,
            grad_norm: j.grad_norm,
            tokens: j.tokens,
        }
    }

    /// Back to the good state, if one was marked; returns its step.
    fn restore(&mut self, weights: &mut Weights, opt: &mut AdamW) -> Option<u64> {
        let good = self.good.as_ref()?;
        *weights = good.weights.clone();
        *opt = good.opt.clone();
        self.guard.restore_statistics(&good.guard);
        Some(good.step)
    }
}

/// One step of single-worker training: the state's next batches, guarded. The data cursor
/// advances whatever the outcome (a skipped or rolled-back window is not trained again);
/// a rollback also takes the step count back to the good state's.
pub fn single_worker_step(
    state: &mut TrainState,
    data: &Dataset,
    h: &TrainSection,
    stepper: &mut GuardedStep,
) -> StepReport {
    let firsts = state
        .cursor
        .micro_batch_starts(h.grad_accum, 0, 1, h.batch_size);
    // Faults are keyed to the batch drawn, which advances even when a step is skipped.
    let draw = state.cursor.next_sample / (h.batch_size * h.grad_accum) as u64;
    let b = StepBatches {
        data,
        seed: state.seed,
        firsts: &firsts,
        rows: h.batch_size,
        step: state.step,
        fault_key: draw,
    };
    let report = stepper.step(&mut state.weights, &mut state.opt, &b, h);
    state.cursor.advance(h.batch_size, h.grad_accum, 1);
    match report.outcome {
        Outcome::Applied { .. } => state.step += 1,
        Outcome::RolledBack { to_step, .. } => state.step = to_step,
        Outcome::Skipped { .. } | Outcome::Stop { .. } => {}
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::AdditionTask;
    use burn::tensor::Device;
    use holdfast_model::ModelConfig;

    fn setup() -> (Weights, AdamW, Dataset) {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let weights = Weights::init(&cfg, 3, &Device::flex());
        let opt = AdamW::new(&weights.tensors);
        (weights, opt, Dataset::Addition(AdditionTask::new(3)))
    }

    fn batches<'a>(data: &'a Dataset, step: u64, firsts: &'a [u64]) -> StepBatches<'a> {
        StepBatches {
            data,
            seed: 1,
            firsts,
            rows: 4,
            step,
            fault_key: step,
        }
    }

    fn values(w: &Weights) -> Vec<f32> {
        crate::replica::flatten(&w.tensors)
    }

    #[test]
    fn a_clean_step_is_applied_and_a_nan_step_is_skipped_once() {
        let (mut w, mut opt, data) = setup();
        let mut faults = NumberFaults {
            nan_steps: vec![1],
            ..Default::default()
        };
        let mut g = GuardedStep::new(GuardSection::default(), &mut faults);
        let h = TrainSection::default();
        let before = values(&w);
        let r = g.step(&mut w, &mut opt, &batches(&data, 0, &[0]), &h);
        assert!(matches!(r.outcome, Outcome::Applied { .. }), "{r:?}");
        assert!(r.loss.is_finite() && r.tokens > 0);
        assert_ne!(values(&w), before, "an applied step moves the weights");

        let after_first = values(&w);
        let r = g.step(&mut w, &mut opt, &batches(&data, 1, &[4]), &h);
        assert!(matches!(r.outcome, Outcome::Skipped { .. }), "{r:?}");
        assert!(r.loss.is_nan());
        assert_eq!(values(&w), after_first, "a skipped step changes nothing");

        // The fault was spent: the same step trained again runs clean.
        let r = g.step(&mut w, &mut opt, &batches(&data, 1, &[4]), &h);
        assert!(matches!(r.outcome, Outcome::Applied { .. }), "{r:?}");
        assert!(g.faults().is_empty());
    }

    #[test]
    fn repeated_nans_roll_back_to_the_marked_state() {
        let (mut w, mut opt, data) = setup();
        let mut faults = NumberFaults {
            nan_steps: vec![2, 3, 4],
            ..Default::default()
        };
        let cfg = GuardSection {
            max_nonfinite_in_a_row: 3,
            ..Default::default()
        };
        let mut g = GuardedStep::new(cfg, &mut faults);
        let h = TrainSection::default();
        g.step(&mut w, &mut opt, &batches(&data, 0, &[0]), &h);
        g.mark_good(&w, &opt, 1);
        let good = values(&w);
        g.step(&mut w, &mut opt, &batches(&data, 1, &[4]), &h);
        assert_ne!(values(&w), good);
        let outcomes: Vec<Outcome> = (2..5)
            .map(|s| {
                g.step(&mut w, &mut opt, &batches(&data, s, &[4 * s]), &h)
                    .outcome
            })
            .collect();
        assert!(
            matches!(outcomes[0], Outcome::Skipped { .. }),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Outcome::RolledBack { to_step: 1, .. }),
            "{outcomes:?}"
        );
        assert_eq!(values(&w), good, "back to the marked weights");
    }

    #[test]
    fn with_the_guard_off_every_step_is_applied() {
        let (mut w, mut opt, data) = setup();
        // Even a NaN step: `train_step` relies on it.
        let mut faults = NumberFaults {
            nan_steps: vec![0],
            ..Default::default()
        };
        let cfg = GuardSection {
            enabled: false,
            ..Default::default()
        };
        let mut g = GuardedStep::new(cfg, &mut faults);
        assert!(!g.enabled());
        let h = TrainSection::default();
        let r = g.step(&mut w, &mut opt, &batches(&data, 0, &[0, 4]), &h);
        assert!(matches!(r.outcome, Outcome::Applied { .. }), "{r:?}");
    }
}
