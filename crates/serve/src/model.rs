//! A model ready to serve: weights on a device, its tokenizer, chat template and stop tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use holdfast_model::host::MappedModel;
use holdfast_model::{
    GgufInfo, ModelConfig, ModelError, Tokenizer, Weights, is_gguf, load_gguf, load_safetensors,
};
use serde::{Deserialize, Serialize};

use crate::{Engine, ServeError};

/// ChatML, for models that ship no template of their own (holdfast's own runs).
const FALLBACK_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Tokens that end a document or a turn in common tokenizers.
const END_TOKENS: &[&str] = &["<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// How prompt text becomes token ids, as the model's own files say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptRule {
    /// Starts every completion prompt: a GGUF's BOS when `tokenizer.ggml.add_bos_token` says
    /// so (as llama.cpp adds it).
    pub bos: Option<u32>,
    /// The BOS token's text, for chat templates that write `{{ bos_token }}`.
    pub bos_text: Option<String>,
    /// Encode with the tokenizer.json's post-processor, which adds the special tokens the
    /// model expects (`transformers`' default): Hugging Face model directories.
    pub post_process: bool,
}

impl PromptRule {
    /// The ids of a completion prompt.
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = if self.post_process {
            tokenizer.encode_with_special_tokens(text)?
        } else {
            tokenizer.encode(text)?
        };
        if let Some(bos) = self.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The ids of `messages` rendered with `template` for the assistant's turn. The template
    /// writes any BOS itself (`{{ bos_token }}`), as `transformers` renders it.
    pub fn chat_ids(
        &self,
        tokenizer: &Tokenizer,
        template: Option<&str>,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, ServeError> {
        let text = render_chat(template, messages, self.bos_text.as_deref())?;
        Ok(tokenizer.encode(&text)?)
    }
}

pub struct ServedModel {
    /// The name clients pass as `model`.
    pub id: String,
    pub engine: Engine,
    /// Shared with the HTTP handlers, which tokenize and validate before queueing.
    pub tokenizer: Arc<Tokenizer>,
    pub prompt_rule: PromptRule,
    /// Jinja chat template (Hugging Face convention); None uses ChatML.
    pub chat_template: Option<String>,
    /// Generation stops at these ids.
    pub stop_tokens: Vec<u32>,
}

impl ServedModel {
    /// A model from parts (the CLI builds holdfast runs this way).
    pub fn new(id: String, weights: Weights, tokenizer: Tokenizer, device: Device) -> Self {
        Self::with_engine(id, Engine::Tensors { weights, device }, tokenizer)
    }

    fn with_engine(id: String, engine: Engine, tokenizer: Tokenizer) -> Self {
        let stop_tokens = END_TOKENS
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .collect();
        ServedModel {
            id,
            engine,
            tokenizer: Arc::new(tokenizer),
            // As the run was trained: plain text, no special tokens added.
            prompt_rule: PromptRule::default(),
            chat_template: None,
            stop_tokens,
        }
    }

    /// Loads a `.gguf` file (tokenizer.json beside it unless `tokenizer` is given) or a
    /// Hugging Face directory (config.json, model.safetensors, tokenizer.json and optionally
    /// tokenizer_config.json). A `.gguf` is mapped and served in its block formats on the
    /// host's cores when `device` is None, and dequantized onto the device otherwise.
    pub fn load(
        path: &Path,
        tokenizer: Option<&Path>,
        device: Option<&Device>,
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

        let mut rule = PromptRule::default();
        let (engine, template, stops) = if is_gguf(path) {
            let (engine, info) = gguf_engine(path, device)?;
            let bos = info.bos_token_id;
            rule.bos = bos.filter(|_| info.add_bos_token);
            rule.bos_text = bos.and_then(|id| tok.id_to_token(id));
            (
                engine,
                info.chat_template,
                info.eos_token_id.into_iter().collect(),
            )
        } else if path.is_dir() {
            rule.post_process = true;
            let cfg = ModelConfig::from_hf_config_json(&require(
                path.join("config.json"),
                path,
                "its config.json",
            )?)?;
            let st = require(path.join("model.safetensors"), path, "model.safetensors")?;
            let device = device.cloned().unwrap_or_else(Device::flex);
            let weights = load_safetensors(&cfg, &st, &device)?;
            (Engine::Tensors { weights, device }, None, Vec::new())
        } else {
            return Err(ServeError::Load(format!(
                "{}: expected a .gguf file or a Hugging Face model directory",
                path.display()
            )));
        };
        let vocab = engine.config().vocab_size;
        if tok.vocab_size() > vocab {
            return Err(ServeError::Load(format!(
                "{}: tokenizer has {} tokens but the model's vocabulary is {vocab}",
                tokenizer_path.display(),
                tok.vocab_size()
            )));
        }
        let mut model = ServedModel::with_engine(id, engine, tok);
        model.chat_template = template;
        model.prompt_rule = rule;
        for s in stops {
            model.stop_at(s);
        }
        model.complete_from_tokenizer_config(
            &tokenizer_path.with_file_name("tokenizer_config.json"),
        )?;
        Ok(model)
    }

