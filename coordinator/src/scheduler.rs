//! The scheduler: one task owns every sequence and drives the pipeline step by step.
//!
//! Client handlers talk to it through a [`SchedulerHandle`] (commands over a channel, replies on
//! oneshots); nothing else touches sequence state. Active sequences are split into one group per stage,
//! and each group travels the pipeline as a micro-batch (prefill chunks for new sequences, one token
//! for the others) while the other groups occupy the other stages. A group that comes back is
//! re-formed with whatever is ready, so requests that arrive join at the next step, and finished or
//! cancelled ones leave at once, releasing their caches.
//!
//! When a stage's worker is lost (a step fails to reach it, or a health check finds it down), the
//! scheduler stops launching steps and puts the stage back on a spare, or on the same address once
//! its worker returns (`recovery.rs`). With a spare, every sequence waits and is then *replayed*:
//! under a fresh id its prompt and the tokens generated so far are prefilled again, rebuilding the
//! caches on every stage, and generation continues with the tokens it would have produced. Without
//! one, the affected requests fail at once with UNAVAILABLE naming the stage and worker (those in a
//! step on the lost stage, those ready and those still queued), new ones are refused until the stage
//! is back, and the coordinator serves again as soon as it is. A step out on a lost stage is not
//! waited for: a hung worker would hold it until the stage timeout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_model::TextTokenizer;
use tokio::sync::{mpsc, oneshot, watch};

use crate::detokenize::{IncrementalDecoder, StopCheck, StopMatcher};
pub use crate::events::EventSender;
use crate::events::{Failure, FailureKind, FinishReason, Finished, GenerationEvent, TokenEvent};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Sampled, Sampling, StageHandle, StepEntry, StepResult};
use crate::recovery::{self, RecoveryConfig};
use crate::CoordinatorError;

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
    /// Positions of one micro-batch over all its sequences (vLLM's `max_num_batched_tokens`): a
    /// burst of prompts goes through in parts, each step short next to the stage timeout (2,048
    /// positions of SmolLM2 take ~8 s on 2 cores), and decoding sequences wait at most one part.
    pub max_step_positions: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self {
            max_active: 64,
            max_queued: 1024,
            max_prefill_chunk: 512,
            max_step_positions: 2048,
        }
    }
}

/// What a request asks for, validated and tokenized.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub top_logprobs: u32,
    pub ignore_eos: bool,
    /// When the request must be over, queueing included.
    pub deadline: Instant,
    /// Names the request in every log line about it, here and on the workers.
    pub request_id: Arc<str>,
    /// The name of the client's API key (`-` on an open port), for logs.
    pub caller: Arc<str>,
}

/// A snapshot for `Info` and `Health`.
#[derive(Debug, Clone)]
pub struct SchedulerStats {
    pub active: usize,
    pub queued: usize,
    /// The stages as they are now (a lost stage may have moved to a spare).
    pub pipeline: Arc<Pipeline>,
    /// Why the pipeline cannot serve right now, while a stage is lost.
    pub outage: Option<String>,
    /// The stage that is lost, if one is.
    pub lost_stage: Option<usize>,
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
    recovery: RecoveryConfig,
    metrics: Arc<Metrics>,
) -> SchedulerHandle {
    let (commands, inbox) = mpsc::channel(256);
    let (loss_reports, losses) = mpsc::unbounded_channel();
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
        next_step_id: 1,
        spares: recovery.spares.clone(),
        recovery: Arc::new(recovery),
        loss_reports,
        losses,
        outage: None,
        replacing: None,
        stalled: Vec::new(),
        lost: watch::channel(None).0,
        metrics,
    };
    scheduler.watch_health();
    let task = tokio::spawn(scheduler.run());
    // Without its scheduler the coordinator would listen on and refuse everything: a panic there
    // ends the process, with a line saying so, for a supervisor to restart it.
    tokio::spawn(async move {
        if let Err(e) = task.await {
            if e.is_panic() {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(%message, "the scheduler panicked; the coordinator exits");
                eprintln!("strata: the scheduler panicked ({message}); the coordinator exits");
                std::process::exit(70);
            }
        }
    });
    SchedulerHandle { commands }
}

