//! A linear layer whose weight is either quantized (GGUF) or dense (safetensors).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

use super::cpu_kernels::{self, CpuMatmul, Isa};

/// `y = x Wᵀ` without bias (biases are added by the layer).
#[derive(Debug, Clone)]
pub enum Linear {
    /// A GGUF weight kept in its quantized form; candle quantizes the activations to match.
    Quantized(QMatMul),
    /// A dense weight `[out, in]` in the stage's compute dtype.
    Dense(Tensor),
    /// A GGUF weight on the CPU, run by strata's AVX2 kernel for its format (see `cpu_kernels`).
    Cpu(Arc<dyn CpuMatmul>),
}

/// Which code multiplies a GGUF weight, for the load-time log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// strata's kernel, on the instruction set named (`CpuMatmul::isa`).
    Strata(&'static str),
    /// candle's quantized matmul (another device, another format, or a CPU without AVX2/FMA).
    Candle,
    /// candle's quantized matmul because strata's kernels are switched off.
    CandleByChoice,
}

impl Kernel {
    pub fn name(self) -> String {
        match self {
            Self::Strata(isa) => format!("strata {isa}"),
            Self::Candle => "candle".into(),
            Self::CandleByChoice => "candle (strata's kernels off)".into(),
        }
    }
}

impl Linear {
    /// A GGUF weight: on a CPU, strata's kernel for its format on `strata_kernels`' instruction set
    /// where there is one; candle's quantized matmul otherwise (also where `strata_kernels` is
    /// `None`). Also says which it chose.
    pub fn quantized(weight: QTensor, strata_kernels: Option<Isa>) -> Result<(Self, Kernel)> {
        if weight.device().is_cpu() && cpu_kernels::supported() {
            let Some(isa) = strata_kernels else {
                let matmul = QMatMul::from_qtensor(weight)?;
                return Ok((Self::Quantized(matmul), Kernel::CandleByChoice));
            };
            let (n, k) = weight.shape().dims2()?;
            let data = weight.data()?;
            if let Some(matrix) = cpu_kernels::matrix_for(weight.dtype(), &data, n, k, isa) {
                let matrix = matrix.map_err(candle_core::Error::msg)?;
                let kernel = Kernel::Strata(matrix.isa().name());
                return Ok((Self::Cpu(matrix), kernel));
            }
        }
        let matmul = QMatMul::from_qtensor(weight)?;
        Ok((Self::Quantized(matmul), Kernel::Candle))
    }

    /// Applies the layer to `x: [rows, in]`, giving `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quantized(w) => {
                #[cfg(feature = "cuda")]
                if let (QMatMul::QTensor(q), true) = (w, x.device().is_cuda()) {
                    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
                    super::step_graph::note_quantized_matmul(rows, q.shape().dims2()?.1);
                }
                w.forward(x)
            }
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Cpu(w) => {
                let rows = x.dim(0)?;
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(w.matmul(&input, rows), (rows, w.rows()), x.device())
            }
        }
    }

    /// Bytes the weight occupies on its device.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) | Self::Dense(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            Self::Cpu(w) => w.bytes(),
        }
    }
}
