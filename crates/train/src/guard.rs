//! Stability guards, as a pure decision: given each step's loss and gradient norm, apply the
//! update, skip it, roll back to the last good state, or stop. No tensors here; the training
//! loop acts on the verdict (see `run::train`).
//!
//! - A non-finite loss or gradient norm is never applied; `max_nonfinite_in_a_row` of them
//!   in a row means the state itself is bad: roll back.
//! - A loss spike is a loss more than `spike_threshold` mean absolute deviations above its
//!   running mean (both exponential moving averages over healthy steps, after
//!   `warmup_steps`), and above it by at least `spike_min_increase` nats and
//!   `spike_min_ratio` of the mean: on a flat plateau the deviation shrinks until the batches
//!   that begin a learning transition look like spikes. A spiking step is not applied;
//!   `spike_steps` in a row roll back to the last good state and skip the data seen since
//!   (PaLM's manual fix, automated).
//! - More than `max_rollbacks` rollbacks within `rollback_window` steps: stop and say so,
//!   rather than loop.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardSection {
    pub enabled: bool,
    pub max_nonfinite_in_a_row: u32,
    /// Mean absolute deviations above the running mean that make a step a spike.
    pub spike_threshold: f64,
    /// ...and by at least this much (nats): near-zero losses jump by large factors harmlessly.
    pub spike_min_increase: f64,
    /// ...and by at least this fraction of the mean. Measured on the default task at batch 16:
    /// batches at the onset of its learning transition ran 9-38% above the plateau's mean;
    /// divergences ran 190% and more above it.
    pub spike_min_ratio: f64,
    /// Consecutive spiking steps that trigger a rollback.
    pub spike_steps: u32,
    /// Steps before spike detection starts (the loss falls fast at first).
    pub warmup_steps: u64,
    /// Weight of the newest healthy loss in the running mean and deviation.
    pub ema_alpha: f64,
    /// How often a good state is kept in memory to roll back to.
    pub snapshot_every: u64,
    pub max_rollbacks: u32,
    pub rollback_window: u64,
    /// Multi-worker: a worker whose state disagrees with the majority this many times is
    /// removed as suspect hardware.
    pub max_corruption_flags: u32,
    /// Multi-worker, three or more workers: the chance a round is audited (two workers replay
    /// a third's contribution; see the coordinator's `Options::audit_probability`).
    pub audit_probability: f64,
}

