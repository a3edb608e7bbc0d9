//! The softmax of a prompt step's attention scores on the CPU, each row over the positions it sees
//! and no further, so that a row's sums do not depend on how long the step's history is.
//!
//! candle's softmax sums a whole row (masked positions are zeros) in 32-lane groups and a scalar
//! tail, so where the tail starts moves with the row's length: a position's scores summed over a
//! history of 118 positions round differently from the same scores summed over 186. Summing each
//! row over exactly the positions up to its own (as a decode row's softmax does: its history ends
//! at it) makes a prompt row's sums the same whatever prefill computed it; a cached prefix copied
//! into a longer prompt is then the prefix a cold prefill of that prompt computes. The arithmetic is candle's otherwise (its max, `exp`, lane sums and division), so the
//! last row of every prompt step is bit for bit what candle's softmax gives.

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Softmax of `scores: [..., rows, kv_len]` (CPU, f32, masked positions `-inf`), where the rows of
/// each block of `len` are the step's positions `kv_len - len ..` in order: row `r` sums its first
/// `kv_len - len + r + 1` entries, and the rest are 0.
pub fn prompt_softmax(scores: &Tensor, len: usize) -> Result<Tensor> {
    scores.apply_op1_no_bwd(&PromptSoftmax { len })
}

struct PromptSoftmax {
    len: usize,
}

impl CustomOp1 for PromptSoftmax {
    fn name(&self) -> &'static str {
        "prompt-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = storage else {
            candle_core::bail!("prompt-softmax takes f32 scores");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("prompt-softmax takes contiguous scores");
        };
        let src = &src[start..end];
        let kv_len = layout.shape().dims().last().copied().unwrap_or(0);
        let len = self.len;
        if kv_len == 0 || len == 0 || len > kv_len {
            candle_core::bail!("prompt-softmax: {len} rows over a history of {kv_len}");
        }
        let mut dst = vec![0f32; src.len()];
        src.par_chunks(kv_len)
            .zip(dst.par_chunks_mut(kv_len))
            .enumerate()
            .for_each(|(row, (src, dst))| {
                let seen = kv_len - len + row % len + 1;
                let (src, dst) = (&src[..seen], &mut dst[..seen]);
                let mut max = f32::NEG_INFINITY;
                // SAFETY: both slices hold `seen > 0` elements.
                unsafe { f32::vec_reduce_max(src.as_ptr(), &mut max, seen) };
                for (s, d) in src.iter().zip(dst.iter_mut()) {
                    *d = (*s - max).exp();
                }
                let mut sum = 0f32;
                unsafe { f32::vec_reduce_sum(dst.as_ptr(), &mut sum, seen) };
                for d in dst.iter_mut() {
                    *d /= sum;
                }
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// Causal scores of `len` rows over `kv_len` positions, `-inf` past each row's own.
    fn scores(heads: usize, len: usize, kv_len: usize) -> Tensor {
        let base = Tensor::randn(0f32, 3., (heads, len, kv_len), &Device::Cpu).unwrap();
        let mask: Vec<f32> = (0..len)
            .flat_map(|r| {
                (0..kv_len).map(move |j| {
                    if j <= kv_len - len + r {
                        0.
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, len, kv_len), &Device::Cpu).unwrap();
        base.broadcast_add(&mask).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn each_row_sums_what_it_sees_as_a_decode_row_does_and_the_last_row_is_candles() {
        for (len, kv_len) in [(1, 1), (5, 5), (40, 40), (37, 150), (200, 333)] {
            let s = scores(3, len, kv_len);
            let ours = prompt_softmax(&s, len).unwrap();
            // The last row of each block: candle's softmax, bit for bit.
            let last = |t: &Tensor| bits(&t.narrow(1, len - 1, 1).unwrap());
            let candle = candle_nn::ops::softmax_last_dim(&s).unwrap();
            assert_eq!(last(&ours), last(&candle), "{len} over {kv_len}");
            // Every row: candle's softmax of just the positions it sees (a decode row's history).
            for r in 0..len {
                let seen = kv_len - len + r + 1;
                let row = ours.narrow(1, r, 1).unwrap();
                let alone = candle_nn::ops::softmax_last_dim(
                    &s.narrow(1, r, 1)
                        .unwrap()
                        .narrow(2, 0, seen)
                        .unwrap()
                        .contiguous()
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(
                    bits(&row.narrow(2, 0, seen).unwrap()),
                    bits(&alone),
                    "row {r}"
                );
                let rest = row.narrow(2, seen, kv_len - seen).unwrap();
                assert_eq!(
                    rest.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.
                );
            }
            // And it is a softmax: rows sum to 1.
            let sums = ours.sum(D::Minus1).unwrap().to_dtype(DType::F32).unwrap();
            let worst = (sums - 1.0).unwrap().abs().unwrap().max_all().unwrap();
            assert!(worst.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let s = scores(1, 4, 4);
        assert!(prompt_softmax(&s, 5).is_err());
        assert!(prompt_softmax(&s.to_dtype(DType::F16).unwrap(), 4).is_err());
    }
}
