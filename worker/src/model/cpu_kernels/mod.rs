//! strata's CPU matmuls for GGUF weights, with AVX2 and FMA: candle 0.11.1's quantized dot products
//! are scalar or run one activation row at a time, and on K-quants they decode at 0.40× llama.cpp's
//! speed (BENCHMARKS.md). Each format follows llama.cpp's block arithmetic (`ggml_vec_dot_*` in
//! `ggml-cpu/arch/x86/quants.c`): activations are quantized once per row ([`activations`]), products
//! are summed in integers within a block and scaled in f32 per block.
//!
//! The driver ([`QuantMatrix::matmul`]) spreads output columns over the thread pool and runs each
//! column against tiles of up to [`ROW_TILE`] activation rows, so a weight block is unpacked once per
//! tile. Every row is computed independently of the others: a sequence's result does not depend on its
//! batch-mates.

pub mod activations;
// The kernels are x86 code: elsewhere they compile, so the worker builds for Apple silicon and ARM
// Linux, but never run (`supported` is false), and their helpers go unused there.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod k_quants;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod legacy;
pub(crate) mod spin_pool;

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use activations::ActivationBlock;

/// Activation rows that share one unpacked weight block.
pub const ROW_TILE: usize = 8;
/// Columns per parallel task, at least.
const COLUMNS_PER_TASK: usize = 32;
/// Multiply-adds below which a matmul runs on the calling thread alone.
const SMALL_PRODUCT: usize = 1 << 16;

/// One block position of a row tile: each row's activation scale and scaled sum, lane `r` for row
/// `r`, so a kernel scales all rows' products with one vector multiply.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
pub(crate) struct RowScales {
    pub d: [f32; ROW_TILE],
    pub s: [f32; ROW_TILE],
}

/// [`RowScales`] of every tile of `m` rows (`kb` blocks each): tile `t`'s are `[t * kb..][..kb]`.
fn row_scales<A: ActivationBlock>(act: &[A], m: usize, kb: usize) -> Vec<RowScales> {
    let tiles = m.div_ceil(ROW_TILE);
    let mut scales = vec![RowScales::default(); tiles * kb];
    for (row, blocks) in act.chunks_exact(kb).enumerate() {
        let (tile, r) = (row / ROW_TILE, row % ROW_TILE);
        for (b, block) in blocks.iter().enumerate() {
            scales[tile * kb + b].d[r] = block.scale();
            scales[tile * kb + b].s[r] = block.scaled_sum();
        }
    }
    scales
}

/// The output buffer, written by disjoint tasks.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: each task writes only its own columns (see `QuantMatrix::matmul`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A quantized weight matrix `[n, k]` on the CPU that strata's own kernel multiplies.
pub trait CpuMatmul: Any + Debug + Send + Sync {
    /// Output columns `n`.
    fn rows(&self) -> usize;
    /// One matrix of this one's rows followed by `others`' (q/k/v or gate/up fused into one matmul,
    /// which quantizes the input once and wakes the thread pool once), or `None` unless all have
    /// this format and input width.
    fn concat(&self, others: &[&dyn CpuMatmul]) -> Option<Arc<dyn CpuMatmul>>;
    fn as_any(&self) -> &dyn Any;
    /// The instruction set [`CpuMatmul::matmul`] runs on, chosen at load ([`matrix_for`]).
    fn isa(&self) -> Isa;
    /// Bytes of the weight.
    fn bytes(&self) -> usize;
    /// `x: [m, k]` row-major → `x Wᵀ: [m, n]` row-major.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, self.isa())
    }
    /// [`CpuMatmul::matmul`] on one instruction set (one that [`Isa::runs_here`]).
    fn matmul_with(&self, x: &[f32], m: usize, isa: Isa) -> Vec<f32>;
}

/// Whether this CPU runs strata's kernels (AVX2, FMA, F16C); otherwise candle's run everything.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction sets a kernel may use, in the order they build on each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// AVX2, FMA, F16C: the baseline ([`supported`]).
    Avx2,
    /// Also AVX-512 BW/VL/VNNI, on 256-bit vectors (every AVX-512 CPU since Ice Lake and Zen 4):
    /// one `dpbusd` or `dpwssd` where AVX2 needs two or three instructions, and byte masks for
    /// Q5's fifth bits.
    Avx512,
}

impl Isa {
    /// The best this CPU runs, or `None` without the baseline.
    pub fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            let wide = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            supported().then_some(if wide { Isa::Avx512 } else { Isa::Avx2 })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// The best level this CPU runs, no higher than `ceiling` where one is given (a measure-only
    /// cap, [`crate::model::Ablations::cpu_isa`]); `None` without the baseline.
    pub fn best_up_to(ceiling: Option<Isa>) -> Option<Isa> {
        Isa::detect().map(|best| ceiling.map_or(best, |cap| cap.min(best)))
    }

