//! `strata make-model`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};

#[derive(Debug, Args)]
pub struct MakeModelArgs {
    /// A preset shape (tiny, tinyllama-1.1b, llama-7b) or a Hugging Face config.json to copy the shape of.
    #[arg(long)]
    config: String,
    /// Directory to write config.json, tokenizer.json and model.safetensors into.
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype on disk: f32, f16 or bf16 (default: the preset's).
    #[arg(long, value_parser = strata_worker::model::stage::parse_dtype)]
    dtype: Option<candle_core::DType>,
    /// Seed of the random weights; the same seed writes the same model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
}

pub fn run(args: MakeModelArgs) -> anyhow::Result<()> {
    let mut config = match SyntheticConfig::preset(&args.config) {
        Some(c) => c,
        None => from_file(&args.config)?,
    };
    config.seed = args.seed;
    if let Some(layers) = args.layers {
        config.num_layers = layers;
    }
    if let Some(dtype) = args.dtype {
        config.dtype = dtype;
    }
    eprintln!(
        "strata: writing a random-weight model {config:?} to {}",
        args.out.display()
    );
    write_safetensors_model(&args.out, &config)?;
    println!("{}", args.out.display());
    Ok(())
}

fn from_file(path: &str) -> anyhow::Result<SyntheticConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{path:?} is neither a preset (tiny, tinyllama-1.1b, llama-7b) nor a readable config.json"))?;
    let c = strata_model::ModelConfig::from_hf_json(std::path::Path::new(path), &text)?;
    Ok(SyntheticConfig {
        num_layers: c.num_layers,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        vocab_size: c.vocab_size,
        context_length: c.context_length,
        rope_theta: c.rope.theta,
        tie_word_embeddings: c.tie_word_embeddings,
        dtype: candle_core::DType::BF16,
        seed: 1,
    })
}
