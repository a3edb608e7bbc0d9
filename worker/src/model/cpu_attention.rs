//! Attention of one sequence on the CPU as one kernel: scores, softmax and the weighted sum of
//! values per query row, reading the cache where it lies and spread over the matmul pool.
//!
//! candle's path materializes every step's scores several times (product, scale, mask, softmax),
//! packs the whole history for each product and runs a decode step's products on one thread; this
//! kernel does none of that. It keeps candle's arithmetic, so tokens do not move:
//! - a score is one FMA chain over the head's dimensions, as gemm's microkernel computes it, then
//!   multiplied by the scale;
//! - the softmax is `prompt_softmax`'s (candle's max, `exp`, lane sums and division) over the
//!   positions the row sees;
//! - an output is an FMA chain over the positions the row sees, restarted every
//!   [`CHAIN_POSITIONS`] positions and the pieces added in order, as gemm does for a product of at
//!   most 64×64 outputs (decode of a head of ≤ 64 dimensions).
//!
//! For every history of at most [`CHAIN_POSITIONS`] positions this is gemm's arithmetic bit for bit
//! (one chain per output; tested against candle's path), and for ≤ 64-wide heads' decode at any
//! length. Past that, where gemm would size its pieces by the cache, the pieces stay at fixed
//! positions: a row's result depends only on the positions it sees, so a prefix copied from
//! another sequence gives exactly a cold prefill's rows at any length.
//!
//! Products gemm computes another way stay on candle's path (`Layer::attend`): a decode row of a
//! head that shares its keys with no other (gemm's matrix-vector kernels) and products of at most
//! 256 outputs (its horizontal kernel).

use std::cell::RefCell;

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu_kernels::{spin_pool::SpinPool, Isa};

/// Positions of one FMA chain of an output before the next piece starts (gemm's depth block for
/// small products, `gemm_common::gemm`).
pub const CHAIN_POSITIONS: usize = 512;
/// Positions whose keys are transposed at once: four 16-lane vectors per query row and dimension.
const PANEL: usize = 64;
/// Query positions per task of a prompt step (each with every head of its key/value head).
const PROMPT_POSITIONS_PER_TASK: usize = 16;
/// Query rows whose score chains run side by side over one panel.
const SCORE_ROWS: usize = 4;
/// Products of at most this many outputs go through gemm's horizontal kernel instead.
const GEMM_HORIZONTAL_MAX_OUTPUTS: usize = 16 * 16;

/// One sequence's attention step as the kernel sees it.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query positions of the step (the history's last `len`).
    pub len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// What scores are multiplied by; `None` where the query weights carry it.
    pub scale: Option<f32>,
    /// A sliding window: a row sees only its last `window` positions.
    pub window: Option<usize>,
    /// The instruction set the kernel runs on.
    pub isa: Isa,
}

impl AttentionShape {
    /// Whether the kernel computes this step with candle's arithmetic (see the module's doc):
    /// gemm's microkernel for both products, on a CPU with AVX2 and FMA.
    pub fn runs_here(&self, kv_len: usize) -> bool {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) || self.len == 0 {
            return false;
        }
        let group = self.heads / self.kv_heads;
        let horizontal = if self.len == 1 {
            // A decode row of a sliding layer reads only its window's positions.
            let seen = self.window.map_or(kv_len, |w| w.min(kv_len));
            group * seen <= GEMM_HORIZONTAL_MAX_OUTPUTS
        } else {
            // A prompt step gives `q` column-major (`RowInvariance`) unless a whole prefill of
            // `kv_len` rows would take the horizontal kernel itself.
            group * kv_len * kv_len <= GEMM_HORIZONTAL_MAX_OUTPUTS
        };
        let matrix_vector = self.len == 1 && group == 1;
        self.isa.runs_here() && !horizontal && !matrix_vector && self.len <= kv_len
    }
}

/// Attention of `q: [len, heads, head_dim]` against `k, v: [kv_heads, kv_len, head_dim]` (the
/// history, the step's positions last), giving `[len, heads * head_dim]`. CPU f32 tensors whose
/// last dimension is contiguous; callers check [`AttentionShape::runs_here`] first.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttentionShape) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &Attention(shape))
}

struct Attention(AttentionShape);

/// A tensor's elements from its first, with its strides.
struct View<'a> {
    data: &'a [f32],
    stride: &'a [usize],
}

