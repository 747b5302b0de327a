//! Training data: tokenizers, the text corpus and its token cache, the built-in addition task,
//! and the sampler.
//!
//! Every row a run trains on is a pure function of `(seed, sample index)`: the sampler keeps no
//! hidden state, so the cursor (the next global sample index) fully describes where a run is,
//! and any worker can compute any other worker's rows.

use std::path::{Path, PathBuf};

use crate::{TrainError, atomic_write};

/// Counter-based RNG step (splitmix64): the randomness of row `i` is `mix(seed ^ mix(i))`.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

pub use holdfast_model::Tokenizer;

/// Files named by a path or a glob, in sorted order; an error names what matched nothing.
pub fn resolve_data_files(spec: &str) -> Result<Vec<PathBuf>, TrainError> {
    let is_glob = spec.contains(['*', '?', '[']);
    if !is_glob {
        let path = PathBuf::from(spec);
        if !path.exists() {
            return Err(TrainError::Data(format!("data path {spec}: no such file")));
        }
        if path.is_dir() {
            return Err(TrainError::Data(format!(
                "data path {spec} is a directory; give a file or a glob such as '{spec}/*.txt'"
            )));
        }
        return Ok(vec![path]);
    }
    let mut files: Vec<PathBuf> = glob::glob(spec)
        .map_err(|e| TrainError::Data(format!("data glob {spec}: {e}")))?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TrainError::Data(format!(
            "data glob {spec} matches no file"
        )));
    }
    Ok(files)
}

/// Reads the files as UTF-8 text, refusing empty and binary files by name.
pub fn read_text(files: &[PathBuf]) -> Result<String, TrainError> {
    let mut text = String::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        if bytes.is_empty() {
            return Err(TrainError::Data(format!(
                "data file {} is empty",
                path.display()
            )));
        }
        if let Some(pos) = bytes.iter().position(|&b| b == 0) {
            return Err(TrainError::Data(format!(
                "data file {} looks binary (NUL byte at offset {pos}); expected UTF-8 text",
                path.display()
            )));
        }
        let s = String::from_utf8(bytes).map_err(|e| {
            TrainError::Data(format!(
                "data file {} is not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        text.push_str(&s);
    }
    Ok(text)
}

/// Tokenizes `text` once, caching the ids in `cache_dir` under a hash of tokenizer and text.
/// The cache file carries a checksum of its ids: a damaged one is reported and rebuilt, never
/// trained on.
pub fn tokenize_cached(
    text: &str,
    tokenizer: &Tokenizer,
    cache_dir: &Path,
) -> Result<Vec<u32>, TrainError> {
    let mut key = blake3::Hasher::new();
    key.update(tokenizer.id().as_bytes());
    key.update(&[0]);
    key.update(text.as_bytes());
    let path = cache_dir.join(format!("{}.tok", &key.finalize().to_hex()[..32]));
    if let Ok(bytes) = std::fs::read(&path) {
        match read_token_cache(&bytes, tokenizer.vocab_size()) {
            Ok(ids) => return Ok(ids),
            Err(why) => tracing::warn!(
                "token cache {} is damaged ({why}); tokenizing again",
                path.display()
            ),
        }
    }
    let ids = tokenizer.encode(text)?;
    std::fs::create_dir_all(cache_dir).map_err(|e| TrainError::io(cache_dir, e))?;
    let payload: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let mut bytes = TOKEN_CACHE_MAGIC.to_vec();
    bytes.extend_from_slice(blake3::hash(&payload).as_bytes());
    bytes.extend_from_slice(&payload);
    atomic_write(&path, &bytes)?;
    Ok(ids)
}

/// A token cache file: this magic, the BLAKE3 of the ids, then the ids (u32, little-endian).
const TOKEN_CACHE_MAGIC: &[u8; 8] = b"HFTOKv1\0";

fn read_token_cache(bytes: &[u8], vocab: usize) -> Result<Vec<u32>, String> {
    let header = TOKEN_CACHE_MAGIC.len() + 32;
    if bytes.len() < header || !bytes.starts_with(TOKEN_CACHE_MAGIC) {
        return Err("not a token cache file".into());
    }
    let (sum, payload) = bytes[TOKEN_CACHE_MAGIC.len()..].split_at(32);
    if payload.len() % 4 != 0 || blake3::hash(payload).as_bytes() != sum {
        return Err("its ids do not match their checksum".into());
    }
    let ids: Vec<u32> = payload
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(format!(
            "token id {id} is outside the vocabulary of {vocab}"
        )),
        None => Ok(ids),
    }
}

/// A batch of rows: `inputs`/`targets` are `[batch, seq]` row-major; `loss_mask` says which
/// target positions count in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub loss_mask: Vec<f32>,
}

impl Batch {
    /// Rows `start..start + count` as a batch of their own.
    pub fn rows(&self, start: usize, count: usize) -> Batch {
        let span = start * self.seq..(start + count) * self.seq;
        Batch {
            batch: count,
            seq: self.seq,
            inputs: self.inputs[span.clone()].to_vec(),
            targets: self.targets[span.clone()].to_vec(),
            loss_mask: self.loss_mask[span].to_vec(),
        }
    }
}

/// A token stream split into train and validation parts; rows are random windows.
pub struct TextData {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub seq: usize,
}

impl TextData {
    pub fn new(tokens: Vec<u32>, val_fraction: f64, seq: usize) -> Result<Self, TrainError> {
        let n_val = ((tokens.len() as f64) * val_fraction).round() as usize;
        let split = tokens.len() - n_val;
        let (train, val) = (tokens[..split].to_vec(), tokens[split..].to_vec());
        for (name, part) in [("training", &train), ("validation", &val)] {
            if part.len() < seq + 2 {
                return Err(TrainError::Data(format!(
                    "the {name} split has {} tokens, fewer than one context of {} + 2; give more text or a smaller context",
                    part.len(),
                    seq
                )));
            }
        }
        Ok(TextData { train, val, seq })
    }

    fn row(&self, split: Split, seed: u64, index: u64, out: &mut Batch) {
        let tokens = match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        };
        let span = (tokens.len() - self.seq - 1) as u64;
        let offset = (mix(seed ^ mix(index)) % span) as usize;
        let window = &tokens[offset..offset + self.seq + 1];
        out.inputs
            .extend(window[..self.seq].iter().map(|&t| t as i64));
        out.targets.extend(window[1..].iter().map(|&t| t as i64));
        out.loss_mask.extend(std::iter::repeat_n(1.0, self.seq));
    }
}

