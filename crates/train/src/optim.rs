//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's update order), global-norm
//! gradient clipping and the warm-up + cosine learning-rate schedule.
//!
//! The moments are plain tensors in the same order as the parameters, so the optimizer state
//! is as explicit (saveable, comparable, shippable to a peer) as the weights.

use burn::tensor::Tensor;

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
        let bias2 = 1.0 - h.beta2.powi(self.t as i32);
        let step_size = lr / bias1;
        for (i, g) in grads.into_iter().enumerate() {
            let m = self.exp_avg[i].clone() * h.beta1 + g.clone() * (1.0 - h.beta1);
            let v = self.exp_avg_sq[i].clone() * h.beta2 + g.square() * (1.0 - h.beta2);
            let denom = (v.clone() / bias2).sqrt() + h.eps;
            let mut p = params[i].clone();
            if decay[i] && h.weight_decay > 0.0 {
                p = p * (1.0 - lr * h.weight_decay);
            }
            params[i] = p - m.clone() / denom * step_size;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
    }
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
