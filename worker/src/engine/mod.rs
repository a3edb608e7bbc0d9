//! The compute thread: one OS thread per worker owns the device, the stage and every sequence's cache.
//!
//! Tokio's threads only do I/O. Each request becomes a [`Job`] sent over a channel to this thread,
//! which answers on a oneshot channel. Owning all state on one thread means no locks around the
//! caches, and a request is validated against the exact state it will run on.
//!
//! - [`state`]: what the thread owns and how each job changes it (load, forward, release, warmup).
//! - [`validate`]: a micro-batch checked against the stage and the cached sequences, before anything changes.
//! - [`sample`]: the last stage's tokens from its logits; hidden states joined for upload.
//! - [`calibrate`]: probe stages timed for the planner.

use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use strata_model::ModelFile;
use tokio::sync::oneshot;

use crate::model::sampling::{Sampled, SamplingParams};
use crate::model::StageOptions;
use crate::WorkerError;

mod calibrate;
mod sample;
mod state;
#[cfg(test)]
mod tests;
mod validate;

use state::State;

/// The most top log-probabilities a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Limits that protect the worker from requests that are valid but too big.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences that may hold a cache at once.
    pub max_sequences: usize,
    /// Rows (new positions over all sequences) in one Forward.
    pub max_batch_rows: usize,
    /// Bytes all KV caches together may take; a Forward that could grow them past it is refused.
    /// `None`: half of what the device can give when the engine starts (a GPU's own memory on
    /// CUDA, the host's otherwise; see [`crate::device::memory`]).
    pub max_cache_bytes: Option<usize>,
    /// Bytes parked caches (kept after their sequence ends, as prefix sources) may take, within
    /// `max_cache_bytes`. `None`: a quarter of the KV bound, at most [`DEFAULT_MAX_PARKED_BYTES`].
    pub max_parked_bytes: Option<usize>,
    /// How long the compute thread polls for the next job before it sleeps; `None` chooses by
    /// device (see [`default_idle_spin`]).
    pub idle_spin: Option<Duration>,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_sequences: 256,
            max_batch_rows: 16_384,
            max_cache_bytes: None,
            max_parked_bytes: None,
            idle_spin: None,
        }
    }
}

/// The default bound on parked caches: enough for a few long conversations, not so much that an idle
/// worker sits on gigabytes of caches nobody asks for.
pub const DEFAULT_MAX_PARKED_BYTES: usize = 2 << 30;

/// [`strata_transport::spin::default_budget`]: 5 ms on accelerators, none on the CPU. A GPU stage's
/// compute thread only launches kernels, and a parked thread on the lent VMs took tens of µs to
/// wake: polling after each job cut each hop between
/// two stages on one H100 (1 ms: 0.20–0.21 vs 0.23–0.26 ms per hop, batch-1 speed +10–19% in two
/// alternated rounds). 5 ms rather than 1 covers the time a stage waits while the other stages of a
/// batch-1 pipeline work (~1.4 ms for two stages on an H100): 5 ms beat 1 ms in 4 of 5 alternated
/// rounds (median 317 vs 282 tok/s), for one host core kept busy while steps keep coming. A CPU
/// stage's compute thread needs its core for the matmuls of the other stages.
pub fn default_idle_spin(device: &Device) -> Duration {
    strata_transport::spin::default_budget(device.is_cpu())
}

/// What a sequence brings to a step.
#[derive(Debug)]
pub enum StepInput {
    Tokens(Vec<u32>),
    /// Hidden states `[n, hidden]` decoded from the wire, on the CPU.
    Hidden(Tensor),
}

impl StepInput {
    fn len(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(t) => t.dims().first().copied().unwrap_or(0),
        }
    }
}

/// One sequence's part of a micro-batch.
#[derive(Debug)]
pub struct SequenceStep {
    pub seq_id: u64,
    pub start_pos: usize,
    pub input: StepInput,
    /// Required on the last stage.
    pub sampling: Option<SamplingParams>,
    pub top_logprobs: usize,
    /// The tokens so far as `(id, times generated)`, each once, when `sampling` has penalties.
    pub seen: Vec<(u32, u32)>,
    /// A grammar's bitmask of the tokens sampling may choose (see `sampling::sample`); empty: any.
    pub allowed: Vec<u32>,
    /// A new sequence's first `start_pos` positions come from this held sequence's cache.
    pub copy_from: Option<u64>,
}

