//! Reading one stage's tensors from a GGUF file or a safetensors directory, by role rather than by
//! file-specific name, with shapes checked against the config.

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use strata_model::{LlamaConfig, ModelFile, ModelFormat};

use super::linear::Linear;
use crate::WorkerError;

/// A tensor of a Llama model, by what it does.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    TokenEmbedding,
    OutputNorm,
    Output,
    AttnNorm(usize),
    Query(usize),
    Key(usize),
    Value(usize),
    AttnOutput(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Role {
    fn name(self, format: ModelFormat) -> String {
        use Role::*;
        match format {
            ModelFormat::Gguf => match self {
                TokenEmbedding => "token_embd.weight".into(),
                OutputNorm => "output_norm.weight".into(),
                Output => "output.weight".into(),
                AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
                Query(i) => format!("blk.{i}.attn_q.weight"),
                Key(i) => format!("blk.{i}.attn_k.weight"),
                Value(i) => format!("blk.{i}.attn_v.weight"),
                AttnOutput(i) => format!("blk.{i}.attn_output.weight"),
                FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
                Gate(i) => format!("blk.{i}.ffn_gate.weight"),
                Up(i) => format!("blk.{i}.ffn_up.weight"),
                Down(i) => format!("blk.{i}.ffn_down.weight"),
            },
            ModelFormat::Safetensors => match self {
                TokenEmbedding => "model.embed_tokens.weight".into(),
                OutputNorm => "model.norm.weight".into(),
                Output => "lm_head.weight".into(),
                AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
                Query(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
                Key(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
                Value(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
                AttnOutput(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
                FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
                Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
                Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
                Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
            },
        }
    }

    /// The shape the config implies, `[out, in]` for projections.
    fn expected_shape(self, c: &LlamaConfig) -> Vec<usize> {
        use Role::*;
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        match self {
            TokenEmbedding | Output => vec![c.vocab_size, c.hidden_size],
            OutputNorm | AttnNorm(_) | FfnNorm(_) => vec![c.hidden_size],
            Query(_) => vec![q, c.hidden_size],
            Key(_) | Value(_) => vec![kv, c.hidden_size],
            AttnOutput(_) => vec![c.hidden_size, q],
            Gate(_) | Up(_) => vec![c.intermediate_size, c.hidden_size],
            Down(_) => vec![c.hidden_size, c.intermediate_size],
        }
    }
}

/// An open model file from which a stage reads only the tensors it needs.
pub enum WeightSource {
    Gguf {
        content: gguf_file::Content,
        reader: BufReader<File>,
    },
    Safetensors(MmapedSafetensors),
}

/// Reads tensors by role onto one device.
pub struct WeightLoader<'a> {
    model: &'a ModelFile,
    source: WeightSource,
    device: Device,
    /// The dtype of dense weights and norms on the device.
    dtype: DType,
    /// Use strata's own CPU kernels where they exist (Q4_1).
    fast_kernels: bool,
}

impl<'a> WeightLoader<'a> {
    pub fn open(
        model: &'a ModelFile,
        device: &Device,
        dtype: DType,
        fast_kernels: bool,
    ) -> Result<Self, WorkerError> {
        let source = match model.format {
            ModelFormat::Gguf => {
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
            ModelFormat::Safetensors => {
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
            fast_kernels,
        })
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

    /// Whether the file has a tensor for this role.
    pub fn has(&self, role: Role) -> bool {
        let name = role.name(self.model.format);
        match &self.source {
            WeightSource::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            WeightSource::Safetensors(st) => st.get(&name).is_ok(),
        }
    }

    /// A projection: quantized from GGUF, dense in the compute dtype from safetensors.
    pub fn linear(&mut self, role: Role) -> Result<Linear, WorkerError> {
        let name = role.name(self.model.format);
        match &mut self.source {
            WeightSource::Gguf { content, reader } => {
                let q = content
                    .tensor(reader, &name, &self.device)
                    .map_err(|e| missing(self.model, &name, e))?;
                self.check_shape(role, &name, q.shape().dims())?;
                Ok(Linear::quantized(q, self.fast_kernels)?)
            }
            WeightSource::Safetensors(_) => Ok(Linear::Dense(self.dense(role)?)),
        }
    }

    /// A tensor dequantized (GGUF) or converted (safetensors) to the compute dtype.
    pub fn dense(&mut self, role: Role) -> Result<Tensor, WorkerError> {
        let name = role.name(self.model.format);
        let t = match &mut self.source {
            WeightSource::Gguf { content, reader } => content
                .tensor(reader, &name, &self.device)
                .and_then(|q| q.dequantize(&self.device))
                .map_err(|e| missing(self.model, &name, e))?,
            WeightSource::Safetensors(st) => st
                .load(&name, &self.device)
                .map_err(|e| missing(self.model, &name, e))?,
        };
        self.check_shape(role, &name, t.dims())?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

fn missing(model: &ModelFile, name: &str, e: candle_core::Error) -> WorkerError {
    WorkerError::FailedPrecondition(format!(
        "{}: cannot read tensor {name}: {e}",
        model.path.display()
    ))
}
