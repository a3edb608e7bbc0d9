//! The index tensors a paged step shares across its layers: where each new row goes in the pool, and
//! which pool rows each sequence reads. Built once per step on the host and uploaded in the step's
//! one index copy (`step_indexes`), so every layer's attention is a fixed number of kernels however
//! many sequences the micro-batch holds.

use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::SequenceKv;
use super::layer::Segment;
use super::step_indexes::{IndexBuffer, IndexSlot, UploadedIndexes};

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
    /// The additive mask of the sliding layers when the window cuts some history short: the
    /// padding's -inf plus -inf for positions the window has left behind. Sliding layers use it
    /// instead of `mask` (and instead of the fused kernel); `None` when no history outgrows it.
    pub window_mask: Option<Tensor>,
    /// History length of each sequence, new position included, `[sequences]` (u32): built only
    /// for the fused CUDA kernel, which reads `gather` up to these lengths and needs no mask.
    pub lens: Option<Tensor>,
    pub sequences: usize,
    /// The row length of `gather` (and of the masks): the longest history, or more where the step
    /// is laid out for a CUDA graph (`step_graph::LEN_BUCKET`).
    pub len: usize,
    /// The longest history in the batch, new position included.
    pub longest: usize,
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

/// A paged step planned on the host: its arrays are slots of the step's [`IndexBuffer`], which the
/// stage uploads once together with its other indexes; [`PagedStepPlan::resolve`] then builds the
/// step from the uploaded buffer.
#[derive(Debug, Clone)]
pub struct PagedStepPlan {
    write: IndexSlot,
    fused_write: bool,
    decode: Option<DecodePlan>,
    prefill: Vec<(usize, IndexSlot)>,
    restore: Option<IndexSlot>,
}

#[derive(Debug, Clone)]
struct DecodePlan {
    rows: Option<IndexSlot>,
    gather: IndexSlot,
    /// The additive mask's values, `[sequences × len]`, when some history is padded.
    mask: Option<Vec<f32>>,
    window_mask: Option<Vec<f32>>,
    lens: Option<IndexSlot>,
    sequences: usize,
    len: usize,
    longest: usize,
}

impl PagedStep {
    /// Plans a step into `indexes`. `caches[s]` holds pages for every position of `segments[s]`
    /// (reserved by the caller). `fused_attention`: decode attention runs as one kernel (lengths
    /// instead of a mask); `fused_write`: RoPE and the pool write run as one kernel (plain write
    /// rows). `window`: the stage's sliding window, if some of its layers slide. `pad_len`: lay the
    /// decode histories out this many positions long (at least the longest), so that steps of
    /// growing histories share one layout.
    pub fn plan(
        segments: &[Segment],
        caches: &[SequenceKv],
        fused_attention: bool,
        fused_write: bool,
        window: Option<usize>,
        pad_len: Option<usize>,
        indexes: &mut IndexBuffer,
    ) -> Result<PagedStepPlan> {
        let pages = |s: usize| {
            caches[s]
                .pages()
                .ok_or_else(|| candle_core::Error::msg("a paged step needs paged caches"))
        };
        let mut write_rows = Vec::with_capacity(segments.iter().map(|s| s.len).sum());
        for (s, seg) in segments.iter().enumerate() {
            let pages = pages(s)?;
            write_rows.extend((seg.start_pos..seg.start_pos + seg.len).map(|p| pages.row(p)));
        }
        let rows = write_rows.len();
        let write = indexes.push(write_rows);

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
            let longest = own.iter().copied().max().unwrap_or(1);
            let len = pad_len.map_or(longest, |pad| pad.max(longest));
            let mut gather = Vec::with_capacity(decoding.len() * len);
            for (&s, &own) in decoding.iter().zip(&own) {
                let pages = pages(s)?;
                gather.extend((0..len).map(|p| pages.row(if p < own { p } else { 0 })));
            }
            let padded = !fused_attention && own.iter().any(|&o| o < len);
            let mask = padded.then(|| {
                own.iter()
                    .flat_map(|&own| {
                        (0..len).map(move |p| if p < own { 0f32 } else { f32::NEG_INFINITY })
                    })
                    .collect()
            });
            let window_mask = window.filter(|&w| own.iter().any(|&o| o > w)).map(|w| {
                own.iter()
                    .flat_map(|&own| {
                        // Position p is seen from position own - 1 when it is at most w - 1 back.
                        (0..len).map(move |p| {
                            if p < own && p + w >= own {
                                0f32
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                    })
                    .collect()
            });
            let lens = fused_attention.then(|| indexes.push(own.iter().map(|&o| o as u32)));
            let rows = (decoding.len() < segments.len())
                .then(|| indexes.push(decoding.iter().map(|&s| segments[s].offset as u32)));
            Some(DecodePlan {
                rows,
                gather: indexes.push(gather),
                mask,
                window_mask,
                lens,
                sequences: decoding.len(),
                len,
                longest,
            })
        };

        let mut prefill = Vec::new();
        for (s, seg) in segments.iter().enumerate().filter(|(_, seg)| seg.len != 1) {
            let pages = pages(s)?;
            prefill.push((
                s,
                indexes.push((0..seg.start_pos + seg.len).map(|p| pages.row(p))),
            ));
        }

        let restore = if decode.is_some() && !prefill.is_empty() {
            // Outputs come out as [decode rows in segment order, then each prefill segment's rows].
            let mut order = vec![0u32; rows];
            let mut next = 0u32;
            for &s in &decoding {
                order[segments[s].offset] = next;
                next += 1;
            }
            for &(s, _) in &prefill {
                let seg = segments[s];
                for slot in &mut order[seg.offset..seg.offset + seg.len] {
                    *slot = next;
                    next += 1;
                }
            }
            Some(indexes.push(order))
        } else {
            None
        };
        Ok(PagedStepPlan {
            write,
            fused_write,
            decode,
            prefill,
            restore,
        })
    }
}

impl PagedStepPlan {
    /// The step, its arrays taken from `uploaded` (the buffer [`PagedStep::plan`] filled).
    pub fn resolve(
        self,
        uploaded: &UploadedIndexes,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<PagedStep> {
        let write = uploaded.get(self.write)?;
        let write = if self.fused_write {
            write
        } else {
            // Scatter wants its indexes shaped like its source.
            write
                .reshape((1, self.write.len(), 1))?
                .broadcast_as((kv_heads, self.write.len(), head_dim))?
                .contiguous()?
        };
        let decode = match self.decode {
            None => None,
            Some(plan) => {
                let (n, len) = (plan.sequences, plan.len);
                let tensor = |mask: Vec<f32>| {
                    Tensor::from_vec(mask, (1, n, 1, len), device)?.to_dtype(dtype)
                };
                Some(DecodeBatch {
                    rows: uploaded.get_some(plan.rows)?,
                    gather: uploaded.get(plan.gather)?,
                    mask: plan.mask.map(tensor).transpose()?,
                    window_mask: plan.window_mask.map(tensor).transpose()?,
                    lens: uploaded.get_some(plan.lens)?,
                    sequences: n,
                    len,
                    longest: plan.longest,
                })
            }
        };
        let prefill = self
            .prefill
            .into_iter()
            .map(|(segment, slot)| {
                Ok(PrefillRead {
                    segment,
                    gather: uploaded.get(slot)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(PagedStep {
            write,
            fused_write: self.fused_write,
            decode,
            prefill,
            restore: uploaded.get_some(self.restore)?,
        })
    }
}
