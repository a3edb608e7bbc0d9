//! Errors of reading a model file.

use std::path::PathBuf;

/// Why a model file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The path does not exist or cannot be read.
    #[error("cannot read model at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a `.gguf` file nor a directory with `config.json`.
    #[error("{0} is not a model: expected a .gguf file or a directory with config.json and *.safetensors")]
    UnknownFormat(PathBuf),
    /// The file is readable but its content is not what strata expects.
    #[error("invalid model {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// The model is valid but uses something strata does not run.
    #[error("unsupported model {path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    /// candle could not parse the file.
    #[error("cannot parse {path}: {source}")]
    Candle {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// The tokenizer could not be built or loaded.
    #[error("tokenizer of {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn invalid(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.to_owned(),
            message: message.into(),
        }
    }

    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
