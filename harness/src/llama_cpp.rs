//! llama.cpp's `llama-bench` as the CPU speed peer of `strata bench kernels --llama-cpp`: one
//! measurement per call, so rounds can alternate with strata's. `bench/llamacpp.sh` builds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::candle_reference::Speed;

/// A built llama.cpp: the folder holding `llama-bench`.
#[derive(Debug, Clone)]
pub struct LlamaBench {
    bin: PathBuf,
}

impl LlamaBench {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let bin = dir.join("llama-bench");
        if !bin.is_file() {
            bail!(
                "{} is not there: build llama.cpp with bench/llamacpp.sh and pass the folder it prints",
                bin.display()
            );
        }
        Ok(Self { bin })
    }

    /// Prefill of `prompt` tokens (`-p`) and decoding of `decode` tokens at the context the prompt
    /// leaves (`-n -d`), on `threads` threads, one repetition each: what strata's `measure_ids`
    /// measures in one sequence.
    pub fn measure(
        &self,
        model: &Path,
        threads: usize,
        prompt: usize,
        decode: usize,
    ) -> anyhow::Result<Speed> {
        let prompt_tok_s = self.run(model, threads, &["-p", &prompt.to_string(), "-n", "0"])?;
        let depth = prompt.to_string();
        let decode = decode.to_string();
        let decode_tok_s = self.run(model, threads, &["-p", "0", "-n", &decode, "-d", &depth])?;
        Ok(Speed {
            prompt_tok_s,
            decode_tok_s,
        })
    }

    /// Tokens per second of the one test the arguments select.
    fn run(&self, model: &Path, threads: usize, test: &[&str]) -> anyhow::Result<f64> {
        let out = Command::new(&self.bin)
            .arg("-m")
            .arg(model)
            .args(["-t", &threads.to_string(), "-r", "1", "-o", "json"])
            .args(test)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} {test:?} failed: {}",
                self.bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let rows: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{} printed no JSON", self.bin.display()))?;
        rows.as_array()
            .and_then(|rows| rows.first())
            .and_then(|row| row["avg_ts"].as_f64())
            .with_context(|| format!("no avg_ts in llama-bench's output: {rows}"))
    }
}
