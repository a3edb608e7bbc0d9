//! Benchmarks shared by `strata bench` and the examples.

use serde::Serialize;

use crate::profile::{prompt_of_length, ProfileError};
use crate::{GenerateParams, LocalCluster, LocalOptions, StrataClient};

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
        worker_flags: &["--no-rope-reuse"],
        warmup: true,
    },
    Variant {
        name: "mask cache off",
        worker_flags: &["--no-mask-reuse"],
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
            let client = StrataClient::connect(cluster.url()).await?;
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
}
