//! The last stage's tokens from its logits, and a step's hidden states joined for the device.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::SequenceStep;
use crate::model::sampling::{greedy_rows, sample, Sampled, SamplingParams};

/// Picks each sequence's next token from the last stage's logits `[sequences, vocab]`.
///
/// On an accelerator, greedy rows that want no alternatives never leave the device whole: their
/// token (the lowest index among the largest logits, as on the host) and its log-probability are
/// reduced there, and only those two numbers per row are copied back. Copying and scanning every
/// 32000-wide row on the host took a quarter of a 32-sequence GPU step. Other rows (temperature,
/// top-k/p, penalties, bias, a grammar's mask, requested alternatives) and CPU stages sample on the host from the
/// full row.
pub(super) fn sample_rows(
    logits: &Tensor,
    steps: &[SequenceStep],
    fused: bool,
) -> candle_core::Result<Vec<Sampled>> {
    const GREEDY: &SamplingParams = &SamplingParams::GREEDY;
    fn params(step: &SequenceStep) -> &SamplingParams {
        step.sampling.as_ref().unwrap_or(GREEDY)
    }
    let on_device = |step: &SequenceStep| {
        params(step).is_plain_greedy() && step.top_logprobs == 0 && step.allowed.is_empty()
    };
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
                sample(
                    &row,
                    params(step),
                    &step.seen,
                    &step.allowed,
                    position,
                    step.top_logprobs,
                )
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

/// The step's hidden states as one tensor on the stage's device, in its dtype. Joined on the host
/// and uploaded once: an upload per sequence cost a copy and a launch each on a GPU.
pub(super) fn upload_hidden(
    parts: &[&Tensor],
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
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
