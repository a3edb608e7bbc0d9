//! The K-quants (Q4_K, Q5_K, Q6_K) against Q8_K activations, after llama.cpp's
//! `ggml_vec_dot_q{4,5,6}_K_q8_K` (AVX2): a 256-element super-block holds 8 (Q4_K, Q5_K) or 16 (Q6_K)
//! sub-blocks with their own integer scale; products are summed in i32 with the scales applied by
//! `madd`, and the minimums (and Q6_K's offset of 32) come from Q8_K's sums of 16 activations.

use half::f16;

use super::activations::{BlockQ8K, QK_K};
#[cfg(target_arch = "x86_64")]
use super::RowScales;
use super::WeightBlock;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `x = d * sc_j * q - dmin * m_j` for 4-bit `q` in 8 sub-blocks of 32, with 6-bit `sc_j`, `m_j`
/// packed in `scales`. Sub-blocks `2i` and `2i + 1` are the low and high nibbles of `qs[32i..32i+32]`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}

/// Q4_K with a fifth bit per element: bit `j` of `qh[l]` belongs to element `32j + l`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qh: [u8; QK_K / 8],
    qs: [u8; QK_K / 2],
}

/// `x = d * sc_j * (q - 32)` for 6-bit `q` in 16 sub-blocks of 16 with signed 8-bit `sc_j`: 4 bits in
/// `ql`, 2 in `qh`, in two halves of 128 elements.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    d: f16,
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

/// The 8 scales and 8 minimums of a Q4_K/Q5_K super-block as 16 u16 lanes, scales first, by
/// llama.cpp's word arithmetic on the packed 6-bit fields (`get_scale_min_k4` element by element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scales_and_mins(q: &[u8; 12]) -> __m256i {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let mins_hi = ((w2 >> 4) & KMASK2) | (((w1 >> 6) & KMASK3) << 4);
    let mins_lo = w1 & KMASK1;
    let scales_hi = (w2 & KMASK2) | (((w0 >> 6) & KMASK3) << 4);
    let scales_lo = w0 & KMASK1;
    _mm256_cvtepu8_epi16(_mm_set_epi32(
        mins_hi as i32,
        mins_lo as i32,
        scales_hi as i32,
        scales_lo as i32,
    ))
}

/// `Σ_j m_j · (sum of sub-block j's activations)` in 4 i32 lanes: the minimums' share of a
/// Q4_K/Q5_K dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn min_products(scales_mins: __m256i, a: &BlockQ8K) -> __m128i {
    let sums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
    let pairs = _mm_hadd_epi16(
        _mm256_castsi256_si128(sums),
        _mm256_extracti128_si256(sums, 1),
    );
    _mm_madd_epi16(_mm256_extracti128_si256(scales_mins, 1), pairs)
}

/// `Σ scale · q · y` over one 32-element vector pair, in 8 i32 lanes (`q` unsigned, `y` signed).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scaled_products(q: __m256i, y: &[i8], scale: __m256i) -> __m256i {
    let y = _mm256_loadu_si256(y.as_ptr() as *const __m256i);
    _mm256_madd_epi16(scale, _mm256_maddubs_epi16(q, y))
}

/// What the shared Q4_K/Q5_K dot product reads of a super-block.
trait Q45Block: Copy {
    /// Whether the block has fifth bits ([`Q45Block::high`]).
    const FIVE_BITS: bool;
    /// `d`, `dmin`, the packed scales and minimums, and the low 4 bits.
    fn parts(&self) -> (f16, f16, &[u8; 12], &[u8; QK_K / 2]);
    /// Q5_K's `qh` (unused for Q4_K).
    #[cfg(target_arch = "x86_64")]
    unsafe fn high(&self) -> __m256i;
}

impl Q45Block for BlockQ4K {
    const FIVE_BITS: bool = false;
    fn parts(&self) -> (f16, f16, &[u8; 12], &[u8; QK_K / 2]) {
        (self.d, self.dmin, &self.scales, &self.qs)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn high(&self) -> __m256i {
        _mm256_setzero_si256()
    }
}

impl Q45Block for BlockQ5K {
    const FIVE_BITS: bool = true;
    fn parts(&self) -> (f16, f16, &[u8; 12], &[u8; QK_K / 2]) {
        (self.d, self.dmin, &self.scales, &self.qs)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn high(&self) -> __m256i {
        _mm256_loadu_si256(self.qh.as_ptr() as *const __m256i)
    }
}

/// `sumi + Σ scale · q · y` in 8 i32 lanes over one 32-element vector pair (`q` unsigned, `y`
/// signed): `maddubs`, `madd` and an add.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_scaled_products(sumi: __m256i, q: __m256i, y: &[i8], scale: __m256i) -> __m256i {
    _mm256_add_epi32(sumi, scaled_products(q, y, scale))
}

/// [`add_scaled_products`] with VNNI's `dpwssd` for the `madd` and the add (the same integers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn add_scaled_products_vnni(sumi: __m256i, q: __m256i, y: &[i8], scale: __m256i) -> __m256i {
    let y = _mm256_loadu_si256(y.as_ptr() as *const __m256i);
    _mm256_dpwssd_epi32(sumi, _mm256_maddubs_epi16(q, y), scale)
}

