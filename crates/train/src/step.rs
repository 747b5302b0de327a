//! One optimizer step: forward, backward, accumulate, clip, AdamW.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::TrainSection;
use crate::data::{Batch, Dataset, Split};
use holdfast_cluster::chaos::NumberFaults;
use holdfast_model::Weights;

use crate::optim::{AdamW, clip_grads, grad_norm, learning_rate};
use crate::state::TrainState;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Tokens in this step's batches (all positions, masked or not).
    pub tokens: usize,
}

/// Token ids, targets and loss mask of a batch as device tensors.
pub fn batch_tensors(
    batch: &Batch,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2>) {
    let shape = [batch.batch, batch.seq];
    (
        Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.loss_mask.clone(), shape), device),
    )
}

/// Mean cross-entropy over the positions where `mask` is 1.
pub fn masked_cross_entropy(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * t, v]), 1);
    let picked = logp.gather(1, targets.reshape([b * t, 1])).reshape([b * t]);
    let mask = mask.reshape([b * t]);
    let count = mask.clone().sum();
    (picked * mask).sum().neg() / count
}

/// Gradients of the mean loss over the micro-batches starting at `firsts` (`rows` each),
/// with their mean loss and token count. Weights are not changed.
pub fn compute_grads(
    weights: &Weights,
    data: &Dataset,
    seed: u64,
    firsts: &[u64],
    rows: usize,
) -> (Vec<Tensor<2>>, f64, usize) {
    let device = weights.tensors[0].device();
    let accum = firsts.len();
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for &first in firsts {
        let batch = data.batch(Split::Train, seed, first, rows);
        tokens += batch.batch * batch.seq;
        let (inputs, targets, mask) = batch_tensors(&batch, &device);
        let leaves: Vec<Tensor<2>> = weights
            .tensors
            .iter()
            .map(|t| t.clone().autodiff().require_grad())
            .collect();
        let logits = holdfast_model::forward(&weights.cfg, &leaves, inputs.autodiff());
        let loss = masked_cross_entropy(logits, targets.autodiff(), mask.autodiff());
        loss_sum += loss.clone().inner().into_scalar::<f32>() as f64;
        let mut g = (loss / accum as f64).backward();
        let micro_grads: Vec<Tensor<2>> = leaves
            .iter()
            .map(|leaf| {
                leaf.grad_remove(&mut g)
                    .unwrap_or_else(|| leaf.clone().inner().zeros_like())
            })
            .collect();
        grads = Some(match grads {
            None => micro_grads,
            Some(acc) => acc
                .into_iter()
                .zip(micro_grads)
                .map(|(a, b)| a + b)
                .collect(),
        });
    }
    let grads = grads.expect("at least one micro-batch");
    (grads, loss_sum / accum as f64, tokens)
}

/// Clips `grads` and applies AdamW with the learning rate of optimizer step `step`; returns
/// the pre-clip gradient norm and the learning rate used.
pub fn apply_grads(
    weights: &mut Weights,
    opt: &mut AdamW,
    grads: Vec<Tensor<2>>,
    step: u64,
    h: &TrainSection,
) -> (f64, f64) {
    let norm = grad_norm(&grads);
    (norm, apply_clipped(weights, opt, grads, norm, step, h))
}

/// [`apply_grads`] for a caller that already has the gradients' norm; returns the learning rate.
pub fn apply_clipped(
    weights: &mut Weights,
    opt: &mut AdamW,
    grads: Vec<Tensor<2>>,
    norm: f64,
    step: u64,
    h: &TrainSection,
) -> f64 {
    let grads = clip_grads(grads, norm, h.grad_clip);
    let lr = learning_rate(step, h);
    let decay: Vec<bool> = weights.specs.iter().map(|s| s.decay).collect();
    opt.step(&mut weights.tensors, grads, &decay, lr, h);
    lr
}

/// Runs one optimizer step of `worker` (of `world`) on the state's device and advances the
/// state. Gradients are averaged over `grad_accum` micro-batches before clipping and AdamW.
pub fn train_step(
    state: &mut TrainState,
    data: &Dataset,
    h: &TrainSection,
    worker: usize,
    world: usize,
) -> StepStats {
    let firsts = state
        .cursor
        .micro_batch_starts(h.grad_accum, worker, world, h.batch_size);
    let (grads, loss, tokens) =
        compute_grads(&state.weights, data, state.seed, &firsts, h.batch_size);
    let (norm, lr) = apply_grads(&mut state.weights, &mut state.opt, grads, state.step, h);
    state.step += 1;
    state.cursor.advance(h.batch_size, h.grad_accum, world);
    StepStats {
        step: state.step,
        loss,
        grad_norm: norm,
        lr,
        tokens,
    }
}

/// Chaos for numbers: makes `step`'s loss and gradients NaN, or scales them, as `faults` say.
pub fn inject(
    faults: &NumberFaults,
    step: u64,
    grads: Vec<Tensor<2>>,
    loss: f64,
) -> (Vec<Tensor<2>>, f64) {
    if faults.nan_at(step) {
        return (grads.into_iter().map(|g| g * f32::NAN).collect(), f64::NAN);
    }
    let scale = faults.scale_at(step);
    if scale != 1.0 {
        return (grads.into_iter().map(|g| g * scale).collect(), loss * scale);
    }
    (grads, loss)
}
