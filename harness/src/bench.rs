//! Benchmarks shared by `strata bench` and the examples.

use std::time::Duration;

use serde::Serialize;

use crate::profile::{prompt_of_length, ProfileError};
use crate::{LocalCluster, LocalOptions};
use strata_client::{GenerateParams, StrataClient};

/// A way to run the stages with one optimization turned off (or none).
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    /// Worker flags that turn the optimization off.
    pub worker_flags: &'static [&'static str],
    pub warmup: bool,
}

/// The optimization bench's variants; the first is the baseline with everything on.
pub const VARIANTS: [Variant; 4] = [
    Variant {
        name: "all on",
        worker_flags: &[],
        warmup: true,
    },
    Variant {
        name: "RoPE table off",
        worker_flags: &["--no-rope-table"],
        warmup: true,
    },
    Variant {
        name: "mask cache off",
        worker_flags: &["--no-mask-cache"],
        warmup: true,
    },
    Variant {
        name: "warmup off",
        worker_flags: &[],
        warmup: false,
    },
];

/// The workload of the optimization bench.
#[derive(Debug, Clone, Copy)]
pub struct OptimizationWorkload {
    pub rounds: usize,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub max_tokens: u32,
}

/// One variant in one round, on fresh workers.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// TTFT of the first request the fresh workers see (what warmup is for).
    pub first_ttft_ms: f64,
    /// Median TTFT of the workload's requests (prefill of `prompt_tokens`).
    pub prefill_ms: f64,
    /// Median decode speed of the workload's requests.
    pub decode_tok_s: f64,
}

/// A variant's medians over the rounds, and its ratios to the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: &'static str,
    pub first_ttft_ms: f64,
    pub prefill_ms: f64,
    pub decode_tok_s: f64,
    /// OFF / ON: above 1 means the optimization saves time.
    pub first_ttft_ratio: f64,
    pub prefill_ratio: f64,
    pub decode_time_ratio: f64,
}

/// Runs the workload on fresh workers for every variant, `rounds` times interleaved (so drifts in the
/// machine's load hit every variant alike), and reports medians and ratios.
pub async fn optimizations(
    options: &LocalOptions,
    w: OptimizationWorkload,
    mut on_sample: impl FnMut(usize, &Variant, &Sample),
) -> Result<Vec<VariantResult>, ProfileError> {
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..w.rounds {
        for (v, variant) in VARIANTS.iter().enumerate() {
            let mut opts = options.clone();
            opts.warmup = variant.warmup;
            opts.worker_args
                .extend(variant.worker_flags.iter().map(|s| s.to_string()));
            let cluster = LocalCluster::start(opts)
                .await
                .map_err(ProfileError::Cluster)?;
            let client = cluster.client().await?;
            let params = GenerateParams {
                max_tokens: w.max_tokens,
                ignore_eos: true,
                ..GenerateParams::default()
            };
            let first = client
                .generate_collect(
                    "Hello there",
                    &GenerateParams {
                        max_tokens: 2,
                        ..params.clone()
                    },
                )
                .await?;
            let prompt = prompt_of_length(&client, w.prompt_tokens).await?;
            let (mut prefill, mut decode) = (Vec::new(), Vec::new());
            for _ in 0..w.requests {
                let g = client.generate_collect(&prompt, &params).await?;
                prefill.push(g.ttft.as_secs_f64() * 1e3);
                decode.push(g.decode_tokens_per_s());
            }
            cluster.stop().await.map_err(ProfileError::Cluster)?;
            let sample = Sample {
                first_ttft_ms: first.ttft.as_secs_f64() * 1e3,
                prefill_ms: median(&mut prefill),
                decode_tok_s: median(&mut decode),
            };
            on_sample(round, variant, &sample);
            samples[v].push(sample);
        }
    }
    let med =
        |s: &[Sample], f: fn(&Sample) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
    let base = &samples[0];
    let (b_first, b_prefill, b_decode) = (
        med(base, |s| s.first_ttft_ms),
        med(base, |s| s.prefill_ms),
        med(base, |s| s.decode_tok_s),
    );
    Ok(VARIANTS
        .iter()
        .zip(&samples)
        .map(|(variant, s)| {
            let (first, prefill, decode) = (
                med(s, |s| s.first_ttft_ms),
                med(s, |s| s.prefill_ms),
                med(s, |s| s.decode_tok_s),
            );
            VariantResult {
                variant: variant.name,
                first_ttft_ms: first,
                prefill_ms: prefill,
                decode_tok_s: decode,
                first_ttft_ratio: first / b_first,
                prefill_ratio: prefill / b_prefill,
                decode_time_ratio: b_decode / decode,
            }
        })
        .collect())
}

