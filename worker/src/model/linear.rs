//! A linear layer whose weight is either quantized (GGUF) or dense (safetensors).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

use super::q4_1::Q4_1Matrix;
use super::q8_0::Q8_0Matrix;

/// `y = x Wᵀ` without bias, as every Llama projection is.
#[derive(Debug, Clone)]
pub enum Linear {
    /// A GGUF weight kept in its quantized form; candle quantizes the activations to match.
    Quantized(QMatMul),
    /// A dense weight `[out, in]` in the stage's compute dtype.
    Dense(Tensor),
    /// A Q4_1 weight on the CPU, run by strata's AVX2 kernel (see `q4_1.rs`).
    Q4_1(Arc<Q4_1Matrix>),
    /// A Q8_0 weight on the CPU (e.g. SmolLM2's tied output head), run by strata's AVX2 kernel.
    Q8_0(Arc<Q8_0Matrix>),
}

impl Linear {
    /// A GGUF weight: Q4_1 and Q8_0 on an AVX2 CPU go to strata's kernels when `fast_kernels` is
    /// on; every other case to candle's quantized matmul.
    pub fn quantized(weight: QTensor, fast_kernels: bool) -> Result<Self> {
        let ours = fast_kernels && weight.device().is_cpu() && Q4_1Matrix::supported();
        if ours && weight.dtype() == GgmlDType::Q4_1 {
            let (n, k) = weight.shape().dims2()?;
            let matrix = Q4_1Matrix::from_gguf_bytes(&weight.data()?, n, k)
                .map_err(candle_core::Error::msg)?;
            return Ok(Self::Q4_1(Arc::new(matrix)));
        }
        if ours && weight.dtype() == GgmlDType::Q8_0 {
            let (n, k) = weight.shape().dims2()?;
            let matrix = Q8_0Matrix::from_gguf_bytes(&weight.data()?, n, k)
                .map_err(candle_core::Error::msg)?;
            return Ok(Self::Q8_0(Arc::new(matrix)));
        }
        Ok(Self::Quantized(QMatMul::from_qtensor(weight)?))
    }

    /// Applies the layer to `x: [rows, in]`, giving `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quantized(w) => w.forward(x),
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Q4_1(w) => {
                let rows = x.dim(0)?;
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(w.matmul(&input, rows), (rows, w.rows()), x.device())
            }
            Self::Q8_0(w) => {
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
            Self::Q4_1(w) => w.bytes(),
            Self::Q8_0(w) => w.bytes(),
        }
    }
}
