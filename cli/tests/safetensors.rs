//! A Hugging Face safetensors model (random weights, written by `strata make-model`) loads and gives
//! the same tokens on one stage and on several.

mod common;

use common::{generate_json, ids, run};

#[test]
fn safetensors_model_generates_the_same_tokens_on_one_and_two_stages() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-llama");
    let model = model.to_str().unwrap();
    run(&["make-model", "--config", "tiny", "--out", model]);
    let base = [
        "--model",
        model,
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--ignore-eos",
        "--prompt",
        "hello world, again",
    ];
    let run_with = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend_from_slice(&base);
        generate_json(&args)
    };
    let one = run_with(&["--local", "1"]);
    assert_eq!(ids(&one).len(), 20);
    assert_eq!(one["finish_reason"], "length");
    let two = run_with(&["--local", "2"]);
    assert_eq!(ids(&two), ids(&one));
    let three = run_with(&["--local", "3", "--split", "0-1,1-3,3-4"]);
    assert_eq!(ids(&three), ids(&one));
    // Sampling with a seed is reproducible across splits too.
    let sampled = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--temperature", "0.8", "--top-p", "0.9", "--seed", "7"]);
        args.extend_from_slice(&base[..2]);
        args.extend_from_slice(&["--max-tokens", "20", "--ignore-eos", "--prompt", "hello"]);
        ids(&generate_json(&args))
    };
    assert_eq!(sampled(&["--local", "1"]), sampled(&["--local", "2"]));
}
