//! The decoder for serving on the host's cores, straight from a memory-mapped GGUF file: the
//! weights stay in their block formats where the file has them (see [`quant`](crate::quant)),
//! each product is split over the compute pool, and several sequences, each at its own
//! position, go through one forward together (batched decoding).
//!
//! The arithmetic is llama.cpp's: 8-bit activations against quantized blocks, f32 for norms,
//! rotary embedding, attention and the KV cache. Where the CPU has AVX-512 VNNI, the block
//! matrices are repacked into tiles when the file is opened (see
//! [`PackedMatrix`](crate::quant::PackedMatrix)) and every product, prompt or token, runs on
//! them; the mapped pages they came from are given back, so each weight is held once. Query and key rows stay in the order the GGUF
//! converter permuted them to, so the rotary embedding rotates adjacent pairs, as ggml's does.

use std::path::Path;

use memmap2::Mmap;
use rayon::prelude::*;

use crate::gguf::{self, Header, format_err, unsupported_tensor};
use crate::kernels;
use crate::quant::{
    Format, GEMM_ROWS, GROUP_ROWS, PackedMatrix, QuantMatrix, matmul_many_from, matmul_packed,
};
use crate::{GgufInfo, ModelConfig, ModelError};

/// A matrix's place in the mapped file.
#[derive(Clone, Debug)]
struct Placed {
    format: Format,
    rows: usize,
    cols: usize,
    start: usize,
    len: usize,
    /// The matrix repacked for the tiled kernel, where the CPU has it (see
    /// [`MappedModel::open`]).
    packed: Option<Box<PackedMatrix>>,
}

struct Layer {
    attn_norm: Vec<f32>,
    q: Placed,
    k: Placed,
    v: Placed,
    o: Placed,
    ffn_norm: Vec<f32>,
    gate: Placed,
    up: Placed,
    down: Placed,
}

/// A GGUF model mapped for serving.
pub struct MappedModel {
    pub config: ModelConfig,
    pub info: GgufInfo,
    map: Mmap,
    embedding: Placed,
    /// `output.weight`, or the embedding when the model ties them.
    output: Placed,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// `θ^(-2i/d)` for each rotated pair `i` of a head.
    inverse_frequencies: Vec<f64>,
    /// Steps of this many tokens or more (a prompt) take products expanded to f32 instead of
    /// 8-bit ones where a matrix is not packed (see
    /// [`quant::GEMM_ROWS`](crate::quant::GEMM_ROWS)); 1 makes every product f32.
    expand_from: usize,
}

/// One sequence's keys and values, per layer and key-value head (`l · kv_heads + h`)
/// `[positions, head_dim]`: each head's cache lies in one run, read front to back.
#[derive(Clone, Debug, Default)]
pub struct Sequence {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl Sequence {
    pub fn new() -> Self {
        Self::default()
    }
}

/// One sequence's part of a batched forward: its next tokens (a prompt, or one generated
/// token).
pub struct Step<'a> {
    pub sequence: &'a mut Sequence,
    pub tokens: &'a [u32],
}

