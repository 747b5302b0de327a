//! Model shape: the fields and names of a Hugging Face Llama `config.json`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::ModelError;

/// Shape of a Llama-family decoder. Field names are those of Hugging Face's `LlamaConfig`,
/// so a `config.json` from the Hub deserialises into it and ours loads in `transformers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Longest sequence the model is trained or asked to run on (the context).
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

/// The subset of a Hugging Face `config.json` we read. Keys naming a feature the decoder does
/// not implement are read to refuse them (see [`HfConfigJson::unimplemented`]); the rest is
/// ignored.
#[derive(Deserialize)]
struct HfConfigJson {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    head_dim: Option<usize>,
    model_type: Option<String>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    rope_scaling: Option<serde_json::Value>,
}

impl HfConfigJson {
    /// The first feature this config asks for that the Llama decoder does not implement: a
    /// model loaded without it would give wrong logits.
    fn unimplemented(&self) -> Option<String> {
        let what = if self.model_type.as_deref().is_some_and(|t| t != "llama") {
            format!(
                "model_type '{}'",
                self.model_type.as_deref().unwrap_or_default()
            )
        } else if self.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            format!(
                "hidden_act '{}'",
                self.hidden_act.as_deref().unwrap_or_default()
            )
        } else if self.attention_bias {
            "attention_bias".into()
        } else if self.mlp_bias {
            "mlp_bias".into()
        } else if let Some(scaling) = self.rope_scaling.as_ref().filter(|s| {
            let kind = s.get("rope_type").or_else(|| s.get("type"));
            !s.is_null() && kind.and_then(|k| k.as_str()) != Some("default")
        }) {
            format!("rope_scaling {scaling}")
        } else {
            return None;
        };
        Some(format!(
            "{what} is not implemented (a Llama decoder with SiLU, no biases and plain rope is)"
        ))
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-5
}

/// Bounds [`ModelConfig::validate`] holds a config to: orders of magnitude past any real
/// model (the largest open ones have about 2^7 layers, 2^14 width and 2^18 vocabulary).
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_DIMENSION: usize = 1 << 24;
pub const MAX_PARAMS: u128 = 1 << 42;

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["tiny", "char-small", "small"];

impl ModelConfig {
    /// A named built-in shape. Vocabulary is 256 (byte-level); a tokenizer replaces it.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let base = |hidden, ffn, layers, heads, kv, ctx| ModelConfig {
            vocab_size: 256,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            max_position_embeddings: ctx,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
        };
        match name {
            // For tests: a few hundred thousand parameters, fast on one core.
            "tiny" => Ok(base(64, 176, 2, 4, 2, 64)),
            // About nanoGPT's CPU configuration for Shakespeare-char (4 layers, 4 heads, 128 wide).
            "char-small" => Ok(base(128, 352, 4, 4, 4, 128)),
            // About 10 M parameters.
            "small" => Ok(base(384, 1024, 6, 6, 2, 256)),
            other => Err(ModelError::UnknownPreset {
                name: other.to_string(),
                known: PRESETS.join(", "),
            }),
        }
    }

    /// Reads a Hugging Face `config.json` (Llama architecture).
    pub fn from_hf_config_json(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let hf: HfConfigJson = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if let Some(reason) = hf.unimplemented() {
            return Err(ModelError::Format {
                path: path.display().to_string(),
                reason,
            });
        }
        let cfg = ModelConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            max_position_embeddings: hf.max_position_embeddings,
            rope_theta: hf.rope_theta,
            rms_norm_eps: hf.rms_norm_eps,
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        if let Some(head_dim) = hf.head_dim
            && head_dim * hf.num_attention_heads != hf.hidden_size
        {
            return Err(ModelError::Format {
                path: path.display().to_string(),
                reason: format!(
                    "head_dim {head_dim} × num_attention_heads {} ≠ hidden_size {}; decoupled head widths are not supported",
                    hf.num_attention_heads, hf.hidden_size
                ),
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the config as a Hugging Face `config.json` body.
    pub fn to_hf_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Checks every field that would otherwise fail deep inside a tensor op.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, value: String, reason: &str| {
            Err(ModelError::InvalidConfig {
                field: field.to_string(),
                value,
                reason: reason.to_string(),
            })
        };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(field, value.to_string(), "must be at least 1");
            }
            // A crafted file must not make the loader plan (and allocate for) a model no
            // machine holds: far past any real one, and checked before anything is built.
            let most = if field == "num_hidden_layers" {
                MAX_LAYERS
            } else {
                MAX_DIMENSION
            };
            if value > most {
                return bad(field, value.to_string(), &format!("must be at most {most}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                &format!("must divide hidden_size {}", self.hidden_size),
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                self.num_key_value_heads.to_string(),
                &format!(
                    "must divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "hidden_size",
                self.hidden_size.to_string(),
                "head width (hidden_size / num_attention_heads) must be even for rotary embeddings",
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", self.rope_theta.to_string(), "must be > 0");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad("rms_norm_eps", self.rms_norm_eps.to_string(), "must be > 0");
        }
        let (v, h, f, l) = (
            self.vocab_size as u128,
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.num_hidden_layers as u128,
        );
        let kv = self.kv_width() as u128;
        let params = 2 * v * h + l * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h;
        if params > MAX_PARAMS {
            return bad(
                "num_hidden_layers",
                self.num_hidden_layers.to_string(),
                &format!("the model would have {params} parameters (at most {MAX_PARAMS})"),
            );
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        crate::weights::param_specs(self)
            .iter()
            .map(|s| s.numel())
            .sum()
    }
}
