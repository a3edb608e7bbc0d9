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
use strata_model::LlamaConfig;

use super::kv_cache::SequenceKv;
use super::kv_pool::KvPool;
use super::linear::Linear;
use super::mask::MaskCache;
use super::paged_step::{DecodeBatch, PagedStep};
use super::phase_timer;
use super::rope::{RopeAngles, RopeTable};
use super::weights::{Role, WeightLoader};
use crate::WorkerError;

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
    /// RoPE angles of the step's rows: per row, or indexed when the fused pool write rotates.
    pub angles: RopeAngles,
    pub rope: &'a RopeTable,
    pub masks: &'a mut MaskCache,
    pub max_len: usize,
    /// The stage's pool and this step's indexes into it, when the stage keeps paged caches.
    pub paged: Option<(&'a KvPool, &'a PagedStep)>,
    /// Residual add + RMSNorm and SiLU · up as one CUDA kernel each (`fused_ops`).
    pub fused_ops: bool,
}

/// A transformer block.
#[derive(Debug)]
pub struct Layer {
    attn_norm: Tensor,
    /// Query, key and value projections.
    qkv: Projections,
    o: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections.
    gate_up: Projections,
    down: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
    /// Whether the query weights already carry attention's `1/sqrt(head_dim)` (see `Layer::load`).
    q_prescaled: bool,
}

impl Layer {
    pub fn load(
        w: &mut WeightLoader<'_>,
        i: usize,
        c: &LlamaConfig,
        fuse: bool,
    ) -> std::result::Result<Self, WorkerError> {
        // With dense weights and a power-of-two scale (head_dim 64, 256, ...) the query projection
        // can carry the scale exactly (RoPE is linear and scaling by 2^-k rounds nothing): one
        // kernel fewer per layer, bit-identical results.
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let (q, q_prescaled) = match w.linear(Role::Query(i))? {
            Linear::Dense(weight) if scale.log2().fract() == 0.0 => {
                (Linear::Dense((weight * scale)?), true)
            }
            other => (other, false),
        };
        Ok(Self {
            attn_norm: w.dense(Role::AttnNorm(i))?,
            qkv: Projections::new(
                vec![q, w.linear(Role::Key(i))?, w.linear(Role::Value(i))?],
                fuse,
            )?,
            o: w.linear(Role::AttnOutput(i))?,
            ffn_norm: w.dense(Role::FfnNorm(i))?,
            gate_up: Projections::new(
                vec![w.linear(Role::Gate(i))?, w.linear(Role::Up(i))?],
                fuse,
            )?,
            down: w.linear(Role::Down(i))?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps as f32,
            q_prescaled,
        })
    }

    /// Whether q, k and v come out of one matmul (what the fused pool write reads).
    pub fn has_fused_qkv(&self) -> bool {
        matches!(self.qkv, Projections::Fused { .. })
    }

    pub fn weight_bytes(&self) -> usize {
        let norms = (self.attn_norm.elem_count() + self.ffn_norm.elem_count())
            * self.attn_norm.dtype().size_in_bytes();
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
                let (cos, sin) = ctx.angles.per_row()?;
                let q = ctx.rope.apply(&q, cos, sin)?.squeeze(2)?;
                let k = ctx.rope.apply(&k, cos, sin)?.squeeze(2)?;
                phase_timer::mark(x.device(), "norm, qkv, rope");
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
        phase_timer::mark(x.device(), "attention");
        let (x, h) = add_rms_norm(
            &x,
            &self.o.forward(&attn)?,
            &self.ffn_norm,
            self.eps,
            ctx.fused_ops,
        )?;
        phase_timer::mark(x.device(), "output projection");

        let ffn = self.gated_activation(&h, ctx.fused_ops)?;
        let out = self.down.forward(&ffn)?;
        phase_timer::mark(x.device(), "feed-forward");
        Ok((x, out))
    }

    /// `silu(gate) * up` of the normed input: one kernel over the fused gate/up projection on CUDA
    /// (`fused` and fused weights), else an activation and a product.
    fn gated_activation(&self, h: &Tensor, fused: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused {
            if let Some(y) = self.gate_up.fused_output(h)? {
                return super::fused_ops::silu_mul(&y);
            }
        }
        let _ = fused;
        let [gate, up] = self.gate_up.forward::<2>(h)?;
        candle_nn::ops::silu(&gate)? * up
    }

