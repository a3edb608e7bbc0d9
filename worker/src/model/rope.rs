//! Rotary position embeddings: cos/sin tables computed once per stage for the whole context.

use candle_core::{DType, Device, Result, Tensor};
use strata_model::config::{rope_inv_freq, RopeScaling, RopeStyle};
use strata_model::ModelConfig;

/// cos/sin of `position * inv_freq_i` for every position of the context, `[context, head_dim/2]`
/// (times YaRN's attention factor, where it applies).
#[derive(Debug)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    head_dim: usize,
    /// The head's inverse frequencies, scaling applied (`strata_model::config::rope_inv_freq`).
    inv_freq: Vec<f32>,
    /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    mscale: f32,
    /// Whether `rows` slices the precomputed table (the default) or recomputes the rows each call
    /// (kept only to measure what the table saves).
    reuse: bool,
}

impl RopeTable {
    /// The table of layers with base `theta` and `scaling`; `file_factors` are the divisors of
    /// [`RopeScaling::FileFactors`] (GGUF `rope_freqs.weight`).
    pub fn new(
        config: &ModelConfig,
        (theta, scaling): (f32, &RopeScaling),
        file_factors: Option<&[f32]>,
        dtype: DType,
        device: &Device,
        reuse: bool,
    ) -> Result<Self> {
        let (inv_freq, mscale) = rope_inv_freq(config.head_dim, theta, scaling, file_factors);
        let positions: Vec<u32> = if reuse {
            (0..config.context_length as u32).collect()
        } else {
            vec![0]
        };
        let (cos, sin) = compute(&inv_freq, mscale, &positions, dtype, device)?;
        Ok(Self {
            cos,
            sin,
            style: config.rope.style,
            head_dim: config.head_dim,
            inv_freq,
            mscale,
            reuse,
        })
    }

    /// Each row's row in the tables [`RopeTable::angles`] works from: its position when the table is
    /// kept, else its index in the step (the rows are computed for the step). Fails on a position
    /// past the table.
    pub fn row_index(&self, positions: &[u32]) -> Result<Vec<u32>> {
        if !self.reuse {
            return Ok((0..positions.len() as u32).collect());
        }
        let rows = self.cos.dim(0)?;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= rows) {
            candle_core::bail!("position {p} is past the RoPE table's {rows} positions");
        }
        Ok(positions.to_vec())
    }

    /// The angles of a step's rows at `positions`; `index` is [`RopeTable::row_index`] of them on
    /// the device. `indexed`: for the fused pool write, which reads the tables by index (no per-step
    /// copy of the rows); otherwise cos and sin of each row for [`RopeTable::apply`].
    pub fn angles(&self, positions: &[u32], index: Tensor, indexed: bool) -> Result<RopeAngles> {
        let device = index.device().clone();
        let (cos, sin) = if self.reuse {
            if indexed {
                return Ok(RopeAngles::Indexed {
                    cos: self.cos.clone(),
                    sin: self.sin.clone(),
                    index,
                });
            }
            (
                self.cos.index_select(&index, 0)?,
                self.sin.index_select(&index, 0)?,
            )
        } else {
            compute(
                &self.inv_freq,
                self.mscale,
                positions,
                self.cos.dtype(),
                &device,
            )?
        };
        if indexed {
            return Ok(RopeAngles::Indexed { cos, sin, index });
        }
        let shape = (positions.len(), 1, self.head_dim / 2);
        Ok(RopeAngles::PerRow {
            cos: cos.reshape(shape)?,
            sin: sin.reshape(shape)?,
        })
    }

    /// Whether the table is kept for every position (else each step computes its rows from the
    /// positions on the host).
    pub fn keeps_table(&self) -> bool {
        self.reuse
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

/// RoPE angles of a step's rows.
#[derive(Debug)]
pub enum RopeAngles {
    /// cos and sin of each row, `[rows, 1, head_dim/2]` (what [`RopeTable::apply`] takes).
    PerRow { cos: Tensor, sin: Tensor },
    /// Tables `[n, head_dim/2]` and each row's row in them, `[rows]` (u32): what the fused pool
    /// write reads.
    Indexed {
        cos: Tensor,
        sin: Tensor,
        index: Tensor,
    },
}

impl RopeAngles {
    /// cos and sin of each row; fails for indexed angles (a step planned for the fused write).
    pub fn per_row(&self) -> Result<(&Tensor, &Tensor)> {
        match self {
            Self::PerRow { cos, sin } => Ok((cos, sin)),
            Self::Indexed { .. } => {
                candle_core::bail!("RoPE angles of a fused-write step used outside the fused write")
            }
        }
    }
}

fn compute(
    inv_freq: &[f32],
    mscale: f32,
    positions: &[u32],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv_freq = Tensor::from_vec(inv_freq.to_vec(), (1, inv_freq.len()), device)?;
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (positions.len(), 1), device)?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let (cos, sin) = if mscale == 1.0 {
        (cos, sin)
    } else {
        ((cos * mscale as f64)?, (sin * mscale as f64)?)
    };
    Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
}
