//! Loading llama.cpp's GGUF files: the config from the metadata, the tensors dequantized to
//! f32 and renamed to Hugging Face's names and layout.
//!
//! The container (header, metadata, tensor directory) is parsed here rather than by the
//! `gguf-rs` crate: that crate turns on serde_json's `arbitrary_precision` for the whole build,
//! which breaks deserializing numbers inside tagged enums elsewhere (the cluster's control
//! messages). The format is small; every read is bounds-checked and names what is wrong.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use memmap2::Mmap;

use crate::quant::{Format, QuantMatrix};
use crate::{HostTensor, ModelConfig, ModelError, Weights};

/// ggml's id for BF16 (ggml.h `enum ggml_type`), which this loader reads and the serving
/// kernels do not; the other types are `quant::Format`'s.
const GGML_BF16: u32 = 30;

/// What a GGUF file says besides the weights.
#[derive(Clone, Debug, Default)]
pub struct GgufInfo {
    /// `general.name`.
    pub name: Option<String>,
    /// `tokenizer.chat_template` (Jinja), for instruct models.
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether a prompt starts with the BOS token (llama.cpp
    /// adds it when this is true).
    pub add_bos_token: bool,
}

/// A loaded GGUF model.
pub struct GgufModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub info: GgufInfo,
}

pub(crate) fn format_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A metadata value; arrays are skipped (only their length is kept): the loader needs none.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(u64),
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::UInt(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct TensorInfo {
    pub(crate) name: String,
    /// Innermost dimension first, as GGUF stores them.
    pub(crate) shape: Vec<u64>,
    pub(crate) kind: u32,
    /// From the start of the data section.
    pub(crate) offset: u64,
}

/// Metadata and tensor directory of a GGUF file.
#[derive(Debug)]
pub(crate) struct Header {
    metadata: std::collections::BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    /// File offset of the data section.
    pub(crate) data_offset: u64,
}

impl Header {
    fn metadata(&self) -> &std::collections::BTreeMap<String, Value> {
        &self.metadata
    }
    pub(crate) fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| format!("header truncated at byte {} (wanted {n} more)", self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N as u64)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| format!("string at byte {} is not UTF-8", self.pos))
    }
    fn value(&mut self, kind: u32, depth: u32) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::UInt(self.array::<1>()?[0] as u64),
            1 => Value::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(self.array()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::UInt(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth == 0 => {
                let item = self.u32()?;
                let len = self.u64()?;
                for _ in 0..len {
                    self.value(item, depth + 1)?;
                }
                Value::Array(len)
            }
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(format!(
                    "unknown metadata value type {other} at byte {}",
                    self.pos
                ));
            }
        })
    }
}

/// GGUF's magic, "GGUF" read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;

pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    let mut r = Reader { bytes, pos: 0 };
    if r.u32()? != MAGIC {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    let mut metadata = std::collections::BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let kind = r.u32()?;
        let value = r.value(kind, 0)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let dims = r.u32()?;
        if dims > 4 {
            return Err(format!("tensor '{name}' has {dims} dimensions (at most 4)"));
        }
        let shape = (0..dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        let kind = r.u32()?;
        let offset = r.u64()?;
        tensors.push(TensorInfo {
            name,
            shape,
            kind,
            offset,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(32)
        .max(1);
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header {
        metadata,
        tensors,
        data_offset,
    })
}

/// Values per block and bytes per block of each supported ggml type (ggml's `type_traits`).
fn block_layout(kind: u32) -> Result<(u64, u64), String> {
    if kind == GGML_BF16 {
        return Ok((1, 2));
    }
    let format = Format::from_ggml(kind).ok_or_else(|| {
        format!("ggml type {kind} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")
    })?;
    let (values, bytes) = format.block();
    Ok((values as u64, bytes as u64))
}

/// Bytes a tensor of `numel` values of ggml type `kind` occupies.
pub(crate) fn tensor_bytes(kind: u32, numel: u64) -> Result<u64, String> {
    let (values, bytes) = block_layout(kind)?;
    if !numel.is_multiple_of(values) {
        return Err(format!(
            "{numel} values is not a whole number of {values}-value blocks"
        ));
    }
    (numel / values)
        .checked_mul(bytes)
        .ok_or_else(|| format!("{numel} values overflow a 64-bit size"))
}

/// Maps the GGUF file at `path` and parses its header: only the pages read are loaded.
pub(crate) fn map_file(path: &Path) -> Result<(Mmap, Header), ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only. A file changed under it changes what is read, as it
    // would for llama.cpp, which maps its models the same way; the header is checked like
    // any other bytes, and every extent read against the map's length.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let header = parse_header(&map).map_err(|reason| format_err(path, reason))?;
    Ok((map, header))
}

pub(crate) fn config_of(header: &Header, path: &Path) -> Result<ModelConfig, ModelError> {
    let tensor = |name: &str| header.tensors().iter().find(|t| t.name == name);
    // Older converters omit llama.vocab_size; the embedding's outer dimension is the vocabulary.
    let embedding_rows = tensor("token_embd.weight")
        .and_then(|t| t.shape.get(1))
        .map(|&v| v as usize);
    let tied = tensor("output.weight").is_none();
    config_from_metadata(header.metadata(), embedding_rows, tied, path)
}

/// The model shape a GGUF file describes, without reading its tensors.
pub fn gguf_config(path: &Path) -> Result<ModelConfig, ModelError> {
    config_of(&map_file(path)?.1, path)
}

/// What a GGUF file says besides its weights (chat template, special tokens), without
/// reading its tensors.
pub fn gguf_info(path: &Path) -> Result<GgufInfo, ModelError> {
    Ok(info_of(&map_file(path)?.1))
}

/// Reads a Llama-architecture GGUF file onto `device` as f32 weights.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel, ModelError> {
    let (map, header) = map_file(path)?;
    load_parsed(&map, &header, path, device)
}

/// Why a GGUF tensor this decoder has no place for is refused, rather than skipped: a model
/// that needs it would load and give wrong logits.
pub(crate) fn unsupported_tensor(name: &str) -> String {
    let what = if name.ends_with(".bias") {
        "biases (attention_bias / mlp_bias) are not implemented"
    } else if name == "rope_freqs.weight" {
        "per-dimension rope frequency factors (Llama 3 rope scaling) are not implemented"
    } else {
        "it is not part of the Llama decoder this build implements"
    };
    format!("tensor '{name}' is not supported: {what}")
}

fn load_parsed(
    bytes: &[u8],
    header: &Header,
    path: &Path,
    device: &Device,
) -> Result<GgufModel, ModelError> {
    let config = config_of(header, path)?;
    let specs: HashMap<String, Vec<usize>> = crate::param_specs(&config)
        .into_iter()
        .map(|s| (s.name, s.hf_shape))
        .collect();
    let data_start = header.data_offset;
    let mut named = HashMap::new();
    for t in header.tensors() {
        let hf_name =
            hf_name(&t.name).ok_or_else(|| format_err(path, unsupported_tensor(&t.name)))?;
        let located = |reason: String| format_err(path, format!("tensor '{}': {reason}", t.name));
        // GGUF lists dimensions innermost first; Hugging Face outermost first. The shape is
        // checked before anything is read or allocated for it.
        let shape: Vec<usize> = t.shape.iter().rev().map(|&d| d as usize).collect();
        match specs.get(&hf_name) {
            Some(want) if *want == shape => {}
            Some(want) => {
                return Err(located(format!(
                    "shape {:?} (outermost first), the config needs {want:?}",
                    shape
                )));
            }
            None => {
                return Err(located(format!(
                    "no such tensor in a {}-layer model",
                    config.num_hidden_layers
                )));
            }
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| located(format!("shape {:?} overflows", t.shape)))?;
        let size = tensor_bytes(t.kind, numel).map_err(located)?;
        let raw = data_start
            .checked_add(t.offset)
            .and_then(|start| Some(start..start.checked_add(size)?))
            .and_then(|range| bytes.get(range.start as usize..range.end as usize))
            .ok_or_else(|| located("runs past the end of the file".into()))?;
        let mut data = dequantize(t.kind, raw, numel as usize).map_err(located)?;
        // convert_hf_to_gguf.py permutes q/k rows for ggml's interleaved rope; the decoder
        // uses the half-split convention, so the permutation is undone here.
        if hf_name.ends_with("q_proj.weight") {
            data = unpermute_rope_rows(&data, config.num_attention_heads, shape[1]);
        } else if hf_name.ends_with("k_proj.weight") {
            data = unpermute_rope_rows(&data, config.num_key_value_heads, shape[1]);
        }
        named.insert(
            hf_name.clone(),
            HostTensor {
                name: hf_name,
                shape,
                data,
            },
        );
    }
    let weights = Weights::from_named(&config, named, &path.display().to_string(), device)?;
    Ok(GgufModel {
        config,
        weights,
        info: info_of(header),
    })
}

