//! Reaching workers: connecting, checking their model, and loading a stage on one.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_transport::{AuthChannel, Security};

use super::{StageHandle, StageLimits};
use crate::forward_link::ForwardLink;
use crate::send_weights::WeightSender;
use crate::CoordinatorError;

/// How long to wait for a worker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected worker whose stage is not loaded yet.
#[derive(Debug, Clone)]
pub struct ConnectedWorker {
    pub address: String,
    pub client: WorkerClient<AuthChannel>,
    pub info: v1::WorkerInfo,
}

/// Connects to a worker (with the cluster's TLS and token) and asks for its `Info`; an unreachable
/// address is an error naming it.
pub async fn connect(
    address: &str,
    security: &Security,
    max_message_bytes: usize,
) -> Result<ConnectedWorker, CoordinatorError> {
    let unreachable = |reason: String| CoordinatorError::WorkerUnreachable {
        address: address.to_string(),
        reason,
    };
    let channel = security
        .connect(address, CONNECT_TIMEOUT)
        .await
        .map_err(|e| match e {
            strata_transport::TransportError::Connect { reason, .. } => unreachable(reason),
            other => unreachable(other.to_string()),
        })?;
    let mut client = WorkerClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let info = tokio::time::timeout(CONNECT_TIMEOUT, client.info(v1::InfoRequest {}))
        .await
        .map_err(|_| unreachable(format!("Info got no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|status| unreachable(format!("Info failed: {}", status.message())))?
        .into_inner();
    Ok(ConnectedWorker {
        address: address.to_string(),
        client,
        info,
    })
}

/// Refuses a worker that holds another model than `fingerprint` (the coordinator's, from `path`).
pub fn check_fingerprint(
    worker: &ConnectedWorker,
    fingerprint: &str,
    path: &str,
) -> Result<(), CoordinatorError> {
    // A worker without a model file takes the coordinator's (see `load_stage`).
    if worker.info.weights_from_coordinator {
        return Ok(());
    }
    let theirs = worker
        .info
        .model
        .as_ref()
        .map(|m| m.fingerprint.clone())
        .unwrap_or_default();
    if theirs == fingerprint {
        return Ok(());
    }
    Err(CoordinatorError::ModelMismatch {
        address: worker.address.clone(),
        theirs,
        ours: fingerprint.to_string(),
        path: path.to_string(),
    })
}

/// Loads `layers` on one worker as stage `index`. A worker without a model file gets the stage's
/// weights from `weights` first (only what its cache lacks); a cache entry it finds corrupt at
/// load is sent again, once.
pub async fn load_stage(
    index: usize,
    worker: ConnectedWorker,
    layers: Range<usize>,
    fingerprint: &str,
    hidden_dtype: v1::DType,
    weights: Option<&Arc<WeightSender>>,
) -> Result<StageHandle, CoordinatorError> {
    let mut client = worker.client.clone();
    let mut attempts = 0;
    let loaded = loop {
        attempts += 1;
        let sent = match (worker.info.weights_from_coordinator, weights) {
            (false, _) => None,
            (true, Some(sender)) => Some(sender.send(index, &worker, layers.clone()).await?),
            (true, None) => {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "worker {} has no model file, and the coordinator sends only GGUF weights: \
                     start the worker with --model",
                    worker.address
                )))
            }
        };
        let request = v1::LoadStageRequest {
            model_fingerprint: fingerprint.to_string(),
            layers: Some(v1::LayerRange {
                start: layers.start as u32,
                end: layers.end as u32,
            }),
            output_dtype: hidden_dtype as i32,
            weights: sent,
        };
        match client.load_stage(request).await {
            Ok(loaded) => break loaded.into_inner(),
            Err(status) if status.code() == tonic::Code::DataLoss && attempts < 2 => {
                tracing::warn!(stage = index, worker = %worker.address, error = %status.message(), "a cached weight was corrupt; sending it again");
            }
            Err(status) => return Err(CoordinatorError::stage(index, &worker.address, status)),
        }
    };
    Ok(StageHandle {
        limits: StageLimits::of(&worker.info),
        address: worker.address,
        link: Arc::new(ForwardLink::new(
            client.clone(),
            reply_spin(&worker.info.device),
        )),
        client,
        device: worker.info.device,
        physical_device: worker.info.physical_device,
        layers,
        epoch: loaded.epoch,
        weight_bytes: loaded.weight_bytes,
    })
}

/// How long a step polls for its reply from a stage on `device` before parking (the worker's own
/// default budget for that device).
fn reply_spin(device: &str) -> Duration {
    strata_transport::spin::default_budget(device == "cpu")
}
