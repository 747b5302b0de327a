//! Held-out evaluation: validation loss, and exact-match accuracy on the addition task.

use burn::tensor::{Device, Int, Tensor, TensorData};
use holdfast_model::Weights;

use crate::data::{AdditionTask, Dataset, Split};
use crate::step::{batch_tensors, masked_cross_entropy};

/// Mean loss over `batches` fixed validation batches (the same rows at every evaluation).
pub fn val_loss(weights: &Weights, data: &Dataset, seed: u64, batches: usize, rows: usize) -> f64 {
    let device = weights.tensors[0].device();
    let mut total = 0.0;
    for i in 0..batches {
        let batch = data.batch(Split::Val, seed, (i * rows) as u64, rows);
        let (inputs, targets, mask) = batch_tensors(&batch, &device);
        let loss = masked_cross_entropy(weights.forward(inputs), targets, mask);
        total += loss.into_scalar::<f32>() as f64;
    }
    total / batches as f64
}

/// Greedy continuation of equal-length prompts, `new_tokens` each, recomputing the context.
pub fn greedy_batch(
    weights: &Weights,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    device: &Device,
) -> Vec<Vec<u32>> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let ctx = weights.cfg.max_position_embeddings;
    for _ in 0..new_tokens {
        let len = seqs[0].len().min(ctx);
        let flat: Vec<i64> = seqs
            .iter()
            .flat_map(|s| s[s.len() - len..].iter().map(|&t| t as i64))
            .collect();
        let tokens: Tensor<2, Int> =
            Tensor::from_data(TensorData::new(flat, [seqs.len(), len]), device);
        let logits = weights.forward(tokens);
        let [b, t, v] = logits.dims();
        let last = logits.narrow(1, t - 1, 1).reshape([b, v]);
        let next = last.argmax(1).into_data().convert::<i64>();
        let next = next.as_slice::<i64>().expect("i64 ids");
        for (s, &n) in seqs.iter_mut().zip(next) {
            s.push(n as u32);
        }
    }
    seqs.into_iter()
        .zip(prompts)
        .map(|(s, p)| s[p.len()..].to_vec())
        .collect()
}

/// Exact-match accuracy of greedy answers on up to `n` distinct held-out problems, and how
/// many problems that was.
pub fn addition_accuracy(weights: &Weights, task: &AdditionTask, n: usize) -> (f64, usize) {
    let device = weights.tensors[0].device();
    let problems = task.held_out_problems(n);
    let mut correct = 0;
    for chunk in problems.chunks(256) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&(a, b)| task.prompt(a, b).bytes().map(u32::from).collect())
            .collect();
        let outs = greedy_batch(weights, &prompts, task.answer_len(), &device);
        for (&(a, b), out) in chunk.iter().zip(outs) {
            let expected: Vec<u32> = task.answer(a, b).bytes().map(u32::from).collect();
            if out == expected {
                correct += 1;
            }
        }
    }
    (correct as f64 / problems.len() as f64, problems.len())
}
