//! candle's own `quantized_llama` on the same GGUF file: the fixed reference point that strata's
//! per-core speed is measured against (prompt processing and greedy decoding, one sequence).

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

/// Prompt and decode speed of one run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Speed {
    pub prompt_tok_s: f64,
    pub decode_tok_s: f64,
}

/// A prompt of `n` ordinary token ids (the same for every engine measured).
pub fn probe_prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 300 + (i * 37) % 4000).collect()
}

/// Whether candle's `quantized_llama` reads `model`: a GGUF file of the Llama architecture (other
/// families name their metadata keys after themselves, and it reads only `llama.*`).
pub fn check_readable(model: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(model)?;
    let content = gguf_file::Content::read(&mut file)?;
    let architecture = match content.metadata.get("general.architecture") {
        Some(value) => value.to_string()?.clone(),
        None => String::from("unnamed"),
    };
    if architecture != "llama" {
        anyhow::bail!(
            "candle's quantized_llama reads Llama files only, and {} is {architecture}: compare it with llama.cpp instead (--llama-cpp)",
            model.display()
        );
    }
    Ok(())
}

/// Runs candle's `quantized_llama` on `model` (one it reads: [`check_readable`]): one prefill of
/// `prompt` then `decode` greedy tokens.
pub fn measure(model: &Path, prompt: &[u32], decode: usize) -> candle_core::Result<Speed> {
    let mut file = std::fs::File::open(model)?;
    let content = gguf_file::Content::read(&mut file)?;
    let device = Device::Cpu;
    let mut weights = ModelWeights::from_gguf(content, &mut file, &device)?;
    // Warm up once (thread pools, allocations), as strata's stages are warmed. The measured prefill
    // below starts at position 0, where quantized_llama drops whatever its caches held.
    let warm = Tensor::new(&prompt[..prompt.len().min(8)], &device)?.unsqueeze(0)?;
    weights.forward(&warm, 0)?.to_vec2::<f32>()?;
    let started = Instant::now();
    let input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
    let logits = weights.forward(&input, 0)?.squeeze(0)?.to_vec1::<f32>()?;
    let prompt_time = started.elapsed().as_secs_f64();
    let mut next = argmax(&logits);
    let started = Instant::now();
    for i in 0..decode {
        let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
        let logits = weights
            .forward(&input, prompt.len() + i)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        next = argmax(&logits);
    }
    Ok(Speed {
        prompt_tok_s: prompt.len() as f64 / prompt_time,
        decode_tok_s: decode as f64 / started.elapsed().as_secs_f64(),
    })
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}
