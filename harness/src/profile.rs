//! Measuring a pipeline the way the original design's profiler did: TTFT, throughput and per-token
//! latency percentiles, per phase (cold vs warm start, output and input length scaling, sustained
//! load, batches), plus per-stage device time and hop overhead as the workers report them.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{LocalCluster, LocalOptions};
use strata_client::{ClientError, GenerateParams, Generation, StrataClient};

/// What to profile.
// Built once per profile run: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Target {
    /// Fresh local clusters (needed for the cold and warm start phases).
    Local(LocalOptions),
    /// A running coordinator, and the TLS and token to reach it with.
    Remote(String, strata_transport::Security),
}

/// The summary the original profiler printed at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub cold_ttft_ms: Option<f64>,
    pub warm_ttft_ms: Option<f64>,
    pub warmup_benefit_ms: Option<f64>,
    pub peak_throughput_tok_s: f64,
    pub sustained_throughput_tok_s: Option<f64>,
    pub batch_throughput_tok_s: Option<f64>,
}

impl Summary {
    pub fn of(phases: &[PhaseReport]) -> Self {
        let find = |prefix: &str| phases.iter().find(|p| p.phase.starts_with(prefix));
        let cold = find("cold").map(|p| p.ttft_ms);
        let warm = find("warm").map(|p| p.ttft_ms);
        Self {
            cold_ttft_ms: cold,
            warm_ttft_ms: warm,
            warmup_benefit_ms: cold.zip(warm).map(|(c, w)| c - w),
            peak_throughput_tok_s: phases
                .iter()
                .map(|p| p.throughput_tok_s)
                .fold(0.0, f64::max),
            sustained_throughput_tok_s: find("sustained").map(|p| p.throughput_tok_s),
            batch_throughput_tok_s: find("batch").map(|p| p.throughput_tok_s),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::from("=== summary ===\n");
        if let (Some(c), Some(w)) = (self.cold_ttft_ms, self.warm_ttft_ms) {
            out += &format!(
                "  warmup benefit: cold TTFT {c:.1} ms, warm TTFT {w:.1} ms: {:.1} ms ({:.0}%) faster\n",
                c - w,
                (c - w) / c * 100.0
            );
        }
        out += &format!(
            "  peak throughput {:.2} tokens/s; sustained {:.2}; batch {:.2}",
            self.peak_throughput_tok_s,
            self.sustained_throughput_tok_s.unwrap_or(0.0),
            self.batch_throughput_tok_s.unwrap_or(0.0)
        );
        out
    }
}

/// An error of a profile run.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("local cluster: {0}")]
    Cluster(String),
}

/// Fresh clusters per cold and warm start phase.
const COLD_WARM_ROUNDS: usize = 3;

