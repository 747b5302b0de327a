//! Writing GGUF files (version 3): metadata, then the Llama tensors under llama.cpp's names
//! and layout, in F32, F16, Q8_0, Q4_0 or Q4_1.

use crate::gguf::{gguf_name, permute_rope_rows};
use crate::quant::{self, Format};
use crate::{HostTensor, ModelConfig, ModelError};

/// Data sections and each tensor start on this many bytes (GGUF's default alignment).
const ALIGNMENT: usize = 32;

/// A metadata value GGUF can hold (the kinds a Llama model's file uses).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

struct Tensor {
    name: String,
    /// Innermost dimension first, as GGUF lists them.
    dims: Vec<u64>,
    format: Format,
    data: Vec<u8>,
}

/// A GGUF file being put together.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<Tensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// A tensor of `values` (`[rows, cols]` row-major, or a vector when `rows` is 1) stored
    /// in `format`.
    pub fn tensor(&mut self, name: &str, rows: usize, cols: usize, format: Format, values: &[f32]) {
        let dims = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims,
            format,
            data: quant::quantize(format, values),
        });
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            string(&mut out, key);
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.format.ggml_type().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).next_multiple_of(ALIGNMENT);
        }
        for t in &self.tensors {
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
            out.extend(&t.data);
        }
        out
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF value type ids (gguf.h `enum gguf_type`).
fn write_value(out: &mut Vec<u8>, value: &MetaValue) {
    let array = |out: &mut Vec<u8>, item: u32, len: usize| {
        out.extend(9u32.to_le_bytes());
        out.extend(item.to_le_bytes());
        out.extend((len as u64).to_le_bytes());
    };
    match value {
        MetaValue::U32(v) => {
            out.extend(4u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        MetaValue::I32(v) => {
            out.extend(5u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        MetaValue::F32(v) => {
            out.extend(6u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        MetaValue::Bool(v) => {
            out.extend(7u32.to_le_bytes());
            out.push(*v as u8);
        }
        MetaValue::Str(s) => {
            out.extend(8u32.to_le_bytes());
            string(out, s);
        }
        MetaValue::Strings(items) => {
            array(out, 8, items.len());
            items.iter().for_each(|s| string(out, s));
        }
        MetaValue::I32s(items) => {
            array(out, 5, items.len());
            items.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
        MetaValue::F32s(items) => {
            array(out, 6, items.len());
            items.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
    }
}

/// A Llama model's shape and weights (Hugging Face names and layout, as [`Weights::to_host`]
/// gives them) as llama.cpp's GGUF: `llama.*` metadata, GGUF tensor names, query and key rows
/// permuted for ggml's rotary layout (as convert_hf_to_gguf.py does), matrices in `format`
/// and norms in F32. `name` becomes `general.name`.
///
/// [`Weights::to_host`]: crate::Weights::to_host
pub fn llama_writer(
    cfg: &ModelConfig,
    tensors: &[HostTensor],
    format: Format,
    name: &str,
) -> Result<GgufWriter, ModelError> {
    let mut w = GgufWriter::new();
    llama_metadata(&mut w, cfg, format, name)?;
    for t in tensors {
        llama_tensor(&mut w, cfg, t, format)?;
    }
    Ok(w)
}

/// `general.*` and the model's shape as `llama.*`.
fn llama_metadata(
    w: &mut GgufWriter,
    cfg: &ModelConfig,
    format: Format,
    name: &str,
) -> Result<(), ModelError> {
    let u32_of = |v: usize, field: &str| {
        u32::try_from(v).map_err(|_| ModelError::InvalidConfig {
            field: field.into(),
            value: v.to_string(),
            reason: "does not fit GGUF's u32".into(),
        })
    };
    w.meta("general.architecture", MetaValue::Str("llama".into()));
    w.meta("general.name", MetaValue::Str(name.into()));
    w.meta("general.alignment", MetaValue::U32(ALIGNMENT as u32));
    w.meta("general.file_type", MetaValue::U32(file_type(format)));
    for (key, value, field) in [
        (
            "llama.context_length",
            cfg.max_position_embeddings,
            "max_position_embeddings",
        ),
        ("llama.embedding_length", cfg.hidden_size, "hidden_size"),
        (
            "llama.feed_forward_length",
            cfg.intermediate_size,
            "intermediate_size",
        ),
        (
            "llama.block_count",
            cfg.num_hidden_layers,
            "num_hidden_layers",
        ),
        (
            "llama.attention.head_count",
            cfg.num_attention_heads,
            "num_attention_heads",
        ),
        (
            "llama.attention.head_count_kv",
            cfg.num_key_value_heads,
            "num_key_value_heads",
        ),
        ("llama.rope.dimension_count", cfg.head_dim(), "head_dim"),
        ("llama.vocab_size", cfg.vocab_size, "vocab_size"),
    ] {
        w.meta(key, MetaValue::U32(u32_of(value, field)?));
    }
    w.meta(
        "llama.rope.freq_base",
        MetaValue::F32(cfg.rope_theta as f32),
    );
    w.meta(
        "llama.attention.layer_norm_rms_epsilon",
        MetaValue::F32(cfg.rms_norm_eps as f32),
    );
    Ok(())
}

/// One Hugging Face tensor under its GGUF name and layout: matrices in `format`, vectors F32.
fn llama_tensor(
    w: &mut GgufWriter,
    cfg: &ModelConfig,
    t: &HostTensor,
    format: Format,
) -> Result<(), ModelError> {
    let gguf = gguf_name(&t.name).ok_or_else(|| ModelError::InvalidConfig {
        field: "tensor".into(),
        value: t.name.clone(),
        reason: "has no GGUF name".into(),
    })?;
    let (rows, cols) = match t.shape[..] {
        [n] => (1, n),
        [r, c] => (r, c),
        _ => {
            return Err(ModelError::InvalidConfig {
                field: t.name.clone(),
                value: format!("{:?}", t.shape),
                reason: "is not a vector or a matrix".into(),
            });
        }
    };
    let data = if gguf.ends_with("attn_q.weight") {
        permute_rope_rows(&t.data, cfg.num_attention_heads, cols)
    } else if gguf.ends_with("attn_k.weight") {
        permute_rope_rows(&t.data, cfg.num_key_value_heads, cols)
    } else {
        t.data.clone()
    };
    let stored = if rows == 1 { Format::F32 } else { format };
    w.tensor(&gguf, rows, cols, stored, &data);
    Ok(())
}

/// `general.file_type` (llama.h `enum llama_ftype`): what most of the tensors are.
fn file_type(format: Format) -> u32 {
    match format {
        Format::F32 => 0,
        Format::F16 => 1,
        Format::Q4_0 => 2,
        Format::Q4_1 => 3,
        Format::Q8_0 => 7,
    }
}
