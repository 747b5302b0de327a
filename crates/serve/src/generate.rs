//! The decode loop: prompt through the KV cache once, then one token at a time, streaming
//! text as it becomes final.

use holdfast_model::Tokenizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{SamplingOptions, ServeError, ServedModel, sample};

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
) -> Result<Completion, ServeError> {
    let mut cache = model.engine.new_cache();
    let mut generation = Generation::new(model, prompt, opts);
    loop {
        if let Some(done) = generation.finished() {
            return Ok(done);
        }
        let logits = model.engine.next_logits(&mut cache, generation.input())?;
        generation.advance(&logits, &mut on_text);
    }
}

/// One request's generation, a step at a time: what to feed the model next, and what its
/// logits make of the text. The server steps many of these through one batched forward.
pub struct Generation<'a> {
    model: &'a ServedModel,
    opts: SamplingOptions,
    rng: ChaCha8Rng,
    budget: usize,
    input: Vec<u32>,
    tokens: Vec<u32>,
    text: TextStream,
    emitted: usize,
    done: Option<FinishReason>,
}

impl<'a> Generation<'a> {
    pub fn new(model: &'a ServedModel, prompt: &[u32], opts: &SamplingOptions) -> Self {
        let budget = opts
            .max_new_tokens
            .min(model.context().saturating_sub(prompt.len()));
        Generation {
            model,
            opts: opts.clone(),
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            budget,
            input: prompt.to_vec(),
            tokens: Vec::new(),
            text: TextStream::default(),
            emitted: 0,
            done: (budget == 0).then_some(FinishReason::Length),
        }
    }

    /// The tokens the next forward must take: the prompt, then each sampled token.
    pub fn input(&self) -> &[u32] {
        &self.input
    }

    /// The completion, once generation has ended.
    pub fn finished(&self) -> Option<Completion> {
        self.done.map(|finish_reason| Completion {
            text: self.text.text.clone(),
            tokens: self.tokens.clone(),
            finish_reason,
        })
    }

    /// Samples from `logits` (those after [`input`](Self::input)) and streams what became
    /// final through `on_text`, which returns false to cancel.
    pub fn advance(&mut self, logits: &[f32], on_text: &mut impl FnMut(&str) -> bool) {
        let next = sample(logits, &self.opts, &mut self.rng);
        if self.opts.stop_tokens.contains(&next) {
            return self.finish(FinishReason::Stop, on_text);
        }
        self.tokens.push(next);
        self.input = vec![next];
        self.text.push(&self.model.tokenizer, &self.tokens);
        if let Some(at) = find_stop(&self.text.text, &self.opts.stop) {
            self.text.text.truncate(at);
            return self.finish(FinishReason::Stop, on_text);
        }
        let text = &self.text.text;
        let ready = final_prefix_len(text, &self.opts.stop);
        if ready > self.emitted && text.is_char_boundary(self.emitted) {
            if !on_text(&text[self.emitted..ready]) {
                self.done = Some(FinishReason::Cancelled);
                return;
            }
            self.emitted = ready;
        }
        if self.tokens.len() >= self.budget {
            self.finish(FinishReason::Length, on_text);
        }
    }

    fn finish(&mut self, reason: FinishReason, on_text: &mut impl FnMut(&str) -> bool) {
        self.text.flush(&self.model.tokenizer, &self.tokens);
        if let Some(at) = find_stop(&self.text.text, &self.opts.stop) {
            self.text.text.truncate(at);
        }
        let text = &self.text.text;
        if text.len() > self.emitted && text.is_char_boundary(self.emitted) {
            on_text(&text[self.emitted..]);
        }
        self.done = Some(reason);
    }
}

/// Generated text, decoded incrementally: each step decodes only the tokens since the last
/// complete piece (plus the one before, for tokenizers whose decoding of a token depends on
/// its left neighbour, such as SentencePiece's leading space), not the whole sequence.
#[derive(Default)]
struct TextStream {
    text: String,
    /// Tokens before this index are context only; from `read`, not yet in `text`.
    prefix: usize,
    read: usize,
}

impl TextStream {
    /// Appends what `tokens` (all generated so far) add, unless it ends mid-character.
    fn push(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) {
        let before = tokenizer.decode(&tokens[self.prefix..self.read]);
        let now = tokenizer.decode(&tokens[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = tokens.len();
        }
    }

    /// Appends whatever is left, partial characters included.
    fn flush(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) {
        let before = tokenizer.decode(&tokens[self.prefix..self.read]);
        let now = tokenizer.decode(&tokens[self.prefix..]);
        if let Some(rest) = now.strip_prefix(&before) {
            self.text.push_str(rest);
        }
        self.prefix = tokens.len();
        self.read = tokens.len();
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
    fn incremental_text_is_the_whole_decoding_even_across_split_characters() {
        let tokenizer = Tokenizer::Bytes;
        let whole = "naïve café — 東京 ok";
        let tokens: Vec<u32> = whole.bytes().map(u32::from).collect();
        let mut stream = TextStream::default();
        let mut seen = Vec::new();
        for end in 1..=tokens.len() {
            stream.push(&tokenizer, &tokens[..end]);
            seen.push(stream.text.clone());
        }
        stream.flush(&tokenizer, &tokens);
        assert_eq!(stream.text, whole);
        assert!(
            seen.iter().all(|t| whole.starts_with(t.as_str())),
            "{seen:?}"
        );
        assert!(seen.iter().all(|t| !t.contains('\u{FFFD}')));
    }

    #[test]
    fn partial_characters_are_held_back() {
        assert_eq!(final_prefix_len("caf\u{FFFD}", &[]), 3);
    }
}