    /// Whether this CPU runs this level.
    pub fn runs_here(self) -> bool {
        Isa::detect().is_some_and(|best| self <= best)
    }

    /// Every level this CPU runs.
    pub fn available() -> Vec<Isa> {
        [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.runs_here())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "AVX2",
            Isa::Avx512 => "AVX-512VL/VNNI",
        }
    }
}

/// The formats strata has a kernel for, by GGUF type.
pub const KERNEL_TYPES: &[GgmlDType] = &[
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// strata's kernel for a GGUF tensor `[n, k]` of type `dtype` (raw bytes as stored), run on `isa`,
/// or `None` where there is none (another type, or a CPU without `isa`): the caller then uses
/// candle's.
pub fn matrix_for(
    dtype: GgmlDType,
    bytes: &[u8],
    n: usize,
    k: usize,
    isa: Isa,
) -> Option<Result<Arc<dyn CpuMatmul>, String>> {
    fn build<B: WeightBlock>(
        bytes: &[u8],
        n: usize,
        k: usize,
        isa: Isa,
    ) -> Option<Result<Arc<dyn CpuMatmul>, String>> {
        Some(QuantMatrix::<B>::from_gguf_bytes(bytes, n, k, isa).map(|m| Arc::new(m) as _))
    }
    if !isa.runs_here() {
        return None;
    }
    match dtype {
        GgmlDType::Q4_0 => build::<legacy::BlockQ4_0>(bytes, n, k, isa),
        GgmlDType::Q4_1 => build::<legacy::BlockQ4_1>(bytes, n, k, isa),
        GgmlDType::Q5_0 => build::<legacy::BlockQ5_0>(bytes, n, k, isa),
        GgmlDType::Q5_1 => build::<legacy::BlockQ5_1>(bytes, n, k, isa),
        GgmlDType::Q8_0 => build::<legacy::BlockQ8_0>(bytes, n, k, isa),
        GgmlDType::Q4K => build::<k_quants::BlockQ4K>(bytes, n, k, isa),
        GgmlDType::Q5K => build::<k_quants::BlockQ5K>(bytes, n, k, isa),
        GgmlDType::Q6K => build::<k_quants::BlockQ6K>(bytes, n, k, isa),
        _ => None,
    }
}

/// One GGUF weight block format: its layout (a `#[repr(C)]` struct of the stored bytes, valid for
/// any bit pattern), the activation blocks it pairs with, and its AVX2 dot product.
pub(crate) trait WeightBlock: Copy + Send + Sync + Debug + 'static {
    const NAME: &'static str;
    /// Elements per block (and per activation block).
    const ELEMS: usize;
    type Act: ActivationBlock;

    /// Dot products of one weight column `w` (`kb` blocks) with `ROWS` activation rows `a` (`kb`
    /// blocks each, row after row, their scales also in `scales`, one per block) into `out[..ROWS]`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA ([`supported`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_rows<const ROWS: usize>(
        w: &[Self],
        a: &[Self::Act],
        kb: usize,
        scales: &[RowScales],
        out: &mut [f32],
    );

    /// [`WeightBlock::dot_rows`] with AVX-512 VNNI and byte masks on 256-bit vectors.
    ///
    /// # Safety
    /// As `dot_rows`, and the CPU has them ([`Isa::Avx512`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_rows_avx512<const ROWS: usize>(
        w: &[Self],
        a: &[Self::Act],
        kb: usize,
        scales: &[RowScales],
        out: &mut [f32],
    );

    /// Whether the AVX-512 level multiplies two columns at once
    /// ([`WeightBlock::dot_rows_pair_avx512`]).
    const PAIRS: bool = false;

    /// What the pair kernel needs of each activation block besides the block (`[]` if nothing).
    fn pair_bias(_act: &[Self::Act]) -> Vec<[i32; 8]> {
        Vec::new()
    }

    /// [`WeightBlock::dot_rows_avx512`] of two columns `w0`, `w1` at once into `out0`, `out1`, the
    /// same bits; `bias` is [`WeightBlock::pair_bias`] of `a`'s blocks.
    ///
    /// # Safety
    /// As `dot_rows_avx512`; only called where [`WeightBlock::PAIRS`].
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_rows_pair_avx512<const ROWS: usize>(
        _w0: &[Self],
        _w1: &[Self],
        _a: &[Self::Act],
        _kb: usize,
        _scales: &[RowScales],
        _bias: &[[i32; 8]],
        _out0: &mut [f32],
        _out1: &mut [f32],
    ) {
        unreachable!("{} has no two-column kernel", Self::NAME)
    }
}

