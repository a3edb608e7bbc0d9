//! What the compute thread owns, and what each job does to it.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use strata_model::ModelFile;

use super::calibrate::KeptProbes;
use super::sample::{sample_rows, upload_hidden};
use super::validate::{validate, Holding, StageShape};
use super::{
    EngineLimits, EngineStats, ForwardResult, Job, LoadReport, ReleaseReport, SequenceStep,
    StepInput, StepOutput,
};
use crate::model::kv_cache::SequenceKv;
use crate::model::phase_timer;
use crate::model::{Segment, Stage, StageInput, StageOptions};
use crate::WorkerError;

/// Forward steps between two phase-time reports (with `--phase-times` on).
const PHASE_REPORT_EVERY: u64 = 50;

/// Everything the compute thread owns.
pub(super) struct State {
    /// The worker's model file, or the model of the stage the coordinator last sent; `None` on
    /// a worker without a model file until its first stage arrives.
    pub(super) model: Option<ModelFile>,
    pub(super) device: Device,
    pub(super) options: StageOptions,
    limits: EngineLimits,
    /// `limits.max_cache_bytes`, resolved by the engine.
    max_cache_bytes: usize,
    /// `limits.max_parked_bytes`, resolved by the engine.
    max_parked_bytes: usize,
    stage: Option<Stage>,
    /// The loaded stage's epoch: random, fresh at every load, 0 while none is loaded. A caller
    /// that loaded an earlier stage (another coordinator, or this one before a reload) holds
    /// another, and its Forward and Release change nothing.
    epoch: u64,
    output_dtype: DType,
    sequences: HashMap<u64, SequenceKv>,
    /// Caches of ended sequences kept as prefix sources, with when each was last used.
    parked: HashMap<u64, Parked>,
    /// Counts uses of parked caches, for dropping the least recently used first.
    use_clock: u64,
    published: Arc<Mutex<EngineStats>>,
    /// Forward steps run, for periodic diagnostics.
    steps: u64,
    /// Probe stages kept from the last calibration for the next one.
    pub(super) kept_probes: Option<KeptProbes>,
}

impl State {
    pub(super) fn new(
        model: Option<ModelFile>,
        device: Device,
        options: StageOptions,
        limits: EngineLimits,
        published: Arc<Mutex<EngineStats>>,
    ) -> Self {
        Self {
            model,
            device,
            options,
            max_cache_bytes: limits.max_cache_bytes.unwrap_or(usize::MAX),
            max_parked_bytes: limits.max_parked_bytes.unwrap_or(0),
            limits,
            stage: None,
            epoch: 0,
            output_dtype: DType::F32,
            sequences: HashMap::new(),
            parked: HashMap::new(),
            use_clock: 0,
            published,
            steps: 0,
            kept_probes: None,
        }
    }

    /// Publishes the state for `Engine::stats`; runs before each reply, so a caller that saw its
    /// reply sees its effect in `Info`.
    fn publish(&self) {
        let stats = self.stats();
        *self
            .published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stats;
    }

