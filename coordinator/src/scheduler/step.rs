//! A micro-batch's round trip: forming it from ready sequences within the stages' limits and the
//! step budget, sending it down the pipeline, and taking its tokens (or its failure) when it returns.

use std::time::Duration;

use super::outage::lost_on;
use super::sequence::{advance, finish, SeenTokens, Sequence};
use super::Scheduler;
use crate::error::Refusal;
use crate::events::{Failure, FailureKind};
use crate::pipeline::{StepEntry, StepResult};
use crate::CoordinatorError;

/// A micro-batch back from the pipeline, with the sequences it carried.
pub(super) struct FinishedStep {
    /// The pipeline generation it ran on.
    pub(super) generation: u64,
    pub(super) sequences: Vec<Sequence>,
    /// How many positions of each sequence the step fed.
    pub(super) fed: Vec<usize>,
    pub(super) result: Result<StepResult, CoordinatorError>,
}

impl Scheduler {
    /// Starts micro-batches while fewer than one per device are in flight: with `D` devices (one
    /// per stage unless stages share a GPU, see [`Pipeline::parallel_micro_batches`]) and `N`
    /// active sequences, `D` groups of about `N / D` keep every device busy (stage `s` runs group
    /// `g` while stage `s + 1` runs group `g - 1`). With fewer sequences than devices there is less
    /// to overlap, and each group is a single sequence.
    ///
    /// Where stages share a device, prompts may still start up to one micro-batch per stage: a
    /// prompt that arrives while a step is out does not wait for it, and a burst of prompts goes
    /// through in parts, so the first part's tokens come out before the whole burst is prefilled.
    /// Decoding sequences wait and join one micro-batch again once the pipeline drains.
    pub(super) fn launch(&mut self) {
        if self.outage.is_some() {
            return;
        }
        let devices = self.pipeline.parallel_micro_batches();
        let stages = self.pipeline.stages().len();
        // Every micro-batch fits the step budget and every stage's row limit, and so does one
        // prompt chunk alone.
        let max_rows = self
            .limits
            .max_step_positions
            .min(self.pipeline.limits().max_batch_rows)
            .max(1);
        let chunk = self.limits.max_prefill_chunk.clamp(1, max_rows);
        while !self.ready.is_empty() && self.in_flight.len() < stages {
            let prompts_only = self.in_flight.len() >= devices;
            let parallel = if prompts_only { stages } else { devices };
            let group = self.active().div_ceil(parallel).max(1);
            let sequences: Vec<Sequence> = if prompts_only {
                self.take_prompts(group)
            } else {
                let group = group.min(self.ready.len());
                self.ready.drain(..group).collect()
            };
            if sequences.is_empty() {
                break;
            }
            // A prompt that waits for another's prefill goes to the back, for a later launch.
            let mut going = Vec::with_capacity(sequences.len());
            for mut seq in sequences {
                if self.settle_prefix(&mut seq) {
                    going.push(seq);
                } else {
                    self.ready.push(seq);
                }
            }
            let mut sequences = going;
            if sequences.is_empty() {
                break;
            }
            let mut fed: Vec<usize> = sequences.iter().map(|s| s.next_feed(chunk)).collect();
            // The rest wait, at the front, for the next micro-batch: a burst goes through in parts,
            // and a sequence to retry alone goes alone.
            let fit = match sequences.iter().position(|s| s.alone) {
                Some(0) => 1,
                Some(first_alone) => rows_that_fit(&fed[..first_alone], max_rows),
                None => rows_that_fit(&fed, max_rows),
            };
            if fit < sequences.len() {
                fed.truncate(fit);
                let rest = sequences.split_off(fit);
                self.ready.splice(0..0, rest);
            }
            // The coordinator frees no entry that a step on its way copies from.
            for source in sequences.iter().filter_map(|s| s.fork) {
                self.prefixes.pin(source);
            }
            let entries: Vec<StepEntry> = sequences
                .iter()
                .zip(&fed)
                .map(|(s, &n)| StepEntry {
                    seq_id: s.id,
                    start_pos: s.cached as u32,
                    tokens: s.tokens[s.cached..s.cached + n].to_vec(),
                    sampling: s.request.sampling.clone(),
                    top_logprobs: s.request.top_logprobs,
                    seen: s.seen.as_ref().map(SeenTokens::to_vec).unwrap_or_default(),
                    request_id: (s.cached == 0 || s.fork.is_some())
                        .then(|| s.request.request_id.clone()),
                    allowed: Vec::new(),
                    copy_from: s.fork,
                })
                .collect();
            // Which sequences sample a new token in this step (and so need a mask, if constrained).
            let samples: Vec<bool> = sequences
                .iter()
                .zip(&fed)
                .map(|(s, &n)| s.samples_after(n))
                .collect();
            let constrained = sequences
                .iter()
                .zip(&samples)
                .any(|(s, &samples)| s.constraint.is_some() && samples);
            let step_id = self.next_step_id;
            self.next_step_id += 1;
            self.in_flight_sequences += sequences.len();
            let pipeline = self.pipeline.clone();
            let lost = lost_on(self.lost.subscribe(), pipeline.generation());
            self.in_flight.push(Box::pin(async move {
                let (sequences, entries) = if constrained {
                    grammar_masks(sequences, samples, entries).await
                } else {
                    (sequences, entries)
                };
                let result = tokio::select! {
                    result = pipeline.step(step_id, &entries) => result,
                    loss = lost => Err(loss),
                };
                FinishedStep {
                    generation: pipeline.generation(),
                    sequences,
                    fed,
                    result,
                }
            }));
        }
    }