    /// Takes what a Hugging Face tokenizer_config.json at `path` says (when there is one)
    /// where the model says nothing: its chat template and BOS text, and its end-of-sequence
    /// token as one more stop.
    pub fn complete_from_tokenizer_config(&mut self, path: &Path) -> Result<(), ServeError> {
        let config = TokenizerConfig::read(path)?;
        if self.chat_template.is_none() {
            self.chat_template = config.chat_template;
        }
        if let Some(t) = config.bos_token {
            self.prompt_rule.bos_text.get_or_insert(t);
        }
        if let Some(eos) = config.eos_token.and_then(|t| self.tokenizer.token_id(&t)) {
            self.stop_at(eos);
        }
        Ok(())
    }

    fn stop_at(&mut self, token: u32) {
        if !self.stop_tokens.contains(&token) {
            self.stop_tokens.push(token);
        }
    }

    /// The longest sequence (prompt plus generated tokens) the model runs on.
    pub fn context(&self) -> usize {
        self.engine.config().max_position_embeddings
    }

    /// The ids of a completion prompt (with a BOS when the model's files ask for one).
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>, ServeError> {
        Ok(self.prompt_rule.encode(&self.tokenizer, text)?)
    }

    /// The ids of `messages` rendered with the model's chat template (see
    /// [`PromptRule::chat_ids`]).
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ServeError> {
        let template = self.chat_template.as_deref();
        self.prompt_rule
            .chat_ids(&self.tokenizer, template, messages)
    }
}

/// Renders messages with a Jinja chat template (ChatML when None), ready for the assistant's
/// turn; `bos_token` is the model's BOS text (empty when it has none).
pub fn render_chat(
    template: Option<&str>,
    messages: &[ChatMessage],
    bos_token: Option<&str>,
) -> Result<String, ServeError> {
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
                bos_token => bos_token.unwrap_or(""),
                eos_token => "",
            })
        })
        .map_err(|e| ServeError::Template(e.to_string()))
}

/// A `.gguf` file's engine and metadata: mapped on the host's cores when `device` is None,
/// dequantized onto `device` otherwise.
fn gguf_engine(path: &Path, device: Option<&Device>) -> Result<(Engine, GgufInfo), ServeError> {
    Ok(match device {
        Some(device) => {
            let m = load_gguf(path, device)?;
            let engine = Engine::Tensors {
                weights: m.weights,
                device: device.clone(),
            };
            (engine, m.info)
        }
        None => {
            let m = MappedModel::open(path)?;
            let info = m.info.clone();
            (Engine::Mapped(m), info)
        }
    })
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

/// What a Hugging Face tokenizer_config.json says about prompts: the chat template, the BOS
/// and EOS texts, and whether prompts start with BOS. Every field is absent when the file
/// does not say.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Reads `path`; a missing file says nothing, one that is not JSON, or that gives a
    /// field in a form no Hugging Face version writes, is an error naming the field.
    ///
    /// Both forms of each field are read: a special token as its text or (older files) as
    /// `{"content": text, …}`; the chat template as a string or (newer files) as a list of
    /// `{"name", "template"}`, of which the one named `default` is taken.
    pub fn read(path: &Path) -> Result<TokenizerConfig, ServeError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TokenizerConfig::default());
            }
            Err(e) => return Err(ServeError::Load(format!("{}: {e}", path.display()))),
        };
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ServeError::Load(format!("{}: {e}", path.display())))?;
        let add_bos_token = optional_field(&json, path, "add_bos_token", |v| v.as_bool())?;
        Ok(TokenizerConfig {
            chat_template: optional_field(&json, path, "chat_template", default_template)?,
            eos_token: optional_field(&json, path, "eos_token", special_token_text)?,
            bos_token: optional_field(&json, path, "bos_token", special_token_text)?,
            add_bos_token,
        })
    }
}

/// `json[key]` (of the file at `path`) through `read`: None when it is absent or null, an
/// error naming it when `read` does not take it.
fn optional_field<T>(
    json: &serde_json::Value,
    path: &Path,
    key: &str,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Option<T>, ServeError> {
    match json.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => read(v).map(Some).ok_or_else(|| {
            ServeError::Load(format!(
                "{}: {key} is not in a form Hugging Face writes",
                path.display()
            ))
        }),
    }
}

