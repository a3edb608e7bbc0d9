//! Issue #44: the whole model's arithmetic against llama.cpp's, by the margins it decides with.
//! Teacher-forced over the shared reference prompts (llama.cpp's greedy ids fed back one decode step
//! at a time, as a generation that chose them runs), strata's signed top-2 margin at each step (the
//! reference token's log-probability minus the best other's) is compared with llama.cpp's
//! (`reference_top2_margin_nats`), through 1 and 3 stages. The same statistic for candle's kernels
//! (`--candle-kernels`) is printed beside it, so the two can be compared (BENCHMARKS.md records
//! both).
//!
//! The bounds are each model's floor, not a wish: on SmolLM2 an exact float64 evaluation of the
//! same model (dequantized weights, activations quantized by llama.cpp's rule) is itself 0.116 nats
//! from llama.cpp on average and 0.58 at most, and on Gemma 3 strata and candle both part from
//! llama.cpp by over 1 nat at steps where activations have large outliers (BENCHMARKS.md). A
//! kernel error of the kind issue #44 found moves single steps by 0.3 nats and the mean by 0.01:
//! the exact per-kernel oracles (`cpu_kernels/tests.rs`) catch those; this check catches what
//! breaks a model as a whole.

mod common;

use strata_harness::logits::{margin_of, LogitsPipeline};
use strata_worker::model::{Ablations, StageOptions};

/// |Δ margin| over every step of every prompt of one model, and where the largest was.
struct Margins {
    deltas: Vec<f32>,
    worst: (f32, String),
}

impl Margins {
    fn mean(&self) -> f32 {
        self.deltas.iter().sum::<f32>() / self.deltas.len() as f32
    }
}

fn measure(
    model: &std::path::Path,
    reference: &serde_json::Value,
    stages: usize,
    ablations: Ablations,
) -> Margins {
    let devices = vec!["cpu".to_string(); stages];
    let options = StageOptions {
        ablations,
        ..StageOptions::default()
    };
    let mut pipeline = LogitsPipeline::load(model, &devices, options).unwrap();
    let mut out = Margins {
        deltas: Vec::new(),
        worst: (0.0, String::new()),
    };
    for p in reference["prompts"].as_array().unwrap() {
        let ids = |key: &str| -> Vec<u32> {
            p[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let (prompt, greedy) = (ids("prompt_ids"), ids("greedy_ids"));
        let theirs: Vec<f32> = p["reference_top2_margin_nats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let rows = pipeline.forced_logits(&prompt, &greedy).unwrap();
        for (step, ((row, &id), &their)) in rows.iter().zip(&greedy).zip(&theirs).enumerate() {
            let ours = margin_of(row, id);
            let delta = (ours - their).abs();
            if delta > out.worst.0 {
                out.worst = (
                    delta,
                    format!(
                        "{:?} step {step}: ours {ours:+.3}, llama.cpp {their:+.3}",
                        p["text"].as_str().unwrap()
                    ),
                );
            }
            out.deltas.push(delta);
        }
    }
    out
}

/// Measures strata's kernels through 1 and 3 stages and candle's through 1, and holds strata's to
/// `mean` and `max` (nats).
fn check(name: &str, model: &std::path::Path, reference: serde_json::Value, mean: f32, max: f32) {
    let candle = Ablations {
        candle_kernels: true,
        ..Ablations::default()
    };
    let control = measure(model, &reference, 1, candle);
    for stages in [1, 3] {
        let ours = measure(model, &reference, stages, Ablations::default());
        eprintln!(
            "margins {name}, {stages} stage(s): strata mean |Δ| {:.3} max {:.3} ({}); candle kernels (1 stage) mean {:.3} max {:.3} ({})",
            ours.mean(),
            ours.worst.0,
            ours.worst.1,
            control.mean(),
            control.worst.0,
            control.worst.1,
        );
        assert!(
            ours.mean() <= mean && ours.worst.0 <= max,
            "{name}, {stages} stage(s): mean |Δ margin| {:.3} (≤ {mean}), max {:.3} (≤ {max}) at {}",
            ours.mean(),
            ours.worst.0,
            ours.worst.1
        );
    }
}

fn reference(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn smollm2_margins_follow_llama_cpp() {
    check(
        "smollm2",
        &common::default_model(),
        reference("smollm2"),
        0.12,
        0.65,
    );
}

#[test]
fn qwen2_margins_follow_llama_cpp() {
    check(
        "qwen2.5-coder-1.5b",
        &common::known_model("qwen2.5-coder-1.5b"),
        reference("qwen2.5-coder-1.5b"),
        0.10,
        0.35,
    );
}

#[test]
fn gemma3_margins_follow_llama_cpp() {
    check(
        "gemma3-270m",
        &common::known_model("gemma3-270m"),
        reference("gemma3-270m"),
        0.16,
        1.20,
    );
}
