//! The 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against Q8_1 activations: each weight block
//! unpacks to 32 bytes, signed (`q - 8`, `q - 16`, Q8_0's bytes) or unsigned with a minimum (Q4_1,
//! Q5_1), as llama.cpp's `ggml_vec_dot_q*_q8_*` do. Q5_0 and Q8_0 matter for Q4_K_M files too: a
//! tensor whose rows are not whole 256-element super-blocks (SmolLM2's 576) falls back to them.

use half::f16;

use super::activations::{BlockQ8_1, BLOCK};
use super::WeightBlock;
#[cfg(target_arch = "x86_64")]
use super::{RowScales, ROW_TILE};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `x = d * (q - 8)` for 32 4-bit `q` (low nibbles are elements 0..16, high 16..32).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_0 {
    d: f16,
    qs: [u8; BLOCK / 2],
}

/// `x = d * q + m` for 32 4-bit `q`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; BLOCK / 2],
}

/// `x = d * (q - 16)` for 32 5-bit `q`: 4 bits in `qs` as Q4_0, the fifth of element `i` in bit `i`
/// of `qh`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; BLOCK / 2],
}

/// `x = d * q + m` for 32 5-bit `q`, laid out as Q5_0.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_1 {
    d: f16,
    m: f16,
    qh: [u8; 4],
    qs: [u8; BLOCK / 2],
}

/// `x = d * q` for 32 signed bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; BLOCK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// What the shared 32-element dot product needs of a format.
trait Block32: Copy {
    /// Whether [`Block32::unpack`] gives signed bytes (else unsigned, with a minimum `m`).
    const SIGNED: bool;
    /// The 32 quantized values, in element order.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(&self) -> __m256i;
    /// [`Block32::unpack`] with AVX-512's byte masks (a fifth bit is one masked add).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_avx512(&self) -> __m256i {
        self.unpack()
    }
    fn d(&self) -> f16;
    fn m(&self) -> f16 {
        f16::ZERO
    }
    /// What [`Block32::unpack_unsigned`] adds to each signed value (0 for the formats with a
    /// minimum, whose values are unsigned already).
    const OFFSET: u8;
    /// The 32 values as unsigned bytes, `q + OFFSET`, for the two-column kernel: `dpbusd` takes
    /// unsigned by signed bytes, and a lane's sum starts from `-OFFSET ×` its activations' sum.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack_unsigned(&self) -> __m256i;
}

/// The 32 nibbles of `qs`: low nibbles first, then high.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let packed = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let both =
        _mm256_inserti128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// 0xFF in byte `i` where bit `i` of `qh` is set, else 0 (llama.cpp's `bytes_from_bits_32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bit_bytes(qh: [u8; 4]) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(i32::from_le_bytes(qh)),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    let bit = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bit, _mm256_set1_epi64x(-1))
}

impl Block32 for BlockQ4_0 {
    const OFFSET: u8 = 8;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_unsigned(&self) -> __m256i {
        nibbles(&self.qs)
    }
    const SIGNED: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&self) -> __m256i {
        _mm256_sub_epi8(nibbles(&self.qs), _mm256_set1_epi8(8))
    }
    fn d(&self) -> f16 {
        self.d
    }
}

impl Block32 for BlockQ4_1 {
    const OFFSET: u8 = 0;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_unsigned(&self) -> __m256i {
        nibbles(&self.qs)
    }
    const SIGNED: bool = false;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&self) -> __m256i {
        nibbles(&self.qs)
    }
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> f16 {
        self.m
    }
}

impl Block32 for BlockQ5_0 {
    const OFFSET: u8 = 16;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_unsigned(&self) -> __m256i {
        let q = nibbles(&self.qs);
        _mm256_mask_add_epi8(q, u32::from_le_bytes(self.qh), q, _mm256_set1_epi8(16))
    }
    const SIGNED: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&self) -> __m256i {
        // q - 16 as a signed byte: the nibble as is where the fifth bit is set, else nibble | 0xF0.
        let low = _mm256_andnot_si256(bit_bytes(self.qh), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(&self.qs), low)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_avx512(&self) -> __m256i {
        let q = nibbles(&self.qs);
        _mm256_mask_sub_epi8(q, !u32::from_le_bytes(self.qh), q, _mm256_set1_epi8(16))
    }
    fn d(&self) -> f16 {
        self.d
    }
}