/// A stage lost, and since when.
struct Outage {
    stage: usize,
    address: String,
    reason: String,
    since: Instant,
    /// Whether sequences wait for a replacement (a spare is configured and the wait is not over)
    /// instead of failing at once.
    replaying: bool,
}

impl Outage {
    fn failure(&self) -> Failure {
        let hint = if self.replaying {
            "moving it to a spare worker"
        } else {
            "no spare worker took it (--spare); the coordinator reloads the stage as soon as the worker is back"
        };
        Failure::new(
            FailureKind::Unavailable,
            format!(
                "stage {} (worker {}) is unavailable: {}; {hint}",
                self.stage, self.address, self.reason
            ),
        )
    }
}

/// A health check's report that a stage of pipeline `generation` is down.
struct LossReport {
    generation: u64,
    stage: usize,
    reason: String,
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
    /// Goes in a micro-batch of its own: the first stage had no room for a step it shared, and
    /// alone it learns whether the refusal is its own.
    alone: bool,
}

impl Sequence {
    /// Whether part of the prompt is still to be fed.
    fn is_prefilling(&self) -> bool {
        self.cached < self.request.prompt_ids.len()
    }

    /// Positions the next step feeds: the prompt in chunks of `chunk`, then one token per step.
    /// A replayed sequence (see `hold_for_replay`) goes through exactly the steps it went through the first
    /// time, so its caches, logits and tokens come out bit for bit the same (a generated token fed
    /// as part of a longer prefill would go through differently shaped matmuls and could round
    /// differently, and flip a near-tie).
    fn next_feed(&self, chunk: usize) -> usize {
        let prompt = self.request.prompt_ids.len();
        if self.is_prefilling() {
            (prompt - self.cached).min(chunk)
        } else {
            1
        }
    }
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
    next_step_id: u64,
    recovery: Arc<RecoveryConfig>,
    /// Workers that may take over a lost stage, in order.
    spares: Vec<String>,
    loss_reports: mpsc::UnboundedSender<LossReport>,
    losses: mpsc::UnboundedReceiver<LossReport>,
    outage: Option<Outage>,
    /// Loading the lost stage on another worker (or the same one, back).
    replacing: Option<BoxFuture<'static, StageHandle>>,
    /// Sequences waiting for the lost stage to be back, to be replayed.
    stalled: Vec<Sequence>,
    /// The last loss, so the steps out on that pipeline generation end at once.
    lost: watch::Sender<Option<LostStage>>,
    metrics: Arc<Metrics>,
}

/// A stage lost on one pipeline generation, as the steps out on it are told.
#[derive(Debug, Clone)]
struct LostStage {
    generation: u64,
    stage: usize,
    address: String,
    reason: String,
}

/// Waits until `generation` of the pipeline has lost a stage, and says so as a step's error.
async fn lost_on(
    mut lost: watch::Receiver<Option<LostStage>>,
    generation: u64,
) -> CoordinatorError {
    let loss = lost
        .wait_for(|l| l.as_ref().is_some_and(|l| l.generation == generation))
        .await
        .ok()
        .and_then(|l| l.clone());
    match loss {
        Some(l) => CoordinatorError::stage_lost(l.stage, l.address, &l.reason),
        // The scheduler is gone, and with it whoever waits for this step.
        None => std::future::pending().await,
    }
}

/// A micro-batch back from the pipeline, with the sequences it carried.
struct FinishedStep {
    /// The pipeline generation it ran on.
    generation: u64,
    sequences: Vec<Sequence>,
    /// How many positions of each sequence the step fed.
    fed: Vec<usize>,
    result: Result<StepResult, CoordinatorError>,
}

impl Scheduler {
    fn active(&self) -> usize {
        self.ready.len() + self.in_flight_sequences + self.stalled.len()
    }

