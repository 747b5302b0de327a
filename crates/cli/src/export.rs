//! `holdfast export RUN --gguf OUT.gguf`: a run's latest checkpoint as a GGUF file that
//! llama.cpp (and `holdfast serve`) loads, with its tokenizer in the file's metadata.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use holdfast_model::gguf_out::{GgufWriter, MetaValue, llama_writer};
use holdfast_model::quant::Format;
use holdfast_serve::TokenizerConfig;
use holdfast_train::source::TOKENIZER_CONFIG_FILE;
use holdfast_train::{run, rundir};
use serde_json::Value;

#[derive(Args)]
pub struct ExportArgs {
    /// A holdfast run directory; its latest valid checkpoint is exported.
    pub run: PathBuf,
    /// Write llama.cpp's GGUF format here (replaced atomically if it exists).
    #[arg(long)]
    pub gguf: PathBuf,
    /// How matrices are stored: f32, f16, q8_0, q4_0 or q4_1 (norms stay f32).
    #[arg(long = "type", default_value = "q8_0")]
    pub format: String,
}

pub fn cmd_export(args: ExportArgs) -> Result<()> {
    let format = match args.format.to_ascii_lowercase().as_str() {
        "f32" => Format::F32,
        "f16" => Format::F16,
        "q8_0" => Format::Q8_0,
        "q4_0" => Format::Q4_0,
        "q4_1" => Format::Q4_1,
        other => bail!("--type {other}: unknown (known: f32, f16, q8_0, q4_0, q4_1)"),
    };
    let (_, loaded) = rundir::load_run(&args.run, &Device::flex())?;
    let weights = loaded.state.weights;
    let cfg = &weights.cfg;
    if format != Format::F32 && format != Format::F16 {
        let widths = [cfg.hidden_size, cfg.intermediate_size];
        if let Some(w) = widths.iter().find(|w| !w.is_multiple_of(32)) {
            bail!(
                "--type {}: a matrix width of {w} is not a whole number of 32-value blocks (use f16 or f32)",
                args.format
            );
        }
    }
    let name = args
        .run
        .file_name()
        .map_or("holdfast".into(), |n| n.to_string_lossy().into_owned());
    let mut writer = llama_writer(cfg, &weights.to_host(), format, &name)?;
    let tokenizer_json = run::run_tokenizer(&args.run);
    let mut vocab = match &tokenizer_json {
        Some(path) => hf_vocabulary(path)?,
        None => byte_vocabulary(),
    };
    vocab.take_source_settings(&args.run.join(TOKENIZER_CONFIG_FILE))?;
    if vocab.tokens.len() > cfg.vocab_size {
        bail!(
            "the tokenizer has {} tokens, the model's vocabulary {}",
            vocab.tokens.len(),
            cfg.vocab_size
        );
    }
    vocab.write(&mut writer, cfg.vocab_size);
    write_atomically(&args.gguf, &writer.to_bytes())?;
    let beside = args.gguf.with_file_name("tokenizer.json");
    let tokenizer_text = match &tokenizer_json {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => byte_tokenizer_json(),
    };
    place_tokenizer(&beside, &tokenizer_text)?;
    eprintln!(
        "wrote {} ({:?}, {} parameters) and {}",
        args.gguf.display(),
        format,
        cfg.num_params(),
        beside.display()
    );
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a crash
/// leaves the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("gguf.partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))
}

/// Puts the run's tokenizer beside the GGUF (where `holdfast serve` looks for it), refusing
/// to replace a different one.
fn place_tokenizer(path: &Path, text: &str) -> Result<()> {
    match std::fs::read_to_string(path) {
        Ok(existing) if existing == text => Ok(()),
        Ok(_) => bail!(
            "{} exists and is another tokenizer; export into another directory",
            path.display()
        ),
        Err(_) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display())),
    }
}

/// A vocabulary as llama.cpp's `gpt2` (byte-level BPE) tokenizer metadata holds it.
struct Vocabulary {
    tokens: Vec<String>,
    /// llama.cpp's token types: 1 normal, 3 control.
    types: Vec<i32>,
    merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether llama.cpp starts a prompt with `bos`.
    add_bos: bool,
    chat_template: Option<String>,
}

impl Vocabulary {
    /// Takes the chat template and special tokens of a run's source model from the run's
    /// tokenizer_config.json (see `holdfast_train::source`), when it has one: they replace
    /// what the vocabulary's token names suggest.
    fn take_source_settings(&mut self, path: &Path) -> Result<()> {
        let config = TokenizerConfig::read(path)?;
        let id_of = |key: &str, text: Option<String>| -> Result<Option<u32>> {
            let Some(text) = text else {
                return Ok(None);
            };
            let id = self
                .tokens
                .iter()
                .position(|t| *t == text)
                .with_context(|| {
                    format!("{}: {key} {text:?} is not in the tokenizer", path.display())
                })?;
            Ok(Some(id as u32))
        };
        let bos = id_of("bos_token", config.bos_token)?;
        let eos = id_of("eos_token", config.eos_token)?;
        self.bos = bos.or(self.bos);
        self.eos = eos.or(self.eos);
        if let Some(add) = config.add_bos_token {
            self.add_bos = add;
        }
        if let Some(template) = config.chat_template {
            self.chat_template = Some(template);
        }
        Ok(())
    }

