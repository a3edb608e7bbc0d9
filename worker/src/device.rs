//! Parsing `--device` into a candle device.

use candle_core::Device;

use crate::WorkerError;

/// Opens `cpu`, `cuda:N` or `metal:N`. Accelerators need the matching cargo feature.
pub fn open(spec: &str) -> Result<Device, WorkerError> {
    open_keeping(spec, KEPT_POOL_BYTES)
}

/// [`open`], with a CUDA device's memory pool keeping `pool_keep_bytes` of freed memory (0: the
/// driver's default, which keeps none).
pub fn open_keeping(spec: &str, pool_keep_bytes: u64) -> Result<Device, WorkerError> {
    let (kind, index) = parse(spec)?;
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(index, pool_keep_bytes),
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
fn cuda(index: usize, pool_keep_bytes: u64) -> Result<Device, WorkerError> {
    let device = Device::new_cuda(index)?;
    if let Device::Cuda(cuda) = &device {
        keep_freed_memory(cuda, pool_keep_bytes)?;
    }
    Ok(device)
}

/// How much freed device memory the stream-ordered allocator keeps for reuse after a synchronize.
/// The driver's default is none: every stage step ends in a copy to the host, which synchronizes,
/// so each step's tensors were mapped anew from the driver, a host cost on every allocation of a
/// launch-bound step. A step's transient tensors take far less than this at batch sizes where the
/// host is the bottleneck; the KV pool is allocated and accounted for on its own.
pub const KEPT_POOL_BYTES: u64 = 1 << 30;

/// Sets the device's default memory pool to keep `keep` bytes of freed memory (0 keeps the
/// driver's default).
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &candle_core::CudaDevice, keep: u64) -> Result<(), WorkerError> {
    use candle_core::cuda::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let context = stream.context();
    if keep == 0 || !context.has_async_alloc() {
        return Ok(());
    }
    let failed = |e| WorkerError::Internal(format!("setting the CUDA memory pool: {e:?}"));
    context.bind_to_thread().map_err(failed)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = keep;
    // SAFETY: the context is bound to this thread, `pool` is written by the driver before it is
    // used, and the attribute's value is a u64 as the driver expects for the release threshold.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .map_err(failed)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(failed)?;
    }
    Ok(())
}

/// Bytes of memory where `device` keeps its tensors: in total, and what it can still give. A CUDA
/// device answers for its own memory (freed memory that the pool keeps counts as taken); the CPU
/// and Metal (unified memory) answer for the host's.
pub fn memory(device: &Device) -> Memory {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return match cuda.cuda_stream().context().mem_get_info() {
            Ok((free, total)) => Memory {
                total: total as u64,
                available: free as u64,
            },
            Err(e) => {
                tracing::warn!(error = ?e, "cannot read the CUDA device's free memory");
                Memory::default()
            }
        };
    }
    let _ = device;
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    Memory {
        total: system.total_memory(),
        available: system.available_memory(),
    }
}

/// See [`memory`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub total: u64,
    pub available: u64,
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize, _: u64) -> Result<Device, WorkerError> {
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

/// The physical device `device` computes on, the same string in every worker on it, so that a
/// coordinator can tell which stages take turns on one device: the GPU's UUID on CUDA (`GPU-…`, as
/// `nvidia-smi -L` prints it), the host and GPU number on Metal, and empty on the CPU, where each
/// worker computes on threads of its own (`--threads`). Empty too when the driver cannot say.
pub fn physical_id(device: &Device) -> String {
    match device {
        Device::Cpu => String::new(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => match cuda.cuda_stream().context().uuid() {
            Ok(uuid) => gpu_uuid(&uuid.bytes.map(|b| b as u8)),
            Err(e) => {
                tracing::warn!(error = ?e, "cannot read the GPU's UUID");
                String::new()
            }
        },
        _ => match (sysinfo::System::host_name(), device.location()) {
            (Some(host), candle_core::DeviceLocation::Metal { gpu_id }) => {
                format!("metal:{host}:{gpu_id}")
            }
            _ => String::new(),
        },
    }
}

/// A GPU's 16 UUID bytes as NVIDIA prints them: `GPU-` and 8-4-4-4-12 hex digits.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn gpu_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
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

    #[test]
    fn a_gpu_uuid_reads_as_nvidia_prints_it() {
        let bytes = [
            0x5f, 0x0e, 0x2b, 0x1a, 0x9c, 0x33, 0x4d, 0x07, 0x8e, 0x61, 0x00, 0xff, 0x12, 0x34,
            0x56, 0x78,
        ];
        assert_eq!(gpu_uuid(&bytes), "GPU-5f0e2b1a-9c33-4d07-8e61-00ff12345678");
    }

    #[test]
    fn cpu_workers_share_no_device() {
        assert_eq!(physical_id(&Device::Cpu), "");
    }

    #[test]
    fn the_cpu_reports_the_hosts_memory() {
        let memory = memory(&Device::Cpu);
        assert!(memory.total > 0, "{memory:?}");
        assert!(
            memory.available > 0 && memory.available <= memory.total,
            "{memory:?}"
        );
    }
}
