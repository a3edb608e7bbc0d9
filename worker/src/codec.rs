//! The one place where tensors cross the wire: `strata.v1.Tensor` ↔ candle `Tensor`.
//!
//! Decoding checks everything a client controls (dtype, rank, element count against the byte length,
//! overflow) before allocating, so a hostile message can neither panic the worker nor make it allocate
//! more than the message itself holds.

use candle_core::{DType, Device, Tensor};
use strata_proto::v1;

use crate::WorkerError;

/// The candle dtype of a wire dtype; unspecified or unknown values are errors.
pub fn dtype_from_wire(raw: i32) -> Result<DType, WorkerError> {
    match v1::DType::try_from(raw) {
        Ok(v1::DType::DtypeF32) => Ok(DType::F32),
        Ok(v1::DType::DtypeF16) => Ok(DType::F16),
        Ok(v1::DType::DtypeBf16) => Ok(DType::BF16),
        Ok(v1::DType::DtypeUnspecified) => Err(WorkerError::invalid(
            "tensor dtype is unspecified; expected F32, F16 or BF16",
        )),
        Err(_) => Err(WorkerError::invalid(format!(
            "unknown tensor dtype {raw}; expected F32 (1), F16 (2) or BF16 (3)"
        ))),
    }
}

/// The wire dtype of a candle dtype, for the dtypes that travel.
pub fn dtype_to_wire(dtype: DType) -> Result<v1::DType, WorkerError> {
    match dtype {
        DType::F32 => Ok(v1::DType::DtypeF32),
        DType::F16 => Ok(v1::DType::DtypeF16),
        DType::BF16 => Ok(v1::DType::DtypeBf16),
        other => Err(WorkerError::Internal(format!("{other:?} does not travel"))),
    }
}

/// Decodes a wire tensor into a CPU tensor, checking that the bytes match dtype and shape.
pub fn decode(t: &v1::Tensor) -> Result<Tensor, WorkerError> {
    let dtype = dtype_from_wire(t.dtype)?;
    if t.shape.is_empty() || t.shape.len() > 4 {
        return Err(WorkerError::invalid(format!(
            "tensor of rank {} (shape {:?}); expected rank 1 to 4",
            t.shape.len(),
            t.shape
        )));
    }
    let elements = t
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| WorkerError::invalid(format!("tensor shape {:?} overflows", t.shape)))?;
    let expected = elements
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| WorkerError::invalid(format!("tensor shape {:?} overflows", t.shape)))?;
    if expected != t.data.len() {
        return Err(WorkerError::invalid(format!(
            "tensor of shape {:?} and dtype {dtype:?} needs {expected} bytes, got {}",
            t.shape,
            t.data.len()
        )));
    }
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    Ok(Tensor::from_raw_buffer(
        &t.data,
        dtype,
        &shape,
        &Device::Cpu,
    )?)
}

/// Encodes a tensor (on the CPU, already in the output dtype) as a wire tensor.
pub fn encode(t: &Tensor) -> Result<v1::Tensor, WorkerError> {
    Ok(v1::Tensor {
        data: to_le_bytes(t)?,
        dtype: dtype_to_wire(t.dtype())? as i32,
        shape: t.dims().iter().map(|&d| d as u32).collect(),
    })
}

fn to_le_bytes(t: &Tensor) -> Result<Vec<u8>, WorkerError> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(WorkerError::Internal(format!("{other:?} does not travel"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_each_dtype() -> Result<(), WorkerError> {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((4, 3))?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let wire = encode(&t.narrow(0, 1, 2)?.to_dtype(dtype)?)?;
            assert_eq!(wire.shape, vec![2, 3]);
            let back = decode(&wire)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            assert_eq!(back, vec![vec![3.0, 4.0, 5.0], vec![6.0, 7.0, 8.0]]);
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_tensors() {
        let ok = v1::Tensor {
            data: vec![0; 8],
            dtype: v1::DType::DtypeF32 as i32,
            shape: vec![1, 2],
        };
        assert!(decode(&ok).is_ok());
        let cases = [
            v1::Tensor {
                data: vec![0; 7],
                ..ok.clone()
            },
            v1::Tensor {
                dtype: 0,
                ..ok.clone()
            },
            v1::Tensor {
                dtype: 99,
                ..ok.clone()
            },
            v1::Tensor {
                shape: vec![],
                ..ok.clone()
            },
            v1::Tensor {
                shape: vec![u32::MAX, u32::MAX, u32::MAX],
                ..ok.clone()
            },
            v1::Tensor {
                shape: vec![1, 1, 1, 1, 2],
                ..ok.clone()
            },
        ];
        for case in cases {
            let err = decode(&case).unwrap_err();
            assert!(matches!(err, WorkerError::InvalidArgument(_)), "{err}");
        }
    }
}
