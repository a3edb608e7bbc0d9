//! `strata make-model`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_model::synthetic::{
    family_preset, preset_names, write_model_from_hf_config, SyntheticConfig,
};

#[derive(Debug, Args)]
pub struct MakeModelArgs {
    /// A preset: a Llama shape (tiny, tinyllama-1.1b, llama-7b) or a real model's config.json that
    /// strata ships (llama-3.2-1b, qwen2.5-1.5b, qwen3-1.7b, gemma-3-1b, phi-3-mini); or the path of
    /// a Hugging Face config.json of any supported family, written as it is.
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
    let (mut config, default_dtype) = match SyntheticConfig::preset(&args.config) {
        Some(shape) => (shape.hf_config(), shape.dtype),
        None => match family_preset(&args.config) {
            Some(config) => (config, candle_core::DType::BF16),
            None => (from_file(&args.config)?, candle_core::DType::BF16),
        },
    };
    if let Some(layers) = args.layers {
        config["num_hidden_layers"] = serde_json::json!(layers);
        if let Some(types) = config.get_mut("layer_types").and_then(|t| t.as_array_mut()) {
            types.truncate(layers);
        }
    }
    let dtype = args.dtype.unwrap_or(default_dtype);
    eprintln!(
        "strata: writing a random-weight {} model ({} layers, {}) to {}",
        config["model_type"].as_str().unwrap_or("llama"),
        config["num_hidden_layers"],
        strata_worker::model::stage::dtype_name(dtype),
        args.out.display()
    );
    write_model_from_hf_config(&args.out, &config, dtype, args.seed)?;
    println!("{}", args.out.display());
    Ok(())
}

fn from_file(path: &str) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{path:?} is neither a preset ({}) nor a readable config.json",
            preset_names().join(", ")
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))
}
