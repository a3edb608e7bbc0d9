//! Whole last-position logits from strata's stages, for fidelity checks against other engines.
//!
//! The pipeline reports at most the top 20 log-probabilities per token (shipping a 32000-wide row
//! per step would swamp the hops), so relative-L2 comparisons of whole logit rows run the same
//! [`Stage`] code here in one process: each stage on its own device and in its own dtype, hidden
//! states crossing stages exactly as between workers (to f32 for the wire, onto the host, then onto
//! the next stage's device and dtype).

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use strata_model::ModelFile;
use strata_worker::model::{Segment, Stage, StageInput, StageOptions};

/// Stages loaded in order, one per device.
pub struct LogitsPipeline {
    stages: Vec<Stage>,
}

impl LogitsPipeline {
    /// Loads `model` split evenly over `devices` (e.g. `["cuda:0", "cpu"]`), each stage computing in
    /// the dtype `options` chooses for its device.
    pub fn load(model: &Path, devices: &[String], options: StageOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(!devices.is_empty(), "give at least one device");
        let model = ModelFile::open(model)?;
        let ranges = strata_coordinator::plan::even(model.config.num_layers, devices.len())?;
        let stages = devices
            .iter()
            .zip(ranges)
            .map(|(spec, range)| -> anyhow::Result<Stage> {
                let device = strata_worker::device::open(spec)?;
                let dtype = options.compute_dtype(model.format, &device)?;
                Stage::load(&model, range.clone(), &device, dtype, options)
                    .with_context(|| format!("loading layers {range:?} on {spec}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { stages })
    }

    /// The f32 logits of the last position of `prompt`, run as one prefill step.
    pub fn last_logits(&mut self, prompt: &[u32]) -> anyhow::Result<Vec<f32>> {
        anyhow::ensure!(!prompt.is_empty(), "empty prompt");
        let mut caches = self.new_caches(prompt.len())?;
        self.step(prompt, 0, &mut caches)
    }

    /// Teacher-forced generation: `prompt` as one prefill step, then each of `forced` fed as a
    /// one-row decode step, as a generation that chose those tokens runs. Returns the f32 logits
    /// that chose each of `forced` (the prefill's last row, then every decode step's but the last
    /// one's).
    pub fn forced_logits(
        &mut self,
        prompt: &[u32],
        forced: &[u32],
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::ensure!(!prompt.is_empty(), "empty prompt");
        let mut caches = self.new_caches(prompt.len() + forced.len())?;
        let mut rows = vec![self.step(prompt, 0, &mut caches)?];
        for (i, &id) in forced
            .iter()
            .enumerate()
            .take(forced.len().saturating_sub(1))
        {
            rows.push(self.step(&[id], prompt.len() + i, &mut caches)?);
        }
        Ok(rows)
    }

    fn new_caches(
        &self,
        len: usize,
    ) -> anyhow::Result<Vec<strata_worker::model::kv_cache::SequenceKv>> {
        Ok(self
            .stages
            .iter()
            .map(|s| s.new_cache(len))
            .collect::<candle_core::Result<_>>()?)
    }

    /// One step of `ids` at `start_pos` through every stage: the last row's logits.
    fn step(
        &mut self,
        ids: &[u32],
        start_pos: usize,
        caches: &mut [strata_worker::model::kv_cache::SequenceKv],
    ) -> anyhow::Result<Vec<f32>> {
        let segment = [Segment {
            offset: 0,
            len: ids.len(),
            start_pos,
        }];
        // What a stage hands on, as a worker sends it: f32 on the host.
        let mut wire: Option<Tensor> = None;
        for (stage, cache) in self.stages.iter_mut().zip(caches.iter_mut()) {
            let input = match wire.take() {
                None => StageInput::Tokens(ids.to_vec()),
                Some(w) => {
                    StageInput::Hidden(w.to_device(stage.device())?.to_dtype(stage.dtype())?)
                }
            };
            let out = stage.forward(input, &segment, std::slice::from_mut(cache))?;
            wire = Some(out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
        let out = wire.context("at least one stage")?;
        let rows = out.reshape((out.elem_count() / out.dims()[out.rank() - 1], ()))?;
        let n = rows.dim(0)?;
        Ok(rows.get(n - 1)?.to_vec1::<f32>()?)
    }
}

/// Where `chosen` stands in `logits`: its log-probability minus the best other token's (negative
/// when another token is preferred). For llama.cpp's greedy token this is the step's top-2 margin
/// as llama.cpp reports it, signed.
pub fn margin_of(logits: &[f32], chosen: u32) -> f32 {
    let chosen_logit = logits[chosen as usize];
    let best_other = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != chosen as usize)
        .map(|(_, &l)| l)
        .fold(f32::NEG_INFINITY, f32::max);
    chosen_logit - best_other
}
