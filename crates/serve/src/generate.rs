//! The decode loop: prompt through the KV cache once, then one token at a time, streaming
//! text as it becomes final.

use holdfast_model::{KvCache, Logits, forward_cached, token_batch};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{SamplingOptions, ServedModel, sample};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop sequence.
    Stop,
    /// `max_new_tokens` or the context was reached.
    Length,
    /// The receiver of the text went away.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::Cancelled => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    /// Generated ids (without a stop token).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Generates after `prompt` (which must be shorter than the context), calling `on_text` with
/// each piece of text once it is final: whole characters, never part of a stop sequence.
/// `on_text` returns false to cancel.
pub fn generate(
    model: &ServedModel,
    prompt: &[u32],
    opts: &SamplingOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Completion {
    let cfg = &model.weights.cfg;
    let budget = opts
        .max_new_tokens
        .min(model.context().saturating_sub(prompt.len()));
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut cache = KvCache::new();
    let mut input = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut emitted = 0;
    let mut finish = FinishReason::Length;
    for _ in 0..budget {
        let batch = token_batch(&input, &model.device);
        let logits = forward_cached(cfg, &model.weights.tensors, batch, &mut cache, Logits::Last)
            .into_data()
            .convert::<f32>();
        let next = sample(
            logits.as_slice::<f32>().expect("f32 logits"),
            opts,
            &mut rng,
        );
        if opts.stop_tokens.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        input = vec![next];
        text = model.tokenizer.decode(&tokens);
        if let Some(at) = find_stop(&text, &opts.stop) {
            text.truncate(at);
            finish = FinishReason::Stop;
            break;
        }
        let ready = final_prefix_len(&text, &opts.stop);
        // Decoding is prefix-stable for byte-level and SentencePiece tokenizers; should one
        // rewrite text already sent, nothing more is streamed rather than slicing mid-character.
        if ready > emitted && text.is_char_boundary(emitted) {
            if !on_text(&text[emitted..ready]) {
                return Completion {
                    text,
                    tokens,
                    finish_reason: FinishReason::Cancelled,
                };
            }
            emitted = ready;
        }
    }
    if text.len() > emitted && text.is_char_boundary(emitted) {
        on_text(&text[emitted..]);
    }
    Completion {
        text,
        tokens,
        finish_reason: finish,
    }
}

/// Byte offset of the earliest stop sequence in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` can be shown: not a trailing partial character (a byte-level token can
/// end mid-character) and not a tail that might still grow into a stop sequence.
fn final_prefix_len(text: &str, stops: &[String]) -> usize {
    let complete = text.trim_end_matches('\u{FFFD}');
    let held = stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&k| s.is_char_boundary(k) && complete.ends_with(&s[..k]))
                .max()
        })
        .max()
        .unwrap_or(0);
    complete.len() - held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_hold_back_a_possible_prefix() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(final_prefix_len("hello", &stops), 5);
        assert_eq!(final_prefix_len("hello\n", &stops), 5);
        assert_eq!(final_prefix_len("hello EN", &stops), 6);
        assert_eq!(final_prefix_len("hello E!", &stops), 8);
        assert_eq!(find_stop("a\n\nb END", &stops), Some(1));
        assert_eq!(find_stop("abc", &stops), None);
    }

    #[test]
    fn partial_characters_are_held_back() {
        assert_eq!(final_prefix_len("caf\u{FFFD}", &[]), 3);
    }
}
