//! Running ragged micro-batches through a stage, shared by the stage-level tests.

use candle_core::Tensor;
use strata_worker::model::kv_cache::SequenceKv;
use strata_worker::model::{Segment, Stage, StageInput};

/// Runs one step of `(sequence, new positions)` row groups: each sequence's cache comes out of
/// `caches` (a new one if the slot is empty) and goes back after the step. `input(rows)` makes the
/// step's input for that many rows.
pub fn run_step(
    stage: &mut Stage,
    caches: &mut [Option<SequenceKv>],
    step: &[(usize, usize)],
    input: impl FnOnce(usize) -> StageInput,
) -> Tensor {
    let mut segments = Vec::new();
    let mut batch = Vec::new();
    let mut offset = 0;
    for &(s, len) in step {
        let cache = caches[s]
            .take()
            .unwrap_or_else(|| stage.new_cache(len).unwrap());
        segments.push(Segment {
            offset,
            len,
            start_pos: cache.len(),
        });
        batch.push(cache);
        offset += len;
    }
    let out = stage.forward(input(offset), &segments, &mut batch).unwrap();
    for (&(s, _), cache) in step.iter().zip(batch) {
        caches[s] = Some(cache);
    }
    out
}
