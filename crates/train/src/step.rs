//! One optimizer step: forward, backward, accumulate, clip, AdamW.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::chaos::NumberFaults;
use crate::config::TrainSection;
use crate::data::{Batch, Dataset, Split};
use crate::guard::GuardSection;
use crate::guarded::{GuardedStep, Outcome, single_worker_step};
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
    let count = mask.clone().sum();
    masked_nll_sum(logits, targets, mask) / count
}

/// Summed negative log-likelihood of `targets` over the positions where `mask` is 1.
fn masked_nll_sum(logits: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * t, v]), 1);
    let picked = logp.gather(1, targets.reshape([b * t, 1])).reshape([b * t]);
    (picked * mask.reshape([b * t])).sum().neg()
}

/// How many row groups of a micro-batch [`compute_grads`] runs in parallel.
///
/// On CPU, element-wise work (burn's ops, and the model's fused kernels for norms, RoPE,
/// softmax and SwiGLU with their backward) runs on the calling thread; only matrix multiplies
/// use every core. One group per core
/// this process may use (its rayon pool: `RAYON_NUM_THREADS`, which a local multi-worker
/// launch sets to each worker's share, or every core), at most [`MAX_ROW_GROUPS`], keeps the
/// cores busy through those ops too (measured: README, "Performance"). GPU devices take one
/// group: their kernels are already parallel. The count orders the float additions of the
/// gradient, so a run is bit-reproducible under the same thread budget, not across budgets.
pub fn row_groups(device: &Device, rows: usize) -> usize {
    #[allow(deprecated)] // ndarray stays selectable for cross-backend parity checks
    let cpu = *device == Device::flex() || *device == Device::ndarray();
    if !cpu {
        return 1;
    }
    rayon::current_num_threads()
        .clamp(1, MAX_ROW_GROUPS)
        .min(rows)
}

/// Measured on 2 cores: four groups did no better than two; more cores are untested.
pub const MAX_ROW_GROUPS: usize = 2;

/// Gradients of the mean loss over the micro-batches starting at `firsts` (`rows` each),
/// with their mean loss and token count. Weights are not changed.
pub fn compute_grads(
    weights: &Weights,
    data: &Dataset,
    seed: u64,
    firsts: &[u64],
    rows: usize,
) -> (Vec<Tensor<2>>, f64, usize) {
    let accum = firsts.len();
    let groups = row_groups(&weights.tensors[0].device(), rows);
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for &first in firsts {
        let batch = data.batch(Split::Train, seed, first, rows);
        tokens += batch.batch * batch.seq;
        let (micro_grads, loss) = batch_grads(weights, &batch, 1.0 / accum as f64, groups);
        loss_sum += loss;
        grads = Some(match grads {
            None => micro_grads,
            Some(acc) => add_grads(acc, micro_grads),
        });
    }
    let grads = grads.expect("at least one micro-batch");
    (grads, loss_sum / accum as f64, tokens)
}

/// Gradients of `scale` × the batch's mean masked cross-entropy, and that mean. The rows are
/// split into `groups`, each normalised by the whole batch's token count, so the sum of the
/// groups' gradients is the whole batch's gradient.
fn batch_grads(
    weights: &Weights,
    batch: &Batch,
    scale: f64,
    groups: usize,
) -> (Vec<Tensor<2>>, f64) {
    let count: f64 = batch.loss_mask.iter().map(|&m| m as f64).sum();
    let group_rows = batch.batch.div_ceil(groups);
    let parts: Vec<Batch> = (0..batch.batch)
        .step_by(group_rows)
        .map(|start| batch.rows(start, group_rows.min(batch.batch - start)))
        .collect();
    // Tasks of the compute pool rather than threads of their own: a group's matrix multiplies
    // split into tasks that an idle pool thread takes over, so the cores stay busy without
    // oversubscribing them (measured: README, "Performance").
    let results: Vec<(Vec<Tensor<2>>, f64)> = parts
        .par_iter()
        .map(|part| group_grads(weights, part, count, scale))
        .collect();
    // Summed in group order, so the result does not depend on which thread finished first.
    let mut results = results.into_iter();
    let (mut grads, mut loss) = results.next().expect("one group at least");
    for (g, l) in results {
        grads = add_grads(grads, g);
        loss += l;
    }
    (grads, loss)
}

