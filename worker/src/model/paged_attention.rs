//! The paged pool's per-layer work in two CUDA kernels (`paged_attention.cu`): RoPE plus the step's
//! keys and values written into the pool (`rope_and_write`), and decode attention read straight from
//! the pool (`decode_attention`).
//!
//! The portable path (`Layer::attend_batch`) gathers every decoding sequence's keys and values into
//! padded copies and runs score matmul, mask, softmax and value matmul: about ten kernels per layer,
//! each costing more host time to launch (~8–10 µs) than the GPU needs to run it at small batches.
//! The attention kernel reads the pool rows in place, with an online softmax in f32, and launches
//! once; the write kernel replaces the reshape copies, RoPE kernels, transposes and scatters before
//! it. Both are compiled from source with NVRTC on first use (cached per process), so the build needs
//! no nvcc step and the PTX suits whatever card the driver finds.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cuda_kernel::{compile_once, contiguous, on_gpu};

const SOURCE: &str = concat!(
    include_str!("cuda_types.cuh"),
    include_str!("paged_attention.cu")
);
const MODULE: &str = "strata_paged_attention";
/// Warps per block of the two variants; must match the source's instantiations.
const WARPS: u32 = 8;
const WIDE_WARPS: u32 = 32;
/// Head dimensions the kernel handles: whole warps of lanes, at most 8 values per lane.
pub fn supports_head_dim(d: usize) -> bool {
    d.is_multiple_of(32) && d <= 256
}

/// `q: [sequences, heads, d]` attending to the pool rows `gather: [sequences × len]` (u32) of
/// `keys, values: [kv_heads, pool_rows, d]`, of which the first `lens[s]` of each sequence's `len`
/// are its history; `scale` multiplies the scores; `wide` runs the variant of 32 warps a block
/// (`stage::ATTENTION_WIDE_FROM` says when). Gives `[sequences, heads, d]` in `q`'s dtype.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    gather: &Tensor,
    lens: &Tensor,
    len: usize,
    scale: f32,
    wide: bool,
) -> Result<Tensor> {
    let op = PagedDecodeAttention {
        gather: gather.clone(),
        lens: lens.clone(),
        len,
        scale,
        wide,
    };
    q.contiguous()?.apply_op3_no_bwd(keys, values, &op)
}

/// From the fused q/k/v projection `y: [rows, (heads + 2 kv_heads) · d]`: rotates queries and keys
/// of row `r` with row `angle_row[r]` of the tables `cos, sin: [n, d/2]` (`interleaved` pairs as
/// GGUF, else halves), writes each row's keys and values into `keys, values: [kv_heads, pool_rows,
/// d]` at pool row `write[r]`, and returns the rotated queries `[rows, heads, d]`. The caller keeps
/// `angle_row` below `n` (`RopeTable::row_index` checks it).
#[allow(clippy::too_many_arguments)]
pub fn rope_and_write(
    y: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    angle_row: &Tensor,
    write: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    heads: usize,
    interleaved: bool,
) -> Result<Tensor> {
    let op = RopeAndWrite {
        angle_row: angle_row.clone(),
        write: write.clone(),
        keys: keys.clone(),
        values: values.clone(),
        heads,
        interleaved,
    };
    y.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)
}

struct RopeAndWrite {
    angle_row: Tensor,
    write: Tensor,
    keys: Tensor,
    values: Tensor,
    heads: usize,
    interleaved: bool,
}

