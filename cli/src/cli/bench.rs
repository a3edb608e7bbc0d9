//! `strata bench`: benchmarks that print numbers and JSON.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use strata_harness::bench::{
    check_replicas, optimizations, render_optimizations, throughput, throughput_single,
    OptimizationWorkload,
};
use strata_harness::single_process::SingleProcess;

use super::cluster::ClusterArgs;

/// Without a subcommand: aggregate throughput at several concurrency levels.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Option<Bench>,
    #[command(flatten)]
    throughput: ThroughputArgs,
}

impl BenchArgs {
    /// Compute threads of this process (the single-process baseline computes here).
    pub fn compute_threads(&self) -> Option<usize> {
        match self.which {
            None if self.throughput.single_process => self.throughput.cluster.threads,
            Some(Bench::Kernels(ref k)) => k.threads,
            _ => None,
        }
    }
}

#[derive(Debug, Args)]
struct ThroughputArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Concurrent streams to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    concurrency: Vec<usize>,
    /// New tokens per stream (end-of-generation ignored).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// All layers in this process, no gRPC: the baseline that pipeline overhead is measured against.
    #[arg(long)]
    single_process: bool,
    /// With --single-process: independent copies of the whole model, each on --threads compute
    /// threads of its own, sharing the streams and running at once. No hops and no stage waiting on
    /// another: the most a pipeline of as many stages could get from these cores.
    #[arg(long, default_value_t = 1, requires = "single_process")]
    replicas: usize,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Bench {
    /// The same workload with each per-stage optimization (RoPE table, mask cache, warmup) on and off.
    Optimizations(OptimizationArgs),
    /// Per-core speed: strata's whole model in this process vs llama.cpp's `llama-bench`
    /// (`--llama-cpp`) or candle's `quantized_llama` (Llama files) on the same GGUF file and threads,
    /// rounds alternated (prompt processing and decoding of one sequence).
    Kernels(KernelArgs),
    /// candle-transformers' own `llama` on a safetensors model, on any device: the fixed reference
    /// point for GPU speed (batches of same-length prompts; greedy).
    CandleLlama(CandleLlamaArgs),
    /// Many concurrent clients with random prompts and lengths, some hanging up mid-stream; checks
    /// that every completed request equals its prompt's solo output, none was lost, and the workers
    /// return to their after-warmup state. Exits non-zero if any check fails.
    Soak(SoakArgs),
    /// Whole last-position logits of prompts (token ids), from strata's stages run in this process
    /// on the given devices, as JSON: what fidelity checks compare with other engines (the pipeline
    /// itself reports only the top 20 log-probabilities).
    Logits(LogitsArgs),
}

#[derive(Debug, Args)]
struct LogitsArgs {
    #[arg(long)]
    model: PathBuf,
    /// One stage per device, layers split evenly, e.g. `cuda:0,cpu`.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Compute dtype of safetensors stages: f32, bf16 or f16 (default: per device, as workers choose).
    #[arg(long, value_parser = strata_worker::model::stage::parse_dtype)]
    dtype: Option<candle_core::DType>,
    /// A JSON file holding a list of prompts, each a list of token ids.
    #[arg(long)]
    prompts: PathBuf,
    /// Where to write `[[logit, ...], ...]`, one row per prompt.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct CandleLlamaArgs {
    /// A Hugging Face safetensors directory (e.g. from `strata make-model`).
    #[arg(long)]
    model: PathBuf,
    /// `cpu`, `cuda:N` or `metal:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = strata_worker::model::stage::parse_dtype)]
    dtype: candle_core::DType,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SoakArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// Fraction of requests cancelled mid-stream.
    #[arg(long, default_value_t = 0.1)]
    cancel: f64,
    /// New tokens per request are drawn from 1..=this.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Distinct random prompts.
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// Allowed growth of a worker's resident memory over the run, as a fraction.
    #[arg(long, default_value_t = 0.10)]
    rss_tolerance: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct KernelArgs {
    /// A GGUF model. Default: SmolLM2-135M-Instruct Q4_1.
    #[arg(long, env = "STRATA_MODEL")]
    model: Option<PathBuf>,
    /// Compute threads (for both engines).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Compare with llama.cpp: the folder holding `llama-bench` (what `bench/llamacpp.sh` prints).
    /// Its decode runs at the depth the prompt leaves (`-d`), as strata's does.
    #[arg(long)]
    llama_cpp: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
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
        Some(Bench::Optimizations(a)) => run_optimizations(a).await,
        Some(Bench::Kernels(a)) => run_kernels(a).await,
        Some(Bench::Soak(a)) => run_soak(a).await,
        Some(Bench::Logits(a)) => tokio::task::spawn_blocking(move || run_logits(a)).await?,
        Some(Bench::CandleLlama(a)) => run_candle_llama(a).await,
        None => run_throughput(args.throughput).await,
    }
}

