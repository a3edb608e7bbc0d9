//! The per-stage optimizations (RoPE table, causal-mask cache, warmup) each on and off, on fresh local
//! workers, with the ratios (the same bench as `strata bench optimizations`, one short round).
//! Run: cargo run --release --example benchmark_optimizations

mod common;

use strata_harness::bench::{optimizations, render_optimizations, OptimizationWorkload};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let workload = OptimizationWorkload {
        rounds: 1,
        requests: 2,
        prompt_tokens: 64,
        max_tokens: 16,
    };
    let results = optimizations(&common::local_options(2)?, workload, |_, v, s| {
        println!(
            "{:<15} first TTFT {:7.1} ms  prefill {:7.1} ms  decode {:6.2} tok/s",
            v.name, s.first_ttft_ms, s.prefill_ms, s.decode_tok_s
        )
    })
    .await?;
    println!("{}", render_optimizations(&results));
    common::check(
        results.len() == 4 && results.iter().all(|r| r.decode_tok_s > 0.0),
        "every variant ran and generated",
    )?;
    Ok(())
}