fn view<'a>(storage: &'a CpuStorage, layout: &'a Layout, what: &str) -> Result<View<'a>> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("CPU attention takes f32 {what}");
    };
    if layout.stride().last() != Some(&1) {
        candle_core::bail!("CPU attention needs {what} contiguous in its last dimension");
    }
    Ok(View {
        data: &data[layout.start_offset()..],
        stride: layout.stride(),
    })
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.0;
        let (len, heads, head_dim) = q_layout.shape().dims3()?;
        let (kv_heads, kv_len, k_dim) = k_layout.shape().dims3()?;
        if (len, heads, head_dim) != (s.len, s.heads, s.head_dim)
            || (kv_heads, k_dim) != (s.kv_heads, s.head_dim)
            || v_layout.shape() != k_layout.shape()
            || !s.runs_here(kv_len)
        {
            candle_core::bail!(
                "CPU attention: q {:?}, k {:?}, v {:?} for {s:?}",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        let q = view(q_storage, q_layout, "queries")?;
        let k = view(k_storage, k_layout, "keys")?;
        let v = view(v_storage, v_layout, "values")?;
        let mut out = vec![0f32; len * heads * head_dim];
        run(&s, kv_len, &q, &k, &v, &mut out, s.isa);
        Ok((CpuStorage::F32(out), Shape::from((len, heads * head_dim))))
    }
}

/// A pointer tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: each task writes only its own rows (see `run`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One query row: its head and step position, and the positions it sees, `lo..=pos`.
#[derive(Debug, Clone, Copy)]
struct Row {
    head: usize,
    i: usize,
    lo: usize,
    pos: usize,
}

/// The first position a row at `pos` sees.
fn lo_of(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// What every task reads.
struct Step<'a> {
    s: &'a AttentionShape,
    q: &'a View<'a>,
    k: &'a View<'a>,
    v: &'a View<'a>,
    out: SharedOut,
}

impl Step<'_> {
    fn q_row(&self, r: &Row) -> &[f32] {
        &self.q.data[r.i * self.q.stride[0] + r.head * self.q.stride[1]..][..self.s.head_dim]
    }
    fn keys(&self, kv_head: usize) -> &[f32] {
        &self.k.data[kv_head * self.k.stride[0]..]
    }
    fn values(&self, kv_head: usize) -> &[f32] {
        &self.v.data[kv_head * self.v.stride[0]..]
    }
    /// Where row `(r.i, r.head)` of the output starts (`head_dim` values).
    fn out_row(&self, r: &Row) -> *mut f32 {
        self.out
            .get()
            .wrapping_add((r.i * self.s.heads + r.head) * self.s.head_dim)
    }
}

/// Decode positions whose scores one task computes.
const DECODE_POSITIONS_PER_TASK: usize = 512;

