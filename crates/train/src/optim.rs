//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's update order), global-norm
//! gradient clipping and the warm-up + cosine learning-rate schedule.
//!
//! The moments are plain tensors in the same order as the parameters, so the optimizer state
//! is as explicit (saveable, comparable, shippable to a peer) as the weights.

use burn::tensor::{Tensor, TensorData};
use holdfast_model::kernels::{self, AdamStep};
use rayon::prelude::*;

use crate::config::TrainSection;

#[derive(Clone, Debug)]
pub struct AdamW {
    pub exp_avg: Vec<Tensor<2>>,
    pub exp_avg_sq: Vec<Tensor<2>>,
    /// Number of updates applied (the bias-correction exponent).
    pub t: u64,
}

impl AdamW {
    pub fn new(params: &[Tensor<2>]) -> Self {
        let zeros = || params.iter().map(Tensor::zeros_like).collect();
        AdamW {
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            t: 0,
        }
    }

    /// Applies one update in place. `decay[i]` says whether parameter `i` takes weight decay.
    pub fn step(
        &mut self,
        params: &mut [Tensor<2>],
        grads: Vec<Tensor<2>>,
        decay: &[bool],
        lr: f64,
        h: &TrainSection,
    ) {
        self.t += 1;
        let bias1 = 1.0 - h.beta1.powi(self.t as i32);
        // The f64 hyper-parameters rounded to f32 once, as burn rounds a scalar operand.
        let step = |decays: bool| AdamStep {
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            bias2: (1.0 - h.beta2.powi(self.t as i32)) as f32,
            eps: h.eps as f32,
            step_size: (lr / bias1) as f32,
            decay_factor: if decays && h.weight_decay > 0.0 {
                (1.0 - lr * h.weight_decay) as f32
            } else {
                1.0
            },
        };
        let on_host = params
            .first()
            .is_some_and(|p| holdfast_model::fused_kernels_available(&p.device(), p.dtype()));
        for (i, g) in grads.into_iter().enumerate() {
            let (p, m, v) = (
                &mut params[i],
                &mut self.exp_avg[i],
                &mut self.exp_avg_sq[i],
            );
            if on_host {
                update_on_host(p, g, m, v, step(decay[i]));
            } else {
                update_with_tensor_ops(p, g, m, v, step(decay[i]));
            }
        }
    }
}

/// One parameter's update as tensor ops (any backend).
fn update_with_tensor_ops(
    p: &mut Tensor<2>,
    g: Tensor<2>,
    m: &mut Tensor<2>,
    v: &mut Tensor<2>,
    s: AdamStep,
) {
    let new_m = m.clone() * s.beta1 + g.clone() * s.one_minus_beta1;
    let new_v = v.clone() * s.beta2 + g.square() * s.one_minus_beta2;
    let denom = (new_v.clone() / s.bias2).sqrt() + s.eps;
    let mut new_p = p.clone();
    // Without decay the factor is 1: skipping the multiply gives the same values.
    if s.decay_factor != 1.0 {
        new_p = new_p * s.decay_factor;
    }
    *p = new_p - new_m.clone() / denom * s.step_size;
    *m = new_m;
    *v = new_v;
}

/// The same update in one pass over host memory, split across the compute pool: on CPU the
/// tensor ops above are a dozen single-threaded passes over the parameters. Each operation
/// is the tensor path's, in its order and in f32 ([`kernels::adamw`]), so the results are
/// bit-identical to it.
fn update_on_host(
    p: &mut Tensor<2>,
    g: Tensor<2>,
    m: &mut Tensor<2>,
    v: &mut Tensor<2>,
    s: AdamStep,
) {
    let device = p.device();
    // Taking the tensors out lets a buffer nothing else holds be updated without a copy.
    let take = |t: &mut Tensor<2>| std::mem::replace(t, Tensor::empty([0, 0], &device)).into_data();
    let (mut pd, mut md, mut vd) = (take(p), take(m), take(v));
    let gd = g.into_data();
    let f32s = "AdamW's host path takes f32 tensors (checked by fused_kernels_available)";
    {
        let (ps, ms, vs) = (
            pd.as_mut_slice::<f32>().expect(f32s),
            md.as_mut_slice::<f32>().expect(f32s),
            vd.as_mut_slice::<f32>().expect(f32s),
        );
        let gs = gd.as_slice::<f32>().expect(f32s);
        const CHUNK: usize = 1 << 15;
        ps.par_chunks_mut(CHUNK)
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK))
            .zip(gs.par_chunks(CHUNK))
            .for_each(|(((pc, mc), vc), gc)| kernels::adamw(pc, mc, vc, gc, s));
    }
    let back = |d: TensorData| Tensor::from_data(d, &device);
    (*p, *m, *v) = (back(pd), back(md), back(vd));
}