async fn run_throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.concurrency.iter().all(|&c| c > 0),
        "--concurrency levels must be at least 1"
    );
    let mut rows = Vec::new();
    if args.single_process {
        let model = strata_harness::model_cache::resolve_model(args.cluster.model.as_deref())?;
        let threads = args
            .cluster
            .threads
            .map_or("every core".to_string(), |t| format!("{t} threads"));
        // Before loading any replica.
        for &c in &args.concurrency {
            check_replicas(args.replicas, c)
                .map_err(|e| anyhow::anyhow!("--replicas {}: {e}", args.replicas))?;
        }
        let setup = match args.replicas {
            1 => format!("single process ({threads})"),
            n => format!("{n} × single process ({threads} each)"),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut replicas = Vec::with_capacity(args.replicas);
        for _ in 0..args.replicas {
            let single = SingleProcess::load(&model, args.cluster.threads.unwrap_or(cores))
                .await
                .map_err(anyhow::Error::msg)?;
            replicas.push(single);
        }
        for &c in &args.concurrency {
            let row = throughput_single(&replicas, &setup, c, args.max_tokens).await?;
            println!("{}", row.render());
            rows.push(row);
        }
    } else {
        let (cluster, client, setup) = match &args.cluster.coordinator {
            Some(url) => (
                None,
                args.cluster.connect(url).await?,
                format!("coordinator {url}"),
            ),
            None => {
                let c = args.cluster.start_local(true).await?;
                let client = c.client().await?;
                let threads = args
                    .cluster
                    .threads
                    .map_or("every core".to_string(), |t| format!("{t} threads"));
                (
                    Some(c),
                    client,
                    format!("{} stages ({threads})", args.cluster.local.unwrap_or(2)),
                )
            }
        };
        for &c in &args.concurrency {
            let row = throughput(&client, &setup, c, args.max_tokens).await?;
            println!("{}", row.render());
            rows.push(row);
        }
        if let Some(c) = cluster {
            c.stop().await.map_err(anyhow::Error::msg)?;
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({ "max_tokens": args.max_tokens, "rows": rows }))?,
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
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

fn run_logits(args: LogitsArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("cannot read {}", args.prompts.display()))?;
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON list of token-id lists",
            args.prompts.display()
        )
    })?;
    let options = strata_worker::model::StageOptions {
        dtype: args.dtype,
        ..Default::default()
    };
    let mut pipeline =
        strata_harness::logits::LogitsPipeline::load(&args.model, &args.devices, options)?;
    let rows = prompts
        .iter()
        .map(|p| pipeline.last_logits(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::write(&args.out, serde_json::to_string(&rows)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "{} logit rows of {} from {} stage(s) on {}",
        rows.len(),
        rows.first().map_or(0, Vec::len),
        args.devices.len(),
        args.devices.join(",")
    );
    Ok(())
}

async fn run_candle_llama(args: CandleLlamaArgs) -> anyhow::Result<()> {
    let dtype = args.dtype;
    let device = strata_worker::device::open(&args.device)?;
    let results = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
        let llama = strata_harness::candle_llama::CandleLlama::load(&args.model, device, dtype)?;
        // Warm up (kernel compilation, allocations) with every batch size measured.
        for &b in &args.batch {
            llama.measure(b, args.prompt_tokens, 4)?;
        }
        let mut results = Vec::new();
        for &b in &args.batch {
            let r = llama.measure(b, args.prompt_tokens, args.decode_tokens)?;
            println!(
                "candle llama {} batch {:<3} prefill {:7.1} ms  decode {:8.1} tok/s aggregate",
                strata_worker::model::stage::dtype_name(dtype),
                b,
                r.prefill_ms,
                r.decode_tok_s
            );
            results.push(r);
        }
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
        }
        Ok(results)
    })
    .await??;
    anyhow::ensure!(!results.is_empty(), "no batch size given");
    Ok(())
}

