//! One sequence being generated: what it holds, what its next step feeds, and how a sampled
//! token becomes its stream's next event (or its last).

use std::time::Duration;

use strata_model::TextTokenizer;
use tokio::time::Instant;

use super::GenerationRequest;
use crate::detokenize::{IncrementalDecoder, StopCheck, StopMatcher};
use crate::events::{EventSender, FinishReason, Finished, GenerationEvent, TokenEvent};
use crate::pipeline::Sampled;

/// A sequence being generated.
pub(super) struct Sequence {
    pub(super) id: u64,
    pub(super) request: GenerationRequest,
    /// Prompt followed by generated ids.
    pub(super) tokens: Vec<u32>,
    /// Positions the stages hold in their caches; `tokens[cached..]` is the next input.
    pub(super) cached: usize,
    pub(super) generated: usize,
    pub(super) decoder: IncrementalDecoder,
    pub(super) stop: StopMatcher,
    pub(super) events: EventSender,
    pub(super) arrived: Instant,
    pub(super) started: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    pub(super) stage_forward: Vec<Duration>,
    pub(super) stage_hop: Vec<Duration>,
    /// Goes in a micro-batch of its own: the first stage had no room for a step it shared, and
    /// alone it learns whether the refusal is its own.
    pub(super) alone: bool,
    /// What the penalties look at, for a request whose sampling has any.
    pub(super) seen: Option<SeenTokens>,
    /// The grammar's state, for a constrained request: it has taken in every generated token.
    pub(super) constraint: Option<Box<crate::grammar::Constraint>>,
    /// The prefix cache's entry (a parked or a running sequence) this one's first step copies
    /// `cached` positions from (the stages hold nothing under this id until that step is back).
    pub(super) fork: Option<u64>,
    /// Prompt positions copied from the prefix cache, for `usage`.
    pub(super) reused: usize,
    /// The prefix cache was asked (once, before the first step: a replay recomputes everything,
    /// taking the steps the sequence took).
    pub(super) prefix_checked: bool,
}

impl Sequence {
    /// A sequence with nothing fed yet, streaming to `events`.
    pub(super) fn new(
        id: u64,
        mut request: GenerationRequest,
        events: EventSender,
        arrived: Instant,
        num_stages: usize,
    ) -> Self {
        Self {
            constraint: request.constraint.take(),
            id,
            tokens: request.prompt_ids.clone(),
            seen: request
                .sampling
                .penalizes()
                .then(|| SeenTokens::new(&request.prompt_ids)),
            stop: StopMatcher::new(request.stop.clone()),
            request,
            cached: 0,
            generated: 0,
            decoder: IncrementalDecoder::default(),
            events,
            arrived,
            started: None,
            first_token: None,
            stage_forward: vec![Duration::ZERO; num_stages],
            stage_hop: vec![Duration::ZERO; num_stages],
            alone: false,
            fork: None,
            reused: 0,
            prefix_checked: false,
        }
    }

    /// Forgets a copy the first step was to make: everything is computed instead.
    pub(super) fn drop_fork(&mut self) {
        if self.fork.take().is_some() {
            self.cached = 0;
            self.reused = 0;
        }
    }

    /// Whether a step that feeds `n` positions samples this sequence's next token (and not a
    /// prefill chunk's, or a replayed token's, which is known already).
    pub(super) fn samples_after(&self, n: usize) -> bool {
        self.cached + n == self.tokens.len()
    }

    /// Whether part of the prompt is still to be fed.
    pub(super) fn is_prefilling(&self) -> bool {
        self.cached < self.request.prompt_ids.len()
    }

    /// Positions the next step feeds: the prompt in chunks of `chunk`, then one token per step.
    /// A replayed sequence (see `hold_for_replay`) goes through exactly the steps it went through the first
    /// time, so its caches, logits and tokens come out bit for bit the same (a generated token fed
    /// as part of a longer prefill would go through differently shaped matmuls and could round
    /// differently, and flip a near-tie).
    pub(super) fn next_feed(&self, chunk: usize) -> usize {
        let prompt = self.request.prompt_ids.len();
        if self.is_prefilling() {
            (prompt - self.cached).min(chunk)
        } else {
            1
        }
    }
}

/// A sequence's distinct tokens and how many times each was generated (0: only in the prompt). The
/// last stage sees hidden states, not tokens, so the penalties' view of the text comes from here with
/// every step; a replay starts from the same state, since it is kept here rather than on a worker.
#[derive(Debug, Clone, Default)]
pub(super) struct SeenTokens(std::collections::BTreeMap<u32, u32>);

