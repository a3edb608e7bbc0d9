//! Random-weight Llama models of real shapes, written as a Hugging Face directory (`config.json`,
//! `tokenizer.json`, `model.safetensors`), so tests and benchmarks can run real code at real scale on
//! machines that cannot download weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::rng::SplitMix64;
use crate::ModelError;

/// The shape of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    /// Weight dtype on disk: F32, F16 or BF16.
    pub dtype: DType,
    pub seed: u64,
}

impl SyntheticConfig {
    /// A model small enough for unit tests: 4 layers, width 64, GQA 2.
    pub fn tiny() -> Self {
        Self {
            num_layers: 4,
            hidden_size: 64,
            intermediate_size: 176,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 512,
            context_length: 512,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            dtype: DType::F32,
            seed: 1,
        }
    }

    /// TinyLlama-1.1B's shape.
    pub fn tinyllama_1_1b() -> Self {
        Self {
            num_layers: 22,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_heads: 32,
            num_kv_heads: 4,
            vocab_size: 32_000,
            context_length: 2048,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            dtype: DType::BF16,
            seed: 1,
        }
    }

    /// Llama-2-7B's shape.
    pub fn llama_7b() -> Self {
        Self {
            num_layers: 32,
            hidden_size: 4096,
            intermediate_size: 11_008,
            num_heads: 32,
            num_kv_heads: 32,
            vocab_size: 32_000,
            context_length: 4096,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            dtype: DType::BF16,
            seed: 1,
        }
    }

    /// A preset by name: `tiny`, `tinyllama-1.1b`, `llama-7b`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "tinyllama-1.1b" | "tinyllama" => Some(Self::tinyllama_1_1b()),
            "llama-7b" => Some(Self::llama_7b()),
            _ => None,
        }
    }
}

/// Writes a random-weight model into `dir` (created if needed).
pub fn write_safetensors_model(dir: &Path, c: &SyntheticConfig) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: dir.to_owned(),
        source: e,
    };
    let invalid = |m: String| ModelError::Invalid {
        path: dir.to_owned(),
        message: m,
    };
    if c.num_heads == 0
        || !c.hidden_size.is_multiple_of(c.num_heads)
        || !c.num_heads.is_multiple_of(c.num_kv_heads.max(1))
    {
        return Err(invalid(format!("inconsistent heads in {c:?}")));
    }
    if c.vocab_size < 260 {
        return Err(invalid(
            "vocab_size must be at least 260 (bytes plus specials)".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let head_dim = c.hidden_size / c.num_heads;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": 1e-5,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": match c.dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(io)?;
    write_tokenizer(&dir.join("tokenizer.json"), c.vocab_size)?;

    let mut rng = Normal::new(c.seed);
    let std = 0.02f32;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: Option<f32>| -> Result<(), ModelError> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match scale {
            Some(s) => (0..n).map(|_| rng.sample() * s).collect(),
            // Norm weights near 1, as trained models have.
            None => (0..n).map(|_| 1.0 + rng.sample() * 0.1).collect(),
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(c.dtype))
            .map_err(|e| invalid(e.to_string()))?;
        tensors.insert(name, t);
        Ok(())
    };
    let (h, q, kv, f) = (
        c.hidden_size,
        c.num_heads * head_dim,
        c.num_kv_heads * head_dim,
        c.intermediate_size,
    );
    add(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        Some(1.0),
    )?;
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[h], None)?;
        add(format!("{p}.self_attn.q_proj.weight"), &[q, h], Some(std))?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], Some(std))?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], Some(std))?;
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q], Some(std))?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h], None)?;
        add(format!("{p}.mlp.gate_proj.weight"), &[f, h], Some(std))?;
        add(format!("{p}.mlp.up_proj.weight"), &[f, h], Some(std))?;
        add(format!("{p}.mlp.down_proj.weight"), &[h, f], Some(std))?;
    }
    add("model.norm.weight".into(), &[h], None)?;
    if !c.tie_word_embeddings {
        add("lm_head.weight".into(), &[c.vocab_size, h], Some(std))?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

/// A byte-level BPE tokenizer: the 256 byte symbols, `<s>` and `</s>`, and filler tokens up to the
/// vocabulary size (they decode to " w<id>", so random output is readable).
fn write_tokenizer(path: &Path, vocab_size: usize) -> Result<(), ModelError> {
    let fail = |m: String| ModelError::Tokenizer {
        path: path.to_owned(),
        message: m,
    };
    let mut vocab = Vocab::default();
    vocab.insert("<s>".into(), 0);
    vocab.insert("</s>".into(), 1);
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    for ch in alphabet {
        let id = vocab.len() as u32;
        vocab.insert(ch.to_string(), id);
    }
    while vocab.len() < vocab_size {
        let id = vocab.len() as u32;
        vocab.insert(format!("Ġw{id}"), id);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    tokenizer.add_special_tokens(&[
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ]);
    tokenizer.save(path, false).map_err(|e| fail(e.to_string()))
}

/// Standard normal draws from a seeded SplitMix64 (Box–Muller), so the same seed writes the same model.
struct Normal {
    uniform: SplitMix64,
    spare: Option<f32>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self {
            uniform: SplitMix64::new(seed),
            spare: None,
        }
    }

    fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform.uniform(), self.uniform.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelFile, TextTokenizer};

    #[test]
    fn writes_a_model_that_opens() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        write_safetensors_model(dir.path(), &SyntheticConfig::tiny())?;
        let model = ModelFile::open(dir.path())?;
        assert_eq!(model.config.num_layers, 4);
        assert_eq!(model.config.num_kv_heads, 2);
        let tok = TextTokenizer::load(&model)?;
        let ids = tok.encode("héllo")?;
        assert_eq!(tok.decode(&ids)?, "héllo");
        assert!(tok.is_end_of_generation(1));
        // Same seed, same fingerprint; the model is a function of the config.
        let again = tempfile::tempdir()?;
        write_safetensors_model(again.path(), &SyntheticConfig::tiny())?;
        assert_eq!(
            std::fs::read(dir.path().join("model.safetensors"))?,
            std::fs::read(again.path().join("model.safetensors"))?
        );
        Ok(())
    }
}
