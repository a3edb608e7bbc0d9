//! Parsing `--device` into a candle device.

use candle_core::Device;

use crate::WorkerError;

/// Opens `cpu`, `cuda:N` or `metal:N`. Accelerators need the matching cargo feature.
pub fn open(spec: &str) -> Result<Device, WorkerError> {
    let (kind, index) = parse(spec)?;
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(index),
        _ => metal(index),
    }
}

/// The canonical name of a device spec (`cuda` → `cuda:0`), as `Info` reports it once opened;
/// checks the spec without opening anything.
pub fn canonical(spec: &str) -> Result<String, WorkerError> {
    let (kind, index) = parse(spec)?;
    Ok(match kind {
        "cpu" => "cpu".into(),
        _ => format!("{kind}:{index}"),
    })
}

fn parse(spec: &str) -> Result<(&str, usize), WorkerError> {
    let (kind, index) = match spec.split_once(':') {
        Some((kind, index)) => {
            let index = index.parse::<usize>().map_err(|_| {
                WorkerError::invalid(format!("device {spec:?}: {index:?} is not a device number"))
            })?;
            (kind, index)
        }
        None => (spec, 0),
    };
    match kind {
        "cpu" | "cuda" | "metal" => Ok((kind, index)),
        _ => Err(WorkerError::invalid(format!(
            "unknown device {spec:?}; expected cpu, cuda:N or metal:N"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device, WorkerError> {
    Ok(Device::new_cuda(index)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Device, WorkerError> {
    Err(WorkerError::FailedPrecondition(
        "this strata binary was built without CUDA; rebuild with `--features cuda`".into(),
    ))
}

#[cfg(feature = "metal")]
fn metal(index: usize) -> Result<Device, WorkerError> {
    Ok(Device::new_metal(index)?)
}

#[cfg(not(feature = "metal"))]
fn metal(_: usize) -> Result<Device, WorkerError> {
    Err(WorkerError::FailedPrecondition(
        "this strata binary was built without Metal; rebuild with `--features metal`".into(),
    ))
}

/// The canonical name of a device, as `Info` reports it.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert!(open("cpu").is_ok());
        assert!(open("gpu")
            .unwrap_err()
            .to_string()
            .contains("unknown device"));
        assert!(open("cuda:x")
            .unwrap_err()
            .to_string()
            .contains("not a device number"));
        #[cfg(not(feature = "cuda"))]
        assert!(open("cuda:0")
            .unwrap_err()
            .to_string()
            .contains("without CUDA"));
    }
}
