//! Issue #44: strata's log-probabilities against a float64 NumPy forward pass of each real model
//! (SmolLM2-135M Q4_1 through 1 and 3 local stages, Qwen2.5-Coder-1.5B and Gemma-3-270M Q4_K_M
//! through 2; dequantized weights, activations quantized by llama.cpp's rule): top-5
//! log-probabilities within each model's bound on average, and every greedy choice the oracle's own
//! or a near-tie of it. The checks are in `python/f64_reference.py`.

mod common;

#[test]
fn log_probs_follow_a_float64_forward_pass() {
    let (smollm2, qwen2, gemma3) = (
        common::default_model(),
        common::known_model("qwen2.5-coder-1.5b"),
        common::known_model("gemma3-270m"),
    );
    common::run_python_check_with(
        "f64_reference.py",
        3,
        "the float64 reference checks",
        &[
            ("STRATA_SMOLLM2", &smollm2),
            ("STRATA_QWEN2", &qwen2),
            ("STRATA_GEMMA3", &gemma3),
        ],
    );
}
