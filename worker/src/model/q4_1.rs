//! A CPU matmul for Q4_1 weights with AVX2: candle 0.11.1's Q4_1 dot product is plain scalar code that
//! the compiler vectorizes poorly, and its cost grows with every activation row, so batching sequences
//! bought nothing. This kernel follows llama.cpp's `ggml_vec_dot_q4_1_q8_1` (AVX2 path): activations
//! are quantized per 32-element block to Q8_1 (as llama.cpp does), each weight block is unpacked once
//! and reused for up to [`ROW_TILE`] activation rows, and columns are spread over the thread pool.
//!
//! Numerics: the same quantization and the same per-block products as llama.cpp, accumulated in eight
//! f32 lanes per (row, column) and summed at the end. Every row is computed independently of the
//! others, so a sequence's result does not depend on its batch-mates.

use half::f16;
use rayon::prelude::*;

/// Elements per quantization block (Q4_1 and Q8_1 alike).
pub const BLOCK: usize = 32;
/// Activation rows that share one unpacked weight block.
pub(crate) const ROW_TILE: usize = 4;
/// Columns per parallel task, at least.
const COLUMNS_PER_TASK: usize = 32;

/// A GGUF Q4_1 block: `x = d * q + m` for 32 4-bit `q` (low nibbles are elements 0..16, high 16..32).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; BLOCK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// An activation block quantized to 8 bits: `x ≈ d * q`, with `s = d * Σq` kept for the Q4_1 minimum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockQ8_1 {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) qs: [i8; BLOCK],
}

/// A Q4_1 weight matrix `[n, k]` (n output columns, k inputs), row-major in blocks.
#[derive(Debug)]
pub struct Q4_1Matrix {
    n: usize,
    k: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// Takes the raw bytes of a GGUF Q4_1 tensor of shape `[n, k]`.
    pub fn from_gguf_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        check_block_bytes("Q4_1", bytes, n, k, 20)?;
        let blocks = bytes
            .chunks_exact(20)
            .map(|b| BlockQ4_1 {
                d: f16::from_le_bytes([b[0], b[1]]),
                m: f16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Ok(Self { n, k, blocks })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<BlockQ4_1>()
    }

    /// Whether this CPU runs the fast kernel (AVX2 and FMA); otherwise callers use candle's.
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `x: [m, k]` row-major → `x Wᵀ: [m, n]` row-major. Requires [`Q4_1Matrix::supported`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(Self::supported(), "the Q4_1 kernel needs AVX2 and FMA");
        // SAFETY: `supported()` was checked above.
        #[cfg(target_arch = "x86_64")]
        return matmul_tiles(
            &self.blocks,
            self.n,
            self.k,
            x,
            m,
            |w, a, kb, rows, out| unsafe { dot_tile_avx2(w, a, kb, rows, out) },
        );
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("supported() is false off x86_64")
    }
}

/// The shared driver of strata's CPU kernels: activations quantized to Q8_1 blocks, columns spread
/// over the thread pool, and `dot(weight column, activation rows, blocks per row, rows, out)` run
/// on tiles of up to [`ROW_TILE`] rows so each weight block is unpacked once per tile.
pub(crate) fn matmul_tiles<B: Sync>(
    blocks: &[B],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    dot: impl Fn(&[B], &[BlockQ8_1], usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "activation length");
    let kb = k / BLOCK;
    let act: Vec<BlockQ8_1> = x.chunks_exact(BLOCK).map(quantize_q8_1).collect();
    // Column-major result: each task owns whole columns, so tasks never share memory.
    let mut out_t = vec![0f32; n * m];
    // A few tasks per thread: enough to even out, few enough that scheduling stays negligible
    // (the 49152-column output head in 32-column tasks spent more time in rayon than computing).
    let per_task = COLUMNS_PER_TASK.max(n / (rayon::current_num_threads() * 4));
    out_t
        .par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * per_task;
            for (c, column) in chunk.chunks_exact_mut(m).enumerate() {
                let w = &blocks[(first + c) * kb..(first + c + 1) * kb];
                for row0 in (0..m).step_by(ROW_TILE) {
                    let rows = ROW_TILE.min(m - row0);
                    let a = &act[row0 * kb..(row0 + rows) * kb];
                    dot(w, a, kb, rows, &mut column[row0..row0 + rows]);
                }
            }
        });
    let mut out = vec![0f32; m * n];
    for (col, values) in out_t.chunks_exact(m).enumerate() {
        for (row, v) in values.iter().enumerate() {
            out[row * n + col] = *v;
        }
    }
    out
}