/// Addition of `digits`-digit numbers with every number written least-significant digit first
/// and zero-padded: 12 + 345 = 357 is `210+543=7530\n`. Reversed answers make the carry flow
/// left to right, and reversed operands put the digits each answer digit needs at the same
/// relative distance for every digit, which a rotary-position model learns quickly (in the
/// usual most-significant-first order a tiny model stalls for thousands of steps). Only the
/// answer counts in the loss. A fixed 2% of all operand pairs is held out for
/// validation and never trained on.
pub struct AdditionTask {
    pub digits: usize,
}

/// Salt of the held-out split: fixed, so every run and seed holds out the same problems.
const HELD_OUT_SALT: u64 = 0x4144_4449_5449_4F4E;

impl AdditionTask {
    pub fn new(digits: usize) -> Self {
        AdditionTask { digits }
    }

    /// Length of one full row including the trailing newline.
    pub fn row_len(&self) -> usize {
        3 * self.digits + 4
    }

    /// Length of the prompt `aaa+bbb=`.
    pub fn prompt_len(&self) -> usize {
        2 * self.digits + 2
    }

    /// Characters of the answer including its newline.
    pub fn answer_len(&self) -> usize {
        self.digits + 2
    }

    fn modulus(&self) -> u64 {
        10u64.pow(self.digits as u32)
    }

    pub fn is_held_out(&self, a: u64, b: u64) -> bool {
        mix(HELD_OUT_SALT ^ mix(a * self.modulus() + b)).is_multiple_of(50)
    }