/// What the metadata says besides the model's shape.
pub(crate) fn info_of(header: &Header) -> GgufInfo {
    let meta = header.metadata();
    let string = |k: &str| meta.get(k).and_then(Value::as_str).map(str::to_string);
    let id = |k: &str| meta.get(k).and_then(Value::as_u64).map(|v| v as u32);
    GgufInfo {
        name: string("general.name"),
        chat_template: string("tokenizer.chat_template"),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        add_bos_token: add_bos_token(meta),
    }
}

/// `tokenizer.ggml.add_bos_token`, or llama.cpp's default when absent: true for a
/// SentencePiece (`llama`) vocabulary, false for the others.
fn add_bos_token(meta: &std::collections::BTreeMap<String, Value>) -> bool {
    match meta.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => meta.get("tokenizer.ggml.model").and_then(Value::as_str) == Some("llama"),
    }
}

/// Metadata of model features the decoder does not implement: refused by name, not ignored.
fn refuse_unimplemented(meta: &std::collections::BTreeMap<String, Value>) -> Result<(), String> {
    let scaling = meta.get("llama.rope.scaling.type").and_then(Value::as_str);
    if scaling.is_some_and(|t| t != "none") {
        return Err(format!(
            "llama.rope.scaling.type = '{}': rope scaling is not implemented",
            scaling.unwrap_or_default()
        ));
    }
    let factor = meta
        .get("llama.rope.scaling.factor")
        .and_then(Value::as_f64);
    if scaling.is_none() && factor.is_some_and(|f| f != 0.0 && f != 1.0) {
        return Err(format!(
            "llama.rope.scaling.factor = {}: rope scaling is not implemented",
            factor.unwrap_or_default()
        ));
    }
    if let Some(n) = meta.get("llama.expert_count").and_then(Value::as_u64)
        && n > 0
    {
        return Err(format!(
            "llama.expert_count = {n}: mixture-of-experts layers are not implemented"
        ));
    }
    Ok(())
}

/// The model shape from `general.architecture` and the `<arch>.*` keys.
fn config_from_metadata(
    meta: &std::collections::BTreeMap<String, Value>,
    embedding_rows: Option<usize>,
    tie_word_embeddings: bool,
    path: &Path,
) -> Result<ModelConfig, ModelError> {
    let arch = meta
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| format_err(path, "metadata has no general.architecture"))?;
    if arch != "llama" {
        return Err(format_err(
            path,
            format!("general.architecture = '{arch}': only 'llama' models are supported"),
        ));
    }
    let uint = |key: &str| -> Result<usize, ModelError> {
        meta.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                format_err(
                    path,
                    format!("metadata key {key} is missing or not an integer"),
                )
            })
    };
    let float = |key: &str, default: f64| meta.get(key).and_then(Value::as_f64).unwrap_or(default);
    refuse_unimplemented(meta).map_err(|reason| format_err(path, reason))?;
    let heads = uint("llama.attention.head_count")?;
    let hidden = uint("llama.embedding_length")?;
    if let Ok(rope_dims) = uint("llama.rope.dimension_count")
        && rope_dims.checked_mul(heads) != Some(hidden)
    {
        return Err(format_err(
            path,
            format!(
                "llama.rope.dimension_count = {rope_dims}: partial rotary embeddings are not supported"
            ),
        ));
    }
    for key in ["llama.attention.key_length", "llama.attention.value_length"] {
        if let Ok(width) = uint(key)
            && width.checked_mul(heads) != Some(hidden)
        {
            return Err(format_err(
                path,
                format!(
                    "{key} = {width}: head widths decoupled from the embedding are not implemented"
                ),
            ));
        }
    }
    let cfg = ModelConfig {
        vocab_size: match embedding_rows {
            Some(rows) => rows,
            None => uint("llama.vocab_size")?,
        },
        hidden_size: hidden,
        intermediate_size: uint("llama.feed_forward_length")?,
        num_hidden_layers: uint("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: uint("llama.attention.head_count_kv").unwrap_or(heads),
        max_position_embeddings: uint("llama.context_length")?,
        rope_theta: float("llama.rope.freq_base", 10_000.0),
        // Stored as f32 in the file (9.99999975e-6 for 1e-5); the f32 value is what ggml uses.
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        tie_word_embeddings,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Whole-model tensors: llama.cpp's name, Hugging Face's.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Each layer's tensors, under `blk.N.` and `model.layers.N.`: llama.cpp's name, Hugging
/// Face's.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// llama.cpp tensor names to Hugging Face's.
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    translate(gguf, "blk.", "model.layers.", |(g, h)| (g, h))
}

/// Hugging Face tensor names to llama.cpp's.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    translate(hf, "model.layers.", "blk.", |(g, h)| (h, g))
}

