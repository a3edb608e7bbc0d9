//! Serving a worker: `run(listener, config, shutdown)`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use strata_model::{ModelFile, ModelFormat};
use strata_proto::v1::worker_server::WorkerServer;
use strata_transport::Security;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::blob_store::BlobStore;
use crate::engine::{Engine, EngineLimits};
use crate::model::StageOptions;
use crate::service::{Weights, WorkerIdentity, WorkerService};
use crate::WorkerError;

/// The largest HTTP/2 frame callers may send: weight pushes and prompt activations run to
/// megabytes, and 16 KiB frames (the default) cost a frame header and a wakeup each.
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Everything a worker needs to start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The model file (GGUF) or directory (safetensors) on this host; `None`: the coordinator sends
    /// each stage's weights, kept in `weight_cache`.
    pub model: Option<PathBuf>,
    /// Where weights sent by a coordinator are kept (by digest), and how many bytes at most.
    pub weight_cache: PathBuf,
    pub weight_cache_max_bytes: u64,
    /// `cpu`, `cuda:N` or `metal:N`.
    pub device: String,
    /// Freed memory a CUDA device's pool keeps for the next step ([`crate::device::open_keeping`]).
    pub cuda_pool_keep_bytes: u64,
    /// What `Info` reports as the physical device; `None`: [`crate::device::physical_id`].
    pub physical_device: Option<String>,
    /// Compute threads of a CPU stage, for `Info` (the thread pool is sized by the process).
    pub threads: usize,
    pub options: StageOptions,
    pub limits: EngineLimits,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// TLS and the token every call must carry.
    pub security: Security,
}

/// The default message limit: a 4096-token prefill of a 4096-wide f32 model, with room to spare.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 << 20;

/// Opens the model and device and serves the worker service on `listener` until `shutdown` resolves.
/// In-flight requests finish before it returns.
pub async fn run(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let model = config.model.as_deref().map(ModelFile::open).transpose()?;
    let device = crate::device::open_keeping(&config.device, config.cuda_pool_keep_bytes)?;
    // Weights sent over the wire are GGUF tensors.
    let format = model.as_ref().map_or(ModelFormat::Gguf, |m| m.format);
    let dtype = config.options.compute_dtype(format, &device)?;
    let identity = WorkerIdentity {
        dtype,
        device: crate::device::name(&device),
        physical_device: config
            .physical_device
            .unwrap_or_else(|| crate::device::physical_id(&device)),
        weights: match &model {
            Some(model) => Weights::File(Box::new(model.clone())),
            None => Weights::Sent(Arc::new(BlobStore::open(
                &config.weight_cache,
                config.weight_cache_max_bytes,
            )?)),
        },
        threads: if device.is_cpu() { config.threads } else { 0 },
    };
    tracing::info!(
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        device = %identity.device,
        model = %model.as_ref().map_or_else(
            || format!("sent by the coordinator, cached in {}", config.weight_cache.display()),
            |m| m.path.display().to_string()
        ),
        layers = model.as_ref().map_or(0, |m| m.config.num_layers),
        dtype = crate::model::stage::dtype_name(dtype),
        tls = config.security.tls_enabled(),
        auth = config.security.token().is_some(),
        "worker listening"
    );
    let engine = Engine::start(model, device, config.options, config.limits, config.threads)?;
    let (stopping, stop_streams) = tokio::sync::watch::channel(false);
    let service =
        WorkerServer::new(WorkerService::new(engine, identity).with_shutdown(stop_streams))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
    let server = config
        .security
        .configure_server(
            tonic::transport::Server::builder(),
            strata_transport::Peers::Members,
        )
        .map_err(|e| WorkerError::Internal(e.to_string()))?;
    server
        .max_frame_size(MAX_FRAME_BYTES)
        .add_service(config.security.server_auth(service))
        // Token-at-a-time traffic is latency-bound: without TCP_NODELAY, Nagle's algorithm and
        // delayed ACKs add ~40 ms to every hop.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                shutdown.await;
                let _ = stopping.send(true);
            },
        )
        .await
        .map_err(|e| WorkerError::Internal(format!("server failed: {e}")))
}
