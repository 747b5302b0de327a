//! What a run keeps of the model it starts from besides its weights: the chat template and
//! special tokens, as a Hugging Face `tokenizer_config.json` in the run directory, so that
//! serving or exporting the fine-tuned run uses them as the source model did.
//!
//! The source is the `tokenizer_config.json` beside the run's tokenizer (a Hugging Face
//! model directory has one), completed from the GGUF file the run's shape comes from (a GGUF
//! holds its template and token ids in its metadata).

use std::path::Path;

use serde_json::{Map, Value};

use crate::{RunConfig, TrainError};

pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The source model's tokenizer settings, or None when it has none.
pub fn source_tokenizer_config(cfg: &RunConfig) -> Result<Option<Value>, TrainError> {
    let mut config = match &cfg.data.tokenizer {
        Some(tokenizer) => read_beside(tokenizer)?,
        None => Map::new(),
    };
    if let Some(gguf) = cfg
        .model
        .config_json
        .as_deref()
        .filter(|p| holdfast_model::is_gguf(p))
    {
        complete_from_gguf(&mut config, gguf, cfg.data.tokenizer.as_deref())?;
    }
    Ok((!config.is_empty()).then_some(Value::Object(config)))
}

/// The tokenizer_config.json beside `tokenizer`, whole; empty when there is none.
fn read_beside(tokenizer: &Path) -> Result<Map<String, Value>, TrainError> {
    let path = tokenizer.with_file_name(TOKENIZER_CONFIG_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Map::new());
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid(&path, "not a JSON object")),
        Err(e) => Err(invalid(&path, &e.to_string())),
    }
}

/// Adds what the GGUF file says and `config` does not: its chat template, its BOS and EOS
/// tokens (by their text in `tokenizer`) and whether prompts start with BOS.
fn complete_from_gguf(
    config: &mut Map<String, Value>,
    gguf: &Path,
    tokenizer: Option<&Path>,
) -> Result<(), TrainError> {
    let info = holdfast_model::gguf_info(gguf)
        .map_err(|e| TrainError::Config(format!("reading {}: {e}", gguf.display())))?;
    // The tokenizer is read only when there are ids to name.
    let tokenizer = match tokenizer {
        Some(path) if info.bos_token_id.or(info.eos_token_id).is_some() => Some(
            holdfast_model::Tokenizer::from_file(path)
                .map_err(|e| TrainError::Config(format!("reading {}: {e}", path.display())))?,
        ),
        _ => None,
    };
    let text_of = |id: Option<u32>| {
        let token = tokenizer.as_ref()?.id_to_token(id?)?;
        Some(Value::String(token))
    };
    let mut add = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            config.entry(key).or_insert(value);
        }
    };
    add("chat_template", info.chat_template.map(Value::String));
    add("bos_token", text_of(info.bos_token_id));
    add("eos_token", text_of(info.eos_token_id));
    add("add_bos_token", Some(Value::Bool(info.add_bos_token)));
    Ok(())
}

fn invalid(path: &Path, reason: &str) -> TrainError {
    TrainError::Config(format!("{}: {reason}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_model::gguf_out::{GgufWriter, MetaValue};

    fn config_with(tokenizer: Option<&Path>, gguf: Option<&Path>) -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.data.tokenizer = tokenizer.map(Path::to_path_buf);
        cfg.model.config_json = gguf.map(Path::to_path_buf);
        cfg
    }

    /// A GGUF file holding only metadata: a chat template and whether to add BOS.
    fn gguf_with_template(path: &Path, template: &str) {
        let mut w = GgufWriter::new();
        w.meta("tokenizer.chat_template", MetaValue::Str(template.into()));
        w.meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
        std::fs::write(path, w.to_bytes()).unwrap();
    }

    #[test]
    fn a_gguf_source_fills_what_the_tokenizer_config_beside_does_not_say() {
        let dir = tempfile::tempdir().unwrap();
        let (tokenizer, gguf) = (dir.path().join("tokenizer.json"), dir.path().join("m.gguf"));
        gguf_with_template(&gguf, "from the gguf");
        // No tokenizer_config.json: everything comes from the GGUF.
        let only_gguf = source_tokenizer_config(&config_with(None, Some(&gguf))).unwrap();
        assert_eq!(
            only_gguf,
            Some(serde_json::json!({"chat_template": "from the gguf", "add_bos_token": true}))
        );
        // One beside the tokenizer is kept whole, and wins over the GGUF where both speak.
        let beside = serde_json::json!({"chat_template": "beside", "model_max_length": 8192});
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), beside.to_string()).unwrap();
        let both = source_tokenizer_config(&config_with(Some(&tokenizer), Some(&gguf)))
            .unwrap()
            .unwrap();
        assert_eq!(both["chat_template"], "beside");
        assert_eq!(both["model_max_length"], 8192);
        assert_eq!(both["add_bos_token"], true);
        // A run with neither keeps nothing.
        assert_eq!(
            source_tokenizer_config(&RunConfig::default()).unwrap(),
            None
        );
    }

    #[test]
    fn a_broken_tokenizer_config_is_refused_by_name_before_the_run_directory_exists() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = dir.path().join("tokenizer.json");
        std::fs::write(&tokenizer, "{}").unwrap();
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            "{\"chat_template\": ",
        )
        .unwrap();
        let run_dir = dir.path().join("run");
        let err = crate::run::create_run_dir(&run_dir, &config_with(Some(&tokenizer), None))
            .unwrap_err()
            .to_string();
        assert!(err.contains(TOKENIZER_CONFIG_FILE), "{err}");
        assert!(
            !run_dir.exists(),
            "a half-made run directory was left behind"
        );
    }
}