fn run(
    s: &AttentionShape,
    kv_len: usize,
    q: &View<'_>,
    k: &View<'_>,
    v: &View<'_>,
    out: &mut [f32],
    isa: Isa,
) {
    let step = Step {
        s,
        q,
        k,
        v,
        out: SharedOut(out.as_mut_ptr()),
    };
    let pool = SpinPool::for_threads(rayon::current_num_threads());
    let group = s.heads / s.kv_heads;
    if s.len == 1 {
        // A decode step: the scores of each key/value head's rows by position ranges (each range's
        // keys transposed once for all of the head's rows), then each row's softmax and output.
        let pos = kv_len - 1;
        let lo = lo_of(pos, s.window);
        let rows: Vec<Row> = (0..s.heads)
            .map(|head| Row {
                head,
                i: 0,
                lo,
                pos,
            })
            .collect();
        let ranges = (kv_len - lo).div_ceil(DECODE_POSITIONS_PER_TASK);
        let mut scores = vec![0f32; s.heads * kv_len];
        let scores_ptr = SharedOut(scores.as_mut_ptr());
        pool.run(s.kv_heads * ranges, &|task| {
            let (kv_head, range) = (task / ranges, task % ranges);
            let first = lo + range * DECODE_POSITIONS_PER_TASK;
            let end = (first + DECODE_POSITIONS_PER_TASK).min(kv_len);
            let rows = &rows[kv_head * group..][..group];
            // SAFETY: positions `first..end` of these rows' scores are this task's alone; `isa`
            // runs here (checked by the caller).
            unsafe {
                let dst: Vec<&mut [f32]> = rows
                    .iter()
                    .map(|r| {
                        std::slice::from_raw_parts_mut(
                            scores_ptr.get().add(r.head * kv_len + first),
                            end - first,
                        )
                    })
                    .collect();
                with_scratch(|scratch| match isa {
                    Isa::Avx512 => scores_avx512(&step, kv_head, rows, first, end, dst, scratch),
                    Isa::Avx2 => scores_avx2(&step, kv_head, rows, first, end, dst, scratch),
                })
            }
        });
        pool.run(s.heads, &|head| {
            let row = &rows[head];
            // SAFETY: row `head` of the scores and of the output are this task's alone.
            unsafe {
                let probs =
                    std::slice::from_raw_parts_mut(scores_ptr.get().add(head * kv_len), kv_len);
                match isa {
                    Isa::Avx512 => output_avx512(&step, head / group, row, probs, 0),
                    Isa::Avx2 => output_avx2(&step, head / group, row, probs, 0),
                }
            }
        });
        drop(scores);
    } else {
        // A prompt step: each task a few positions with every query head of one key/value head,
        // scores to output, its keys transposed once for all its rows.
        let per_kv_head = s.len.div_ceil(PROMPT_POSITIONS_PER_TASK);
        pool.run(s.kv_heads * per_kv_head, &|task| {
            let (kv_head, part) = (task / per_kv_head, task % per_kv_head);
            let first = part * PROMPT_POSITIONS_PER_TASK;
            let rows: Vec<Row> = (first..(first + PROMPT_POSITIONS_PER_TASK).min(s.len))
                .flat_map(|i| {
                    let pos = kv_len - s.len + i;
                    (0..group).map(move |g| Row {
                        head: kv_head * group + g,
                        i,
                        lo: lo_of(pos, s.window),
                        pos,
                    })
                })
                .collect();
            // SAFETY: these rows of the output are this task's alone; `isa` runs here.
            with_scratch(|scratch| unsafe {
                match isa {
                    Isa::Avx512 => prompt_avx512(&step, kv_head, &rows, scratch),
                    Isa::Avx2 => prompt_avx2(&step, kv_head, &rows, scratch),
                }
            });
        });
    }
}

/// A task's working memory, kept per thread: a transposed key panel and a prompt task's scores.
#[derive(Default)]
struct Scratch {
    panel: Vec<f32>,
    scores: Vec<f32>,
}

fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::default();
    }
    SCRATCH.with_borrow_mut(f)
}

/// Each instruction set's entry points: the bodies below, compiled with its features so their
/// fixed-width lane loops become its vectors. Off x86_64 they compile as plain code and never run
/// (`Isa::detect` is `None` there, so `supported` keeps every step on candle's path).
macro_rules! entries {
    ($features:literal, $wide:literal, $scores:ident, $output:ident, $prompt:ident) => {
        #[cfg_attr(target_arch = "x86_64", target_feature(enable = $features))]
        unsafe fn $scores(
            step: &Step<'_>,
            kv_head: usize,
            rows: &[Row],
            first: usize,
            end: usize,
            dst: Vec<&mut [f32]>,
            scratch: &mut Scratch,
        ) {
            scores_body::<$wide>(step, kv_head, rows, first, end, dst, &mut scratch.panel)
        }

        #[cfg_attr(target_arch = "x86_64", target_feature(enable = $features))]
        unsafe fn $output(
            step: &Step<'_>,
            kv_head: usize,
            row: &Row,
            scores: &mut [f32],
            start: usize,
        ) {
            output_body(step, kv_head, row, scores, start)
        }

        #[cfg_attr(target_arch = "x86_64", target_feature(enable = $features))]
        unsafe fn $prompt(step: &Step<'_>, kv_head: usize, rows: &[Row], scratch: &mut Scratch) {
            let start = rows.iter().map(|r| r.lo).min().unwrap_or(0);
            let end = rows.iter().map(|r| r.pos + 1).max().unwrap_or(0);
            let span = end - start;
            let Scratch { panel, scores } = scratch;
            scores.resize(rows.len() * span, 0.);
            let dst: Vec<&mut [f32]> = scores.chunks_exact_mut(span).collect();
            scores_body::<$wide>(step, kv_head, rows, start, end, dst, panel);
            for (row, scores) in rows.iter().zip(scores.chunks_exact_mut(span)) {
                output_body(step, kv_head, row, scores, start)
            }
        }
    };
}

