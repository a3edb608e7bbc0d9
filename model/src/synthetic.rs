//! Random-weight models of real shapes and families, written as a Hugging Face directory
//! (`config.json`, `tokenizer.json`, `model.safetensors`), so tests and benchmarks can run real code
//! at real scale on machines that cannot download weights, and transformers can load the same files
//! as a reference.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::rng::SplitMix64;
use crate::tensors::{layer_roles, Role};
use crate::{ModelConfig, ModelError, ModelFormat};

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

/// The real `config.json` files strata ships (`model/configs/`), for `strata make-model --config NAME`:
/// random weights of these models' exact shapes and families, loadable by transformers too.
const FAMILY_PRESETS: &[(&str, &str)] = &[
    ("llama-3.2-1b", include_str!("../configs/llama-3.2-1b.json")),
    ("qwen2.5-1.5b", include_str!("../configs/qwen2.5-1.5b.json")),
    ("qwen3-1.7b", include_str!("../configs/qwen3-1.7b.json")),
    ("gemma-2-2b", include_str!("../configs/gemma-2-2b.json")),
    ("gemma-3-1b", include_str!("../configs/gemma-3-1b.json")),
    ("phi-3-mini", include_str!("../configs/phi-3-mini.json")),
];

/// A shipped real model's `config.json` by name.
pub fn family_preset(name: &str) -> Option<serde_json::Value> {
    FAMILY_PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| serde_json::from_str(text).expect("shipped configs are JSON"))
}

/// The names of every preset, shapes and real configs.
pub fn preset_names() -> Vec<&'static str> {
    let mut names = vec!["tiny", "tinyllama-1.1b", "llama-7b"];
    names.extend(FAMILY_PRESETS.iter().map(|(n, _)| *n));
    names
}

impl SyntheticConfig {
    /// The Llama `config.json` of this shape.
    pub fn hf_config(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.context_length,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 1,
        })
    }
}

/// Writes a random-weight Llama model of `c`'s shape into `dir` (created if needed).
pub fn write_safetensors_model(dir: &Path, c: &SyntheticConfig) -> Result<(), ModelError> {
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
    write_model_from_hf_config(dir, &c.hf_config(), c.dtype, c.seed)
}

/// Writes a random-weight model of whatever family and shape `config` (a Hugging Face
/// `config.json`) describes into `dir`: the config itself (its dtype set to `dtype`), a byte-level
/// tokenizer of its vocabulary size, and `model.safetensors` with every tensor the family has, under
/// the names transformers reads.
pub fn write_model_from_hf_config(
    dir: &Path,
    config: &serde_json::Value,
    dtype: DType,
    seed: u64,
) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: dir.to_owned(),
        source: e,
    };
    let invalid = |m: String| ModelError::Invalid {
        path: dir.to_owned(),
        message: m,
    };
    let mut config = config.clone();
    config["torch_dtype"] = json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    let text = serde_json::to_string_pretty(&config).expect("json");
    let c = ModelConfig::from_hf_json(&dir.join("config.json"), &text)?;
    if c.vocab_size < 260 {
        return Err(invalid(
            "vocab_size must be at least 260 (bytes plus specials)".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), &text).map_err(io)?;
    write_tokenizer(&dir.join("tokenizer.json"), c.vocab_size)?;

    let mut rng = Normal::new(seed);
    let std = 0.02f32;
    // Gemma's Hugging Face norms hold `w - 1`: stored near 0 they act near 1, as elsewhere.
    let norm_base = 1.0 - c.norm_offset;
    // A tied head reads the embedding back: at std 1 against the layers' 0.02 the residual stream
    // stays its own token's embedding and the model repeats its last token, so tied models get
    // embeddings of the layers' scale.
    let embedding_std = if c.tie_word_embeddings { std } else { 1.0 };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |role: Role| -> Result<(), ModelError> {
        let shape = role.expected_shape(&c);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if role.is_norm() {
            (0..n).map(|_| norm_base + rng.sample() * 0.1).collect()
        } else if matches!(role, Role::TokenEmbedding) {
            (0..n).map(|_| rng.sample() * embedding_std).collect()
        } else {
            (0..n).map(|_| rng.sample() * std).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| invalid(e.to_string()))?;
        tensors.insert(role.name(ModelFormat::Safetensors, c.family), t);
        Ok(())
    };
    add(Role::TokenEmbedding)?;
    for i in 0..c.num_layers {
        for role in layer_roles(&c, i) {
            add(role)?;
        }
    }
    add(Role::OutputNorm)?;
    if !c.tie_word_embeddings {
        add(Role::Output)?;
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

    /// Each shipped real config opens as its family, with its tensors under the family's names
    /// (two layers, to keep the files small).
    #[test]
    fn family_presets_write_their_tensors() -> Result<(), Box<dyn std::error::Error>> {
        let expect = [
            (
                "llama-3.2-1b",
                "llama",
                "model.layers.1.mlp.gate_proj.weight",
            ),
            (
                "qwen2.5-1.5b",
                "qwen2",
                "model.layers.1.self_attn.q_proj.bias",
            ),
            (
                "qwen3-1.7b",
                "qwen3",
                "model.layers.1.self_attn.q_norm.weight",
            ),
            (
                "gemma-2-2b",
                "gemma2",
                "model.layers.1.post_feedforward_layernorm.weight",
            ),
            (
                "gemma-3-1b",
                "gemma3",
                "model.layers.1.pre_feedforward_layernorm.weight",
            ),
            (
                "phi-3-mini",
                "phi3",
                "model.layers.1.self_attn.qkv_proj.weight",
            ),
        ];
        for (name, family, tensor) in expect {
            let mut config = family_preset(name).expect("a preset");
            config["num_hidden_layers"] = json!(2);
            config["vocab_size"] = json!(300);
            for k in ["hidden_size", "intermediate_size"] {
                config[k] = json!(config[k].as_u64().unwrap() / 16);
            }
            let dir = tempfile::tempdir()?;
            write_model_from_hf_config(dir.path(), &config, DType::F32, 1)?;
            let model = ModelFile::open(dir.path())?;
            assert_eq!(model.config.family.gguf_architecture, family, "{name}");
            let st =
                candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)?;
            assert!(st.contains_key(tensor), "{name}: no {tensor}");
        }
        Ok(())
    }
}
