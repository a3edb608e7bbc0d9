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
        let segment = [Segment {
            offset: 0,
            len: prompt.len(),
            start_pos: 0,
        }];
        let mut input = StageInput::Tokens(prompt.to_vec());
        let last = self.stages.len() - 1;
        for i in 0..=last {
            let stage = &mut self.stages[i];
            let mut caches = vec![stage.new_cache(prompt.len())?];
            let out = stage.forward(input, &segment, &mut caches)?;
            if i == last {
                return Ok(out
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?);
            }
            // What a worker sends (f32 on the host), then what the next worker does with it.
            let wire: Tensor = out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let next = &self.stages[i + 1];
            input = StageInput::Hidden(wire.to_device(next.device())?.to_dtype(next.dtype())?);
        }
        unreachable!("at least one stage")
    }
}
