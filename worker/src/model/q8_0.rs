//! A CPU matmul for Q8_0 weights with AVX2, on the same driver as `q4_1.rs`. In SmolLM2's Q4_1 file
//! the token embedding is Q8_0 and, tied, it is also the output head (49152×576): candle ran it one
//! activation row at a time (20% of a c=8 decode step in `perf`). Per-block products follow
//! llama.cpp's `ggml_vec_dot_q8_0_q8_0` (AVX2): `Σ w·a` in int16/int32, scaled by `d_w · d_a`.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::q4_1::hsum_avx2;
use super::q4_1::{check_block_bytes, matmul_tiles, BlockQ8_1, Q4_1Matrix, BLOCK, ROW_TILE};

/// A GGUF Q8_0 block: `x = d * q` for 32 signed bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; BLOCK],
}

/// A Q8_0 weight matrix `[n, k]` (n output columns, k inputs), row-major in blocks.
#[derive(Debug)]
pub struct Q8_0Matrix {
    n: usize,
    k: usize,
    blocks: Vec<BlockQ8_0>,
}

impl Q8_0Matrix {
    /// Takes the raw bytes of a GGUF Q8_0 tensor of shape `[n, k]`.
    pub fn from_gguf_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        check_block_bytes("Q8_0", bytes, n, k, 34)?;
        let blocks = bytes
            .chunks_exact(34)
            .map(|b| BlockQ8_0 {
                d: f16::from_le_bytes([b[0], b[1]]),
                qs: std::array::from_fn(|i| b[2 + i] as i8),
            })
            .collect();
        Ok(Self { n, k, blocks })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * 34
    }

    /// The same CPU requirement as the Q4_1 kernel.
    pub fn supported() -> bool {
        Q4_1Matrix::supported()
    }

    /// `x: [m, k]` row-major → `x Wᵀ: [m, n]` row-major. Requires [`Q8_0Matrix::supported`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(Self::supported(), "the Q8_0 kernel needs AVX2 and FMA");
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

/// Dot products of one weight column `w` (kb blocks) with `rows` activation rows `a`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_tile_avx2(w: &[BlockQ8_0], a: &[BlockQ8_1], kb: usize, rows: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); ROW_TILE];
    for (b, wb) in w.iter().enumerate() {
        let q = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
        // maddubs multiplies unsigned by signed bytes: |w| times a with w's sign.
        let abs_q = _mm256_sign_epi8(q, q);
        let wd = wb.d.to_f32();
        for r in 0..rows {
            let ab = &a[r * kb + b];
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            let signed_y = _mm256_sign_epi8(y, q);
            let products = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_q, signed_y), ones);
            acc[r] = _mm256_fmadd_ps(
                _mm256_set1_ps(wd * ab.d),
                _mm256_cvtepi32_ps(products),
                acc[r],
            );
        }
    }
    for r in 0..rows {
        out[r] = hsum_avx2(acc[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_dequantized_product_and_is_batch_invariant() {
        if !Q8_0Matrix::supported() {
            return;
        }
        let (n, k, m) = (37, 128, 6);
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..n * k / BLOCK {
            let d = f16::from_f32((1 + next() % 1000) as f32 / 20000.0);
            bytes.extend_from_slice(&d.to_le_bytes());
            for _ in 0..BLOCK {
                // -128 included: the sign trick must handle it like llama.cpp (w = -128 is never
                // produced by its quantizer, but a file may hold it).
                let q = (next() & 0xFF) as u8 as i8;
                bytes.push(q as u8);
                dense.push(d.to_f32() * q as f32);
            }
        }
        let w = Q8_0Matrix::from_gguf_bytes(&bytes, n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 20.0)
            .collect();
        let got = w.matmul(&x, m);
        for row in 0..m {
            for col in 0..n {
                let exact: f32 = (0..k).map(|i| x[row * k + i] * dense[col * k + i]).sum();
                let scale: f32 = (0..k)
                    .map(|i| (x[row * k + i] * dense[col * k + i]).abs())
                    .sum();
                let err = (got[row * n + col] - exact).abs();
                assert!(
                    err <= 0.02 * scale.max(1e-3),
                    "[{row},{col}] {} vs {exact}",
                    got[row * n + col]
                );
            }
        }
        for row in 0..m {
            let alone = w.matmul(&x[row * k..(row + 1) * k], 1);
            assert_eq!(alone, got[row * n..(row + 1) * n].to_vec(), "row {row}");
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(Q8_0Matrix::from_gguf_bytes(&[0; 34], 1, 33).is_err());
        assert!(Q8_0Matrix::from_gguf_bytes(&[0; 33], 1, 32).is_err());
    }
}
