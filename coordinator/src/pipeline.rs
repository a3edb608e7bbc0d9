//! The workers as a pipeline: connecting, loading stages, and pushing one micro-batch through every
//! stage in order. Activations pass through the coordinator untouched (the wire tensor a stage returns
//! is the wire tensor the next stage receives).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_transport::AuthChannel;

use crate::forward_link::ForwardLink;
use crate::send_weights::WeightSender;
use crate::CoordinatorError;

mod connect;
mod sampling;
#[cfg(test)]
mod tests;

pub use connect::{check_fingerprint, connect, load_stage, ConnectedWorker};
pub use sampling::{Sampled, Sampling};

/// How long a `Release` or an `Info` fan-out waits for one worker: a hung worker must not hold
/// up finishing requests (their final events follow the release) or `Info`.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// One worker and the layers it runs.
#[derive(Debug, Clone)]
pub struct StageHandle {
    /// The address the user gave.
    pub address: String,
    pub client: WorkerClient<AuthChannel>,
    /// The stage's long-lived Forward stream.
    pub link: Arc<ForwardLink>,
    pub device: String,
    /// The worker's physical device (`WorkerInfo.physical_device`): stages with the same
    /// non-empty one take turns on one device.
    pub physical_device: String,
    pub layers: Range<usize>,
    /// The epoch the worker gave this load: every Forward and Release carries it, and a worker
    /// reporting another one has been loaded by someone else since.
    pub epoch: u64,
    /// Bytes of weights the stage holds on its device.
    pub weight_bytes: u64,
    /// What one Forward may carry here (`WorkerInfo`; `usize::MAX` where the worker does not say).
    pub limits: StageLimits,
}

/// A worker's bounds on one Forward, as its `Info` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageLimits {
    /// Positions over all the step's sequences.
    pub max_batch_rows: usize,
    /// Sequences holding a KV cache at once.
    pub max_sequences: usize,
}

impl StageLimits {
    pub fn of(info: &v1::WorkerInfo) -> Self {
        let bound = |v: u32| if v == 0 { usize::MAX } else { v as usize };
        Self {
            max_batch_rows: bound(info.max_batch_rows),
            max_sequences: bound(info.max_sequences),
        }
    }

    /// The tighter of two stages' bounds: what a micro-batch through both must keep to.
    pub fn min(self, other: Self) -> Self {
        Self {
            max_batch_rows: self.max_batch_rows.min(other.max_batch_rows),
            max_sequences: self.max_sequences.min(other.max_sequences),
        }
    }
}

/// One sequence's part of a step, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct StepEntry {
    pub seq_id: u64,
    pub start_pos: u32,
    pub tokens: Vec<u32>,
    pub sampling: Sampling,
    pub top_logprobs: u32,
    /// The sequence's tokens so far as `(id, times generated)`, when its sampling penalizes them.
    pub seen: Vec<(u32, u32)>,
    /// The request it serves, for the workers' logs (sent with a sequence's first step).
    pub request_id: Option<Arc<str>>,
    /// A grammar's bitmask of the tokens the last stage may sample; empty: any.
    pub allowed: Vec<u32>,
    /// The parked sequence whose first `start_pos` positions this new sequence copies.
    pub copy_from: Option<u64>,
}

/// What a step produced: one sampled token per entry, plus timings.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub sampled: Vec<(u64, Sampled)>,
    /// Per stage: time the worker reported for the forward.
    pub stage_forward: Vec<Duration>,
    /// Per stage: round trip as seen by the coordinator (forward plus hop).
    pub stage_round_trip: Vec<Duration>,
    /// Parked sequences some stage dropped for room during the step.
    pub evicted: Vec<u64>,
}

/// Running totals of one stage's work, shared by every clone of the pipeline.
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Device time the worker reported, over all steps.
    pub forward_ns: AtomicU64,
    /// Round trips seen by the coordinator, over all steps.
    pub round_trip_ns: AtomicU64,
    pub steps: AtomicU64,
}

/// The stages in order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    stages: Vec<StageHandle>,
    counters: Arc<Vec<StageCounters>>,
    /// Bumped each time a stage moves to another worker; caches made under an older generation are
    /// incomplete.
    generation: u64,
    /// The longest a stage may take to answer one Forward before it counts as lost.
    stage_timeout: Duration,
}