fn params(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

/// Runs every phase: cold and warm start (local only; the first request on fresh workers, 3 times), output lengths 5/10/20/50, input lengths
/// 4/8/16/128/512, 10 sequential requests, and `batch` requests at once. `on_phase` sees each report
/// as soon as it is measured.
pub async fn profile(
    target: Target,
    batch: usize,
    mut on_phase: impl FnMut(&PhaseReport),
) -> Result<Vec<PhaseReport>, ProfileError> {
    let mut phases = Vec::new();
    let mut record = |r: PhaseReport, phases: &mut Vec<PhaseReport>| {
        on_phase(&r);
        phases.push(r);
    };
    let short = "The quick brown fox jumps over the lazy dog".to_string();
    let mut cluster: Option<LocalCluster> = None;
    let client = match target {
        Target::Remote(url, security) => StrataClient::connect_with(&url, &security).await?,
        Target::Local(options) => {
            // A first request on fresh workers, with and without warmup, several times interleaved:
            // one sample each would be at the mercy of the machine's noise.
            let (mut cold, mut warm) = (Vec::new(), Vec::new());
            let mut wall = [Duration::ZERO; 2];
            for round in 0..COLD_WARM_ROUNDS {
                for (i, warmup) in [false, true].into_iter().enumerate() {
                    let c = LocalCluster::start(LocalOptions {
                        warmup,
                        ..options.clone()
                    })
                    .await
                    .map_err(ProfileError::Cluster)?;
                    let client = c.client().await?;
                    let started = Instant::now();
                    let g = client.generate_collect(&short, &params(10)).await?;
                    wall[i] += started.elapsed();
                    if warmup {
                        warm.push(g)
                    } else {
                        cold.push(g)
                    }
                    if warmup && round + 1 == COLD_WARM_ROUNDS {
                        cluster = Some(c);
                    } else {
                        c.stop().await.map_err(ProfileError::Cluster)?;
                    }
                }
            }
            record(
                PhaseReport::from_generations("cold start (no warmup)", &cold, wall[0]),
                &mut phases,
            );
            record(
                PhaseReport::from_generations("warm start", &warm, wall[1]),
                &mut phases,
            );
            cluster.as_ref().expect("the warm cluster").client().await?
        }
    };
    for n in [5u32, 10, 20, 50] {
        let phase = format!("output length {n}");
        record(
            sequential(&client, &phase, std::slice::from_ref(&short), &params(n)).await?,
            &mut phases,
        );
    }
    for n in [4usize, 8, 16, 128, 512] {
        let prompt = prompt_of_length(&client, n).await?;
        record(
            sequential(
                &client,
                &format!("input length {n}"),
                &[prompt],
                &params(10),
            )
            .await?,
            &mut phases,
        );
    }
    let sustained: Vec<String> = (0..10).map(|i| format!("{short}, number {i}.")).collect();
    record(
        sequential(
            &client,
            "sustained (10 sequential)",
            &sustained,
            &params(20),
        )
        .await?,
        &mut phases,
    );
    let prompts: Vec<String> = (0..batch)
        .map(|i| format!("Story {i}: once upon a time"))
        .collect();
    record(
        concurrent(
            &client,
            &format!("batch ({batch} at once)"),
            &prompts,
            &params(20),
        )
        .await?,
        &mut phases,
    );
    if let Some(c) = cluster {
        c.stop().await.map_err(ProfileError::Cluster)?;
    }
    Ok(phases)
}

/// The measurements of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: String,
    pub requests: usize,
    /// Mean prompt length in tokens.
    pub input_tokens: f64,
    /// Generated tokens over all requests.
    pub output_tokens: usize,
    /// Mean time to first token.
    pub ttft_ms: f64,
    /// Wall time of the phase.
    pub total_ms: f64,
    /// Generated tokens over wall time.
    pub throughput_tok_s: f64,
    /// Per-token latency: gaps between consecutive tokens of a request (TTFT not included).
    pub latency_mean_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_p99_ms: f64,
    /// Device time per stage, summed over the phase's requests (shared steps count once per request).
    pub stage_forward_ms: Vec<f64>,
    /// Hop overhead per stage (coordinator round trip minus device time), summed likewise.
    pub stage_hop_ms: Vec<f64>,
}

impl PhaseReport {
    /// Builds the report of a phase from its generations and wall time.
    pub fn from_generations(phase: &str, generations: &[Generation], wall: Duration) -> Self {
        let n = generations.len().max(1) as f64;
        let output_tokens: usize = generations.iter().map(|g| g.token_ids.len()).sum();
        let mut gaps: Vec<f64> = generations
            .iter()
            .flat_map(|g| {
                g.token_times
                    .windows(2)
                    .map(|w| (w[1].saturating_sub(w[0])).as_secs_f64() * 1e3)
            })
            .collect();
        gaps.sort_by(f64::total_cmp);
        let stages = generations
            .iter()
            .map(|g| g.stage_forward.len())
            .max()
            .unwrap_or(0);
        let sum_stage = |pick: fn(&Generation) -> &Vec<Duration>| -> Vec<f64> {
            (0..stages)
                .map(|i| {
                    generations
                        .iter()
                        .filter_map(|g| pick(g).get(i))
                        .map(|d| d.as_secs_f64() * 1e3)
                        .sum()
                })
                .collect()
        };
        let wall_s = wall.as_secs_f64();
        Self {
            phase: phase.to_string(),
            requests: generations.len(),
            input_tokens: generations
                .iter()
                .map(|g| g.prompt_ids.len() as f64)
                .sum::<f64>()
                / n,
            output_tokens,
            ttft_ms: generations
                .iter()
                .map(|g| g.ttft.as_secs_f64() * 1e3)
                .sum::<f64>()
                / n,
            total_ms: wall_s * 1e3,
            throughput_tok_s: if wall_s > 0.0 {
                output_tokens as f64 / wall_s
            } else {
                0.0
            },
            latency_mean_ms: if gaps.is_empty() {
                0.0
            } else {
                gaps.iter().sum::<f64>() / gaps.len() as f64
            },
            latency_p50_ms: percentile(&gaps, 50.0),
            latency_p95_ms: percentile(&gaps, 95.0),
            latency_p99_ms: percentile(&gaps, 99.0),
            stage_forward_ms: sum_stage(|g| &g.stage_forward),
            stage_hop_ms: sum_stage(|g| &g.stage_hop),
        }
    }

