//! What both ends of strata need to know about a model file, and nothing about running it.
//!
//! - [`file`]: opens a GGUF file or a Hugging Face safetensors directory and reads its [`ModelConfig`]
//!   and fingerprint (the model identity every worker must agree on).
//! - [`chat`]: the model's chat template, rendered with minijinja.
//! - [`client_text`]: every client string a template renders stays text (no control tokens), and
//!   roles are OpenAI's.
//! - [`config`]: the shape of a Llama-family model, read from GGUF metadata or `config.json`.
//! - [`stage_weights`]: which tensors a stage reads, and the digests that name them when the
//!   coordinator sends them to a worker without the file.
//! - [`synthetic`]: random-weight models of real shapes, for tests and benchmarks.
//! - [`tokenizer`]: the text tokenizer, built from GGUF metadata or `tokenizer.json`, plus the model's
//!   end-of-generation tokens.
//! - [`wire`]: the model's description as `Info` reports it.
//!
//! Workers use the config and fingerprint to load their layers; the coordinator uses the config, the
//! fingerprint and the tokenizer. The tensor math lives in `strata-worker` alone.

pub mod chat;
pub mod client_text;
pub mod config;
pub mod error;
pub mod file;
pub mod rng;
pub mod spm;
pub mod stage_weights;
pub mod synthetic;
pub mod tensors;
pub mod tokenizer;
pub mod tool_calls;
pub mod wire;

pub use chat::{ChatMessage, ChatPromptError, ChatTemplate, ChatTemplateSource, Tool, ToolCall};
pub use config::ModelConfig;
pub use error::ModelError;
pub use file::{ModelFile, ModelFormat};
pub use tokenizer::TextTokenizer;
pub use tool_calls::{
    CallCheck, CallReader, OutputPiece, ParsedCall, ToolCallFormat, ToolCallParser,
};
