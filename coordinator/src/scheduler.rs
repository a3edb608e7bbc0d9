//! The scheduler: one task owns every sequence and drives the pipeline step by step.
//!
//! Client handlers talk to it through a [`SchedulerHandle`] (commands over a channel, replies on
//! oneshots); nothing else touches sequence state. Active sequences are split into one group per stage,
//! and each group travels the pipeline as a micro-batch (prefill chunks for new sequences, one token
//! for the others) while the other groups occupy the other stages. A group that comes back is
//! re-formed with whatever is ready, so requests that arrive join at the next step, and finished or
//! cancelled ones leave at once, releasing their caches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_model::TextTokenizer;
use strata_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::detokenize::{IncrementalDecoder, StopCheck, StopMatcher};
use crate::pipeline::{Pipeline, StepEntry, StepResult};
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
    /// Prompt tokens of one sequence fed per step: a long prompt is prefilled over several steps so
    /// the sequences sharing its micro-batch keep decoding meanwhile.
    pub max_prefill_chunk: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self {
            max_active: 64,
            max_queued: 1024,
            max_prefill_chunk: 512,
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
        pipeline: Arc::new(pipeline),
        tokenizer,
        limits,
        context_length,
        waiting: VecDeque::new(),
        ready: Vec::new(),
        in_flight: FuturesUnordered::new(),
        in_flight_sequences: 0,
        inbox_closed: false,
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
    pipeline: Arc<Pipeline>,
    tokenizer: Arc<TextTokenizer>,
    limits: SchedulerLimits,
    context_length: usize,
    waiting: VecDeque<Sequence>,
    /// Admitted sequences not in a step right now.
    ready: Vec<Sequence>,
    /// Micro-batches travelling through the pipeline; each owns its sequences until it returns.
    in_flight: FuturesUnordered<BoxFuture<'static, FinishedStep>>,
    /// Sequences inside `in_flight`.
    in_flight_sequences: usize,
    inbox_closed: bool,
    next_seq_id: u64,
    next_step_id: u64,
}

/// A micro-batch back from the pipeline, with the sequences it carried.
struct FinishedStep {
    sequences: Vec<Sequence>,
    /// How many positions of each sequence the step fed.
    fed: Vec<usize>,
    result: Result<StepResult, CoordinatorError>,
}

impl Scheduler {
    fn active(&self) -> usize {
        self.ready.len() + self.in_flight_sequences
    }