/// `name` under the other convention: `pick` orders a table pair as (from, to).
fn translate(
    name: &str,
    layer_from: &str,
    layer_to: &str,
    pick: impl Fn((&'static str, &'static str)) -> (&'static str, &'static str),
) -> Option<String> {
    if let Some((_, to)) = MODEL_TENSORS
        .into_iter()
        .map(&pick)
        .find(|(f, _)| *f == name)
    {
        return Some(to.to_string());
    }
    let (layer, part) = name.strip_prefix(layer_from)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to) = LAYER_TENSORS
        .into_iter()
        .map(&pick)
        .find(|(f, _)| *f == part)?;
    Some(format!("{layer_to}{layer}.{to}"))
}

/// The layer a llama.cpp tensor name belongs to (`blk.N.…`).
pub(crate) fn layer_of(gguf: &str) -> Option<usize> {
    gguf.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// Dequantizes `numel` values of ggml type `kind` from `raw`, exactly as ggml's
/// `dequantize_row_*` does (in f32, `d·q` or `d·q + m`).
pub fn dequantize(kind: u32, raw: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let need = tensor_bytes(kind, numel as u64)? as usize;
    if raw.len() < need {
        return Err(format!(
            "{} bytes of data, the shape needs {need}",
            raw.len()
        ));
    }
    let raw = &raw[..need];
    if kind == GGML_BF16 {
        return Ok(raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect());
    }
    let format = Format::from_ggml(kind).expect("block_layout accepted it");
    // The whole tensor as one row: rows are contiguous and blocks never straddle them.
    let matrix = QuantMatrix::new(format, 1, numel, raw)?;
    let mut out = vec![0.0; numel];
    matrix.dequantize_row(0, &mut out);
    Ok(out)
}

/// Inverts convert_hf_to_gguf.py's `permute`: within each head, GGUF row `2i + j` is Hugging
/// Face row `j·(head_dim/2) + i`.
fn unpermute_rope_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    move_rope_rows(data, heads, cols, |gguf, hf| (gguf, hf))
}

/// convert_hf_to_gguf.py's `permute`, which [`unpermute_rope_rows`] undoes.
pub(crate) fn permute_rope_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    move_rope_rows(data, heads, cols, |gguf, hf| (hf, gguf))
}