impl Default for GuardSection {
    fn default() -> Self {
        GuardSection {
            enabled: true,
            max_nonfinite_in_a_row: 3,
            spike_threshold: 8.0,
            spike_min_increase: 0.25,
            spike_min_ratio: 0.5,
            spike_steps: 3,
            warmup_steps: 100,
            ema_alpha: 0.02,
            snapshot_every: 50,
            max_rollbacks: 3,
            rollback_window: 1000,
            max_corruption_flags: 3,
            audit_probability: 0.05,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Apply,
    /// Do not apply this step's update.
    Skip {
        reason: String,
    },
    /// Restore the last good state and skip the data since.
    Rollback {
        reason: String,
    },
    Stop {
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct Guard {
    cfg: GuardSection,
    mean: Option<f64>,
    dev: f64,
    healthy_steps: u64,
    nonfinite_run: u32,
    spike_run: u32,
    rollbacks: VecDeque<u64>,
}

impl Guard {
    pub fn new(cfg: GuardSection) -> Guard {
        Guard {
            cfg,
            mean: None,
            dev: 0.0,
            healthy_steps: 0,
            nonfinite_run: 0,
            spike_run: 0,
            rollbacks: VecDeque::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// True when no spike or non-finite run is in progress: a good moment to snapshot.
    pub fn is_calm(&self) -> bool {
        self.nonfinite_run == 0 && self.spike_run == 0
    }

    /// Judges step `step` from its (mean) loss and pre-clip gradient norm.
    pub fn observe(&mut self, step: u64, loss: f64, grad_norm: f64) -> Verdict {
        if !self.cfg.enabled {
            return Verdict::Apply;
        }
        if !(loss.is_finite() && grad_norm.is_finite()) {
            self.nonfinite_run += 1;
            let what = format!("non-finite loss {loss} / gradient norm {grad_norm}");
            if self.nonfinite_run >= self.cfg.max_nonfinite_in_a_row {
                return self.rollback(
                    step,
                    format!("{what}, {} steps in a row", self.nonfinite_run),
                );
            }
            return Verdict::Skip { reason: what };
        }
        self.nonfinite_run = 0;
        if let Some(mean) = self.mean
            && self.healthy_steps >= self.cfg.warmup_steps
        {
            // A floor on the deviation keeps a very smooth loss from flagging noise.
            let dev = self.dev.max(1e-3 * mean.abs()).max(1e-6);
            let score = (loss - mean) / dev;
            let floor = self
                .cfg
                .spike_min_increase
                .max(self.cfg.spike_min_ratio * mean.abs());
            if score > self.cfg.spike_threshold && loss - mean > floor {
                self.spike_run += 1;
                let what = format!(
                    "loss {loss:.4} is {score:.1} deviations above its running mean {mean:.4}"
                );
                if self.spike_run >= self.cfg.spike_steps {
                    return self
                        .rollback(step, format!("{what}, {} steps in a row", self.spike_run));
                }
                return Verdict::Skip { reason: what };
            }
        }
        self.spike_run = 0;
        self.healthy_steps += 1;
        match self.mean {
            None => self.mean = Some(loss),
            Some(m) => {
                let a = self.cfg.ema_alpha;
                self.dev = (1.0 - a) * self.dev + a * (loss - m).abs();
                self.mean = Some((1.0 - a) * m + a * loss);
            }
        }
        Verdict::Apply
    }

    /// After a rollback to a state kept with a copy of the guard: judge the losses that
    /// follow against what that state's losses looked like, keeping the rollback history.
    pub fn restore_statistics(&mut self, saved: &Guard) {
        self.mean = saved.mean;
        self.dev = saved.dev;
        self.healthy_steps = saved.healthy_steps;
        self.nonfinite_run = 0;
        self.spike_run = 0;
    }

    fn rollback(&mut self, step: u64, reason: String) -> Verdict {
        self.nonfinite_run = 0;
        self.spike_run = 0;
        while self
            .rollbacks
            .front()
            .is_some_and(|&s| s + self.cfg.rollback_window <= step)
        {
            self.rollbacks.pop_front();
        }
        self.rollbacks.push_back(step);
        if self.rollbacks.len() as u32 > self.cfg.max_rollbacks {
            return Verdict::Stop {
                reason: format!(
                    "{reason}; that is {} rollbacks within {} steps (limit {}): stopping instead of looping",
                    self.rollbacks.len(),
                    self.cfg.rollback_window,
                    self.cfg.max_rollbacks
                ),
            };
        }
        Verdict::Rollback { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(GuardSection {
            warmup_steps: 20,
            ..Default::default()
        })
    }

    /// A noisy, slowly falling loss.
    fn loss_at(step: u64) -> f64 {
        2.0 - step as f64 * 1e-3 + 0.02 * ((step * 7919 % 13) as f64 / 13.0 - 0.5)
    }

    #[test]
    fn a_healthy_run_is_never_interrupted() {
        let mut g = guard();
        for step in 0..2000 {
            assert_eq!(
                g.observe(step, loss_at(step), 0.5),
                Verdict::Apply,
                "step {step}"
            );
        }
    }

    #[test]
    fn a_non_finite_step_is_skipped_and_a_run_of_them_rolls_back() {
        let mut g = guard();
        for step in 0..50 {
            g.observe(step, loss_at(step), 0.5);
        }
        assert!(matches!(g.observe(50, f64::NAN, 0.5), Verdict::Skip { .. }));
        assert_eq!(
            g.observe(51, loss_at(51), 0.5),
            Verdict::Apply,
            "one bad step is forgotten"
        );
        assert!(matches!(
            g.observe(52, 1.0, f64::INFINITY),
            Verdict::Skip { .. }
        ));
        assert!(matches!(
            g.observe(53, f64::NAN, f64::NAN),
            Verdict::Skip { .. }
        ));
        assert!(
            matches!(g.observe(54, f64::NAN, 1.0), Verdict::Rollback { reason } if reason.contains("3 steps in a row"))
        );
    }

    #[test]
    fn a_sustained_spike_rolls_back_a_blip_does_not() {
        let mut g = guard();
        for step in 0..100 {
            g.observe(step, loss_at(step), 0.5);
        }
        assert!(matches!(g.observe(100, 6.0, 0.5), Verdict::Skip { .. }));
        assert_eq!(g.observe(101, loss_at(101), 0.5), Verdict::Apply);
        assert!(matches!(g.observe(102, 6.0, 0.5), Verdict::Skip { .. }));
        assert!(matches!(g.observe(103, 5.0, 0.5), Verdict::Skip { .. }));
        assert!(matches!(g.observe(104, 7.0, 0.5), Verdict::Rollback { .. }));
        // Spikes do not drag the running mean up: after the rollback, normal losses pass.
        assert_eq!(g.observe(105, loss_at(105), 0.5), Verdict::Apply);
    }

    #[test]
    fn a_converged_run_with_relatively_noisy_tiny_losses_is_not_a_spike() {
        let mut g = guard();
        for step in 0..500 {
            // Loss 0.001 with occasional 50x jumps to 0.05: harmless.
            let loss = if step % 7 == 0 { 0.05 } else { 0.001 };
            assert_eq!(g.observe(step, loss, 0.01), Verdict::Apply, "step {step}");
        }
    }

    #[test]
    fn the_onset_of_a_learning_transition_is_not_a_spike_a_divergence_is() {
        let mut g = guard();
        // A plateau at ln 4 with little batch-to-batch noise...
        for step in 0..400 {
            let loss = 1.39 + 0.01 * ((step * 7919 % 13) as f64 / 13.0 - 0.5);
            assert_eq!(g.observe(step, loss, 0.5), Verdict::Apply, "step {step}");
        }
        // ...then batches 9-38% above it as the model starts to commit (measured, batch 16).
        for (i, loss) in [1.51, 1.63, 1.89, 1.55, 1.91].into_iter().enumerate() {
            assert_eq!(
                g.observe(400 + i as u64, loss, 0.5),
                Verdict::Apply,
                "{loss}"
            );
        }
        // What the outer momentum of 0.9 did to every replica at that point.
        assert!(matches!(g.observe(405, 4.2, 0.5), Verdict::Skip { .. }));
    }

    #[test]
    fn restored_statistics_judge_the_restored_state_fairly() {
        let mut g = guard();
        for step in 0..100 {
            g.observe(step, 3.0 - step as f64 * 0.001, 0.5);
        }
        let saved = g.clone();
        for step in 100..400 {
            g.observe(step, 3.0 - step as f64 * 0.005, 0.5);
        }
        // Rolled back to step 100, the losses are back near 2.9: not spikes.
        g.restore_statistics(&saved);
        assert_eq!(g.observe(400, 2.9, 0.5), Verdict::Apply);
    }

    #[test]
    fn no_spike_detection_during_warmup() {
        let mut g = guard();
        g.observe(0, 5.0, 1.0);
        for step in 1..20 {
            assert_eq!(g.observe(step, 5.0 + step as f64, 1.0), Verdict::Apply);
        }
    }

    #[test]
    fn too_many_rollbacks_in_a_window_stop_the_run() {
        // Every non-finite loss rolls back at once; rollbacks are counted over 100 steps.
        let rolling_back = |max_rollbacks| {
            Guard::new(GuardSection {
                max_nonfinite_in_a_row: 1,
                max_rollbacks,
                rollback_window: 100,
                ..Default::default()
            })
        };
        let mut g = rolling_back(2);
        assert!(matches!(
            g.observe(10, f64::NAN, 1.0),
            Verdict::Rollback { .. }
        ));
        assert!(matches!(
            g.observe(20, f64::NAN, 1.0),
            Verdict::Rollback { .. }
        ));
        assert!(
            matches!(g.observe(30, f64::NAN, 1.0), Verdict::Stop { reason } if reason.contains("3 rollbacks within 100 steps"))
        );
        // Old rollbacks age out of the window.
        let mut g = rolling_back(1);
        assert!(matches!(
            g.observe(10, f64::NAN, 1.0),
            Verdict::Rollback { .. }
        ));
        assert!(matches!(
            g.observe(200, f64::NAN, 1.0),
            Verdict::Rollback { .. }
        ));
    }

    #[test]
    fn disabled_guards_apply_everything() {
        let mut g = Guard::new(GuardSection {
            enabled: false,
            ..Default::default()
        });
        assert_eq!(g.observe(0, f64::NAN, f64::NAN), Verdict::Apply);
    }
}
