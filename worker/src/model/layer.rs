//! One transformer block of a Llama model, run on a micro-batch of sequences at once.
//!
//! The projections and the feed-forward network see every row of the micro-batch together (the weights
//! are read once per step, whatever the number of sequences); attention runs per sequence against that
//! sequence's own cache. Rows of one sequence never meet rows of another, so no padding and no
//! cross-sequence masks are needed, and a sequence's result does not depend on its batch-mates.
//!
//! With a paged pool (accelerators, `kv_pool.rs`) attention instead reads every decoding sequence's
//! history in one gather and runs as one padded batch: a few kernels per layer, not a few per sequence.

use candle_core::{Result, Tensor};
use strata_model::config::Activation;
use strata_model::ModelConfig;

use super::cpu_kernels::Isa;
use super::kv_cache::SequenceKv;
use super::kv_pool::KvPool;
use super::linear::Linear;
use super::mask::MaskCache;
use super::paged_step::PagedStep;
use super::phase_timer::PhaseTimer;
use super::rope::{RopeAngles, RopeTable};
use super::weights::{Role, WeightLoader};
use crate::WorkerError;

mod attention;
mod projections;

use projections::Projections;

/// `gelu_tanh` as llama.cpp's CPU backend computes it, the engine GGUF files are made for and
/// checked against: the input rounded to f16 and the result read from an f16 table
/// (`GGML_GELU_FP16`, `ggml_vec_geglu_f32`), exact beyond ±10. The rounding moves each element by up
/// to 2⁻¹¹ of itself, enough to flip the 8-bit activation rounding of the next projection here and
/// there; matching it keeps Gemma's tokens on llama.cpp's (BENCHMARKS.md, GELU).
fn gelu_through_f16(x: &Tensor) -> Result<Tensor> {
    use candle_core::DType::{F16, F32};
    let rounded = x.to_dtype(F16)?.to_dtype(F32)?;
    let table = rounded.gelu()?.to_dtype(F16)?.to_dtype(F32)?;
    // Beyond ±10 llama.cpp takes x (or 0) itself, as f32.
    let big = x.abs()?.ge(10.0)?;
    let outside = x.relu()?;
    big.where_cond(&outside, &table)
}

/// Where one sequence's rows sit in the micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// First row of the sequence in the batch.
    pub offset: usize,
    /// Number of new positions.
    pub len: usize,
    /// Positions cached before this step.
    pub start_pos: usize,
}

/// What every layer of a step shares.
pub struct StepContext<'a> {
    pub segments: &'a [Segment],
    /// RoPE angles of the step's rows for each of the stage's tables (a layer reads its own):
    /// per row, or indexed when the fused pool write rotates.
    pub angles: Vec<RopeAngles>,
    pub ropes: &'a [RopeTable],
    pub masks: &'a mut MaskCache,
    pub max_len: usize,
    /// The stage's pool and this step's indexes into it, when the stage keeps paged caches.
    pub paged: Option<(&'a KvPool, &'a PagedStep)>,
    /// Residual add + RMSNorm and SiLU · up as one CUDA kernel each (`fused_ops`).
    pub fused_ops: bool,
    /// The history length from which CUDA decode attention runs its wide variant.
    pub attention_wide_from: usize,
    /// The instruction set CPU attention runs strata's kernel on where it applies
    /// (`cpu_attention.rs`); `None`: candle's.
    pub cpu_attention: Option<Isa>,
    /// The marks of `--phase-times`.
    pub timer: PhaseTimer,
}

/// A transformer block. Every family runs through this one block; its description
/// (`strata_model::config::Family` and the model's `ModelConfig`) decides which optional parts exist.
#[derive(Debug)]
pub struct Layer {
    attn_norm: Tensor,
    /// Query, key and value projections (and their biases, where the family has them).
    qkv: Projections,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norms: Option<(Tensor, Tensor)>,
    o: Linear,
    /// RMSNorm of attention's output before the residual add (Gemma).
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// Gate and up projections.
    gate_up: Projections,
    down: Linear,
    /// RMSNorm of the feed-forward output before the residual add (Gemma).
    post_ffn_norm: Option<Tensor>,
    activation: Activation,
    /// GELU as llama.cpp's CPU backend computes it (GGUF files): see [`gelu_through_f16`].
    gelu_through_f16: bool,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
    /// What attention scores are multiplied by (`ModelConfig::attention_scale`).
    scale: f64,
    /// Whether the query weights already carry `scale` (see `Layer::load`).
    q_prescaled: bool,
    /// The sliding window this layer attends within, if it slides.
    window: Option<usize>,
    /// Soft-capping of attention scores (Gemma 2).
    softcap: Option<f32>,
    /// Which of the stage's RoPE tables this layer reads.
    rope: usize,
}