/// Copies each row of `data` to its place in the other layout: `route(gguf_row, hf_row)`
/// names (from, to).
fn move_rope_rows(
    data: &[f32],
    heads: usize,
    cols: usize,
    route: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let head_dim = data.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (src, dst) = route(h * head_dim + 2 * i + j, h * head_dim + j * half + i);
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_1_block_is_nibble_times_scale_plus_min() {
        let mut block = Vec::new();
        block.extend(f16(0.5));
        block.extend(f16(-1.0));
        // Byte i holds value i in its low nibble and 15 - i in its high one.
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(Format::Q4_1.ggml_type(), &block, 32).unwrap();
        for i in 0..16 {
            assert_eq!(v[i], i as f32 * 0.5 - 1.0);
            assert_eq!(v[16 + i], (15 - i) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q4_0_blocks() {
        let mut q8 = Vec::new();
        q8.extend(f16(0.25));
        q8.extend((0..32i8).map(|i| (i - 16) as u8));
        let v = dequantize(Format::Q8_0.ggml_type(), &q8, 32).unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 15.0 * 0.25);

        let mut q4 = Vec::new();
        q4.extend(f16(2.0));
        q4.extend([0x8Fu8; 16]);
        let v = dequantize(Format::Q4_0.ggml_type(), &q4, 32).unwrap();
        assert_eq!(v[0], (15 - 8) as f32 * 2.0);
        assert_eq!(v[16], 0.0);
    }

    #[test]
    fn short_data_and_unknown_types_are_errors() {
        assert!(
            dequantize(Format::Q4_1.ggml_type(), &[0; 19], 32)
                .unwrap_err()
                .contains("needs 20")
        );
        assert!(
            dequantize(Format::Q8_0.ggml_type(), &[0; 34], 33)
                .unwrap_err()
                .contains("whole number")
        );
        assert!(
            dequantize(12, &[0; 400], 256)
                .unwrap_err()
                .contains("ggml type 12")
        );
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // convert_hf_to_gguf.py: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (2, 6, 3);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * (hd / 2) + i;
                    let dst = h * hd + i * 2 + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rope_rows(&gguf, heads, cols), hf);
        assert_eq!(permute_rope_rows(&hf, heads, cols), gguf);
    }

    #[test]
    fn tensor_names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
        for name in [
            "token_embd.weight",
            "blk.7.ffn_up.weight",
            "blk.0.attn_k.weight",
        ] {
            assert_eq!(gguf_name(&hf_name(name).unwrap()).as_deref(), Some(name));
        }
    }
}

#[cfg(test)]
mod header_tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    enum Meta {
        Str(&'static str),
        U32(u32),
        F32(f32),
        Bool(bool),
    }

    /// The metadata of a one-layer llama: width 8, two heads of 4, vocabulary 16.
    fn tiny_meta() -> Vec<(&'static str, Meta)> {
        vec![
            ("general.architecture", Meta::Str("llama")),
            ("llama.block_count", Meta::U32(1)),
            ("llama.context_length", Meta::U32(32)),
            ("llama.embedding_length", Meta::U32(8)),
            ("llama.feed_forward_length", Meta::U32(16)),
            ("llama.attention.head_count", Meta::U32(2)),
            ("llama.rope.freq_base", Meta::F32(10000.0)),
        ]
    }

    /// The tensors of [`tiny_meta`]'s model, dimensions innermost first as GGUF lists them.
    fn tiny_tensors() -> Vec<(&'static str, Vec<u64>)> {
        let mut t = vec![
            ("token_embd.weight", vec![8, 16]),
            ("output_norm.weight", vec![8]),
        ];
        for (name, shape) in [
            ("attn_norm", vec![8]),
            ("attn_q", vec![8, 8]),
            ("attn_k", vec![8, 8]),
            ("attn_v", vec![8, 8]),
            ("attn_output", vec![8, 8]),
            ("ffn_norm", vec![8]),
            ("ffn_gate", vec![8, 16]),
            ("ffn_up", vec![8, 16]),
            ("ffn_down", vec![16, 8]),
        ] {
            let name: &'static str = Box::leak(format!("blk.0.{name}.weight").into_boxed_str());
            t.push((name, shape));
        }
        t
    }

