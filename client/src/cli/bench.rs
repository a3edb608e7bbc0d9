//! `strata bench`: benchmarks that print numbers and JSON.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use strata_client::bench::{optimizations, render_optimizations, OptimizationWorkload};

use super::cluster::ClusterArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The same workload with each per-stage optimization (RoPE table, mask cache, warmup) on and off.
    Optimizations(OptimizationArgs),
}

#[derive(Debug, Args)]
struct OptimizationArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Rounds over all variants (fresh workers each time); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests per variant and round.
    #[arg(long, default_value_t = 3)]
    requests: usize,
    /// Prompt length in tokens (prefill is where masks matter).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Bench::Optimizations(a) => run_optimizations(a).await,
    }
}

async fn run_optimizations(args: OptimizationArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.cluster.coordinator.is_none(),
        "the optimization bench starts its own workers: use --local N"
    );
    let options = args.cluster.local_options(true, Vec::new())?;
    let workload = OptimizationWorkload {
        rounds: args.rounds,
        requests: args.requests,
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
    };
    let results = optimizations(&options, workload, |round, v, s| {
        println!(
            "round {round} {:<15} first TTFT {:7.1} ms  prefill {:7.1} ms  decode {:6.2} tok/s",
            v.name, s.first_ttft_ms, s.prefill_ms, s.decode_tok_s
        );
    })
    .await?;
    println!(
        "\nmedians over {} rounds, {} workers:\n{}",
        args.rounds,
        options.workers,
        render_optimizations(&results)
    );
    if let Some(path) = &args.json {
        let out = json!({
            "workers": options.workers, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "requests": args.requests, "variants": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
