//! Attention of one block: per sequence against its own cache, fused where a kernel allows, or
//! over a paged pool as one padded batch.

use candle_core::{DType, Result, Tensor};

use crate::model::cpu_attention::{self, AttentionShape};
use crate::model::kv_cache::SequenceKv;
use crate::model::kv_pool::KvPool;
use crate::model::paged_step::{DecodeBatch, PagedStep};
use crate::model::prompt_softmax::prompt_softmax;

use super::{stack_rows, Layer, Segment, StepContext};
#[cfg(feature = "cuda")]
use crate::model::{paged_attention, rope::RopeAngles};

impl Layer {
    /// Attention with per-sequence caches: each sequence appends to and reads its own tensors.
    pub(super) fn attend_each(
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
            outputs.push(self.attend(&q, &k_all, &v_all, seg, ctx)?);
        }
        stack_rows(outputs)
    }

    /// The fused CUDA path: one kernel rotates queries and keys out of the q/k/v projection and
    /// writes keys and values into the pool, then attention reads the pool. Projections that could
    /// not be fused (weights of different formats) are joined into the layout the kernel reads:
    /// one copy instead of the separate path's rotations, transposes and scatters.
    pub(super) fn attend_fused(
        &self,
        h: &Tensor,
        pool: &KvPool,
        layer: usize,
        step: &PagedStep,
        ctx: &mut StepContext<'_>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let y = match self.qkv.fused_output(h)? {
                Some(y) => y,
                None => Tensor::cat(&self.qkv.forward::<3>(h)?, 1)?,
            };
            let RopeAngles::Indexed { cos, sin, index } = &ctx.angles[self.rope] else {
                candle_core::bail!("the fused pool write needs indexed RoPE angles");
            };
            let (keys, values) = pool.layer(layer);
            let q = paged_attention::rope_and_write(
                &y,
                cos,
                sin,
                index,
                &step.write,
                keys,
                values,
                self.num_heads,
                ctx.ropes[self.rope].interleaved(),
            )?;
            ctx.timer.mark(h.device(), "norm, qkv, rope");
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
    pub(super) fn attend_paged(
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
            outputs.push(self.attend_batch(&q, keys, values, batch, ctx.attention_wide_from)?);
        }
        for read in &step.prefill {
            let seg = ctx.segments[read.segment];
            let q = q.narrow(0, seg.offset, seg.len)?;
            let k_all = keys.index_select(&read.gather, 1)?;
            let v_all = values.index_select(&read.gather, 1)?;
            outputs.push(self.attend(&q, &k_all, &v_all, &seg, ctx)?);
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
        wide_from: usize,
    ) -> Result<Tensor> {
        // A sliding layer whose window cuts some history short attends through the window mask;
        // the fused kernel reads whole histories.
        let window_mask = batch.window_mask.as_ref().filter(|_| self.window.is_some());
        #[cfg(not(feature = "cuda"))]
        let _ = wide_from;
        #[cfg(feature = "cuda")]
        if let (Some(lens), None) = (&batch.lens, window_mask) {
            let scale = if self.q_prescaled {
                1.0
            } else {
                self.scale as f32
            };
            let n = batch.sequences;
            let q = q.reshape((n, self.num_heads, self.head_dim))?;
            return paged_attention::decode_attention(
                &q,
                keys,
                values,
                &batch.gather,
                lens,
                batch.len,
                scale,
                batch.longest >= wide_from,
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
        let scores = match window_mask.or(batch.mask.as_ref()) {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .transpose(0, 1)?
            .reshape((n, self.num_heads * self.head_dim))
    }

    /// Attention scores `q·k` times the attention scale (unless the query weights carry it), then
    /// soft-capped where the family caps them.
    fn scaled(&self, scores: Tensor) -> Result<Tensor> {
        let scores = if self.q_prescaled {
            scores
        } else {
            (scores * self.scale)?
        };
        match self.softcap {
            Some(cap) => (scores / cap as f64)?.tanh()? * cap as f64,
            None => Ok(scores),
        }
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
        ctx: &mut StepContext<'_>,
    ) -> Result<Tensor> {
        let group = self.num_heads / self.num_kv_heads;
        let len = seg.len;
        let cpu_isa = ctx.cpu_attention;
        if let Some(isa) = cpu_isa.filter(|_| self.softcap.is_none() && q.dtype() == DType::F32) {
            let shape = AttentionShape {
                len,
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                scale: (!self.q_prescaled).then_some(self.scale as f32),
                window: self.window,
                isa,
            };
            if shape.runs_here(k.dim(1)?) {
                return cpu_attention::attention(q, k, v, shape);
            }
        }
        let masks = &mut *ctx.masks;
        // A decoding row of a sliding layer sees only the window's last positions: read just
        // those; prompt rows get the window in their mask.
        let (k, v) = match self.window {
            Some(w) if len == 1 && k.dim(1)? > w => {
                let start = k.dim(1)? - w;
                (k.narrow(1, start, w)?, v.narrow(1, start, w)?)
            }
            _ => (k.clone(), v.clone()),
        };
        let (k, v) = (&k, &v);
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
        let rows = RowInvariance::of(q.device(), len, group, kv_len, self.head_dim);
        let q = if rows.is_some_and(|r| r.column_major_q) {
            q.transpose(1, 2)?.contiguous()?.transpose(1, 2)?
        } else {
            q
        };
        let scores = self.scaled(q.matmul(&k.t()?)?)?;
        let scores = if len > 1 {
            let mask = masks.get(len, kv_len, self.window, scores.dtype(), scores.device())?;
            scores
                .reshape((self.num_kv_heads, group, len, kv_len))?
                .broadcast_add(&mask)?
                .reshape((self.num_kv_heads, group * len, kv_len))?
        } else {
            scores
        };
        let probs = if rows.is_some() && scores.dtype() == DType::F32 {
            prompt_softmax(&scores, len)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let out = match rows.and_then(|r| r.pad_rows_to) {
            Some(padded) => {
                let m = group * len;
                let zeros = Tensor::zeros(
                    (self.num_kv_heads, padded - m, kv_len),
                    probs.dtype(),
                    probs.device(),
                )?;
                Tensor::cat(&[&probs, &zeros], 1)?
                    .matmul(&v)?
                    .narrow(1, 0, m)?
            }
            None => probs.matmul(&v)?,
        };
        out.reshape((self.num_heads, len, self.head_dim))?
            .transpose(0, 1)?
            .reshape((len, self.num_heads * self.head_dim))
    }
}

/// gemm (candle's CPU matmul) computes each output of a product as one FMA chain over the inner
/// dimension, except that a product of at most this many outputs whose operands are both row-major
/// goes through a horizontal kernel, which sums in another order.
const GEMM_HORIZONTAL_MAX_OUTPUTS: usize = 16 * 16;
/// And a product of at most this many rows and this many columns splits its chains every
/// [`GEMM_SMALL_DEPTH`] positions, where a larger one sizes its blocks by the cache and does not.
const GEMM_SMALL_SIDE: usize = 64;
const GEMM_SMALL_DEPTH: usize = 512;

/// How a prompt step's CPU attention keeps each row's arithmetic that of the same row in one whole
/// prefill of `kv_len` rows, however many rows the step has: the rows computed after a prefix copy
/// (`copy_prefix_from`) or in a short last chunk then round exactly as a cold prefill's do, so a
/// request started on a cached prefix generates a cold request's tokens. Every CPU prompt step
/// sums its softmax rows over what they see (`prompt_softmax.rs`); a whole prefill's products are
/// left as they are (for those the measures below change no bit), and decode is untouched.
#[derive(Debug, Clone, Copy)]
struct RowInvariance {
    /// Give `q` column-major: gemm never takes its horizontal kernel for `q·kᵀ` then. Only where a
    /// whole prefill of `kv_len` rows would not take it either.
    column_major_q: bool,
    /// Pad `probs` with zero rows to this many for `probs·v`, past gemm's small-product blocking.
    pad_rows_to: Option<usize>,
}

impl RowInvariance {
    /// The measures for a step of `len` rows over `kv_len` positions; `None` for decode and off the
    /// CPU.
    fn of(
        device: &candle_core::Device,
        len: usize,
        group: usize,
        kv_len: usize,
        head_dim: usize,
    ) -> Option<Self> {
        if len < 2 || !device.is_cpu() {
            return None;
        }
        let whole_prefill_outputs = group * kv_len * kv_len;
        let rows = group * len;
        Some(Self {
            column_major_q: whole_prefill_outputs > GEMM_HORIZONTAL_MAX_OUTPUTS,
            pad_rows_to: (rows <= GEMM_SMALL_SIDE
                && head_dim <= GEMM_SMALL_SIDE
                && kv_len > GEMM_SMALL_DEPTH)
                .then_some(GEMM_SMALL_SIDE + 1),
        })
    }
}
