//! A block's projections of one input, fused into one matmul where the weights allow.

use std::borrow::Cow;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Result, Tensor};

use crate::model::cpu_kernels::CpuMatmul;
use crate::model::linear::Linear;
use crate::WorkerError;

/// Projections of the same input, with optional biases. Dense weights are concatenated at load
/// time so one matmul computes them all (fewer kernel launches: what a GPU step's time is made of);
/// strata's CPU matrices and quantized GPU matrices of one format likewise; others run one by one,
/// unless the file stores them as one tensor (Phi-3).
#[derive(Debug)]
pub(super) enum Projections {
    /// One weight `[Σ outputs, in]`; `widths` are the outputs of each part, in order; `bias` is
    /// their biases concatenated.
    Fused {
        weight: Linear,
        bias: Option<Tensor>,
        widths: Vec<usize>,
    },
    Separate {
        parts: Vec<Linear>,
        biases: Option<Vec<Tensor>>,
    },
}

impl Projections {
    pub(super) fn new(
        parts: Vec<Linear>,
        biases: Option<Vec<Tensor>>,
        fuse: bool,
    ) -> std::result::Result<Self, WorkerError> {
        if !fuse {
            return Ok(Self::Separate { parts, biases });
        }
        let dense: Vec<&Tensor> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Dense(w) => Some(w),
                _ => None,
            })
            .collect();
        let cpu: Vec<&dyn CpuMatmul> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Cpu(w) => Some(w.as_ref()),
                _ => None,
            })
            .collect();
        let (weight, widths) = if dense.len() == parts.len() {
            let widths = dense.iter().map(|w| w.dim(0)).collect::<Result<Vec<_>>>()?;
            (Linear::Dense(Tensor::cat(&dense, 0)?), widths)
        } else if let Some(joined) = cpu
            .split_first()
            .filter(|_| cpu.len() == parts.len())
            .and_then(|(first, rest)| first.concat(rest))
        {
            // strata's CPU kernels fuse when every part has one format (Q4_K_M files mix them).
            (Linear::Cpu(joined), cpu.iter().map(|w| w.rows()).collect())
        } else if let Some(joined) = stack_quantized(&parts)? {
            joined
        } else {
            return Ok(Self::Separate { parts, biases });
        };
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Self::Fused {
            weight,
            bias,
            widths,
        })
    }

    /// Parts the file already stores as one tensor of `widths` rows each.
    pub(super) fn prefused(weight: Linear, widths: Vec<usize>) -> Self {
        Self::Fused {
            weight,
            bias: None,
            widths,
        }
    }

    /// The whole `[rows, Σ out_i]` result when the weights are fused, else `None`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn fused_output(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Fused { weight, bias, .. } => {
                with_bias(weight.forward(x)?, bias.as_ref()).map(Some)
            }
            Self::Separate { .. } => Ok(None),
        }
    }

    /// The `N` outputs for `x: [rows, in]`, each `[rows, out_i]` (views of one result when fused).
    pub(super) fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let outputs: Vec<Tensor> = match self {
            Self::Fused {
                weight,
                bias,
                widths,
            } => {
                let y = with_bias(weight.forward(x)?, bias.as_ref())?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, start, w);
                        start += w;
                        part
                    })
                    .collect::<Result<_>>()?
            }
            Self::Separate { parts, biases } => parts
                .iter()
                .enumerate()
                .map(|(i, p)| with_bias(p.forward(x)?, biases.as_ref().map(|b| &b[i])))
                .collect::<Result<_>>()?,
        };
        outputs.try_into().map_err(|v: Vec<Tensor>| {
            candle_core::Error::msg(format!("{} projections, not {N}", v.len()))
        })
    }

    pub(super) fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Fused { weight, bias, .. } => {
                weight.weight_bytes() + bias.as_ref().map_or(0, bytes)
            }
            Self::Separate { parts, biases } => {
                parts.iter().map(Linear::weight_bytes).sum::<usize>()
                    + biases.iter().flatten().map(bytes).sum::<usize>()
            }
        }
    }
}

/// GGUF weights kept quantized on a GPU, of one format and input width, as one matrix of their rows
/// stacked: a quantized row is whole blocks of its own, so stacking the matrices concatenates their
/// bytes. One matmul then quantizes the input once and launches once for all of them. `None` when
/// the parts differ in format (a Q4_K_M file stores some value projections in Q6_K) or are not
/// quantized GPU weights (the CPU keeps candle's matmuls as they are, for A/B runs against
/// strata's kernels).
fn stack_quantized(parts: &[Linear]) -> Result<Option<(Linear, Vec<usize>)>> {
    let quantized: Vec<&QTensor> = parts
        .iter()
        .filter_map(|p| match p {
            Linear::Quantized(QMatMul::QTensor(q)) => Some(q.as_ref()),
            _ => None,
        })
        .collect();
    let Some(first) = quantized.first().filter(|_| quantized.len() == parts.len()) else {
        return Ok(None);
    };
    let device = first.device();
    let (_, in_features) = first.shape().dims2()?;
    let mut widths = Vec::with_capacity(quantized.len());
    for q in &quantized {
        let (rows, k) = q.shape().dims2()?;
        if device.is_cpu() || q.dtype() != first.dtype() || k != in_features {
            return Ok(None);
        }
        widths.push(rows);
    }
    let mut bytes = Vec::with_capacity(quantized.iter().map(|q| q.storage_size_in_bytes()).sum());
    for q in &quantized {
        bytes.extend_from_slice(&q.data()?);
    }
    // candle reads the bytes as blocks in place; the allocator's alignment (16) covers every
    // block type, and a buffer without it stays unfused rather than failing.
    if !(bytes.as_ptr() as usize).is_multiple_of(16) {
        return Ok(None);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &device, first.dtype())?;
    let stacked = QTensor::new(storage, (widths.iter().sum::<usize>(), in_features))?;
    let matmul = QMatMul::from_qtensor(stacked)?;
    Ok(Some((Linear::Quantized(matmul), widths)))
}

/// `y + bias` broadcast over rows, or `y`.
fn with_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
