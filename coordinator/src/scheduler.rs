//! The scheduler: one task owns every sequence and drives the pipeline step by step.
//!
//! Client handlers talk to it through a [`SchedulerHandle`] (commands over a channel, replies on
//! oneshots); nothing else touches sequence state. Each step takes every active sequence (prefill for
//! new ones, one token for the others) as one micro-batch, so requests that arrive while others run
//! join at the next step, and finished or cancelled ones leave at once, releasing their caches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_model::TextTokenizer;
use strata_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::detokenize::{IncrementalDecoder, StopCheck, StopMatcher};
use crate::pipeline::{Pipeline, StepEntry};
use crate::CoordinatorError;

/// The events a client's stream receives.
pub type EventSender = mpsc::UnboundedSender<Result<v1::GenerateResponse, Status>>;

/// Bounds on the work the scheduler takes.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    /// Sequences generating at once; more wait in the queue.
    pub max_active: usize,
    /// Requests waiting; more are refused with RESOURCE_EXHAUSTED.
    pub max_queued: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self {
            max_active: 64,
            max_queued: 1024,
        }
    }
}

/// What a request asks for, validated and tokenized.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: v1::SamplingParams,
    pub stop: Vec<String>,
    pub top_logprobs: u32,
    pub ignore_eos: bool,
}

/// A snapshot for `Info`.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    pub active: usize,
    pub queued: usize,
}

enum Command {
    Submit {
        request: GenerationRequest,
        events: EventSender,
        arrived: Instant,
        accepted: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    Stats(oneshot::Sender<SchedulerStats>),
}

/// A cloneable handle to the scheduler task.
#[derive(Clone)]
pub struct SchedulerHandle {
    commands: mpsc::Sender<Command>,
}

impl SchedulerHandle {
    /// Queues a request; its tokens arrive on `events`. Refused if the queue is full.
    pub async fn submit(
        &self,
        request: GenerationRequest,
        events: EventSender,
    ) -> Result<(), CoordinatorError> {
        let (accepted, answer) = oneshot::channel();
        self.commands
            .send(Command::Submit {
                request,
                events,
                arrived: Instant::now(),
                accepted,
            })
            .await
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    pub async fn stats(&self) -> Result<SchedulerStats, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Stats(reply))
            .await
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)
    }
}

/// Starts the scheduler task. It ends when every handle is dropped and its work is done.
pub fn spawn(
    pipeline: Pipeline,
    tokenizer: Arc<TextTokenizer>,
    limits: SchedulerLimits,
    context_length: usize,
) -> SchedulerHandle {
    let (commands, inbox) = mpsc::channel(256);
    let scheduler = Scheduler {
        inbox,
        pipeline,
        tokenizer,
        limits,
        context_length,
        waiting: VecDeque::new(),
        active: Vec::new(),
        next_seq_id: 1,
        next_step_id: 1,
    };
    tokio::spawn(scheduler.run());
    SchedulerHandle { commands }
}

/// A sequence being generated.
struct Sequence {
    id: u64,
    request: GenerationRequest,
    /// Prompt followed by generated ids.
    tokens: Vec<u32>,
    /// Positions the stages hold in their caches; `tokens[cached..]` is the next input.
    cached: usize,
    generated: usize,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    events: EventSender,
    arrived: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    stage_forward: Vec<Duration>,
    stage_hop: Vec<Duration>,
}

struct Scheduler {
    inbox: mpsc::Receiver<Command>,
    pipeline: Pipeline,
    tokenizer: Arc<TextTokenizer>,
    limits: SchedulerLimits,
    context_length: usize,
    waiting: VecDeque<Sequence>,
    active: Vec<Sequence>,
    next_seq_id: u64,
    next_step_id: u64,
}