    pub(super) fn run(&mut self, job: Job) {
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
                park,
                reply,
            } => {
                let result = self
                    .check_epoch(epoch)
                    .map(|()| self.release(&seq_ids, park));
                self.publish();
                let _ = reply.send(result);
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
            return Err(no_stage());
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
            parked_sequences: self.parked.len(),
            parked_bytes: self.parked_bytes(),
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
        self.parked.clear();
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

    /// Frees the sequences that exist among `seq_ids` (active or parked), or with `park` parks
    /// the active ones, then keeps the parked caches within their bound.
    fn release(&mut self, seq_ids: &[u64], park: bool) -> ReleaseReport {
        let mut released = 0;
        // Asked to park but not kept: the caller must not copy from them.
        let mut not_parked = Vec::new();
        for id in seq_ids {
            if let Some(kv) = self.sequences.remove(id) {
                released += 1;
                let kept = (park && self.max_parked_bytes > 0 && !kv.is_empty())
                    .then(|| kv.compact())
                    .and_then(|compacted| {
                        compacted
                            .inspect_err(|e| tracing::warn!(error = %e, "parking a cache failed"))
                            .ok()
                    });
                if let Some(kv) = kept {
                    self.use_clock += 1;
                    let parked = Parked {
                        kv,
                        last_used: self.use_clock,
                    };
                    self.parked.insert(*id, parked);
                } else if park {
                    not_parked.push(*id);
                }
            } else if self.parked.remove(id).is_some() {
                released += 1;
            } else if park {
                not_parked.push(*id);
            }
        }
        let mut evicted = self.evict_parked(0, &HashSet::new());
        evicted.extend(not_parked);
        if released > 0 && self.sequences.is_empty() {
            crate::memory::return_freed_memory();
        }
        ReleaseReport { released, evicted }
    }

    fn parked_bytes(&self) -> usize {
        self.parked.values().map(|p| p.kv.bytes()).sum()
    }

    /// Drops parked caches, least recently used first and never one in `keep`, until they fit
    /// their own bound and leave `room` bytes free under the KV bound. Returns the ids dropped.
    fn evict_parked(&mut self, room: usize, keep: &HashSet<u64>) -> Vec<u64> {
        let active: usize = self.sequences.values().map(SequenceKv::bytes).sum();
        let mut parked = self.parked_bytes();
        let mut evicted = Vec::new();
        while parked > self.max_parked_bytes
            || active.saturating_add(parked).saturating_add(room) > self.max_cache_bytes
        {
            let Some(id) = Self::least_recently_parked(&self.parked, keep) else {
                break;
            };
            if let Some(gone) = self.parked.remove(&id) {
                parked -= gone.kv.bytes();
                evicted.push(id);
            }
        }
        evicted
    }

    fn least_recently_parked(parked: &HashMap<u64, Parked>, keep: &HashSet<u64>) -> Option<u64> {
        parked
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .min_by_key(|(_, p)| p.last_used)
            .map(|(&id, _)| id)
    }

    /// The caches of the step's sequences that start on another's prefix: copies of their sources'
    /// first `start_pos` positions, made before any cache is taken out for the step. A paged pool
    /// short of pages drops parked caches (not the step's sources) to make them.
    fn fork_caches(
        &mut self,
        steps: &[SequenceStep],
        sources: &HashSet<u64>,
        evicted: &mut Vec<u64>,
    ) -> Result<HashMap<u64, SequenceKv>, WorkerError> {
        let mut forks = HashMap::new();
        for step in steps {
            let Some(source) = step.copy_from else {
                continue;
            };
            self.use_clock += 1;
            if let Some(parked) = self.parked.get_mut(&source) {
                parked.last_used = self.use_clock;
            }
            loop {
                let stage = self.stage.as_mut().ok_or_else(no_stage)?;
                let paged = stage.is_paged();
                let held = self
                    .sequences
                    .get(&source)
                    .or_else(|| self.parked.get(&source).map(|p| &p.kv))
                    .ok_or_else(|| WorkerError::Internal(format!("source {source} vanished")))?;
                let error = match stage.fork_cache(held, step.start_pos, step.input.len()) {
                    Ok(kv) => {
                        forks.insert(step.seq_id, kv);
                        break;
                    }
                    Err(e) => e,
                };
                match Self::least_recently_parked(&self.parked, sources) {
                    Some(id) if paged => {
                        self.parked.remove(&id);
                        evicted.push(id);
                    }
                    _ if paged => {
                        return Err(WorkerError::ResourceExhausted(format!(
                            "{error}; retry when sequences finish"
                        )))
                    }
                    _ => return Err(error.into()),
                }
            }
        }
        Ok(forks)
    }

    /// Runs one micro-batch: checked whole first, then either every sequence advances or none
    /// changes (a failed step puts each cache back as it was).
    fn forward(&mut self, steps: Vec<SequenceStep>) -> Result<ForwardResult, WorkerError> {
        let started = Instant::now();
        let stage = self.stage.as_mut().ok_or_else(no_stage)?;
        let shape = StageShape::of(stage);
        let holding = Holding {
            cached_len: |id| self.sequences.get(&id).map(SequenceKv::len),
            parked_len: |id| self.parked.get(&id).map(|p| p.kv.len()),
            sequences: self.sequences.len(),
            bytes: self.sequences.values().map(SequenceKv::bytes).sum(),
        };
        let room = validate(&steps, &shape, &holding, &self.limits, self.max_cache_bytes)?;
        let sources: HashSet<u64> = steps.iter().filter_map(|s| s.copy_from).collect();
        let mut evicted = self.evict_parked(room, &sources);
        let mut forks = self.fork_caches(&steps, &sources, &mut evicted)?;

        let stage = self.stage.as_mut().ok_or_else(no_stage)?;
        let segments = segments_of(&steps);
        let rows: usize = segments.iter().map(|s| s.len).sum();
        let input = stage_input(stage, &steps)?;
        let mut caches = Vec::with_capacity(steps.len());
        for step in &steps {
            let cache = match forks
                .remove(&step.seq_id)
                .or_else(|| self.sequences.remove(&step.seq_id))
            {
                Some(cache) => Ok(cache),
                None => stage.new_cache(step.input.len()),
            };
            match cache {
                Ok(cache) => caches.push(cache),
                Err(e) => {
                    put_back(&mut self.sequences, &steps, caches);
                    return Err(e.into());
                }
            }
        }
        let prepared = started.elapsed();
        // A full KV pool is a capacity limit, not a fault: parked caches make room first, then the
        // client may retry later.
        let reserved = loop {
            match stage.reserve_pages(&segments, &mut caches) {
                Ok(()) => break Ok(()),
                Err(e) => {
                    // The step's copies are made: no parked cache is a source any more.
                    match Self::least_recently_parked(&self.parked, &HashSet::new()) {
                        Some(id) => {
                            self.parked.remove(&id);
                            evicted.push(id);
                        }
                        None => {
                            break Err(WorkerError::ResourceExhausted(format!(
                                "{e}; retry when sequences finish"
                            )))
                        }
                    }
                }
            }
        };
        let result = reserved.and_then(|()| Ok(stage.forward(input, &segments, &mut caches)?));
        // On an accelerator this is the time to queue the step's kernels; the device finishes them
        // while the output is copied back below.
        let queued = started.elapsed();
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                put_back(&mut self.sequences, &steps, caches);
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
        stage.timer().mark(stage.device(), "copy back, sample");
        self.steps += 1;
        if self.steps.is_multiple_of(PHASE_REPORT_EVERY) {
            phase_timer::log_report();
        }
        tracing::debug!(
            sequences = steps.len(),
            rows,
            prepare_us = prepared.as_micros() as u64,
            queue_us = (queued - prepared).as_micros() as u64,
            finish_us = (forward_time - queued).as_micros() as u64,
            "forward timing"
        );
        if !evicted.is_empty() {
            tracing::debug!(?evicted, "parked caches dropped for room");
        }
        Ok(ForwardResult {
            outputs,
            forward_time,
            evicted,
        })
    }

    /// A prefill of `tokens` positions and two decode steps on caches that are never stored.
    fn warmup(&mut self, tokens: usize) -> Result<Duration, WorkerError> {
        let started = Instant::now();
        let stage = self.stage.as_mut().ok_or_else(no_stage)?;
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

/// The cache of an ended sequence, kept for `copy_prefix_from`.
struct Parked {
    kv: SequenceKv,
    last_used: u64,
}

fn no_stage() -> WorkerError {
    WorkerError::FailedPrecondition("no stage loaded: call LoadStage first".into())
}

/// Where each sequence's rows sit in the step's input, in order.
fn segments_of(steps: &[SequenceStep]) -> Vec<Segment> {
    let mut offset = 0;
    steps
        .iter()
        .map(|step| {
            let segment = Segment {
                offset,
                len: step.input.len(),
                start_pos: step.start_pos,
            };
            offset += segment.len;
            segment
        })
        .collect()
}

/// The step's input as the stage takes it: every sequence's token ids in one list (first stage),
/// or their hidden states as one tensor on the stage's device.
fn stage_input(stage: &Stage, steps: &[SequenceStep]) -> Result<StageInput, WorkerError> {
    if stage.is_first() {
        let ids = steps
            .iter()
            .flat_map(|s| match &s.input {
                StepInput::Tokens(ids) => ids.as_slice(),
                StepInput::Hidden(_) => &[],
            })
            .copied()
            .collect();
        return Ok(StageInput::Tokens(ids));
    }
    let parts: Vec<&Tensor> = steps
        .iter()
        .filter_map(|s| match &s.input {
            StepInput::Hidden(t) => Some(t),
            StepInput::Tokens(_) => None,
        })
        .collect();
    Ok(StageInput::Hidden(upload_hidden(
        &parts,
        stage.device(),
        stage.dtype(),
    )?))
}

/// Undoes a step that failed: each sequence that existed goes back with the positions it had
/// (`start_pos`: what validation found), and new ones (forks included) vanish. `caches` may be shorter than
/// `steps` when the step failed while taking them out.
fn put_back(
    sequences: &mut HashMap<u64, SequenceKv>,
    steps: &[SequenceStep],
    caches: Vec<SequenceKv>,
) {
    for (step, mut cache) in steps.iter().zip(caches) {
        if step.start_pos > 0 && step.copy_from.is_none() {
            cache.truncate(step.start_pos);
            sequences.insert(step.seq_id, cache);
        }
    }
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

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("compute panicked: {text}")
}
