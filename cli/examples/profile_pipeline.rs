//! The profiler: cold vs warm start, output and input length scaling, sustained load and a batch, with
//! TTFT, throughput and P50/P95/P99 per-token latency (the same phases as `strata profile`).
//! Run: cargo run --release --example profile_pipeline

mod common;

use strata_harness::profile::{profile, Summary, Target};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let phases = profile(Target::Local(common::local_options(2)?), 4, |p| {
        println!("{}", p.render())
    })
    .await?;
    let summary = Summary::of(&phases);
    println!("{}", summary.render());
    common::check(
        phases.len() == 13,
        "every phase ran (cold, warm, 4 output lengths, 5 input lengths, sustained, batch)",
    )?;
    common::check(
        phases
            .iter()
            .all(|p| p.output_tokens > 0 && p.throughput_tok_s > 0.0),
        "every phase produced tokens",
    )?;
    common::check(
        phases
            .iter()
            .all(|p| p.latency_p50_ms <= p.latency_p95_ms && p.latency_p95_ms <= p.latency_p99_ms),
        "latency percentiles are ordered",
    )?;
    Ok(())
}