/// What a stage produced for one sequence.
#[derive(Debug)]
pub enum StepOutput {
    /// Hidden states `[n, hidden]` in the stage's output dtype, on the CPU.
    Hidden(Tensor),
    Sampled(Sampled),
}

/// The result of a Forward.
#[derive(Debug)]
pub struct ForwardResult {
    /// One output per input, in order.
    pub outputs: Vec<(u64, StepOutput)>,
    pub forward_time: Duration,
    /// Parked caches dropped to make room for the step.
    pub evicted: Vec<u64>,
}

/// What a Release did.
#[derive(Debug, Clone, Default)]
pub struct ReleaseReport {
    /// How many of the ids held a cache (active or parked).
    pub released: usize,
    /// Parked caches dropped to stay within the parking bound.
    pub evicted: Vec<u64>,
}

/// What a LoadStage did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Names this load: Forward and Release must carry it (see `StageEpoch`).
    pub epoch: u64,
    pub layers: Range<usize>,
    pub has_embedding: bool,
    pub has_head: bool,
    pub load_time: Duration,
    pub weight_bytes: usize,
}

/// The engine's state, for `Info`.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub loaded: Option<Range<usize>>,
    /// The loaded stage's epoch (0: none loaded).
    pub epoch: u64,
    pub active_sequences: usize,
    pub cached_positions: usize,
    pub cache_bytes: usize,
    pub parked_sequences: usize,
    pub parked_bytes: usize,
}

type Reply<T> = oneshot::Sender<Result<T, WorkerError>>;

enum Job {
    Load {
        layers: Range<usize>,
        output_dtype: Option<DType>,
        weights: Option<Box<ModelFile>>,
        reply: Reply<LoadReport>,
    },
    Forward {
        epoch: u64,
        steps: Vec<SequenceStep>,
        reply: Reply<ForwardResult>,
    },
    Release {
        epoch: u64,
        seq_ids: Vec<u64>,
        park: bool,
        reply: Reply<ReleaseReport>,
    },
    Warmup {
        tokens: usize,
        reply: Reply<Duration>,
    },
    Calibrate {
        rows: usize,
        context: usize,
        keep_probes: bool,
        /// The probes' weights, for a worker without a model file.
        sent: Option<Box<ModelFile>>,
        reply: Reply<Calibration>,
    },
}

/// A worker's measured speed and sizes for the planner (see `Calibrate` in worker.proto).
#[derive(Debug, Clone, Copy, Default)]
pub struct Calibration {
    pub rows: usize,
    pub layer: Duration,
    pub embedding: Duration,
    pub head: Duration,
    pub layer_bytes: usize,
    pub embedding_bytes: usize,
    pub head_bytes: usize,
}

/// A handle to the compute thread. Cheap to clone; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    /// The device the compute thread runs on (a handle; the thread holds its own).
    device: Device,
    /// How long the async side polls for a job's answer, or for the next request after one, before
    /// it parks: the compute thread's polling time, so both sides of the queue stay awake together.
    spin: Duration,
    /// The state after the last job, so `Info` and `Health` answer at once instead of queueing
    /// behind compute (a health check stuck behind a long prefill looked like a dead worker).
    published: Arc<Mutex<EngineStats>>,
    limits: EngineLimits,
}