impl Layer {
    /// Loads block `i`; `rope` is the index of the stage's RoPE table for it.
    pub fn load(
        w: &mut WeightLoader<'_>,
        i: usize,
        c: &ModelConfig,
        rope: usize,
        fuse: bool,
    ) -> std::result::Result<Self, WorkerError> {
        let family = c.family;
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let biases = if c.attention_bias && !family.fused_tensors {
            Some(vec![
                w.dense(Role::QueryBias(i))?,
                w.dense(Role::KeyBias(i))?,
                w.dense(Role::ValueBias(i))?,
            ])
        } else {
            None
        };
        let qk_norms = if family.qk_norm {
            Some((w.norm(Role::QueryNorm(i))?, w.norm(Role::KeyNorm(i))?))
        } else {
            None
        };
        // With dense weights, no bias or q-norm after the projection, and a power-of-two scale
        // (head_dim 64, 256, ...) the query projection can carry the scale exactly (RoPE is linear
        // and scaling by 2^-k rounds nothing): one kernel fewer per layer, bit-identical results.
        let prescalable = c.attention_scale.log2().fract() == 0.0
            && biases.is_none()
            && qk_norms.is_none()
            && !family.fused_tensors;
        let (qkv, gate_up, q_prescaled) = if family.fused_tensors {
            (
                Projections::prefused(w.linear(Role::Qkv(i))?, vec![q_width, kv_width, kv_width]),
                Projections::prefused(
                    w.linear(Role::GateUp(i))?,
                    vec![c.intermediate_size, c.intermediate_size],
                ),
                false,
            )
        } else {
            let (q, q_prescaled) = match w.linear(Role::Query(i))? {
                Linear::Dense(weight) if prescalable => {
                    (Linear::Dense((weight * c.attention_scale)?), true)
                }
                other => (other, false),
            };
            (
                Projections::new(
                    vec![q, w.linear(Role::Key(i))?, w.linear(Role::Value(i))?],
                    biases,
                    fuse,
                )?,
                Projections::new(
                    vec![w.linear(Role::Gate(i))?, w.linear(Role::Up(i))?],
                    None,
                    fuse,
                )?,
                q_prescaled,
            )
        };
        let sandwich = |w: &mut WeightLoader<'_>, role| {
            family.sandwich_norms.then(|| w.norm(role)).transpose()
        };
        Ok(Self {
            attn_norm: w.norm(Role::AttnNorm(i))?,
            qkv,
            qk_norms,
            o: w.linear(Role::AttnOutput(i))?,
            post_attn_norm: sandwich(w, Role::PostAttnNorm(i))?,
            ffn_norm: w.norm(Role::FfnNorm(i))?,
            gate_up,
            down: w.linear(Role::Down(i))?,
            post_ffn_norm: sandwich(w, Role::PostFfnNorm(i))?,
            activation: family.activation,
            gelu_through_f16: w.is_gguf(),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps as f32,
            scale: c.attention_scale,
            q_prescaled,
            window: c.window(i),
            softcap: c.attn_softcap,
            rope,
        })
    }

    /// Whether this layer's queries and keys are normed after the projection (the fused CUDA
    /// RoPE-and-write kernel rotates the projection's output directly, so it cannot run here).
    pub fn has_qk_norm(&self) -> bool {
        self.qk_norms.is_some()
    }

    /// Whether attention scores are soft-capped (the fused CUDA decode kernel does not cap).
    pub fn has_softcap(&self) -> bool {
        self.softcap.is_some()
    }

    /// Whether q, k and v come out of one matmul (what the fused pool write reads).
    pub fn has_fused_qkv(&self) -> bool {
        matches!(self.qkv, Projections::Fused { .. })
    }

    pub fn weight_bytes(&self) -> usize {
        let norms = [
            Some(&self.attn_norm),
            Some(&self.ffn_norm),
            self.post_attn_norm.as_ref(),
            self.post_ffn_norm.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum::<usize>();
        self.qkv.weight_bytes()
            + self.o.weight_bytes()
            + self.gate_up.weight_bytes()
            + self.down.weight_bytes()
            + norms
    }

    /// Runs the block on the residual stream `x: [rows, hidden]` plus `pending`, the previous
    /// block's feed-forward output not yet added to it: the add shares one kernel with this block's
    /// first norm on CUDA. Returns the stream after attention and this block's feed-forward output,
    /// again not yet added (the caller adds the last one). Appends this layer's keys and values of
    /// every sequence (`caches[s]` belongs to `ctx.segments[s]`) to its cache at index `layer`.
    pub fn forward(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        layer: usize,
        caches: &mut [SequenceKv],
        ctx: &mut StepContext<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let rows = x.dim(0)?;
        let (x, h) = add_pending_and_norm(x, pending, &self.attn_norm, self.eps, ctx.fused_ops)?;
        let attn = match ctx.paged.filter(|(_, step)| step.fused_write) {
            Some((pool, step)) => self.attend_fused(&h, pool, layer, step, ctx)?,
            None => {
                let [q, k, v] = self.qkv.forward::<3>(&h)?;
                let q = q.reshape((rows, self.num_heads, 1, self.head_dim))?;
                let k = k.reshape((rows, self.num_kv_heads, 1, self.head_dim))?;
                let v = v.reshape((rows, self.num_kv_heads, self.head_dim))?;
                let (q, k) = match &self.qk_norms {
                    Some((q_norm, k_norm)) => (
                        candle_nn::ops::rms_norm(&q, q_norm, self.eps)?,
                        candle_nn::ops::rms_norm(&k, k_norm, self.eps)?,
                    ),
                    None => (q, k),
                };
                let rope = &ctx.ropes[self.rope];
                let (cos, sin) = ctx.angles[self.rope].per_row()?;
                let q = rope.apply(&q, cos, sin)?.squeeze(2)?;
                let k = rope.apply(&k, cos, sin)?.squeeze(2)?;
                ctx.timer.mark(x.device(), "norm, qkv, rope");
                match ctx.paged {
                    Some((pool, step)) => {
                        let (keys, values) = pool.layer(layer);
                        keys.scatter_set(&step.write, &k.transpose(0, 1)?.contiguous()?, 1)?;
                        values.scatter_set(&step.write, &v.transpose(0, 1)?.contiguous()?, 1)?;
                        self.attend_paged(&q, pool, layer, step, ctx)?
                    }
                    None => self.attend_each(&q, &k, &v, layer, caches, ctx)?,
                }
            }
        };
        ctx.timer.mark(x.device(), "attention");
        let attn = self.o.forward(&attn)?;
        let attn = match &self.post_attn_norm {
            Some(norm) => candle_nn::ops::rms_norm(&attn, norm, self.eps)?,
            None => attn,
        };
        let (x, h) = add_rms_norm(&x, &attn, &self.ffn_norm, self.eps, ctx.fused_ops)?;
        ctx.timer.mark(x.device(), "output projection");

        let ffn = self.gated_activation(&h, ctx.fused_ops)?;
        let out = self.down.forward(&ffn)?;
        let out = match &self.post_ffn_norm {
            Some(norm) => candle_nn::ops::rms_norm(&out, norm, self.eps)?,
            None => out,
        };
        ctx.timer.mark(x.device(), "feed-forward");
        Ok((x, out))
    }

    /// `act(gate) * up` of the normed input: for SiLU, one kernel over the fused gate/up
    /// projection on CUDA (`fused` and fused weights); else an activation and a product (GELU has
    /// no fused kernel).
    fn gated_activation(&self, h: &Tensor, fused: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused && self.activation == Activation::Silu {
            if let Some(y) = self.gate_up.fused_output(h)? {
                return super::fused_ops::silu_mul(&y);
            }
        }
        let _ = fused;
        let [gate, up] = self.gate_up.forward::<2>(h)?;
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh if self.gelu_through_f16 => gelu_through_f16(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        gate * up
    }
}

/// The residual stream `x` with `pending` (a block's feed-forward output not yet added) added, and
/// its RMSNorm with `weight`; the add and the norm are one kernel on CUDA (`fused`).
pub fn add_pending_and_norm(
    x: &Tensor,
    pending: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    match pending {
        Some(delta) => add_rms_norm(x, delta, weight, eps, fused),
        None => Ok((x.clone(), candle_nn::ops::rms_norm(x, weight, eps)?)),
    }
}

/// `x + delta` and its RMSNorm with `weight`: one kernel on CUDA (`fused`), else an add and a norm.
fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused {
        return super::fused_ops::add_rms_norm(x, delta, weight, eps);
    }
    let _ = fused;
    let x = (x + delta)?;
    let h = candle_nn::ops::rms_norm(&x, weight, eps)?;
    Ok((x, h))
}

/// Parts' rows one after another (no copy for a single part).
fn stack_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    Tensor::cat(&parts, 0)
}