    async fn run(mut self) {
        loop {
            if self.inbox_closed && self.active() == 0 && self.waiting.is_empty() {
                return;
            }
            let replay_deadline = self
                .outage
                .as_ref()
                .filter(|o| o.replaying)
                .map(|o| o.since + self.recovery.replay_deadline);
            tokio::select! {
                command = self.inbox.recv(), if !self.inbox_closed => match command {
                    Some(command) => self.handle(command),
                    // Every handle is gone (shutdown): finish what is in flight, then stop.
                    None => self.inbox_closed = true,
                },
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => self.complete(done),
                Some(loss) = self.losses.recv() => {
                    if loss.generation == self.pipeline.generation() {
                        self.lose_stage(loss.stage, loss.reason);
                    }
                }
                handle = async { self.replacing.as_mut().expect("guarded").await }, if self.replacing.is_some() => {
                    self.replacing = None;
                    self.stage_back(handle);
                }
                _ = sleep_until_or_never(replay_deadline) => self.give_up_replay(),
            }
            while let Ok(command) = self.inbox.try_recv() {
                self.handle(command);
            }
            self.drop_cancelled();
            self.admit();
            self.launch();
        }
    }

    /// Health-checks the current pipeline in the background; a loss comes back as a [`LossReport`].
    fn watch_health(&self) {
        let reports = self.loss_reports.clone();
        recovery::watch(
            Arc::downgrade(&self.pipeline),
            self.recovery.health_interval,
            move |generation, stage, reason| {
                reports
                    .send(LossReport {
                        generation,
                        stage,
                        reason,
                    })
                    .is_ok()
            },
        );
    }

    /// Stage `stage` of the current pipeline is gone: stop launching, start putting it back, and
    /// either hold every sequence for replay (a spare exists) or fail them now.
    fn lose_stage(&mut self, stage: usize, reason: String) {
        if self.outage.is_some() {
            return;
        }
        let lost = self.pipeline.stages()[stage].clone();
        tracing::error!(stage, worker = %lost.address, %reason, spares = ?self.spares, "stage lost");
        self.lost.send_replace(Some(LostStage {
            generation: self.pipeline.generation(),
            stage,
            address: lost.address.clone(),
            reason: reason.clone(),
        }));
        let mut candidates = self.spares.clone();
        candidates.push(lost.address.clone());
        self.replacing = Some(
            recovery::replace_stage(
                self.recovery.clone(),
                stage,
                lost.layers.clone(),
                candidates,
            )
            .boxed(),
        );
        self.outage = Some(Outage {
            stage,
            address: lost.address,
            reason,
            since: Instant::now(),
            replaying: !self.spares.is_empty(),
        });
        let ready = std::mem::take(&mut self.ready);
        self.hold_for_replay(ready);
        self.fail_waiting_unless_replaying();
    }

    /// Requests still queued when no replay is coming: they fail now, as new ones are refused,
    /// instead of waiting for their deadline.
    fn fail_waiting_unless_replaying(&mut self) {
        let Some(outage) = self.outage.as_ref().filter(|o| !o.replaying) else {
            return;
        };
        let failure = outage.failure();
        let waiting: Vec<Sequence> = self.waiting.drain(..).collect();
        // Queued sequences hold nothing on any stage: there is nothing to release.
        for seq in waiting {
            let _ = seq.events.send(Err(failure.clone()));
        }
    }

    /// Sequences whose caches are incomplete: held for replay while replaying, else failed.
    fn hold_for_replay(&mut self, sequences: Vec<Sequence>) {
        let Some(outage) = &self.outage else {
            // The stage is back: replay at once. Always started over: even with `cached == 0`, a
            // step that failed half-way may have left positions on the stages before the lost one.
            let mut sequences = sequences;
            self.start_over(&mut sequences);
            self.ready.extend(sequences);
            return;
        };
        if outage.replaying {
            self.stalled.extend(sequences);
            return;
        }
        let failure = outage.failure();
        self.fail(sequences, |_| failure.clone());
    }

    /// Frees `sequences` on every stage and gives each a fresh id with nothing cached, so its next
    /// steps prefill its prompt and generated tokens again on every stage.
    fn start_over(&self, sequences: &mut [Sequence]) {
        self.release(sequences.iter().map(|s| s.id).collect());
        for seq in sequences {
            seq.id = fresh_seq_id();
            seq.cached = 0;
        }
    }