/// The median (mean of the middle two for an even count; 0 for none).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

/// The results as a table for people.
pub fn render_optimizations(results: &[VariantResult]) -> String {
    let mut out = format!(
        "{:<15} {:>14} {:>12} {:>12} {:>9} {:>10} {:>9}\n",
        "variant", "first TTFT ms", "prefill ms", "decode t/s", "first x", "prefill x", "decode x"
    );
    for r in results {
        out += &format!(
            "{:<15} {:>14.1} {:>12.1} {:>12.2} {:>9.3} {:>10.3} {:>9.3}\n",
            r.variant,
            r.first_ttft_ms,
            r.prefill_ms,
            r.decode_tok_s,
            r.first_ttft_ratio,
            r.prefill_ratio,
            r.decode_time_ratio
        );
    }
    out + "ratios are OFF / ON time: above 1 means the optimization saves time, 1 means no effect"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    fn ms(times: &[u64]) -> Vec<Duration> {
        times.iter().map(|&t| Duration::from_millis(t)).collect()
    }

    #[test]
    fn steady_decode_counts_only_after_every_stream_started() {
        // One stream alone: its decode speed, 4 tokens after the first in 40 ms.
        let one = [ms(&[100, 110, 120, 130, 140])];
        assert!((steady_decode_rate(&one) - 100.0).abs() < 1e-9);
        // The second stream's first token comes at 120 ms: from then to 160 ms, 2 + 3 tokens.
        let two = [ms(&[100, 110, 120, 130, 140]), ms(&[120, 130, 140, 160])];
        assert!((steady_decode_rate(&two) - 5.0 / 0.040).abs() < 1e-9);
        // Nothing to measure: a stream with no token, or no token after the last first one.
        assert_eq!(steady_decode_rate(&[ms(&[100]), ms(&[])]), 0.0);
        assert_eq!(steady_decode_rate(&[ms(&[100]), ms(&[120])]), 0.0);
        assert_eq!(steady_decode_rate::<Vec<Duration>>(&[]), 0.0);
    }
}

/// One concurrency level of the throughput bench.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    pub setup: String,
    pub concurrency: usize,
    pub generated_tokens: usize,
    pub wall_ms: f64,
    /// Generated tokens of all streams over the wall time.
    pub aggregate_tok_s: f64,
    /// Decode throughput once every stream has its first token: see [`steady_decode_rate`].
    pub decode_aggregate_tok_s: f64,
    /// Mean decode speed of one stream (tokens after its first over the time after its first).
    pub per_stream_tok_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Per stage: device time over wall time (empty for the single process).
    pub stage_busy: Vec<f64>,
    /// Per stage: mean time of a step around the worker's compute (network, serialization,
    /// queueing), as the coordinator saw it (empty for the single process).
    pub stage_hop_ms: Vec<f64>,
}

impl ThroughputRow {
    pub fn render(&self) -> String {
        let busy = self
            .stage_busy
            .iter()
            .map(|b| format!("{:.0}%", b * 100.0))
            .collect::<Vec<_>>()
            .join(" / ");
        let hop = if self.stage_hop_ms.is_empty() {
            String::new()
        } else {
            let hops: Vec<String> = self
                .stage_hop_ms
                .iter()
                .map(|h| format!("{h:.2}"))
                .collect();
            format!("  hop {} ms/step", hops.join(" / "))
        };
        format!(
            "{:<22} c={:<3} aggregate {:7.2} tok/s  decode aggregate {:7.2} tok/s  per stream {:6.2} tok/s  TTFT P50 {:7.1} ms P99 {:7.1} ms  busy {}{hop}",
            self.setup, self.concurrency, self.aggregate_tok_s, self.decode_aggregate_tok_s, self.per_stream_tok_s, self.ttft_p50_ms, self.ttft_p99_ms, busy
        )
    }
}

