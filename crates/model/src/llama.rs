//! The forward pass of a Llama-family decoder, as plain tensor ops over [`Weights`].

use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::ModelConfig;
use crate::weights::slot;

/// Rotary factors for positions `start..start + seq`, each `[1, 1, seq, head_dim]` and
/// multiplied by `scale`: `cos`, and `sin` with its first half negated. Hugging Face's
/// half-split convention repeats each frequency in both halves and rotates with
/// `rotate_half([a, b]) = [-b, a]`; the negated half turns that rotation into a plain swap of
/// the halves (see [`apply_rope`]).
fn rotary_factors(
    cfg: &ModelConfig,
    start: usize,
    seq: usize,
    scale: f32,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64))
        .collect();
    let mut cos = Vec::with_capacity(seq * hd);
    let mut signed_sin = Vec::with_capacity(seq * hd);
    for pos in start..start + seq {
        for j in 0..hd {
            // Computed in f64 then rounded, as transformers does in float32 for inv_freq·pos.
            let angle = (pos as f64 * inv_freq[j % half]) as f32;
            let sign = if j < half { -1.0 } else { 1.0 };
            cos.push(angle.cos() * scale);
            signed_sin.push(sign * angle.sin() * scale);
        }
    }
    let factor = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [1, 1, seq, hd]), device);
    (factor(cos), factor(signed_sin))
}

/// `x·cos + rotate_half(x)·sin` for `x: [b, heads, t, hd]`, as `x·cos + swap_halves(x)·signed_sin`
/// with the factors of [`rotary_factors`].
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, signed_sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let first = x.clone().narrow(3, 0, hd / 2);
    let second = x.clone().narrow(3, hd / 2, hd / 2);
    let swapped = Tensor::cat(vec![second, first], 3);
    x * cos.clone() + swapped * signed_sin.clone()
}

/// RMSNorm over the last dimension with gain `w` stored as `[1, n]`.
fn rms_norm(x: Tensor<3>, w: &Tensor<2>, eps: f64) -> Tensor<3> {
    let inv_rms = (x.clone().square().mean_dim(2) + eps).sqrt().recip();
    x * inv_rms * w.clone().unsqueeze_dim::<3>(0)
}

/// `x · W` for `x: [b, t, in]` and stored `W: [in, out]`.
fn linear(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    let [b, t, inp] = x.dims();
    let out = w.dims()[1];
    x.reshape([b * t, inp])
        .matmul(w.clone())
        .reshape([b, t, out])
}

/// Keys and values of the positions already processed, per layer, each `[batch, kv_heads,
/// len, head_dim]` (before grouped-query expansion), so decoding a token costs one position.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor<4>, Tensor<4>)>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Which positions [`forward_cached`] returns logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    All,
    /// Only the last position: what sampling needs, and it skips the vocabulary projection
    /// for the rest of a prompt.
    Last,
}

/// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`, with parameters `w` in the order
/// of [`param_specs`](crate::param_specs) (plain tensors, or autodiff leaves when training).
pub fn forward(cfg: &ModelConfig, w: &[Tensor<2>], tokens: Tensor<2, Int>) -> Tensor<3> {
    decoder(cfg, w, tokens, None, Logits::All)
}

/// Like [`forward`] for tokens that follow the `cache.len()` positions already in `cache`,
/// which it extends. Logits are `[batch, seq, vocab]`, or `[batch, 1, vocab]` for
/// [`Logits::Last`].
pub fn forward_cached(
    cfg: &ModelConfig,
    w: &[Tensor<2>],
    tokens: Tensor<2, Int>,
    cache: &mut KvCache,
    logits: Logits,
) -> Tensor<3> {
    decoder(cfg, w, tokens, Some(cache), logits)
}

