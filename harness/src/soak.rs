//! The soak test: many concurrent clients, each sending a run of requests with random prompts and
//! lengths, some hanging up mid-stream; then checks that every completed request is what the prompt
//! gives alone (greedy), that none was lost, and that the workers are back to where they started
//! (no active sequences, memory within a bound of the after-warmup figure).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use strata_model::rng::SplitMix64;

use crate::local::LocalCluster;
use strata_client::{ClientError, Event, FinishReason, GenerateParams, StrataClient};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub clients: usize,
    pub requests_per_client: usize,
    /// Fraction of requests whose client hangs up after a few tokens.
    pub cancel_fraction: f64,
    /// New tokens per request are drawn from 1..=max_tokens.
    pub max_tokens: u32,
    /// Distinct prompts (each one's solo output is computed once).
    pub prompts: usize,
    pub seed: u64,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub clients: usize,
    pub requests: usize,
    pub completed: usize,
    pub cancelled: usize,
    /// Completed requests whose tokens differ from the prompt's solo output.
    pub wrong: usize,
    /// Requests that ended in an error or without a final event.
    pub lost: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Active sequences per stage after the run (must be 0).
    pub active_after: Vec<u32>,
    /// Worker resident memory after warmup and after the run, MiB (Linux only).
    pub rss_after_warmup_mib: Vec<f64>,
    pub rss_after_mib: Vec<f64>,
    /// Largest relative growth over all workers.
    pub rss_growth: f64,
    pub problems: Vec<String>,
}

impl SoakReport {
    /// No lost or wrong request, caches all freed, memory within `rss_tolerance` of the baseline.
    pub fn passed(&self, rss_tolerance: f64) -> bool {
        self.wrong == 0
            && self.lost == 0
            && self.active_after.iter().all(|&a| a == 0)
            && self.rss_growth <= rss_tolerance
    }

    pub fn render(&self) -> String {
        format!(
            "soak: {} clients, {} requests: {} completed, {} cancelled, {} wrong, {} lost; {} tokens in {:.1} s ({:.1} tok/s)\n\
             active sequences after: {:?}; worker RSS MiB after warmup {:?} -> after {:?} (growth {:.1}%)",
            self.clients,
            self.requests,
            self.completed,
            self.cancelled,
            self.wrong,
            self.lost,
            self.tokens,
            self.seconds,
            self.tokens_per_second,
            self.active_after,
            self.rss_after_warmup_mib,
            self.rss_after_mib,
            self.rss_growth * 100.0
        )
    }
}

const WORDS: [&str; 24] = [
    "the", "river", "quiet", "engine", "over", "a", "mountain", "little", "robot", "paper", "sang",
    "under", "bright", "city", "of", "glass", "and", "slowly", "wind", "carried", "old", "stories",
    "to", "children",
];

