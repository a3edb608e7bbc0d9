//! strata against llama.cpp on the default model: tokenizer, greedy generation, and split invariance.

mod common;

use common::{
    assert_follows_reference, assert_tokenizer_matches, default_model, generate_json, ids,
    reference,
};

#[test]
fn tokenizer_matches_llama_cpp() {
    let model = default_model();
    assert_tokenizer_matches(model.to_str().unwrap(), &reference());
}

/// The reference rule: the first `exact_prefix` ids equal llama.cpp's; a later departure must be at a
/// near-tie of our own logits (top-2 gap < 0.3 nats).
#[test]
fn greedy_generation_follows_the_reference_rule() {
    let model = default_model();
    let r = reference();
    for p in r["prompts"].as_array().unwrap() {
        let tokens = p["greedy_ids"].as_array().unwrap().len().to_string();
        let out = generate_json(&[
            "--local",
            "2",
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            &tokens,
            "--prompt",
            p["text"].as_str().unwrap(),
        ]);
        assert_follows_reference(p, &out);
    }
}

#[test]
fn split_does_not_change_tokens() {
    let model = default_model();
    let model = model.to_str().unwrap();
    let prompt = "The capital of France is";
    let base = [
        "--model",
        model,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--prompt",
        prompt,
        "--no-warmup",
    ];
    let run_with = |extra: &[&str]| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend_from_slice(&base);
        ids(&generate_json(&args))
    };
    let one = run_with(&["--local", "1"]);
    assert_eq!(one.len(), 24);
    for extra in [
        &["--local", "2"][..],
        &["--local", "3"][..],
        &["--local", "2", "--split", "0-7,7-30"][..],
        &["--local", "3", "--split", "0-1,1-29,29-30"][..],
    ] {
        assert_eq!(run_with(extra), one, "split {extra:?} changed the tokens");
    }
}
