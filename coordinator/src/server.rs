//! Starting a coordinator: open the model, connect the workers, plan, load, warm up, then serve.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use futures::FutureExt;
use strata_model::{ChatTemplate, ModelFile, TextTokenizer};
use strata_proto::v1;
use strata_proto::v1::coordinator_server::CoordinatorServer;
use strata_transport::{ApiKeys, AuthToken, Peers, Security, ServerAuth, TransportError};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::metrics::Metrics;
use crate::pipeline::{self, Pipeline};
use crate::plan::{self, SplitSpec};
use crate::recovery::RecoveryConfig;
use crate::scheduler::{self, SchedulerLimits};
use crate::send_weights::{TransferProgress, WeightSender};
use crate::service::{CoordinatorService, RequestLimits};
use crate::CoordinatorError;

/// Everything a coordinator needs to start.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The model on this host (for the tokenizer and to check the workers' fingerprints).
    pub model: PathBuf,
    /// Worker addresses, in pipeline order.
    pub workers: Vec<String>,
    /// The device each worker must report (`None`: any), e.g. from `cluster.toml`.
    pub expected_devices: Vec<Option<String>>,
    pub split: SplitSpec,
    /// Warm every stage before serving.
    pub warmup: bool,
    pub scheduler: SchedulerLimits,
    pub requests: RequestLimits,
    /// Largest gRPC message to and from workers, in bytes.
    pub max_message_bytes: usize,
    /// TLS and the cluster's token: for dialing the workers; TLS for serving clients.
    pub security: Security,
    /// Who may use the client ports.
    pub clients: ClientAccess,
    /// Idle workers that take over the stage of a worker that is lost.
    pub spares: Vec<String>,
    /// The longest one stage may take to answer a Forward before its worker counts as lost.
    pub stage_timeout: Duration,
    /// Where weight transfers to workers without a model file report their progress.
    pub transfer_progress: Option<TransferProgress>,
}

/// Who may use the coordinator's client ports (gRPC and HTTP).
#[derive(Debug, Clone)]
pub struct ClientAccess {
    /// The API's check: client API keys, or open (loopback, `--insecure`). Never the cluster's
    /// token.
    pub clients: ServerAuth,
    /// The check of `/metrics`: the scrape token. `None` on a port with API keys refuses every
    /// scrape (a client's key is not a scraper's); on an open port, `/metrics` is open too.
    pub metrics: Option<ServerAuth>,
}

impl ClientAccess {
    /// Open to anyone (loopback tests and tools).
    pub fn open() -> Self {
        Self {
            clients: ServerAuth::clients(None),
            metrics: None,
        }
    }

    /// Keys from `api_keys` (reread every second while serving, so a key is added or revoked by
    /// editing the file) or one key, `single` (name, key); the scrape token from `metrics_token`.
    /// Without keys the client ports are open. Call inside the runtime.
    pub fn load(
        api_keys: Option<&std::path::Path>,
        single: Option<(&str, AuthToken)>,
        metrics_token: Option<&std::path::Path>,
    ) -> Result<Self, TransportError> {
        let keys = match (api_keys, single) {
            (Some(_), Some(_)) => {
                return Err(TransportError::Invalid(
                    "give client keys in --api-keys or STRATA_API_KEY, not both".into(),
                ))
            }
            (Some(path), None) => {
                let keys = Arc::new(ApiKeys::load(path)?);
                if keys.names().is_empty() {
                    tracing::warn!(file = %path.display(), "the API keys file holds no key: every client is refused until one is added");
                }
                keys.watch();
                Some(keys)
            }
            (None, Some((name, key))) => Some(Arc::new(ApiKeys::single(name, key)?)),
            (None, None) => None,
        };
        let metrics = match metrics_token {
            Some(path) => Some(ServerAuth::new(Some(AuthToken::read(path)?))),
            None => None,
        };
        Ok(Self {
            clients: ServerAuth::clients(keys),
            metrics,
        })
    }
}

/// A coordinator whose pipeline is loaded and whose scheduler runs; ready to serve.
pub struct Coordinator {
    service: CoordinatorService,
    security: Security,
    clients: ClientAccess,
    /// The stages as planned (the live ones are the scheduler's: a stage may move to a spare).
    initial_stages: Vec<pipeline::StageHandle>,
}

