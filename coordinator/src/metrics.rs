//! The coordinator's Prometheus metrics (served at `/metrics` on the HTTP port).
//!
//! Request metrics are recorded where requests cross the boundary (`service.rs` observes each
//! request's event stream, whichever API it came from); stage timings where the scheduler receives
//! a step's result; queue depth, active sequences and worker up/down are read from the scheduler
//! when scraped, so they are never stale.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::scheduler::SchedulerStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `grpc` or `openai`.
    api: &'static str,
    /// The client API key's name (`-` on an open port).
    key: String,
    /// A finish reason (`eos`, `length`, `stop`, `context`), `cancelled`, or the gRPC code of a
    /// failure (`invalid_argument`, `resource_exhausted`, `unavailable`, ...).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    stage: String,
    worker: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the coordinator exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    prefix_hits: Counter,
    cached_tokens: Counter,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    request_duration: Histogram,
    queue_depth: Gauge,
    active_sequences: Gauge,
    stage_forward: HistogramFamily<StageLabels>,
    stage_hop: HistogramFamily<StageLabels>,
    worker_up: Family<WorkerLabels, Gauge>,
    weight_bytes_sent: Family<WorkerAddress, Counter>,
    weight_blobs: Family<BlobLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerAddress {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlobLabels {
    worker: String,
    /// `hit` (the worker's cache held it) or `sent`.
    outcome: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// 100 µs to ~105 s in factors of 2: decode steps on a GPU to long prompts on a slow CPU.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 21))
}

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Grpc,
    OpenAi,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::OpenAi => "openai",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strata");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Generation requests by API and how they ended",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of accepted requests",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated and streamed to clients",
            generated_tokens.clone(),
        );
        let prefix_hits = Counter::default();
        registry.register(
            "prefix_cache_hits",
            "Requests that started on a prefix the stages held from an earlier one",
            prefix_hits.clone(),
        );
        let cached_tokens = Counter::default();
        registry.register(
            "prefix_cached_tokens",
            "Prompt tokens copied from the prefix cache instead of computed",
            cached_tokens.clone(),
        );
        let time_to_first_token = latency_histogram();
        registry.register_with_unit(
            "time_to_first_token",
            "From a request's arrival to its first token",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let inter_token_latency = latency_histogram();
        registry.register_with_unit(
            "inter_token_latency",
            "Between consecutive tokens of one request",
            Unit::Seconds,
            inter_token_latency.clone(),
        );
        let request_duration = latency_histogram();
        registry.register_with_unit(
            "request_duration",
            "From arrival to the last token of requests that finished",
            Unit::Seconds,
            request_duration.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a place in the running batch",
            queue_depth.clone(),
        );
        let active_sequences = Gauge::default();
        registry.register(
            "active_sequences",
            "Sequences in the running batch",
            active_sequences.clone(),
        );
        let stage_forward: HistogramFamily<StageLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "stage_forward",
            "Device time of one stage for one micro-batch, as the worker reports it",
            Unit::Seconds,
            stage_forward.clone(),
        );
        let stage_hop: HistogramFamily<StageLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "stage_hop",
            "Round trip to one stage minus its device time: network, serialization, queueing",
            Unit::Seconds,
            stage_hop.clone(),
        );
        let worker_up = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "worker_up",
            "1 while the stage's worker serves, 0 while it is lost",
            worker_up.clone(),
        );
        let weight_bytes_sent = Family::<WorkerAddress, Counter>::default();
        registry.register_with_unit(
            "weight_sent",
            "Weight bytes sent to workers without the model file",
            Unit::Bytes,
            weight_bytes_sent.clone(),
        );
        let weight_blobs = Family::<BlobLabels, Counter>::default();
        registry.register(
            "weight_blobs",
            "Tensors (and model headers) a stage needed, by whether the worker's cache held them",
            weight_blobs.clone(),
        );
        Self {
            registry,
            prefix_hits,
            cached_tokens,
            weight_bytes_sent,
            weight_blobs,
            requests,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            inter_token_latency,
            request_duration,
            queue_depth,
            active_sequences,
            stage_forward,
            stage_hop,
            worker_up,
        }
    }

    /// A request ended (or was refused) with `outcome`.
    pub fn request_ended(&self, api: Api, key: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                api: api.label(),
                key: key.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn request_accepted(&self, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// A token reached its client `elapsed` after the request arrived; `since_previous` is the gap
    /// to the request's previous token (`None` for its first).
    pub fn token(&self, elapsed: f64, since_previous: Option<f64>) {
        self.generated_tokens.inc();
        match since_previous {
            None => self.time_to_first_token.observe(elapsed),
            Some(gap) => self.inter_token_latency.observe(gap),
        }
    }

    pub fn request_finished(&self, total_seconds: f64) {
        self.request_duration.observe(total_seconds);
    }

    /// A request's first step ran on `tokens` positions copied from the prefix cache.
    pub fn prefix_hit(&self, tokens: usize) {
        self.prefix_hits.inc();
        self.cached_tokens.inc_by(tokens as u64);
    }

    /// One step's timings on stage `stage`.
    pub fn stage_step(&self, stage: usize, forward_seconds: f64, hop_seconds: f64) {
        let labels = StageLabels {
            stage: stage.to_string(),
        };
        self.stage_forward
            .get_or_create(&labels)
            .observe(forward_seconds);
        self.stage_hop.get_or_create(&labels).observe(hop_seconds);
    }

    /// Weights went to `worker`: `bytes` sent, `hits` blobs its cache held, `sent` blobs it lacked.
    pub fn weights_sent(&self, worker: &str, bytes: u64, hits: u64, sent: u64) {
        let worker = worker.to_string();
        self.weight_bytes_sent
            .get_or_create(&WorkerAddress {
                worker: worker.clone(),
            })
            .inc_by(bytes);
        for (outcome, n) in [("hit", hits), ("sent", sent)] {
            self.weight_blobs
                .get_or_create(&BlobLabels {
                    worker: worker.clone(),
                    outcome,
                })
                .inc_by(n);
        }
    }

    /// The text exposition, with the gauges read from `stats` now.
    pub fn render(&self, stats: &SchedulerStats) -> String {
        self.queue_depth.set(stats.queued as i64);
        self.active_sequences.set(stats.active as i64);
        // A stage that moved to a spare must not leave its old worker's series behind.
        self.worker_up.clear();
        for (i, stage) in stats.pipeline.stages().iter().enumerate() {
            let up = stats.lost_stage != Some(i);
            self.worker_up
                .get_or_create(&WorkerLabels {
                    stage: i.to_string(),
                    worker: stage.address.clone(),
                })
                .set(i64::from(up));
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_appear_under_their_names() {
        let m = Metrics::new();
        m.request_accepted(7);
        m.token(0.25, None);
        m.token(0.30, Some(0.05));
        m.request_ended(Api::OpenAi, "alice", "length");
        m.stage_step(1, 0.01, 0.002);
        m.weights_sent("w:1", 4096, 3, 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        for line in [
            "strata_requests_total{api=\"openai\",key=\"alice\",outcome=\"length\"} 1",
            "strata_prompt_tokens_total 7",
            "strata_generated_tokens_total 2",
            "strata_time_to_first_token_seconds_count 1",
            "strata_inter_token_latency_seconds_count 1",
            "strata_stage_forward_seconds_count{stage=\"1\"} 1",
            "strata_weight_sent_bytes_total{worker=\"w:1\"} 4096",
            "strata_weight_blobs_total{worker=\"w:1\",outcome=\"hit\"} 3",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