/// llama.cpp's `quantize_row_q8_1_ref`: `d = max|x| / 127`, `q = round(x / d)`, `s = d * Σq`, with `d`
/// and `s` stored as f16 (so rounded through f16 here too).
fn quantize_q8_1(x: &[f32]) -> BlockQ8_1 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; BLOCK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    BlockQ8_1 {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(sum as f32 * d).to_f32(),
        qs,
    }
}

/// Dot products of one weight column `w` (kb blocks) with `rows` activation rows `a` (kb blocks each).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_tile_avx2(w: &[BlockQ4_1], a: &[BlockQ8_1], kb: usize, rows: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let low_nibbles = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); ROW_TILE];
    let mut mins = [0f32; ROW_TILE];
    for (b, wb) in w.iter().enumerate() {
        let packed = _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i);
        let q = _mm256_and_si256(
            _mm256_inserti128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1),
            low_nibbles,
        );
        let (wd, wm) = (wb.d.to_f32(), wb.m.to_f32());
        for r in 0..rows {
            let ab = &a[r * kb + b];
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            let products = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones);
            acc[r] = _mm256_fmadd_ps(
                _mm256_set1_ps(wd * ab.d),
                _mm256_cvtepi32_ps(products),
                acc[r],
            );
            mins[r] += wm * ab.s;
        }
    }
    for r in 0..rows {
        out[r] = hsum_avx2(acc[r]) + mins[r];
    }
}

/// The sum of a vector's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum_avx2(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    let sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
    _mm_cvtss_f32(sum1)
}

/// Checks that `bytes` hold exactly the `block_bytes`-sized blocks of a `kind` tensor `[n, k]`.
pub(crate) fn check_block_bytes(
    kind: &str,
    bytes: &[u8],
    n: usize,
    k: usize,
    block_bytes: usize,
) -> Result<(), String> {
    if !k.is_multiple_of(BLOCK) {
        return Err(format!(
            "{kind} rows of {k} elements are not whole blocks of {BLOCK}"
        ));
    }
    let needed = n * k / BLOCK * block_bytes;
    if bytes.len() != needed {
        return Err(format!(
            "{kind} tensor [{n}, {k}] needs {needed} bytes, got {}",
            bytes.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random Q4_1 matrix and its exact dequantized f32 values.
    fn random_matrix(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..n * k / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 40000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            let qs: Vec<u8> = (0..16).map(|_| (next() & 0xFF) as u8).collect();
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            bytes.extend_from_slice(&qs);
            let mut block = [0f32; BLOCK];
            for j in 0..16 {
                block[j] = d.to_f32() * (qs[j] & 0x0F) as f32 + m.to_f32();
                block[j + 16] = d.to_f32() * (qs[j] >> 4) as f32 + m.to_f32();
            }
            dense.extend_from_slice(&block);
        }
        (bytes, dense)
    }

    #[test]
    fn matches_the_dequantized_product_and_is_batch_invariant() {
        if !Q4_1Matrix::supported() {
            return;
        }
        let (n, k, m) = (70, 96, 7);
        let (bytes, dense) = random_matrix(n, k, 3);
        let w = Q4_1Matrix::from_gguf_bytes(&bytes, n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let got = w.matmul(&x, m);
        for row in 0..m {
            for col in 0..n {
                let exact: f32 = (0..k).map(|i| x[row * k + i] * dense[col * k + i]).sum();
                let err = (got[row * n + col] - exact).abs();
                // Activations are quantized to 8 bits, as llama.cpp does: ~1% of the magnitude.
                assert!(
                    err <= 0.02 * exact.abs().max(1.0),
                    "[{row},{col}] {} vs {exact}",
                    got[row * n + col]
                );
            }
        }
        // Each row alone gives bit-identical results to the row inside the batch.
        for row in 0..m {
            let alone = w.matmul(&x[row * k..(row + 1) * k], 1);
            assert_eq!(alone, got[row * n..(row + 1) * n].to_vec(), "row {row}");
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(Q4_1Matrix::from_gguf_bytes(&[0; 40], 1, 33).is_err());
        assert!(Q4_1Matrix::from_gguf_bytes(&[0; 39], 1, 64).is_err());
    }
}
