//! The baseline without a pipeline: every layer in this process, driven directly through the worker's
//! engine (no gRPC, no hops), for measuring what the pipeline costs.

use std::path::Path;
use std::time::{Duration, Instant};

use strata_model::{ModelFile, TextTokenizer};
use strata_worker::engine::{Engine, EngineLimits, SequenceStep, StepInput, StepOutput};
use strata_worker::model::sampling::SamplingParams;
use strata_worker::model::StageOptions;

/// What a static batch measured.
#[derive(Debug, Clone)]
pub struct BatchRun {
    pub wall: Duration,
    /// Per sequence: time to its first token.
    pub ttft: Vec<Duration>,
    /// Per sequence: tokens generated.
    pub generated: Vec<usize>,
    /// Per sequence: when each token came, since the batch started.
    pub token_times: Vec<Vec<Duration>>,
    /// Time spent in prefill steps.
    pub prefill: Duration,
}

/// Prompt and decode speed of one sequence given as token ids: one prefill step, then `decode` greedy
/// steps, the same measurement as [`crate::candle_reference::measure`].
impl SingleProcess {
    pub async fn measure_ids(
        &self,
        prompt: &[u32],
        decode: usize,
    ) -> Result<crate::candle_reference::Speed, String> {
        let id = 42;
        let step = |input: Vec<u32>, pos: usize| SequenceStep {
            seq_id: id,
            start_pos: pos,
            input: StepInput::Tokens(input),
            sampling: Some(SamplingParams::GREEDY),
            top_logprobs: 0,
            seen: Vec::new(),
            allowed: Vec::new(),
            copy_from: None,
        };
        let started = Instant::now();
        let out = self
            .engine
            .forward(self.epoch, vec![step(prompt.to_vec(), 0)])
            .await
            .map_err(|e| e.to_string())?;
        let prompt_time = started.elapsed().as_secs_f64();
        let mut next = sampled(out.outputs)?;
        let started = Instant::now();
        for i in 0..decode {
            let out = self
                .engine
                .forward(self.epoch, vec![step(vec![next], prompt.len() + i)])
                .await
                .map_err(|e| e.to_string())?;
            next = sampled(out.outputs)?;
        }
        let decode_time = started.elapsed().as_secs_f64();
        self.engine
            .release(self.epoch, vec![id], false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(crate::candle_reference::Speed {
            prompt_tok_s: prompt.len() as f64 / prompt_time,
            decode_tok_s: decode as f64 / decode_time,
        })
    }
}

fn sampled(outputs: Vec<(u64, StepOutput)>) -> Result<u32, String> {
    match outputs.into_iter().next() {
        Some((_, StepOutput::Sampled(s))) => Ok(s.id),
        _ => Err("a full-model stage returned no token".into()),
    }
}

/// A whole model on the CPU of this process.
pub struct SingleProcess {
    engine: Engine,
    /// The epoch of the engine's one load.
    epoch: u64,
    tokenizer: TextTokenizer,
}

impl SingleProcess {
    /// Loads every layer of `model` with `threads` compute threads and warms it up.
    pub async fn load(model: &Path, threads: usize) -> Result<Self, String> {
        let model = ModelFile::open(model).map_err(|e| e.to_string())?;
        let tokenizer = TextTokenizer::load(&model).map_err(|e| e.to_string())?;
        let layers = model.config.num_layers;
        let engine = Engine::start(
            Some(model),
            candle_core::Device::Cpu,
            StageOptions::default(),
            EngineLimits::default(),
            threads,
        )
        .map_err(|e| e.to_string())?;
        let epoch = engine
            .load(0..layers, None, None)
            .await
            .map_err(|e| e.to_string())?
            .epoch;
        engine.warmup(16).await.map_err(|e| e.to_string())?;
        Ok(Self {
            engine,
            epoch,
            tokenizer,
        })
    }

    /// Generates `max_tokens` greedy tokens for every prompt at once: one prefill step with all
    /// prompts, then decode steps with all sequences (the same micro-batch shape the pipeline uses).
    pub async fn run(&self, prompts: &[String], max_tokens: usize) -> Result<BatchRun, String> {
        self.run_since(Instant::now(), prompts, max_tokens).await
    }

    /// [`Self::run`] with times measured from `started`, so that runs of several engines started
    /// together share one clock.
    pub async fn run_since(
        &self,
        started: Instant,
        prompts: &[String],
        max_tokens: usize,
    ) -> Result<BatchRun, String> {
        let mut seqs: Vec<(u64, Vec<u32>)> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let ids = self.tokenizer.encode(p).map_err(|e| e.to_string())?;
            seqs.push((1_000_000 + i as u64, ids));
        }
        let mut positions: Vec<usize> = vec![0; seqs.len()];
        let mut inputs: Vec<Vec<u32>> = seqs.iter().map(|(_, ids)| ids.clone()).collect();
        let mut ttft = vec![Duration::ZERO; seqs.len()];
        let mut generated = vec![0usize; seqs.len()];
        let mut token_times = vec![Vec::with_capacity(max_tokens); seqs.len()];
        let mut prefill = Duration::ZERO;
        for step in 0..max_tokens {
            let steps: Vec<SequenceStep> = seqs
                .iter()
                .zip(&inputs)
                .zip(&positions)
                .map(|(((id, _), input), &pos)| SequenceStep {
                    seq_id: *id,
                    start_pos: pos,
                    input: StepInput::Tokens(input.clone()),
                    sampling: Some(SamplingParams::GREEDY),
                    top_logprobs: 0,
                    seen: Vec::new(),
                    allowed: Vec::new(),
                    copy_from: None,
                })
                .collect();
            let step_started = Instant::now();
            let result = self
                .engine
                .forward(self.epoch, steps)
                .await
                .map_err(|e| e.to_string())?;
            if step == 0 {
                prefill = step_started.elapsed();
            }
            let step_done = started.elapsed();
            for (i, (_, output)) in result.outputs.into_iter().enumerate() {
                let StepOutput::Sampled(s) = output else {
                    return Err("a full-model stage returned hidden states".into());
                };
                positions[i] += inputs[i].len();
                inputs[i] = vec![s.id];
                generated[i] += 1;
                token_times[i].push(step_done);
                if step == 0 {
                    ttft[i] = step_done;
                }
            }
        }
        let ids: Vec<u64> = seqs.iter().map(|(id, _)| *id).collect();
        self.engine
            .release(self.epoch, ids, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(BatchRun {
            wall: started.elapsed(),
            ttft,
            generated,
            token_times,
            prefill,
        })
    }
}