/// The K-quant dot products of one weight column with `ROWS` activation rows, once per instruction
/// set (`target_feature` is per function): `$add` accumulates one scaled 32-element product.
macro_rules! k_kernels {
    ($module:ident, $features:literal, $add:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::*;

            /// Q4_K and Q5_K.
            #[target_feature(enable = $features)]
            #[inline]
            pub(super) unsafe fn dot_rows_q45<B: Q45Block, const ROWS: usize>(
                w: &[B],
                a: &[BlockQ8K],
                kb: usize,
                out: &mut [f32],
            ) {
                let mut acc = [_mm256_setzero_ps(); ROWS];
                let mut mins = [_mm_setzero_ps(); ROWS];
                for (b, wb) in w.iter().enumerate() {
                    dot_q45k::<B, ROWS>(wb, row_blocks::<ROWS>(a, kb, b), &mut acc, &mut mins);
                }
                for r in 0..ROWS {
                    out[r] = super::super::hsum_ps(acc[r]) - hsum_128(mins[r]);
                }
            }

            /// One super-block of [`dot_rows_q45`], into the rows' accumulators.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot_q45k<B: Q45Block, const ROWS: usize>(
                wb: &B,
                a: [&BlockQ8K; ROWS],
                acc: &mut [__m256; ROWS],
                mins_acc: &mut [__m128; ROWS],
            ) {
                let (d, dmin, scales, qs) = wb.parts();
                let (d, dmin) = (super::super::f32_of(d), super::super::f32_of(dmin));
                let high = wb.high();
                let m4 = _mm256_set1_epi8(0x0F);
                let scales_mins = scales_and_mins(scales);
                // The 8 scales in both halves, for byte shuffles that broadcast one of them.
                let sc128 = _mm256_castsi256_si128(scales_mins);
                let sc = _mm256_set_m128i(sc128, sc128);
                let mut sumi = [_mm256_setzero_si256(); ROWS];
                for j in 0..QK_K / 64 {
                    let bits = _mm256_loadu_si256(qs[32 * j..].as_ptr() as *const __m256i);
                    let mut lo = _mm256_and_si256(bits, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    if B::FIVE_BITS {
                        let one = _mm256_set1_epi8(1);
                        let shift_lo = _mm_cvtsi32_si128(2 * j as i32);
                        let shift_hi = _mm_cvtsi32_si128(2 * j as i32 + 1);
                        let h_lo = _mm256_and_si256(_mm256_srl_epi16(high, shift_lo), one);
                        let h_hi = _mm256_and_si256(_mm256_srl_epi16(high, shift_hi), one);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(h_lo, 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(h_hi, 4));
                    }
                    let s_lo = _mm256_shuffle_epi8(sc, _mm256_set1_epi16(broadcast_word(2 * j)));
                    let s_hi =
                        _mm256_shuffle_epi8(sc, _mm256_set1_epi16(broadcast_word(2 * j + 1)));
                    for r in 0..ROWS {
                        let y = &a[r].qs[64 * j..];
                        sumi[r] = $add(sumi[r], lo, y, s_lo);
                        sumi[r] = $add(sumi[r], hi, &y[32..], s_hi);
                    }
                }
                for r in 0..ROWS {
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * a[r].d),
                        _mm256_cvtepi32_ps(sumi[r]),
                        acc[r],
                    );
                    mins_acc[r] = _mm_fmadd_ps(
                        _mm_set1_ps(dmin * a[r].d),
                        _mm_cvtepi32_ps(min_products(scales_mins, a[r])),
                        mins_acc[r],
                    );
                }
            }

            /// Q6_K.
            #[target_feature(enable = $features)]
            #[inline]
            pub(super) unsafe fn dot_rows_q6k<const ROWS: usize>(
                w: &[BlockQ6K],
                a: &[BlockQ8K],
                kb: usize,
                out: &mut [f32],
            ) {
                let m4 = _mm256_set1_epi8(0x0F);
                let m2 = _mm256_set1_epi8(3);
                let mut acc = [_mm256_setzero_ps(); ROWS];
                for (b, wb) in w.iter().enumerate() {
                    let d = super::super::f32_of(wb.d);
                    let rows = row_blocks::<ROWS>(a, kb, b);
                    let mut sumi = [_mm256_setzero_si256(); ROWS];
                    for half in 0..2 {
                        let ql = &wb.ql[64 * half..];
                        let b1 = _mm256_loadu_si256(ql.as_ptr() as *const __m256i);
                        let b2 = _mm256_loadu_si256(ql[32..].as_ptr() as *const __m256i);
                        let bh = _mm256_loadu_si256(wb.qh[32 * half..].as_ptr() as *const __m256i);
                        let q = [
                            _mm256_or_si256(_mm256_and_si256(b1, m4), six_bit_high(bh, m2, 0)),
                            _mm256_or_si256(_mm256_and_si256(b2, m4), six_bit_high(bh, m2, 2)),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(b1, 4), m4),
                                six_bit_high(bh, m2, 4),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(b2, 4), m4),
                                six_bit_high(bh, m2, 6),
                            ),
                        ];
                        for (v, qv) in q.iter().enumerate() {
                            // Lanes 0..8 hold elements 0..16 (one sub-block), 8..16 the next.
                            let s = 8 * half + 2 * v;
                            let scale = _mm256_set_m128i(
                                _mm_set1_epi16(wb.scales[s + 1] as i16),
                                _mm_set1_epi16(wb.scales[s] as i16),
                            );
                            for r in 0..ROWS {
                                let y = &rows[r].qs[128 * half + 32 * v..];
                                sumi[r] = $add(sumi[r], *qv, y, scale);
                            }
                        }
                    }
                    // The stored q are q - 32 plus 32: take 32 · Σ_j sc_j · (sum of sub-block j).
                    let sc16 =
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.scales.as_ptr() as *const __m128i));
                    for r in 0..ROWS {
                        let sums = _mm256_loadu_si256(rows[r].bsums.as_ptr() as *const __m256i);
                        let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, sums), 5);
                        let total = _mm256_sub_epi32(sumi[r], offset);
                        let scale = _mm256_set1_ps(d * rows[r].d);
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(total), acc[r]);
                    }
                }
                for r in 0..ROWS {
                    out[r] = super::super::hsum_ps(acc[r]);
                }
            }
        }
    };
}

