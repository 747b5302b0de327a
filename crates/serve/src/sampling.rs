//! Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

use rand::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Generation ends before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Generation ends at any of these token ids (end-of-turn, end-of-text); not output.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 200,
            seed: 0,
            stop: Vec::new(),
            stop_tokens: Vec::new(),
        }
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], opts: &SamplingOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / opts.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    if opts.top_p < 1.0 {
        // Sorted descending, so the nucleus is a prefix; the first token always stays.
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p / total;
                cumulative >= opts.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
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

pub fn argmax(logits: &[f32]) -> u32 {
    // `f32::total_cmp`'s order as integers, so that both scans vectorize; the last of equal
    // maxima, as `max_by` picks.
    let key = |x: f32| {
        let bits = x.to_bits() as i32;
        bits ^ (((bits >> 31) as u32) >> 1) as i32
    };
    let Some(best) = logits.iter().map(|&x| key(x)).max() else {
        return 0;
    };
    logits
        .iter()
        .rposition(|&x| key(x) == best)
        .map_or(0, |i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn counts(logits: &[f32], opts: &SamplingOptions, draws: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sample(logits, opts, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn argmax_orders_as_total_cmp_and_takes_the_last_of_equal_maxima() {
        let reference = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32)
        };
        let specials = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for len in [0, 1, 2, 7, 64, 1000] {
            for _ in 0..50 {
                let v: Vec<f32> = (0..len)
                    .map(|_| match rng.random_range(0..4) {
                        0 => specials[rng.random_range(0..specials.len())],
                        1 => -f32::NAN,
                        _ => rng.random_range(-3i32..3) as f32 * 0.5,
                    })
                    .collect();
                assert_eq!(argmax(&v), reference(&v), "{v:?}");
            }
        }
    }

    #[test]
    fn greedy_picks_argmax_and_top_k_one_is_greedy() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let greedy = SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(counts(&logits, &greedy, 10), vec![0, 10, 0, 0]);
        let top1 = SamplingOptions {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(counts(&logits, &top1, 20), vec![0, 20, 0, 0]);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two equally likely tokens and one negligible: both should appear, the third never.
        let opts = SamplingOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let c = counts(&[3.0, 3.0, -30.0], &opts, 2000);
        assert_eq!(c[2], 0);
        assert!(c[0] > 800 && c[1] > 800, "{c:?}");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities about 0.665, 0.245, 0.090: top_p 0.8 keeps the first two only.
        let logits = [2.0, 1.0, 0.0];
        let opts = SamplingOptions {
            temperature: 1.0,
            top_p: 0.8,
            ..Default::default()
        };
        let c = counts(&logits, &opts, 3000);
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c[1] > 500, "{c:?}");
        // top_p below the first token's probability is greedy.
        let tight = SamplingOptions { top_p: 0.1, ..opts };
        assert_eq!(counts(&logits, &tight, 100), vec![100, 0, 0]);
    }
}
