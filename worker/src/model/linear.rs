//! A linear layer whose weight is either quantized (GGUF) or dense (safetensors).

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

/// `y = x Wᵀ` without bias, as every Llama projection is.
#[derive(Debug, Clone)]
pub enum Linear {
    /// A GGUF weight kept in its quantized form; candle quantizes the activations to match.
    Quantized(QMatMul),
    /// A dense weight `[out, in]` in the stage's compute dtype.
    Dense(Tensor),
}

impl Linear {
    pub fn quantized(weight: QTensor) -> Result<Self> {
        Ok(Self::Quantized(QMatMul::from_qtensor(weight)?))
    }

    /// Applies the layer to `x: [rows, in]`, giving `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quantized(w) => w.forward(x),
            Self::Dense(w) => x.matmul(&w.t()?),
        }
    }

    /// Bytes the weight occupies on its device.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) | Self::Dense(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}
