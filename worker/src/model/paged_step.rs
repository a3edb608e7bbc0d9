//! The index tensors a paged step shares across its layers: where each new row goes in the pool, and
//! which pool rows each sequence reads. Built once per step on the host and uploaded once, so every
//! layer's attention is a fixed number of kernels however many sequences the micro-batch holds.

use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::SequenceKv;
use super::layer::Segment;

/// Sequences that add one position this step, attended together as one padded batch.
#[derive(Debug)]
pub struct DecodeBatch {
    /// Batch rows of these sequences, when the batch also holds prefill rows.
    pub rows: Option<Tensor>,
    /// Pool rows to read, `[sequences × len]`; past a sequence's own length, its first row again.
    pub gather: Tensor,
    /// Additive mask `[1, sequences, 1, len]`: 0 for a sequence's own positions, -inf for padding;
    /// `None` when every history is `len` long (nothing padded).
    pub mask: Option<Tensor>,
    /// History length of each sequence, new position included, `[sequences]` (u32): built only
    /// for the fused CUDA kernel, which reads `gather` up to these lengths and needs no mask.
    pub lens: Option<Tensor>,
    pub sequences: usize,
    /// The longest history in the batch, new position included.
    pub len: usize,
}

/// A sequence that adds several positions (a prompt or a chunk of one).
#[derive(Debug)]
pub struct PrefillRead {
    /// Index into the step's segments.
    pub segment: usize,
    /// Pool rows of its whole history, new positions included, `[kv_len]`.
    pub gather: Tensor,
}

#[derive(Debug)]
pub struct PagedStep {
    /// Pool row of every new row: `[rows]` for the fused RoPE-and-write kernel (`fused_write`),
    /// else broadcast to `[kv_heads, rows, head_dim]` (scatter wants its indexes shaped like its
    /// source).
    pub write: Tensor,
    /// Whether this step's keys and values go into the pool through the fused CUDA kernel.
    pub fused_write: bool,
    pub decode: Option<DecodeBatch>,
    pub prefill: Vec<PrefillRead>,
    /// When both kinds are present: for each batch row, its row in `[decode rows, prefill rows...]`.
    pub restore: Option<Tensor>,
}

impl PagedStep {
    /// `caches[s]` holds pages for every position of `segments[s]` (reserved by the caller).
    /// `fused_attention`: decode attention runs as one kernel (lengths instead of a mask);
    /// `fused_write`: RoPE and the pool write run as one kernel (plain write rows).
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        segments: &[Segment],
        caches: &[SequenceKv],
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
        fused_attention: bool,
        fused_write: bool,
    ) -> Result<Self> {
        let pages = |s: usize| {
            caches[s]
                .pages()
                .ok_or_else(|| candle_core::Error::msg("a paged step needs paged caches"))
        };
        let rows: usize = segments.iter().map(|s| s.len).sum();
        let mut write_rows = Vec::with_capacity(rows);
        for (s, seg) in segments.iter().enumerate() {
            let pages = pages(s)?;
            write_rows.extend((seg.start_pos..seg.start_pos + seg.len).map(|p| pages.row(p)));
        }
        let write = if fused_write {
            Tensor::from_vec(write_rows, rows, device)?
        } else {
            Tensor::from_vec(write_rows, (1, rows, 1), device)?
                .broadcast_as((kv_heads, rows, head_dim))?
                .contiguous()?
        };

        let decoding: Vec<usize> = (0..segments.len())
            .filter(|&s| segments[s].len == 1)
            .collect();
        let decode = if decoding.is_empty() {
            None
        } else {
            // Each decoding sequence's history length, new position included.
            let own: Vec<usize> = decoding
                .iter()
                .map(|&s| segments[s].start_pos + 1)
                .collect();
            let len = own.iter().copied().max().unwrap_or(1);
            let mut gather = Vec::with_capacity(decoding.len() * len);
            for (&s, &own) in decoding.iter().zip(&own) {
                let pages = pages(s)?;
                gather.extend((0..len).map(|p| pages.row(if p < own { p } else { 0 })));
            }
            let n = decoding.len();
            let padded = !fused_attention && own.iter().any(|&o| o < len);
            let mask = || {
                let mask: Vec<f32> = own
                    .iter()
                    .flat_map(|&own| {
                        (0..len).map(move |p| if p < own { 0f32 } else { f32::NEG_INFINITY })
                    })
                    .collect();
                Tensor::from_vec(mask, (1, n, 1, len), device)?.to_dtype(dtype)
            };
            let lens = fused_attention
                .then(|| {
                    let lens: Vec<u32> = own.iter().map(|&o| o as u32).collect();
                    Tensor::from_vec(lens, n, device)
                })
                .transpose()?;
            let rows = (n < segments.len())
                .then(|| {
                    let rows: Vec<u32> = decoding
                        .iter()
                        .map(|&s| segments[s].offset as u32)
                        .collect();
                    Tensor::from_vec(rows, n, device)
                })
                .transpose()?;
            Some(DecodeBatch {
                rows,
                gather: Tensor::from_vec(gather, n * len, device)?,
                mask: padded.then(mask).transpose()?,
                lens,
                sequences: n,
                len,
            })
        };

        let mut prefill = Vec::new();
        for (s, seg) in segments.iter().enumerate().filter(|(_, seg)| seg.len != 1) {
            let pages = pages(s)?;
            let rows: Vec<u32> = (0..seg.start_pos + seg.len).map(|p| pages.row(p)).collect();
            let n = rows.len();
            prefill.push(PrefillRead {
                segment: s,
                gather: Tensor::from_vec(rows, n, device)?,
            });
        }

        let restore = if decode.is_some() && !prefill.is_empty() {
            // Outputs come out as [decode rows in segment order, then each prefill segment's rows].
            let mut order = vec![0u32; rows];
            let mut next = 0u32;
            for &s in &decoding {
                order[segments[s].offset] = next;
                next += 1;
            }
            for read in &prefill {
                let seg = segments[read.segment];
                for slot in &mut order[seg.offset..seg.offset + seg.len] {
                    *slot = next;
                    next += 1;
                }
            }
            Some(Tensor::from_vec(order, rows, device)?)
        } else {
            None
        };
        Ok(Self {
            write,
            fused_write,
            decode,
            prefill,
            restore,
        })
    }
}