impl CustomOp3 for RopeAndWrite {
    fn name(&self) -> &'static str {
        "qkv-rope-write"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the fused RoPE and KV write runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        y_layout: &Layout,
        cos: &CudaStorage,
        cos_layout: &Layout,
        sin: &CudaStorage,
        sin_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, width) = y_layout.shape().dims2()?;
        let (kv_heads, pool_rows, d) = self.keys.dims3()?;
        let heads = self.heads;
        let y_stride = y_layout.stride()[0];
        if width != (heads + 2 * kv_heads) * d
            || y_layout.stride()[1] != 1
            || self.values.dims() != self.keys.dims()
            || cos_layout.shape().dims2()?.1 != d / 2
            || sin_layout.shape() != cos_layout.shape()
            || self.angle_row.dims1()? != rows
            || self.write.dims1()? != rows
            || d % 2 != 0
        {
            candle_core::bail!(
                "rope and write: y {:?}, cos {:?}, write {:?}, keys {:?}, {heads} heads",
                y_layout.shape(),
                cos_layout.shape(),
                self.write.shape(),
                self.keys.shape()
            );
        }
        let y0 = y_layout.start_offset();
        let y1 = y0 + (rows - 1) * y_stride + width;
        let (c0, c1) = contiguous(cos_layout, "cos")?;
        let (s0, s1) = contiguous(sin_layout, "sin")?;
        let (angle_storage, angle_layout) = self.angle_row.storage_and_layout();
        let (write_storage, write_layout) = self.write.storage_and_layout();
        let (keys_storage, keys_layout) = self.keys.storage_and_layout();
        let (values_storage, values_layout) = self.values.storage_and_layout();
        let (a0, a1) = contiguous(angle_layout, "angle rows")?;
        let (w0, w1) = contiguous(write_layout, "write")?;
        let (k0, k1) = contiguous(keys_layout, "keys")?;
        let (v0, v1) = contiguous(values_layout, "values")?;
        let angle_row = on_gpu(&angle_storage, "angle rows")?;
        let write = on_gpu(&write_storage, "write")?;
        let keys = on_gpu(&keys_storage, "keys")?;
        let values = on_gpu(&values_storage, "values")?;
        let angle_row = angle_row.as_cuda_slice::<u32>()?.slice(a0..a1);
        let write = write.as_cuda_slice::<u32>()?.slice(w0..w1);
        let dev = y.device().clone();
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            y_stride as i32,
            heads as i32,
            kv_heads as i32,
            d as i32,
            pool_rows as i32,
            self.interleaved as i32,
        ];
        macro_rules! launch {
            ($variant:ident, $ty:ty, $kernel:literal) => {{
                let (
                    CudaStorageSlice::$variant(y),
                    CudaStorageSlice::$variant(cos),
                    CudaStorageSlice::$variant(sin),
                    CudaStorageSlice::$variant(keys),
                    CudaStorageSlice::$variant(values),
                ) = (&y.slice, &cos.slice, &sin.slice, &keys.slice, &values.slice)
                else {
                    candle_core::bail!(
                        "rope and write: y, cos, sin and the pool must share a dtype"
                    );
                };
                let func = dev.get_or_load_custom_func($kernel, MODULE, ptx()?)?;
                // SAFETY: every element is written by the kernel before it is read.
                let q_out = unsafe { dev.alloc::<$ty>(rows * heads * d)? };
                let (y, cos, sin) = (y.slice(y0..y1), cos.slice(c0..c1), sin.slice(s0..s1));
                // The pool is written through these views: the rows at `write` belong to this
                // step's new positions, which nothing else reads or writes until the step's
                // attention, queued after this kernel on the same stream.
                let (keys, values) = (keys.slice(k0..k1), values.slice(v0..v1));
                let mut builder = func.builder();
                builder.arg(&y);
                builder.arg(&ints[0]);
                builder.arg(&cos);
                builder.arg(&sin);
                builder.arg(&angle_row);
                builder.arg(&write);
                builder.arg(&q_out);
                builder.arg(&keys);
                builder.arg(&values);
                for value in &ints[1..] {
                    builder.arg(value);
                }
                // SAFETY: the arguments match the kernel's signature; bounds were checked above.
                unsafe { builder.launch(config) }.w()?;
                CudaStorage::wrap_cuda_slice(q_out, dev.clone())
            }};
        }
        let out = match &y.slice {
            CudaStorageSlice::F32(_) => launch!(F32, f32, "qkv_rope_write_f32"),
            CudaStorageSlice::BF16(_) => launch!(BF16, half::bf16, "qkv_rope_write_bf16"),
            CudaStorageSlice::F16(_) => launch!(F16, half::f16, "qkv_rope_write_f16"),
            _ => candle_core::bail!("rope and write: unsupported dtype {:?}", y.dtype()),
        };
        Ok((out, Shape::from((rows, heads, d))))
    }
}

struct PagedDecodeAttention {
    gather: Tensor,
    lens: Tensor,
    len: usize,
    scale: f32,
    wide: bool,
}

