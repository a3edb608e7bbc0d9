//! The model families strata runs, as data: the names each answers to and what its block changes
//! of Llama's.

use std::path::Path;

use crate::ModelError;

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (0,1), (2,3), ...: GGUF Llama files, whose converter permuted the q/k weights
    /// for it (llama.cpp's "normal" RoPE).
    Interleaved,
    /// First half against second half: Hugging Face checkpoints (`rotate_half`) and every GGUF
    /// family but Llama (llama.cpp's "NeoX" RoPE).
    Halves,
}

/// The feed-forward network's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (Llama, Qwen, Phi-3).
    Silu,
    /// `gelu_tanh(gate) * up` (Gemma: `gelu_pytorch_tanh`).
    GeluTanh,
}

/// A model family: the names it goes by and the structure of its block.
#[derive(Debug, PartialEq)]
pub struct Family {
    /// `general.architecture` in GGUF files; also the name strata reports.
    pub gguf_architecture: &'static str,
    /// `model_type` values of Hugging Face `config.json` files.
    pub hf_model_types: &'static [&'static str],
    /// Query, key and value projections carry biases (Qwen2 always; others where the config says).
    pub attention_bias: bool,
    /// Queries and keys are RMS-normed per head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Attention and feed-forward outputs are RMS-normed before the residual add (Gemma 2 and 3).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// The embedding is multiplied by `sqrt(hidden_size)` (Gemma).
    pub scaled_embedding: bool,
    /// Hugging Face norm weights are stored as `w - 1` and applied as `1 + w` (Gemma). GGUF files
    /// have the 1 added by llama.cpp's converter.
    pub hf_norm_offset: bool,
    /// RoPE pairing of GGUF files (Hugging Face files always use halves).
    pub gguf_rope: RopeStyle,
    /// q/k/v are one tensor and gate/up are one tensor (Phi-3).
    pub fused_tensors: bool,
    /// Every `n`-th layer (the last of each group of `n`) attends globally, the others within the
    /// sliding window (Gemma 3: 6), or even layers slide (Gemma 2, [`WindowPattern::EvenLayers`]).
    pub window_pattern: WindowPattern,
    /// The head's output tensor is absent and the embedding reused unless a config says otherwise.
    pub ties_by_default: bool,
}

/// Which layers attend within the sliding window, when the model has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowPattern {
    /// Every layer (Mistral, Phi-3, Qwen2 with `use_sliding_window`).
    AllLayers,
    /// Layers 0, 2, 4, ... (Gemma 2).
    EvenLayers,
    /// All but every `n`-th layer: layer `i` is global when `(i + 1) % n == 0` (Gemma 3: 6).
    AllButEvery(usize),
}

/// Llama's block: the row every other family departs from.
const LLAMA: Family = Family {
    gguf_architecture: "llama",
    hf_model_types: &["llama", "mistral"],
    attention_bias: false,
    qk_norm: false,
    sandwich_norms: false,
    activation: Activation::Silu,
    scaled_embedding: false,
    hf_norm_offset: false,
    gguf_rope: RopeStyle::Interleaved,
    fused_tensors: false,
    window_pattern: WindowPattern::AllLayers,
    ties_by_default: false,
};

/// Gemma's block (Gemma 2 and 3 differ in q/k norms and which layers slide).
const GEMMA: Family = Family {
    gguf_architecture: "gemma2",
    hf_model_types: &["gemma2"],
    sandwich_norms: true,
    activation: Activation::GeluTanh,
    scaled_embedding: true,
    hf_norm_offset: true,
    gguf_rope: RopeStyle::Halves,
    window_pattern: WindowPattern::EvenLayers,
    ties_by_default: true,
    ..LLAMA
};

/// The families strata runs, one row each: what each changes of Llama's block.
pub static FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        gguf_architecture: "qwen2",
        hf_model_types: &["qwen2"],
        attention_bias: true,
        gguf_rope: RopeStyle::Halves,
        ..LLAMA
    },
    Family {
        gguf_architecture: "qwen3",
        hf_model_types: &["qwen3"],
        qk_norm: true,
        gguf_rope: RopeStyle::Halves,
        ..LLAMA
    },
    GEMMA,
    Family {
        gguf_architecture: "gemma3",
        hf_model_types: &["gemma3_text", "gemma3"],
        qk_norm: true,
        window_pattern: WindowPattern::AllButEvery(6),
        ..GEMMA
    },
    Family {
        gguf_architecture: "phi3",
        hf_model_types: &["phi3"],
        gguf_rope: RopeStyle::Halves,
        fused_tensors: true,
        ..LLAMA
    },
];

/// Families strata knows to be different and does not run, with why (a clearer refusal than
/// "unknown").
const REFUSED: &[(&str, &str)] = &[
    ("mixtral", "mixture-of-experts models are not supported"),
    ("qwen2moe", "mixture-of-experts models are not supported"),
    ("qwen2_moe", "mixture-of-experts models are not supported"),
    ("qwen3moe", "mixture-of-experts models are not supported"),
    ("qwen3_moe", "mixture-of-experts models are not supported"),
    ("deepseek2", "mixture-of-experts models are not supported"),
    ("deepseek_v2", "mixture-of-experts models are not supported"),
    ("deepseek_v3", "mixture-of-experts models are not supported"),
];

impl Family {
    /// The row for a GGUF `general.architecture`.
    pub fn by_gguf(name: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.gguf_architecture == name)
    }

    /// The row for a Hugging Face `model_type`.
    pub fn by_hf(model_type: &str) -> Option<&'static Family> {
        FAMILIES
            .iter()
            .find(|f| f.hf_model_types.contains(&model_type))
    }

    pub(super) fn unsupported(path: &Path, what: &str, name: &str) -> ModelError {
        let why = REFUSED
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("strata does not run it", |(_, why)| why);
        let list: Vec<&str> = FAMILIES.iter().map(|f| f.gguf_architecture).collect();
        ModelError::unsupported(
            path,
            format!(
                "{what} {name:?}: {why}; supported: {} (Mistral and SmolLM are \"llama\")",
                list.join(", ")
            ),
        )
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.gguf_architecture)
    }
}
