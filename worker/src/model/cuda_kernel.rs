//! What strata's CUDA kernels (`paged_attention`, `fused_ops`) share: compiling a source with NVRTC
//! once per process, and reaching the device memory behind a tensor's layout.

use std::sync::OnceLock;

use candle_core::cuda::cudarc::nvrtc;
use candle_core::{CudaStorage, Layout, Result, Storage};

/// `source` compiled with NVRTC the first time it is asked for; the PTX (or the error) is kept in
/// `cell` for the life of the process.
pub fn compile_once(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: &str,
    what: &str,
) -> Result<&'static str> {
    cell.get_or_init(|| {
        nvrtc::compile_ptx(source)
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("compiling {what}: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The CUDA storage of a tensor an op reads beside its inputs.
pub fn on_gpu<'a>(storage: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(storage) => Ok(storage),
        _ => candle_core::bail!("strata's CUDA kernels: {what} must be on the GPU"),
    }
}

/// A contiguous layout's start and end offsets.
pub fn contiguous(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("strata's CUDA kernels: {what} is strided")))
}