k_kernels!(avx2, "avx2,fma,f16c", add_scaled_products);
k_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    add_scaled_products_vnni
);

/// Two Q4_K/Q5_K weight columns against `ROWS` activation rows in 512-bit vectors (column `w0`
/// in the low half, `w1` in the high): one `maddubs` and one `dpwssd` give both columns' scaled
/// products of 32 elements, each half the integers and f32 steps of `vnni::dot_rows_q45`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_pair_q45<B: Q45Block, const ROWS: usize>(
    w0: &[B],
    w1: &[B],
    a: &[BlockQ8K],
    kb: usize,
    out0: &mut [f32],
    out1: &mut [f32],
) {
    let join = |lo: __m256i, hi: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let mut mins = [[_mm_setzero_ps(); 2]; ROWS];
    let m4 = _mm512_set1_epi8(0x0F);
    for b in 0..kb {
        let (x0, x1) = (&w0[b], &w1[b]);
        let ((d0, dmin0, scales0, qs0), (d1, dmin1, scales1, qs1)) = (x0.parts(), x1.parts());
        let (d0, dmin0) = (super::f32_of(d0), super::f32_of(dmin0));
        let (d1, dmin1) = (super::f32_of(d1), super::f32_of(dmin1));
        let (sm0, sm1) = (scales_and_mins(scales0), scales_and_mins(scales1));
        // Each column's 8 scales in both 128-bit lanes of its half, for in-lane byte shuffles.
        let (sc0, sc1) = (_mm256_castsi256_si128(sm0), _mm256_castsi256_si128(sm1));
        let sc = join(_mm256_set_m128i(sc0, sc0), _mm256_set_m128i(sc1, sc1));
        let high = join(x0.high(), x1.high());
        let mut sumi = [_mm512_setzero_si512(); ROWS];
        for j in 0..QK_K / 64 {
            let bits = join(
                _mm256_loadu_si256(qs0[32 * j..].as_ptr() as *const __m256i),
                _mm256_loadu_si256(qs1[32 * j..].as_ptr() as *const __m256i),
            );
            let mut lo = _mm512_and_si512(bits, m4);
            let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4);
            if B::FIVE_BITS {
                let one = _mm512_set1_epi8(1);
                let shift_lo = _mm_cvtsi32_si128(2 * j as i32);
                let shift_hi = _mm_cvtsi32_si128(2 * j as i32 + 1);
                let h_lo = _mm512_and_si512(_mm512_srl_epi16(high, shift_lo), one);
                let h_hi = _mm512_and_si512(_mm512_srl_epi16(high, shift_hi), one);
                lo = _mm512_or_si512(lo, _mm512_slli_epi16::<4>(h_lo));
                hi = _mm512_or_si512(hi, _mm512_slli_epi16::<4>(h_hi));
            }
            let s_lo = _mm512_shuffle_epi8(sc, _mm512_set1_epi16(broadcast_word(2 * j)));
            let s_hi = _mm512_shuffle_epi8(sc, _mm512_set1_epi16(broadcast_word(2 * j + 1)));
            for r in 0..ROWS {
                let y = &a[r * kb + b].qs[64 * j..];
                let y_lo = _mm512_broadcast_i64x4(_mm256_loadu_si256(y.as_ptr() as *const __m256i));
                let y_hi =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(y[32..].as_ptr() as *const __m256i));
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(lo, y_lo), s_lo);
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(hi, y_hi), s_hi);
            }
        }
        for r in 0..ROWS {
            let ab = &a[r * kb + b];
            let scale = super::join_ps(_mm256_set1_ps(d0 * ab.d), _mm256_set1_ps(d1 * ab.d));
            acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sumi[r]), acc[r]);
            for (c, (sm, dmin)) in [(sm0, dmin0), (sm1, dmin1)].into_iter().enumerate() {
                mins[r][c] = _mm_fmadd_ps(
                    _mm_set1_ps(dmin * ab.d),
                    _mm_cvtepi32_ps(min_products(sm, ab)),
                    mins[r][c],
                );
            }
        }
    }
    for r in 0..ROWS {
        let (lo, hi) = super::hsum_halves(acc[r]);
        out0[r] = lo - hsum_128(mins[r][0]);
        out1[r] = hi - hsum_128(mins[r][1]);
    }
}