impl Coordinator {
    /// Connects, plans, loads and (optionally) warms the pipeline.
    pub async fn start(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let model = ModelFile::open(&config.model)?;
        let tokenizer = Arc::new(TextTokenizer::load(&model)?);
        let chat = ChatTemplate::load(&model)?.map(Arc::new);
        if chat.is_none() {
            tracing::info!("the model has no chat template: chat requests will be refused");
        }
        let metrics = Arc::new(Metrics::new());
        let workers =
            try_join_all(config.workers.iter().map(|address| {
                pipeline::connect(address, &config.security, config.max_message_bytes)
            }))
            .await?;
        let path = model.path.display().to_string();
        for (i, w) in workers.iter().enumerate() {
            pipeline::check_fingerprint(w, &model.fingerprint, &path)?;
            if let Some(expected) = config.expected_devices.get(i).and_then(Option::as_ref) {
                if *expected != w.info.device {
                    return Err(CoordinatorError::InvalidRequest(format!(
                        "worker {} runs on {}, but the cluster says {expected}: start it with --device {expected}",
                        w.address, w.info.device
                    )));
                }
            }
        }
        let weights = WeightSender::new(&model, metrics.clone(), config.transfer_progress.clone())
            .map(Arc::new);
        let plan = match config.split {
            SplitSpec::Auto => {
                let profiles = calibrate(&workers, &model.fingerprint, weights.as_ref()).await?;
                plan::balanced(model.config.num_layers, &profiles)?
            }
            ref spec => plan::plan(spec, model.config.num_layers, workers.len())?,
        };
        for (w, range) in workers.iter().zip(&plan) {
            tracing::info!(
                worker = %w.address,
                device = %w.info.device,
                physical_device = %w.info.physical_device,
                layers = ?range,
                "plan"
            );
        }
        let started = Instant::now();
        let pipeline = Pipeline::load(
            workers,
            &plan,
            &model.fingerprint,
            crate::pipeline::HIDDEN_WIRE_DTYPE,
            config.stage_timeout,
            weights.as_ref(),
        )
        .await?;
        tracing::info!(ms = started.elapsed().as_millis() as u64, "stages loaded");
        let devices = pipeline.parallel_micro_batches();
        if devices < pipeline.stages().len() {
            tracing::info!(
                stages = pipeline.stages().len(),
                devices,
                "stages share devices: decode runs one micro-batch per device"
            );
        }
        if config.warmup {
            let times = pipeline.warmup().await?;
            tracing::info!(ms = ?times.iter().map(|t| t.as_millis()).collect::<Vec<_>>(), "stages warmed up");
        }
        let initial_stages = pipeline.stages().to_vec();
        let recovery = RecoveryConfig {
            spares: config.spares.clone(),
            warmup: config.warmup,
            weights,
            ..RecoveryConfig::new(
                config.security.clone(),
                model.fingerprint.clone(),
                path,
                config.max_message_bytes,
            )
        };
        let scheduler = scheduler::spawn(
            pipeline,
            tokenizer.clone(),
            config.scheduler,
            model.config.context_length,
            recovery,
            metrics.clone(),
        );
        Ok(Self {
            service: CoordinatorService {
                scheduler,
                tokenizer,
                model: Arc::new(model),
                chat,
                limits: config.requests,
                metrics,
                prompt_work: Arc::new(crate::prompt_threads::PromptThreads::start(
                    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
                )?),
                grammars: Default::default(),
            },
            security: config.security,
            clients: config.clients,
            initial_stages,
        })
    }

    /// The plan: each stage's worker and layers, as loaded at start.
    pub fn stages(&self) -> &[pipeline::StageHandle] {
        &self.initial_stages
    }

    /// Serves gRPC on `grpc` and, when given, the HTTP API (OpenAI, `/health`, `/metrics`) on
    /// `http`, until `shutdown` resolves; both ports stop together.
    pub async fn serve_with_http(
        self,
        grpc: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CoordinatorError> {
        let Some(http) = http else {
            return self.serve(grpc, shutdown).await;
        };
        let shutdown = shutdown.shared();
        let service = self.service.clone();
        let security = self.security.clone();
        let http = crate::http::serve(
            http,
            service,
            &security,
            self.clients.clone(),
            shutdown.clone(),
        );
        let grpc = self.serve(grpc, shutdown);
        futures::try_join!(grpc, http).map(|_| ())
    }

    /// Serves the coordinator service on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CoordinatorError> {
        tracing::info!(
            address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tls = self.security.tls_enabled(),
            api_keys = !self.clients.clients.is_open(),
            "coordinator listening"
        );
        let mut server = self
            .security
            .configure_server(tonic::transport::Server::builder(), Peers::Clients)?;
        server
            .add_service(InterceptedService::new(
                CoordinatorServer::new(self.service),
                self.clients.clients,
            ))
            // Token-at-a-time traffic is latency-bound: without TCP_NODELAY, Nagle's algorithm and
            // delayed ACKs add ~40 ms to every hop.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
            .map_err(|e| CoordinatorError::Protocol(format!("server failed: {e}")))
    }
}

