//! A micro-batch checked whole against the stage and the cached sequences, before anything changes:
//! a refused step leaves every cache as it was.

use std::collections::HashSet;
use std::ops::Range;

use super::{EngineLimits, SequenceStep, StepInput, MAX_TOP_LOGPROBS};
use crate::model::Stage;
use crate::WorkerError;

/// What validation needs to know of the loaded stage.
#[derive(Debug, Clone)]
pub(super) struct StageShape {
    pub layers: Range<usize>,
    pub is_first: bool,
    pub is_last: bool,
    pub context_length: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Bytes of keys and values one position takes over the stage's layers.
    pub kv_bytes_per_position: usize,
}

impl StageShape {
    pub fn of(stage: &Stage) -> Self {
        let config = stage.config();
        Self {
            layers: stage.layers(),
            is_first: stage.is_first(),
            is_last: stage.is_last(),
            context_length: config.context_length,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            kv_bytes_per_position: 2
                * stage.layers().len()
                * config.num_kv_heads
                * config.head_dim
                * stage.dtype().size_in_bytes(),
        }
    }
}

/// What the engine holds: each active sequence's length, each parked one's, and the active totals.
pub(super) struct Holding<F: Fn(u64) -> Option<usize>, P: Fn(u64) -> Option<usize>> {
    pub cached_len: F,
    pub parked_len: P,
    pub sequences: usize,
    pub bytes: usize,
}

/// Checks a micro-batch; returns the bytes of KV room it may need beyond what active sequences hold
/// (parked caches give way to it).
pub(super) fn validate<F: Fn(u64) -> Option<usize>, P: Fn(u64) -> Option<usize>>(
    steps: &[SequenceStep],
    stage: &StageShape,
    holding: &Holding<F, P>,
    limits: &EngineLimits,
    max_cache_bytes: usize,
) -> Result<usize, WorkerError> {
    if steps.is_empty() {
        return Err(WorkerError::invalid("Forward with no sequences"));
    }
    let mut seen = HashSet::with_capacity(steps.len());
    let mut rows = 0usize;
    let mut new_sequences = 0usize;
    let mut copied = 0usize;
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
        let parked = (holding.parked_len)(id).is_some();
        if let Some(source) = step.copy_from {
            check_copy(id, source, step.start_pos, holding)?;
            copied += step.start_pos;
        }
        match (holding.cached_len)(id) {
            None if parked => {
                return Err(WorkerError::invalid(format!(
                    "sequence {id} is parked: it cannot be fed again (a new sequence needs a new id)"
                )))
            }
            None if step.copy_from.is_some() => new_sequences += 1,
            Some(_) if step.copy_from.is_some() => {
                return Err(WorkerError::invalid(format!(
                    "sequence {id} exists: copy_prefix_from starts a new sequence"
                )))
            }
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
            Some(cached) if cached != step.start_pos => {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: start_pos {} is not where its cache ends; positions must follow \
                     on without gaps or rewrites",
                    step.start_pos,
                )))
            }
            Some(_) => {}
        }
        if step.start_pos + len > stage.context_length {
            return Err(WorkerError::invalid(format!(
                "sequence {id}: positions up to {} exceed the model's context length {}",
                step.start_pos + len,
                stage.context_length
            )));
        }
        check_input(id, &step.input, len, stage)?;
        if stage.is_last {
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
            check_token_ids(id, step, stage)?;
        }
    }
    if rows > limits.max_batch_rows {
        return Err(WorkerError::ResourceExhausted(format!(
            "Forward of {rows} positions is over this worker's limit of {}",
            limits.max_batch_rows
        )));
    }
    // Caches grow by doubling, so a step of `rows` positions may allocate up to twice their size;
    // a copied prefix takes its own size.
    let room = rows
        .saturating_mul(2)
        .saturating_add(copied)
        .saturating_mul(stage.kv_bytes_per_position);
    let could_need = holding.bytes.saturating_add(room);
    if could_need > max_cache_bytes {
        return Err(WorkerError::ResourceExhausted(format!(
            "KV caches would grow past this worker's limit of {} MiB (holding {} MiB for {} sequences); \
             retry when sequences finish",
            max_cache_bytes >> 20,
            holding.bytes >> 20,
            holding.sequences
        )));
    }
    if holding.sequences + new_sequences > limits.max_sequences {
        return Err(WorkerError::ResourceExhausted(format!(
            "{} new sequences would exceed this worker's limit of {} (holding {})",
            new_sequences, limits.max_sequences, holding.sequences
        )));
    }
    Ok(room)
}

