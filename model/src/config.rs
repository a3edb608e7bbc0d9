//! The shape of a decoder-only transformer, from GGUF metadata or a Hugging Face `config.json`.
//!
//! Every supported family runs through one block implementation; what differs between families is
//! data: a [`Family`] row of [`FAMILIES`] (which GGUF architecture and `model_type` names it answers
//! to, and the block's structural traits), plus the per-model numbers each file gives (sizes, RoPE,
//! windows, soft-capping). Adding a family is a row here, its tensor names in the worker's
//! `weights.rs` if they differ, and the tests that hold it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

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

    fn unsupported(path: &Path, what: &str, name: &str) -> ModelError {
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

/// How RoPE frequencies are stretched for contexts longer than training (Hugging Face
/// `rope_scaling`, GGUF `rope.scaling.*` and `rope_freqs`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f32,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// YaRN: a per-frequency blend of interpolation and extrapolation, and cos/sin scaled by an
    /// attention factor.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        /// `None`: `0.1 ln(factor) + 1`.
        attention_factor: Option<f32>,
    },
    /// Per-frequency divisors stored in the file (GGUF `rope_freqs.weight`, what llama.cpp's
    /// converter writes for Llama 3.x); the worker reads the tensor.
    FileFactors,
}

/// What rotary embeddings a model uses.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
    /// Sliding-window layers' own base (Gemma 3: 10 000); they take no scaling.
    pub local_theta: Option<f32>,
}

impl RopeConfig {
    /// The base and scaling of one layer, given whether it attends within a window.
    pub fn for_layer(&self, windowed: bool) -> (f32, &RopeScaling) {
        match (windowed, self.local_theta) {
            (true, Some(theta)) => (theta, &RopeScaling::None),
            _ => (self.theta, &self.scaling),
        }
    }
}

/// Inverse frequencies `theta^(-2i/d) / divisor_i` of a head of `head_dim` under `scaling`, and the
/// factor cos and sin are multiplied by (1 but for YaRN). `file_factors` are the divisors of
/// [`RopeScaling::FileFactors`]. Computed in f32, as transformers does.
pub fn rope_inv_freq(
    head_dim: usize,
    theta: f32,
    scaling: &RopeScaling,
    file_factors: Option<&[f32]>,
) -> (Vec<f32>, f32) {
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => (base, 1.0),
        RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::FileFactors => {
            let factors = file_factors.unwrap_or(&[]);
            let freq = base
                .iter()
                .enumerate()
                .map(|(i, f)| f / factors.get(i).copied().unwrap_or(1.0))
                .collect();
            (freq, 1.0)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            let old = *original_context as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let freq = base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (freq, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
        } => {
            let d = head_dim as f32;
            let correction_dim = |rotations: f32| {
                d * (*original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                    / (2.0 * theta.ln())
            };
            let low = correction_dim(*beta_fast).floor().max(0.0);
            let high = correction_dim(*beta_slow).ceil().min(d - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let freq = base
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (f / factor) * (1.0 - extrapolation) + f * extrapolation
                })
                .collect();
            let mscale = attention_factor.unwrap_or(if *factor <= 1.0 {
                1.0
            } else {
                0.1 * factor.ln() + 1.0
            });
            (freq, mscale)
        }
    }
}

/// The hyper-parameters of a decoder of one of the [`FAMILIES`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: &'static Family,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// The longest sequence the model was trained for; strata refuses positions beyond it.
    pub context_length: usize,
    /// The output head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Query, key and value projections have biases.
    pub attention_bias: bool,
    /// Added to every norm weight at load (Gemma's Hugging Face `1 + w`; 0 elsewhere).
    pub norm_offset: f32,
    /// Attention scores are `q·k` times this (`1/sqrt(head_dim)`, or Gemma's
    /// `query_pre_attn_scalar^-0.5`).
    pub attention_scale: f64,
    /// The sliding window of the layers [`ModelConfig::window`] names, in positions.
    pub sliding_window: Option<usize>,
    /// Scores become `cap * tanh(scores / cap)` before the softmax (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Logits become `cap * tanh(logits / cap)` (Gemma 2).
    pub final_softcap: Option<f32>,
}

