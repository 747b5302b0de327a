//! The forward pass of a Llama-family decoder, as plain tensor ops over [`Weights`].

use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::ModelConfig;
use crate::weights::slot;

/// Rotary tables for positions `0..seq`: `cos` and `sin` of shape `[seq, head_dim]`, each
/// frequency repeated for both halves (Hugging Face's half-split convention).
pub fn rope_tables(cfg: &ModelConfig, seq: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(seq * hd);
    let mut sin = Vec::with_capacity(seq * hd);
    for pos in 0..seq {
        for j in 0..hd {
            let i = j % half;
            // Computed in f64 then rounded, as transformers does in float32 for inv_freq·pos.
            let inv_freq = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64);
            let angle = (pos as f64 * inv_freq) as f32;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [seq, hd]), device),
        Tensor::from_data(TensorData::new(sin, [seq, hd]), device),
    )
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half([a, b]) = [-b, a]`; `x` is `[b, heads, t, hd]`.
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let first = x.clone().narrow(3, 0, hd / 2);
    let second = x.clone().narrow(3, hd / 2, hd / 2);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos.clone() + rotated * sin.clone()
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

/// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`, with parameters `w` in the order
/// of [`param_specs`](crate::param_specs) (plain tensors, or autodiff leaves when training).
pub fn forward(cfg: &ModelConfig, w: &[Tensor<2>], tokens: Tensor<2, Int>) -> Tensor<3> {
    let device = tokens.device();
    let [b, t] = tokens.dims();
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let eps = cfg.rms_norm_eps;

    let (cos, sin) = rope_tables(cfg, t, &device);
    let cos = cos.unsqueeze_dims::<4>(&[0, 1]);
    let sin = sin.unsqueeze_dims::<4>(&[0, 1]);
    // True where attention is forbidden: key position after query position.
    let causal: Tensor<4, Bool> =
        Tensor::<2, Bool>::tril_mask([t, t], 0, &device).unsqueeze_dims::<4>(&[0, 1]);
    let scale = 1.0 / (hd as f64).sqrt();

    let mut x = embedding(w[0].clone(), tokens);
    for layer in 0..cfg.num_hidden_layers {
        let p = |s: usize| &w[1 + layer * slot::PER_LAYER + s];

        let h = rms_norm(x.clone(), p(slot::INPUT_NORM), eps);
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = apply_rope(heads(linear(h.clone(), p(slot::Q)), nh), &cos, &sin);
        let k = apply_rope(heads(linear(h.clone(), p(slot::K)), nkv), &cos, &sin);
        let v = heads(linear(h, p(slot::V)), nkv);
        // Grouped-query attention: query head i reads key/value head i / (nh / nkv).
        let (k, v) = if nh == nkv {
            (k, v)
        } else {
            let rep = nh / nkv;
            let expand = |y: Tensor<4>| {
                y.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, rep)
                    .reshape([b, nh, t, hd])
            };
            (expand(k), expand(v))
        };
        let scores = q.matmul(k.swap_dims(2, 3)) * scale;
        let scores = scores.mask_fill(causal.clone(), f32::NEG_INFINITY);
        let attn = softmax(scores, 3).matmul(v);
        let attn = attn.swap_dims(1, 2).reshape([b, t, nh * hd]);
        x = x + linear(attn, p(slot::O));

        let h = rms_norm(x.clone(), p(slot::POST_NORM), eps);
        let gated = silu(linear(h.clone(), p(slot::GATE))) * linear(h, p(slot::UP));
        x = x + linear(gated, p(slot::DOWN));
    }
    let final_norm = &w[1 + cfg.num_hidden_layers * slot::PER_LAYER];
    let x = rms_norm(x, final_norm, eps);
    let [_, _, hidden] = x.dims();
    let x2 = x.reshape([b * t, hidden]);
    let logits = if cfg.tie_word_embeddings {
        x2.matmul(w[0].clone().transpose())
    } else {
        x2.matmul(w[w.len() - 1].clone())
    };
    logits.reshape([b, t, cfg.vocab_size])
}
