//! Calibration: probe stages of a few layers timed on decode-shaped micro-batches, so the planner
//! knows what a layer, the embedding and the head cost on this worker.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use strata_model::stage_weights::probe_stages;
use strata_model::ModelFile;

use super::sample::sample_rows;
use super::state::State;
use super::{Calibration, SequenceStep, StepInput};
use crate::model::kv_cache::SequenceKv;
use crate::model::phase_timer;
use crate::model::sampling::SamplingParams;
use crate::model::{Segment, Stage, StageInput};
use crate::WorkerError;

impl State {
    /// Loads three probe stages of a few layers each and times decode-shaped micro-batches through
    /// them: bare layers (`1..1+p`), the same with the embedding (`0..p`) and with the head
    /// (`n-p..n`); differences give each part. The probes take turns step by step and each keeps its
    /// fastest step, so a slow moment of a shared machine lands on all three instead of skewing one
    /// difference: one-layer probes timed one after another varied by ±30% and by 2× for the head,
    /// which moved the planner's split by several layers between runs.
    pub(super) fn calibrate(
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

/// Decode steps run before the timed ones (first touches of fresh weights and buffers).
const UNTIMED_STEPS: usize = 2;
/// Decode steps per probe, untimed ones included.
const PROBE_STEPS: usize = 9;

/// Probe stages kept between calibration passes, with the shape they were prefilled for.
pub(super) struct KeptProbes {
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
                    seen: Vec::new(),
                    allowed: Vec::new(),
                    copy_from: None,
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