/// The shuffle control that copies 16-bit lane `i` of a 128-bit half into every lane.
const fn broadcast_word(i: usize) -> i16 {
    (((2 * i + 1) << 8) | (2 * i)) as i16
}

/// The sum of a 4-lane vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum_128(v: __m128) -> f32 {
    let pairs = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
}

/// Bits `shift..shift + 2` of each byte of `qh`, moved to bits 4..6 (Q6_K's high bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn six_bit_high(qh: __m256i, m2: __m256i, shift: i32) -> __m256i {
    let bits = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16(_mm256_and_si256(bits, m2), 4)
}

/// The rows' blocks `b` of `a` (`kb` blocks per row).
fn row_blocks<const ROWS: usize>(a: &[BlockQ8K], kb: usize, b: usize) -> [&BlockQ8K; ROWS] {
    std::array::from_fn(|r| &a[r * kb + b])
}

macro_rules! weight_block {
    ($block:ty, $name:literal, $kernel:ident $(::<$generic:ty>)? $(, pairs: $pair:ident)?) => {
        impl WeightBlock for $block {
            const NAME: &'static str = $name;
            const ELEMS: usize = QK_K;
            type Act = BlockQ8K;

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot_rows<const ROWS: usize>(
                w: &[Self],
                a: &[BlockQ8K],
                kb: usize,
                _scales: &[RowScales],
                out: &mut [f32],
            ) {
                avx2::$kernel::<$($generic,)? ROWS>(w, a, kb, out)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn dot_rows_avx512<const ROWS: usize>(
                w: &[Self],
                a: &[BlockQ8K],
                kb: usize,
                _scales: &[RowScales],
                out: &mut [f32],
            ) {
                vnni::$kernel::<$($generic,)? ROWS>(w, a, kb, out)
            }

            $(
            const PAIRS: bool = true;

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn dot_rows_pair_avx512<const ROWS: usize>(
                w0: &[Self],
                w1: &[Self],
                a: &[BlockQ8K],
                kb: usize,
                _scales: &[RowScales],
                _bias: &[[i32; 8]],
                out0: &mut [f32],
                out1: &mut [f32],
            ) {
                $pair::<Self, ROWS>(w0, w1, a, kb, out0, out1)
            }
            )?
        }
    };
}

weight_block!(BlockQ4K, "Q4_K", dot_rows_q45::<BlockQ4K>, pairs: dot_pair_q45);
weight_block!(BlockQ5K, "Q5_K", dot_rows_q45::<BlockQ5K>, pairs: dot_pair_q45);
weight_block!(BlockQ6K, "Q6_K", dot_rows_q6k);
