//! Reading one stage's tensors from a GGUF file or a safetensors directory, by role rather than by
//! file-specific name, with shapes checked against the config.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use strata_model::stage_weights::{check_tensor_size, digest_bytes, TensorBlobs};
pub use strata_model::tensors::Role;
use strata_model::{ModelFile, ModelFormat};

use super::cpu_kernels::Isa;
use super::embedding::{Embedding, QuantizedTable};
use super::linear::{Kernel, Linear};
use crate::WorkerError;

/// A GGUF tensor type as llama.cpp and the GGUF spec spell it (`Q4_K`, where candle says `Q4K`).
fn gguf_type_name(dtype: GgmlDType) -> String {
    match dtype {
        GgmlDType::Q2K => "Q2_K".into(),
        GgmlDType::Q3K => "Q3_K".into(),
        GgmlDType::Q4K => "Q4_K".into(),
        GgmlDType::Q5K => "Q5_K".into(),
        GgmlDType::Q6K => "Q6_K".into(),
        GgmlDType::Q8K => "Q8_K".into(),
        other => format!("{other:?}"),
    }
}

/// An open model file from which a stage reads only the tensors it needs.
pub enum WeightSource {
    Gguf {
        content: gguf_file::Content,
        reader: BufReader<File>,
    },
    Safetensors(MmapedSafetensors),
    /// A GGUF header whose tensors are blob files of the worker's cache, each checked against its
    /// digest as it is read.
    Blobs {
        content: gguf_file::Content,
        blobs: TensorBlobs,
    },
}

/// Reads tensors by role onto one device.
pub struct WeightLoader<'a> {
    model: &'a ModelFile,
    source: WeightSource,
    device: Device,
    /// The dtype of dense weights and norms on the device.
    dtype: DType,
    /// Run GGUF weights on strata's own CPU kernels where they exist, on this instruction set
    /// (`None`: candle's).
    strata_kernels: Option<Isa>,
    /// Which kernel multiplies each GGUF type loaded so far, and how many tensors of it.
    kernels: BTreeMap<(String, Kernel), usize>,
}

impl<'a> WeightLoader<'a> {
    pub fn open(
        model: &'a ModelFile,
        device: &Device,
        dtype: DType,
        strata_kernels: Option<Isa>,
    ) -> Result<Self, WorkerError> {
        let source = match (model.format, &model.blobs) {
            (ModelFormat::Gguf, Some(blobs)) => WeightSource::Blobs {
                content: model.gguf_content()?,
                blobs: blobs.clone(),
            },
            (ModelFormat::Gguf, None) => {
                let content = model.gguf_content()?;
                let file = File::open(&model.path).map_err(|e| {
                    WorkerError::Model(strata_model::ModelError::Io {
                        path: model.path.clone(),
                        source: e,
                    })
                })?;
                WeightSource::Gguf {
                    content,
                    reader: BufReader::new(file),
                }
            }
            (ModelFormat::Safetensors, _) => {
                let files = model.safetensors_files()?;
                // SAFETY: the files are mapped read-only; like every mmap-based loader (candle's
                // VarBuilder included) this assumes they are not truncated while the stage loads.
                WeightSource::Safetensors(unsafe { MmapedSafetensors::multi(&files)? })
            }
        };
        Ok(Self {
            model,
            source,
            device: device.clone(),
            dtype,
            strata_kernels,
            kernels: BTreeMap::new(),
        })
    }