/// Gradients of `scale` × (`part`'s summed token loss / `count`), and that loss unscaled.
fn group_grads(weights: &Weights, part: &Batch, count: f64, scale: f64) -> (Vec<Tensor<2>>, f64) {
    let device = weights.tensors[0].device();
    let (inputs, targets, mask) = batch_tensors(part, &device);
    let leaves: Vec<Tensor<2>> = weights
        .tensors
        .iter()
        .map(|t| t.clone().autodiff().require_grad())
        .collect();
    let logits = holdfast_model::forward(&weights.cfg, &leaves, inputs.autodiff());
    let loss = masked_nll_sum(logits, targets.autodiff(), mask.autodiff()) / count;
    let loss_value = loss.clone().inner().into_scalar::<f32>() as f64;
    let mut g = (loss * scale).backward();
    let grads = leaves
        .iter()
        .map(|leaf| {
            leaf.grad_remove(&mut g)
                .unwrap_or_else(|| leaf.clone().inner().zeros_like())
        })
        .collect();
    (grads, loss_value)
}

fn add_grads(a: Vec<Tensor<2>>, b: Vec<Tensor<2>>) -> Vec<Tensor<2>> {
    a.into_iter().zip(b).map(|(x, y)| x + y).collect()
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

/// Runs one optimizer step on the state's device and advances the state: the step of
/// [`crate::run::train`] ([`single_worker_step`]) with the stability guards off. Gradients are
/// averaged over `grad_accum` micro-batches before clipping and AdamW.
pub fn train_step(state: &mut TrainState, data: &Dataset, h: &TrainSection) -> StepStats {
    let mut no_faults = NumberFaults::default();
    let unguarded = GuardSection {
        enabled: false,
        ..Default::default()
    };
    let mut stepper = GuardedStep::new(unguarded, &mut no_faults);
    let report = single_worker_step(state, data, h, &mut stepper);
    let Outcome::Applied { lr } = report.outcome else {
        unreachable!("with the guards off every step is applied")
    };
    StepStats {
        step: state.step,
        loss: report.loss,
        grad_norm: report.grad_norm,
        lr,
        tokens: report.tokens,
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

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_model::ModelConfig;

    /// Rows of different lengths of loss, as the addition task's masks are.
    fn uneven_batch(rows: usize, seq: usize, vocab: i64) -> Batch {
        let n = rows * seq;
        Batch {
            batch: rows,
            seq,
            inputs: (0..n as i64).map(|i| (i * 7 + 3) % vocab).collect(),
            targets: (0..n as i64).map(|i| (i * 11 + 5) % vocab).collect(),
            loss_mask: (0..n)
                .map(|i| {
                    if i % seq < 1 + (i / seq) * 3 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn row_groups_give_the_whole_batch_gradient() {
        let device = Device::flex();
        let budget = rayon::current_num_threads().min(MAX_ROW_GROUPS);
        assert_eq!(row_groups(&device, 5), budget, "one group per usable core");
        assert_eq!(row_groups(&device, 1), 1);
        // The budget is the rayon pool the step runs in, whatever the machine's core count.
        let in_pool = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| row_groups(&device, 5))
        };
        assert_eq!(in_pool(1), 1);
        assert_eq!(in_pool(3), MAX_ROW_GROUPS);
        let cfg = ModelConfig::preset("tiny").unwrap();
        let weights = Weights::init(&cfg, 7, &device);
        let batch = uneven_batch(5, 16, cfg.vocab_size as i64);
        let count: f64 = batch.loss_mask.iter().map(|&m| m as f64).sum();

        let (whole, whole_loss) = group_grads(&weights, &batch, count, 0.5);
        let (split, split_loss) = batch_grads(&weights, &batch, 0.5, 2);
        assert!(
            (whole_loss - split_loss).abs() < 1e-5 * whole_loss.abs(),
            "loss {whole_loss} whole vs {split_loss} in row groups"
        );
        for (i, (a, b)) in whole.into_iter().zip(split).enumerate() {
            let scale: f32 = a.clone().abs().max().into_scalar();
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(
                diff <= 1e-5 * scale.max(1e-6),
                "parameter {i}: max |Δgrad| {diff} (largest {scale})"
            );
        }

        // The same split twice is bit-identical, whichever thread finishes first.
        let bytes = |g: Vec<Tensor<2>>| -> Vec<Vec<f32>> {
            g.into_iter()
                .map(|t| t.into_data().try_into_vec::<f32>().unwrap())
                .collect()
        };
        assert_eq!(
            bytes(batch_grads(&weights, &batch, 0.5, 2).0),
            bytes(batch_grads(&weights, &batch, 0.5, 2).0)
        );
    }
}