    /// The operands of sample `index` of `split`: drawn until they fall on the split's side.
    pub fn operands(&self, split: Split, seed: u64, index: u64) -> (u64, u64) {
        let m = self.modulus();
        let salt = match split {
            Split::Train => seed,
            // Validation draws ignore the training seed: the same problems for every run.
            Split::Val => HELD_OUT_SALT,
        };
        let mut attempt = 0u64;
        loop {
            let r = mix(salt ^ mix(index ^ mix(attempt)));
            let (a, b) = ((r >> 32) % m, (r & 0xFFFF_FFFF) % m);
            if self.is_held_out(a, b) == (split == Split::Val) {
                return (a, b);
            }
            attempt += 1;
        }
    }

    /// Up to `n` distinct held-out problems, always the same ones (fewer when the held-out set
    /// is smaller, as for 1- or 2-digit operands).
    pub fn held_out_problems(&self, n: usize) -> Vec<(u64, u64)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(n);
        for i in 0..(n as u64) * 20 {
            let p = self.operands(Split::Val, 0, i);
            if seen.insert(p) {
                out.push(p);
                if out.len() == n {
                    break;
                }
            }
        }
        out
    }

    /// `a` and `b` zero-padded and written least-significant digit first, then `=`.
    pub fn prompt(&self, a: u64, b: u64) -> String {
        format!(
            "{}+{}=",
            self.reversed(a, self.digits),
            self.reversed(b, self.digits)
        )
    }

    /// The sum, zero-padded to `digits + 1` and least-significant digit first, then a newline.
    pub fn answer(&self, a: u64, b: u64) -> String {
        format!("{}\n", self.reversed(a + b, self.digits + 1))
    }

    fn reversed(&self, n: u64, width: usize) -> String {
        format!("{n:0width$}").chars().rev().collect()
    }

    fn row(&self, split: Split, seed: u64, index: u64, out: &mut Batch) {
        let (a, b) = self.operands(split, seed, index);
        let text = format!("{}{}", self.prompt(a, b), self.answer(a, b));
        let bytes = text.as_bytes();
        let seq = self.row_len() - 1;
        out.inputs.extend(bytes[..seq].iter().map(|&t| t as i64));
        out.targets.extend(bytes[1..].iter().map(|&t| t as i64));
        // Target position p predicts character p + 1; the answer starts at prompt_len.
        out.loss_mask
            .extend((0..seq).map(|p| if p + 1 >= self.prompt_len() { 1.0 } else { 0.0 }));
    }
}

/// What a run trains on.
pub enum Dataset {
    Text(TextData),
    Addition(AdditionTask),
}

impl Dataset {
    /// Sequence length of a row.
    pub fn seq_len(&self) -> usize {
        match self {
            Dataset::Text(t) => t.seq,
            Dataset::Addition(a) => a.row_len() - 1,
        }
    }

    /// Rows `first..first + rows` of `split`, a pure function of its arguments.
    pub fn batch(&self, split: Split, seed: u64, first: u64, rows: usize) -> Batch {
        let seq = self.seq_len();
        let mut out = Batch {
            batch: rows,
            seq,
            inputs: Vec::with_capacity(rows * seq),
            targets: Vec::with_capacity(rows * seq),
            loss_mask: Vec::with_capacity(rows * seq),
        };
        for index in first..first + rows as u64 {
            match self {
                Dataset::Text(t) => t.row(split, seed, index, &mut out),
                Dataset::Addition(a) => a.row(split, seed, index, &mut out),
            }
        }
        out
    }
}

/// Where a run is in its data: the global index of the next training row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    pub next_sample: u64,
}

impl DataCursor {
    /// First row of micro-batch `micro` for `worker` of `world`, with `rows` rows per
    /// micro-batch; after all micro-batches of a step the cursor advances by
    /// `rows · accum · world`.
    pub fn micro_batch_start(&self, micro: usize, worker: usize, world: usize, rows: usize) -> u64 {
        self.next_sample + ((micro * world + worker) * rows) as u64
    }

    /// First rows of all `accum` micro-batches of this step, for `worker` of `world`.
    pub fn micro_batch_starts(
        &self,
        accum: usize,
        worker: usize,
        world: usize,
        rows: usize,
    ) -> Vec<u64> {
        (0..accum)
            .map(|micro| self.micro_batch_start(micro, worker, world, rows))
            .collect()
    }

    pub fn advance(&mut self, rows: usize, accum: usize, world: usize) {
        self.next_sample += (rows * accum * world) as u64;
    }
}