    /// Ends `sequences` with an error each (`status(seq)`) and frees whatever they cached. All are
    /// released, not only those with `cached > 0`: a step that failed half-way may have left a
    /// first chunk on the stages before the one that failed.
    fn fail(&self, sequences: Vec<Sequence>, failure: impl Fn(&Sequence) -> Failure) {
        let ids = sequences.iter().map(|s| s.id).collect();
        for seq in &sequences {
            let failure = failure(seq);
            tracing::warn!(
                request_id = %seq.request.request_id,
                key = %seq.request.caller,
                seq = seq.id,
                kind = ?failure.kind,
                message = failure.message,
                "request failed"
            );
            let _ = seq.events.send(Err(failure));
        }
        self.release(ids);
    }

    /// The lost stage runs again on `handle`'s worker: swap it in and replay the held sequences.
    fn stage_back(&mut self, handle: StageHandle) {
        let Some(outage) = self.outage.take() else {
            return;
        };
        tracing::info!(
            stage = outage.stage,
            worker = %handle.address,
            down_ms = outage.since.elapsed().as_millis() as u64,
            replaying = self.stalled.len(),
            "stage back"
        );
        if handle.address != outage.address {
            // The spare is now a stage; the lost worker may come back and be a spare.
            self.spares.retain(|a| *a != handle.address);
            self.spares.push(outage.address.clone());
        }
        self.pipeline = Arc::new(self.pipeline.with_stage(outage.stage, handle));
        self.watch_health();
        let stalled = std::mem::take(&mut self.stalled);
        self.hold_for_replay(stalled);
    }

