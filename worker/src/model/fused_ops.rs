//! Two fusions of a block's elementwise work on CUDA (`fused_ops.cu`): the residual add with the
//! RMSNorm after it (`add_rms_norm`), and SiLU(gate) · up read straight from the fused gate/up
//! projection (`silu_mul`). Each replaces two kernels with one. At batch 1 a GPU stage's step time is
//! the host's time to launch its kernels (~8 µs each, a dozen per layer), so a launch saved per layer
//! is a share of the step saved. The last stage's greedy choice is one kernel as well
//! (`greedy_rows`: a dozen kernels, a 128 KB index upload and two copies back before). Compiled with
//! NVRTC on first use, like `paged_attention`.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::cuda_kernel::{compile_once, contiguous};

const SOURCE: &str = concat!(include_str!("cuda_types.cuh"), include_str!("fused_ops.cu"));
const MODULE: &str = "strata_fused_ops";
const THREADS: u32 = 256;

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compile_once(&PTX, SOURCE, "the fused elementwise kernels")
}

/// `x + delta` and its RMSNorm with `weight`, both `[rows, hidden]` like `x`. The norm is taken of the
/// sum as rounded to the element type, as the separate add and norm would.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &weight.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `silu(y[:, ..width]) * y[:, width..]` for the fused gate/up output `y: [rows, 2 · width]`.
pub fn silu_mul(y: &Tensor) -> Result<Tensor> {
    y.apply_op1_no_bwd(&SiluMul)
}

/// Each row's greedy token of f32 `logits: [rows, vocab]` (the lowest index of the largest value;
/// `u32::MAX` for a row of NaNs) and its log-probability, reduced on the GPU and copied back in one
/// copy.
pub fn greedy_rows(logits: &Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    let rows = logits.dim(0)?;
    let out = logits.contiguous()?.apply_op1_no_bwd(&GreedyRows)?;
    let out = out.flatten_all()?.to_vec1::<u32>()?;
    let (ids, logprobs) = out.split_at(rows);
    Ok((
        ids.to_vec(),
        logprobs.iter().map(|&bits| f32::from_bits(bits)).collect(),
    ))
}

struct GreedyRows;

impl CustomOp1 for GreedyRows {
    fn name(&self) -> &'static str {
        "greedy-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused greedy choice runs on CUDA only")
    }

    fn cuda_fwd(&self, logits: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let (l0, l1) = contiguous(layout, "logits")?;
        let CudaStorageSlice::F32(values) = &logits.slice else {
            candle_core::bail!("greedy rows: logits must be f32, not {:?}", logits.dtype());
        };
        if rows == 0 || vocab == 0 {
            candle_core::bail!("greedy rows: empty logits {:?}", layout.shape());
        }
        let dev = logits.device().clone();
        let func = dev.get_or_load_custom_func("greedy_rows_f32", MODULE, ptx()?)?;
        // SAFETY: the kernel writes both halves (one index and one log-probability per row).
        let out = unsafe { dev.alloc::<u32>(2 * rows)? };
        let values = values.slice(l0..l1);
        let (vocab_i, rows_i) = (vocab as i32, rows as i32);
        let mut builder = func.builder();
        builder.arg(&values);
        builder.arg(&vocab_i);
        builder.arg(&rows_i);
        builder.arg(&out);
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; the row count bounds every access.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, rows)),
        ))
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused add and RMSNorm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        delta: &CudaStorage,
        delta_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, hidden) = x_layout.shape().dims2()?;
        if delta_layout.shape() != x_layout.shape() || weight_layout.shape().dims() != [hidden] {
            candle_core::bail!(
                "add and RMSNorm: x {:?}, delta {:?}, weight {:?}",
                x_layout.shape(),
                delta_layout.shape(),
                weight_layout.shape()
            );
        }
        let (x0, x1) = contiguous(x_layout, "x")?;
        let (d0, d1) = contiguous(delta_layout, "delta")?;
        let (w0, w1) = contiguous(weight_layout, "weight")?;
        let dev = x.device().clone();
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = rows * hidden;
        let hidden_i = hidden as i32;
        macro_rules! launch {
            ($variant:ident, $ty:ty, $kernel:literal) => {{
                let (
                    CudaStorageSlice::$variant(x),
                    CudaStorageSlice::$variant(delta),
                    CudaStorageSlice::$variant(weight),
                ) = (&x.slice, &delta.slice, &weight.slice)
                else {
                    candle_core::bail!("add and RMSNorm: x, delta and weight must share a dtype");
                };
                let func = dev.get_or_load_custom_func($kernel, MODULE, ptx()?)?;
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<$ty>(2 * n)? };
                let (sum, normed) = (out.slice(..n), out.slice(n..));
                let (x, delta, weight) =
                    (x.slice(x0..x1), delta.slice(d0..d1), weight.slice(w0..w1));
                let mut builder = func.builder();
                builder.arg(&x);
                builder.arg(&delta);
                builder.arg(&weight);
                builder.arg(&sum);
                builder.arg(&normed);
                builder.arg(&hidden_i);
                builder.arg(&self.eps);
                // SAFETY: the arguments match the kernel's signature; shapes were checked above.
                unsafe { builder.launch(config) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match &x.slice {
            CudaStorageSlice::F32(_) => launch!(F32, f32, "add_rms_norm_f32"),
            CudaStorageSlice::BF16(_) => launch!(BF16, half::bf16, "add_rms_norm_bf16"),
            CudaStorageSlice::F16(_) => launch!(F16, half::f16, "add_rms_norm_f16"),
            _ => candle_core::bail!("add and RMSNorm: unsupported dtype {:?}", x.dtype()),
        };
        Ok((out, Shape::from((2, rows, hidden))))
    }
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused SiLU and multiply runs on CUDA only")
    }

    fn cuda_fwd(&self, y: &CudaStorage, y_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, both) = y_layout.shape().dims2()?;
        let y_stride = y_layout.stride()[0];
        if both % 2 != 0 || y_layout.stride()[1] != 1 || rows == 0 {
            candle_core::bail!(
                "SiLU and multiply: y {:?} with strides {:?}",
                y_layout.shape(),
                y_layout.stride()
            );
        }
        let width = both / 2;
        let y0 = y_layout.start_offset();
        let y1 = y0 + (rows - 1) * y_stride + both;
        let dev = y.device().clone();
        let config = LaunchConfig {
            grid_dim: ((width as u32).div_ceil(THREADS), rows as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (y_stride_i, width_i) = (y_stride as i32, width as i32);
        macro_rules! launch {
            ($y:expr, $ty:ty, $kernel:literal) => {{
                let func = dev.get_or_load_custom_func($kernel, MODULE, ptx()?)?;
                // SAFETY: every element is written by the kernel before it is read.
                let out = unsafe { dev.alloc::<$ty>(rows * width)? };
                let y = $y.slice(y0..y1);
                let mut builder = func.builder();
                builder.arg(&y);
                builder.arg(&y_stride_i);
                builder.arg(&out);
                builder.arg(&width_i);
                // SAFETY: the arguments match the kernel's signature; bounds were checked above.
                unsafe { builder.launch(config) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match &y.slice {
            CudaStorageSlice::F32(y) => launch!(y, f32, "silu_mul_f32"),
            CudaStorageSlice::BF16(y) => launch!(y, half::bf16, "silu_mul_bf16"),
            CudaStorageSlice::F16(y) => launch!(y, half::f16, "silu_mul_f16"),
            _ => candle_core::bail!("SiLU and multiply: unsupported dtype {:?}", y.dtype()),
        };
        Ok((out, Shape::from((rows, width))))
    }
}