impl Block32 for BlockQ5_1 {
    const OFFSET: u8 = 0;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_unsigned(&self) -> __m256i {
        self.unpack_avx512()
    }
    const SIGNED: bool = false;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&self) -> __m256i {
        let high = _mm256_and_si256(bit_bytes(self.qh), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles(&self.qs), high)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_avx512(&self) -> __m256i {
        let q = nibbles(&self.qs);
        _mm256_mask_add_epi8(q, u32::from_le_bytes(self.qh), q, _mm256_set1_epi8(16))
    }
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> f16 {
        self.m
    }
}

impl Block32 for BlockQ8_0 {
    const OFFSET: u8 = 128;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn unpack_unsigned(&self) -> __m256i {
        _mm256_xor_si256(
            _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i),
            _mm256_set1_epi8(0x80u8 as i8),
        )
    }
    const SIGNED: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&self) -> __m256i {
        _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i)
    }
    fn d(&self) -> f16 {
        self.d
    }
}

/// `Σ w·a` over one block in 8 i32 lanes, as f32: `maddubs` multiplies unsigned by signed bytes, so
/// signed weights lend their sign to the activations (llama.cpp's `mul_sum_i8_pairs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_products(signed: bool, q: __m256i, abs_q: __m256i, y: __m256i) -> __m256 {
    let y = if signed { _mm256_sign_epi8(y, q) } else { y };
    let pairs = _mm256_maddubs_epi16(abs_q, y);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// [`block_products`] with VNNI's `dpbusd`, one instruction for `maddubs` and `madd` (the same
/// sums: no pair here reaches `maddubs`' saturation).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn block_products_vnni(signed: bool, q: __m256i, abs_q: __m256i, y: __m256i) -> __m256 {
    let y = if signed { _mm256_sign_epi8(y, q) } else { y };
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_q, y))
}

/// The 32-element dot product, once per instruction set (`target_feature` is per function). The
/// tile's activation scales come as vectors ([`RowScales`]): one multiply gives every row's block
/// scale and one the minimums' share, the same f32 operations per row as one row at a time.
macro_rules! dot32 {
    ($name:ident, $features:literal, $unpack:ident, $products:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $name<B: Block32, const ROWS: usize>(
            w: &[B],
            a: &[BlockQ8_1],
            kb: usize,
            scales: &[RowScales],
            out: &mut [f32],
        ) {
            let mut acc = [_mm256_setzero_ps(); ROWS];
            let mut mins = _mm256_setzero_ps();
            for ((b, wb), rs) in w.iter().enumerate().zip(scales) {
                let q = wb.$unpack();
                let abs_q = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
                let wd = _mm256_set1_ps(super::f32_of(wb.d()));
                let row_d = _mm256_mul_ps(wd, _mm256_load_ps(rs.d.as_ptr()));
                if !B::SIGNED {
                    let wm = _mm256_set1_ps(super::f32_of(wb.m()));
                    mins = _mm256_add_ps(mins, _mm256_mul_ps(wm, _mm256_load_ps(rs.s.as_ptr())));
                }
                for r in 0..ROWS {
                    let ab = &a[r * kb + b];
                    let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                    let products = $products(B::SIGNED, q, abs_q, y);
                    let scale = _mm256_permutevar8x32_ps(row_d, _mm256_set1_epi32(r as i32));
                    acc[r] = _mm256_fmadd_ps(scale, products, acc[r]);
                }
            }
            let mut min_lanes = [0f32; ROW_TILE];
            _mm256_storeu_ps(min_lanes.as_mut_ptr(), mins);
            for r in 0..ROWS {
                out[r] = super::hsum_ps(acc[r]) + min_lanes[r];
            }
        }
    };
}

