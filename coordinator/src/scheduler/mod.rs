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

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_model::TextTokenizer;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub use crate::events::EventSender;
use crate::events::{Failure, FailureKind, GenerationEvent};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Sampling, StageHandle};
use crate::prefix_cache::{Lookup, PrefixCache};
use crate::recovery::RecoveryConfig;
use crate::CoordinatorError;

mod outage;
mod sequence;
mod step;
#[cfg(test)]
pub(crate) mod tests;

use outage::{LossReport, LostStage, Outage};
use sequence::Sequence;
use step::FinishedStep;

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
    /// Finished sequences whose caches the stages keep for requests that start the same way (the
    /// prefix cache, see `prefix_cache.rs`); 0 turns it off. The workers bound their bytes.
    pub prefix_cache_entries: usize,
    /// Every API key's requests copy from every key's entries (one user's cluster). Off, each
    /// key's entries are its own, so no key learns what another sent.
    pub share_prefix_cache: bool,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self {
            max_active: 64,
            max_queued: 1024,
            max_prefill_chunk: 512,
            max_step_positions: 2048,
            prefix_cache_entries: 256,
            share_prefix_cache: false,
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
    /// The name of the client's API key (`-` on an open port), for logs; the tenant whose prefix
    /// cache entries the request may use.
    pub caller: Arc<str>,
    /// The grammar the output must follow, in its starting state.
    pub constraint: Option<Box<crate::grammar::Constraint>>,
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
    let (scheduler, handle) = Scheduler::new(
        pipeline,
        tokenizer,
        limits,
        context_length,
        recovery,
        metrics,
    );
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
    handle
}

