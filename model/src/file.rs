//! Opening a model: format detection, config and fingerprint.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use sha2::{Digest, Sha256};

use crate::chat::ChatTemplateSource;
use crate::stage_weights::TensorBlobs;
use crate::{ModelConfig, ModelError};

/// How a model is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// One `.gguf` file (llama.cpp's format); weights stay quantized.
    Gguf,
    /// A Hugging Face directory: `config.json`, `tokenizer.json` and `*.safetensors`.
    Safetensors,
}

impl ModelFormat {
    /// The name used on the wire and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Safetensors => "safetensors",
        }
    }
}

/// A model on disk whose header has been read: enough to plan, not yet to compute.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: ModelConfig,
    /// Hex sha256 over the bytes that define the model's shape and vocabulary (GGUF header; or
    /// `config.json` plus every safetensors header). Equal fingerprints mean the same model.
    pub fingerprint: String,
    /// A human name for messages.
    pub name: String,
    /// The chat template the model's files carry, if any (read with the rest of the header, so
    /// the coordinator parses the GGUF header no extra time for it).
    pub chat_template: Option<ChatTemplateSource>,
    /// Where each tensor's bytes are when `path` holds a GGUF header alone (a worker's cache of
    /// what the coordinator sent); `None` when they are in the file at `path`.
    pub blobs: Option<TensorBlobs>,
}

impl ModelFile {
    /// Opens a `.gguf` file or a Hugging Face safetensors directory.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if meta.is_dir() {
            Self::open_safetensors(path)
        } else if path.extension().is_some_and(|e| e == "gguf") || is_gguf(path)? {
            Self::open_gguf(path)
        } else {
            Err(ModelError::UnknownFormat(path.to_owned()))
        }
    }

    fn open_gguf(path: &Path) -> Result<Self, ModelError> {
        let content = read_gguf(path)?;
        let config = ModelConfig::from_gguf(path, &content)?;
        let mut header = vec![0u8; content.tensor_data_offset as usize];
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        file.read_exact(&mut header)
            .map_err(|e| ModelError::io(path, e))?;
        let name = content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| file_stem(path));
        Ok(Self {
            path: path.to_owned(),
            format: ModelFormat::Gguf,
            config,
            fingerprint: hex(&Sha256::digest(&header)),
            name,
            chat_template: crate::chat::from_gguf_metadata(&content.metadata),
            blobs: None,
        })
    }

    fn open_safetensors(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::UnknownFormat(dir.to_owned()),
            _ => ModelError::io(&config_path, e),
        })?;
        let config = ModelConfig::from_hf_json(&config_path, &json)?;
        let mut hasher = Sha256::new();
        hasher.update(json.as_bytes());
        let files = safetensors_files(dir)?;
        for file in &files {
            hasher.update(safetensors_header(file)?);
        }
        Ok(Self {
            path: dir.to_owned(),
            format: ModelFormat::Safetensors,
            config,
            fingerprint: hex(&hasher.finalize()),
            name: file_stem(dir),
            chat_template: crate::chat::from_hf_dir(dir)?,
            blobs: None,
        })
    }

    /// Reads the GGUF header again (metadata and tensor directory), for loading tensors or the tokenizer.
    pub fn gguf_content(&self) -> Result<gguf_file::Content, ModelError> {
        read_gguf(&self.path)
    }

    /// The `*.safetensors` files of a safetensors model, sorted by name.
    pub fn safetensors_files(&self) -> Result<Vec<PathBuf>, ModelError> {
        safetensors_files(&self.path)
    }
}

fn read_gguf(path: &Path) -> Result<gguf_file::Content, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    gguf_file::Content::read(&mut BufReader::new(file)).map_err(|source| ModelError::Candle {
        path: path.to_owned(),
        source,
    })
}

fn is_gguf(path: &Path) -> Result<bool, ModelError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    Ok(file.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::invalid(dir, "no *.safetensors files"));
    }
    Ok(files)
}

/// The 8-byte length prefix and the JSON header of a safetensors file (names, dtypes, shapes, offsets).
fn safetensors_header(path: &Path) -> Result<Vec<u8>, ModelError> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file
        .seek(SeekFrom::End(0))
        .map_err(|e| ModelError::io(path, e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| ModelError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| ModelError::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(ModelError::invalid(
            path,
            format!("safetensors header of {header_len} bytes in a file of {file_len}"),
        ));
    }
    let mut header = len.to_vec();
    header.resize(8 + header_len as usize, 0);
    file.read_exact(&mut header[8..])
        .map_err(|e| ModelError::io(path, e))?;
    Ok(header)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_a_model() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, "hello")?;
        assert!(matches!(
            ModelFile::open(&txt),
            Err(ModelError::UnknownFormat(_))
        ));
        assert!(matches!(
            ModelFile::open(dir.path()),
            Err(ModelError::UnknownFormat(_))
        ));
        let missing = ModelFile::open(&dir.path().join("missing.gguf")).unwrap_err();
        assert!(missing.to_string().contains("missing.gguf"), "{missing}");
        let fake = dir.path().join("fake.gguf");
        std::fs::write(&fake, b"GGUF\x03\x00\x00\x00garbage")?;
        assert!(matches!(
            ModelFile::open(&fake),
            Err(ModelError::Candle { .. })
        ));
        Ok(())
    }
}
