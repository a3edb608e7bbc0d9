//! Activation rows quantized once per matmul, as llama.cpp does before its integer dot products:
//! Q8_1 blocks of 32 for the 32-element weight formats, Q8_K blocks of 256 for the K-quants.

use half::f16;

/// Elements per Q8_1 block, and per block of every 32-element weight format.
pub const BLOCK: usize = 32;
/// Elements per K-quant super-block (and per Q8_K block).
pub const QK_K: usize = 256;

/// An activation block quantized to 8 bits: `x ≈ d * q`, with `s = d * Σq` kept for the formats with
/// a minimum (Q4_1, Q5_1): the minimum's share of a block's dot product is `m · s`.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; BLOCK],
}

/// A Q8_K activation block: `x ≈ d * q`, and the sums of each 16 `q`, which turn the K-quants'
/// per-sub-block minimums (and Q6_K's offset of 32) into one product per sub-block.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// One activation block type: its element count and llama.cpp's quantization of it.
pub trait ActivationBlock: Copy + Send + Sync + 'static {
    const ELEMS: usize;
    fn quantize(x: &[f32]) -> Self;
    /// The block's scale `d`.
    fn scale(&self) -> f32;
    /// `d · Σq` where the block keeps it (Q8_1), else 0.
    fn scaled_sum(&self) -> f32;
    /// The values this block stands for (`d * q`).
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32>;
}

impl ActivationBlock for BlockQ8_1 {
    const ELEMS: usize = BLOCK;

    fn scale(&self) -> f32 {
        self.d
    }

    fn scaled_sum(&self) -> f32 {
        self.s
    }

    /// llama.cpp's `quantize_row_q8_1` (AVX2) for `d` and `q`: `d = max|x| / 127` rounded through
    /// f16, `q = x · (127 / max|x|)` rounded to nearest-even. `s` departs from it: llama.cpp stores
    /// `d · Σq` as f16, 11 bits, so a Q4_1/Q5_1 block's `m · s` is off by up to 2⁻¹² of itself, and
    /// `m` is as large as the weights; here `s` is `d · Σq` of the very `d` and `q` the product
    /// uses (exact in f32: |Σq| < 2¹³), so the minimum applies to the activations as quantized.
    /// With f16 sums, SmolLM2-135M Q4_1 chose another token than llama.cpp and an f64 evaluation at
    /// a step where both are sure (BENCHMARKS.md, issue #44).
    fn quantize(x: &[f32]) -> Self {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        let d = f16::from_f32(d).to_f32();
        Self {
            d,
            s: sum as f32 * d,
            qs,
        }
    }

    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().map(|q| self.d * *q as f32).collect()
    }
}

impl ActivationBlock for BlockQ8K {
    const ELEMS: usize = QK_K;

    fn scale(&self) -> f32 {
        self.d
    }

    fn scaled_sum(&self) -> f32 {
        0.0
    }