    fn write(&self, w: &mut GgufWriter, model_vocab: usize) {
        let mut tokens = self.tokens.clone();
        let mut types = self.types.clone();
        // Rows of the embedding past the tokenizer's ids: unused (type 5) placeholders.
        for id in tokens.len()..model_vocab {
            tokens.push(format!("[PAD{id}]"));
            types.push(5);
        }
        w.meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
        w.meta("tokenizer.ggml.pre", MetaValue::Str("default".into()));
        w.meta("tokenizer.ggml.tokens", MetaValue::Strings(tokens));
        w.meta("tokenizer.ggml.token_type", MetaValue::I32s(types));
        w.meta(
            "tokenizer.ggml.merges",
            MetaValue::Strings(self.merges.clone()),
        );
        w.meta(
            "tokenizer.ggml.add_bos_token",
            MetaValue::Bool(self.add_bos),
        );
        if let Some(id) = self.bos {
            w.meta("tokenizer.ggml.bos_token_id", MetaValue::U32(id));
        }
        if let Some(id) = self.eos {
            w.meta("tokenizer.ggml.eos_token_id", MetaValue::U32(id));
        }
        if let Some(template) = &self.chat_template {
            w.meta("tokenizer.chat_template", MetaValue::Str(template.clone()));
        }
    }
}

/// GPT-2's byte-to-character map, which byte-level BPE vocabularies are written in.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).expect("within the BMP")
}

/// The byte-level runs' vocabulary: token `i` is byte `i`.
fn byte_vocabulary() -> Vocabulary {
    Vocabulary {
        tokens: (0..=255u8).map(|b| byte_char(b).to_string()).collect(),
        types: vec![1; 256],
        merges: Vec::new(),
        bos: None,
        eos: None,
        add_bos: false,
        chat_template: None,
    }
}

/// The same vocabulary as a Hugging Face tokenizer.json (byte-level BPE, no merges), so that
/// an exported byte-level model is served with the ids it was trained on.
fn byte_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), Value::from(b)))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
    .to_string()
}

/// A Hugging Face byte-level BPE tokenizer.json's vocabulary, merges and special tokens.
fn hf_vocabulary(path: &Path) -> Result<Vocabulary> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!(
            "{}: only BPE tokenizers export to GGUF (this one is {})",
            path.display(),
            model["type"]
        );
    }
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: u64, token: &str, kind: i32| -> Result<()> {
        let id = usize::try_from(id)
            .ok()
            .filter(|&i| i < 1 << 24)
            .context("token id out of range")?;
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((token.to_string(), kind));
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .context("tokenizer.json: model.vocab is not an object")?;
    for (token, id) in vocab {
        put(
            id.as_u64().context("a vocabulary id is not an integer")?,
            token,
            1,
        )?;
    }
    let mut specials = Vec::new();
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(token)) = (added["id"].as_u64(), added["content"].as_str()) else {
            bail!("{}: an added token lacks its id or content", path.display());
        };
        let special = added["special"].as_bool().unwrap_or(false);
        put(id, token, if special { 3 } else { 1 })?;
        if special {
            specials.push((token.to_string(), id as u32));
        }
    }
    let mut tokens = Vec::with_capacity(by_id.len());
    let mut types = Vec::with_capacity(by_id.len());
    for (id, slot) in by_id.into_iter().enumerate() {
        let (token, kind) = slot.unwrap_or_else(|| (format!("[PAD{id}]"), 5));
        tokens.push(token);
        types.push(kind);
    }
    let merges = merges_of(model)?;
    let named = |names: &[&str]| {
        specials
            .iter()
            .find(|(t, _)| names.contains(&t.as_str()))
            .map(|(_, id)| *id)
    };
    Ok(Vocabulary {
        tokens,
        types,
        merges,
        bos: named(&["<|endoftext|>", "<s>", "<|begin_of_text|>", "<|im_start|>"]),
        eos: named(&["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"]),
        add_bos: false,
        chat_template: None,
    })
}

/// A BPE model's merges as GGUF keeps them, "a b"; tokenizer.json writes each as that string
/// or, in newer files, as the pair.
fn merges_of(model: &Value) -> Result<Vec<String>> {
    model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) => match (
                pair.first().and_then(Value::as_str),
                pair.get(1).and_then(Value::as_str),
            ) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => bail!("a merge is not a pair of strings"),
            },
            _ => bail!("a merge is neither a string nor a pair"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_map_as_gpt2_does() {
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(all.len(), 256);
    }
}
