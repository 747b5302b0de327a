//! How a worker's replica takes part in a round: what it contributes to the all-reduce and
//! how it applies the committed average. One strategy per file; the worker's loop
//! ([`crate::worker`]) does not know which one it runs.
//!
//! - [`diloco::Diloco`]: H local guarded AdamW steps, then the pseudo-gradient; the average
//!   takes one outer Nesterov step.
//! - [`ddp::Ddp`]: one step's gradients (zeros when the guard refuses them); the average is
//!   applied by AdamW on every replica.

pub mod ddp;
pub mod diloco;
pub mod feedback;
pub mod fragments;
pub mod outer;

use std::time::Instant;

use holdfast_model::weights::ParamSpec;

use crate::config::{RunConfig, SyncMode, TrainSection};
use crate::data::Dataset;
use crate::guarded::{GuardedStep, StepBatches};
use crate::replica::Replica;

/// One round's work, as the coordinator assigned it.
#[derive(Clone, Copy)]
pub struct RoundWork<'a> {
    pub round: u64,
    pub data: &'a Dataset,
    pub train: &'a TrainSection,
    /// The batch ids handed out when the round started.
    pub batches: &'a [u64],
    /// An on-demand round: asks the coordinator for the next step's batch ids once `batches`
    /// are trained; none when the round is closed to this worker.
    pub more: Option<&'a dyn Fn() -> Vec<u64>>,
    /// Weigh the contribution by the batches trained (rounds whose members train different
    /// amounts), not 1 each.
    pub by_batches: bool,
    /// The schedule step of the round's first optimizer step.
    pub first_step: u64,
    /// Below 1 after a rewind: the round's update is damped by it.
    pub step_scale: f64,
    /// Chaos: this worker runs this many times slower (1 = normal).
    pub slow_factor: f64,
}

impl RoundWork<'_> {
    /// The batch ids of the round's optimizer steps, in order: those handed out at its start,
    /// then, in an on-demand round, what the coordinator hands out as they are asked for.
    fn step_ids(&self) -> impl Iterator<Item = Vec<u64>> + '_ {
        let accum = self.train.grad_accum.max(1);
        let handed = self.batches.chunks(accum).map(<[u64]>::to_vec);
        let asked = std::iter::from_fn(|| self.more.map(|ask| ask()).filter(|ids| !ids.is_empty()));
        handed.chain(asked)
    }

    /// The weight of a contribution that `counts` (see [`weighted`]) after `batches` trained.
    fn weight(&self, counts: bool, batches: u64) -> f32 {
        match (counts, self.by_batches) {
            (false, _) => 0.0,
            (true, false) => 1.0,
            (true, true) => batches as f32,
        }
    }

    /// The batches of optimizer step `index` of the round, whose micro-batches start at `firsts`.
    fn step<'b>(&'b self, index: usize, firsts: &'b [u64]) -> StepBatches<'b> {
        let step = self.first_step + index as u64;
        StepBatches {
            data: self.data,
            seed: self.train.seed,
            firsts,
            rows: self.train.batch_size,
            step,
            fault_key: step,
        }
    }

    /// First samples of batch ids `ids`.
    fn firsts(&self, ids: &[u64]) -> Vec<u64> {
        ids.iter()
            .map(|b| b * self.train.batch_size as u64)
            .collect()
    }

    /// Chaos: stretch a step begun at `started` to `slow_factor` times as long.
    fn pace(&self, started: Instant) {
        if self.slow_factor > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(self.slow_factor - 1.0));
        }
    }
}

/// What a replica sends to the all-reduce, and what it did to get it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contribution {
    /// The values, then their weight (see [`weighted`]).
    pub payload: Vec<f32>,
    /// Mean of the finite losses the round's steps measured, applied or not (0 if none).
    pub loss: f64,
    pub tokens: u64,
    /// Batch ids trained.
    pub batches: u64,
    pub skipped_steps: u64,
    pub rollbacks: u64,
    pub compute_s: f64,
}

/// A way for replicas to stay in sync.
pub trait SyncStrategy {
    /// Whether the replica carries outer momentum.
    fn has_velocity(&self) -> bool;

    /// How many fragments the parameters sync in, one per round (1: all of them every round).
    fn fragments(&self) -> usize {
        1
    }

