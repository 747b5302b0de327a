//! The whole training state as one value.

use burn::tensor::Device;
use holdfast_model::{HostTensor, ModelConfig, Weights};

use crate::data::DataCursor;
use crate::optim::AdamW;

/// Everything a run needs to continue exactly where it was: weights, optimizer moments, the
/// step, the data cursor and the seed (the sampler is counter-based, so `seed` plus `cursor`
/// is the whole RNG state).
#[derive(Clone, Debug)]
pub struct TrainState {
    pub weights: Weights,
    pub opt: AdamW,
    /// Optimizer steps completed.
    pub step: u64,
    pub cursor: DataCursor,
    pub seed: u64,
}

impl TrainState {
    /// A fresh run: seeded initial weights, zero moments, step 0.
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> Self {
        Self::from_weights(Weights::init(cfg, seed, device), seed)
    }

    /// A fresh optimizer over given weights (fine-tuning from a loaded model).
    pub fn from_weights(weights: Weights, seed: u64) -> Self {
        let opt = AdamW::new(&weights.tensors);
        TrainState {
            weights,
            opt,
            step: 0,
            cursor: DataCursor::default(),
            seed,
        }
    }

    /// Optimizer moments on the host, HF names suffixed `.exp_avg` / `.exp_avg_sq`, HF layout.
    pub fn optimizer_host(&self) -> Vec<HostTensor> {
        let w = &self.weights;
        let mut out = Vec::with_capacity(2 * w.specs.len());
        for (i, spec) in w.specs.iter().enumerate() {
            for (suffix, t) in [
                ("exp_avg", &self.opt.exp_avg[i]),
                ("exp_avg_sq", &self.opt.exp_avg_sq[i]),
            ] {
                let mut h = holdfast_model::weights::to_host(spec, t);
                h.name = format!("{}.{suffix}", spec.name);
                out.push(h);
            }
        }
        out
    }
}
