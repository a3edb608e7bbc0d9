//! The token embedding of a first stage. On the CPU a GGUF table stays in its quantized form and only
//! the looked-up rows are dequantized: Qwen2.5's 151,936 × 1,536 table is 933 MB in f32 and 191 MB as
//! its file stores it (Q4_K), for the same values (dequantization is per block, so a row alone
//! dequantizes to exactly what the whole table would).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug)]
pub enum Embedding {
    /// Rows in the compute dtype on the stage's device (safetensors, and GGUF off the CPU).
    Dense(Tensor),
    /// A GGUF table as stored, on the CPU.
    Quantized(QuantizedTable),
}

impl Embedding {
    /// Bytes the table occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(table) => table.bytes.len(),
        }
    }
}

/// A quantized table `[rows, cols]`, its rows dequantized as they are looked up.
#[derive(Debug)]
pub struct QuantizedTable {
    dtype: GgmlDType,
    bytes: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl QuantizedTable {
    pub fn new(table: &QTensor) -> Result<Self> {
        let (rows, cols) = table.shape().dims2()?;
        Ok(Self {
            dtype: table.dtype(),
            bytes: table.data()?.into_owned(),
            rows,
            cols,
        })
    }

    /// The rows of `ids`, as `[ids, cols]` in `dtype`.
    pub fn rows_of(&self, ids: &[u32], dtype: DType) -> Result<Tensor> {
        let row_bytes = self.bytes.len() / self.rows;
        let mut picked = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.rows);
            }
            picked.extend_from_slice(&self.bytes[id * row_bytes..(id + 1) * row_bytes]);
        }
        qtensor_from_ggml(
            self.dtype,
            &picked,
            vec![ids.len(), self.cols],
            &Device::Cpu,
        )?
        .dequantize(&Device::Cpu)?
        .to_dtype(dtype)
    }
}