entries!(
    "avx512f,avx2,fma",
    true,
    scores_avx512,
    output_avx512,
    prompt_avx512
);
entries!("avx2,fma", false, scores_avx2, output_avx2, prompt_avx2);

/// Scores of `rows` (query heads of `kv_head`) at positions `first..end` into `dst` (one slice of
/// `end - first` per row): each one FMA chain over the dimensions, lanes across positions.
#[inline(always)]
fn scores_body<const WIDE: bool>(
    step: &Step<'_>,
    kv_head: usize,
    rows: &[Row],
    first: usize,
    end: usize,
    mut dst: Vec<&mut [f32]>,
    panel: &mut Vec<f32>,
) {
    let hd = step.s.head_dim;
    let keys = step.keys(kv_head);
    let k_stride = step.k.stride[1];
    panel.resize(hd * PANEL, 0.);
    for p0 in (first..end).step_by(PANEL) {
        let width = PANEL.min(end - p0);
        transpose_panel::<WIDE>(&keys[p0 * k_stride..], k_stride, width, hd, panel);
        for (chunk, dst) in rows.chunks(SCORE_ROWS).zip(dst.chunks_mut(SCORE_ROWS)) {
            let at = p0 - first;
            match chunk.len() {
                4 => score_rows::<4>(step, chunk, panel, hd, dst, at, width),
                3 => score_rows::<3>(step, chunk, panel, hd, dst, at, width),
                2 => score_rows::<2>(step, chunk, panel, hd, dst, at, width),
                _ => score_rows::<1>(step, chunk, panel, hd, dst, at, width),
            }
        }
    }
}

/// `R` rows' scores against one transposed panel: `R × PANEL` chains side by side.
#[inline(always)]
fn score_rows<const R: usize>(
    step: &Step<'_>,
    rows: &[Row],
    panel: &[f32],
    hd: usize,
    dst: &mut [&mut [f32]],
    at: usize,
    width: usize,
) {
    let qs: [&[f32]; R] = std::array::from_fn(|r| step.q_row(&rows[r]));
    let mut acc = [[0f32; PANEL]; R];
    for d in 0..hd {
        let keys: &[f32; PANEL] = panel[d * PANEL..][..PANEL].try_into().unwrap();
        for r in 0..R {
            let qd = qs[r][d];
            for l in 0..PANEL {
                acc[r][l] = keys[l].mul_add(qd, acc[r][l]);
            }
        }
    }
    for r in 0..R {
        dst[r][at..at + width].copy_from_slice(&acc[r][..width]);
    }
}

/// Keys `0..width` (rows `k_stride` apart) transposed into `panel[d * PANEL + position]`, zeros
/// past `width`.
#[inline(always)]
fn transpose_panel<const WIDE: bool>(
    keys: &[f32],
    k_stride: usize,
    width: usize,
    hd: usize,
    panel: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if WIDE && hd.is_multiple_of(16) && width == PANEL {
        // SAFETY: `WIDE` entries run with AVX-512F; rows `0..PANEL` of `hd` values lie in `keys`.
        unsafe { transpose_panel_avx512(keys, k_stride, hd, panel) };
        return;
    }
    for l in 0..PANEL {
        let key = (l < width).then(|| &keys[l * k_stride..][..hd]);
        for d in 0..hd {
            panel[d * PANEL + l] = key.map_or(0., |key| key[d]);
        }
    }
}

/// [`transpose_panel`] of a whole panel in 16 × 16 blocks (four shuffle stages each).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_panel_avx512(keys: &[f32], k_stride: usize, hd: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(keys.len() >= (PANEL - 1) * k_stride + hd && panel.len() >= hd * PANEL);
    let (src, dst) = (keys.as_ptr(), panel.as_mut_ptr());
    for l0 in (0..PANEL).step_by(16) {
        for d0 in (0..hd).step_by(16) {
            let r: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(src.add((l0 + i) * k_stride + d0)));
            let mut t = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // u[4g + c]: in each 128-bit lane L, column 4L + c of rows 4g..4g + 4.
            let mut u = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let pd = |x: __m512| _mm512_castps_pd(x);
                let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
                u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
                u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
                u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
            }
            let mut columns = [_mm512_setzero_ps(); 16];
            for c in 0..4 {
                let w0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
                let w1 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
                let x0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
                let x1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
                columns[c] = _mm512_shuffle_f32x4::<0x88>(w0, x0);
                columns[8 + c] = _mm512_shuffle_f32x4::<0xDD>(w0, x0);
                columns[4 + c] = _mm512_shuffle_f32x4::<0x88>(w1, x1);
                columns[12 + c] = _mm512_shuffle_f32x4::<0xDD>(w1, x1);
            }
            for (c, column) in columns.iter().enumerate() {
                _mm512_storeu_ps(dst.add((d0 + c) * PANEL + l0), *column);
            }
        }
    }
}

