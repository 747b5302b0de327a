//! One Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, optionally tied
//! embeddings) on burn, with parameters named and shaped as Hugging Face's `LlamaForCausalLM`.
//!
//! The model is a config, an ordered list of parameter tensors ([`Weights`]) and one pure
//! function ([`forward`]). The device is chosen at run time, so the same code runs on CPU
//! (`flex`) or a GPU backend, with or without autodiff.

mod config;
mod fused;
pub mod gguf;
pub mod gguf_out;
pub mod host;
pub mod kernels;
mod llama;
pub mod quant;
pub mod st;
mod tokenizer;
pub mod weights;

use std::path::Path;

pub use config::{ModelConfig, PRESETS};
pub use fused::available as fused_kernels_available;
pub use gguf::{GgufInfo, GgufModel, gguf_config, gguf_info, load_gguf};
pub use llama::{KvCache, Logits, forward, forward_cached};
pub use tokenizer::Tokenizer;
pub use weights::{HostTensor, ParamSpec, Weights, param_specs};

/// Errors that name the file, field or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown preset '{name}' (known presets: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("invalid model config: {field} = {value}: {reason}")]
    InvalidConfig {
        field: String,
        value: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Token ids as a `[1, len]` batch on `device`: the input of one sequence's forward.
pub fn token_batch(
    ids: &[u32],
    device: &burn::tensor::Device,
) -> burn::tensor::Tensor<2, burn::tensor::Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let n = ids.len();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(ids, [1, n]), device)
}

/// Reads weights from a Hugging Face safetensors file for the given config.
pub fn load_safetensors(
    cfg: &ModelConfig,
    path: &Path,
    device: &burn::tensor::Device,
) -> Result<Weights, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let named = st::deserialize(&bytes, &path.display().to_string())?;
    Weights::from_named(cfg, named, &path.display().to_string(), device)
}

/// Reads weights for `cfg` from a GGUF file or Hugging Face safetensors, by extension. The
/// file's shape must be `cfg`'s, except the context, which is a property of the run.
pub fn load_weights(
    cfg: &ModelConfig,
    path: &Path,
    device: &burn::tensor::Device,
) -> Result<Weights, ModelError> {
    if !is_gguf(path) {
        return load_safetensors(cfg, path, device);
    }
    let mut weights = load_gguf(path, device)?.weights;
    let file_cfg = ModelConfig {
        max_position_embeddings: cfg.max_position_embeddings,
        ..weights.cfg.clone()
    };
    if &file_cfg != cfg {
        return Err(ModelError::Format {
            path: path.display().to_string(),
            reason: format!("the file's model shape {file_cfg:?} is not the run's {cfg:?}"),
        });
    }
    weights.cfg = cfg.clone();
    Ok(weights)
}

/// Whether `path` names a GGUF file (by extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Serialises weights as a Hugging Face safetensors file body (HF names, `[out, in]` layout).
pub fn safetensors_bytes(weights: &Weights) -> Result<Vec<u8>, ModelError> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    st::serialize(&weights.to_host(), meta)
}