/// Global L2 norm of all gradients.
pub fn grad_norm(grads: &[Tensor<2>]) -> f64 {
    let total = grads
        .iter()
        .map(|g| g.clone().square().sum())
        .reduce(|a, b| a + b)
        .expect("at least one parameter");
    (total.into_scalar::<f32>() as f64).sqrt()
}

/// Scales gradients so their global norm is at most `max_norm` (no-op when `max_norm` is 0).
pub fn clip_grads(grads: Vec<Tensor<2>>, norm: f64, max_norm: f64) -> Vec<Tensor<2>> {
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        grads.into_iter().map(|g| g * scale).collect()
    } else {
        grads
    }
}

/// Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`.
pub fn learning_rate(step: u64, h: &TrainSection) -> f64 {
    if step < h.warmup_steps {
        return h.lr * (step + 1) as f64 / h.warmup_steps as f64;
    }
    if step >= h.steps {
        return h.min_lr;
    }
    let progress = (step - h.warmup_steps) as f64 / (h.steps - h.warmup_steps).max(1) as f64;
    h.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (h.lr - h.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_update_is_bit_identical_to_the_tensor_ops() {
        let device = burn::tensor::Device::flex();
        // More elements than one chunk of the parallel split, and not a multiple of it.
        let shape = [3, 40_001];
        let n = shape[0] * shape[1];
        let tensor = |seed: u64, positive: bool| {
            let values: Vec<f32> = (0..n as u64)
                .map(|i| {
                    let x = ((i * 2_654_435_761 + seed * 97) % 10_007) as f32 / 10_007.0 - 0.5;
                    if positive { x.abs() * 1e-3 } else { x }
                })
                .collect();
            Tensor::<2>::from_data(TensorData::new(values, shape), &device)
        };
        let step = |decays: bool| AdamStep {
            beta1: 0.9,
            one_minus_beta1: (1.0f64 - 0.9) as f32,
            beta2: 0.95,
            one_minus_beta2: (1.0f64 - 0.95) as f32,
            bias2: (1.0 - 0.95f64.powi(7)) as f32,
            eps: 1e-8,
            step_size: (3e-4 / (1.0 - 0.9f64.powi(7))) as f32,
            decay_factor: if decays {
                (1.0 - 3e-4 * 0.1f64) as f32
            } else {
                1.0
            },
        };
        for decays in [false, true] {
            let (p, g, m, v) = (
                tensor(1, false),
                tensor(2, false),
                tensor(3, false),
                tensor(4, true),
            );
            let (mut p1, mut m1, mut v1) = (p.clone(), m.clone(), v.clone());
            update_with_tensor_ops(&mut p1, g.clone(), &mut m1, &mut v1, step(decays));
            let (mut p2, mut m2, mut v2) = (p.clone(), m, v);
            update_on_host(&mut p2, g, &mut m2, &mut v2, step(decays));
            for (a, b) in [(p1, p2.clone()), (m1, m2), (v1, v2)] {
                assert_eq!(a.into_data(), b.into_data(), "decays = {decays}");
            }
            // The parameters moved (and the input tensor, which p2 shared, is unchanged).
            assert_ne!(p.clone().into_data(), p2.into_data());
            assert_eq!(p.into_data(), tensor(1, false).into_data());
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let h = TrainSection {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            steps: 110,
            ..TrainSection::default()
        };
        assert!((learning_rate(0, &h) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, &h) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, &h) - 1.0).abs() < 1e-12);
        assert!((learning_rate(60, &h) - 0.55).abs() < 1e-12);
        assert!((learning_rate(110, &h) - 0.1).abs() < 1e-12);
        let mut last = f64::INFINITY;
        for s in 10..110 {
            let lr = learning_rate(s, &h);
            assert!(lr <= last);
            last = lr;
        }
    }
}