    /// llama.cpp's `quantize_row_q8_K_ref`: the element of largest magnitude maps to -127 (its
    /// sign kept in `d`), rounding to nearest-even, `d` kept in f32.
    fn quantize(x: &[f32]) -> Self {
        let (mut max, mut amax) = (0f32, 0f32);
        for v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = *v;
            }
        }
        let mut block = Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        };
        if amax == 0.0 {
            return block;
        }
        let iscale = -127.0 / max;
        for (q, v) in block.qs.iter_mut().zip(x) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = group.iter().map(|q| *q as i16).sum();
        }
        block.d = 1.0 / iscale;
        block
    }

    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().map(|q| self.d * *q as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<A: ActivationBlock>(x: &[f32], step: impl Fn(&A) -> f32) {
        let block = A::quantize(x);
        for (got, want) in block.dequantize().iter().zip(x) {
            // Rounding to the nearest step, plus f16 rounding of Q8_1's scale (2^-11 relative).
            let bound = step(&block) * 0.5 + want.abs() * 1e-3;
            assert!((got - want).abs() <= bound, "{got} vs {want}");
        }
    }

    /// llama.cpp's rule value for value: `d` is `max|x| / 127` through f16, `q` is `x · 127/max|x|`
    /// rounded half to even (ties built on purpose: with `max|x| = 127` the multiplier is 1), `s` is
    /// `d · Σq` exactly; Q8_K maps the largest magnitude to -127, rounds half to even, clamps at 127,
    /// keeps `d = 1/iscale` in f32 and sums each 16 `q`.
    #[test]
    fn quantization_follows_llama_cpps_rule_value_for_value() {
        let mut x = [0f32; BLOCK];
        x[0] = 127.0;
        for (i, v) in x.iter_mut().enumerate().skip(1) {
            // Ties (k + 0.5, both signs), and values off a tie.
            *v = match i % 4 {
                0 => i as f32 + 0.5,
                1 => -(i as f32) - 0.5,
                2 => i as f32 + 0.25,
                _ => -(i as f32) + 0.75,
            };
        }
        let b = BlockQ8_1::quantize(&x);
        assert_eq!(b.d, f16::from_f32(1.0).to_f32());
        for (q, v) in b.qs.iter().zip(&x) {
            assert_eq!(*q as f32, v.round_ties_even(), "{v}");
        }
        assert_eq!(b.qs[4], 4, "4.5 rounds to 4, not 5");
        assert_eq!(b.qs[5], -6, "-5.5 rounds to -6");
        assert_eq!(
            b.s,
            b.d * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32
        );
        // A scale that f16 rounds: d is the f16 value, s uses it.
        let y: Vec<f32> = (0..BLOCK).map(|i| (i as f32 - 11.3) * 0.0173).collect();
        let b = BlockQ8_1::quantize(&y);
        let amax = y.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(b.d, f16::from_f32(amax / 127.0).to_f32());
        assert_ne!(b.d, amax / 127.0);
        for (q, v) in b.qs.iter().zip(&y) {
            assert_eq!(*q as f32, (v * (127.0 / amax)).round_ties_even());
        }
        assert_eq!(
            b.s,
            b.d * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32
        );

        let mut z = [0f32; QK_K];
        z[7] = -254.0;
        z[1] = 3.0; // iscale = 0.5: 1.5 rounds to 2
        z[2] = 5.0; // 2.5 rounds to 2
        z[3] = -7.0; // -3.5 rounds to -4
        let k = BlockQ8K::quantize(&z);
        let iscale = -127.0f32 / -254.0;
        assert_eq!(k.d, 1.0 / iscale);
        for (q, v) in k.qs.iter().zip(&z) {
            assert_eq!(*q as f32, (iscale * v).round_ties_even().min(127.0), "{v}");
        }
        assert_eq!((k.qs[1], k.qs[2], k.qs[3], k.qs[7]), (2, 2, -4, -127));
        assert_eq!(
            k.bsums[0],
            k.qs[..16].iter().map(|&q| q as i16).sum::<i16>()
        );
    }

    #[test]
    fn blocks_round_to_their_nearest_step() {
        let x: Vec<f32> = (0..QK_K)
            .map(|i| ((i * 37 % 101) as f32 - 60.0) / 7.0)
            .collect();
        check::<BlockQ8K>(&x, |b| b.d.abs());
        for chunk in x.chunks_exact(BLOCK) {
            check::<BlockQ8_1>(chunk, |b| b.d);
        }
        let q8k = BlockQ8K::quantize(&x);
        // The largest magnitude maps to -127 exactly, and the sums match the quantized values.
        assert_eq!(q8k.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
        assert_eq!(
            q8k.bsums[3],
            q8k.qs[48..64].iter().map(|q| *q as i16).sum::<i16>()
        );
        let zero = BlockQ8K::quantize(&[0.0; QK_K]);
        assert_eq!((zero.d, zero.bsums), (0.0, [0; 16]));
    }
}