/// A special token's text: `"</s>"`, or `{"content": "</s>", …}` (an `AddedToken`).
fn special_token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A chat template given as a string, or the `default` one of a list of named templates.
fn default_template(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))?
            .get("template")?
            .as_str()
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer whose post-processor starts every sequence with `<s>` (id 0), as
    /// Llama's tokenizer.json files do.
    fn bos_adding_tokenizer() -> Tokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,
                "rstrip":false,"normalized":false,"special":true}],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},
            "post_processor":{"type":"TemplateProcessing",
                "single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],
                "pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],
                "special_tokens":{"<s>":{"id":"<s>","ids":[0],"tokens":["<s>"]}}},
            "decoder":null,
            "model":{"type":"WordLevel","vocab":{"<s>":0,"hello":1,"world":2,"[UNK]":3},"unk_token":"[UNK]"}}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        Tokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn a_prompt_gets_the_bos_its_model_asks_for_once() {
        let tok = bos_adding_tokenizer();
        let plain = PromptRule::default();
        assert_eq!(plain.encode(&tok, "hello world").unwrap(), [1, 2]);
        // A Hugging Face directory: the tokenizer's post-processor, as transformers encodes.
        let hf = PromptRule {
            post_process: true,
            ..PromptRule::default()
        };
        assert_eq!(hf.encode(&tok, "hello world").unwrap(), [0, 1, 2]);
        // A GGUF with add_bos_token: prepended, never doubled.
        let gguf = PromptRule {
            bos: Some(0),
            ..PromptRule::default()
        };
        assert_eq!(gguf.encode(&tok, "hello world").unwrap(), [0, 1, 2]);
        assert_eq!(gguf.encode(&tok, "<s> hello").unwrap(), [0, 1]);
        let both = PromptRule {
            bos: Some(0),
            post_process: true,
            ..PromptRule::default()
        };
        assert_eq!(both.encode(&tok, "hello").unwrap(), [0, 1]);
    }

    #[test]
    fn a_chat_template_gets_the_bos_text() {
        let template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}";
        let messages = [ChatMessage {
            role: "user".into(),
            content: "hello".into(),
        }];
        assert_eq!(
            render_chat(Some(template), &messages, Some("<s>")).unwrap(),
            "<s>hello"
        );
        assert_eq!(
            render_chat(Some(template), &messages, None).unwrap(),
            "hello"
        );
    }

    fn config_of(json: &str) -> Result<TokenizerConfig, ServeError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer_config.json");
        std::fs::write(&path, json).unwrap();
        TokenizerConfig::read(&path)
    }

    #[test]
    fn a_tokenizer_config_is_read_in_its_older_and_newer_forms() {
        let newer = config_of(
            r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false,
                "chat_template": "{{ messages }}"}"#,
        )
        .unwrap();
        let older = config_of(
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false},
                "add_bos_token": false,
                "chat_template": [{"name": "tool_use", "template": "tools"},
                                  {"name": "default", "template": "{{ messages }}"}]}"#,
        )
        .unwrap();
        assert_eq!(older, newer);
        assert_eq!(newer.bos_token.as_deref(), Some("<s>"));
        assert_eq!(newer.eos_token.as_deref(), Some("</s>"));
        assert_eq!(newer.add_bos_token, Some(false));
        assert_eq!(newer.chat_template.as_deref(), Some("{{ messages }}"));
        // Absent fields (and null ones) say nothing; so does a missing file.
        assert_eq!(
            config_of(r#"{"eos_token": null}"#).unwrap(),
            TokenizerConfig::default()
        );
        let missing = TokenizerConfig::read(Path::new("/nonexistent/tokenizer_config.json"));
        assert_eq!(missing.unwrap(), TokenizerConfig::default());
    }

    #[test]
    fn a_tokenizer_config_field_in_no_known_form_is_named() {
        for (json, field) in [
            (r#"{"eos_token": 7}"#, "eos_token"),
            (r#"{"bos_token": {"id": 1}}"#, "bos_token"),
            (
                r#"{"chat_template": [{"name": "tool_use", "template": "t"}]}"#,
                "chat_template",
            ),
            (r#"{"add_bos_token": "yes"}"#, "add_bos_token"),
        ] {
            let e = config_of(json).unwrap_err().to_string();
            assert!(e.contains(field), "{json}: {e}");
        }
        assert!(config_of("{not json").is_err());
    }
}
