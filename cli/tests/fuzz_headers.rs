//! Fuzzing model-file parsing: the default model's GGUF header (metadata, tokenizer, tensor
//! directory) and a safetensors directory's `config.json` and headers, mutated at random, must
//! parse or fail with an error, never panic. `STRATA_FUZZ_EXECS` scales the run, `STRATA_FUZZ_SEED`
//! replays one.

mod common;

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use strata_model::rng::SplitMix64;
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};
use strata_model::{ModelConfig, ModelFile, TextTokenizer};

/// Flips bytes, writes boundary integers over length fields, or truncates.
fn mutate(rng: &mut SplitMix64, bytes: &mut Vec<u8>, hot: usize) {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        if len == 0 {
            return;
        }
        // Half the mutations land in the first `hot` bytes, where the counts and lengths are.
        let at = if rng.below(2) == 0 {
            rng.below(hot.min(len))
        } else {
            rng.below(len)
        };
        match rng.below(6) {
            0 | 1 => bytes[at] = rng.next_u64() as u8,
            2 => bytes[at] ^= 1 << rng.below(8),
            3 | 4 => {
                let values = [
                    0u64,
                    1,
                    7,
                    255,
                    u32::MAX as u64,
                    u64::MAX,
                    1 << 40,
                    len as u64,
                ];
                let v = values[rng.below(values.len())].to_le_bytes();
                let width = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in v.iter().take(width).enumerate() {
                    if at + i < len {
                        bytes[at + i] = *b;
                    }
                }
            }
            _ => bytes.truncate(at),
        }
    }
}

fn seed() -> u64 {
    std::env::var("STRATA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn execs(default: usize) -> usize {
    std::env::var("STRATA_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, |n: usize| n / 10)
}

#[test]
fn gguf_headers_parse_or_fail_cleanly() {
    let model = common::default_model();
    let content = ModelFile::open(&model).unwrap().gguf_content().unwrap();
    let header_len = content.tensor_data_offset as usize;
    let original = std::fs::read(&model).unwrap()[..header_len].to_vec();
    let (seed, execs) = (seed(), execs(1_000));
    let mut rng = SplitMix64::new(seed);
    let (mut parsed, mut refused) = (0, 0);
    for exec in 0..execs {
        let mut bytes = original.clone();
        mutate(&mut rng, &mut bytes, 4096);
        let build_tokenizer = exec % 20 == 0;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let content = Content::read(&mut Cursor::new(&bytes)).map_err(|e| e.to_string())?;
            ModelConfig::from_gguf(Path::new("fuzz.gguf"), &content).map_err(|e| e.to_string())?;
            if build_tokenizer {
                TextTokenizer::from_gguf(Path::new("fuzz.gguf"), &content)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
        match outcome {
            Ok(Ok(())) => parsed += 1,
            Ok(Err(message)) => {
                assert!(!message.is_empty());
                refused += 1
            }
            Err(_) => {
                panic!("exec {exec} (STRATA_FUZZ_SEED={seed}) panicked parsing a GGUF header")
            }
        }
    }
    eprintln!("fuzz_headers gguf: {execs} execs, {parsed} parsed, {refused} refused, 0 panics (seed {seed})");
}

#[test]
fn safetensors_directories_parse_or_fail_cleanly() {
    let source = tempfile::tempdir().unwrap();
    write_safetensors_model(source.path(), &SyntheticConfig::tiny()).unwrap();
    let config = std::fs::read(source.path().join("config.json")).unwrap();
    let weights_name = std::fs::read_dir(source.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let weights = std::fs::read(&weights_name).unwrap();
    let header = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let (seed, execs) = (seed(), execs(2_000));
    let mut rng = SplitMix64::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let (mut parsed, mut refused) = (0, 0);
    for exec in 0..execs {
        let mut config = config.clone();
        let mut weights = weights[..header.min(weights.len())].to_vec();
        if rng.below(2) == 0 {
            let hot = config.len();
            mutate(&mut rng, &mut config, hot);
        } else {
            mutate(&mut rng, &mut weights, 64);
        }
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &weights).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| ModelFile::open(dir.path())));
        match outcome {
            Ok(Ok(_)) => parsed += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1
            }
            Err(_) => {
                panic!("exec {exec} (STRATA_FUZZ_SEED={seed}) panicked opening a safetensors model")
            }
        }
    }
    eprintln!("fuzz_headers safetensors: {execs} execs, {parsed} parsed, {refused} refused, 0 panics (seed {seed})");
}
