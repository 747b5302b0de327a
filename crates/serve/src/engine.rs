//! Where a served model's forward runs: f32 tensors on a burn device (the training decoder,
//! any backend), or a GGUF file mapped and decoded in its block formats on the host's cores.

use burn::tensor::Device;
use holdfast_model::host::{MappedModel, Sequence, Step};
use holdfast_model::{KvCache, Logits, ModelConfig, Weights, forward, forward_cached, token_batch};

use crate::ServeError;

pub enum Engine {
    /// f32 weights on `device`: trained runs, Hugging Face directories, and GGUF files
    /// dequantized (`--dequantize`, or a device other than the host CPU).
    Tensors { weights: Weights, device: Device },
    /// A mapped GGUF: 8-bit activations against the file's blocks, as llama.cpp computes.
    Mapped(MappedModel),
}

/// One sequence's cached keys and values, for its engine.
pub enum Cache {
    Tensors(KvCache),
    Mapped(Sequence),
}

impl Engine {
    pub fn config(&self) -> &ModelConfig {
        match self {
            Engine::Tensors { weights, .. } => &weights.cfg,
            Engine::Mapped(m) => &m.config,
        }
    }

    /// What the model runs on, for reports: `mapped GGUF blocks (Q4_1×210 Q8_0×1)`, then
    /// how many are repacked in tiles, or `f32 tensors`.
    pub fn describe(&self) -> String {
        match self {
            Engine::Tensors { .. } => "f32 tensors".into(),
            Engine::Mapped(m) => match m.packed_matrices() {
                0 => format!("mapped GGUF blocks ({})", m.formats()),
                n => format!(
                    "mapped GGUF blocks ({}), {n} repacked in tiles",
                    m.formats()
                ),
            },
        }
    }

    pub fn new_cache(&self) -> Cache {
        match self {
            Engine::Tensors { .. } => Cache::Tensors(KvCache::new()),
            Engine::Mapped(_) => Cache::Mapped(Sequence::new()),
        }
    }

    /// The logits after `tokens`, which extend `cache`.
    pub fn next_logits(&self, cache: &mut Cache, tokens: &[u32]) -> Result<Vec<f32>, ServeError> {
        let mut out = self.next_logits_batch(&mut [(cache, tokens)])?;
        Ok(out.remove(0))
    }

    /// [`next_logits`](Self::next_logits) for several sequences: one forward for all of
    /// them on a mapped model, one after another on tensors.
    pub fn next_logits_batch(
        &self,
        steps: &mut [(&mut Cache, &[u32])],
    ) -> Result<Vec<Vec<f32>>, ServeError> {
        match self {
            Engine::Tensors { weights, device } => steps
                .iter_mut()
                .map(|(cache, tokens)| {
                    let Cache::Tensors(cache) = &mut **cache else {
                        return Err(mismatch());
                    };
                    let batch = token_batch(tokens, device);
                    let logits =
                        forward_cached(&weights.cfg, &weights.tensors, batch, cache, Logits::Last);
                    Ok(host_values(logits.into_data()))
                })
                .collect(),
            Engine::Mapped(model) => {
                let mut batch = Vec::with_capacity(steps.len());
                for (cache, tokens) in steps.iter_mut() {
                    let Cache::Mapped(sequence) = &mut **cache else {
                        return Err(mismatch());
                    };
                    batch.push(Step { sequence, tokens });
                }
                Ok(model.forward(&mut batch)?)
            }
        }
    }

    /// Logits at every position of `ids` (`ids.len() × vocab`), from an empty cache.
    pub fn all_logits(&self, ids: &[u32]) -> Result<Vec<f32>, ServeError> {
        match self {
            Engine::Tensors { weights, device } => {
                let batch = token_batch(ids, device);
                Ok(host_values(
                    forward(&weights.cfg, &weights.tensors, batch).into_data(),
                ))
            }
            Engine::Mapped(_) => {
                let mut cache = self.new_cache();
                let mut out = Vec::new();
                for &id in ids {
                    out.extend(self.next_logits(&mut cache, &[id])?);
                }
                Ok(out)
            }
        }
    }
}

fn host_values(data: burn::tensor::TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 logits")
}

fn mismatch() -> ServeError {
    ServeError::Load("a cache made for another engine".into())
}