/// A weight matrix `[n, k]` (n output columns, k inputs) in `B` blocks, row-major.
#[derive(Debug)]
pub(crate) struct QuantMatrix<B> {
    n: usize,
    k: usize,
    blocks: Vec<B>,
    /// What [`CpuMatmul::matmul`] runs on.
    isa: Isa,
}

impl<B: WeightBlock> QuantMatrix<B> {
    /// Takes the raw bytes of a GGUF tensor of shape `[n, k]`, to be run on `isa`.
    pub(crate) fn from_gguf_bytes(
        bytes: &[u8],
        n: usize,
        k: usize,
        isa: Isa,
    ) -> Result<Self, String> {
        let size = std::mem::size_of::<B>();
        if !k.is_multiple_of(B::ELEMS) {
            return Err(format!(
                "{} rows of {k} elements are not whole blocks of {}",
                B::NAME,
                B::ELEMS
            ));
        }
        let needed = n * k / B::ELEMS * size;
        if bytes.len() != needed {
            return Err(format!(
                "{} tensor [{n}, {k}] needs {needed} bytes, got {}",
                B::NAME,
                bytes.len()
            ));
        }
        let blocks = bytes
            .chunks_exact(size)
            // SAFETY: `B` is a `repr(C)` struct of integers and f16s, valid for any bytes, and the
            // chunk holds exactly `size_of::<B>()` of them (read unaligned).
            .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr() as *const B) })
            .collect();
        Ok(Self { n, k, blocks, isa })
    }
}

impl<B: WeightBlock> CpuMatmul for QuantMatrix<B> {
    fn rows(&self) -> usize {
        self.n
    }

    fn concat(&self, others: &[&dyn CpuMatmul]) -> Option<Arc<dyn CpuMatmul>> {
        let mut joined = Self {
            n: self.n,
            k: self.k,
            blocks: self.blocks.clone(),
            isa: self.isa,
        };
        for other in others {
            let other = other.as_any().downcast_ref::<Self>()?;
            if other.k != self.k || other.isa != self.isa {
                return None;
            }
            joined.n += other.n;
            joined.blocks.extend_from_slice(&other.blocks);
        }
        Some(Arc::new(joined))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn isa(&self) -> Isa {
        self.isa
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<B>()
    }

    fn matmul_with(&self, x: &[f32], m: usize, isa: Isa) -> Vec<f32> {
        assert!(isa.runs_here(), "{} asked of a CPU without it", isa.name());
        assert_eq!(x.len(), m * self.k, "activation length");
        let (n, kb) = (self.n, self.k / B::ELEMS);
        let act: Vec<B::Act> = if m * self.k >= 1 << 16 {
            x.par_chunks_exact(B::ELEMS).map(B::Act::quantize).collect()
        } else {
            x.chunks_exact(B::ELEMS).map(B::Act::quantize).collect()
        };
        let scales = row_scales(&act, m, kb);
        // Two columns per 512-bit vector pay where a weight block serves several rows; one row
        // (decode) runs faster on the one-column kernel (BENCHMARKS.md, session 24).
        let pairs = isa == Isa::Avx512 && B::PAIRS && m > 1;
        let bias = if pairs {
            B::pair_bias(&act)
        } else {
            Vec::new()
        };
        // Each task owns whole columns and writes them straight into the row-major result (a
        // transposing pass after the job ran on one thread while the pool's others waited).
        let mut out = vec![0f32; m * n];
        let pool = spin_pool::SpinPool::for_threads(rayon::current_num_threads());
        // A few tasks per thread: enough to even out, few enough that scheduling stays negligible;
        // one task (on this thread alone) where the whole product is smaller than a wake-up.
        let per_task = if n * self.k * m < SMALL_PRODUCT {
            n
        } else {
            COLUMNS_PER_TASK.max(n.div_ceil(pool.threads() * 4))
        };
        let out_ptr = SharedOut(out.as_mut_ptr());
        // SAFETY (of every write below): task `task` alone writes columns
        // `first..first + columns` of `out`, which outlives `run`.
        let store = |row0: usize, rows: usize, col: usize, values: &[f32; ROW_TILE]| unsafe {
            for (r, v) in values.iter().enumerate().take(rows) {
                *out_ptr.get().add((row0 + r) * n + col) = *v;
            }
        };
        pool.run(n.div_ceil(per_task), &|task| {
            let first = task * per_task;
            let columns = per_task.min(n - first);
            let mut c = 0;
            while pairs && c + 1 < columns {
                let w0 = &self.blocks[(first + c) * kb..(first + c + 1) * kb];
                let w1 = &self.blocks[(first + c + 1) * kb..(first + c + 2) * kb];
                for row0 in (0..m).step_by(ROW_TILE) {
                    let rows = ROW_TILE.min(m - row0);
                    let a = &act[row0 * kb..(row0 + rows) * kb];
                    let bias = bias.get(row0 * kb..).unwrap_or(&[]);
                    let scales = &scales[row0 / ROW_TILE * kb..][..kb];
                    let (mut out0, mut out1) = ([0f32; ROW_TILE], [0f32; ROW_TILE]);
                    // SAFETY: this CPU runs AVX-512 (`isa`, checked above) and `B` has pairs.
                    unsafe {
                        dot_pair_tile::<B>(rows, w0, w1, a, kb, scales, bias, &mut out0, &mut out1)
                    }
                    store(row0, rows, first + c, &out0);
                    store(row0, rows, first + c + 1, &out1);
                }
                c += 2;
            }
            for c in c..columns {
                let w = &self.blocks[(first + c) * kb..(first + c + 1) * kb];
                for row0 in (0..m).step_by(ROW_TILE) {
                    let rows = ROW_TILE.min(m - row0);
                    let a = &act[row0 * kb..(row0 + rows) * kb];
                    let scales = &scales[row0 / ROW_TILE * kb..][..kb];
                    let mut values = [0f32; ROW_TILE];
                    // SAFETY: this CPU runs `isa` (checked above).
                    unsafe { dot_tile::<B>(isa, rows, w, a, kb, scales, &mut values) }
                    store(row0, rows, first + c, &values);
                }
            }
        });
        out
    }
}

/// One tile of `rows` (1..=[`ROW_TILE`]) activation rows against one weight column.
///
/// # Safety
/// The CPU runs `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_tile<B: WeightBlock>(
    isa: Isa,
    rows: usize,
    w: &[B],
    a: &[B::Act],
    kb: usize,
    scales: &[RowScales],
    out: &mut [f32],
) {
    macro_rules! tile {
        ($($n:literal)*) => {
            match (isa, rows) {
                $((Isa::Avx2, $n) => B::dot_rows::<$n>(w, a, kb, scales, out),
                  (Isa::Avx512, $n) => B::dot_rows_avx512::<$n>(w, a, kb, scales, out),)*
                _ => unreachable!("a tile has 1..={ROW_TILE} rows"),
            }
        };
    }
    tile!(1 2 3 4 5 6 7 8)
}