async fn run_kernels(args: KernelArgs) -> anyhow::Result<()> {
    use strata_harness::bench::median;
    use strata_harness::candle_reference;
    let model = strata_harness::model_cache::resolve_model(args.model.as_deref())?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let llama_cpp = args
        .llama_cpp
        .as_deref()
        .map(strata_harness::llama_cpp::LlamaBench::new)
        .transpose()?;
    let peer = if llama_cpp.is_some() {
        "llama.cpp"
    } else {
        candle_reference::check_readable(&model)?;
        "candle quantized_llama"
    };
    let prompt = candle_reference::probe_prompt(args.prompt_tokens);
    let ours = SingleProcess::load(&model, threads)
        .await
        .map_err(anyhow::Error::msg)?;
    let (mut s_prompt, mut s_decode, mut c_prompt, mut c_decode) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let s = ours
            .measure_ids(&prompt, args.decode_tokens)
            .await
            .map_err(anyhow::Error::msg)?;
        let (m, p, d) = (model.clone(), prompt.clone(), args.decode_tokens);
        let c = match llama_cpp.clone() {
            Some(llama) => {
                tokio::task::spawn_blocking(move || llama.measure(&m, threads, p.len(), d))
                    .await??
            }
            None => {
                tokio::task::spawn_blocking(move || candle_reference::measure(&m, &p, d)).await??
            }
        };
        println!(
            "round {round}: strata prompt {:7.1} tok/s decode {:6.1} tok/s | {peer} prompt {:7.1} tok/s decode {:6.1} tok/s",
            s.prompt_tok_s, s.decode_tok_s, c.prompt_tok_s, c.decode_tok_s
        );
        s_prompt.push(s.prompt_tok_s);
        s_decode.push(s.decode_tok_s);
        c_prompt.push(c.prompt_tok_s);
        c_decode.push(c.decode_tok_s);
    }
    let (sp, sd, cp, cd) = (
        median(&mut s_prompt),
        median(&mut s_decode),
        median(&mut c_prompt),
        median(&mut c_decode),
    );
    println!(
        "medians, {threads} threads, prompt {} tokens, decode {} tokens, {}:\n  strata  prompt {sp:7.1} tok/s  decode {sd:6.1} tok/s\n  {peer}  prompt {cp:7.1} tok/s  decode {cd:6.1} tok/s\n  strata / {peer}: prompt {:.2}x, decode {:.2}x",
        args.prompt_tokens,
        args.decode_tokens,
        model.display(),
        sp / cp,
        sd / cd
    );
    if let Some(path) = &args.json {
        let out = json!({
            "model": model, "threads": threads, "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens, "rounds": args.rounds, "peer": peer,
            "strata": {"prompt_tok_s": sp, "decode_tok_s": sd},
            "peer_speed": {"prompt_tok_s": cp, "decode_tok_s": cd},
            "prompt_ratio": sp / cp, "decode_ratio": sd / cd,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

async fn run_soak(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.cancel),
        "--cancel is a fraction between 0 and 1"
    );
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    let options = args.cluster.local_options(true, Vec::new())?;
    let mut cluster = strata_harness::LocalCluster::start(options)
        .await
        .map_err(anyhow::Error::msg)?;
    let soak_options = strata_harness::soak::SoakOptions {
        clients: args.clients,
        requests_per_client: args.requests,
        cancel_fraction: args.cancel,
        max_tokens: args.max_tokens,
        prompts: args.prompts,
        seed: args.seed,
    };
    let report = strata_harness::soak::soak(&mut cluster, &soak_options).await;
    cluster.stop().await.map_err(anyhow::Error::msg)?;
    let report = report?;
    println!("{}", report.render());
    for problem in report.problems.iter().take(10) {
        println!("  problem: {problem}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    anyhow::ensure!(
        report.passed(args.rss_tolerance),
        "soak failed: {} wrong, {} lost, active after {:?}, RSS growth {:.1}% (allowed {:.0}%)",
        report.wrong,
        report.lost,
        report.active_after,
        report.rss_growth * 100.0,
        args.rss_tolerance * 100.0
    );
    println!("soak passed");
    Ok(())
}