    /// Up to `limit` ready sequences that still have prompt to feed, in order; the rest stay ready.
    pub(super) fn take_prompts(&mut self, limit: usize) -> Vec<Sequence> {
        let mut prompts = Vec::new();
        let mut kept = Vec::with_capacity(self.ready.len());
        for sequence in self.ready.drain(..) {
            if prompts.len() < limit && sequence.is_prefilling() {
                prompts.push(sequence);
            } else {
                kept.push(sequence);
            }
        }
        self.ready = kept;
        prompts
    }

    /// Takes a micro-batch back: streams its tokens, finishes sequences, returns the rest to `ready`.
    pub(super) fn complete(&mut self, done: FinishedStep) {
        self.in_flight_sequences -= done.sequences.len();
        for source in done.sequences.iter().filter_map(|s| s.fork) {
            self.prefixes.unpin(source);
        }
        let result = match done.result {
            Ok(result) => result,
            Err(e) if e.is_worker_loss() => {
                // The sequences keep what they had; the step is redone after the replay.
                if done.generation == self.pipeline.generation() {
                    if let Some(stage) = e.stage_index() {
                        self.lose_stage(stage, e.to_string());
                    }
                }
                self.hold_for_replay(done.sequences);
                return;
            }
            Err(e) => match e.refusal() {
                // A stage no longer held a prefix a sequence was to copy (it evicted the parked
                // cache while the step was on its way) and refused the step, changing nothing on
                // itself or after it. The step's sources are forgotten and its copies dropped; past
                // the first stage, every sequence starts again under a fresh id, as after a refusal
                // for room.
                Some((Refusal::PrefixGone, stage)) => {
                    tracing::info!(error = %e, stage, "a prefix source is gone; the step goes again without it");
                    let sources: Vec<u64> = done.sequences.iter().filter_map(|s| s.fork).collect();
                    let forgotten = self.prefixes.forget(&sources);
                    self.release(forgotten);
                    let mut retry = done.sequences;
                    if stage > 0 {
                        self.start_over(&mut retry);
                    }
                    for seq in &mut retry {
                        seq.drop_fork();
                    }
                    self.ready.splice(0..0, retry);
                    return;
                }
                // A stage refused the whole step for room (its KV bound) before changing anything
                // on itself or the stages after it: each sequence retries alone, and only one that
                // is refused alone fails, not its batch-mates. The stages before the refusing one
                // did append this step's positions, so past the first stage each sequence starts
                // again under a fresh id (as a replay does) and prefills everything it has alone.
                Some((Refusal::NoRoom, stage)) if done.sequences.len() > 1 => {
                    tracing::info!(error = %e, stage, sequences = done.sequences.len(), "no room for the step; its sequences retry one by one");
                    let mut retry = done.sequences;
                    if stage > 0 {
                        self.start_over(&mut retry);
                    }
                    for seq in &mut retry {
                        seq.alone = true;
                    }
                    self.ready.splice(0..0, retry);
                    return;
                }
                _ => {
                    tracing::error!(error = %e, "step failed");
                    let failure = Failure::from(e);
                    self.fail(done.sequences, |_| failure.clone());
                    return;
                }
            },
        };
        // A step that ran on a pipeline since lost (or being lost) produced valid tokens, but its
        // sequences' caches are incomplete now.
        let stale = done.generation != self.pipeline.generation() || self.outage.is_some();
        // Per stage: network, serialization and queueing around the worker's own compute.
        let stage_hop: Vec<Duration> = result
            .stage_forward
            .iter()
            .zip(&result.stage_round_trip)
            .map(|(forward, round_trip)| round_trip.saturating_sub(*forward))
            .collect();
        for (i, (forward, hop)) in result.stage_forward.iter().zip(&stage_hop).enumerate() {
            self.metrics
                .stage_step(i, forward.as_secs_f64(), hop.as_secs_f64());
        }
        self.forget_prefixes(&result.evicted);
        let mut to_replay = Vec::new();
        let mut finished = Vec::new();
        let mut park = Vec::new();
        let mut finals = Vec::new();
        for ((mut seq, fed), (_, sampled)) in
            done.sequences.into_iter().zip(done.fed).zip(result.sampled)
        {
            let prompt = seq.request.prompt_ids.len();
            // A prompt step back from every stage: its entry holds those positions now.
            if !stale && seq.cached < prompt {
                self.prefixes
                    .computed(seq.id, (seq.cached + fed).min(prompt));
            }
            seq.cached += fed;
            // A hit counts once its copy has run on every stage (an ABORTED copy goes again cold).
            if seq.fork.take().is_some() {
                self.metrics.prefix_hit(seq.reused);
            }
            seq.alone = false;
            for (i, (forward, hop)) in result.stage_forward.iter().zip(&stage_hop).enumerate() {
                seq.stage_forward[i] += *forward;
                seq.stage_hop[i] += *hop;
            }
            if seq.events.is_closed() {
                finished.push(seq.id);
                continue;
            }
            // A prompt fed in chunks samples a token only after its last chunk.
            if seq.cached < seq.tokens.len() {
                if stale {
                    to_replay.push(seq);
                } else {
                    self.ready.push(seq);
                }
                continue;
            }
            match advance(&mut seq, sampled, &self.tokenizer, self.context_length) {
                Some(reason) => {
                    let last = match seq.constraint.as_ref().and_then(|c| c.failure()) {
                        // The output stopped where its grammar failed: it does not follow it.
                        Some(why) => Err(Failure::new(
                            FailureKind::Internal,
                            format!("the output grammar failed ({why}); the output so far does not follow it"),
                        )),
                        None => Ok(finish(&mut seq, reason, &self.tokenizer)),
                    };
                    finals.push((seq.events.clone(), last));
                    // What its stages hold may start the next request (the next turn of a chat):
                    // the prompt's positions only, see `prefix_cache.rs`.
                    let prompt = seq.cached.min(seq.request.prompt_ids.len());
                    let offer = if stale {
                        Default::default()
                    } else {
                        self.prefixes
                            .offer(seq.id, &seq.request.caller, &seq.tokens[..prompt])
                    };
                    if offer.park {
                        park.push(seq.id);
                    } else {
                        finished.push(seq.id);
                    }
                    finished.extend(offer.dropped);
                }
                None if stale => to_replay.push(seq),
                None => self.ready.push(seq),
            }
        }
        self.release_then_finish(finished, park, finals);
        if !to_replay.is_empty() {
            self.hold_for_replay(to_replay);
        }
    }
}