    /// The fragment round `round` syncs.
    fn fragment_of(&self, _round: u64) -> usize {
        0
    }

    /// Whether a replica's local weights may differ from its outer ones after a round (so
    /// that its state must carry them).
    fn keeps_local_weights(&self) -> bool {
        false
    }

    /// Trains this replica's share of the round up to what it sends, and returns that.
    fn contribute(
        &self,
        replica: &mut Replica,
        work: &RoundWork,
        stepper: &mut GuardedStep,
    ) -> Contribution;

    /// Trains the rest of the round while what `contribute` returned (`contributed`) is being
    /// synced; returns what those steps did (no payload). Nothing by default.
    fn overlap(
        &self,
        _replica: &mut Replica,
        _work: &RoundWork,
        _stepper: &mut GuardedStep,
        _contributed: &Contribution,
    ) -> Contribution {
        Contribution::default()
    }

    /// Applies the round's committed `sum` of contributions (weights last) to the replica,
    /// identically on every replica: the mean of the contributions that counted, or no step
    /// when none did. Returns false when it made no change.
    fn apply(&self, replica: &mut Replica, sum: Vec<f32>, work: &RoundWork) -> bool;
}

/// An empty payload with room for `n` values and the weight that follows them: appending the
/// weight then never copies the values (a model's worth, every round).
pub fn payload_buffer(n: usize) -> Vec<f32> {
    Vec::with_capacity(n + 1)
}

/// Appends a contribution's weight: 1 when it counts (or, in rounds whose members train
/// different amounts, the batches it trained, its values scaled by them), 0 when it is a
/// refusal (zeros sent by a replica whose step the guard refused, or that rolled back).
/// Summed by the all-reduce like the values, the weights say what to average over — the same
/// on every replica — so a refusal neither shrinks the others' step nor becomes a step itself.
pub fn weighted(mut values: Vec<f32>, weight: f32) -> Vec<f32> {
    if weight != 0.0 && weight != 1.0 {
        values.iter_mut().for_each(|v| *v *= weight);
    }
    values.push(weight);
    values
}

/// The weighted mean of the contributions that counted in a committed `sum` (weights last),
/// or `None` when none did.
pub fn counted_mean(mut sum: Vec<f32>) -> Option<Vec<f32>> {
    // A sum of whole numbers of batches is an exact integer in f32 (below 2^24).
    let counted = sum.pop().expect("a weight ends every contribution") as usize;
    if counted == 0 {
        return None;
    }
    outer::average_in_place(&mut sum, counted);
    Some(sum)
}

/// The strategy `cfg` names, for a model of parameters `specs`.
pub fn strategy(cfg: &RunConfig, specs: &[ParamSpec]) -> Box<dyn SyncStrategy> {
    match cfg.sync.mode {
        SyncMode::Diloco => Box::new(diloco::Diloco::new(&cfg.sync, specs)),
        SyncMode::Ddp => Box::new(ddp::Ddp),
    }
}

/// Times a round's compute.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::Device;
    use holdfast_model::ModelConfig;

    use super::*;
    use crate::data::AdditionTask;

    pub fn model() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap()
    }

    pub fn data() -> Dataset {
        Dataset::Addition(AdditionTask::new(3))
    }

    pub fn train() -> TrainSection {
        TrainSection {
            batch_size: 4,
            ..Default::default()
        }
    }

    pub fn replica(velocity: bool) -> Replica {
        Replica::fresh(&model(), 5, &Device::flex(), velocity)
    }

    /// What the all-reduce commits: the element-wise sum of the contributions.
    pub fn summed(contributions: &[&Contribution]) -> Vec<f32> {
        let mut sum = vec![0.0f32; contributions[0].payload.len()];
        for c in contributions {
            sum.iter_mut().zip(&c.payload).for_each(|(s, x)| *s += x);
        }
        sum
    }

    pub fn work<'a>(
        data: &'a Dataset,
        train: &'a TrainSection,
        batches: &'a [u64],
    ) -> RoundWork<'a> {
        RoundWork {
            round: 0,
            data,
            train,
            batches,
            more: None,
            by_batches: false,
            first_step: 10,
            step_scale: 1.0,
            slow_factor: 1.0,
        }
    }
}
