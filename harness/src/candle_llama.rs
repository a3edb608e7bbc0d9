//! candle-transformers' own `llama` on a safetensors directory: the fixed reference point for
//! strata's GPU speed, built into the same binary. Greedy decoding of a batch of *same-length*
//! prompts only (its cache has no padding or per-sequence masks).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

use crate::candle_reference::probe_prompt;

/// One measurement.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LlamaSpeed {
    pub batch: usize,
    /// Milliseconds for the prefill of the whole batch.
    pub prefill_ms: f64,
    /// New tokens per second over the batch, decode steps only.
    pub decode_tok_s: f64,
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Loads the model once.
pub struct CandleLlama {
    model: Llama,
    config: candle_transformers::models::llama::Config,
    device: Device,
    dtype: DType,
}

impl CandleLlama {
    pub fn load(dir: &Path, device: Device, dtype: DType) -> candle_core::Result<Self> {
        let text = std::fs::read(dir.join("config.json"))?;
        let config: LlamaConfig = serde_json::from_slice(&text).map_err(msg)?;
        let config = config.into_config(false);
        let files = strata_model::ModelFile::open(dir)
            .and_then(|m| m.safetensors_files())
            .map_err(msg)?;
        // SAFETY: the files are mapped read-only and not modified while the benchmark runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &device)? };
        let model = Llama::load(vb, &config)?;
        Ok(Self {
            model,
            config,
            device,
            dtype,
        })
    }

    /// Prefill of `batch` copies of a `prompt_len`-token prompt, then `decode` greedy steps.
    pub fn measure(
        &self,
        batch: usize,
        prompt_len: usize,
        decode: usize,
    ) -> candle_core::Result<LlamaSpeed> {
        let vocab = self.config.vocab_size as u32;
        let prompt: Vec<u32> = probe_prompt(prompt_len).iter().map(|t| t % vocab).collect();
        let input = Tensor::new(prompt.as_slice(), &self.device)?
            .unsqueeze(0)?
            .repeat((batch, 1))?;
        let mut cache = Cache::new(true, self.dtype, &self.config, &self.device)?;
        let started = Instant::now();
        let logits = self.model.forward(&input, 0, &mut cache)?;
        let mut next = logits.argmax(D::Minus1)?;
        next.to_vec1::<u32>()?;
        let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        for i in 0..decode {
            let input = next.unsqueeze(1)?;
            let logits = self.model.forward(&input, prompt_len + i, &mut cache)?;
            next = logits.argmax(D::Minus1)?;
            // Greedy decoding needs the token on the host side each step, as a server would.
            next.to_vec1::<u32>()?;
        }
        Ok(LlamaSpeed {
            batch,
            prefill_ms,
            decode_tok_s: (batch * decode) as f64 / started.elapsed().as_secs_f64(),
        })
    }
}