impl Scheduler {
    /// The scheduler's state, idle, and the handle that feeds it; nothing runs until [`Self::run`].
    fn new(
        pipeline: Pipeline,
        tokenizer: Arc<TextTokenizer>,
        limits: SchedulerLimits,
        context_length: usize,
        recovery: RecoveryConfig,
        metrics: Arc<Metrics>,
    ) -> (Self, SchedulerHandle) {
        let (commands, inbox) = mpsc::channel(256);
        let (loss_reports, losses) = mpsc::unbounded_channel();
        let (eviction_reports, evictions) = mpsc::unbounded_channel();
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
            prefixes: PrefixCache::new(limits.prefix_cache_entries, limits.share_prefix_cache),
            eviction_reports,
            evictions,
        };
        (scheduler, SchedulerHandle { commands })
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
    /// The prefixes the stages hold parked.
    prefixes: PrefixCache,
    /// Parked sequences a stage dropped (found when parking), for `prefixes` to forget.
    eviction_reports: mpsc::UnboundedSender<Vec<u64>>,
    evictions: mpsc::UnboundedReceiver<Vec<u64>>,
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
            // Sequences out of time end on time, even when nothing else happens (while a stage is
            // being replaced, nothing else may for a long while).
            let wake = replay_deadline
                .into_iter()
                .chain(self.next_deadline())
                .min();
            tokio::select! {
                command = self.inbox.recv(), if !self.inbox_closed => match command {
                    Some(command) => self.handle(command),
                    // Every handle is gone (shutdown): finish what is in flight, then stop.
                    None => self.inbox_closed = true,
                },
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => self.complete(done),
                Some(dropped) = self.evictions.recv() => self.forget_prefixes(&dropped),
                Some(loss) = self.losses.recv() => {
                    if loss.generation == self.pipeline.generation() {
                        self.lose_stage(loss.stage, loss.reason);
                    }
                }
                handle = async { self.replacing.as_mut().expect("guarded").await }, if self.replacing.is_some() => {
                    self.replacing = None;
                    self.stage_back(handle);
                }
                _ = sleep_until_or_never(wake) => {
                    if replay_deadline.is_some_and(|at| at <= Instant::now()) {
                        self.give_up_replay();
                    }
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

    /// Ends `sequences` with an error each (`status(seq)`) and frees whatever they cached. All are
    /// released, not only those with `cached > 0`: a step that failed half-way may have left a
    /// first chunk on the stages before the one that failed.
    fn fail(&mut self, sequences: Vec<Sequence>, failure: impl Fn(&Sequence) -> Failure) {
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
                self.waiting
                    .push_back(Sequence::new(id, request, events, arrived, num_stages));
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
        // One that waited for room in a micro-batch may be an entry with nothing on the stages
        // (releasing forgets the others' entries).
        let unsent: Vec<u64> = gone
            .iter()
            .filter(|s| s.cached == 0)
            .map(|s| s.id)
            .collect();
        self.prefixes.forget(&unsent);
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

    /// The earliest deadline of the sequences [`Self::expire`] looks at.
    fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .chain(&self.ready)
            .chain(&self.stalled)
            .map(|s| s.request.deadline)
            .min()
    }

    /// Frees sequences on every stage without holding up the scheduler.
    fn release(&mut self, ids: Vec<u64>) {
        self.release_then_finish(ids, Vec::new(), Vec::new());
    }

    /// Frees sequences on every stage and parks others, then sends their final events: a client
    /// that has seen its `finished` event finds its sequence active on no worker. Runs beside the
    /// scheduler; parked sequences a stage did not keep come back as an eviction report.
    fn release_then_finish(
        &mut self,
        ids: Vec<u64>,
        park: Vec<u64>,
        finals: Vec<(EventSender, Result<GenerationEvent, Failure>)>,
    ) {
        if ids.is_empty() && park.is_empty() && finals.is_empty() {
            return;
        }
        // A running sequence's entry goes with it (parked ones freed here are gone already).
        self.prefixes.forget(&ids);
        let pipeline = self.pipeline.clone();
        let reports = self.eviction_reports.clone();
        tokio::spawn(async move {
            let (_, dropped) = futures::join!(pipeline.release(ids), pipeline.park(park));
            for (events, last) in finals {
                let _ = events.send(last);
            }
            if !dropped.is_empty() {
                let _ = reports.send(dropped);
            }
        });
    }

    /// Forgets prefix entries some stage no longer holds, and frees them on the others.
    fn forget_prefixes(&mut self, dropped: &[u64]) {
        let forgotten = self.prefixes.forget(dropped);
        if !forgotten.is_empty() {
            tracing::debug!(?forgotten, "prefix cache entries evicted by a worker");
            self.release(forgotten);
        }
    }

    /// Before a sequence's step: on its first, starts it on the longest prefix an entry shares
    /// with it, if any, and makes it an entry itself while it runs; drops a planned copy whose
    /// source is no longer an entry. Returns false if it waits instead (a prompt being prefilled
    /// is about to hold more of its own).
    fn settle_prefix(&mut self, seq: &mut Sequence) -> bool {
        if let Some(source) = seq.fork {
            if !self.prefixes.holds(source) {
                seq.drop_fork();
            }
            return true;
        }
        // Past its first step under this id: settled.
        if seq.cached > 0 {
            return true;
        }
        if !seq.prefix_checked {
            match self
                .prefixes
                .lookup(&seq.request.caller, &seq.request.prompt_ids)
            {
                Lookup::Wait => return false,
                Lookup::Copy { source, shared } => {
                    seq.fork = Some(source);
                    seq.cached = shared;
                    seq.reused = shared;
                }
                Lookup::Cold => {}
            }
            seq.prefix_checked = true;
        }
        self.prefixes
            .start(seq.id, &seq.request.caller, &seq.request.prompt_ids);
        true
    }
}

/// A new sequence id: 64 random bits (never 0), so whoever else holds the cluster's token cannot
/// guess another request's sequence to release it or feed it (ids counted up from 1 could be).
fn fresh_seq_id() -> u64 {
    crate::service::random_u64().max(1)
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
