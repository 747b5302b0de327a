//! Text generation from a holdfast model: sampling and a token-streaming decode loop.
//!
//! The decode recomputes the window each token (no KV cache yet); serving real models adds the
//! cache and the HTTP server on top of this.

use burn::tensor::{Device, Int, Tensor, TensorData};
use holdfast_model::Weights;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Stop after generating this token id (for example a newline or end-of-text).
    pub stop_token: Option<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.8,
            top_k: 0,
            max_new_tokens: 200,
            seed: 0,
            stop_token: None,
        }
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], opts: &SamplingOptions, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let max = logits[order[0]];
    let probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / opts.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&order) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    order[0] as u32
}

/// Generates up to `opts.max_new_tokens` after `prompt`, calling `on_token` for each as it is
/// produced; returns the generated ids.
pub fn generate(
    weights: &Weights,
    prompt: &[u32],
    opts: &SamplingOptions,
    device: &Device,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let ctx = weights.cfg.max_position_embeddings;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..opts.max_new_tokens {
        let window = &seq[seq.len().saturating_sub(ctx)..];
        let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
        let tokens: Tensor<2, Int> =
            Tensor::from_data(TensorData::new(ids, [1, window.len()]), device);
        let logits = weights.forward(tokens);
        let [_, t, v] = logits.dims();
        let last = logits
            .narrow(1, t - 1, 1)
            .reshape([v])
            .into_data()
            .convert::<f32>();
        let next = sample(last.as_slice::<f32>().expect("f32 logits"), opts, &mut rng);
        seq.push(next);
        out.push(next);
        on_token(next);
        if opts.stop_token == Some(next) {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_top_k_one_is_greedy() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let greedy = SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top1 = SamplingOptions {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two equally likely tokens and one negligible: both should appear, the third never.
        let logits = [3.0, 3.0, -30.0];
        let opts = SamplingOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = [0; 3];
        for _ in 0..2000 {
            counts[sample(&logits, &opts, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0] > 800 && counts[1] > 800, "{counts:?}");
    }
}
