//! The shape of a decoder-only transformer, from GGUF metadata or a Hugging Face `config.json`.
//!
//! Every supported family runs through one block implementation; what differs between families is
//! data: a [`Family`] row of [`FAMILIES`] (which GGUF architecture and `model_type` names it answers
//! to, and the block's structural traits), plus the per-model numbers each file gives (sizes, RoPE,
//! windows, soft-capping). Adding a family is a row in `family.rs`, its tensor names in the worker's
//! `weights.rs` if they differ, and the tests that hold it.
//!
//! - `family.rs`: the families and their block traits.
//! - `rope.rs`: rotary embeddings, their scalings and frequencies.
//! - `gguf.rs` and `hf.rs`: reading the config from each file format.

use std::path::Path;

use crate::ModelError;

mod family;
mod gguf;
mod hf;
mod rope;
#[cfg(test)]
mod tests;

pub use family::{Activation, Family, RopeStyle, WindowPattern, FAMILIES};
pub use rope::{rope_inv_freq, RopeConfig, RopeScaling};

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