impl Engine {
    /// Starts the compute thread for `model` on `device`, with `threads` CPU threads for tensor work.
    ///
    /// The compute loop runs *inside* its own rayon pool: parallel kernels called from it then run on
    /// the calling thread plus the pool's other workers, instead of injecting every matmul into a
    /// foreign pool and sleeping until it is done (two context switches per matmul, ~40% of a decode
    /// step when measured with perf).
    pub fn start(
        model: Option<ModelFile>,
        device: Device,
        options: StageOptions,
        limits: EngineLimits,
        threads: usize,
    ) -> Result<Self, WorkerError> {
        let (jobs, queue) = mpsc::channel();
        let name = format!("strata-compute-{}", crate::device::name(&device));
        let published = Arc::new(Mutex::new(EngineStats::default()));
        let max_cache_bytes = limits
            .max_cache_bytes
            .unwrap_or_else(|| (crate::device::memory(&device).available / 2) as usize);
        let max_parked_bytes = limits
            .max_parked_bytes
            .unwrap_or((max_cache_bytes / 4).min(DEFAULT_MAX_PARKED_BYTES))
            .min(max_cache_bytes);
        tracing::info!(
            max_cache_mib = max_cache_bytes >> 20,
            max_parked_mib = max_parked_bytes >> 20,
            "KV cache bound"
        );
        let limits = EngineLimits {
            max_cache_bytes: Some(max_cache_bytes),
            max_parked_bytes: Some(max_parked_bytes),
            ..limits
        };
        let mut state = State::new(model, device.clone(), options, limits, published.clone());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(move |i| format!("{name}-{i}"))
            .build()
            .map_err(|e| WorkerError::Internal(format!("cannot start compute threads: {e}")))?;
        // The loop holds one pool thread for the worker's lifetime; it ends when every handle is gone.
        let spin = limits
            .idle_spin
            .unwrap_or_else(|| default_idle_spin(&device));
        pool.spawn(move || {
            while let Some(job) = next_job(&queue, spin) {
                state.run(job);
            }
        });
        Ok(Self {
            jobs,
            device,
            limits,
            published,
            spin,
        })
    }

    /// The device the stage runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How long the async side polls before it parks (see [`strata_transport::spin::spin_first`]).
    pub fn spin(&self) -> Duration {
        self.spin
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(make(reply))
            .map_err(|_| WorkerError::ComputeThreadGone)?;
        strata_transport::spin::spin_first(answer, self.spin)
            .await
            .map_err(|_| WorkerError::ComputeThreadGone)?
    }

    /// Loads a layer range, dropping any previous stage and all its sequences. `weights` is the
    /// model to read it from when the coordinator sent it (a header and blobs); `None` reads the
    /// worker's own model file.
    pub async fn load(
        &self,
        layers: Range<usize>,
        output_dtype: Option<DType>,
        weights: Option<ModelFile>,
    ) -> Result<LoadReport, WorkerError> {
        self.call(|reply| Job::Load {
            layers,
            output_dtype,
            weights: weights.map(Box::new),
            reply,
        })
        .await
    }

    /// Runs a micro-batch on the stage loaded as `epoch`.
    pub async fn forward(
        &self,
        epoch: u64,
        steps: Vec<SequenceStep>,
    ) -> Result<ForwardResult, WorkerError> {
        self.call(|reply| Job::Forward {
            epoch,
            steps,
            reply,
        })
        .await
    }

    /// Frees (or with `park`, parks) sequences of the stage loaded as `epoch`.
    pub async fn release(
        &self,
        epoch: u64,
        seq_ids: Vec<u64>,
        park: bool,
    ) -> Result<ReleaseReport, WorkerError> {
        self.call(|reply| Job::Release {
            epoch,
            seq_ids,
            park,
            reply,
        })
        .await
    }

    /// Runs a throwaway pass of `tokens` prompt positions plus a few decode steps.
    pub async fn warmup(&self, tokens: usize) -> Result<Duration, WorkerError> {
        self.call(|reply| Job::Warmup { tokens, reply }).await
    }

    /// The state as of the last finished job; never waits for compute.
    /// The limits every Forward is checked against, the KV bound resolved.
    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    pub fn stats(&self) -> EngineStats {
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Times one layer, the embedding and the head on probe stages (the loaded stage is untouched).
    /// With `keep_probes` the probe stages stay loaded for the next calibration with the same rows
    /// and context, until a calibration without it or a `load`. `sent` is the model the probes are
    /// read from on a worker without a model file (its tensors: those of `probe_stages`).
    pub async fn calibrate(
        &self,
        rows: usize,
        context: usize,
        keep_probes: bool,
        sent: Option<ModelFile>,
    ) -> Result<Calibration, WorkerError> {
        self.call(|reply| Job::Calibrate {
            rows,
            context,
            keep_probes,
            sent: sent.map(Box::new),
            reply,
        })
        .await
    }
}

/// The next job: polled for up to `spin` first (see [`default_idle_spin`]), then waited for.
fn next_job(queue: &mpsc::Receiver<Job>, spin: Duration) -> Option<Job> {
    if !spin.is_zero() {
        let deadline = Instant::now() + spin;
        loop {
            match queue.try_recv() {
                Ok(job) => return Some(job),
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::hint::spin_loop()
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
    }
    queue.recv().ok()
}
