//! One optimizer step: forward, backward, accumulate, clip, AdamW.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::TrainSection;
use crate::data::{Batch, Dataset, Split};
use crate::optim::{clip_grads, grad_norm, learning_rate};
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

/// Runs one optimizer step of `worker` (of `world`) on the state's device and advances the
/// state. Gradients are averaged over `grad_accum` micro-batches before clipping and AdamW.
pub fn train_step(
    state: &mut TrainState,
    data: &Dataset,
    h: &TrainSection,
    worker: usize,
    world: usize,
) -> StepStats {
    let device = state.weights.tensors[0].device();
    let accum = h.grad_accum;
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for micro in 0..accum {
        let first = state
            .cursor
            .micro_batch_start(micro, worker, world, h.batch_size);
        let batch = data.batch(Split::Train, state.seed, first, h.batch_size);
        tokens += batch.batch * batch.seq;
        let (inputs, targets, mask) = batch_tensors(&batch, &device);

        let leaves: Vec<Tensor<2>> = state
            .weights
            .tensors
            .iter()
            .map(|t| t.clone().autodiff().require_grad())
            .collect();
        let logits = holdfast_model::forward(&state.weights.cfg, &leaves, inputs.autodiff());
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
    let grads = grads.expect("grad_accum ≥ 1");
    let norm = grad_norm(&grads);
    let grads = clip_grads(grads, norm, h.grad_clip);
    let lr = learning_rate(state.step, h);
    let decay: Vec<bool> = state.weights.specs.iter().map(|s| s.decay).collect();
    state
        .opt
        .step(&mut state.weights.tensors, grads, &decay, lr, h);
    state.step += 1;
    state.cursor.advance(h.batch_size, accum, world);
    StepStats {
        step: state.step,
        loss: loss_sum / accum as f64,
        grad_norm: norm,
        lr,
        tokens,
    }
}