    /// Attention with per-sequence caches: each sequence appends to and reads its own tensors.
    fn attend_each(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        caches: &mut [SequenceKv],
        ctx: &mut StepContext<'_>,
    ) -> Result<Tensor> {
        let mut outputs = Vec::with_capacity(ctx.segments.len());
        for (seg, cache) in ctx.segments.iter().zip(caches.iter_mut()) {
            let q = q.narrow(0, seg.offset, seg.len)?;
            let k = k
                .narrow(0, seg.offset, seg.len)?
                .transpose(0, 1)?
                .contiguous()?;
            let v = v
                .narrow(0, seg.offset, seg.len)?
                .transpose(0, 1)?
                .contiguous()?;
            let cache = cache
                .layer(layer)
                .ok_or_else(|| candle_core::Error::msg("a paged cache in a contiguous step"))?;
            let (k_all, v_all) = cache.append(&k, &v, ctx.max_len)?;
            outputs.push(self.attend(&q, &k_all, &v_all, seg, ctx.masks)?);
        }
        stack_rows(outputs)
    }

    /// The fused CUDA path: one kernel rotates queries and keys out of the fused q/k/v projection and
    /// writes keys and values into the pool, then attention reads the pool.
    fn attend_fused(
        &self,
        h: &Tensor,
        pool: &KvPool,
        layer: usize,
        step: &PagedStep,
        ctx: &mut StepContext<'_>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let y = self.qkv.fused_output(h)?.ok_or_else(|| {
                candle_core::Error::msg("a fused pool write needs fused q/k/v weights")
            })?;
            let RopeAngles::Indexed { cos, sin, index } = &ctx.angles else {
                candle_core::bail!("the fused pool write needs indexed RoPE angles");
            };
            let (keys, values) = pool.layer(layer);
            let q = super::paged_attention::rope_and_write(
                &y,
                cos,
                sin,
                index,
                &step.write,
                keys,
                values,
                self.num_heads,
                ctx.rope.interleaved(),
            )?;
            phase_timer::mark(h.device(), "norm, qkv, rope");
            self.attend_paged(&q, pool, layer, step, ctx)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (h, pool, layer, step, ctx);
            Err(candle_core::Error::msg(
                "the fused pool write needs a CUDA build",
            ))
        }
    }

    /// Attention with the paged pool, whose rows for this step are written: decoding sequences
    /// attend as one padded batch (or one kernel), prefill segments one by one (they are few and
    /// long).
    fn attend_paged(
        &self,
        q: &Tensor,
        pool: &KvPool,
        layer: usize,
        step: &PagedStep,
        ctx: &mut StepContext<'_>,
    ) -> Result<Tensor> {
        let (keys, values) = pool.layer(layer);
        let mut outputs = Vec::with_capacity(1 + step.prefill.len());
        if let Some(batch) = &step.decode {
            let q = match &batch.rows {
                Some(rows) => q.index_select(rows, 0)?,
                None => q.clone(),
            };
            outputs.push(self.attend_batch(&q, keys, values, batch)?);
        }
        for read in &step.prefill {
            let seg = ctx.segments[read.segment];
            let q = q.narrow(0, seg.offset, seg.len)?;
            let k_all = keys.index_select(&read.gather, 1)?;
            let v_all = values.index_select(&read.gather, 1)?;
            outputs.push(self.attend(&q, &k_all, &v_all, &seg, ctx.masks)?);
        }
        let attn = stack_rows(outputs)?;
        match &step.restore {
            Some(order) => attn.index_select(order, 0),
            None => Ok(attn),
        }
    }

    /// Decode attention of `batch.sequences` sequences at once: `q: [sequences, heads, head_dim]`
    /// against their histories gathered from the pool and padded to the longest (padding masked).
    fn attend_batch(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        batch: &DecodeBatch,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(lens) = &batch.lens {
            let scale = if self.q_prescaled {
                1.0
            } else {
                1.0 / (self.head_dim as f32).sqrt()
            };
            let n = batch.sequences;
            let q = q.reshape((n, self.num_heads, self.head_dim))?;
            return super::paged_attention::decode_attention(
                &q,
                keys,
                values,
                &batch.gather,
                lens,
                batch.len,
                scale,
            )?
            .reshape((n, self.num_heads * self.head_dim));
        }
        let (n, len) = (batch.sequences, batch.len);
        let group = self.num_heads / self.num_kv_heads;
        let q = q
            .reshape((n, self.num_kv_heads, group, self.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let shape = (self.num_kv_heads, n, len, self.head_dim);
        let k = keys.index_select(&batch.gather, 1)?.reshape(shape)?;
        let v = values.index_select(&batch.gather, 1)?.reshape(shape)?;
        let scores = self.scaled(q.matmul(&k.t()?)?)?;
        let scores = match &batch.mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .transpose(0, 1)?
            .reshape((n, self.num_heads * self.head_dim))
    }

    /// Attention scores `q·k` scaled by `1/sqrt(head_dim)`, unless the query weights carry it.
    fn scaled(&self, scores: Tensor) -> Result<Tensor> {
        if self.q_prescaled {
            return Ok(scores);
        }
        scores * (1.0 / (self.head_dim as f64).sqrt())
    }

    /// Attention of one sequence: `q: [len, heads, head_dim]` against its whole history
    /// `k, v: [kv_heads, kv_len, head_dim]`, giving `[len, heads * head_dim]`.
    ///
    /// Grouped-query attention without copying keys and values: the query heads that share a
    /// key/value head are stacked along the row axis (`[kv_heads, group * len, head_dim]`), so one
    /// batched matmul per kv head does the work that `repeat_kv` would do with `group` copies.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seg: &Segment,
        masks: &mut MaskCache,
    ) -> Result<Tensor> {
        let group = self.num_heads / self.num_kv_heads;
        let len = seg.len;
        let kv_len = k.dim(1)?;
        let q = q.transpose(0, 1)?.contiguous()?.reshape((
            self.num_kv_heads,
            group * len,
            self.head_dim,
        ))?;
        // The cache views are strided (`[kv_heads, kv_len, head_dim]` out of a longer buffer). CPU and
        // CUDA matmuls take them as they are; Metal's matmul wants contiguous operands (the seed's
        // "explicit tensor contiguity"), so only there do we pay for the copy.
        let (k, v) = if k.device().is_metal() {
            (k.contiguous()?, v.contiguous()?)
        } else {
            (k.clone(), v.clone())
        };
        let scores = self.scaled(q.matmul(&k.t()?)?)?;
        let scores = if len > 1 {
            let mask = masks.get(len, kv_len, scores.dtype(), scores.device())?;
            scores
                .reshape((self.num_kv_heads, group, len, kv_len))?
                .broadcast_add(&mask)?
                .reshape((self.num_kv_heads, group * len, kv_len))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?;
        out.reshape((self.num_heads, len, self.head_dim))?
            .transpose(0, 1)?
            .reshape((len, self.num_heads * self.head_dim))
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

/// Projections of the same input. Dense weights are concatenated at load time so one matmul
/// computes them all (fewer kernel launches: what a GPU step's time is made of); quantized ones run
/// one by one.
#[derive(Debug)]
enum Projections {
    /// One weight `[Σ outputs, in]`; `widths` are the outputs of each part, in order.
    Fused {
        weight: Linear,
        widths: Vec<usize>,
    },
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>, fuse: bool) -> std::result::Result<Self, WorkerError> {
        let dense: Vec<&Tensor> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Dense(w) => Some(w),
                _ => None,
            })
            .collect();
        if !fuse || dense.len() != parts.len() {
            return Ok(Self::Separate(parts));
        }
        let widths = dense.iter().map(|w| w.dim(0)).collect::<Result<Vec<_>>>()?;
        Ok(Self::Fused {
            weight: Linear::Dense(Tensor::cat(&dense, 0)?),
            widths,
        })
    }

    /// The whole `[rows, Σ out_i]` result when the weights are fused, else `None`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn fused_output(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Fused { weight, .. } => weight.forward(x).map(Some),
            Self::Separate(_) => Ok(None),
        }
    }

    /// The `N` outputs for `x: [rows, in]`, each `[rows, out_i]` (views of one result when fused).
    fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let outputs: Vec<Tensor> = match self {
            Self::Fused { weight, widths } => {
                let y = weight.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, start, w);
                        start += w;
                        part
                    })
                    .collect::<Result<_>>()?
            }
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect::<Result<_>>()?,
        };
        outputs.try_into().map_err(|v: Vec<Tensor>| {
            candle_core::Error::msg(format!("{} projections, not {N}", v.len()))
        })
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Self::Fused { weight, .. } => weight.weight_bytes(),
            Self::Separate(parts) => parts.iter().map(Linear::weight_bytes).sum(),
        }
    }
}
