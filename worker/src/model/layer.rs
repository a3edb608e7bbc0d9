//! One transformer block of a Llama model, run on a micro-batch of sequences at once.
//!
//! The projections and the feed-forward network see every row of the micro-batch together (the weights
//! are read once per step, whatever the number of sequences); attention runs per sequence against that
//! sequence's own cache. Rows of one sequence never meet rows of another, so no padding and no
//! cross-sequence masks are needed, and a sequence's result does not depend on its batch-mates.

use candle_core::{Result, Tensor};
use strata_model::LlamaConfig;

use super::kv_cache::SequenceKv;
use super::linear::Linear;
use super::mask::MaskCache;
use super::rope::RopeTable;
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
    /// RoPE cos/sin per row, `[rows, 1, head_dim/2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    pub rope: &'a RopeTable,
    pub masks: &'a mut MaskCache,
    pub max_len: usize,
}

/// A transformer block.
#[derive(Debug)]
pub struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Layer {
    pub fn load(
        w: &mut WeightLoader<'_>,
        i: usize,
        c: &LlamaConfig,
    ) -> std::result::Result<Self, WorkerError> {
        Ok(Self {
            attn_norm: w.dense(Role::AttnNorm(i))?,
            q: w.linear(Role::Query(i))?,
            k: w.linear(Role::Key(i))?,
            v: w.linear(Role::Value(i))?,
            o: w.linear(Role::AttnOutput(i))?,
            ffn_norm: w.dense(Role::FfnNorm(i))?,
            gate: w.linear(Role::Gate(i))?,
            up: w.linear(Role::Up(i))?,
            down: w.linear(Role::Down(i))?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps as f32,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        let norms = (self.attn_norm.elem_count() + self.ffn_norm.elem_count())
            * self.attn_norm.dtype().size_in_bytes();
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
        .iter()
        .map(|l| l.weight_bytes())
        .sum::<usize>()
            + norms
    }

    /// `x: [rows, hidden]` → `[rows, hidden]`; appends this layer's keys and values of every sequence
    /// (`caches[s]` belongs to `ctx.segments[s]`) to its cache at index `layer`.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [SequenceKv],
        ctx: &mut StepContext<'_>,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let h = candle_nn::ops::rms_norm(x, &self.attn_norm, self.eps)?;
        let q = self
            .q
            .forward(&h)?
            .reshape((rows, self.num_heads, 1, self.head_dim))?;
        let k = self
            .k
            .forward(&h)?
            .reshape((rows, self.num_kv_heads, 1, self.head_dim))?;
        let v = self
            .v
            .forward(&h)?
            .reshape((rows, self.num_kv_heads, self.head_dim))?;
        let q = ctx.rope.apply(&q, &ctx.cos, &ctx.sin)?.squeeze(2)?;
        let k = ctx.rope.apply(&k, &ctx.cos, &ctx.sin)?.squeeze(2)?;

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
            let (k_all, v_all) = cache.layer(layer).append(&k, &v, ctx.max_len)?;
            outputs.push(self.attend(&q, &k_all, &v_all, seg, ctx.masks)?);
        }
        let attn = if outputs.len() == 1 {
            outputs.pop().expect("one output")
        } else {
            Tensor::cat(&outputs, 0)?
        };
        let x = (x + self.o.forward(&attn)?)?;

        let h = candle_nn::ops::rms_norm(&x, &self.ffn_norm, self.eps)?;
        let ffn = (candle_nn::ops::silu(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?;
        x + self.down.forward(&ffn)?
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
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
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
