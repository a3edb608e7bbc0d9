//! Reading one stage's tensors from a GGUF file or a safetensors directory, by role rather than by
//! file-specific name, with shapes checked against the config.

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use strata_model::config::Family;
use strata_model::{ModelConfig, ModelFile, ModelFormat};

use super::linear::Linear;
use crate::WorkerError;

/// A tensor of a model, by what it does.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    TokenEmbedding,
    OutputNorm,
    Output,
    /// Llama 3's per-frequency RoPE divisors (GGUF `rope_freqs.weight`).
    RopeFreqs,
    AttnNorm(usize),
    Query(usize),
    Key(usize),
    Value(usize),
    /// q, k and v in one tensor, in that order (Phi-3).
    Qkv(usize),
    QueryBias(usize),
    KeyBias(usize),
    ValueBias(usize),
    /// Per-head RMSNorm weights of queries and keys (Qwen3, Gemma 3).
    QueryNorm(usize),
    KeyNorm(usize),
    AttnOutput(usize),
    /// The norm of attention's output before the residual add (Gemma).
    PostAttnNorm(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    /// Gate and up in one tensor, gate first (Phi-3).
    GateUp(usize),
    Down(usize),
    /// The norm of the feed-forward output before the residual add (Gemma).
    PostFfnNorm(usize),
}

impl Role {
    /// The tensor's name in a file of `format` of a model of `family`.
    fn name(self, format: ModelFormat, family: &Family) -> String {
        use Role::*;
        match format {
            ModelFormat::Gguf => match self {
                TokenEmbedding => "token_embd.weight".into(),
                OutputNorm => "output_norm.weight".into(),
                Output => "output.weight".into(),
                RopeFreqs => "rope_freqs.weight".into(),
                AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
                Query(i) => format!("blk.{i}.attn_q.weight"),
                Key(i) => format!("blk.{i}.attn_k.weight"),
                Value(i) => format!("blk.{i}.attn_v.weight"),
                Qkv(i) => format!("blk.{i}.attn_qkv.weight"),
                QueryBias(i) => format!("blk.{i}.attn_q.bias"),
                KeyBias(i) => format!("blk.{i}.attn_k.bias"),
                ValueBias(i) => format!("blk.{i}.attn_v.bias"),
                QueryNorm(i) => format!("blk.{i}.attn_q_norm.weight"),
                KeyNorm(i) => format!("blk.{i}.attn_k_norm.weight"),
                AttnOutput(i) => format!("blk.{i}.attn_output.weight"),
                PostAttnNorm(i) => format!("blk.{i}.post_attention_norm.weight"),
                FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
                Gate(i) => format!("blk.{i}.ffn_gate.weight"),
                Up(i) | GateUp(i) => format!("blk.{i}.ffn_up.weight"),
                Down(i) => format!("blk.{i}.ffn_down.weight"),
                PostFfnNorm(i) => format!("blk.{i}.post_ffw_norm.weight"),
            },
            ModelFormat::Safetensors => {
                let layer = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
                match self {
                    TokenEmbedding => "model.embed_tokens.weight".into(),
                    OutputNorm => "model.norm.weight".into(),
                    Output => "lm_head.weight".into(),
                    RopeFreqs => "rope_freqs.weight".into(),
                    AttnNorm(i) => layer(i, "input_layernorm.weight"),
                    Query(i) => layer(i, "self_attn.q_proj.weight"),
                    Key(i) => layer(i, "self_attn.k_proj.weight"),
                    Value(i) => layer(i, "self_attn.v_proj.weight"),
                    Qkv(i) => layer(i, "self_attn.qkv_proj.weight"),
                    QueryBias(i) => layer(i, "self_attn.q_proj.bias"),
                    KeyBias(i) => layer(i, "self_attn.k_proj.bias"),
                    ValueBias(i) => layer(i, "self_attn.v_proj.bias"),
                    QueryNorm(i) => layer(i, "self_attn.q_norm.weight"),
                    KeyNorm(i) => layer(i, "self_attn.k_norm.weight"),
                    AttnOutput(i) => layer(i, "self_attn.o_proj.weight"),
                    // Llama's `post_attention_layernorm` is the feed-forward's input norm; Gemma
                    // names that one `pre_feedforward_layernorm` and uses the first name for the
                    // norm of attention's output.
                    PostAttnNorm(i) => layer(i, "post_attention_layernorm.weight"),
                    FfnNorm(i) if family.sandwich_norms => {
                        layer(i, "pre_feedforward_layernorm.weight")
                    }
                    FfnNorm(i) => layer(i, "post_attention_layernorm.weight"),
                    Gate(i) => layer(i, "mlp.gate_proj.weight"),
                    Up(i) => layer(i, "mlp.up_proj.weight"),
                    GateUp(i) => layer(i, "mlp.gate_up_proj.weight"),
                    Down(i) => layer(i, "mlp.down_proj.weight"),
                    PostFfnNorm(i) => layer(i, "post_feedforward_layernorm.weight"),
                }
            }
        }
    }

    /// The shape the config implies, `[out, in]` for projections.
    fn expected_shape(self, c: &ModelConfig) -> Vec<usize> {
        use Role::*;
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        match self {
            TokenEmbedding | Output => vec![c.vocab_size, c.hidden_size],
            OutputNorm | AttnNorm(_) | FfnNorm(_) | PostAttnNorm(_) | PostFfnNorm(_) => {
                vec![c.hidden_size]
            }
            RopeFreqs => vec![c.head_dim / 2],
            Query(_) => vec![q, c.hidden_size],
            Key(_) | Value(_) => vec![kv, c.hidden_size],
            Qkv(_) => vec![q + 2 * kv, c.hidden_size],
            QueryBias(_) => vec![q],
            KeyBias(_) | ValueBias(_) => vec![kv],
            QueryNorm(_) | KeyNorm(_) => vec![c.head_dim],
            AttnOutput(_) => vec![c.hidden_size, q],
            Gate(_) | Up(_) => vec![c.intermediate_size, c.hidden_size],
            GateUp(_) => vec![2 * c.intermediate_size, c.hidden_size],
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

    /// Whether the file has a tensor for this role.
    pub fn has(&self, role: Role) -> bool {
        let name = self.name(role);
        match &self.source {
            WeightSource::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            WeightSource::Safetensors(st) => st.get(&name).is_ok(),
        }
    }

    /// A projection: quantized from GGUF, dense in the compute dtype from safetensors.
    pub fn linear(&mut self, role: Role) -> Result<Linear, WorkerError> {
        let name = self.name(role);
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
        };
        self.check_shape(role, &name, t.dims())?;
        Ok(t)
    }
}

fn missing(model: &ModelFile, name: &str, e: candle_core::Error) -> WorkerError {
    WorkerError::FailedPrecondition(format!(
        "{}: cannot read tensor {name}: {e}",
        model.path.display()
    ))
}
