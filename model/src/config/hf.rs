//! The config from a Hugging Face `config.json`.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::{Family, ModelConfig, RopeConfig, RopeScaling, RopeStyle, WindowPattern};
use crate::ModelError;

impl ModelConfig {
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