/// How many of a micro-batch's candidates, feeding `feeds[i]` positions each, fit in `max_rows`
/// positions: the longest prefix that does, and never none (one chunk alone always fits).
fn rows_that_fit(feeds: &[usize], max_rows: usize) -> usize {
    let mut rows = 0usize;
    let fit = feeds
        .iter()
        .take_while(|&&n| {
            rows = rows.saturating_add(n);
            rows <= max_rows
        })
        .count();
    fit.max(1).min(feeds.len())
}

/// Fills in the grammar masks of the constrained sequences that sample in this step, on a blocking
/// thread: a mask takes the grammar through the tokens since the last one, parsing work the
/// scheduler's task must not wait on. (llguidance turns its own panics into errors, which end the
/// output: see `Constraint::next_mask`.)
async fn grammar_masks(
    mut sequences: Vec<Sequence>,
    samples: Vec<bool>,
    mut entries: Vec<StepEntry>,
) -> (Vec<Sequence>, Vec<StepEntry>) {
    let work = move || {
        for ((seq, entry), samples) in sequences.iter_mut().zip(&mut entries).zip(samples) {
            if let Some(constraint) = seq.constraint.as_mut().filter(|_| samples) {
                entry.allowed = constraint.next_mask();
            }
        }
        (sequences, entries)
    };
    tokio::task::spawn_blocking(work)
        .await
        .expect("a grammar mask does not panic")
}

#[cfg(test)]
mod tests {
    use super::rows_that_fit;

    #[test]
    fn micro_batches_keep_within_the_row_limit() {
        for (feeds, max_rows, fit) in [
            (&[512, 512, 512][..], 16_384, 3),
            (&[512; 64][..], 16_384, 32),
            (&[512, 100, 1][..], 612, 2),
            (&[512, 100, 1][..], 613, 3),
            (&[1; 8][..], 5, 5),
            // A prefix only: the decode after the prompt that does not fit waits too.
            (&[300, 400, 1][..], 500, 1),
            // One candidate always goes, even alone over the limit (the chunk is clamped to it).
            (&[700][..], 500, 1),
            (&[][..], 500, 0),
        ] {
            assert_eq!(
                rows_that_fit(feeds, max_rows),
                fit,
                "{feeds:?} in {max_rows}"
            );
        }
    }
}