    /// A few lines for people.
    pub fn render(&self) -> String {
        let stages = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        format!(
            "=== {} ===\n  requests {}, input {:.0} tokens, output {} tokens\n  TTFT {:.1} ms, total {:.1} ms, throughput {:.2} tokens/s\n  per-token latency: mean {:.2} ms, P50 {:.2}, P95 {:.2}, P99 {:.2}\n  per-stage forward ms: {}   hop ms: {}",
            self.phase,
            self.requests,
            self.input_tokens,
            self.output_tokens,
            self.ttft_ms,
            self.total_ms,
            self.throughput_tok_s,
            self.latency_mean_ms,
            self.latency_p50_ms,
            self.latency_p95_ms,
            self.latency_p99_ms,
            stages(&self.stage_forward_ms),
            stages(&self.stage_hop_ms),
        )
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs requests one after another and reports them as one phase.
pub async fn sequential(
    client: &StrataClient,
    phase: &str,
    prompts: &[String],
    params: &GenerateParams,
) -> Result<PhaseReport, ClientError> {
    let started = Instant::now();
    let mut generations = Vec::with_capacity(prompts.len());
    for p in prompts {
        generations.push(client.generate_collect(p, params).await?);
    }
    Ok(PhaseReport::from_generations(
        phase,
        &generations,
        started.elapsed(),
    ))
}

/// Runs requests all at once and reports them as one phase.
pub async fn concurrent(
    client: &StrataClient,
    phase: &str,
    prompts: &[String],
    params: &GenerateParams,
) -> Result<PhaseReport, ClientError> {
    let started = Instant::now();
    let generations = client
        .generate_batch(prompts, params)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PhaseReport::from_generations(
        phase,
        &generations,
        started.elapsed(),
    ))
}

/// A natural-language prompt of about `tokens` tokens (never fewer), built from whole words so that it
/// tokenizes like real text. Uses the coordinator's tokenizer.
pub async fn prompt_of_length(client: &StrataClient, tokens: usize) -> Result<String, ClientError> {
    const TEXT: &str = "The history of the river valley begins with the small farming villages that \
        grew along its banks, where people raised wheat and barley, kept goats, and traded pottery with \
        their neighbours upstream. Over many centuries the villages became towns, the towns built walls, \
        and the river carried boats loaded with grain, timber and stone toward the sea.";
    let words: Vec<&str> = TEXT.split_whitespace().collect();
    let mut text = String::new();
    let mut count = 0;
    // Grow word by word; tokenize in chunks to keep the number of calls small.
    let mut i = 0;
    while count < tokens {
        let step = ((tokens - count) / 2).max(1);
        for _ in 0..step {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(words[i % words.len()]);
            i += 1;
        }
        count = client.tokenize(&text).await?.len();
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 95.0), 95.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn phase_report_sums_tokens_and_gaps() {
        let ms = Duration::from_millis;
        let g = Generation {
            prompt_ids: vec![1, 2, 3, 4],
            token_ids: vec![5, 6, 7],
            text: String::new(),
            finish_reason: strata_client::FinishReason::Length,
            ttft: ms(100),
            total: ms(140),
            token_times: vec![ms(100), ms(110), ms(140)],
            logprobs: vec![-0.5, -1.0, -0.25],
            top_logprobs: vec![],
            stage_forward: vec![ms(30), ms(40)],
            stage_hop: vec![ms(1), ms(2)],
            cached_tokens: 0,
        };
        let r = PhaseReport::from_generations("x", &[g.clone(), g], ms(300));
        assert_eq!(r.output_tokens, 6);
        assert_eq!(r.input_tokens, 4.0);
        assert!((r.throughput_tok_s - 20.0).abs() < 1e-9);
        assert!((r.latency_mean_ms - 20.0).abs() < 1e-9);
        assert_eq!(r.latency_p50_ms, 10.0);
        assert_eq!(r.latency_p99_ms, 30.0);
        assert_eq!(r.stage_forward_ms, vec![60.0, 80.0]);
        assert_eq!(r.stage_hop_ms, vec![2.0, 4.0]);
    }
}
