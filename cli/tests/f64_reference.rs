//! Issue #44: strata's log-probabilities against a float64 NumPy forward pass of SmolLM2-135M Q4_1
//! (dequantized weights, activations quantized by llama.cpp's rule), through 1 and 3 local stages:
//! top-5 log-probabilities within 0.12 nats on average, and every greedy choice the oracle's own or
//! a near-tie of it. The checks are in `python/f64_reference.py`.

mod common;

#[test]
fn log_probs_follow_a_float64_forward_pass() {
    common::run_python_check("f64_reference.py", 2, "the float64 reference checks");
}