/// Two weight columns against `ROWS` activation rows in 512-bit vectors, column `w0` in the low
/// half and `w1` in the high: one `dpbusd` gives both columns' products of a block, the weights
/// unsigned (`q + OFFSET`) and each lane's sum started from `bias` (`-OFFSET ×` the lane's four
/// activations), so every lane holds the integer [`dot32`] computes and the f32 steps are its own.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dot32_pair<B: Block32, const ROWS: usize>(
    w0: &[B],
    w1: &[B],
    a: &[BlockQ8_1],
    kb: usize,
    scales: &[RowScales],
    bias: &[[i32; 8]],
    out0: &mut [f32],
    out1: &mut [f32],
) {
    let both = |v: &[f32; ROW_TILE]| {
        _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
            v.as_ptr() as *const f64
        )))
    };
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let mut mins = _mm512_setzero_ps();
    for (b, rs) in scales.iter().enumerate().take(kb) {
        let (x0, x1) = (&w0[b], &w1[b]);
        let q = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(x0.unpack_unsigned()),
            x1.unpack_unsigned(),
        );
        let wd = super::join_ps(
            _mm256_set1_ps(super::f32_of(x0.d())),
            _mm256_set1_ps(super::f32_of(x1.d())),
        );
        if B::OFFSET == 0 {
            let wm = super::join_ps(
                _mm256_set1_ps(super::f32_of(x0.m())),
                _mm256_set1_ps(super::f32_of(x1.m())),
            );
            mins = _mm512_add_ps(mins, _mm512_mul_ps(wm, both(&rs.s)));
        }
        for r in 0..ROWS {
            let ab = &a[r * kb + b];
            let y = _mm512_broadcast_i64x4(_mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i));
            let start = if B::OFFSET == 0 {
                _mm512_setzero_si512()
            } else {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    bias[r * kb + b].as_ptr() as *const __m256i
                ))
            };
            let products = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, q, y));
            let scale = _mm512_mul_ps(wd, _mm512_set1_ps(rs.d[r]));
            acc[r] = _mm512_fmadd_ps(scale, products, acc[r]);
        }
    }
    let mut min_lanes = [0f32; 2 * ROW_TILE];
    _mm512_storeu_ps(min_lanes.as_mut_ptr(), mins);
    for r in 0..ROWS {
        let (lo, hi) = super::hsum_halves(acc[r]);
        out0[r] = lo + min_lanes[r];
        out1[r] = hi + min_lanes[ROW_TILE + r];
    }
}

/// The starts of [`dot32_pair`]'s lanes for each activation block: `-offset ×` the sum of each
/// lane's four activations.
fn lane_bias(act: &[BlockQ8_1], offset: u8) -> Vec<[i32; 8]> {
    if offset == 0 {
        return Vec::new();
    }
    act.iter()
        .map(|block| {
            std::array::from_fn(|lane| {
                let four = &block.qs[4 * lane..4 * lane + 4];
                -(offset as i32) * four.iter().map(|&q| q as i32).sum::<i32>()
            })
        })
        .collect()
}

dot32!(dot32, "avx2,fma,f16c", unpack, block_products);
dot32!(
    dot32_avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    unpack_avx512,
    block_products_vnni
);

macro_rules! weight_block {
    ($block:ty, $name:literal) => {
        impl WeightBlock for $block {
            const NAME: &'static str = $name;
            const ELEMS: usize = BLOCK;
            type Act = BlockQ8_1;

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot_rows<const ROWS: usize>(
                w: &[Self],
                a: &[BlockQ8_1],
                kb: usize,
                scales: &[RowScales],
                out: &mut [f32],
            ) {
                dot32::<Self, ROWS>(w, a, kb, scales, out)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn dot_rows_avx512<const ROWS: usize>(
                w: &[Self],
                a: &[BlockQ8_1],
                kb: usize,
                scales: &[RowScales],
                out: &mut [f32],
            ) {
                dot32_avx512::<Self, ROWS>(w, a, kb, scales, out)
            }

            const PAIRS: bool = true;

            fn pair_bias(act: &[BlockQ8_1]) -> Vec<[i32; 8]> {
                lane_bias(act, <Self as Block32>::OFFSET)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn dot_rows_pair_avx512<const ROWS: usize>(
                w0: &[Self],
                w1: &[Self],
                a: &[BlockQ8_1],
                kb: usize,
                scales: &[RowScales],
                bias: &[[i32; 8]],
                out0: &mut [f32],
                out1: &mut [f32],
            ) {
                dot32_pair::<Self, ROWS>(w0, w1, a, kb, scales, bias, out0, out1)
            }
        }
    };
}

weight_block!(BlockQ4_0, "Q4_0");
weight_block!(BlockQ4_1, "Q4_1");
weight_block!(BlockQ5_0, "Q5_0");
weight_block!(BlockQ5_1, "Q5_1");
weight_block!(BlockQ8_0, "Q8_0");
