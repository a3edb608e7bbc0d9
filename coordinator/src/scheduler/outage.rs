//! Losing a stage and getting it back: the outage, the health checks' reports, the steps told to
//! stop waiting, and which sequences wait for replay, start over or fail.

use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{fresh_seq_id, Scheduler, Sequence};
use crate::events::{Failure, FailureKind};
use crate::pipeline::StageHandle;
use crate::recovery;
use crate::CoordinatorError;

/// A stage lost, and since when.
pub(super) struct Outage {
    pub(super) stage: usize,
    pub(super) address: String,
    pub(super) reason: String,
    pub(super) since: Instant,
    /// Whether sequences wait for a replacement (a spare is configured and the wait is not over)
    /// instead of failing at once.
    pub(super) replaying: bool,
}

impl Outage {
    pub(super) fn failure(&self) -> Failure {
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
pub(super) struct LossReport {
    pub(super) generation: u64,
    pub(super) stage: usize,
    pub(super) reason: String,
}

/// A stage lost on one pipeline generation, as the steps out on it are told.
#[derive(Debug, Clone)]
pub(super) struct LostStage {
    pub(super) generation: u64,
    pub(super) stage: usize,
    pub(super) address: String,
    pub(super) reason: String,
}

/// Waits until `generation` of the pipeline has lost a stage, and says so as a step's error.
pub(super) async fn lost_on(
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

impl Scheduler {
    /// Health-checks the current pipeline in the background; a loss comes back as a [`LossReport`].
    pub(super) fn watch_health(&self) {
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
    pub(super) fn lose_stage(&mut self, stage: usize, reason: String) {
        if self.outage.is_some() {
            return;
        }
        let lost = self.pipeline.stages()[stage].clone();
        // The replacement holds no caches, so no entry is whole any more.
        let entries = self.prefixes.clear();
        self.release(entries);
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
    pub(super) fn fail_waiting_unless_replaying(&mut self) {
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
    pub(super) fn hold_for_replay(&mut self, sequences: Vec<Sequence>) {
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

    /// Frees `sequences` on every stage and gives each a fresh id with nothing cached (and nothing
    /// copied), so its next steps prefill its prompt and generated tokens again on every stage.
    pub(super) fn start_over(&mut self, sequences: &mut [Sequence]) {
        self.release(sequences.iter().map(|s| s.id).collect());
        for seq in sequences {
            seq.id = fresh_seq_id();
            seq.cached = 0;
            seq.fork = None;
            // It computes every position now: nothing of its prompt came from the cache.
            seq.reused = 0;
        }
    }

    /// The lost stage runs again on `handle`'s worker: swap it in and replay the held sequences.
    pub(super) fn stage_back(&mut self, handle: StageHandle) {
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
    pub(super) fn give_up_replay(&mut self) {
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
}