fn prompts(rng: &mut SplitMix64, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let words = 2 + rng.below(40);
            (0..words)
                .map(|_| WORDS[rng.below(WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Resident memory of a process, MiB (Linux `/proc`; `None` elsewhere).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

enum Outcome {
    Completed {
        ids: Vec<u32>,
        prompt: usize,
        max: u32,
        reason: FinishReason,
    },
    Cancelled,
    Lost(String),
}

/// Runs the soak against `cluster` (already warmed up).
pub async fn soak(
    cluster: &mut LocalCluster,
    options: &SoakOptions,
) -> Result<SoakReport, ClientError> {
    let client = cluster.client().await?;
    let mut rng = SplitMix64::new(options.seed);
    let prompts = prompts(&mut rng, options.prompts.max(1));
    let greedy = |max_tokens: u32| GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    };
    // Each prompt alone, to the longest length any request asks for.
    let mut solo = Vec::with_capacity(prompts.len());
    for p in &prompts {
        solo.push(
            client
                .generate_collect(p, &greedy(options.max_tokens))
                .await?,
        );
    }
    let pids: Vec<u32> = cluster
        .workers_mut()
        .iter()
        .filter_map(|w| w.pid())
        .collect();
    let rss_before: Vec<f64> = pids.iter().filter_map(|&p| rss_mib(p)).collect();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..options.clients {
        let client = client.clone();
        let mut rng =
            SplitMix64::new(options.seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let options = options.clone();
        let prompt_texts = prompts.clone();
        let solo_lengths: Vec<usize> = solo.iter().map(|g| g.token_ids.len()).collect();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..options.requests_per_client {
                let prompt = rng.below(prompt_texts.len());
                let max = 1 + rng.below(options.max_tokens as usize) as u32;
                // Hang up before the last token the request will get (its prompt may end sooner
                // than `max`), so every request picked for cancelling is cancelled mid-stream.
                let length = solo_lengths[prompt].min(max as usize).max(1);
                let cancel_after =
                    (rng.uniform() < options.cancel_fraction).then(|| 1 + rng.below(length) as u32);
                outcomes.push(
                    one_request(&client, &prompt_texts[prompt], prompt, max, cancel_after).await,
                );
            }
            outcomes
        }));
    }
    let mut report = SoakReport {
        clients: options.clients,
        requests: options.clients * options.requests_per_client,
        completed: 0,
        cancelled: 0,
        wrong: 0,
        lost: 0,
        tokens: 0,
        seconds: 0.0,
        tokens_per_second: 0.0,
        active_after: Vec::new(),
        rss_after_warmup_mib: rss_before.clone(),
        rss_after_mib: Vec::new(),
        rss_growth: 0.0,
        problems: Vec::new(),
    };
    for task in tasks {
        let outcomes = task
            .await
            .map_err(|e| ClientError::Protocol(format!("a soak client panicked: {e}")))?;
        for outcome in outcomes {
            match outcome {
                Outcome::Completed {
                    ids,
                    prompt,
                    max,
                    reason,
                } => {
                    report.completed += 1;
                    report.tokens += ids.len();
                    let expected = &solo[prompt].token_ids;
                    let want = expected.len().min(max as usize);
                    if ids[..] != expected[..want] {
                        report.wrong += 1;
                        report.problems.push(format!(
                            "prompt {prompt}, max {max} ({}): got {ids:?}, alone it gives {:?}",
                            reason.as_str(),
                            &expected[..want]
                        ));
                    }
                }
                Outcome::Cancelled => report.cancelled += 1,
                Outcome::Lost(why) => {
                    report.lost += 1;
                    report.problems.push(why);
                }
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.tokens_per_second = report.tokens as f64 / report.seconds;

    // Cancelled streams are released within a step; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = client.info().await?;
        report.active_after = info.stages.iter().map(|s| s.active_sequences).collect();
        if report.active_after.iter().all(|&a| a == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.rss_after_mib = pids.iter().filter_map(|&p| rss_mib(p)).collect();
    report.rss_growth = report
        .rss_after_warmup_mib
        .iter()
        .zip(&report.rss_after_mib)
        .map(|(before, after)| (after - before) / before)
        .fold(0.0, f64::max);
    Ok(report)
}

async fn one_request(
    client: &StrataClient,
    text: &str,
    prompt: usize,
    max: u32,
    cancel_after: Option<u32>,
) -> Outcome {
    let params = GenerateParams {
        max_tokens: max,
        ..GenerateParams::default()
    };
    let mut stream = match client.generate(text, &params).await {
        Ok(s) => s,
        Err(e) => return Outcome::Lost(format!("prompt {prompt}: refused: {e}")),
    };
    let mut ids = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Token(t)) => {
                ids.push(t.id);
                if cancel_after.is_some_and(|n| ids.len() as u32 >= n) {
                    return Outcome::Cancelled;
                }
            }
            Ok(Event::Finished(f)) => {
                return Outcome::Completed {
                    ids,
                    prompt,
                    max,
                    reason: f.reason,
                }
            }
            Err(e) => return Outcome::Lost(format!("prompt {prompt}: {e}")),
        }
    }
    Outcome::Lost(format!(
        "prompt {prompt}: the stream ended without a final event"
    ))
}