/// A new sequence may start on the first `start_pos` positions of a sequence this worker holds.
fn check_copy<F: Fn(u64) -> Option<usize>, P: Fn(u64) -> Option<usize>>(
    id: u64,
    source: u64,
    start_pos: usize,
    holding: &Holding<F, P>,
) -> Result<(), WorkerError> {
    if source == id {
        return Err(WorkerError::invalid(format!(
            "sequence {id}: copy_prefix_from names the sequence itself"
        )));
    }
    if start_pos == 0 {
        return Err(WorkerError::invalid(format!(
            "sequence {id}: copy_prefix_from with start_pos 0 copies nothing"
        )));
    }
    let held = (holding.cached_len)(source).or_else(|| (holding.parked_len)(source));
    match held {
        None => Err(WorkerError::Aborted(format!(
            "sequence {id}: prefix source {source} is not held on this worker (ended, or its parked \
             cache was dropped for room); retry without copy_prefix_from"
        ))),
        Some(len) if len < start_pos => Err(WorkerError::invalid(format!(
            "sequence {id}: prefix source {source} holds fewer than the {start_pos} positions to copy"
        ))),
        Some(_) => Ok(()),
    }
}

/// Every token the sampler is told about (biased, or seen so far) is in the vocabulary, and the
/// tokens so far fit in a context.
fn check_token_ids(id: u64, step: &SequenceStep, stage: &StageShape) -> Result<(), WorkerError> {
    if step.seen.len() > stage.context_length {
        return Err(WorkerError::invalid(format!(
            "sequence {id}: {} seen tokens, more than the context length {}",
            step.seen.len(),
            stage.context_length
        )));
    }
    let bias = step
        .sampling
        .iter()
        .flat_map(|p| &p.logit_bias)
        .map(|b| b.0);
    let seen = step.seen.iter().map(|t| t.0);
    if let Some(bad) = bias.chain(seen).find(|&t| t as usize >= stage.vocab_size) {
        return Err(WorkerError::invalid(format!(
            "sequence {id}: token {bad} is outside the vocabulary of {}",
            stage.vocab_size
        )));
    }
    check_allowed(id, &step.allowed, stage.vocab_size)
}

/// A grammar's mask has one bit per token of the vocabulary (in whole words), none set past it,
/// and at least one set: sampling from nothing has no answer.
fn check_allowed(id: u64, allowed: &[u32], vocab: usize) -> Result<(), WorkerError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let refuse = |why: String| Err(WorkerError::invalid(format!("sequence {id}: {why}")));
    if allowed.len() != vocab.div_ceil(32) {
        return refuse(format!(
            "a mask of {} words for a vocabulary of {vocab} (wants {})",
            allowed.len(),
            vocab.div_ceil(32)
        ));
    }
    let tail_bits = vocab % 32;
    if tail_bits != 0 && allowed[allowed.len() - 1] >> tail_bits != 0 {
        return refuse(format!(
            "the mask allows tokens past the vocabulary of {vocab}"
        ));
    }
    if allowed.iter().all(|&w| w == 0) {
        return refuse("the mask allows no token".into());
    }
    Ok(())
}

