//! Rotary position embeddings: cos/sin tables computed once per stage for the whole context.

use candle_core::{DType, Device, Result, Tensor};
use strata_model::config::RopeStyle;
use strata_model::LlamaConfig;

/// cos/sin of `position * theta^(-2i/d)` for every position of the context, `[context, head_dim/2]`.
#[derive(Debug)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    head_dim: usize,
    theta: f32,
    /// Whether `rows` slices the precomputed table (the default) or recomputes the rows each call
    /// (kept only to measure what the table saves).
    reuse: bool,
}

impl RopeTable {
    pub fn new(config: &LlamaConfig, dtype: DType, device: &Device, reuse: bool) -> Result<Self> {
        let positions: Vec<u32> = if reuse {
            (0..config.context_length as u32).collect()
        } else {
            vec![0]
        };
        let (cos, sin) = compute(
            config.head_dim,
            config.rope_theta,
            &positions,
            dtype,
            device,
        )?;
        Ok(Self {
            cos,
            sin,
            style: config.rope_style,
            head_dim: config.head_dim,
            theta: config.rope_theta,
            reuse,
        })
    }

    /// cos and sin for the given positions (one per row), shaped `[rows, 1, head_dim/2]` so that rows
    /// of different sequences at different positions rotate in one call.
    pub fn rows(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = if self.reuse {
            let index = Tensor::from_slice(positions, positions.len(), device)?;
            (
                self.cos.index_select(&index, 0)?,
                self.sin.index_select(&index, 0)?,
            )
        } else {
            compute(
                self.head_dim,
                self.theta,
                positions,
                self.cos.dtype(),
                device,
            )?
        };
        let shape = (positions.len(), 1, self.head_dim / 2);
        Ok((cos.reshape(shape)?, sin.reshape(shape)?))
    }

    /// Whether pairs are `(2i, 2i + 1)` (GGUF) rather than halves `(i, i + head_dim/2)`.
    pub fn interleaved(&self) -> bool {
        matches!(self.style, RopeStyle::Interleaved)
    }

    /// Rotates `x: [rows, heads, 1, head_dim]` with tables from [`RopeTable::rows`].
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
            RopeStyle::Halves => candle_nn::rotary_emb::rope(x, cos, sin),
        }
    }
}

fn compute(
    head_dim: usize,
    theta: f32,
    positions: &[u32],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (positions.len(), 1), device)?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
