//! Serving a holdfast model: loading (GGUF, Hugging Face directories, holdfast runs through the
//! CLI), KV-cached generation with sampling and stop sequences, chat templates, and an
//! OpenAI-compatible HTTP server ([`server`]).

mod engine;
mod generate;
mod model;
pub mod sampling;
pub mod server;

pub use engine::{Cache, Engine};
pub use generate::{Completion, FinishReason, Generation, generate};
pub use model::{ChatMessage, ServedModel, TokenizerConfig};
pub use sampling::{SamplingOptions, sample};

/// Errors that name the file, field or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] holdfast_model::ModelError),
    #[error("{0}")]
    Load(String),
    #[error("chat template: {0}")]
    Template(String),
}
