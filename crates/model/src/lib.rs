//! One Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, optionally tied
//! embeddings) on burn, with parameters named and shaped as Hugging Face's `LlamaForCausalLM`.
//!
//! The model is a config, an ordered list of parameter tensors ([`Weights`]) and one pure
//! function ([`forward`]). The device is chosen at run time, so the same code runs on CPU
//! (`flex`) or a GPU backend, with or without autodiff.

mod config;
pub mod gguf;
mod llama;
pub mod st;
mod tokenizer;
pub mod weights;

use std::path::Path;

pub use config::{ModelConfig, PRESETS};
pub use gguf::{GgufInfo, GgufModel, load_gguf};
pub use llama::{KvCache, Logits, forward, forward_cached, rope_tables};
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

/// Serialises weights as a Hugging Face safetensors file body (HF names, `[out, in]` layout).
pub fn safetensors_bytes(weights: &Weights) -> Result<Vec<u8>, ModelError> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    st::serialize(&weights.to_host(), meta)
}
