//! The forward pass of a Llama-family decoder, as plain tensor ops over [`Weights`].

use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::weights::slot;
use crate::{ModelConfig, fused};

/// Rotary factors for positions `start..start + seq`, each `[seq, head_dim]` and
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
) -> (Tensor<2>, Tensor<2>) {
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
    let factor = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [seq, hd]), device);
    (factor(cos), factor(signed_sin))
}

/// `x·cos + rotate_half(x)·sin` for `x: [b, heads, t, hd]`, as `x·cos + swap_halves(x)·signed_sin`
/// with the factors of [`rotary_factors`].
fn apply_rope(x: Tensor<4>, cos: &Tensor<2>, signed_sin: &Tensor<2>) -> Tensor<4> {
    let [t, hd] = cos.dims();
    let cos = cos.clone().reshape([1, 1, t, hd]);
    let signed_sin = signed_sin.clone().reshape([1, 1, t, hd]);
    let first = x.clone().narrow(3, 0, hd / 2);
    let second = x.clone().narrow(3, hd / 2, hd / 2);
    let swapped = Tensor::cat(vec![second, first], 3);
    x * cos + swapped * signed_sin
}

/// RMSNorm over the last dimension with gain `w` stored as `[1, n]`.
fn rms_norm(x: Tensor<3>, w: &Tensor<2>, eps: f64, fused: bool) -> Tensor<3> {
    if fused {
        return fused::rms_norm(x, w, eps);
    }
    let inv_rms = (x.clone().square().mean_dim(2) + eps).sqrt().recip();
    x * inv_rms * w.clone().unsqueeze_dim::<3>(0)
}

/// `silu(gate) · up`.
fn swiglu(gate: Tensor<3>, up: Tensor<3>, fused: bool) -> Tensor<3> {
    if fused {
        fused::swiglu(gate, up)
    } else {
        silu(gate) * up
    }
}

/// Causal attention from plain tensor ops, for queries `[b, heads, t, hd]` and keys and
/// values `[b, kv_heads, total, hd]`; `causal` masks future keys (`None` for one new token).
/// Returns `[b, t, heads·hd]`.
///
/// Grouped-query attention without copying keys and values per query head: the `rep` query
/// heads that share key/value head g (heads g·rep .. g·rep + rep, as in Hugging Face's
/// repeat_kv) are stacked along the position axis, so the scores [b, nkv, rep·t, total] come
/// from one matrix multiply per key/value head.
fn plain_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    causal: Option<&Tensor<5, Bool>>,
) -> Tensor<3> {
    let [b, nh, t, hd] = q.dims();
    let [_, nkv, total, _] = k.dims();
    let rep = nh / nkv;
    let scores = q
        .reshape([b, nkv, rep * t, hd])
        .matmul(k.swap_dims(2, 3))
        .reshape([b, nkv, rep, t, total]);
    let scores = match causal {
        Some(mask) => scores.mask_fill(mask.clone(), f32::NEG_INFINITY),
        None => scores,
    };
    let probs = softmax(scores, 4).reshape([b, nkv, rep * t, total]);
    let attn = probs.matmul(v).reshape([b, nh, t, hd]);
    attn.swap_dims(1, 2).reshape([b, t, nh * hd])
}

/// `x · W` for `x: [b, t, in]` and stored `W: [in, out]`.
fn linear(x: Tensor<3>, w: &Tensor<2>, fused: bool) -> Tensor<3> {
    let [b, t, inp] = x.dims();
    let out = w.dims()[1];
    matmul(x.reshape([b * t, inp]), w.clone(), fused).reshape([b, t, out])
}

