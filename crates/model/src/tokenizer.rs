//! Text to token ids and back: byte-level, or a Hugging Face `tokenizer.json`.

use std::path::Path;

use crate::ModelError;

/// Byte-level (no files) or a Hugging Face `tokenizer.json`.
pub enum Tokenizer {
    Bytes,
    Hf {
        inner: Box<tokenizers::Tokenizer>,
        /// BLAKE3 of the tokenizer file: part of the token cache key.
        hash: String,
    },
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| ModelError::Format {
            path: path.display().to_string(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer::Hf {
            inner: Box::new(inner),
            hash: blake3::hash(&bytes).to_hex().to_string(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
        }
    }

    pub fn id(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".into(),
            Tokenizer::Hf { hash, .. } => format!("hf-{hash}"),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { inner, .. } => inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }

    /// [`Tokenizer::encode`], plus the special tokens a Hugging Face tokenizer's post-processor
    /// adds (a BOS, for many models): what `transformers` does by default.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match self {
            Tokenizer::Bytes => self.encode(text),
            Tokenizer::Hf { inner, .. } => inner
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Hf { inner, .. } => inner.decode(ids, false).unwrap_or_default(),
        }
    }
}

impl Tokenizer {
    /// The id of a token given by its text (a special token such as `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf { inner, .. } => inner.token_to_id(token),
        }
    }

    /// The text of token `id` (a special token's name, such as `<s>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf { inner, .. } => inner.id_to_token(id),
        }
    }
}