fn decoder(
    cfg: &ModelConfig,
    w: &[Tensor<2>],
    tokens: Tensor<2, Int>,
    mut cache: Option<&mut KvCache>,
    logits_for: Logits,
) -> Tensor<3> {
    let device = tokens.device();
    let [b, t] = tokens.dims();
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let eps = cfg.rms_norm_eps;
    let start = cache.as_ref().map_or(0, |c| c.len);
    let total = start + t;

    // The attention scale 1/√hd is folded into the queries' rotary factors: no pass over the
    // scores for it.
    let (q_cos, q_sin) = rotary_factors(cfg, start, t, 1.0 / (hd as f32).sqrt(), &device);
    let (k_cos, k_sin) = rotary_factors(cfg, start, t, 1.0, &device);
    let rep = nh / nkv;
    // True where attention is forbidden: key position after query position. A single new
    // token may attend to everything before it.
    // tril_mask's offset shifts the diagonal: key j is masked for query i when j > start + i.
    let causal: Option<Tensor<5, Bool>> = (t > 1).then(|| {
        Tensor::<2, Bool>::tril_mask([t, total], start as i64, &device)
            .unsqueeze_dims::<5>(&[0, 1, 2])
    });

    let mut x = embedding(w[0].clone(), tokens);
    for layer in 0..cfg.num_hidden_layers {
        let p = |s: usize| &w[1 + layer * slot::PER_LAYER + s];

        let h = rms_norm(x.clone(), p(slot::INPUT_NORM), eps);
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = apply_rope(heads(linear(h.clone(), p(slot::Q)), nh), &q_cos, &q_sin);
        let mut k = apply_rope(heads(linear(h.clone(), p(slot::K)), nkv), &k_cos, &k_sin);
        let mut v = heads(linear(h, p(slot::V)), nkv);
        if let Some(cache) = cache.as_deref_mut() {
            if let Some((past_k, past_v)) = cache.layers.get(layer) {
                k = Tensor::cat(vec![past_k.clone(), k], 2);
                v = Tensor::cat(vec![past_v.clone(), v], 2);
            }
            if layer < cache.layers.len() {
                cache.layers[layer] = (k.clone(), v.clone());
            } else {
                cache.layers.push((k.clone(), v.clone()));
            }
        }
        // Grouped-query attention without copying keys and values per query head: the `rep`
        // query heads that share key/value head g (heads g·rep .. g·rep + rep, as in Hugging
        // Face's repeat_kv) are stacked along the position axis, so the scores
        // [b, nkv, rep·t, total] come from one matrix multiply per key/value head.
        let scores = q
            .reshape([b, nkv, rep * t, hd])
            .matmul(k.swap_dims(2, 3))
            .reshape([b, nkv, rep, t, total]);
        let scores = match &causal {
            Some(mask) => scores.mask_fill(mask.clone(), f32::NEG_INFINITY),
            None => scores,
        };
        let probs = softmax(scores, 4).reshape([b, nkv, rep * t, total]);
        let attn = probs.matmul(v).reshape([b, nh, t, hd]);
        let attn = attn.swap_dims(1, 2).reshape([b, t, nh * hd]);
        x = x + linear(attn, p(slot::O));

        let h = rms_norm(x.clone(), p(slot::POST_NORM), eps);
        let gated = silu(linear(h.clone(), p(slot::GATE))) * linear(h, p(slot::UP));
        x = x + linear(gated, p(slot::DOWN));
    }
    if let Some(cache) = cache {
        cache.len = total;
    }
    let (x, rows) = match logits_for {
        Logits::All => (x, t),
        Logits::Last => (x.narrow(1, t - 1, 1), 1),
    };
    let final_norm = &w[1 + cfg.num_hidden_layers * slot::PER_LAYER];
    let x = rms_norm(x, final_norm, eps);
    let [_, _, hidden] = x.dims();
    let x2 = x.reshape([b * rows, hidden]);
    let logits = if cfg.tie_word_embeddings {
        x2.matmul(w[0].clone().transpose())
    } else {
        x2.matmul(w[w.len() - 1].clone())
    };
    logits.reshape([b, rows, cfg.vocab_size])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Weights;

    fn max_abs_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn cached_decoding_matches_the_full_forward() {
        let device = Device::flex();
        let cfg = ModelConfig::preset("tiny").unwrap();
        let weights = Weights::init(&cfg, 3, &device);
        let ids: Vec<i64> = vec![5, 17, 200, 3, 99, 42, 7];
        let full = forward(
            &cfg,
            &weights.tensors,
            Tensor::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device),
        );
        // A 4-token prompt, then one token at a time.
        let mut cache = KvCache::new();
        let mut pieces = vec![forward_cached(
            &cfg,
            &weights.tensors,
            Tensor::from_data(TensorData::new(ids[..4].to_vec(), [1, 4]), &device),
            &mut cache,
            Logits::All,
        )];
        for &id in &ids[4..] {
            pieces.push(forward_cached(
                &cfg,
                &weights.tensors,
                Tensor::from_data(TensorData::new(vec![id], [1, 1]), &device),
                &mut cache,
                Logits::All,
            ));
        }
        assert_eq!(cache.len(), ids.len());
        let stepped = Tensor::cat(pieces, 1);
        let diff = max_abs_diff(full.clone(), stepped);
        assert!(
            diff < 1e-5,
            "cached decode differs from the full forward by {diff}"
        );

        let mut cache = KvCache::new();
        let last = forward_cached(
            &cfg,
            &weights.tensors,
            Tensor::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device),
            &mut cache,
            Logits::Last,
        );
        assert_eq!(last.dims(), [1, 1, cfg.vocab_size]);
        let diff = max_abs_diff(full.narrow(1, ids.len() - 1, 1), last);
        assert!(diff < 1e-5, "last-position logits differ by {diff}");
    }
}