impl SeenTokens {
    pub(super) fn new(prompt: &[u32]) -> Self {
        Self(prompt.iter().map(|&id| (id, 0)).collect())
    }

    pub(super) fn generated(&mut self, id: u32) {
        *self.0.entry(id).or_default() += 1;
    }

    /// `(id, times generated)` for each token, in id order.
    pub(super) fn to_vec(&self) -> Vec<(u32, u32)> {
        self.0.iter().map(|(&id, &n)| (id, n)).collect()
    }
}

/// Takes a sampled token into the sequence and streams it. Returns why the sequence ends, if it does.
pub(super) fn advance(
    seq: &mut Sequence,
    sampled: Sampled,
    tokenizer: &TextTokenizer,
    context_length: usize,
) -> Option<FinishReason> {
    let now = Instant::now();
    seq.first_token.get_or_insert(now);
    if !seq.request.ignore_eos && tokenizer.is_end_of_generation(sampled.id) {
        return Some(FinishReason::Eos);
    }
    seq.tokens.push(sampled.id);
    seq.generated += 1;
    if let Some(seen) = &mut seq.seen {
        seen.generated(sampled.id);
    }
    if let Some(constraint) = &mut seq.constraint {
        constraint.accept(sampled.id);
    }
    let delta = match seq.decoder.push(tokenizer, sampled.id) {
        Ok(delta) => delta,
        Err(e) => {
            tracing::error!(error = %e, "detokenization failed");
            String::new()
        }
    };
    let (text, stopped) = match seq.stop.push(&delta) {
        StopCheck::Continue(text) => (text, false),
        StopCheck::Stopped(text) => (text, true),
    };
    let _ = seq.events.send(Ok(GenerationEvent::Token(TokenEvent {
        id: sampled.id,
        text,
        logprob: sampled.logprob,
        top_logprobs: sampled.top_logprobs,
        elapsed: now.duration_since(seq.arrived),
    })));
    if stopped {
        Some(FinishReason::Stop)
    } else if seq.generated >= seq.request.max_tokens {
        Some(FinishReason::Length)
    } else if seq.tokens.len() >= context_length {
        Some(FinishReason::Context)
    } else {
        None
    }
}

