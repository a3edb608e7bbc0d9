//! The shape of a Llama-family model, from GGUF metadata or a Hugging Face `config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::ModelError;

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (0,1), (2,3), ...: GGUF files, whose converter permuted the q/k weights for it.
    Interleaved,
    /// First half against second half: Hugging Face checkpoints (`rotate_half`).
    Halves,
}

/// The hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// The longest sequence the model was trained for; strata refuses positions beyond it.
    pub context_length: usize,
    /// The output head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Reads the config from GGUF metadata (`llama.*` keys, as llama.cpp writes them).
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self, ModelError> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| ModelError::invalid(path, "missing general.architecture"))?;
        if arch != "llama" {
            return Err(ModelError::unsupported(
                path,
                format!("architecture {arch:?}; strata runs Llama-family models (\"llama\")"),
            ));
        }
        let get = |key: &str| -> Result<usize, ModelError> {
            let full = format!("{arch}.{key}");
            match md.get(&full) {
                Some(v) => gguf_usize(v).ok_or_else(|| {
                    ModelError::invalid(path, format!("{full} is not an unsigned integer"))
                }),
                None => Err(ModelError::invalid(path, format!("missing {full}"))),
            }
        };
        let num_layers = get("block_count")?;
        let hidden_size = get("embedding_length")?;
        let num_heads = get("attention.head_count")?;
        let num_kv_heads = get("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1));
        let rms_norm_eps = md
            .get(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.to_f32().ok())
            .ok_or_else(|| ModelError::invalid(path, "missing attention.layer_norm_rms_epsilon"))?
            as f64;
        let rope_theta = md
            .get(&format!("{arch}.rope.freq_base"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let embedding = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::invalid(path, "missing tensor token_embd.weight"))?;
        let vocab_size = embedding.shape.dims()[0];
        let config = Self {
            num_layers,
            hidden_size,
            intermediate_size: get("feed_forward_length")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_style: RopeStyle::Interleaved,
            context_length: get("context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the config from a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let raw: HfConfig = serde_json::from_str(json)
            .map_err(|e| ModelError::invalid(path, format!("config.json: {e}")))?;
        if raw.model_type.as_deref().is_some_and(|t| t != "llama") {
            return Err(ModelError::unsupported(
                path,
                format!(
                    "model_type {:?}; strata runs Llama-family models (\"llama\")",
                    raw.model_type.unwrap_or_default()
                ),
            ));
        }
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return Err(ModelError::unsupported(
                path,
                format!("rope_scaling {scaling} is not implemented"),
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let config = Self {
            num_layers: raw.num_hidden_layers,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::Halves,
            context_length: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let fail = |m: String| Err(ModelError::invalid(path, m));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return fail(format!("empty model: {self:?}"));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return fail(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail(format!("head dimension {} must be even", self.head_dim));
        }
        if self.context_length == 0 {
            return fail("context length 0".into());
        }
        Ok(())
    }

    /// Parameters of one transformer layer, for memory estimates and planning.
    pub fn layer_parameters(&self) -> usize {
        let q = self.hidden_size * self.num_heads * self.head_dim;
        let kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim;
        let o = self.num_heads * self.head_dim * self.hidden_size;
        let ffn = 3 * self.hidden_size * self.intermediate_size;
        q + kv + o + ffn + 2 * self.hidden_size
    }
}

fn gguf_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    match v {
        V::U8(x) => Some(*x as usize),
        V::U16(x) => Some(*x as usize),
        V::U32(x) => Some(*x as usize),
        V::U64(x) => usize::try_from(*x).ok(),
        V::I8(x) => usize::try_from(*x).ok(),
        V::I16(x) => usize::try_from(*x).ok(),
        V::I32(x) => usize::try_from(*x).ok(),
        V::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

/// The fields of a Hugging Face Llama `config.json` that strata reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    num_hidden_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(flatten)]
    _rest: HashMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_reads_defaults() -> Result<(), ModelError> {
        let json = r#"{"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
            "intermediate_size":128,"num_attention_heads":4,"vocab_size":300,"rms_norm_eps":1e-5,
            "max_position_embeddings":512}"#;
        let c = LlamaConfig::from_hf_json(Path::new("x"), json)?;
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rope_style, RopeStyle::Halves);
        Ok(())
    }

    #[test]
    fn hf_config_rejects_bad_heads_and_other_models() {
        let json = r#"{"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
            "intermediate_size":128,"num_attention_heads":4,"num_key_value_heads":3,
            "vocab_size":300,"rms_norm_eps":1e-5,"max_position_embeddings":512}"#;
        let err = LlamaConfig::from_hf_json(Path::new("x"), json).unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
        let json = json.replace("\"llama\"", "\"gpt2\"");
        let err = LlamaConfig::from_hf_json(Path::new("x"), &json).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }
}
