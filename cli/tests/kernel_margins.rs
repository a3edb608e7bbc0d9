//! Issue #44: the whole model's arithmetic against llama.cpp's, by the margins it decides with.
//! Teacher-forced over the shared reference prompts (llama.cpp's greedy ids fed back one decode step
//! at a time, as a generation that chose them runs), strata's signed top-2 margin at each step (the
//! reference token's log-probability minus the best other's) is compared with llama.cpp's
//! (`reference_top2_margin_nats`), through 1 and 3 stages. The same statistic for the device-generic
//! path (`--candle-kernels --no-cpu-attention`: candle's kernels, as on ARM and, op for op, Metal) is
//! printed beside it, so the two can be compared (BENCHMARKS.md records both). strata's kernels also run once on AVX2 alone (`--cpu-isa avx2`), through 2 stages, as on
//! a CPU without AVX-512, and every run must choose as the reference rule allows: llama.cpp's token
//! at every step of the exact prefix, and a first departure after it only at a near-tie of its own.
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
use strata_worker::model::cpu_kernels::Isa;
use strata_worker::model::{Ablations, StageOptions};

/// |Δ margin| over every step of every prompt of one model, and where the largest was.
struct Margins {
    deltas: Vec<f32>,
    worst: (f32, String),
    /// Steps where the greedy choice breaks the reference rule.
    broken: Vec<String>,
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
        broken: Vec::new(),
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
        let exact = p["exact_prefix"].as_u64().unwrap() as usize;
        if let Some(broken) = breaks_rule(&rows, &greedy, exact) {
            out.broken
                .push(format!("{:?}: {broken}", p["text"].as_str().unwrap()));
        }
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

/// Where greedy decoding over these teacher-forced rows breaks the reference rule, if it does: the
/// first step whose best token is not llama.cpp's lies inside the exact prefix, or is not at a
/// near-tie (top-2 gap < 0.3 nats) of these logits. Up to that step the forced context is the one
/// greedy decoding would have built; after it the two part, so later steps are not judged.
fn breaks_rule(rows: &[Vec<f32>], greedy: &[u32], exact: usize) -> Option<String> {
    let (step, ours) = rows
        .iter()
        .zip(greedy)
        .enumerate()
        .find_map(|(i, (row, &id))| {
            let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]))? as u32;
            (best != id).then_some((i, best))
        })?;
    let gap = margin_of(&rows[step], ours);
    (step < exact || gap >= 0.3).then(|| {
        format!(
            "step {step} chooses {ours} over {} by {gap:.3} nats (exact prefix {exact})",
            greedy[step]
        )
    })
}

/// Measures strata's kernels through 1 and 3 stages (and 2 on AVX2), and the device-generic path
/// through 1 (candle's quantized matmuls and attention: what a CPU without AVX2, an ARM host, runs,
/// and the ops a Metal stage runs); holds strata's to `mean` and `max` (nats), and every run to the
/// reference rule.
fn check(name: &str, model: &std::path::Path, reference: serde_json::Value, mean: f32, max: f32) {
    let generic = Ablations {
        candle_kernels: true,
        no_cpu_attention: true,
        ..Ablations::default()
    };
    let control = measure(model, &reference, 1, generic);
    assert!(
        control.broken.is_empty(),
        "{name}, the generic path: greedy choices break the reference rule: {:?}",
        control.broken
    );
    let avx2 = Ablations {
        cpu_isa: Some(Isa::Avx2),
        ..Ablations::default()
    };
    let runs = [
        (1, Ablations::default(), "best ISA"),
        (3, Ablations::default(), "best ISA"),
        (2, avx2, "AVX2"),
    ];
    for (stages, ablations, isa) in runs {
        let ours = measure(model, &reference, stages, ablations);
        eprintln!(
            "margins {name}, {stages} stage(s), {isa}: strata mean |Δ| {:.3} max {:.3} ({}); generic path (1 stage) mean {:.3} max {:.3} ({})",
            ours.mean(),
            ours.worst.0,
            ours.worst.1,
            control.mean(),
            control.worst.0,
            control.worst.1,
        );
        assert!(
            ours.mean() <= mean && ours.worst.0 <= max,
            "{name}, {stages} stage(s), {isa}: mean |Δ margin| {:.3} (≤ {mean}), max {:.3} (≤ {max}) at {}",
            ours.mean(),
            ours.worst.0,
            ours.worst.1
        );
        assert!(
            ours.broken.is_empty(),
            "{name}, {stages} stage(s), {isa}: greedy choices break the reference rule: {:?}",
            ours.broken
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