impl Scheduler {
    async fn run(mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match self.inbox.recv().await {
                    Some(command) => self.handle(command),
                    None => return,
                }
            }
            while let Ok(command) = self.inbox.try_recv() {
                self.handle(command);
            }
            self.drop_cancelled().await;
            self.admit();
            if self.active.is_empty() {
                continue;
            }
            self.step().await;
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit {
                request,
                events,
                arrived,
                accepted,
            } => {
                if self.waiting.len() >= self.limits.max_queued {
                    let _ = accepted.send(Err(CoordinatorError::Overloaded(format!(
                        "{} requests are already waiting (limit {}); try again later",
                        self.waiting.len(),
                        self.limits.max_queued
                    ))));
                    return;
                }
                let id = self.next_seq_id;
                self.next_seq_id += 1;
                let num_stages = self.pipeline.stages().len();
                self.waiting.push_back(Sequence {
                    id,
                    tokens: request.prompt_ids.clone(),
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
                });
                let _ = accepted.send(Ok(()));
            }
            Command::Stats(reply) => {
                let _ = reply.send(SchedulerStats {
                    active: self.active.len(),
                    queued: self.waiting.len(),
                });
            }
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.limits.max_active {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.events.is_closed() {
                continue;
            }
            seq.started = Some(Instant::now());
            self.active.push(seq);
        }
    }

    /// Drops sequences whose client went away and frees their caches on every stage.
    async fn drop_cancelled(&mut self) {
        self.waiting.retain(|s| !s.events.is_closed());
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|s| s.events.is_closed());
        self.active = kept;
        let ids: Vec<u64> = gone.iter().filter(|s| s.cached > 0).map(|s| s.id).collect();
        if !ids.is_empty() {
            tracing::debug!(?ids, "client left; releasing");
            self.pipeline.release(ids).await;
        }
    }

    async fn step(&mut self) {
        let entries: Vec<StepEntry> = self
            .active
            .iter()
            .map(|s| StepEntry {
                seq_id: s.id,
                start_pos: s.cached as u32,
                tokens: s.tokens[s.cached..].to_vec(),
                sampling: s.request.sampling,
                top_logprobs: s.request.top_logprobs,
            })
            .collect();
        let step_id = self.next_step_id;
        self.next_step_id += 1;
        let result = match self.pipeline.step(step_id, &entries).await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "step failed");
                let status = Status::from(e);
                let failed = std::mem::take(&mut self.active);
                for seq in &failed {
                    let _ = seq.events.send(Err(status.clone()));
                }
                self.pipeline
                    .release(failed.iter().map(|s| s.id).collect())
                    .await;
                return;
            }
        };
        let mut finished = Vec::new();
        for (seq, (_, sampled)) in self.active.iter_mut().zip(result.sampled) {
            seq.cached = seq.tokens.len();
            for (i, (forward, round_trip)) in result
                .stage_forward
                .iter()
                .zip(&result.stage_round_trip)
                .enumerate()
            {
                seq.stage_forward[i] += *forward;
                seq.stage_hop[i] += round_trip.saturating_sub(*forward);
            }
            if let Some(reason) = advance(seq, sampled, &self.tokenizer, self.context_length) {
                finished.push((seq.id, reason));
            }
        }
        if finished.is_empty() {
            return;
        }
        let mut done = Vec::new();
        self.active
            .retain_mut(|seq| match finished.iter().find(|(id, _)| *id == seq.id) {
                Some((_, reason)) => {
                    finish(seq, *reason, &self.tokenizer);
                    done.push(seq.id);
                    false
                }
                None => true,
            });
        self.pipeline.release(done).await;
    }
}

/// Takes a sampled token into the sequence and streams it. Returns why the sequence ends, if it does.
fn advance(
    seq: &mut Sequence,
    sampled: v1::SampledToken,
    tokenizer: &TextTokenizer,
    context_length: usize,
) -> Option<v1::FinishReason> {
    let now = Instant::now();
    seq.first_token.get_or_insert(now);
    if !seq.request.ignore_eos && tokenizer.is_end_of_generation(sampled.id) {
        return Some(v1::FinishReason::Eos);
    }
    seq.tokens.push(sampled.id);
    seq.generated += 1;
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
    let event = v1::GeneratedToken {
        id: sampled.id,
        text,
        logprob: sampled.logprob,
        top_logprobs: sampled.top_logprobs,
        elapsed_us: now.duration_since(seq.arrived).as_micros() as u64,
    };
    let _ = seq.events.send(Ok(v1::GenerateResponse {
        event: Some(v1::generate_response::Event::Token(event)),
    }));
    if stopped {
        Some(v1::FinishReason::Stop)
    } else if seq.generated >= seq.request.max_tokens {
        Some(v1::FinishReason::Length)
    } else if seq.tokens.len() >= context_length {
        Some(v1::FinishReason::Context)
    } else {
        None
    }
}

/// Sends the final event of a sequence.
fn finish(seq: &mut Sequence, reason: v1::FinishReason, tokenizer: &TextTokenizer) {
    let trailing = if reason == v1::FinishReason::Stop {
        String::new()
    } else {
        let held = seq.decoder.finish(tokenizer).unwrap_or_default();
        match seq.stop.push(&held) {
            StopCheck::Stopped(text) => text,
            StopCheck::Continue(text) => text + &seq.stop.flush(),
        }
    };
    let now = Instant::now();
    let micros = |d: Duration| d.as_micros() as u64;
    let finished = v1::GenerateFinished {
        reason: reason as i32,
        prompt_ids: seq.request.prompt_ids.clone(),
        generated_tokens: seq.generated as u32,
        queue_us: micros(seq.started.unwrap_or(now).duration_since(seq.arrived)),
        ttft_us: micros(seq.first_token.unwrap_or(now).duration_since(seq.arrived)),
        total_us: micros(now.duration_since(seq.arrived)),
        stage_forward_us: seq.stage_forward.iter().map(|d| micros(*d)).collect(),
        stage_hop_us: seq.stage_hop.iter().map(|d| micros(*d)).collect(),
        trailing_text: trailing,
    };
    let _ = seq.events.send(Ok(v1::GenerateResponse {
        event: Some(v1::generate_response::Event::Finished(finished)),
    }));
}