impl Pipeline {
    /// Loads `plan[i]` on `workers[i]`, all at once (sending weights from `weights` to workers
    /// without the model file).
    pub async fn load(
        workers: Vec<ConnectedWorker>,
        plan: &[Range<usize>],
        fingerprint: &str,
        hidden_dtype: v1::DType,
        stage_timeout: Duration,
        weights: Option<&Arc<WeightSender>>,
    ) -> Result<Self, CoordinatorError> {
        let loads = workers
            .into_iter()
            .zip(plan)
            .enumerate()
            .map(|(i, (w, range))| {
                load_stage(i, w, range.clone(), fingerprint, hidden_dtype, weights)
            });
        let stages = try_join_all(loads).await?;
        let counters = Arc::new(stages.iter().map(|_| StageCounters::default()).collect());
        Ok(Self {
            stages,
            counters,
            generation: 0,
            stage_timeout,
        })
    }

    /// The same pipeline with stage `index` on another worker (its busy counters carry on).
    pub fn with_stage(&self, index: usize, stage: StageHandle) -> Self {
        let mut next = self.clone();
        next.stages[index] = stage;
        next.generation += 1;
        next
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Asks every stage's worker for `Health` and `Info` (within `timeout` each); the first stage
    /// that does not answer `SERVING` with the planned layers and epoch, why, and whether it merely did not answer in time (a busy host) rather
    /// than refusing or saying it lost its stage.
    pub async fn first_unhealthy(&self, timeout: Duration) -> Option<(usize, String, bool)> {
        let calls = self.stages.iter().map(|s| {
            let mut client = s.client.clone();
            async move {
                match tokio::time::timeout(timeout, client.health(v1::HealthRequest {})).await {
                    Err(_) => Some((format!("no answer to Health within {timeout:?}"), true)),
                    Ok(Err(status)) => Some((status.message().to_string(), false)),
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        if r.status != v1::health_response::Status::Serving as i32 {
                            return Some((format!("not serving: {}", r.message), false));
                        }
                        // Serving, but perhaps another stage: someone else loaded it over ours.
                        let info = tokio::time::timeout(timeout, client.info(v1::InfoRequest {}));
                        match info.await {
                            Ok(Ok(info)) => {
                                let info = info.into_inner();
                                let loaded = info.loaded.map(|l| l.start as usize..l.end as usize);
                                if loaded.as_ref() != Some(&s.layers) {
                                    Some((
                                        format!(
                                            "it holds layers {loaded:?}, not the planned {:?} (loaded over by another coordinator?)",
                                            s.layers
                                        ),
                                        false,
                                    ))
                                } else if info.epoch != s.epoch {
                                    Some((
                                        "its stage was loaded again since this coordinator loaded it (by another coordinator?)".to_string(),
                                        false,
                                    ))
                                } else {
                                    None
                                }
                            }
                            Ok(Err(status)) => Some((status.message().to_string(), false)),
                            Err(_) => Some((format!("no answer to Info within {timeout:?}"), true)),
                        }
                    }
                }
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
            .find_map(|(i, problem)| problem.map(|(why, slow)| (i, why, slow)))
    }

    /// Per stage: how busy it has been since the pipeline was loaded.
    pub fn counters(&self) -> &[StageCounters] {
        &self.counters
    }

    pub fn stages(&self) -> &[StageHandle] {
        &self.stages
    }

    /// The bounds every stage keeps to: a micro-batch within them is never refused for its size.
    pub fn limits(&self) -> StageLimits {
        self.stages.iter().map(|s| s.limits).fold(
            StageLimits {
                max_batch_rows: usize::MAX,
                max_sequences: usize::MAX,
            },
            StageLimits::min,
        )
    }

    /// How many micro-batches the pipeline can compute at once: one per device (see
    /// [`devices_in_parallel`]).
    pub fn parallel_micro_batches(&self) -> usize {
        devices_in_parallel(self.stages.iter().map(|s| s.physical_device.as_str()))
    }

    /// Runs `Warmup` on every stage at once; returns each stage's warmup time.
    pub async fn warmup(&self) -> Result<Vec<Duration>, CoordinatorError> {
        let calls = self.stages.iter().enumerate().map(|(i, s)| {
            let mut client = s.client.clone();
            async move {
                let r = client
                    .warmup(v1::WarmupRequest { tokens: 0 })
                    .await
                    .map_err(|status| CoordinatorError::stage(i, &s.address, status))?;
                Ok::<_, CoordinatorError>(Duration::from_nanos(r.into_inner().duration_ns))
            }
        });
        try_join_all(calls).await
    }

    /// Pushes one micro-batch through every stage in order.
    pub async fn step(
        &self,
        step_id: u64,
        entries: &[StepEntry],
    ) -> Result<StepResult, CoordinatorError> {
        let last = self.stages.len() - 1;
        let mut stage_forward = Vec::with_capacity(self.stages.len());
        let mut stage_round_trip = Vec::with_capacity(self.stages.len());
        let mut evicted = Vec::new();
        let mut inputs: Vec<Option<v1::sequence_input::Input>> = entries
            .iter()
            .map(|e| {
                Some(v1::sequence_input::Input::Tokens(v1::TokenIds {
                    ids: e.tokens.clone(),
                }))
            })
            .collect();
        for (i, stage) in self.stages.iter().enumerate() {
            let sequences = entries
                .iter()
                .zip(inputs.iter_mut())
                .map(|(e, input)| v1::SequenceInput {
                    seq_id: e.seq_id,
                    start_pos: e.start_pos,
                    input: input.take(),
                    sampling: (i == last).then(|| (&e.sampling).into()),
                    top_logprobs: if i == last { e.top_logprobs } else { 0 },
                    seen: if i == last {
                        e.seen
                            .iter()
                            .map(|&(id, generated)| v1::TokenCount { id, generated })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    request_id: e.request_id.as_deref().unwrap_or_default().to_string(),
                    allowed_tokens: if i == last {
                        e.allowed.clone()
                    } else {
                        Vec::new()
                    },
                    copy_prefix_from: e.copy_from.unwrap_or(0),
                })
                .collect();
            let started = Instant::now();
            let request = v1::ForwardRequest {
                step_id,
                sequences,
                epoch: stage.epoch,
            };
            let response = tokio::time::timeout(self.stage_timeout, stage.link.forward(request))
                .await
                .map_err(|_| {
                    let waited = self.stage_timeout;
                    let status = tonic::Status::deadline_exceeded(format!(
                        "no answer to Forward within {waited:?}"
                    ));
                    CoordinatorError::stage(i, &stage.address, status)
                })?
                .map_err(|status| CoordinatorError::stage(i, &stage.address, status))?;
            let round_trip = started.elapsed();
            let counters = &self.counters[i];
            counters
                .forward_ns
                .fetch_add(response.forward_ns, Ordering::Relaxed);
            counters
                .round_trip_ns
                .fetch_add(round_trip.as_nanos() as u64, Ordering::Relaxed);
            counters.steps.fetch_add(1, Ordering::Relaxed);
            stage_round_trip.push(round_trip);
            stage_forward.push(Duration::from_nanos(response.forward_ns));
            evicted.extend_from_slice(&response.evicted);
            if response.outputs.len() != entries.len() {
                return Err(CoordinatorError::Protocol(format!(
                    "stage {i} ({}) returned {} outputs for {} sequences",
                    stage.address,
                    response.outputs.len(),
                    entries.len()
                )));
            }
            if i == last {
                let sampled = response
                    .outputs
                    .into_iter()
                    .zip(entries)
                    .map(|(o, e)| match o.output {
                        Some(v1::sequence_output::Output::Sampled(s)) if o.seq_id == e.seq_id => {
                            Ok((e.seq_id, Sampled::from(s)))
                        }
                        _ => Err(CoordinatorError::Protocol(format!(
                            "the last stage ({}) returned no token for sequence {}",
                            stage.address, e.seq_id
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(StepResult {
                    sampled,
                    stage_forward,
                    stage_round_trip,
                    evicted,
                });
            }
            for ((o, e), input) in response
                .outputs
                .into_iter()
                .zip(entries)
                .zip(inputs.iter_mut())
            {
                match o.output {
                    Some(v1::sequence_output::Output::Hidden(h)) if o.seq_id == e.seq_id => {
                        *input = Some(v1::sequence_input::Input::Hidden(h));
                    }
                    _ => {
                        return Err(CoordinatorError::Protocol(format!(
                            "stage {i} ({}) returned no hidden states for sequence {}",
                            stage.address, e.seq_id
                        )))
                    }
                }
            }
        }
        unreachable!("a pipeline has at least one stage")
    }

    /// Frees sequences on every stage. Failures are logged, not returned: a worker that cannot be
    /// reached has lost the caches anyway.
    pub async fn release(&self, seq_ids: Vec<u64>) {
        self.release_or_park(seq_ids, false).await;
    }

    /// Parks sequences on every stage (their caches stay, as prefix sources); returns the parked
    /// sequences any stage dropped to keep within its parking bound (these among them, on a stage
    /// that could not keep them, or one that failed to answer).
    pub async fn park(&self, seq_ids: Vec<u64>) -> Vec<u64> {
        self.release_or_park(seq_ids, true).await
    }

    async fn release_or_park(&self, seq_ids: Vec<u64>, park: bool) -> Vec<u64> {
        if seq_ids.is_empty() {
            return Vec::new();
        }
        let calls = self.stages.iter().map(|s| {
            let mut client = s.client.clone();
            let seq_ids = seq_ids.clone();
            async move {
                let call = client.release(v1::ReleaseRequest {
                    seq_ids: seq_ids.clone(),
                    epoch: s.epoch,
                    park,
                });
                let Ok(answer) = tokio::time::timeout(CONTROL_TIMEOUT, call).await else {
                    tracing::warn!(worker = %s.address, "release: no answer within {CONTROL_TIMEOUT:?}");
                    return seq_ids;
                };
                match answer {
                    Ok(response) => return response.into_inner().evicted,
                    // An unreachable worker holds no caches any more: nothing was lost.
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        tracing::debug!(worker = %s.address, error = %status.message(), "release: worker gone")
                    }
                    Err(status) => {
                        tracing::warn!(worker = %s.address, error = %status.message(), "release failed")
                    }
                }
                seq_ids
            }
        });
        let mut dropped: Vec<u64> = futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect();
        dropped.sort_unstable();
        dropped.dedup();
        dropped
    }

    /// Active-sequence counts per stage, for `Info`.
    pub async fn active_sequences(&self) -> Vec<Option<u32>> {
        let calls = self.stages.iter().map(|s| {
            let mut client = s.client.clone();
            async move {
                tokio::time::timeout(CONTROL_TIMEOUT, client.info(v1::InfoRequest {}))
                    .await
                    .ok()?
                    .ok()
                    .map(|r| r.into_inner().active_sequences)
            }
        });
        futures::future::join_all(calls).await
    }
}

/// The devices among stages with these physical devices: stages that name the same one take turns
/// on it, and a stage that names none (a CPU stage, or a worker that cannot say) has a device of
/// its own. Two micro-batches on one GPU would only take turns there, each with half the rows per
/// kernel launch, so the scheduler keeps one micro-batch in flight per device instead of per stage.
pub fn devices_in_parallel<'a>(physical: impl IntoIterator<Item = &'a str>) -> usize {
    let mut named = std::collections::HashSet::new();
    let mut own = 0;
    for id in physical {
        if id.is_empty() {
            own += 1;
        } else {
            named.insert(id);
        }
    }
    (own + named.len()).max(1)
}

/// How many of the workers with these physical devices compute on the same device as worker
/// `index` (itself included; 1 for a worker that names none).
pub fn sharing_a_device(physical: &[&str], index: usize) -> usize {
    match physical[index] {
        "" => 1,
        id => physical.iter().filter(|&&other| other == id).count(),
    }
}

/// The dtype stages return hidden states in: each stage's own compute dtype (unspecified), so a bf16
/// stage ships bf16 (half the bytes, no conversion kernels on either side) and the next stage converts
/// only if its dtype differs, exactly as it would from f32.
pub const HIDDEN_WIRE_DTYPE: v1::DType = v1::DType::DtypeUnspecified;

#[cfg(test)]
impl Pipeline {
    /// Stages on a loopback port nothing listens on: every call to a worker fails at once, so a
    /// test can drive the scheduler's own logic (queues, deadlines, outages) without workers.
    pub(crate) fn unreachable(plan: &[Range<usize>], stage_timeout: Duration) -> Self {
        let stages: Vec<StageHandle> = plan
            .iter()
            .map(|layers| StageHandle::unreachable(layers.clone()))
            .collect();
        Self {
            counters: Arc::new(stages.iter().map(|_| StageCounters::default()).collect()),
            stages,
            generation: 0,
            stage_timeout,
        }
    }
}

#[cfg(test)]
impl StageHandle {
    /// A stage on `127.0.0.1:1`, where nothing listens (see [`Pipeline::unreachable`]).
    pub(crate) fn unreachable(layers: Range<usize>) -> Self {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = WorkerClient::new(tonic::service::interceptor::InterceptedService::new(
            channel,
            strata_transport::ClientAuth::new(None),
        ));
        Self {
            address: "127.0.0.1:1".into(),
            link: Arc::new(ForwardLink::new(client.clone(), Duration::ZERO)),
            client,
            device: "cpu".into(),
            physical_device: String::new(),
            layers,
            epoch: 1,
            weight_bytes: 0,
            limits: StageLimits {
                max_batch_rows: usize::MAX,
                max_sequences: usize::MAX,
            },
        }
    }
}