/// The PTX of `paged_attention.cu`, compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile_once(&PTX, SOURCE, "the paged pool kernels")
}

impl CustomOp3 for PagedDecodeAttention {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the paged attention kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        keys: &CudaStorage,
        keys_layout: &Layout,
        values: &CudaStorage,
        values_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (sequences, heads, d) = q_layout.shape().dims3()?;
        let (kv_heads, pool_rows, kd) = keys_layout.shape().dims3()?;
        let len = self.len;
        if kd != d
            || values_layout.shape() != keys_layout.shape()
            || self.gather.dims1()? != sequences * len
            || self.lens.dims1()? != sequences
            || !supports_head_dim(d)
            || kv_heads == 0
            || heads % kv_heads != 0
        {
            candle_core::bail!(
                "paged attention: q {:?}, keys {:?}, values {:?}, gather {:?}, lens {:?}",
                q_layout.shape(),
                keys_layout.shape(),
                values_layout.shape(),
                self.gather.shape(),
                self.lens.shape()
            );
        }
        let (q0, q1) = contiguous(q_layout, "q")?;
        let (k0, k1) = contiguous(keys_layout, "keys")?;
        let (v0, v1) = contiguous(values_layout, "values")?;

        let (gather_storage, gather_layout) = self.gather.storage_and_layout();
        let (lens_storage, lens_layout) = self.lens.storage_and_layout();
        let (g0, g1) = contiguous(gather_layout, "gather")?;
        let (l0, l1) = contiguous(lens_layout, "lens")?;
        let gather = on_gpu(&gather_storage, "gather")?;
        let lens = on_gpu(&lens_storage, "lens")?;
        let gather = gather.as_cuda_slice::<u32>()?.slice(g0..g1);
        let lens = lens.as_cuda_slice::<u32>()?.slice(l0..l1);

        let dev = q.device().clone();
        let wide = self.wide;
        let config = LaunchConfig {
            grid_dim: (heads as u32, sequences as u32, 1),
            block_dim: (32 * if wide { WIDE_WARPS } else { WARPS }, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads_i, kv_heads_i, d_i, pool_rows_i, len_i) = (
            heads as i32,
            kv_heads as i32,
            d as i32,
            pool_rows as i32,
            len as i32,
        );
        macro_rules! launch {
            ($variant:ident, $ty:ty, $kernel:literal, $wide_kernel:literal) => {{
                let (
                    CudaStorageSlice::$variant(q),
                    CudaStorageSlice::$variant(k),
                    CudaStorageSlice::$variant(v),
                ) = (&q.slice, &keys.slice, &values.slice)
                else {
                    candle_core::bail!("paged attention: q, keys and values must share a dtype");
                };
                let kernel = if wide { $wide_kernel } else { $kernel };
                let func = dev.get_or_load_custom_func(kernel, MODULE, ptx()?)?;
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<$ty>(sequences * heads * d)? };
                let (q, k, v) = (q.slice(q0..q1), k.slice(k0..k1), v.slice(v0..v1));
                let mut builder = func.builder();
                builder.arg(&q);
                builder.arg(&k);
                builder.arg(&v);
                builder.arg(&gather);
                builder.arg(&lens);
                builder.arg(&out);
                builder.arg(&heads_i);
                builder.arg(&kv_heads_i);
                builder.arg(&d_i);
                builder.arg(&pool_rows_i);
                builder.arg(&len_i);
                builder.arg(&self.scale);
                // SAFETY: the arguments match the kernel's signature; bounds were checked above.
                unsafe { builder.launch(config) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match &q.slice {
            CudaStorageSlice::F32(_) => launch!(
                F32,
                f32,
                "paged_decode_attention_f32",
                "paged_decode_attention_wide_f32"
            ),
            CudaStorageSlice::BF16(_) => launch!(
                BF16,
                half::bf16,
                "paged_decode_attention_bf16",
                "paged_decode_attention_wide_bf16"
            ),
            CudaStorageSlice::F16(_) => launch!(
                F16,
                half::f16,
                "paged_decode_attention_f16",
                "paged_decode_attention_wide_f16"
            ),
            _ => candle_core::bail!("paged attention: unsupported dtype {:?}", q.dtype()),
        };
        Ok((out, Shape::from((sequences, heads, d))))
    }
}