/// Calibration passes over the workers. A shared host has slow spells that outlast one worker's
/// probes (two identical CPU workers measured 0.81 and 1.24–1.33 ms per layer in 2 of 5 starts,
/// and the plan moved from 0..18 to 0..22); each worker keeps its fastest pass, and the passes
/// alternate between workers so one spell does not land on every pass of the same worker. Workers
/// keep their probe stages between passes, so only the first pass loads and prefills them (~0.9 s
/// of a CPU pass; later ones take ~0.2 s). Probes decode at 32 cached positions (64 before):
/// attention over 32 or 64 positions is a small part of a decode step either way.
const CALIBRATION_PASSES: usize = 4;

/// Calibrates every worker, one at a time (workers that share a host would otherwise slow each
/// other's measurement), and turns the results into planner inputs.
async fn calibrate(
    workers: &[pipeline::ConnectedWorker],
    fingerprint: &str,
    weights: Option<&Arc<WeightSender>>,
) -> Result<Vec<plan::WorkerProfile>, CoordinatorError> {
    // A worker without the model file is sent the probe stages' tensors first (the first and last
    // stages' layers among them, which the plan's ends then find in its cache).
    if let Some(weights) = weights {
        if workers.iter().any(|w| w.info.weights_from_coordinator) {
            weights.digest_probes().await?;
        }
    }
    let sent = futures::future::try_join_all(workers.iter().enumerate().map(|(i, w)| async move {
        match weights {
            Some(weights) if w.info.weights_from_coordinator => {
                weights.send_probes(i, w).await.map(Some)
            }
            None if w.info.weights_from_coordinator => {
                Err(CoordinatorError::InvalidRequest(format!(
                    "{} has no model file and this model's weights cannot be sent (only GGUF \
                 files are): start the worker with --model",
                    w.address
                )))
            }
            _ => Ok(None),
        }
    }))
    .await?;
    let mut best: Vec<v1::Calibration> = Vec::with_capacity(workers.len());
    for pass in 0..CALIBRATION_PASSES {
        for (i, w) in workers.iter().enumerate() {
            let c = w
                .client
                .clone()
                .calibrate(v1::CalibrateRequest {
                    rows: 4,
                    context: 32,
                    // The last pass frees them, before the worker reports its free memory.
                    keep_probes: pass + 1 < CALIBRATION_PASSES,
                    weights: sent[i].clone(),
                    model_fingerprint: fingerprint.to_string(),
                })
                .await
                .map_err(|status| CoordinatorError::stage(i, &w.address, status))?
                .into_inner();
            tracing::debug!(worker = %w.address, pass, layer_ms = c.layer_ms, head_ms = c.head_ms, "calibration pass");
            match best.get_mut(i) {
                Some(b) => *b = fastest(*b, c),
                None => best.push(c),
            }
        }
    }
    let physical: Vec<&str> = workers
        .iter()
        .map(|w| w.info.physical_device.as_str())
        .collect();
    Ok(workers
        .iter()
        .zip(best)
        .enumerate()
        .map(|(i, (w, c))| {
            tracing::info!(
                worker = %w.address,
                layer_ms = c.layer_ms,
                embedding_ms = c.embedding_ms,
                head_ms = c.head_ms,
                memory_mib = c.memory_available_bytes >> 20,
                "calibrated"
            );
            plan::WorkerProfile {
                layer_ms: c.layer_ms,
                embedding_ms: c.embedding_ms,
                head_ms: c.head_ms,
                layer_bytes: c.layer_bytes,
                embedding_bytes: c.embedding_bytes,
                head_bytes: c.head_bytes,
                // Leave room for KV caches and activations; workers on one GPU each see all of
                // its free memory, so each plans within its share.
                memory_bytes: c.memory_available_bytes / 10 * 9
                    / pipeline::sharing_a_device(&physical, i) as u64,
            }
        })
        .collect())
}

/// Two calibrations of one worker combined: each time at its fastest (noise only adds time), the
/// memory as the later one saw it.
fn fastest(earlier: v1::Calibration, later: v1::Calibration) -> v1::Calibration {
    v1::Calibration {
        layer_ms: earlier.layer_ms.min(later.layer_ms),
        embedding_ms: earlier.embedding_ms.min(later.embedding_ms),
        head_ms: earlier.head_ms.min(later.head_ms),
        ..later
    }
}

/// Starts a coordinator and serves it on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    Coordinator::start(config)
        .await?
        .serve(listener, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_calibrations_keep_each_fastest_time_and_the_later_memory() {
        let pass = |layer_ms, embedding_ms, head_ms, memory| v1::Calibration {
            layer_ms,
            embedding_ms,
            head_ms,
            layer_bytes: 100,
            embedding_bytes: 200,
            head_bytes: 300,
            rows: 4,
            memory_available_bytes: memory,
        };
        let combined = fastest(pass(1.25, 0.05, 4.7, 10), pass(0.81, 0.07, 6.3, 9));
        assert_eq!(combined, pass(0.81, 0.05, 4.7, 9));
    }
}
