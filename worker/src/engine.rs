//! The compute thread: one OS thread per worker owns the device, the stage and every sequence's cache.
//!
//! Tokio's threads only do I/O. Each request becomes a [`Job`] sent over a channel to this thread,
//! which answers on a oneshot channel. Owning all state on one thread means no locks around the
//! caches, and a request is validated against the exact state it will run on.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use strata_model::stage_weights::probe_stages;
use strata_model::ModelFile;
use tokio::sync::oneshot;

use crate::model::kv_cache::SequenceKv;
use crate::model::phase_timer;
use crate::model::sampling::{greedy_rows, sample, Sampled, SamplingParams};
use crate::model::{Segment, Stage, StageInput, StageOptions};
use crate::WorkerError;

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
            idle_spin: None,
        }
    }
}

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
        reply: Reply<usize>,
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
        tracing::info!(max_cache_mib = max_cache_bytes >> 20, "KV cache bound");
        let mut state = State {
            published: published.clone(),
            model,
            device: device.clone(),
            options,
            limits,
            max_cache_bytes,
            stage: None,
            epoch: 0,
            output_dtype: DType::F32,
            sequences: HashMap::new(),
            steps: 0,
            kept_probes: None,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(move |i| format!("{name}-{i}"))
            .build()
            .map_err(|e| WorkerError::Internal(format!("cannot start compute threads: {e}")))?;
        // The loop holds one pool thread for the worker's lifetime; it ends when every handle is gone.
        let spin = limits
            .idle_spin
            .unwrap_or_else(|| default_idle_spin(&state.device));
        pool.spawn(move || {
            while let Some(job) = next_job(&queue, spin) {
                state.run(job);
            }
        });
        let limits = EngineLimits {
            max_cache_bytes: Some(max_cache_bytes),
            ..limits
        };
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

    /// Frees sequences of the stage loaded as `epoch`; returns how many existed.
    pub async fn release(&self, epoch: u64, seq_ids: Vec<u64>) -> Result<usize, WorkerError> {
        self.call(|reply| Job::Release {
            epoch,
            seq_ids,
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

/// Everything the compute thread owns.
struct State {
    /// The worker's model file, or the model of the stage the coordinator last sent; `None` on
    /// a worker without a model file until its first stage arrives.
    model: Option<ModelFile>,
    device: Device,
    options: StageOptions,
    limits: EngineLimits,
    /// `limits.max_cache_bytes`, or the device's default for it.
    max_cache_bytes: usize,
    stage: Option<Stage>,
    /// The loaded stage's epoch: random, fresh at every load, 0 while none is loaded. A caller
    /// that loaded an earlier stage (another coordinator, or this one before a reload) holds
    /// another, and its Forward and Release change nothing.
    epoch: u64,
    output_dtype: DType,
    sequences: HashMap<u64, SequenceKv>,
    published: Arc<Mutex<EngineStats>>,
    /// Forward steps run, for periodic diagnostics.
    steps: u64,
    /// Probe stages kept from the last calibration for the next one.
    kept_probes: Option<KeptProbes>,
}

impl State {
    /// Publishes the state for `Engine::stats`; runs before each reply, so a caller that saw its
    /// reply sees its effect in `Info`.
    fn publish(&self) {
        let stats = self.stats();
        *self
            .published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stats;
    }

    fn run(&mut self, job: Job) {
        // A panic in tensor code must not take the worker down: the request fails, the thread lives.
        macro_rules! guarded {
            ($reply:expr, $body:expr) => {{
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| $body))
                    .unwrap_or_else(|panic| Err(WorkerError::Internal(panic_message(panic))));
                self.publish();
                let _ = $reply.send(result);
            }};
        }
        match job {
            Job::Load {
                layers,
                output_dtype,
                weights,
                reply,
            } => guarded!(reply, self.load(layers, output_dtype, weights.map(|w| *w))),
            Job::Forward {
                epoch,
                steps,
                reply,
            } => guarded!(
                reply,
                self.check_epoch(epoch).and_then(|()| self.forward(steps))
            ),
            Job::Release {
                epoch,
                seq_ids,
                reply,
            } => {
                if let Err(e) = self.check_epoch(epoch) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let released = seq_ids
                    .iter()
                    .filter(|id| self.sequences.remove(id).is_some())
                    .count();
                if released > 0 && self.sequences.is_empty() {
                    crate::memory::return_freed_memory();
                }
                self.publish();
                let _ = reply.send(Ok(released));
            }
            Job::Warmup { tokens, reply } => guarded!(reply, self.warmup(tokens)),
            Job::Calibrate {
                rows,
                context,
                keep_probes,
                sent,
                reply,
            } => guarded!(
                reply,
                self.calibrate(rows, context, keep_probes, sent.map(|s| *s))
            ),
        }
    }

    /// Refuses a call made for another load of the stage than the current one.
    fn check_epoch(&self, epoch: u64) -> Result<(), WorkerError> {
        if self.stage.is_none() {
            return Err(WorkerError::FailedPrecondition(
                "no stage loaded: call LoadStage first".into(),
            ));
        }
        if epoch != self.epoch {
            return Err(WorkerError::FailedPrecondition(format!(
                "stage epoch {epoch} is not the loaded one: this worker's stage was loaded again \
                 since (by another coordinator, or a reload); load it to use it"
            )));
        }
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            loaded: self.stage.as_ref().map(Stage::layers),
            epoch: self.epoch,
            active_sequences: self.sequences.len(),
            cached_positions: self.sequences.values().map(SequenceKv::len).sum(),
            cache_bytes: self.sequences.values().map(SequenceKv::bytes).sum(),
        }
    }

    fn load(
        &mut self,
        layers: Range<usize>,
        output_dtype: Option<DType>,
        weights: Option<ModelFile>,
    ) -> Result<LoadReport, WorkerError> {
        let started = Instant::now();
        self.stage = None;
        self.epoch = 0;
        self.kept_probes = None;
        self.sequences.clear();
        if let Some(weights) = weights {
            self.model = Some(weights);
        }
        let model = self.model.as_ref().ok_or_else(|| {
            WorkerError::FailedPrecondition(
                "this worker has no model file: LoadStage must carry the stage's weights".into(),
            )
        })?;
        let dtype = self.options.compute_dtype(model.format, &self.device)?;
        let mut stage = Stage::load(model, layers, &self.device, dtype, self.options)?;
        stage.limit_pool_bytes(self.max_cache_bytes)?;
        self.output_dtype = output_dtype.unwrap_or(dtype);
        self.epoch = fresh_epoch();
        let report = LoadReport {
            epoch: self.epoch,
            layers: stage.layers(),
            has_embedding: stage.is_first(),
            has_head: stage.is_last(),
            load_time: started.elapsed(),
            weight_bytes: stage.weight_bytes(),
        };
        self.stage = Some(stage);
        Ok(report)
    }

    fn forward(&mut self, steps: Vec<SequenceStep>) -> Result<ForwardResult, WorkerError> {
        let started = Instant::now();
        let stage = self.stage.as_mut().ok_or_else(|| {
            WorkerError::FailedPrecondition("no stage loaded: call LoadStage first".into())
        })?;
        validate(
            &steps,
            stage,
            &self.sequences,
            &self.limits,
            self.max_cache_bytes,
        )?;

        let mut segments = Vec::with_capacity(steps.len());
        let mut offset = 0;
        for step in &steps {
            let len = step.input.len();
            segments.push(Segment {
                offset,
                len,
                start_pos: step.start_pos,
            });
            offset += len;
        }
        let input = if stage.is_first() {
            StageInput::Tokens(
                steps
                    .iter()
                    .flat_map(|s| match &s.input {
                        StepInput::Tokens(ids) => ids.clone(),
                        StepInput::Hidden(_) => Vec::new(),
                    })
                    .collect(),
            )
        } else {
            let parts: Vec<&Tensor> = steps
                .iter()
                .filter_map(|s| match &s.input {
                    StepInput::Hidden(t) => Some(t),
                    StepInput::Tokens(_) => None,
                })
                .collect();
            StageInput::Hidden(upload_hidden(&parts, stage.device(), stage.dtype())?)
        };

        let mut caches = Vec::with_capacity(steps.len());
        for step in &steps {
            let cache = match self.sequences.remove(&step.seq_id) {
                Some(cache) => cache,
                None => match stage.new_cache(step.input.len()) {
                    Ok(cache) => cache,
                    Err(e) => {
                        // Put back the sequences already taken out for this step.
                        for (step, cache) in steps.iter().zip(caches) {
                            if step.start_pos > 0 {
                                self.sequences.insert(step.seq_id, cache);
                            }
                        }
                        return Err(e.into());
                    }
                },
            };
            caches.push(cache);
        }
        let prepared = started.elapsed();
        // A full KV pool is a capacity limit, not a fault: the client may retry later.
        let result = stage
            .reserve_pages(&segments, &mut caches)
            .map_err(|e| {
                WorkerError::ResourceExhausted(format!("{e}; retry when sequences finish"))
            })
            .and_then(|()| Ok(stage.forward(input, &segments, &mut caches)?));
        // On an accelerator this is the time to queue the step's kernels; the device finishes them
        // while the output is copied back below.
        let queued = started.elapsed();
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                // Undo the half-done step: existing sequences go back as they were, new ones vanish.
                for (step, mut cache) in steps.iter().zip(caches) {
                    if step.start_pos > 0 {
                        cache.truncate(step.start_pos);
                        self.sequences.insert(step.seq_id, cache);
                    }
                }
                return Err(e);
            }
        };
        for (step, cache) in steps.iter().zip(caches) {
            self.sequences.insert(step.seq_id, cache);
        }

        let outputs = if stage.is_last() {
            sample_rows(&output, &steps, stage.fused_ops())?
                .into_iter()
                .zip(&steps)
                .map(|(sampled, step)| (step.seq_id, StepOutput::Sampled(sampled)))
                .collect()
        } else {
            let output = output
                .to_dtype(self.output_dtype)?
                .to_device(&Device::Cpu)?;
            segments
                .iter()
                .zip(&steps)
                .map(|(seg, step)| {
                    Ok((
                        step.seq_id,
                        StepOutput::Hidden(output.narrow(0, seg.offset, seg.len)?),
                    ))
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let forward_time = started.elapsed();
        phase_timer::mark(stage.device(), "copy back, sample");
        self.steps += 1;
        if self.steps.is_multiple_of(50) {
            let phase_timer::Taken {
                steps,
                phases,
                layers,
            } = phase_timer::take();
            if !phases.is_empty() {
                let total: Duration = phases.iter().map(|(_, d)| *d).sum();
                let per_step = |d: &Duration| d.as_micros() / u128::from(steps.max(1));
                let shares: Vec<String> = phases
                    .iter()
                    .map(|(name, d)| {
                        format!(
                            "{name} {:.1}% ({} us/step)",
                            100.0 * d.as_secs_f64() / total.as_secs_f64(),
                            per_step(d)
                        )
                    })
                    .collect();
                let layers: Vec<String> = layers.iter().map(|d| per_step(d).to_string()).collect();
                tracing::info!(
                    steps,
                    total_ms = total.as_millis() as u64,
                    phases = %shares.join(", "),
                    layer_us = %layers.join(" "),
                    "phase times"
                );
            }
        }
        tracing::debug!(
            sequences = steps.len(),
            rows = offset,
            prepare_us = prepared.as_micros() as u64,
            queue_us = (queued - prepared).as_micros() as u64,
            finish_us = (forward_time - queued).as_micros() as u64,
            "forward timing"
        );
        Ok(ForwardResult {
            outputs,
            forward_time,
        })
    }

    /// A prefill of `tokens` positions and two decode steps on caches that are never stored.
    fn warmup(&mut self, tokens: usize) -> Result<Duration, WorkerError> {
        let started = Instant::now();
        let stage = self.stage.as_mut().ok_or_else(|| {
            WorkerError::FailedPrecondition("no stage loaded: call LoadStage first".into())
        })?;
        let tokens = tokens.clamp(1, stage.config().context_length.saturating_sub(2).max(1));
        let hidden = stage.config().hidden_size;
        let mut caches = vec![stage.new_cache(tokens + 2)?];
        let mut pos = 0;
        for len in [tokens, 1, 1] {
            if pos + len > stage.config().context_length {
                break;
            }
            let input = if stage.is_first() {
                StageInput::Tokens(vec![0; len])
            } else {
                StageInput::Hidden(Tensor::zeros((len, hidden), stage.dtype(), stage.device())?)
            };
            let segment = Segment {
                offset: 0,
                len,
                start_pos: pos,
            };
            let out = stage.forward(input, &[segment], &mut caches)?;
            // Force the device to finish (CUDA and Metal queue work asynchronously).
            out.to_device(&Device::Cpu)?;
            pos += len;
        }
        stage.clear_scratch();
        phase_timer::discard();
        Ok(started.elapsed())
    }
}

impl State {
    /// Loads three probe stages of a few layers each and times decode-shaped micro-batches through
    /// them: bare layers (`1..1+p`), the same with the embedding (`0..p`) and with the head
    /// (`n-p..n`); differences give each part. The probes take turns step by step and each keeps its
    /// fastest step, so a slow moment of a shared machine lands on all three instead of skewing one
    /// difference: one-layer probes timed one after another varied by ±30% and by 2× for the head,
    /// which moved the planner's split by several layers between runs.
    fn calibrate(
        &mut self,
        rows: usize,
        context: usize,
        keep_probes: bool,
        sent: Option<ModelFile>,
    ) -> Result<Calibration, WorkerError> {
        let model = match (&sent, &self.model) {
            (Some(sent), _) => sent,
            (None, Some(model)) if model.blobs.is_none() => model,
            _ => {
                return Err(WorkerError::FailedPrecondition(
                    "this worker has no model file: a Calibrate must carry the probes' weights"
                        .into(),
                ))
            }
        };
        let n = model.config.num_layers;
        let layers = probe_stages(n)[0].len();
        let rows = rows.clamp(1, 64);
        let context = context.clamp(
            1,
            model
                .config
                .context_length
                .saturating_sub(PROBE_STEPS + 1)
                .max(1),
        );
        let dtype = self.options.compute_dtype(model.format, &self.device)?;
        let mut probes = match self.kept_probes.take() {
            Some(kept) if kept.rows == rows && kept.context == context => kept.probes,
            _ => probe_stages(n)
                .into_iter()
                .map(|range| {
                    let stage = Stage::load(model, range, &self.device, dtype, self.options)?;
                    Probe::prefilled(stage, rows, context)
                })
                .collect::<Result<Vec<_>, WorkerError>>()?,
        };
        let mut best = [Duration::MAX; 3];
        for step in 0..PROBE_STEPS {
            for (probe, best) in probes.iter_mut().zip(&mut best) {
                let time = probe.decode_step(context + step)?;
                if step >= UNTIMED_STEPS {
                    *best = (*best).min(time);
                }
            }
        }
        let bytes: Vec<usize> = probes.iter().map(|p| p.stage.weight_bytes()).collect();
        for probe in &mut probes {
            probe.stage.clear_scratch();
            // Back to the prefilled context, for another pass.
            for cache in &mut probe.caches {
                cache.truncate(context);
            }
        }
        phase_timer::discard();
        if keep_probes {
            self.kept_probes = Some(KeptProbes {
                rows,
                context,
                probes,
            });
        }
        let [bare, first, last] = best;
        Ok(Calibration {
            rows,
            layer: bare / layers as u32,
            embedding: first.saturating_sub(bare),
            head: last.saturating_sub(bare),
            layer_bytes: bytes[0] / layers,
            embedding_bytes: bytes[1].saturating_sub(bytes[0]),
            head_bytes: bytes[2].saturating_sub(bytes[0]),
        })
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

/// Decode steps run before the timed ones (first touches of fresh weights and buffers).
const UNTIMED_STEPS: usize = 2;
/// Decode steps per probe, untimed ones included.
const PROBE_STEPS: usize = 9;

/// Probe stages kept between calibration passes, with the shape they were prefilled for.
struct KeptProbes {
    rows: usize,
    context: usize,
    probes: Vec<Probe>,
}

/// A calibration stage with `rows` sequences in its caches.
struct Probe {
    stage: Stage,
    caches: Vec<SequenceKv>,
}

impl Probe {
    /// Loads `rows` sequences of `context` positions each.
    fn prefilled(mut stage: Stage, rows: usize, context: usize) -> Result<Self, WorkerError> {
        let mut caches = (0..rows)
            .map(|_| stage.new_cache(context + PROBE_STEPS))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let prefill: Vec<Segment> = (0..rows)
            .map(|i| Segment {
                offset: i * context,
                len: context,
                start_pos: 0,
            })
            .collect();
        let x = Self::input(&stage, rows * context)?;
        stage
            .forward(x, &prefill, &mut caches)?
            .to_device(&Device::Cpu)?;
        Ok(Self { stage, caches })
    }

    /// Placeholder input of `len` positions (token ids or zero hidden states).
    fn input(stage: &Stage, len: usize) -> candle_core::Result<StageInput> {
        Ok(if stage.is_first() {
            StageInput::Tokens(vec![1; len])
        } else {
            let hidden = stage.config().hidden_size;
            StageInput::Hidden(Tensor::zeros((len, hidden), stage.dtype(), stage.device())?)
        })
    }

    /// Times one decode step of every sequence at position `pos` as the engine finishes it: hidden
    /// states copied back, or (last stage) a greedy token sampled per row, whose cost is the head's
    /// too (on a CPU last stage, sampling 49152-wide rows was a tenth of its step).
    fn decode_step(&mut self, pos: usize) -> Result<Duration, WorkerError> {
        if let Some(cache) = self.caches.iter().find(|c| c.len() != pos) {
            return Err(WorkerError::Internal(format!(
                "a calibration probe's cache holds {} positions, its step starts at {pos}",
                cache.len()
            )));
        }
        let segments: Vec<Segment> = (0..self.caches.len())
            .map(|i| Segment {
                offset: i,
                len: 1,
                start_pos: pos,
            })
            .collect();
        let x = Self::input(&self.stage, segments.len())?;
        let greedy: Vec<SequenceStep> = if self.stage.is_last() {
            segments
                .iter()
                .map(|s| SequenceStep {
                    seq_id: s.offset as u64,
                    start_pos: s.start_pos,
                    input: StepInput::Tokens(vec![1]),
                    sampling: Some(SamplingParams::GREEDY),
                    top_logprobs: 0,
                })
                .collect()
        } else {
            Vec::new()
        };
        let started = Instant::now();
        let out = self.stage.forward(x, &segments, &mut self.caches)?;
        if self.stage.is_last() {
            sample_rows(&out, &greedy, self.stage.fused_ops())?;
        } else {
            out.to_device(&Device::Cpu)?;
        }
        Ok(started.elapsed())
    }
}

/// The step's hidden states as one tensor on the stage's device, in its dtype. Joined on the host
/// and uploaded once: an upload per sequence cost a copy and a launch each on a GPU.
fn upload_hidden(parts: &[&Tensor], device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let joined = if parts.iter().all(|t| t.dtype() == parts[0].dtype()) {
        Tensor::cat(parts, 0)?
    } else {
        // Mixed wire dtypes from one client: agree on the host first.
        let same = parts
            .iter()
            .map(|t| t.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&same, 0)?
    };
    joined.to_device(device)?.to_dtype(dtype)
}

/// Picks each sequence's next token from the last stage's logits `[sequences, vocab]`.
///
/// On an accelerator, greedy rows that want no alternatives never leave the device whole: their
/// token (the lowest index among the largest logits, as on the host) and its log-probability are
/// reduced there, and only those two numbers per row are copied back. Copying and scanning every
/// 32000-wide row on the host took a quarter of a 32-sequence GPU step. Other rows (temperature,
/// top-k/p, requested alternatives) and CPU stages sample on the host from the full row.
fn sample_rows(
    logits: &Tensor,
    steps: &[SequenceStep],
    fused: bool,
) -> candle_core::Result<Vec<Sampled>> {
    let params = |step: &SequenceStep| step.sampling.unwrap_or(SamplingParams::GREEDY);
    let on_device = |step: &SequenceStep| params(step).temperature <= 0.0 && step.top_logprobs == 0;
    let mut out: Vec<Option<Sampled>> = vec![None; steps.len()];
    if !logits.device().is_cpu() && steps.iter().any(on_device) {
        let (ids, logprobs) = greedy_rows(logits, fused)?;
        let vocab = logits.dim(1)?;
        for (i, step) in steps.iter().enumerate() {
            // A NaN row has no largest logit: the host decides it, as for any other row.
            if on_device(step) && (ids[i] as usize) < vocab && logprobs[i].is_finite() {
                out[i] = Some(Sampled {
                    id: ids[i],
                    logprob: logprobs[i],
                    top: Vec::new(),
                });
            }
        }
    }
    let host: Vec<usize> = (0..steps.len()).filter(|&i| out[i].is_none()).collect();
    if !host.is_empty() {
        let rows = if host.len() == steps.len() {
            logits.clone()
        } else {
            let index: Vec<u32> = host.iter().map(|&i| i as u32).collect();
            logits.index_select(&Tensor::from_vec(index, host.len(), logits.device())?, 0)?
        };
        let rows = rows.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        // Rows sample independently: spread them over the compute pool.
        let sampled: Vec<Sampled> = host
            .par_iter()
            .zip(rows)
            .map(|(&i, row)| {
                let step = &steps[i];
                let position = (step.start_pos + step.input.len()) as u64;
                sample(&row, &params(step), position, step.top_logprobs)
            })
            .collect();
        for (i, s) in host.into_iter().zip(sampled) {
            out[i] = Some(s);
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every row sampled"))
        .collect())
}

/// A new stage epoch: 64 random bits, never 0 (0 means no stage); the clock's if the OS has no
/// randomness to give.
fn fresh_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    let random = match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    };
    random.max(1)
}

/// Checks a whole micro-batch against the stage and the cached sequences before anything changes.
fn validate(
    steps: &[SequenceStep],
    stage: &Stage,
    sequences: &HashMap<u64, SequenceKv>,
    limits: &EngineLimits,
    max_cache_bytes: usize,
) -> Result<(), WorkerError> {
    let config = stage.config();
    if steps.is_empty() {
        return Err(WorkerError::invalid("Forward with no sequences"));
    }
    let mut seen = HashSet::with_capacity(steps.len());
    let mut rows = 0usize;
    let mut new_sequences = 0usize;
    for step in steps {
        let id = step.seq_id;
        if !seen.insert(id) {
            return Err(WorkerError::invalid(format!(
                "sequence {id} appears twice in one Forward"
            )));
        }
        let len = step.input.len();
        if len == 0 {
            return Err(WorkerError::invalid(format!(
                "sequence {id}: no new positions"
            )));
        }
        rows += len;
        match sequences.get(&id) {
            None if step.start_pos > 0 => {
                return Err(WorkerError::NotFound(format!(
                    "sequence {id} is not cached on this worker (start_pos {} needs its earlier positions; \
                     start it with start_pos 0)",
                    step.start_pos
                )))
            }
            None => new_sequences += 1,
            // The cached length is not said: an error tells the caller nothing about a sequence
            // beyond what it sent.
            Some(cache) if cache.len() != step.start_pos => {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: start_pos {} is not where its cache ends; positions must follow \
                     on without gaps or rewrites",
                    step.start_pos,
                )))
            }
            Some(_) => {}
        }
        if step.start_pos + len > config.context_length {
            return Err(WorkerError::invalid(format!(
                "sequence {id}: positions up to {} exceed the model's context length {}",
                step.start_pos + len,
                config.context_length
            )));
        }
        match &step.input {
            StepInput::Tokens(ids) => {
                if !stage.is_first() {
                    return Err(WorkerError::invalid(format!(
                        "sequence {id}: token ids sent to a stage starting at layer {}; it takes hidden states",
                        stage.layers().start
                    )));
                }
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= config.vocab_size) {
                    return Err(WorkerError::invalid(format!(
                        "sequence {id}: token id {bad} is outside the vocabulary of {}",
                        config.vocab_size
                    )));
                }
            }
            StepInput::Hidden(t) => {
                if stage.is_first() {
                    return Err(WorkerError::invalid(format!(
                        "sequence {id}: hidden states sent to the first stage; it takes token ids"
                    )));
                }
                if t.dims() != [len, config.hidden_size] {
                    return Err(WorkerError::invalid(format!(
                        "sequence {id}: hidden states of shape {:?}; expected [n_tokens, {}]",
                        t.dims(),
                        config.hidden_size
                    )));
                }
            }
        }
        if stage.is_last() {
            if step.sampling.is_none() {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: the last stage needs sampling parameters"
                )));
            }
            if step.top_logprobs > MAX_TOP_LOGPROBS {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: top_logprobs {} is over the limit of {MAX_TOP_LOGPROBS}",
                    step.top_logprobs
                )));
            }
        }
    }
    if rows > limits.max_batch_rows {
        return Err(WorkerError::ResourceExhausted(format!(
            "Forward of {rows} positions is over this worker's limit of {}",
            limits.max_batch_rows
        )));
    }
    // Caches grow by doubling, so a step of `rows` positions may allocate up to twice their size.
    let config = stage.config();
    let per_position = 2
        * stage.layers().len()
        * config.num_kv_heads
        * config.head_dim
        * stage.dtype().size_in_bytes();
    let held: usize = sequences.values().map(SequenceKv::bytes).sum();
    let could_need = held.saturating_add(rows.saturating_mul(per_position).saturating_mul(2));
    if could_need > max_cache_bytes {
        return Err(WorkerError::ResourceExhausted(format!(
            "KV caches would grow past this worker's limit of {} MiB (holding {} MiB for {} sequences); \
             retry when sequences finish",
            max_cache_bytes >> 20,
            held >> 20,
            sequences.len()
        )));
    }
    if sequences.len() + new_sequences > limits.max_sequences {
        return Err(WorkerError::ResourceExhausted(format!(
            "{} new sequences would exceed this worker's limit of {} (holding {})",
            new_sequences,
            limits.max_sequences,
            sequences.len()
        )));
    }
    Ok(())
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("compute panicked: {text}")
}