/// The final event of a sequence.
pub(super) fn finish(
    seq: &mut Sequence,
    reason: FinishReason,
    tokenizer: &TextTokenizer,
) -> GenerationEvent {
    let trailing = if reason == FinishReason::Stop {
        String::new()
    } else {
        let held = seq.decoder.finish(tokenizer).unwrap_or_default();
        match seq.stop.push(&held) {
            StopCheck::Stopped(text) => text,
            StopCheck::Continue(text) => text + &seq.stop.flush(),
        }
    };
    let now = Instant::now();
    tracing::info!(
        request_id = %seq.request.request_id,
        key = %seq.request.caller,
        seq = seq.id,
        reason = reason.label(),
        prompt_tokens = seq.request.prompt_ids.len(),
        cached_tokens = seq.reused,
        tokens = seq.generated,
        ttft_ms = seq.first_token.map(|t| t.duration_since(seq.arrived).as_millis() as u64),
        total_ms = now.duration_since(seq.arrived).as_millis() as u64,
        "request finished"
    );
    GenerationEvent::Finished(Finished {
        reason,
        prompt_ids: seq.request.prompt_ids.clone(),
        generated_tokens: seq.generated as u32,
        queue: seq.started.unwrap_or(now).duration_since(seq.arrived),
        ttft: seq.first_token.unwrap_or(now).duration_since(seq.arrived),
        total: now.duration_since(seq.arrived),
        stage_forward: seq.stage_forward.clone(),
        stage_hop: seq.stage_hop.clone(),
        trailing_text: trailing,
        cached_tokens: seq.reused as u32,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use super::{advance, finish, Sequence};
    use crate::events::{EventReceiver, FinishReason, GenerationEvent};
    use crate::pipeline::Sampled;
    use crate::scheduler::tests::{request, smollm2};
    use crate::scheduler::GenerationRequest;

    fn sequence(prompt: Vec<u32>, max_tokens: usize, stop: &[&str]) -> (Sequence, EventReceiver) {
        let (events, received) = mpsc::unbounded_channel();
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let request = GenerationRequest {
            prompt_ids: prompt,
            max_tokens,
            stop,
            ..request(Duration::from_secs(60))
        };
        (
            Sequence::new(1, request, events, Instant::now(), 2),
            received,
        )
    }

    fn sampled(id: u32) -> Sampled {
        Sampled {
            id,
            logprob: -0.5,
            top_logprobs: vec![(id, -0.5)],
        }
    }

    #[test]
    fn penalized_sequences_count_the_tokens_they_generate() {
        let tokenizer = smollm2();
        let (plain, _events) = sequence(vec![5, 3, 5], 8, &[]);
        assert!(plain.seen.is_none(), "nothing to send without penalties");
        let (events, _received) = mpsc::unbounded_channel();
        let penalized = GenerationRequest {
            prompt_ids: vec![5, 3, 5],
            sampling: crate::pipeline::Sampling {
                frequency_penalty: 0.5,
                ..crate::pipeline::Sampling::greedy()
            },
            ..request(Duration::from_secs(60))
        };
        let mut seq = Sequence::new(1, penalized, events, Instant::now(), 2);
        // The prompt's tokens, once each, generated 0 times.
        assert_eq!(seq.seen.as_ref().unwrap().to_vec(), [(3, 0), (5, 0)]);
        for id in [7, 5, 7] {
            advance(&mut seq, sampled(id), &tokenizer, 8192);
        }
        assert_eq!(
            seq.seen.as_ref().unwrap().to_vec(),
            [(3, 0), (5, 1), (7, 2)]
        );
    }

    #[test]
    fn a_prompt_is_fed_in_chunks_then_one_token_a_step() {
        let (mut seq, _events) = sequence((0..1000).collect(), 8, &[]);
        let mut feeds = Vec::new();
        while seq.is_prefilling() {
            let n = seq.next_feed(512);
            feeds.push(n);
            seq.cached += n;
        }
        feeds.push(seq.next_feed(512));
        assert_eq!(feeds, [512, 488, 1]);
    }

    #[test]
    fn tokens_stream_as_text_and_the_last_event_says_why_it_ended() {
        let tokenizer = smollm2();
        let ids = tokenizer.encode(" one two three four").unwrap();
        let (mut seq, mut events) = sequence(vec![1, 2], ids.len(), &[]);
        let mut reasons = Vec::new();
        for &id in &ids {
            reasons.push(advance(&mut seq, sampled(id), &tokenizer, 8192));
        }
        // Only the last token ends it: `max_tokens` reached.
        assert_eq!(reasons.last(), Some(&Some(FinishReason::Length)));
        assert!(reasons[..ids.len() - 1].iter().all(Option::is_none));
        let last = finish(&mut seq, FinishReason::Length, &tokenizer);
        let mut text = String::new();
        while let Ok(event) = events.try_recv() {
            match event.unwrap() {
                GenerationEvent::Token(t) => {
                    assert_eq!(t.top_logprobs, [(t.id, -0.5)]);
                    text += &t.text;
                }
                GenerationEvent::Finished(_) => unreachable!("finish returns the last event"),
            }
        }
        let GenerationEvent::Finished(end) = last else {
            panic!("not a finish: {last:?}")
        };
        assert_eq!(text + &end.trailing_text, " one two three four");
        assert_eq!(end.generated_tokens as usize, ids.len());
        assert_eq!(end.prompt_ids, [1, 2]);
        assert!(end.ttft <= end.total && end.queue <= end.total);
        assert_eq!(seq.tokens.len(), 2 + ids.len());
    }

    #[test]
    fn end_of_generation_and_stop_strings_and_a_full_context_end_a_sequence() {
        let tokenizer = smollm2();
        let eos = tokenizer.end_of_generation_ids()[0];
        let (mut seq, mut events) = sequence(vec![1], 100, &[]);
        assert_eq!(
            advance(&mut seq, sampled(eos), &tokenizer, 8192),
            Some(FinishReason::Eos)
        );
        // The end token is neither streamed nor counted.
        assert!(events.try_recv().is_err());
        assert_eq!(seq.generated, 0);

        let (mut seq, mut events) = sequence(vec![1], 100, &[" three"]);
        let ids = tokenizer.encode(" one two three four").unwrap();
        let reason = ids
            .iter()
            .find_map(|&id| advance(&mut seq, sampled(id), &tokenizer, 8192));
        assert_eq!(reason, Some(FinishReason::Stop));
        let mut text = String::new();
        while let Ok(Ok(GenerationEvent::Token(t))) = events.try_recv() {
            text += &t.text;
        }
        let GenerationEvent::Finished(end) = finish(&mut seq, FinishReason::Stop, &tokenizer)
        else {
            panic!("not a finish")
        };
        // The stop string is never streamed, and nothing trails it.
        assert_eq!(text, " one two");
        assert_eq!(end.trailing_text, "");

        let (mut seq, _events) = sequence(vec![1, 2, 3], 100, &[]);
        assert_eq!(
            advance(&mut seq, sampled(ids[0]), &tokenizer, 4),
            Some(FinishReason::Context)
        );
    }
}