    /// Sequences waited for a replacement too long: fail them; from now on requests are refused
    /// until the stage is back.
    fn give_up_replay(&mut self) {
        let Some(outage) = self.outage.as_mut() else {
            return;
        };
        outage.replaying = false;
        outage.reason = format!(
            "{} (no worker took the stage within {:?})",
            outage.reason, self.recovery.replay_deadline
        );
        let stalled = std::mem::take(&mut self.stalled);
        self.hold_for_replay(stalled);
        self.fail_waiting_unless_replaying();
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit {
                request,
                events,
                arrived,
                accepted,
            } => {
                if let Some(outage) = self.outage.as_ref().filter(|o| !o.replaying) {
                    let _ =
                        accepted.send(Err(CoordinatorError::Unavailable(outage.failure().message)));
                    return;
                }
                if self.waiting.len() >= self.limits.max_queued {
                    let _ = accepted.send(Err(CoordinatorError::Overloaded(format!(
                        "{} requests are already waiting (limit {}); try again later",
                        self.waiting.len(),
                        self.limits.max_queued
                    ))));
                    return;
                }
                let id = fresh_seq_id();
                tracing::debug!(
                    request_id = %request.request_id,
                    key = %request.caller,
                    seq = id,
                    prompt_tokens = request.prompt_ids.len(),
                    "request queued"
                );
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
                    alone: false,
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
                    pipeline: self.pipeline.clone(),
                    outage: self.outage.as_ref().map(|o| o.failure().message),
                    lost_stage: self.outage.as_ref().map(|o| o.stage),
                });
            }
        }
    }

    fn admit(&mut self) {
        // Nothing runs until the stage is back: queued requests keep their place (while a
        // replay is coming) instead of taking slots.
        if self.outage.is_some() {
            return;
        }
        // A sequence admitted holds a cache on every stage: no more than the tightest stage keeps.
        let max_active = self
            .limits
            .max_active
            .min(self.pipeline.limits().max_sequences)
            .max(1);
        while self.active() < max_active {
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
        self.expire();
        self.waiting.retain(|s| !s.events.is_closed());
        self.stalled.retain(|s| !s.events.is_closed());
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

    /// Ends sequences past their deadline (not in flight: those are checked when they return) with
    /// DEADLINE_EXCEEDED.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for list in [&mut self.ready, &mut self.stalled] {
            let (late, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|s| s.request.deadline <= now);
            *list = kept;
            expired.extend(late);
        }
        let (late, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|s| s.request.deadline <= now);
        self.waiting = kept;
        expired.extend(late);
        if expired.is_empty() {
            return;
        }
        self.fail(expired, |seq| {
            Failure::new(
                FailureKind::DeadlineExceeded,
                format!(
                    "the request ran out of time after {:.1} s and {} generated tokens",
                    seq.arrived.elapsed().as_secs_f64(),
                    seq.generated
                ),
            )
        });
    }

    /// Frees sequences on every stage without holding up the scheduler.
    fn release(&self, ids: Vec<u64>) {
        self.release_then_finish(ids, Vec::new());
    }

    /// Frees sequences on every stage, then sends their final events: a client that has seen its
    /// `finished` event finds its caches gone from every worker. Runs beside the scheduler.
    fn release_then_finish(&self, ids: Vec<u64>, finals: Vec<(EventSender, GenerationEvent)>) {
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
    fn launch(&mut self) {
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
            let mut sequences: Vec<Sequence> = if prompts_only {
                self.take_prompts(group)
            } else {
                let group = group.min(self.ready.len());
                self.ready.drain(..group).collect()
            };
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
            let entries: Vec<StepEntry> = sequences
                .iter()
                .zip(&fed)
                .map(|(s, &n)| StepEntry {
                    seq_id: s.id,
                    start_pos: s.cached as u32,
                    tokens: s.tokens[s.cached..s.cached + n].to_vec(),
                    sampling: s.request.sampling,
                    top_logprobs: s.request.top_logprobs,
                    request_id: (s.cached == 0).then(|| s.request.request_id.clone()),
                })
                .collect();
            let step_id = self.next_step_id;
            self.next_step_id += 1;
            self.in_flight_sequences += sequences.len();
            let pipeline = self.pipeline.clone();
            let lost = lost_on(self.lost.subscribe(), pipeline.generation());
            self.in_flight.push(Box::pin(async move {
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
    fn take_prompts(&mut self, limit: usize) -> Vec<Sequence> {
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
    fn complete(&mut self, done: FinishedStep) {
        self.in_flight_sequences -= done.sequences.len();
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
            // A stage refused the whole step for room (its KV bound) before changing anything on
            // itself or the stages after it: each sequence retries alone, and only one that is
            // refused alone fails, not its batch-mates. The stages before the refusing one did
            // append this step's positions, so past the first stage each sequence starts again
            // under a fresh id (as a replay does) and prefills everything it has alone.
            Err(e) if done.sequences.len() > 1 && e.capacity_refusal_stage().is_some() => {
                let stage = e.capacity_refusal_stage().unwrap_or(0);
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
            Err(e) => {
                tracing::error!(error = %e, "step failed");
                let failure = Failure::from(e);
                self.fail(done.sequences, |_| failure.clone());
                return;
            }
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
        let mut to_replay = Vec::new();
        let mut finished = Vec::new();
        let mut finals = Vec::new();
        for ((mut seq, fed), (_, sampled)) in
            done.sequences.into_iter().zip(done.fed).zip(result.sampled)
        {
            seq.cached += fed;
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
                    finals.push((
                        seq.events.clone(),
                        finish(&mut seq, reason, &self.tokenizer),
                    ));
                    finished.push(seq.id);
                }
                None if stale => to_replay.push(seq),
                None => self.ready.push(seq),
            }
        }
        self.release_then_finish(finished, finals);
        if !to_replay.is_empty() {
            self.hold_for_replay(to_replay);
        }
    }
}

/// A new sequence id: 64 random bits (never 0), so whoever else holds the cluster's token cannot
/// guess another request's sequence to release it or feed it (ids counted up from 1 could be).
fn fresh_seq_id() -> u64 {
    crate::service::random_u64().max(1)
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

/// Takes a sampled token into the sequence and streams it. Returns why the sequence ends, if it does.
fn advance(
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
fn finish(seq: &mut Sequence, reason: FinishReason, tokenizer: &TextTokenizer) -> GenerationEvent {
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
    })
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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