    /// A whole GGUF file of F32 tensors (each sized by its listed shape, saturating).
    fn gguf_file(meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(MAGIC.to_le_bytes());
        f.extend(3u32.to_le_bytes());
        f.extend((tensors.len() as u64).to_le_bytes());
        f.extend((meta.len() as u64).to_le_bytes());
        for (key, value) in meta {
            string(&mut f, key);
            match value {
                Meta::Str(v) => {
                    f.extend(8u32.to_le_bytes());
                    string(&mut f, v);
                }
                Meta::U32(v) => {
                    f.extend(4u32.to_le_bytes());
                    f.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    f.extend(6u32.to_le_bytes());
                    f.extend(v.to_le_bytes());
                }
                Meta::Bool(v) => {
                    f.extend(7u32.to_le_bytes());
                    f.push(u8::from(*v));
                }
            }
        }
        let mut offset = 0u64;
        let sizes: Vec<u64> = tensors
            .iter()
            .map(|(_, shape)| {
                shape
                    .iter()
                    .fold(4u64, |n, &d| n.saturating_mul(d))
                    .min(1 << 20)
            })
            .collect();
        for ((name, shape), size) in tensors.iter().zip(&sizes) {
            string(&mut f, name);
            f.extend((shape.len() as u32).to_le_bytes());
            for d in shape {
                f.extend(d.to_le_bytes());
            }
            f.extend(Format::F32.ggml_type().to_le_bytes());
            f.extend(offset.to_le_bytes());
            offset += size.div_ceil(32) * 32;
        }
        f.resize(f.len().div_ceil(32) * 32, 0);
        for size in sizes {
            let values = (0..size / 4).flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes());
            f.extend(values);
            f.resize(f.len().div_ceil(32) * 32, 0);
        }
        f
    }

    fn load(file: &[u8]) -> Result<GgufModel, String> {
        let path = Path::new("crafted.gguf");
        let header = parse_header(file)?;
        load_parsed(file, &header, path, &Device::flex()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_well_formed_tiny_model_loads() {
        let m = load(&gguf_file(&tiny_meta(), &tiny_tensors())).unwrap();
        assert_eq!((m.config.vocab_size, m.config.head_dim()), (16, 4));
        assert!(m.config.tie_word_embeddings);
        assert!(
            !m.info.add_bos_token,
            "no vocabulary type: llama.cpp's default is no BOS"
        );
    }

    #[test]
    fn crafted_tensor_shapes_are_errors_not_panics() {
        let cases: [(&str, Vec<u64>, &str); 5] = [
            ("blk.0.attn_q.weight", vec![64], "the config needs [8, 8]"),
            ("blk.0.attn_k.weight", vec![0, 8], "the config needs [8, 8]"),
            (
                "blk.0.attn_k.weight",
                vec![8, 8, 1],
                "the config needs [8, 8]",
            ),
            (
                "blk.0.ffn_up.weight",
                vec![u64::MAX, 2],
                "the config needs [16, 8]",
            ),
            ("blk.0.ffn_up.weight", vec![8], "the config needs [16, 8]"),
        ];
        for (name, shape, why) in cases {
            let mut tensors = tiny_tensors();
            tensors.iter_mut().find(|t| t.0 == name).unwrap().1 = shape.clone();
            let err = load(&gguf_file(&tiny_meta(), &tensors)).err().unwrap();
            assert!(
                err.contains(name) && err.contains(why),
                "{name} {shape:?}: {err}"
            );
        }
        // A vocabulary so large the embedding's byte size would overflow: refused as a
        // config no machine holds, before any size is computed.
        let mut tensors = tiny_tensors();
        tensors[0].1 = vec![8, 1 << 62];
        let err = load(&gguf_file(&tiny_meta(), &tensors)).err().unwrap();
        assert!(
            err.contains("vocab_size") && err.contains("at most"),
            "{err}"
        );
    }

    #[test]
    fn unimplemented_model_features_are_refused_by_name() {
        let extra = |name: &'static str, shape: Vec<u64>| {
            let mut t = tiny_tensors();
            t.push((name, shape));
            load(&gguf_file(&tiny_meta(), &t)).err().unwrap()
        };
        let err = extra("blk.0.attn_q.bias", vec![8]);
        assert!(
            err.contains("blk.0.attn_q.bias") && err.contains("biases"),
            "{err}"
        );
        let err = extra("rope_freqs.weight", vec![2]);
        assert!(err.contains("rope frequency factors"), "{err}");
        let err = extra("blk.1.attn_q.weight", vec![8, 8]);
        assert!(err.contains("1-layer"), "{err}");

        let with = |key: &'static str, value: Meta| {
            let mut m = tiny_meta();
            m.push((key, value));
            load(&gguf_file(&m, &tiny_tensors())).err().unwrap()
        };
        let err = with("llama.rope.scaling.type", Meta::Str("yarn"));
        assert!(err.contains("rope scaling"), "{err}");
        let err = with("llama.rope.scaling.factor", Meta::F32(4.0));
        assert!(err.contains("rope scaling"), "{err}");
        let err = with("llama.expert_count", Meta::U32(8));
        assert!(err.contains("mixture-of-experts"), "{err}");
        let err = with("llama.attention.key_length", Meta::U32(8));
        assert!(err.contains("key_length"), "{err}");
        // A layer count no machine holds is refused before anything is planned for it.
        let err = with("llama.block_count", Meta::U32(4_000_000_000));
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn bos_follows_the_file_and_llama_cpp_defaults() {
        let bos = |extra: Vec<(&'static str, Meta)>| {
            let mut m = tiny_meta();
            m.extend(extra);
            load(&gguf_file(&m, &tiny_tensors()))
                .unwrap()
                .info
                .add_bos_token
        };
        assert!(bos(vec![(
            "tokenizer.ggml.add_bos_token",
            Meta::Bool(true)
        )]));
        assert!(!bos(vec![(
            "tokenizer.ggml.add_bos_token",
            Meta::Bool(false)
        )]));
        assert!(bos(vec![("tokenizer.ggml.model", Meta::Str("llama"))]));
        assert!(!bos(vec![("tokenizer.ggml.model", Meta::Str("gpt2"))]));
    }

    /// Parses `file` and, when its header parses, loads it: any error is fine, a panic is not.
    fn parse_and_load(file: &[u8]) {
        if let Ok(header) = parse_header(file) {
            let _ = load_parsed(file, &header, Path::new("fuzz.gguf"), &Device::flex());
        }
        // The serving decoder maps the same bytes: it must refuse them or run on them.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.gguf");
        std::fs::write(&path, file).unwrap();
        if let Ok(model) = crate::host::MappedModel::open(&path) {
            let mut seq = crate::host::Sequence::new();
            let step = crate::host::Step {
                sequence: &mut seq,
                tokens: &[0, 1],
            };
            let _ = model.forward(&mut [step]);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn fuzz_any_bytes_are_parsed_or_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            parse_and_load(&bytes);
            // Past the magic and the version, into the counts and the metadata.
            let mut f = MAGIC.to_le_bytes().to_vec();
            f.extend(3u32.to_le_bytes());
            f.extend(&bytes);
            parse_and_load(&f);
        }

        #[test]
        fn fuzz_a_mutated_model_loads_or_is_refused(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..6,
            ),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut f = gguf_file(&tiny_meta(), &tiny_tensors());
            for (at, byte) in edits {
                let i = at.index(f.len());
                f[i] = byte;
            }
            parse_and_load(&f);
            parse_and_load(&f[..cut.index(f.len())]);
        }
    }

    #[test]
    fn header_is_parsed_and_truncation_is_an_error() {
        let mut f = Vec::new();
        f.extend(MAGIC.to_le_bytes());
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes()); // tensors
        f.extend(3u64.to_le_bytes()); // metadata entries
        string(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        string(&mut f, "llama");
        string(&mut f, "llama.rope.freq_base");
        f.extend(6u32.to_le_bytes());
        f.extend(100000.0f32.to_le_bytes());
        string(&mut f, "tokenizer.ggml.tokens");
        f.extend(9u32.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        string(&mut f, "a");
        string(&mut f, "b");
        string(&mut f, "blk.0.attn_q.weight");
        f.extend(2u32.to_le_bytes());
        f.extend(64u64.to_le_bytes());
        f.extend(8u64.to_le_bytes());
        f.extend(Format::Q4_1.ggml_type().to_le_bytes());
        f.extend(0u64.to_le_bytes());
        let h = parse_header(&f).unwrap();
        assert_eq!(h.metadata()["general.architecture"].as_str(), Some("llama"));
        assert_eq!(
            h.metadata()["llama.rope.freq_base"].as_f64(),
            Some(100000.0)
        );
        assert_eq!(h.metadata()["tokenizer.ggml.tokens"], Value::Array(2));
        assert_eq!(h.tensors()[0].shape, vec![64, 8]);
        assert_eq!(h.data_offset % 32, 0);
        assert!(h.data_offset >= f.len() as u64);
        assert_eq!(tensor_bytes(Format::Q4_1.ggml_type(), 512), Ok(320));
        for cut in [3, 10, 30, f.len() - 1] {
            assert!(
                parse_header(&f[..cut]).unwrap_err().contains("truncated"),
                "cut {cut}"
            );
        }
        f[0] = b'X';
        assert!(parse_header(&f).unwrap_err().contains("bad magic"));
    }
}