    /// Which kernel runs each quantized type this loader gave out, e.g. `Q4_K: strata AVX2 (84),
    /// Q6_K: strata AVX2 (15)`, or `None` for dense weights.
    pub fn kernel_summary(&self) -> Option<String> {
        let parts: Vec<String> = self
            .kernels
            .iter()
            .map(|((dtype, kernel), count)| format!("{dtype}: {} ({count})", kernel.name()))
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    fn name(&self, role: Role) -> String {
        role.name(self.model.format, self.model.config.family)
    }

    fn check_shape(&self, role: Role, name: &str, dims: &[usize]) -> Result<(), WorkerError> {
        let want = role.expected_shape(&self.model.config);
        if dims != want.as_slice() {
            return Err(WorkerError::FailedPrecondition(format!(
                "{}: tensor {name} has shape {dims:?}, the config implies {want:?}",
                self.model.path.display()
            )));
        }
        Ok(())
    }

    /// Whether the weights come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(
            self.source,
            WeightSource::Gguf { .. } | WeightSource::Blobs { .. }
        )
    }

    /// Whether the file has a tensor for this role.
    pub fn has(&self, role: Role) -> bool {
        let name = self.name(role);
        match &self.source {
            WeightSource::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            WeightSource::Safetensors(st) => st.get(&name).is_ok(),
            WeightSource::Blobs { blobs, .. } => blobs.contains_key(&name),
        }
    }

    /// A GGUF tensor as stored, its shape checked against the config.
    fn gguf_tensor(&mut self, role: Role) -> Result<Option<QTensor>, WorkerError> {
        let name = self.name(role);
        let q = match &mut self.source {
            WeightSource::Gguf { content, reader } => content
                .tensor(reader, &name, &self.device)
                .map_err(|e| missing(self.model, &name, e))?,
            WeightSource::Blobs { content, blobs } => {
                blob_tensor(self.model, content, blobs, &name, &self.device)?
            }
            WeightSource::Safetensors(_) => return Ok(None),
        };
        self.check_shape(role, &name, q.shape().dims())?;
        Ok(Some(q))
    }

    /// A projection: quantized from GGUF, dense in the compute dtype from safetensors.
    pub fn linear(&mut self, role: Role) -> Result<Linear, WorkerError> {
        let Some(q) = self.gguf_tensor(role)? else {
            return Ok(Linear::Dense(self.dense(role)?));
        };
        let dtype = gguf_type_name(q.dtype());
        let (linear, kernel) = Linear::quantized(q, self.strata_kernels)?;
        *self.kernels.entry((dtype, kernel)).or_default() += 1;
        Ok(linear)
    }

    /// The token embedding table: kept as the file stores it for a CPU stage reading a quantized
    /// GGUF table (rows dequantized per lookup), dense in the compute dtype otherwise.
    pub fn embedding(&mut self, role: Role) -> Result<Embedding, WorkerError> {
        if !self.device.is_cpu() {
            return Ok(Embedding::Dense(self.dense(role)?));
        }
        let Some(q) = self.gguf_tensor(role)? else {
            return Ok(Embedding::Dense(self.dense(role)?));
        };
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Embedding::Dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
            }
            _ => Embedding::Quantized(QuantizedTable::new(&q)?),
        })
    }

    /// A norm weight in the compute dtype, with the family's offset added (Gemma's `1 + w` in
    /// Hugging Face files).
    pub fn norm(&mut self, role: Role) -> Result<Tensor, WorkerError> {
        let offset = self.model.config.norm_offset;
        let w = self.load_dense(role)?.to_dtype(DType::F32)?;
        let w = if offset == 0.0 {
            w
        } else {
            (w + offset as f64)?
        };
        Ok(w.to_dtype(self.dtype)?)
    }

    /// A tensor dequantized (GGUF) or converted (safetensors) to f32, on the host, as a vector
    /// (small tensors the stage computes from, such as `rope_freqs`).
    pub fn host_vec(&mut self, role: Role) -> Result<Vec<f32>, WorkerError> {
        let device = std::mem::replace(&mut self.device, Device::Cpu);
        let t = self.load_dense(role);
        self.device = device;
        Ok(t?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A tensor dequantized (GGUF) or converted (safetensors) to the compute dtype.
    pub fn dense(&mut self, role: Role) -> Result<Tensor, WorkerError> {
        Ok(self.load_dense(role)?.to_dtype(self.dtype)?)
    }

    /// A tensor as the file gives it: dequantized to f32 (GGUF) or in its stored dtype
    /// (safetensors).
    fn load_dense(&mut self, role: Role) -> Result<Tensor, WorkerError> {
        let name = self.name(role);
        let t = match &mut self.source {
            WeightSource::Gguf { content, reader } => content
                .tensor(reader, &name, &self.device)
                .and_then(|q| q.dequantize(&self.device))
                .map_err(|e| missing(self.model, &name, e))?,
            WeightSource::Safetensors(st) => st
                .load(&name, &self.device)
                .map_err(|e| missing(self.model, &name, e))?,
            WeightSource::Blobs { content, blobs } => {
                blob_tensor(self.model, content, blobs, &name, &self.device)?
                    .dequantize(&self.device)?
            }
        };
        self.check_shape(role, &name, t.dims())?;
        Ok(t)
    }
}

/// Reads tensor `name` from its blob file, checked against the header's size and the blob's
/// digest. A blob whose bytes do not match is deleted, so that it is sent again.
fn blob_tensor(
    model: &ModelFile,
    content: &gguf_file::Content,
    blobs: &TensorBlobs,
    name: &str,
    device: &Device,
) -> Result<QTensor, WorkerError> {
    let info = content.tensor_infos.get(name).ok_or_else(|| {
        WorkerError::FailedPrecondition(format!("{}: no tensor {name}", model.name))
    })?;
    let (blob, path) = blobs.get(name).ok_or_else(|| {
        WorkerError::FailedPrecondition(format!(
            "{}: tensor {name} was not sent with the stage",
            model.name
        ))
    })?;
    check_tensor_size(name, info, blob).map_err(WorkerError::InvalidArgument)?;
    // Read once: the bytes are checked and then become the tensor.
    let raw = std::fs::read(path).map_err(|e| strata_model::ModelError::io(path, e))?;
    if digest_bytes(&raw) != *blob {
        let _ = std::fs::remove_file(path);
        return Err(WorkerError::DataLoss(format!(
            "cached tensor {name} ({}) does not match its digest; the entry is dropped: send it again",
            blob.hex()
        )));
    }
    Ok(qtensor_from_ggml(
        info.ggml_dtype,
        &raw,
        info.shape.dims().to_vec(),
        device,
    )?)
}

fn missing(model: &ModelFile, name: &str, e: candle_core::Error) -> WorkerError {
    WorkerError::FailedPrecondition(format!(
        "{}: cannot read tensor {name}: {e}",
        model.path.display()
    ))
}