impl MappedModel {
    /// Maps `path` and checks every tensor's name, type, shape and extent before use.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let (map, header) = gguf::map_file(path)?;
        let config = gguf::config_of(&header, path)?;
        let info = gguf::info_of(&header);
        let tensors = Directory {
            header: &header,
            map: &map,
            path,
        };
        let hidden = config.hidden_size;
        let (kv, inter) = (config.kv_width(), config.intermediate_size);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let name = |part: &str| format!("blk.{l}.{part}.weight");
            layers.push(Layer {
                attn_norm: tensors.vector(&name("attn_norm"), hidden)?,
                q: tensors.matrix(&name("attn_q"), hidden, hidden)?,
                k: tensors.matrix(&name("attn_k"), kv, hidden)?,
                v: tensors.matrix(&name("attn_v"), kv, hidden)?,
                o: tensors.matrix(&name("attn_output"), hidden, hidden)?,
                ffn_norm: tensors.vector(&name("ffn_norm"), hidden)?,
                gate: tensors.matrix(&name("ffn_gate"), inter, hidden)?,
                up: tensors.matrix(&name("ffn_up"), inter, hidden)?,
                down: tensors.matrix(&name("ffn_down"), hidden, inter)?,
            });
        }
        let embedding = tensors.matrix("token_embd.weight", config.vocab_size, hidden)?;
        let mut output = if config.tie_word_embeddings {
            embedding.clone()
        } else {
            tensors.matrix("output.weight", config.vocab_size, hidden)?
        };
        let final_norm = tensors.vector("output_norm.weight", hidden)?;
        tensors.refuse_unknown(config.num_hidden_layers)?;
        if PackedMatrix::available() {
            let mut matrices: Vec<&mut Placed> = vec![&mut output];
            for l in &mut layers {
                matrices.extend([
                    &mut l.q,
                    &mut l.k,
                    &mut l.v,
                    &mut l.o,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]);
            }
            pack(&map, matrices);
        }
        let hd = config.head_dim();
        let inverse_frequencies = (0..hd / 2)
            .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        Ok(MappedModel {
            config,
            info,
            map,
            embedding,
            output,
            final_norm,
            layers,
            inverse_frequencies,
            expand_from: GEMM_ROWS,
        })
    }

    /// Every product in f32 (the weights expanded, the activations not quantized): the
    /// dequantized reference path, for parity checks. Slower, and the result differs from
    /// llama.cpp's by the 8-bit activations it leaves out.
    pub fn with_f32_activations(mut self) -> Self {
        self.expand_from = 1;
        self.output.packed = None;
        for l in &mut self.layers {
            for m in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                m.packed = None;
            }
        }
        self
    }

    /// Each `(matrix, out)`'s products with the `n` rows of `x`: on the packed tiles where
    /// the matrix has them (one pass for all of those), otherwise as `how` says.
    fn products(&self, how: Products, products: &mut [(&Placed, &mut [f32])], x: &[f32], n: usize) {
        let (packed, rest): (Vec<_>, Vec<_>) = products
            .iter_mut()
            .partition(|(p, _)| how != Products::Expanded && p.packed.is_some());
        let mut packed: Vec<(&PackedMatrix, &mut [f32])> = packed
            .into_iter()
            .filter_map(|(p, out)| Some((p.packed.as_deref()?, &mut **out)))
            .collect();
        matmul_packed(&mut packed, x, n);
        let mut rest: Vec<(QuantMatrix<'_>, &mut [f32])> = rest
            .into_iter()
            .map(|(p, out)| (self.matrix(p), &mut **out))
            .collect();
        let expand_from = match how {
            Products::Expanded => 1,
            Products::Prompt => GEMM_ROWS,
            Products::Blocks => usize::MAX,
        };
        matmul_many_from(&mut rest, x, n, expand_from);
    }

    /// How many matrices run on packed tiles (none where the CPU lacks AVX-512 VNNI, and none
    /// in f32 mode).
    pub fn packed_matrices(&self) -> usize {
        let layers = self
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
        layers
            .chain([&self.output])
            .filter(|p| p.packed.is_some())
            .count()
    }

    /// The weight formats in the file, as `format: count` (for logs and benchmarks).
    pub fn formats(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        let mut all = vec![&self.embedding];
        if !self.config.tie_word_embeddings {
            all.push(&self.output);
        }
        for l in &self.layers {
            all.extend([&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
        }
        for p in all {
            *counts.entry(format!("{:?}", p.format)).or_insert(0) += 1;
        }
        counts
            .iter()
            .map(|(f, n)| format!("{f}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn matrix(&self, p: &Placed) -> QuantMatrix<'_> {
        QuantMatrix::new(
            p.format,
            p.rows,
            p.cols,
            &self.map[p.start..p.start + p.len],
        )
        .expect("extent checked when the model was opened")
    }

    /// Runs every step's tokens through the decoder, extending each step's sequence, and
    /// returns the logits after each step's last token.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        for step in steps.iter() {
            self.check(step)?;
        }
        // The whole forward runs on a worker of the compute pool: its many small parallel
        // products are then split from inside the pool, instead of each waking a worker from
        // outside it (measured: a third of decoding time went to those handoffs).
        Ok(rayon::scope(|_| self.forward_in_pool(steps)))
    }

    /// A sequence's logits do not depend on what shares its forward: a step of a prompt's
    /// length runs alone (on packed tiles, or with its products expanded to f32), and the
    /// rest run together on 8-bit products, whose every row is computed on its own (in
    /// parts, one per thread, when there are rows enough: [`Self::forward_parts`]).
    fn forward_in_pool(&self, steps: &mut [Step<'_>]) -> Vec<Vec<f32>> {
        let mut out = vec![Vec::new(); steps.len()];
        let (mut short, mut short_at) = (Vec::new(), Vec::new());
        for (i, step) in steps.iter_mut().enumerate() {
            let step = Step {
                sequence: &mut *step.sequence,
                tokens: step.tokens,
            };
            if step.tokens.len() >= self.expand_from {
                out[i] = self
                    .forward_group(&mut [step], self.unless_f32(Products::Prompt))
                    .remove(0);
            } else {
                short.push(step);
                short_at.push(i);
            }
        }
        if !short.is_empty() {
            let logits = self.forward_parts(&mut short);
            for (i, l) in short_at.into_iter().zip(logits) {
                out[i] = l;
            }
        }
        out
    }

    /// Short steps as one forward per thread when there are enough rows for each to fill
    /// the tiled kernel's largest group of input rows ([`GROUP_ROWS`]): each part runs its
    /// layers on its own instead of all threads meeting at every product and attention,
    /// some 200 times a step. Measured on two threads, 16 sequences decoded at about 1.5 times one thread's
    /// rate as one forward, while two single-threaded processes made twice it. Each part
    /// streams every weight, which many rows' arithmetic hides. A row's bits do not depend
    /// on its part.
    fn forward_parts(&self, steps: &mut [Step<'_>]) -> Vec<Vec<f32>> {
        let rows: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let parts = (rows / GROUP_ROWS).clamp(1, rayon::current_num_threads());
        if parts == 1 {
            return self.forward_group(steps, Products::Blocks);
        }
        let mut pieces = split_by_rows(steps, rows.div_ceil(parts));
        let logits: Vec<Vec<Vec<f32>>> = pieces
            .par_iter_mut()
            .map(|piece| self.forward_group(piece, Products::Blocks))
            .collect();
        logits.into_iter().flatten().collect()
    }

    /// Refuses a step the model cannot take, before anything changes.
    fn check(&self, step: &Step<'_>) -> Result<(), ModelError> {
        let cfg = &self.config;
        if step.tokens.is_empty() {
            return Err(invalid("tokens", "0", "every step needs a token"));
        }
        let end = step.sequence.len + step.tokens.len();
        if end > cfg.max_position_embeddings {
            return Err(invalid(
                "positions",
                &end.to_string(),
                &format!("the context is {}", cfg.max_position_embeddings),
            ));
        }
        if let Some(&token) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(invalid(
                "token",
                &token.to_string(),
                &format!("the vocabulary has {}", cfg.vocab_size),
            ));
        }
        Ok(())
    }

    fn forward_group(&self, steps: &mut [Step<'_>], layers: Products) -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        for (s, step) in steps.iter().enumerate() {
            for (t, &token) in step.tokens.iter().enumerate() {
                rows.push(Row {
                    step: s,
                    position: step.sequence.len + t,
                    token,
                });
            }
        }
        let mut x = self.embed(&rows);
        for (l, layer) in self.layers.iter().enumerate() {
            self.attention_block(l, layer, &rows, steps, &mut x, layers);
            self.feed_forward_block(layer, &mut x, layers);
        }
        for step in steps.iter_mut() {
            step.sequence.len += step.tokens.len();
        }
        self.logits(&rows, &x, steps.len())
    }

    fn embed(&self, rows: &[Row]) -> Vec<f32> {
        let hidden = self.config.hidden_size;
        let table = self.matrix(&self.embedding);
        let mut x = vec![0.0f32; rows.len() * hidden];
        for (row, out) in rows.iter().zip(x.chunks_exact_mut(hidden)) {
            table.dequantize_row(row.token as usize, out);
        }
        x
    }

    fn attention_block(
        &self,
        l: usize,
        layer: &Layer,
        rows: &[Row],
        steps: &mut [Step<'_>],
        x: &mut [f32],
        how: Products,
    ) {
        let cfg = &self.config;
        let (hidden, kv, m) = (cfg.hidden_size, cfg.kv_width(), rows.len());
        let h = self.norm(x, &layer.attn_norm);
        let (mut q, mut k, mut v) = (vec![0.0; m * hidden], vec![0.0; m * kv], vec![0.0; m * kv]);
        self.products(
            how,
            &mut [
                (&layer.q, &mut q[..]),
                (&layer.k, &mut k[..]),
                (&layer.v, &mut v[..]),
            ],
            &h,
            m,
        );
        for (i, row) in rows.iter().enumerate() {
            let turns = self.turns(row.position);
            rotate(&mut q[i * hidden..(i + 1) * hidden], &turns);
            rotate(&mut k[i * kv..(i + 1) * kv], &turns);
        }
        let (kv_heads, hd) = (cfg.num_key_value_heads, cfg.head_dim());
        for (i, row) in rows.iter().enumerate() {
            let seq = &mut *steps[row.step].sequence;
            let caches = (l + 1) * kv_heads;
            if seq.keys.len() < caches {
                seq.keys.resize_with(caches, Vec::new);
                seq.values.resize_with(caches, Vec::new);
            }
            for h in 0..kv_heads {
                let at = i * kv + h * hd;
                seq.keys[l * kv_heads + h].extend_from_slice(&k[at..at + hd]);
                seq.values[l * kv_heads + h].extend_from_slice(&v[at..at + hd]);
            }
        }
        let attended = self.attend_rows(l, rows, steps, &q);
        let mut projected = vec![0.0f32; m * hidden];
        self.products(how, &mut [(&layer.o, &mut projected[..])], &attended, m);
        add(x, &projected);
    }

    /// Each row's query heads against its sequence's cached keys and values of layer `l`, up
    /// to the row's own position.
    fn attend_rows(&self, l: usize, rows: &[Row], steps: &[Step<'_>], q: &[f32]) -> Vec<f32> {
        let cfg = &self.config;
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim());
        let kv_heads = cfg.num_key_value_heads;
        let group = cfg.num_attention_heads / kv_heads;
        let mut attended = vec![0.0f32; rows.len() * hidden];
        // One task per row and key-value head: its query heads read the cache once.
        attended
            .par_chunks_mut(group * hd)
            .enumerate()
            .for_each(|(task, out)| {
                let (i, kv_head) = (task / kv_heads, task % kv_heads);
                let sequence = &steps[rows[i].step].sequence;
                let cache = l * kv_heads + kv_head;
                let (keys, values) = (&sequence.keys[cache], &sequence.values[cache]);
                let first = i * hidden + kv_head * group * hd;
                let queries = &q[first..first + group * hd];
                let len = rows[i].position + 1;
                kernels::attend(queries, hd, keys, values, len, 0, hd, out);
            });
        attended
    }

    fn feed_forward_block(&self, layer: &Layer, x: &mut [f32], how: Products) {
        let (hidden, inter) = (self.config.hidden_size, self.config.intermediate_size);
        let m = x.len() / hidden;
        let h = self.norm(x, &layer.ffn_norm);
        let (mut gate, mut up) = (vec![0.0; m * inter], vec![0.0; m * inter]);
        self.products(
            how,
            &mut [(&layer.gate, &mut gate[..]), (&layer.up, &mut up[..])],
            &h,
            m,
        );
        let mut gated = vec![0.0f32; m * inter];
        // A row per task: several rows' activations are worth splitting over the pool.
        gated
            .par_chunks_mut(inter)
            .zip(gate.par_chunks(inter).zip(up.par_chunks(inter)))
            .for_each(|(out, (gate, up))| kernels::swiglu(gate, up, out));
        let mut down = vec![0.0f32; m * hidden];
        self.products(how, &mut [(&layer.down, &mut down[..])], &gated, m);
        add(x, &down);
    }

    /// Logits after each step's last row.
    fn logits(&self, rows: &[Row], x: &[f32], steps: usize) -> Vec<Vec<f32>> {
        let hidden = self.config.hidden_size;
        let mut last = vec![0usize; steps];
        for (i, row) in rows.iter().enumerate() {
            last[row.step] = i;
        }
        let picked: Vec<f32> = last
            .iter()
            .flat_map(|&i| x[i * hidden..(i + 1) * hidden].iter().copied())
            .collect();
        let h = self.norm(&picked, &self.final_norm);
        let vocab = self.config.vocab_size;
        let mut logits = vec![0.0f32; steps * vocab];
        // 8-bit products, as llama.cpp's logits are.
        self.products(
            self.unless_f32(Products::Blocks),
            &mut [(&self.output, &mut logits[..])],
            &h,
            steps,
        );
        logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }

    /// `how`, unless every product is f32 ([`MappedModel::with_f32_activations`]).
    fn unless_f32(&self, how: Products) -> Products {
        if self.expand_from == 1 {
            Products::Expanded
        } else {
            how
        }
    }

    fn norm(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; x.len()];
        kernels::rms_norm(x, weight, self.config.rms_norm_eps as f32, &mut out);
        out
    }

    /// `(sin, cos)` of each rotated pair's angle at `position` (ggml's rope, normal mode):
    /// computed once per row for all its query and key heads.
    fn turns(&self, position: usize) -> Vec<(f32, f32)> {
        self.inverse_frequencies
            .iter()
            .map(|&f| ((position as f64 * f) as f32).sin_cos())
            .collect()
    }
}

/// Rotates adjacent pairs of each head of `x` by `turns` (one per pair of a head).
fn rotate(x: &mut [f32], turns: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(2 * turns.len()) {
        for (pair, &(sin, cos)) in head.chunks_exact_mut(2).zip(turns) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// How a product treats its input where its matrix is not packed: quantized to 8-bit blocks
/// against the weights' blocks, in f32 against weights expanded to f32 (and then never on
/// packed tiles either: the f32 reference), or as a prompt (expanded from
/// [`GEMM_ROWS`] rows on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Products {
    Blocks,
    Expanded,
    Prompt,
}

#[derive(Clone, Copy)]
struct Row {
    step: usize,
    position: usize,
    token: u32,
}

fn invalid(field: &str, value: &str, reason: &str) -> ModelError {
    ModelError::InvalidConfig {
        field: field.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Packs each block-format matrix for the tiled kernel, then gives back the mapped pages it
/// read: the packed copy replaces them (the same bytes per weight), so each weight is held
/// once, and at most a matrix per thread twice while packing.
fn pack(map: &Mmap, matrices: Vec<&mut Placed>) {
    matrices.into_par_iter().for_each(|p| {
        let bytes = &map[p.start..p.start + p.len];
        let w = QuantMatrix::new(p.format, p.rows, p.cols, bytes)
            .expect("extent checked when the model was opened");
        p.packed = PackedMatrix::pack(&w).map(Box::new);
        if p.packed.is_some() {
            // SAFETY: the map is a private, read-only mapping of a file: dropping pages only
            // means that a later read (an embedding row, the f32 path) faults them in from
            // the file again. A refusal only leaves them resident.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, p.start, p.len)
            };
        }
    });
}

/// `steps` in order, cut into consecutive pieces of at least `rows` rows each (the last may
/// have fewer).
fn split_by_rows<'s, 'a>(mut steps: &'s mut [Step<'a>], rows: usize) -> Vec<&'s mut [Step<'a>]> {
    let mut pieces = Vec::new();
    while !steps.is_empty() {
        let mut taken = 0;
        let mut end = 0;
        while end < steps.len() && taken < rows {
            taken += steps[end].tokens.len();
            end += 1;
        }
        let (piece, rest) = std::mem::take(&mut steps).split_at_mut(end);
        pieces.push(piece);
        steps = rest;
    }
    pieces
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The file's tensors by GGUF name, checked as they are taken.
struct Directory<'a> {
    header: &'a Header,
    map: &'a [u8],
    path: &'a Path,
}

impl Directory<'_> {
    fn find(&self, name: &str) -> Result<&gguf::TensorInfo, ModelError> {
        self.header
            .tensors()
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format_err(self.path, format!("tensor '{name}' is missing")))
    }

    /// A `[rows, cols]` matrix (GGUF shape `[cols, rows]`).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Placed, ModelError> {
        let t = self.find(name)?;
        let located = |reason: String| format_err(self.path, format!("tensor '{name}': {reason}"));
        if t.shape != [cols as u64, rows as u64] {
            return Err(located(format!(
                "shape {:?} (innermost first), the config needs [{cols}, {rows}]",
                t.shape
            )));
        }
        self.placed(t, rows, cols)
    }

    /// Where `t`'s `rows × cols` values lie in the map, checked against its length.
    fn placed(&self, t: &gguf::TensorInfo, rows: usize, cols: usize) -> Result<Placed, ModelError> {
        let located =
            |reason: String| format_err(self.path, format!("tensor '{}': {reason}", t.name));
        let format = Format::from_ggml(t.kind).ok_or_else(|| {
            located(format!(
                "ggml type {} is not supported for serving (F32, F16, Q4_0, Q4_1, Q8_0 are)",
                t.kind
            ))
        })?;
        let len = format
            .row_bytes(cols)
            .and_then(|r| r.checked_mul(rows))
            .ok_or_else(|| located(format!("{cols} columns do not fit {format:?} blocks")))?;
        let start = self
            .header
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|&s| s.checked_add(len).is_some_and(|end| end <= self.map.len()))
            .ok_or_else(|| located("runs past the end of the file".into()))?;
        Ok(Placed {
            format,
            rows,
            cols,
            start,
            len,
            packed: None,
        })
    }

    /// A vector (norm weights), read as f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.find(name)?;
        let located = |reason: String| format_err(self.path, format!("tensor '{name}': {reason}"));
        if t.shape != [len as u64] {
            return Err(located(format!(
                "shape {:?}, the config needs [{len}]",
                t.shape
            )));
        }
        if !matches!(Format::from_ggml(t.kind), Some(Format::F32 | Format::F16)) {
            return Err(located(format!(
                "ggml type {} is not supported for a norm (F32 and F16 are)",
                t.kind
            )));
        }
        let placed = self.placed(t, 1, len)?;
        let bytes = &self.map[placed.start..placed.start + placed.len];
        let m = QuantMatrix::new(placed.format, 1, len, bytes).map_err(located)?;
        let mut out = vec![0.0f32; len];
        m.dequantize_row(0, &mut out);
        Ok(out)
    }

    /// Refuses tensors the decoder has no place for: a model that needs one would run and
    /// give wrong logits.
    fn refuse_unknown(&self, layers: usize) -> Result<(), ModelError> {
        for t in self.header.tensors() {
            let known = gguf::hf_name(&t.name).is_some()
                && gguf::layer_of(&t.name).is_none_or(|l| l < layers);
            if !known {
                return Err(format_err(self.path, unsupported_tensor(&t.name)));
            }
        }
        Ok(())
    }
}