/// Off x86_64 no [`Isa`] runs ([`supported`] is false), so no matrix of strata's is ever built.
///
/// # Safety
/// None needed: it never runs.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_tile<B: WeightBlock>(
    isa: Isa,
    _rows: usize,
    _w: &[B],
    _a: &[B::Act],
    _kb: usize,
    _scales: &[RowScales],
    _out: &mut [f32],
) {
    unreachable!("{} asked of a CPU that is not x86_64", isa.name())
}

/// Off x86_64 no two-column kernel runs either.
///
/// # Safety
/// None needed: it never runs.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_pair_tile<B: WeightBlock>(
    _rows: usize,
    _w0: &[B],
    _w1: &[B],
    _a: &[B::Act],
    _kb: usize,
    _scales: &[RowScales],
    _bias: &[[i32; 8]],
    _out0: &mut [f32],
    _out1: &mut [f32],
) {
    unreachable!("two-column kernels run only on x86_64")
}

/// One tile of `rows` (1..=[`ROW_TILE`]) activation rows against two weight columns.
///
/// # Safety
/// The CPU runs [`Isa::Avx512`] and `B` has [`WeightBlock::PAIRS`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_pair_tile<B: WeightBlock>(
    rows: usize,
    w0: &[B],
    w1: &[B],
    a: &[B::Act],
    kb: usize,
    scales: &[RowScales],
    bias: &[[i32; 8]],
    out0: &mut [f32],
    out1: &mut [f32],
) {
    macro_rules! tile {
        ($($n:literal)*) => {
            match rows {
                $($n => B::dot_rows_pair_avx512::<$n>(w0, w1, a, kb, scales, bias, out0, out1),)*
                _ => unreachable!("a tile has 1..={ROW_TILE} rows"),
            }
        };
    }
    tile!(1 2 3 4 5 6 7 8)
}

/// A block scale as f32 by the F16C instruction (`half`'s conversion is a call per block here). A
/// broadcast, not an insert into a register: an insert merges into whatever register the compiler
/// picks, once the accumulator, which chained every block of a dot product to the one before.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f32_of(h: half::f16) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h.to_bits() as i16)))
}

/// One 512-bit vector of two 256-bit halves, `lo` in lanes 0..8 (the two-column kernels).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
unsafe fn join_ps(
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// The sums of each 256-bit half's eight lanes, low half first (the two-column kernels).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
unsafe fn hsum_halves(v: std::arch::x86_64::__m512) -> (f32, f32) {
    use std::arch::x86_64::*;
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    (hsum_ps(_mm512_castps512_ps256(v)), hsum_ps(hi))
}

/// The sum of a vector's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    let sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
    _mm_cvtss_f32(sum1)
}

#[cfg(test)]
mod tests;
