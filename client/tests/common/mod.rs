//! Helpers shared by the end-to-end tests: the binary, the default model, the reference outputs.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// The `strata` binary cargo built for these tests.
pub fn strata() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

/// The default model, fetched into the cache if missing.
pub fn default_model() -> PathBuf {
    strata_client::model_cache::fetch_default_model(false)
        .expect("the default model (run `strata fetch-model`)")
}

/// llama.cpp's reference outputs: `../shared/reference/smollm2.json` beside the checkout when present
/// (it may hold newer prompts), else the copy in `tests/data`.
pub fn reference() -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = root.join("../shared/reference/smollm2.json");
    let path = if shared.exists() {
        shared
    } else {
        root.join("client/tests/data/smollm2-reference.json")
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// Runs `strata ARGS`, asserting success, and returns the output.
pub fn run(args: &[&str]) -> Output {
    let output = Command::new(strata())
        .args(args)
        .output()
        .expect("run strata");
    assert!(
        output.status.success(),
        "strata {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `strata generate ... --json` and parses its JSON line.
pub fn generate_json(args: &[&str]) -> Value {
    let mut all = vec!["generate", "--json"];
    all.extend_from_slice(args);
    let output = run(&all);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("bad JSON from strata {all:?}: {e}: {stdout}"))
}

/// The `token_ids` of a `--json` result.
pub fn ids(v: &Value) -> Vec<u64> {
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}