/// Prompts of 4 to 40 tokens, different for each stream (the load llama.cpp's server was measured with).
pub fn bench_prompts(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "The",
        "river",
        "carried",
        "boats",
        "of",
        "grain",
        "toward",
        "the",
        "sea",
        "while",
        "farmers",
        "in",
        "the",
        "valley",
        "watched",
        "the",
        "weather",
        "and",
        "counted",
        "their",
        "goats",
        "before",
        "winter",
        "came",
        "down",
        "from",
        "the",
        "mountains",
        "with",
        "snow",
        "and",
        "long",
        "nights",
        "that",
        "kept",
        "everyone",
        "close",
        "to",
        "the",
        "fire",
    ];
    (0..n)
        .map(|i| {
            let len = 4 + (i * 13) % 33;
            let start = (i * 7) % WORDS.len();
            (0..len)
                .map(|j| WORDS[(start + j) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Aggregate decode speed of streams that started together: the tokens that came after the last
/// stream's first token, over the time from then to the last token of any stream. Prefill (and
/// the pipeline's fill while later prompts go in) is left out; streams that finish early count
/// against it, since the tail runs with fewer streams. For one stream this is its decode speed.
/// `token_times[s]` holds stream `s`'s token times from the common start, in order.
pub fn steady_decode_rate<T: AsRef<[Duration]>>(token_times: &[T]) -> f64 {
    let token_times: Vec<&[Duration]> = token_times.iter().map(AsRef::as_ref).collect();
    let Some(all_started) = token_times
        .iter()
        .map(|t| t.first())
        .collect::<Option<Vec<_>>>()
    else {
        return 0.0; // a stream without tokens
    };
    let Some(&from) = all_started.into_iter().max() else {
        return 0.0;
    };
    let to = token_times
        .iter()
        .filter_map(|t| t.last())
        .max()
        .copied()
        .unwrap_or(from);
    let after: usize = token_times
        .iter()
        .map(|t| t.iter().filter(|&&at| at > from).count())
        .sum();
    let window = to.saturating_sub(from).as_secs_f64();
    if after == 0 || window <= 0.0 {
        return 0.0;
    }
    after as f64 / window
}

fn ttft_percentiles(mut ttft_ms: Vec<f64>) -> (f64, f64) {
    ttft_ms.sort_by(f64::total_cmp);
    (
        crate::profile::percentile(&ttft_ms, 50.0),
        crate::profile::percentile(&ttft_ms, 99.0),
    )
}

/// `concurrency` streams at once through a coordinator, each generating `max_tokens` (EOS ignored).
pub async fn throughput(
    client: &StrataClient,
    setup: &str,
    concurrency: usize,
    max_tokens: u32,
) -> Result<ThroughputRow, ProfileError> {
    let prompts = bench_prompts(concurrency);
    let params = GenerateParams {
        max_tokens,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let before = client.info().await?;
    let started = std::time::Instant::now();
    let results = client.generate_batch(&prompts, &params).await;
    let wall = started.elapsed();
    let after = client.info().await?;
    let generations = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let generated: usize = generations.iter().map(|g| g.token_ids.len()).sum();
    let (p50, p99) = ttft_percentiles(
        generations
            .iter()
            .map(|g| g.ttft.as_secs_f64() * 1e3)
            .collect(),
    );
    let stage_busy = before
        .stages
        .iter()
        .zip(&after.stages)
        .map(|(b, a)| (a.forward_ns_total - b.forward_ns_total) as f64 / wall.as_nanos() as f64)
        .collect();
    let stage_hop_ms = before
        .stages
        .iter()
        .zip(&after.stages)
        .map(|(b, a)| {
            let around = (a.round_trip_ns_total - b.round_trip_ns_total)
                .saturating_sub(a.forward_ns_total - b.forward_ns_total);
            around as f64 / 1e6 / (a.steps_total - b.steps_total).max(1) as f64
        })
        .collect();
    Ok(ThroughputRow {
        setup: setup.to_string(),
        concurrency,
        generated_tokens: generated,
        wall_ms: wall.as_secs_f64() * 1e3,
        aggregate_tok_s: generated as f64 / wall.as_secs_f64(),
        decode_aggregate_tok_s: steady_decode_rate(
            &generations
                .iter()
                .map(|g| g.token_times.as_slice())
                .collect::<Vec<_>>(),
        ),
        per_stream_tok_s: generations
            .iter()
            .map(|g| g.decode_tokens_per_s())
            .sum::<f64>()
            / generations.len() as f64,
        ttft_p50_ms: p50,
        ttft_p99_ms: p99,
        stage_busy,
        stage_hop_ms,
    })
}

/// Whether `concurrency` streams can be dealt out to `replicas` so that each gets at least one (a
/// replica without a stream would be measured idle).
pub fn check_replicas(replicas: usize, concurrency: usize) -> Result<(), String> {
    if replicas == 0 {
        return Err("at least one replica is needed".into());
    }
    if concurrency < replicas {
        return Err(format!(
            "concurrency {concurrency} gives some of the {replicas} replicas no stream"
        ));
    }
    Ok(())
}

/// The same load on the whole model in this process (no pipeline, no gRPC). With several
/// `replicas` (independent engines, each on compute threads of its own), the streams are dealt out
/// among them and all run at once: what these cores give with no hop and no stage waiting on
/// another, the ceiling a pipeline of as many stages on them could reach.
pub async fn throughput_single(
    replicas: &[crate::single_process::SingleProcess],
    setup: &str,
    concurrency: usize,
    max_tokens: u32,
) -> Result<ThroughputRow, ProfileError> {
    check_replicas(replicas.len(), concurrency).map_err(ProfileError::Cluster)?;
    let prompts = bench_prompts(concurrency);
    let shares: Vec<Vec<String>> = (0..replicas.len())
        .map(|r| {
            prompts
                .iter()
                .skip(r)
                .step_by(replicas.len())
                .cloned()
                .collect()
        })
        .collect();
    let started = std::time::Instant::now();
    let runs = futures::future::try_join_all(
        replicas
            .iter()
            .zip(&shares)
            .map(|(model, share)| model.run_since(started, share, max_tokens as usize)),
    )
    .await
    .map_err(ProfileError::Cluster)?;
    let wall = runs
        .iter()
        .map(|r| r.wall)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    // Per stream: time to first token, tokens, and the wall time of its replica's run.
    let streams: Vec<(Duration, usize, Duration)> = runs
        .iter()
        .flat_map(|r| {
            r.ttft
                .iter()
                .zip(&r.generated)
                .map(|(&t, &n)| (t, n, r.wall))
        })
        .collect();
    let generated: usize = streams.iter().map(|&(_, n, _)| n).sum();
    let per_stream = streams
        .iter()
        .map(|&(t, n, w)| strata_client::client::decode_rate(n, t, w))
        .sum::<f64>()
        / concurrency as f64;
    let (p50, p99) = ttft_percentiles(
        streams
            .iter()
            .map(|(t, _, _)| t.as_secs_f64() * 1e3)
            .collect(),
    );
    let token_times: Vec<&[Duration]> = runs
        .iter()
        .flat_map(|r| r.token_times.iter().map(Vec::as_slice))
        .collect();
    Ok(ThroughputRow {
        setup: setup.to_string(),
        concurrency,
        generated_tokens: generated,
        wall_ms: wall * 1e3,
        aggregate_tok_s: generated as f64 / wall,
        decode_aggregate_tok_s: steady_decode_rate(&token_times),
        per_stream_tok_s: per_stream,
        ttft_p50_ms: p50,
        ttft_p99_ms: p99,
        stage_busy: Vec::new(),
        stage_hop_ms: Vec::new(),
    })
}