/// Token ids go to the first stage only, inside the vocabulary; hidden states to the others, one
/// row of the model's width per position.
fn check_input(
    id: u64,
    input: &StepInput,
    len: usize,
    stage: &StageShape,
) -> Result<(), WorkerError> {
    match input {
        StepInput::Tokens(ids) => {
            if !stage.is_first {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: token ids sent to a stage starting at layer {}; it takes hidden states",
                    stage.layers.start
                )));
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= stage.vocab_size) {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: token id {bad} is outside the vocabulary of {}",
                    stage.vocab_size
                )));
            }
        }
        StepInput::Hidden(t) => {
            if stage.is_first {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: hidden states sent to the first stage; it takes token ids"
                )));
            }
            if t.dims() != [len, stage.hidden_size] {
                return Err(WorkerError::invalid(format!(
                    "sequence {id}: hidden states of shape {:?}; expected [n_tokens, {}]",
                    t.dims(),
                    stage.hidden_size
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::{validate, Holding, StageShape};
    use crate::engine::{EngineLimits, SequenceStep, StepInput};
    use crate::model::sampling::SamplingParams;
    use crate::WorkerError;

    /// A last stage of layers 2..4 (width 8, vocabulary 100, context 64), 1 KiB of KV per position.
    fn middle_and_last() -> StageShape {
        StageShape {
            layers: 2..4,
            is_first: false,
            is_last: true,
            context_length: 64,
            vocab_size: 100,
            hidden_size: 8,
            kv_bytes_per_position: 1024,
        }
    }

    fn first() -> StageShape {
        StageShape {
            layers: 0..2,
            is_first: true,
            is_last: false,
            ..middle_and_last()
        }
    }

    fn tokens(seq_id: u64, start_pos: usize, ids: &[u32]) -> SequenceStep {
        SequenceStep {
            seq_id,
            start_pos,
            input: StepInput::Tokens(ids.to_vec()),
            sampling: None,
            top_logprobs: 0,
            seen: Vec::new(),
            allowed: Vec::new(),
            copy_from: None,
        }
    }

    fn hidden(seq_id: u64, start_pos: usize, rows: usize, width: usize) -> SequenceStep {
        SequenceStep {
            seq_id,
            start_pos,
            input: StepInput::Hidden(
                Tensor::zeros((rows, width), DType::F32, &Device::Cpu).unwrap(),
            ),
            sampling: Some(SamplingParams::GREEDY),
            top_logprobs: 0,
            seen: Vec::new(),
            allowed: Vec::new(),
            copy_from: None,
        }
    }

    fn limits() -> EngineLimits {
        EngineLimits {
            max_sequences: 3,
            max_batch_rows: 16,
            ..EngineLimits::default()
        }
    }

    /// Validates against sequence 7 cached with 5 positions (5 KiB), sequence 9 parked with 6, and
    /// a 64 KiB bound; returns the error's kind and message, or "ok".
    fn check(stage: StageShape, steps: Vec<SequenceStep>) -> (String, String) {
        let cached = HashMap::from([(7u64, 5usize)]);
        let parked = HashMap::from([(9u64, 6usize)]);
        let holding = Holding {
            cached_len: |id| cached.get(&id).copied(),
            parked_len: |id| parked.get(&id).copied(),
            sequences: cached.len(),
            bytes: 5 * 1024,
        };
        match validate(&steps, &stage, &holding, &limits(), 64 << 10) {
            Ok(_) => ("ok".into(), String::new()),
            Err(e) => {
                let kind = match &e {
                    WorkerError::InvalidArgument(_) => "invalid",
                    WorkerError::NotFound(_) => "not found",
                    WorkerError::Aborted(_) => "aborted",
                    WorkerError::ResourceExhausted(_) => "exhausted",
                    _ => "other",
                };
                (kind.into(), e.to_string())
            }
        }
    }

    #[test]
    fn micro_batches_are_refused_with_the_reason_named() {
        let long = |id, start, n: usize| tokens(id, start, &vec![1; n]);
        let with_top = |n| SequenceStep {
            top_logprobs: n,
            ..hidden(1, 0, 1, 8)
        };
        let unsampled = SequenceStep {
            sampling: None,
            ..hidden(1, 0, 1, 8)
        };
        let seeing = |seen: Vec<(u32, u32)>| SequenceStep {
            seen,
            ..hidden(1, 0, 1, 8)
        };
        let masked = |allowed: Vec<u32>| SequenceStep {
            allowed,
            ..hidden(1, 0, 1, 8)
        };
        let biased = SequenceStep {
            sampling: Some(SamplingParams {
                logit_bias: vec![(3, 1.0), (100, -5.0)],
                ..SamplingParams::GREEDY
            }),
            ..hidden(1, 0, 1, 8)
        };
        let fork = |id, start_pos, source| SequenceStep {
            copy_from: Some(source),
            ..long(id, start_pos, 2)
        };
        let cases: Vec<(&str, StageShape, Vec<SequenceStep>, &str, &str)> = vec![
            (
                "a new sequence on an active one's prefix",
                first(),
                vec![fork(1, 5, 7)],
                "ok",
                "",
            ),
            (
                "a new sequence on a parked one's prefix, beside its source",
                first(),
                vec![fork(1, 4, 9), long(7, 5, 1)],
                "ok",
                "",
            ),
            (
                "a prefix longer than its source",
                first(),
                vec![fork(1, 7, 9)],
                "invalid",
                "fewer than the 7 positions",
            ),
            (
                "a prefix source that is gone",
                first(),
                vec![fork(1, 3, 8)],
                "aborted",
                "prefix source 8 is not held",
            ),
            (
                "a copy into an existing sequence",
                first(),
                vec![fork(7, 5, 9)],
                "invalid",
                "copy_prefix_from starts a new sequence",
            ),
            (
                "a copy of nothing",
                first(),
                vec![fork(1, 0, 7)],
                "invalid",
                "copies nothing",
            ),
            (
                "a copy of itself",
                first(),
                vec![fork(1, 2, 1)],
                "invalid",
                "names the sequence itself",
            ),
            (
                "a parked sequence fed again",
                first(),
                vec![long(9, 6, 1)],
                "invalid",
                "sequence 9 is parked",
            ),
            (
                "a parked id as a new sequence",
                first(),
                vec![long(9, 0, 1)],
                "invalid",
                "sequence 9 is parked",
            ),
            (
                "two new sequences on one prefix",
                first(),
                vec![
                    SequenceStep {
                        copy_from: Some(7),
                        ..long(1, 5, 12)
                    },
                    SequenceStep {
                        copy_from: Some(7),
                        ..long(2, 5, 2)
                    },
                ],
                "ok",
                "",
            ),
            (
                "a new and a cached sequence",
                first(),
                vec![long(1, 0, 4), long(7, 5, 1)],
                "ok",
                "",
            ),
            (
                "a last stage's step",
                middle_and_last(),
                vec![hidden(7, 5, 1, 8)],
                "ok",
                "",
            ),
            ("nothing", first(), vec![], "invalid", "no sequences"),
            (
                "a sequence twice",
                first(),
                vec![long(1, 0, 1), long(1, 0, 1)],
                "invalid",
                "appears twice",
            ),
            (
                "no positions",
                first(),
                vec![long(1, 0, 0)],
                "invalid",
                "no new positions",
            ),
            (
                "a position past an uncached start",
                first(),
                vec![long(2, 3, 1)],
                "not found",
                "not cached",
            ),
            (
                "a gap after the cache",
                first(),
                vec![long(7, 6, 1)],
                "invalid",
                "not where its cache ends",
            ),
            (
                "a rewrite inside the cache",
                first(),
                vec![long(7, 4, 1)],
                "invalid",
                "not where its cache ends",
            ),
            (
                "past the context",
                first(),
                vec![long(7, 5, 60)],
                "invalid",
                "context length 64",
            ),
            (
                "a token outside the vocabulary",
                first(),
                vec![tokens(1, 0, &[3, 100])],
                "invalid",
                "token id 100",
            ),
            (
                "tokens to a later stage",
                middle_and_last(),
                vec![long(1, 0, 1)],
                "invalid",
                "starting at layer 2",
            ),
            (
                "hidden states to the first stage",
                first(),
                vec![hidden(1, 0, 1, 8)],
                "invalid",
                "first stage",
            ),
            (
                "hidden states of the wrong width",
                middle_and_last(),
                vec![hidden(1, 0, 2, 9)],
                "invalid",
                "[2, 9]",
            ),
            (
                "no sampling on the last stage",
                middle_and_last(),
                vec![unsampled],
                "invalid",
                "sampling parameters",
            ),
            (
                "too many alternatives",
                middle_and_last(),
                vec![with_top(21)],
                "invalid",
                "limit of 20",
            ),
            (
                "penalties over tokens in the vocabulary",
                middle_and_last(),
                vec![seeing(vec![(0, 0), (99, 3)])],
                "ok",
                "",
            ),
            (
                "a seen token outside the vocabulary",
                middle_and_last(),
                vec![seeing(vec![(0, 0), (100, 1)])],
                "invalid",
                "token 100 is outside the vocabulary of 100",
            ),
            (
                "more seen tokens than a context holds",
                middle_and_last(),
                vec![seeing((0..65).map(|t| (t, 1)).collect())],
                "invalid",
                "65 seen tokens",
            ),
            (
                "a bias outside the vocabulary",
                middle_and_last(),
                vec![biased],
                "invalid",
                "token 100 is outside",
            ),
            (
                "a grammar's mask of the vocabulary",
                middle_and_last(),
                vec![masked(vec![0, 0, 0, 1 << 3])],
                "ok",
                "",
            ),
            (
                "a mask of the wrong size",
                middle_and_last(),
                vec![masked(vec![1; 3])],
                "invalid",
                "a mask of 3 words for a vocabulary of 100 (wants 4)",
            ),
            (
                "a mask past the vocabulary",
                middle_and_last(),
                vec![masked(vec![0, 0, 0, 1 << 4])],
                "invalid",
                "past the vocabulary of 100",
            ),
            (
                "a mask that allows nothing",
                middle_and_last(),
                vec![masked(vec![0; 4])],
                "invalid",
                "allows no token",
            ),
            (
                "the most alternatives",
                middle_and_last(),
                vec![with_top(20)],
                "ok",
                "",
            ),
            (
                "more rows than a step takes",
                first(),
                vec![long(1, 0, 10), long(2, 0, 7)],
                "exhausted",
                "17 positions",
            ),
            // 5 KiB held + 2 × 16 KiB may grow to 37 KiB: under 64. 30 positions would be 65 KiB.
            ("the most rows", first(), vec![long(1, 0, 16)], "ok", ""),
            (
                "more sequences than the worker keeps",
                first(),
                vec![long(1, 0, 1), long(2, 0, 1), long(3, 0, 1)],
                "exhausted",
                "limit of 3",
            ),
        ];
        for (what, stage, steps, kind, message) in cases {
            let (got_kind, got_message) = check(stage, steps);
            assert_eq!(got_kind, kind, "{what}: {got_message}");
            assert!(
                got_message.contains(message),
                "{what}: {got_message:?} lacks {message:?}"
            );
        }
    }

    #[test]
    fn the_kv_bound_counts_what_is_held_and_twice_what_a_step_adds() {
        let stage = first();
        let steps = vec![tokens(1, 0, &[1; 12])];
        let cached = HashMap::<u64, usize>::new();
        let held = |bytes| Holding {
            cached_len: |id: u64| cached.get(&id).copied(),
            parked_len: |_| None,
            sequences: 2,
            bytes,
        };
        // 12 positions may grow caches by 24 KiB.
        let bound = 64 << 10;
        assert!(validate(&steps, &stage, &held(40 << 10), &limits(), bound).is_ok());
        let refused =
            validate(&steps, &stage, &held((40 << 10) + 1), &limits(), bound).unwrap_err();
        assert!(
            matches!(refused, WorkerError::ResourceExhausted(_)),
            "{refused}"
        );
        assert!(refused.to_string().contains("for 2 sequences"), "{refused}");

        // A copied prefix takes its own size: 2 × 12 + 5 positions copied from sequence 7.
        let cached = HashMap::from([(7u64, 5usize)]);
        let held = |bytes| Holding {
            cached_len: |id: u64| cached.get(&id).copied(),
            parked_len: |_| None,
            sequences: 1,
            bytes,
        };
        let steps = vec![SequenceStep {
            copy_from: Some(7),
            ..tokens(1, 5, &[1; 12])
        }];
        assert_eq!(
            validate(&steps, &stage, &held(35 << 10), &limits(), bound).ok(),
            Some(29 << 10)
        );
        assert!(validate(&steps, &stage, &held((35 << 10) + 1), &limits(), bound).is_err());
    }
}
