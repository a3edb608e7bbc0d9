//! Worker loss: noticing it between steps (health checks), and putting a lost stage back on a
//! worker: a spare, or the same address once its worker is back. The scheduler decides what happens
//! to the sequences meanwhile (see `scheduler.rs`).

use std::ops::Range;
use std::sync::{Arc, Weak};
use std::time::Duration;

use strata_proto::v1;
use strata_transport::Security;

use crate::pipeline::{self, Pipeline, StageHandle};
use crate::send_weights::WeightSender;
use crate::CoordinatorError;

/// Pause between rounds over the candidates while none takes the stage.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// What the coordinator needs to rebuild a stage elsewhere.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// Idle workers that can take over a lost stage, tried in order before the lost worker itself.
    pub spares: Vec<String>,
    pub security: Security,
    pub fingerprint: String,
    /// The coordinator's model file, for error messages.
    pub model_path: String,
    pub max_message_bytes: usize,
    /// Weights for a replacement worker without the model file.
    pub weights: Option<Arc<WeightSender>>,
    pub warmup: bool,
    /// How often every stage is asked for `Health` (a loss between steps is noticed within this).
    pub health_interval: Duration,
    /// How long sequences wait for a replacement stage before they fail with UNAVAILABLE.
    pub replay_deadline: Duration,
}

impl RecoveryConfig {
    /// No spares; health every second; sequences wait up to 60 s for a replacement.
    pub fn new(
        security: Security,
        fingerprint: String,
        model_path: String,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            spares: Vec::new(),
            security,
            fingerprint,
            model_path,
            max_message_bytes,
            weights: None,
            warmup: true,
            health_interval: Duration::from_secs(1),
            replay_deadline: Duration::from_secs(60),
        }
    }
}

/// Loads `layers` as stage `stage` on the first of `candidates` that takes it, round after round
/// until one does. The caller bounds how long it waits.
pub async fn replace_stage(
    config: Arc<RecoveryConfig>,
    stage: usize,
    layers: Range<usize>,
    candidates: Vec<String>,
) -> StageHandle {
    let mut round = 0u64;
    loop {
        for address in &candidates {
            match load_on(&config, stage, layers.clone(), address).await {
                Ok(handle) => {
                    tracing::info!(stage, worker = %address, layers = ?layers, "stage reloaded");
                    return handle;
                }
                Err(e) if round == 0 => {
                    tracing::warn!(stage, worker = %address, error = %e, "cannot move the stage here")
                }
                Err(e) => {
                    tracing::debug!(stage, worker = %address, error = %e, "still unavailable")
                }
            }
        }
        round += 1;
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn load_on(
    config: &RecoveryConfig,
    stage: usize,
    layers: Range<usize>,
    address: &str,
) -> Result<StageHandle, CoordinatorError> {
    let worker = pipeline::connect(address, &config.security, config.max_message_bytes).await?;
    pipeline::check_fingerprint(&worker, &config.fingerprint, &config.model_path)?;
    let handle = pipeline::load_stage(
        stage,
        worker,
        layers,
        &config.fingerprint,
        crate::pipeline::HIDDEN_WIRE_DTYPE,
        config.weights.as_ref(),
    )
    .await?;
    if config.warmup {
        handle
            .client
            .clone()
            .warmup(v1::WarmupRequest { tokens: 0 })
            .await
            .map_err(|status| CoordinatorError::stage(stage, &handle.address, status))?;
    }
    Ok(handle)
}

/// Health checks in a row that may go unanswered before a stage counts as lost (a refusal, or a
/// worker that says it lost its stage, counts at once).
const SLOW_CHECKS_TOLERATED: u32 = 2;

/// Checks every stage of `pipeline` each `interval` and calls `on_loss(generation, stage, reason)`
/// for the first that is down. Ends when the pipeline is replaced (its last strong reference
/// dropped) or `on_loss` returns false (the scheduler is gone).
pub fn watch(
    pipeline: Weak<Pipeline>,
    interval: Duration,
    on_loss: impl Fn(u64, usize, String) -> bool + Send + 'static,
) {
    tokio::spawn(async move {
        let mut slow_checks = 0;
        loop {
            // After an unanswered check, the next goes at once: its timeout already waited, and
            // a hung worker counts as lost within about `SLOW_CHECKS_TOLERATED` timeouts.
            if slow_checks == 0 {
                tokio::time::sleep(interval).await;
            }
            let Some(current) = pipeline.upgrade() else {
                return;
            };
            let timeout = interval.max(Duration::from_secs(1));
            match current.first_unhealthy(timeout).await {
                None => slow_checks = 0,
                Some((_, _, true)) if slow_checks + 1 < SLOW_CHECKS_TOLERATED => slow_checks += 1,
                Some((stage, reason, _)) => {
                    slow_checks = 0;
                    if !on_loss(current.generation(), stage, reason) {
                        return;
                    }
                }
            }
        }
    });
}
