//! The scheduler's timing on a paused clock, with a stage being replaced: nothing reaches a worker,
//! so what happens when is the scheduler's own doing.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use strata_model::{ModelFile, TextTokenizer};
use strata_transport::Security;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::outage::Outage;
use super::{GenerationRequest, Scheduler, SchedulerHandle, SchedulerLimits, Sequence};
use crate::events::{EventReceiver, FailureKind};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Sampling};
use crate::recovery::RecoveryConfig;
use crate::CoordinatorError;

/// The default model's tokenizer, as `strata fetch-model` caches it (CI fetches it first).
pub(crate) fn smollm2() -> TextTokenizer {
    let home = std::env::var_os("STRATA_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/strata")
        });
    let path = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model =
        ModelFile::open(&path).unwrap_or_else(|e| panic!("{e} (run `strata fetch-model` first)"));
    TextTokenizer::load(&model).unwrap()
}

/// A request that must be over `within` from now.
pub(super) fn request(within: Duration) -> GenerationRequest {
    GenerationRequest {
        prompt_ids: vec![1, 2, 3],
        max_tokens: 8,
        sampling: Sampling::greedy(),
        stop: Vec::new(),
        top_logprobs: 0,
        ignore_eos: false,
        deadline: Instant::now() + within,
        request_id: Arc::from("test"),
        caller: Arc::from("-"),
        constraint: None,
    }
}

/// A scheduler of two unreachable stages whose second is being moved to a spare that never takes
/// it: sequences wait up to `replay_deadline` for it.
fn replacing_a_stage(replay_deadline: Duration) -> (Scheduler, SchedulerHandle) {
    let mut recovery = RecoveryConfig::new(
        Security::none(),
        "fingerprint".into(),
        "model.gguf".into(),
        1 << 20,
    );
    recovery.spares = vec!["127.0.0.1:1".into()];
    recovery.replay_deadline = replay_deadline;
    let (mut scheduler, handle) = Scheduler::new(
        Pipeline::unreachable(&[0..15, 15..30], Duration::from_secs(30)),
        Arc::new(smollm2()),
        SchedulerLimits::default(),
        8192,
        recovery,
        Arc::new(Metrics::new()),
    );
    scheduler.outage = Some(Outage {
        stage: 1,
        address: "127.0.0.1:1".into(),
        reason: "the worker stopped answering".into(),
        since: Instant::now(),
        replaying: true,
    });
    scheduler.replacing = Some(futures::future::pending().boxed());
    (scheduler, handle)
}

async fn submit(handle: &SchedulerHandle, within: Duration) -> EventReceiver {
    let (events, received) = mpsc::unbounded_channel();
    handle.submit(request(within), events).await.unwrap();
    received
}

/// The first failure on `events`, and how long after `start` it came.
async fn failure_after(
    events: &mut EventReceiver,
    start: Instant,
) -> (FailureKind, String, Duration) {
    let failure = events
        .recv()
        .await
        .expect("the stream ended without an event")
        .expect_err("a token instead of a failure");
    (failure.kind, failure.message, start.elapsed())
}

/// Whether `at` is `want`, up to the timer's millisecond.
fn on_time(at: Duration, want: Duration) -> bool {
    at >= want && at <= want + Duration::from_millis(2)
}

#[tokio::test(start_paused = true)]
async fn sequences_end_at_their_deadline_while_a_stage_is_being_replaced() {
    let start = Instant::now();
    let (mut scheduler, handle) = replacing_a_stage(Duration::from_secs(60));
    // One sequence was generating when the stage was lost: it waits for the replay.
    let (events, mut stalled) = mpsc::unbounded_channel();
    scheduler.stalled.push(Sequence::new(
        7,
        request(Duration::from_secs(3)),
        events,
        start,
        2,
    ));
    tokio::spawn(scheduler.run());
    // New requests queue meanwhile (a replacement is coming).
    let mut early = submit(&handle, Duration::from_secs(5)).await;
    let mut late = submit(&handle, Duration::from_secs(8)).await;
    assert_eq!(handle.stats().await.unwrap().queued, 2);

    let (kind, message, at) = failure_after(&mut stalled, start).await;
    assert_eq!(kind, FailureKind::DeadlineExceeded);
    assert!(on_time(at, Duration::from_secs(3)), "{at:?}");
    assert!(message.contains("ran out of time after 3.0 s"), "{message}");
    let (kind, _, at) = failure_after(&mut early, start).await;
    assert_eq!(kind, FailureKind::DeadlineExceeded);
    assert!(on_time(at, Duration::from_secs(5)), "{at:?}");
    assert!(late.try_recv().is_err(), "the later request ended early");
    let (kind, _, at) = failure_after(&mut late, start).await;
    assert_eq!(kind, FailureKind::DeadlineExceeded);
    assert!(on_time(at, Duration::from_secs(8)), "{at:?}");

    let stats = handle.stats().await.unwrap();
    assert_eq!(
        (stats.active, stats.queued, stats.lost_stage),
        (0, 0, Some(1))
    );
}

#[tokio::test(start_paused = true)]
async fn when_no_worker_takes_the_stage_in_time_everything_waiting_fails_and_new_requests_are_refused(
) {
    let start = Instant::now();
    let (scheduler, handle) = replacing_a_stage(Duration::from_secs(10));
    tokio::spawn(scheduler.run());
    let mut waiting = submit(&handle, Duration::from_secs(600)).await;

    let (kind, message, at) = failure_after(&mut waiting, start).await;
    assert_eq!(kind, FailureKind::Unavailable);
    assert!(on_time(at, Duration::from_secs(10)), "{at:?}");
    assert!(
        message.contains("stage 1 (worker 127.0.0.1:1)")
            && message.contains("no worker took the stage within 10s"),
        "{message}"
    );
    // From now on requests are refused at once, until the stage is back.
    let (events, _received) = mpsc::unbounded_channel();
    let refused = handle
        .submit(request(Duration::from_secs(600)), events)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, CoordinatorError::Unavailable(m) if m.contains("no spare worker took it")),
        "{refused:?}"
    );
    assert_eq!(start.elapsed(), at, "the refusal waited");
}

#[tokio::test(start_paused = true)]
async fn a_sequence_started_over_computes_everything_and_reports_nothing_copied() {
    let (mut scheduler, _handle) = replacing_a_stage(Duration::from_secs(60));
    let (events, _received) = mpsc::unbounded_channel();
    let mut seq = Sequence::new(
        7,
        request(Duration::from_secs(60)),
        events,
        Instant::now(),
        2,
    );
    // Its first step was to copy 30 positions of entry 5 (refused past the first stage, say).
    seq.fork = Some(5);
    seq.cached = 30;
    seq.reused = 30;
    let mut sequences = [seq];
    scheduler.start_over(&mut sequences);
    let [seq] = sequences;
    assert_ne!(seq.id, 7, "a fresh id");
    assert_eq!((seq.cached, seq.fork, seq.reused), (0, None, 0));
}
