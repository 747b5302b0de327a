//! A model ready to serve: weights on a device, its tokenizer, chat template and stop tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use holdfast_model::{ModelConfig, Tokenizer, Weights, load_gguf, load_safetensors};
use serde::{Deserialize, Serialize};

use crate::ServeError;

/// ChatML, for models that ship no template of their own (holdfast's own runs).
const FALLBACK_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Tokens that end a document or a turn in common tokenizers.
const END_TOKENS: &[&str] = &["<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ServedModel {
    /// The name clients pass as `model`.
    pub id: String,
    pub weights: Weights,
    /// Shared with the HTTP handlers, which tokenize and validate before queueing.
    pub tokenizer: Arc<Tokenizer>,
    /// Jinja chat template (Hugging Face convention); None uses ChatML.
    pub chat_template: Option<String>,
    /// Generation stops at these ids.
    pub stop_tokens: Vec<u32>,
    pub device: Device,
}

impl ServedModel {
    /// A model from parts (the CLI builds holdfast runs this way).
    pub fn new(id: String, weights: Weights, tokenizer: Tokenizer, device: Device) -> Self {
        let stop_tokens = END_TOKENS
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .collect();
        ServedModel {
            id,
            weights,
            tokenizer: Arc::new(tokenizer),
            chat_template: None,
            stop_tokens,
            device,
        }
    }

    /// Loads a `.gguf` file (tokenizer.json beside it unless `tokenizer` is given) or a
    /// Hugging Face directory (config.json, model.safetensors, tokenizer.json and optionally
    /// tokenizer_config.json).
    pub fn load(
        path: &Path,
        tokenizer: Option<&Path>,
        device: &Device,
    ) -> Result<Self, ServeError> {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let tokenizer_path = match tokenizer {
            Some(p) => p.to_path_buf(),
            None => require(
                dir.join("tokenizer.json"),
                path,
                "its tokenizer (or pass --tokenizer)",
            )?,
        };
        let tok = Tokenizer::from_file(&tokenizer_path)?;
        let hf_config =
            read_tokenizer_config(&tokenizer_path.with_file_name("tokenizer_config.json"))?;

        let (weights, mut template, mut stops) = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            let m = load_gguf(path, device)?;
            (
                m.weights,
                m.info.chat_template,
                m.info.eos_token_id.into_iter().collect(),
            )
        } else if path.is_dir() {
            let cfg = ModelConfig::from_hf_config_json(&require(
                path.join("config.json"),
                path,
                "its config.json",
            )?)?;
            let st = require(path.join("model.safetensors"), path, "model.safetensors")?;
            (load_safetensors(&cfg, &st, device)?, None, Vec::new())
        } else {
            return Err(ServeError::Load(format!(
                "{}: expected a .gguf file or a Hugging Face model directory",
                path.display()
            )));
        };
        if let Some(t) = hf_config.chat_template {
            template.get_or_insert(t);
        }
        if let Some(eos) = hf_config.eos_token.and_then(|t| tok.token_id(&t)) {
            stops.push(eos);
        }
        let vocab = weights.cfg.vocab_size;
        if tok.vocab_size() > vocab {
            return Err(ServeError::Load(format!(
                "{}: tokenizer has {} tokens but the model's vocabulary is {vocab}",
                tokenizer_path.display(),
                tok.vocab_size()
            )));
        }
        let mut model = ServedModel::new(id, weights, tok, device.clone());
        model.chat_template = template;
        for s in stops {
            if !model.stop_tokens.contains(&s) {
                model.stop_tokens.push(s);
            }
        }
        Ok(model)
    }

    /// The longest sequence (prompt plus generated tokens) the model runs on.
    pub fn context(&self) -> usize {
        self.weights.cfg.max_position_embeddings
    }

    /// Renders messages with the model's chat template, ready for the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ServeError> {
        render_chat(self.chat_template.as_deref(), messages)
    }
}

/// Renders messages with a Jinja chat template (ChatML when None), ready for the assistant's
/// turn.
pub fn render_chat(template: Option<&str>, messages: &[ChatMessage]) -> Result<String, ServeError> {
    let source = template.unwrap_or(FALLBACK_CHAT_TEMPLATE);
    let mut env = minijinja::Environment::new();
    // Hugging Face templates call raise_exception() to reject a conversation.
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", source)
        .map_err(|e| ServeError::Template(e.to_string()))?;
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
        })
        .map_err(|e| ServeError::Template(e.to_string()))
}

fn require(p: PathBuf, model: &Path, what: &str) -> Result<PathBuf, ServeError> {
    if p.is_file() {
        Ok(p)
    } else {
        Err(ServeError::Load(format!(
            "{}: {} not found for {what}",
            model.display(),
            p.display()
        )))
    }
}

#[derive(Default, Deserialize)]
struct TokenizerConfig {
    chat_template: Option<String>,
    eos_token: Option<String>,
}

/// The chat template and end-of-sequence token of a tokenizer_config.json, when present.
fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig, ServeError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(TokenizerConfig::default());
    };
    // Only the string forms are read; older files give eos_token as an object.
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ServeError::Load(format!("{}: {e}", path.display())))?;
    let string = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(TokenizerConfig {
        chat_template: string("chat_template"),
        eos_token: string("eos_token"),
    })
}