fn matmul(x: Tensor<2>, w: Tensor<2>, fused: bool) -> Tensor<2> {
    if fused {
        fused::matmul(x, w)
    } else {
        x.matmul(w)
    }
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
    let q_rot = rotary_factors(cfg, start, t, 1.0 / (hd as f32).sqrt(), &device);
    let k_rot = rotary_factors(cfg, start, t, 1.0, &device);
    // CPU kernels that fuse the element-wise work where the backend has them (see `fused`).
    let fused = fused::available(&device, w[0].dtype());
    // True where attention is forbidden: key position after query position. A single new
    // token may attend to everything before it. (The fused softmax masks by position.)
    // tril_mask's offset shifts the diagonal: key j is masked for query i when j > start + i.
    let causal: Option<Tensor<5, Bool>> = (t > 1 && !fused).then(|| {
        Tensor::<2, Bool>::tril_mask([t, total], start as i64, &device)
            .unsqueeze_dims::<5>(&[0, 1, 2])
    });
    // [b, t, n·hd] → [b, n, t, hd], rotated.
    let rotated_heads = |y: Tensor<3>, n: usize, (cos, sin): &(Tensor<2>, Tensor<2>)| {
        let y = y.reshape([b, t, n, hd]);
        if fused {
            fused::rope_heads(y, cos, sin)
        } else {
            apply_rope(y.swap_dims(1, 2), cos, sin)
        }
    };

    let mut x = embedding(w[0].clone(), tokens);
    for layer in 0..cfg.num_hidden_layers {
        let p = |s: usize| &w[1 + layer * slot::PER_LAYER + s];

        let h = rms_norm(x.clone(), p(slot::INPUT_NORM), eps, fused);
        let q = rotated_heads(linear(h.clone(), p(slot::Q), fused), nh, &q_rot);
        let mut k = rotated_heads(linear(h.clone(), p(slot::K), fused), nkv, &k_rot);
        let mut v = linear(h, p(slot::V), fused)
            .reshape([b, t, nkv, hd])
            .swap_dims(1, 2);
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
        let attn = if fused {
            fused::attention(q, k, v, start)
        } else {
            plain_attention(q, k, v, causal.as_ref())
        };
        x = x + linear(attn, p(slot::O), fused);

        let h = rms_norm(x.clone(), p(slot::POST_NORM), eps, fused);
        let gate = linear(h.clone(), p(slot::GATE), fused);
        let gated = swiglu(gate, linear(h, p(slot::UP), fused), fused);
        x = x + linear(gated, p(slot::DOWN), fused);
    }
    if let Some(cache) = cache {
        cache.len = total;
    }
    let (x, rows) = match logits_for {
        Logits::All => (x, t),
        Logits::Last => (x.narrow(1, t - 1, 1), 1),
    };
    let final_norm = &w[1 + cfg.num_hidden_layers * slot::PER_LAYER];
    let x = rms_norm(x, final_norm, eps, fused);
    let [_, _, hidden] = x.dims();
    let x2 = x.reshape([b * rows, hidden]);
    let logits = if cfg.tie_word_embeddings {
        matmul(x2, w[0].clone().transpose(), fused)
    } else {
        matmul(x2, w[w.len() - 1].clone(), fused)
    };
    logits.reshape([b, rows, cfg.vocab_size])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Weights;
    use burn::tensor::DType;

    fn max_abs_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Logits and the gradient of every parameter for Σ logits·probe, with autodiff on `device`.
    fn logits_and_grads(cfg: &ModelConfig, device: &Device) -> (Vec<f32>, Vec<Vec<f32>>) {
        let device = device.clone().autodiff();
        let leaves: Vec<Tensor<2>> = Weights::init(cfg, 3, &device)
            .tensors
            .into_iter()
            .map(|t| t.require_grad())
            .collect();
        // More positions than one query block of the fused attention, and not a multiple of it.
        let seq = 45;
        let ids: Vec<i64> = (0..2 * seq as i64).map(|i| (i * 37 + 5) % 256).collect();
        let tokens = Tensor::from_data(TensorData::new(ids, [2, seq]), &device);
        let logits = forward(cfg, &leaves, tokens);
        let n = logits.dims().iter().product::<usize>();
        let probe: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let probe = Tensor::<3>::from_data(TensorData::new(probe, logits.dims()), &device);
        let grads = (logits.clone() * probe).sum().backward();
        let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let grads = leaves
            .iter()
            .map(|leaf| values(leaf.grad(&grads).expect("every parameter gets a gradient")))
            .collect();
        (logits.inner().into_data().try_to_vec().unwrap(), grads)
    }

    #[test]
    #[allow(deprecated)] // ndarray: the plain-ops reference for the fused flex kernels
    fn fused_kernels_match_plain_ops_in_logits_and_every_gradient() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        assert!(fused::available(&Device::flex(), DType::F32));
        assert!(!fused::available(&Device::ndarray(), DType::F32));
        let (fused_logits, fused_grads) = logits_and_grads(&cfg, &Device::flex());
        let (plain_logits, plain_grads) = logits_and_grads(&cfg, &Device::ndarray());
        let worst = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            diff / scale.max(1e-6)
        };
        let logits_diff = worst(&fused_logits, &plain_logits);
        assert!(
            logits_diff < 1e-5,
            "logits differ by {logits_diff} (relative)"
        );
        let specs = crate::param_specs(&cfg);
        for ((spec, f), p) in specs.iter().zip(&fused_grads).zip(&plain_grads) {
            let diff = worst(f, p);
            assert!(
                diff < 1e-4,
                "{}: gradient differs by {diff} (relative)",
                spec.name
            );
        }
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