    async fn run(mut self) {
        loop {
            if self.active() == 0 && self.waiting.is_empty() {
                match self.inbox.recv().await {
                    Some(command) => self.handle(command),
                    None => return,
                }
            } else if !self.in_flight.is_empty() {
                tokio::select! {
                    command = self.inbox.recv(), if !self.inbox_closed => match command {
                        Some(command) => self.handle(command),
                        // Every handle is gone (shutdown): finish what is in flight, then stop.
                        None => self.inbox_closed = true,
                    },
                    Some(done) = self.in_flight.next() => self.complete(done),
                }
            }
            while let Ok(command) = self.inbox.try_recv() {
                self.handle(command);
            }
            self.drop_cancelled();
            self.admit();
            self.launch();
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
                // Free active slots are taken at once, so the queue bound counts only the requests that
                // really wait, however many arrive together.
                self.admit();
                let _ = accepted.send(Ok(()));
            }
            Command::Stats(reply) => {
                let _ = reply.send(SchedulerStats {
                    active: self.active(),
                    queued: self.waiting.len(),
                });
            }
        }
    }

    fn admit(&mut self) {
        while self.active() < self.limits.max_active.max(1) {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.events.is_closed() {
                continue;
            }
            seq.started = Some(Instant::now());
            self.ready.push(seq);
        }
    }

    /// Drops waiting and ready sequences whose client went away, freeing their caches on every stage.
    /// (Sequences in flight are checked when their step returns.)
    fn drop_cancelled(&mut self) {
        self.waiting.retain(|s| !s.events.is_closed());
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready)
            .into_iter()
            .partition(|s| s.events.is_closed());
        self.ready = kept;
        let ids: Vec<u64> = gone.iter().filter(|s| s.cached > 0).map(|s| s.id).collect();
        if !ids.is_empty() {
            tracing::debug!(?ids, "client left; releasing");
            self.release(ids);
        }
    }

    /// Frees sequences on every stage without holding up the scheduler.
    fn release(&self, ids: Vec<u64>) {
        self.release_then_finish(ids, Vec::new());
    }

    /// Frees sequences on every stage, then sends their final events: a client that has seen its
    /// `finished` event finds its caches gone from every worker. Runs beside the scheduler.
    fn release_then_finish(&self, ids: Vec<u64>, finals: Vec<(EventSender, v1::GenerateResponse)>) {
        if ids.is_empty() && finals.is_empty() {
            return;
        }
        let pipeline = self.pipeline.clone();
        tokio::spawn(async move {
            pipeline.release(ids).await;
            for (events, last) in finals {
                let _ = events.send(Ok(last));
            }
        });
    }

    /// Starts micro-batches while fewer than one per stage are in flight: with `S` stages and `N`
    /// active sequences, `S` groups of about `N / S` keep every stage busy (stage `s` runs group `g`
    /// while stage `s + 1` runs group `g - 1`). With fewer sequences than stages there is less to
    /// overlap, and each group is a single sequence.
    fn launch(&mut self) {
        let stages = self.pipeline.stages().len();
        while !self.ready.is_empty() && self.in_flight.len() < stages {
            let group = self.active().div_ceil(stages).max(1).min(self.ready.len());
            let sequences: Vec<Sequence> = self.ready.drain(..group).collect();
            let chunk = self.limits.max_prefill_chunk.max(1);
            let fed: Vec<usize> = sequences
                .iter()
                .map(|s| (s.tokens.len() - s.cached).min(chunk))
                .collect();
            let entries: Vec<StepEntry> = sequences
                .iter()
                .zip(&fed)
                .map(|(s, &n)| StepEntry {
                    seq_id: s.id,
                    start_pos: s.cached as u32,
                    tokens: s.tokens[s.cached..s.cached + n].to_vec(),
                    sampling: s.request.sampling,
                    top_logprobs: s.request.top_logprobs,
                })
                .collect();
            let step_id = self.next_step_id;
            self.next_step_id += 1;
            self.in_flight_sequences += sequences.len();
            let pipeline = self.pipeline.clone();
            self.in_flight.push(Box::pin(async move {
                let result = pipeline.step(step_id, &entries).await;
                FinishedStep {
                    sequences,
                    fed,
                    result,
                }
            }));
        }
    }

    /// Takes a micro-batch back: streams its tokens, finishes sequences, returns the rest to `ready`.
    fn complete(&mut self, done: FinishedStep) {
        self.in_flight_sequences -= done.sequences.len();
        let result = match done.result {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "step failed");
                let status = Status::from(e);
                for seq in &done.sequences {
                    let _ = seq.events.send(Err(status.clone()));
                }
                self.release(done.sequences.iter().map(|s| s.id).collect());
                return;
            }
        };
        let mut finished = Vec::new();
        let mut finals = Vec::new();
        for ((mut seq, fed), (_, sampled)) in
            done.sequences.into_iter().zip(done.fed).zip(result.sampled)
        {
            seq.cached += fed;
            for (i, (forward, round_trip)) in result
                .stage_forward
                .iter()
                .zip(&result.stage_round_trip)
                .enumerate()
            {
                seq.stage_forward[i] += *forward;
                seq.stage_hop[i] += round_trip.saturating_sub(*forward);
            }
            if seq.events.is_closed() {
                finished.push(seq.id);
                continue;
            }
            // A prompt fed in chunks samples a token only after its last chunk.
            if seq.cached < seq.tokens.len() {
                self.ready.push(seq);
                continue;
            }
            match advance(&mut seq, sampled, &self.tokenizer, self.context_length) {
                Some(reason) => {
                    finals.push((
                        seq.events.clone(),
                        finish(&mut seq, reason, &self.tokenizer),
                    ));
                    finished.push(seq.id);
                }
                None => self.ready.push(seq),
            }
        }
        self.release_then_finish(finished, finals);
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

/// The final event of a sequence.
fn finish(
    seq: &mut Sequence,
    reason: v1::FinishReason,
    tokenizer: &TextTokenizer,
) -> v1::GenerateResponse {
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
    v1::GenerateResponse {
        event: Some(v1::generate_response::Event::Finished(finished)),
    }
}
