//! The config from GGUF metadata (`{arch}.*` keys, as llama.cpp writes them).

use std::path::Path;

use candle_core::quantized::gguf_file;

use super::{Family, ModelConfig, RopeConfig, RopeScaling, WindowPattern};
use crate::ModelError;

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