impl ModelConfig {
    /// Reads the config from GGUF metadata (`{arch}.*` keys, as llama.cpp writes them).
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self, ModelError> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| ModelError::invalid(path, "missing general.architecture"))?;
        let family =
            Family::by_gguf(arch).ok_or_else(|| Family::unsupported(path, "architecture", arch))?;
        let key = |k: &str| md.get(&format!("{arch}.{k}"));
        let get = |k: &str| -> Result<Option<usize>, ModelError> {
            key(k)
                .map(|v| {
                    gguf_usize(v).ok_or_else(|| {
                        ModelError::invalid(path, format!("{arch}.{k} is not an unsigned integer"))
                    })
                })
                .transpose()
        };
        let need = |k: &str| -> Result<usize, ModelError> {
            get(k)?.ok_or_else(|| ModelError::invalid(path, format!("missing {arch}.{k}")))
        };
        let float = |k: &str| key(k).and_then(|v| v.to_f32().ok());
        let tensors = &content.tensor_infos;
        if tensors.contains_key("rope_factors_long.weight") {
            return Err(ModelError::unsupported(
                path,
                "LongRoPE (rope_factors_long/short, Phi-3 128k) is not implemented",
            ));
        }
        if get("expert_count")?.is_some_and(|n| n > 0) {
            return Err(ModelError::unsupported(
                path,
                format!("{arch} with experts: mixture-of-experts models are not supported"),
            ));
        }
        let num_layers = need("block_count")?;
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let num_kv_heads = get("attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = match get("attention.key_length")? {
            Some(k) => k,
            None => hidden_size / num_heads.max(1),
        };
        if let Some(rot) = get("rope.dimension_count")? {
            if rot != head_dim {
                return Err(ModelError::unsupported(
                    path,
                    format!("partial rotary embeddings ({rot} of {head_dim} dimensions) are not implemented"),
                ));
            }
        }
        let rms_norm_eps = float("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| ModelError::invalid(path, "missing attention.layer_norm_rms_epsilon"))?
            as f64;
        let embedding = tensors
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::invalid(path, "missing tensor token_embd.weight"))?;
        let vocab_size = embedding.shape.dims()[0];
        let theta = float("rope.freq_base").unwrap_or(10_000.0);
        let scaling_type = key("rope.scaling.type").and_then(|v| v.to_string().ok());
        let factor = float("rope.scaling.factor");
        let original_context = get("rope.scaling.original_context_length")?;
        let scaling = if tensors.contains_key("rope_freqs.weight") {
            RopeScaling::FileFactors
        } else {
            match scaling_type.map(String::as_str) {
                None | Some("none") => RopeScaling::None,
                Some(_) if factor.is_none_or(|f| f == 1.0) => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: factor.unwrap_or(1.0),
                },
                Some("yarn") => RopeScaling::Yarn {
                    factor: factor.unwrap_or(1.0),
                    original_context: original_context.ok_or_else(|| {
                        ModelError::invalid(path, "YaRN without rope.scaling.original_context_length")
                    })?,
                    beta_fast: float("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                    beta_slow: float("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                    attention_factor: None,
                },
                Some(other) => {
                    return Err(ModelError::unsupported(
                        path,
                        format!("rope scaling {other:?} is not implemented (linear, yarn and Llama 3's rope_freqs are)"),
                    ))
                }
            }
        };
        // llama.cpp's rule for Gemma (GGUF files carry no query_pre_attn_scalar): the 27B models
        // (Gemma 2 with 46 layers, Gemma 3 with 62) scale queries by hidden/heads, the others by
        // head_dim.
        let gemma_27b = matches!((arch.as_str(), num_layers), ("gemma2", 46) | ("gemma3", 62));
        let attention_scale = match float("attention.query_pre_attn_scalar") {
            Some(s) => 1.0 / (s as f64).sqrt(),
            None if gemma_27b => 1.0 / ((hidden_size / num_heads) as f64).sqrt(),
            None => 1.0 / (head_dim as f64).sqrt(),
        };
        let softcap = |k: &str| float(k).filter(|c| *c > 0.0);
        let config = Self {
            family,
            num_layers,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope: RopeConfig {
                theta,
                style: family.gguf_rope,
                scaling,
                local_theta: matches!(family.window_pattern, WindowPattern::AllButEvery(_))
                    .then_some(10_000.0),
            },
            context_length: need("context_length")?,
            tie_word_embeddings: !tensors.contains_key("output.weight"),
            attention_bias: tensors.contains_key("blk.0.attn_q.bias")
                || tensors.contains_key("blk.0.attn_qkv.bias"),
            norm_offset: 0.0,
            attention_scale,
            sliding_window: get("attention.sliding_window")?.filter(|w| *w > 0),
            attn_softcap: softcap("attn_logit_softcapping"),
            final_softcap: softcap("final_logit_softcapping"),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the config from a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| ModelError::invalid(path, format!("config.json: {e}")))?;
        let model_type = value["model_type"].as_str().unwrap_or("llama").to_string();
        // Multimodal Gemma 3 checkpoints nest the text model's config.
        let text = match value.get("text_config") {
            Some(inner) if model_type == "gemma3" => inner.clone(),
            _ => value,
        };
        let family = Family::by_hf(&model_type)
            .ok_or_else(|| Family::unsupported(path, "model_type", &model_type))?;
        let raw: HfConfig = serde_json::from_value(text)
            .map_err(|e| ModelError::invalid(path, format!("config.json: {e}")))?;
        if raw.mlp_bias == Some(true) {
            return Err(ModelError::unsupported(path, "mlp_bias is not implemented"));
        }
        if raw.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return Err(ModelError::unsupported(
                path,
                "partial rotary embeddings (partial_rotary_factor) are not implemented",
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let scaling = match raw.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            None => RopeScaling::None,
            Some(s) => hf_rope_scaling(path, s, raw.max_position_embeddings)?,
        };
        // Qwen2/3 keep `sliding_window` in every config but use it only with `use_sliding_window`.
        let sliding_window = match raw.use_sliding_window {
            Some(false) => None,
            _ if family.gguf_architecture.starts_with("qwen")
                && raw.use_sliding_window.is_none() =>
            {
                None
            }
            _ => raw.sliding_window.filter(|w| *w > 0),
        };
        if let Some(types) = &raw.layer_types {
            check_layer_types(path, family, types, raw.num_hidden_layers)?;
        }
        let config = Self {
            family,
            num_layers: raw.num_hidden_layers,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope: RopeConfig {
                theta: raw.rope_theta.unwrap_or(10_000.0),
                style: RopeStyle::Halves,
                scaling,
                local_theta: matches!(family.window_pattern, WindowPattern::AllButEvery(_))
                    .then(|| raw.rope_local_base_freq.unwrap_or(10_000.0)),
            },
            context_length: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(family.ties_by_default),
            attention_bias: family.attention_bias || raw.attention_bias.unwrap_or(false),
            norm_offset: if family.hf_norm_offset { 1.0 } else { 0.0 },
            attention_scale: 1.0 / raw.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt(),
            sliding_window,
            attn_softcap: raw.attn_logit_softcapping.filter(|c| *c > 0.0),
            final_softcap: raw.final_logit_softcapping.filter(|c| *c > 0.0),
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
        if !(self.rope.theta > 0.0 && self.rope.theta.is_finite()) {
            return fail(format!("RoPE base {} must be positive", self.rope.theta));
        }
        Ok(())
    }

    /// The window layer `layer` attends within, if it slides.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        let slides = match self.family.window_pattern {
            WindowPattern::AllLayers => true,
            WindowPattern::EvenLayers => layer.is_multiple_of(2),
            WindowPattern::AllButEvery(n) => !(layer + 1).is_multiple_of(n),
        };
        slides.then_some(window)
    }

    /// The factor applied to the token embedding (Gemma's `sqrt(hidden)`).
    pub fn embedding_scale(&self) -> Option<f64> {
        self.family
            .scaled_embedding
            .then(|| (self.hidden_size as f64).sqrt())
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

/// Newer transformers configs list each layer's attention; strata derives it from the family's
/// pattern, so a list that disagrees is refused rather than silently run differently.
fn check_layer_types(
    path: &Path,
    family: &Family,
    types: &[String],
    layers: usize,
) -> Result<(), ModelError> {
    let expected = |i: usize| match family.window_pattern {
        WindowPattern::AllLayers => None,
        WindowPattern::EvenLayers => Some(i.is_multiple_of(2)),
        WindowPattern::AllButEvery(n) => Some(!(i + 1).is_multiple_of(n)),
    };
    for (i, t) in types.iter().enumerate().take(layers) {
        let slides = t == "sliding_attention";
        if let Some(want) = expected(i) {
            if slides != want {
                return Err(ModelError::unsupported(
                    path,
                    format!(
                        "layer_types[{i}] = {t:?} departs from {family}'s sliding/global pattern"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn hf_rope_scaling(
    path: &Path,
    s: &serde_json::Value,
    max_positions: usize,
) -> Result<RopeScaling, ModelError> {
    let kind = s["rope_type"]
        .as_str()
        .or_else(|| s["type"].as_str())
        .unwrap_or("default");
    let num = |k: &str| s[k].as_f64().map(|v| v as f32);
    let factor = num("factor").unwrap_or(1.0);
    let original = s["original_max_position_embeddings"]
        .as_u64()
        .map(|v| v as usize);
    let bad = |m: &str| ModelError::invalid(path, format!("rope_scaling {s}: {m}"));
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor },
        "llama3" => RopeScaling::Llama3 {
            factor,
            low_freq_factor: num("low_freq_factor").ok_or_else(|| bad("no low_freq_factor"))?,
            high_freq_factor: num("high_freq_factor").ok_or_else(|| bad("no high_freq_factor"))?,
            original_context: original.ok_or_else(|| bad("no original_max_position_embeddings"))?,
        },
        "yarn" => {
            if s.get("mscale").is_some_and(|v| !v.is_null())
                || s.get("mscale_all_dim").is_some_and(|v| !v.is_null())
            {
                return Err(ModelError::unsupported(
                    path,
                    "YaRN with mscale/mscale_all_dim is not implemented",
                ));
            }
            if s["truncate"].as_bool() == Some(false) {
                return Err(ModelError::unsupported(
                    path,
                    "YaRN with truncate: false is not implemented",
                ));
            }
            RopeScaling::Yarn {
                factor,
                original_context: original.unwrap_or(max_positions),
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                attention_factor: num("attention_factor"),
            }
        }
        other => {
            return Err(ModelError::unsupported(
                path,
                format!(
                    "rope_scaling type {other:?} is not implemented (linear, llama3 and yarn are)"
                ),
            ))
        }
    })
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

/// The fields of a Hugging Face `config.json` that strata reads, across the families.
#[derive(Debug, Deserialize)]
struct HfConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_local_base_freq: Option<f32>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    partial_rotary_factor: Option<f32>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f32>,
    final_logit_softcapping: Option<f32>,
    #[serde(flatten)]
    _rest: HashMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(json: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_hf_json(Path::new("x"), json)
    }

    const BASE: &str = r#""num_hidden_layers":12,"hidden_size":64,
        "intermediate_size":128,"num_attention_heads":4,"vocab_size":300,"rms_norm_eps":1e-5,
        "max_position_embeddings":512"#;

    #[test]
    fn hf_config_reads_defaults() -> Result<(), ModelError> {
        let c = hf(&format!(r#"{{"model_type":"llama",{BASE}}}"#))?;
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope.theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rope.style, RopeStyle::Halves);
        assert_eq!(c.attention_scale, 0.25);
        assert_eq!(c.window(0), None);
        Ok(())
    }

    #[test]
    fn hf_config_rejects_bad_heads_and_other_models() {
        let json = r#"{"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
            "intermediate_size":128,"num_attention_heads":4,"num_key_value_heads":3,
            "vocab_size":300,"rms_norm_eps":1e-5,"max_position_embeddings":512}"#;
        let err = hf(json).unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
        let err = hf(&json.replace("\"llama\"", "\"gpt2\"")).unwrap_err();
        assert!(err.to_string().contains("\"gpt2\""), "{err}");
        assert!(
            err.to_string()
                .contains("qwen2, qwen3, gemma2, gemma3, phi3"),
            "{err}"
        );
        let err = hf(&json.replace("\"llama\"", "\"mixtral\"")).unwrap_err();
        assert!(err.to_string().contains("mixture-of-experts"), "{err}");
    }

    /// What each family's config makes of the block, one row per family.
    #[test]
    fn families_read_their_traits() -> Result<(), ModelError> {
        // (model_type and extra fields, family, bias, norm offset, tied, windows of layers 0..6)
        type Row = (
            &'static str,
            &'static str,
            bool,
            f32,
            bool,
            [Option<usize>; 6],
        );
        let none = [None; 6];
        let rows: &[Row] = &[
            (
                r#""model_type":"mistral","sliding_window":4096"#,
                "llama",
                false,
                0.0,
                false,
                [Some(4096); 6],
            ),
            (
                r#""model_type":"qwen2","sliding_window":4096,"use_sliding_window":false,"tie_word_embeddings":true"#,
                "qwen2",
                true,
                0.0,
                true,
                none,
            ),
            (
                r#""model_type":"qwen3","head_dim":32,"sliding_window":null"#,
                "qwen3",
                false,
                0.0,
                false,
                none,
            ),
            (
                r#""model_type":"gemma3_text","sliding_window":512,"query_pre_attn_scalar":256"#,
                "gemma3",
                false,
                1.0,
                true,
                [Some(512), Some(512), Some(512), Some(512), Some(512), None],
            ),
            (
                r#""model_type":"gemma2","sliding_window":4096,"attn_logit_softcapping":50.0"#,
                "gemma2",
                false,
                1.0,
                true,
                [Some(4096), None, Some(4096), None, Some(4096), None],
            ),
            (
                r#""model_type":"phi3","sliding_window":2047"#,
                "phi3",
                false,
                0.0,
                false,
                [Some(2047); 6],
            ),
        ];
        for (extra, family, bias, offset, tied, windows) in rows {
            let c = hf(&format!("{{{extra},{BASE}}}"))?;
            assert_eq!(c.family.gguf_architecture, *family, "{extra}");
            assert_eq!(c.attention_bias, *bias, "{extra}");
            assert_eq!(c.norm_offset, *offset, "{extra}");
            assert_eq!(c.tie_word_embeddings, *tied, "{extra}");
            let got: Vec<_> = (0..6).map(|i| c.window(i)).collect();
            assert_eq!(got, windows.to_vec(), "{extra}");
        }
        let gemma = hf(&format!(
            r#"{{"model_type":"gemma3_text","query_pre_attn_scalar":256,"rope_local_base_freq":10000,{BASE}}}"#
        ))?;
        assert_eq!(gemma.attention_scale, 1.0 / 16.0);
        assert_eq!(gemma.rope.for_layer(true).0, 10_000.0);
        assert_eq!(gemma.embedding_scale(), Some(8.0));
        Ok(())
    }

    #[test]
    fn layer_types_that_depart_from_the_pattern_are_refused() {
        let types: Vec<&str> = (0..12).map(|_| "full_attention").collect();
        let json = format!(
            r#"{{"model_type":"gemma3_text","sliding_window":512,"layer_types":{},{BASE}}}"#,
            serde_json::to_string(&types).unwrap()
        );
        let err = hf(&json).unwrap_err();
        assert!(err.to_string().contains("layer_types[0]"), "{err}");
    }

    #[test]
    fn rope_scaling_is_read_and_unknown_kinds_refused() -> Result<(), ModelError> {
        let llama3 = r#""rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#;
        let c = hf(&format!(r#"{{"model_type":"llama",{llama3},{BASE}}}"#))?;
        assert!(matches!(
            c.rope.scaling,
            RopeScaling::Llama3 {
                original_context: 8192,
                ..
            }
        ));
        let err = hf(&format!(
            r#"{{"model_type":"llama","rope_scaling":{{"type":"longrope","factor":2}},{BASE}}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("longrope"), "{err}");
        Ok(())
    }

    /// Llama 3's frequency rule on known points: high frequencies kept, low ones divided by the
    /// factor, the band between blended; the same divisors given as file factors agree.
    #[test]
    fn llama3_frequencies_and_file_factors_agree() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192,
        };
        let (plain, _) = rope_inv_freq(128, 500_000.0, &RopeScaling::None, None);
        let (scaled, mscale) = rope_inv_freq(128, 500_000.0, &scaling, None);
        assert_eq!(mscale, 1.0);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
        let blended = (0..64)
            .filter(|&i| scaled[i] != plain[i] && (scaled[i] - plain[i] / 8.0).abs() > 1e-12);
        assert!(blended.count() > 0);
        let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        let (from_file, _) =
            rope_inv_freq(128, 500_000.0, &RopeScaling::FileFactors, Some(&factors));
        for (a, b) in from_file.iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        }
    }

    /// YaRN's ramp: the first (fast) frequencies extrapolate, the last interpolate, and cos/sin
    /// scale by 0.1 ln(factor) + 1.
    #[test]
    fn yarn_ramps_between_extrapolation_and_interpolation() {
        let scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_context: 32768,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        };
        let (plain, _) = rope_inv_freq(128, 1_000_000.0, &RopeScaling::None, None);
        let (yarn, mscale) = rope_inv_freq(128, 1_000_000.0, &scaling, None);
        assert_eq!(yarn[0], plain[0]);
        assert!((yarn[63] - plain[63] / 4.0).abs() < 1e-12);
        assert!((mscale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    }
}