/// One row's softmax and output from its scores (`scores[j - start]` for position `j`): candle's
/// softmax over `lo..=pos`, then FMA chains over positions with lanes across dimensions,
/// restarted every [`CHAIN_POSITIONS`] positions from the row's first.
#[inline(always)]
fn output_body(step: &Step<'_>, kv_head: usize, row: &Row, scores: &mut [f32], start: usize) {
    let seen = &mut scores[row.lo - start..=row.pos - start];
    if let Some(scale) = step.s.scale {
        for x in seen.iter_mut() {
            *x *= scale;
        }
    }
    softmax_in_place(seen);
    let probs = &*seen;
    let hd = step.s.head_dim;
    let values = &step.values(kv_head)[row.lo * step.v.stride[1]..];
    // SAFETY: the caller's task owns this row of the output, `head_dim` values inside it.
    let out = unsafe { std::slice::from_raw_parts_mut(step.out_row(row), hd) };
    match hd {
        _ if hd.is_multiple_of(64) => weighted_sum::<64>(probs, values, step.v.stride[1], hd, out),
        _ if hd.is_multiple_of(16) => weighted_sum::<16>(probs, values, step.v.stride[1], hd, out),
        _ => weighted_sum::<1>(probs, values, step.v.stride[1], hd, out),
    }
}

/// `out = Σ_j probs[j] · values[j]` in blocks of `D` dimensions, one chain per dimension restarted
/// every [`CHAIN_POSITIONS`] positions and the pieces added in order (gemm's order).
#[inline(always)]
fn weighted_sum<const D: usize>(
    probs: &[f32],
    values: &[f32],
    v_stride: usize,
    hd: usize,
    out: &mut [f32],
) {
    for d0 in (0..hd).step_by(D) {
        let mut total = [0f32; D];
        for (piece, c0) in (0..probs.len()).step_by(CHAIN_POSITIONS).enumerate() {
            let c1 = (c0 + CHAIN_POSITIONS).min(probs.len());
            let mut acc = [0f32; D];
            for j in c0..c1 {
                let p = probs[j];
                let value: &[f32; D] = values[j * v_stride + d0..][..D].try_into().unwrap();
                for t in 0..D {
                    acc[t] = value[t].mul_add(p, acc[t]);
                }
            }
            if piece == 0 {
                total = acc;
            } else {
                for t in 0..D {
                    total[t] += acc[t];
                }
            }
        }
        out[d0..d0 + D].copy_from_slice(&total);
    }
}

/// candle's softmax of one row (`prompt_softmax`'s arithmetic).
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    // SAFETY: the pointer covers `row.len()` elements.
    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, row.len()) };
    for x in row.iter_mut() {
        *x = (*x - max).exp();
    }
    let mut sum = 0f32;
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, row.len()) };
    for x in row.iter_mut() {
        *x /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wide_transpose_is_the_scalar_one() {
        if !Isa::Avx512.runs_here() {
            return;
        }
        for (hd, k_stride) in [(16, 16), (64, 64), (128, 200), (256, 256)] {
            let keys: Vec<f32> = (0..PANEL * k_stride).map(|i| i as f32).collect();
            let (mut wide, mut scalar) = (vec![0f32; hd * PANEL], vec![1f32; hd * PANEL]);
            #[target_feature(enable = "avx512f")]
            unsafe fn wide_entry(keys: &[f32], k_stride: usize, hd: usize, panel: &mut [f32]) {
                transpose_panel::<true>(keys, k_stride, PANEL, hd, panel)
            }
            // SAFETY: this CPU has AVX-512F (checked above).
            unsafe { wide_entry(&keys, k_stride, hd, &mut wide) };
            transpose_panel::<false>(&keys, k_stride, PANEL, hd, &mut scalar);
            assert_eq!(wide, scalar, "{hd} dimensions, rows {k_stride} apart");
            assert_eq!(scalar[3 * PANEL + 5], (5 * k_stride + 3) as f32);
        }
    }
}
