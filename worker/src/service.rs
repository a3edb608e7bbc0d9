//! The gRPC boundary of a worker: wire messages in, domain types to the engine, wire messages out.

use std::sync::Arc;
use std::time::Instant;

use strata_model::ModelFile;
use strata_proto::v1;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::blob_store::BlobStore;
use crate::engine::{Engine, SequenceStep, StepInput, StepOutput};
use crate::model::sampling::{Penalties, SamplingParams};
use crate::sent_weights::{blob_from_wire, Part};
use crate::{codec, WorkerError};

/// Static facts about this worker, reported by `Info`.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub device: String,
    /// See [`crate::device::physical_id`].
    pub physical_device: String,
    /// What the stage computes in.
    pub dtype: candle_core::DType,
    pub weights: Weights,
    pub threads: usize,
}

/// Where a worker's weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    /// The model file it was started with.
    File(Box<ModelFile>),
    /// What a coordinator sends, kept in this cache.
    Sent(Arc<BlobStore>),
}

/// The `strata.v1.Worker` service.
pub struct WorkerService {
    engine: Engine,
    /// Turns true when the server begins a graceful shutdown: open Forward streams then end after
    /// their current micro-batch (a long-lived stream would otherwise hold the shutdown forever).
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    identity: WorkerIdentity,
    /// The last calibration, reported by `Info`.
    calibration: std::sync::Mutex<Option<v1::Calibration>>,
}

impl WorkerService {
    pub fn new(engine: Engine, identity: WorkerIdentity) -> Self {
        Self {
            engine,
            stopping: None,
            identity,
            calibration: std::sync::Mutex::new(None),
        }
    }

    /// The weight cache, or FAILED_PRECONDITION on a worker that reads its own model file.
    fn blob_store(&self) -> Result<Arc<BlobStore>, WorkerError> {
        match &self.identity.weights {
            Weights::Sent(store) => Ok(store.clone()),
            Weights::File(_) => Err(WorkerError::FailedPrecondition(
                "this worker reads its own model file and takes no weights over the wire".into(),
            )),
        }
    }

    /// Ends open Forward streams once `stopping` turns true.
    pub fn with_shutdown(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    fn memory(&self) -> crate::device::Memory {
        crate::device::memory(self.engine.device())
    }
}

fn step_from_wire(s: v1::SequenceInput) -> Result<SequenceStep, WorkerError> {
    if !s.request_id.is_empty() {
        // The coordinator names the request on a sequence's first step, so a request can be
        // followed from the coordinator's log into each worker's.
        tracing::debug!(
            request_id = s.request_id.get(..64).unwrap_or(&s.request_id),
            seq = s.seq_id,
            start_pos = s.start_pos,
            "sequence step for request"
        );
    }
    let input = match s.input {
        Some(v1::sequence_input::Input::Tokens(t)) => StepInput::Tokens(t.ids),
        Some(v1::sequence_input::Input::Hidden(h)) => StepInput::Hidden(codec::decode(&h)?),
        None => {
            return Err(WorkerError::invalid(format!(
                "sequence {}: neither token ids nor hidden states",
                s.seq_id
            )))
        }
    };
    let sampling = s
        .sampling
        .map(|p| {
            p.check()
                .map_err(|e| WorkerError::invalid(format!("sequence {}: {e}", s.seq_id)))?;
            Ok::<_, WorkerError>(SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: p.seed,
                penalties: Penalties {
                    presence: p.presence_penalty,
                    frequency: p.frequency_penalty,
                    repetition: if p.repetition_penalty == 0.0 {
                        1.0
                    } else {
                        p.repetition_penalty
                    },
                },
                logit_bias: p.logit_bias.iter().map(|b| (b.id, b.bias)).collect(),
            })
        })
        .transpose()?;
    Ok(SequenceStep {
        seq_id: s.seq_id,
        start_pos: s.start_pos as usize,
        input,
        sampling,
        top_logprobs: s.top_logprobs as usize,
        seen: s.seen.iter().map(|t| (t.id, t.generated)).collect(),
        allowed: s.allowed_tokens,
        copy_from: (s.copy_prefix_from != 0).then_some(s.copy_prefix_from),
    })
}

/// Resolves once the server begins shutting down (never, without a shutdown signal).
async fn shutdown_begun(stopping: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match stopping {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

/// One micro-batch through the engine: wire in, wire out (shared by `Forward` and `ForwardStream`).
async fn forward_once(
    engine: &Engine,
    r: v1::ForwardRequest,
) -> Result<v1::ForwardResponse, Status> {
    let started = Instant::now();
    let steps = r
        .sequences
        .into_iter()
        .map(step_from_wire)
        .collect::<Result<Vec<_>, _>>()?;
    let decoding = started.elapsed();
    let result = engine.forward(r.epoch, steps).await?;
    let encoding = Instant::now();
    let mut outputs = Vec::with_capacity(result.outputs.len());
    for (seq_id, output) in result.outputs {
        let output = match output {
            StepOutput::Hidden(t) => v1::sequence_output::Output::Hidden(codec::encode(&t)?),
            StepOutput::Sampled(s) => v1::sequence_output::Output::Sampled(v1::SampledToken {
                id: s.id,
                logprob: s.logprob,
                top_logprobs: s
                    .top
                    .into_iter()
                    .map(|(id, logprob)| v1::TokenLogprob { id, logprob })
                    .collect(),
            }),
        };
        outputs.push(v1::SequenceOutput {
            seq_id,
            output: Some(output),
        });
    }
    tracing::debug!(
        step = r.step_id,
        compute_us = result.forward_time.as_micros() as u64,
        handler_us = started.elapsed().as_micros() as u64,
        "forward"
    );
    Ok(v1::ForwardResponse {
        step_id: r.step_id,
        outputs,
        // Work done for this call, not time spent queued behind another micro-batch.
        forward_ns: (decoding + result.forward_time + encoding.elapsed()).as_nanos() as u64,
        evicted: result.evicted,
    })
}

#[tonic::async_trait]
impl v1::worker_server::Worker for WorkerService {
    async fn info(&self, _: Request<v1::InfoRequest>) -> Result<Response<v1::WorkerInfo>, Status> {
        let stats = self.engine.stats();
        let limits = self.engine.limits();
        let crate::device::Memory { total, available } = self.memory();
        Ok(Response::new(v1::WorkerInfo {
            device: self.identity.device.clone(),
            physical_device: self.identity.physical_device.clone(),
            compute_dtype: codec::dtype_to_wire(self.identity.dtype)
                .unwrap_or(v1::DType::DtypeUnspecified) as i32,
            model: match &self.identity.weights {
                Weights::File(model) => Some(strata_model::wire::model_info(model)),
                Weights::Sent(_) => None,
            },
            loaded: stats.loaded.map(|r| v1::LayerRange {
                start: r.start as u32,
                end: r.end as u32,
            }),
            memory_total_bytes: total,
            memory_available_bytes: available,
            active_sequences: stats.active_sequences as u32,
            cached_positions: stats.cached_positions as u64,
            threads: self.identity.threads as u32,
            version: env!("CARGO_PKG_VERSION").into(),
            calibration: *self.calibration.lock().unwrap_or_else(|e| e.into_inner()),
            max_batch_rows: limits.max_batch_rows.min(u32::MAX as usize) as u32,
            max_sequences: limits.max_sequences.min(u32::MAX as usize) as u32,
            max_cache_bytes: limits.max_cache_bytes.unwrap_or(0) as u64,
            epoch: stats.epoch,
            weights_from_coordinator: matches!(self.identity.weights, Weights::Sent(_)),
            parked_sequences: stats.parked_sequences as u32,
            parked_bytes: stats.parked_bytes as u64,
            max_parked_bytes: limits.max_parked_bytes.unwrap_or(0) as u64,
        }))
    }

    async fn load_stage(
        &self,
        request: Request<v1::LoadStageRequest>,
    ) -> Result<Response<v1::LoadStageResponse>, Status> {
        let r = request.into_inner();
        if r.model_fingerprint.is_empty() {
            return Err(WorkerError::invalid(
                "LoadStage without a model fingerprint: name the model the stage is planned for",
            )
            .into());
        }
        let layers = r
            .layers
            .ok_or_else(|| WorkerError::invalid("LoadStage without a layer range"))?;
        let range = layers.start as usize..layers.end as usize;
        let output_dtype = match r.output_dtype {
            0 => None,
            raw => Some(codec::dtype_from_wire(raw)?),
        };
        if let Weights::File(mine) = &self.identity.weights {
            if r.weights.is_none() && r.model_fingerprint != mine.fingerprint {
                return Err(WorkerError::FailedPrecondition(format!(
                    "model mismatch: the coordinator planned for model {} but this worker holds {} ({})",
                    r.model_fingerprint,
                    mine.fingerprint,
                    mine.path.display()
                ))
                .into());
            }
        }
        let sent = sent_weights_for(
            &self.identity.weights,
            "LoadStage",
            r.model_fingerprint,
            Part::Stage(range.clone()),
            r.weights,
        )
        .await?;
        let report = self.engine.load(range, output_dtype, sent).await?;
        tracing::info!(
            layers = ?report.layers,
            weight_mib = report.weight_bytes >> 20,
            load_ms = report.load_time.as_millis() as u64,
            "stage loaded"
        );
        Ok(Response::new(v1::LoadStageResponse {
            layers: Some(layers),
            has_embedding: report.has_embedding,
            has_head: report.has_head,
            load_ns: report.load_time.as_nanos() as u64,
            weight_bytes: report.weight_bytes as u64,
            epoch: report.epoch,
        }))
    }

    async fn forward(
        &self,
        request: Request<v1::ForwardRequest>,
    ) -> Result<Response<v1::ForwardResponse>, Status> {
        Ok(Response::new(
            forward_once(&self.engine, request.into_inner()).await?,
        ))
    }

    type ForwardStreamStream = ReceiverStream<Result<v1::ForwardReply, Status>>;

    async fn forward_stream(
        &self,
        request: Request<Streaming<v1::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let mut requests = request.into_inner();
        let engine = self.engine.clone();
        // One reply in flight is enough: the next request waits for the compute thread anyway.
        let (replies, stream) = tokio::sync::mpsc::channel(2);
        let mut stopping = self.stopping.clone();
        let spin = engine.spin();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = strata_transport::spin::spin_first(requests.next(), spin) => next,
                    _ = shutdown_begun(&mut stopping) => break,
                };
                let Some(Ok(r)) = next else { break };
                let step_id = r.step_id;
                let reply = match forward_once(&engine, r).await {
                    Ok(response) => v1::ForwardReply {
                        step_id,
                        response: Some(response),
                        ..Default::default()
                    },
                    Err(status) => v1::ForwardReply {
                        step_id,
                        response: None,
                        error_code: status.code() as i32,
                        error_message: status.message().to_string(),
                    },
                };
                if replies.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let r = request.into_inner();
        let report = self.engine.release(r.epoch, r.seq_ids, r.park).await?;
        Ok(Response::new(v1::ReleaseResponse {
            released: report.released as u32,
            evicted: report.evicted,
        }))
    }

    async fn warmup(
        &self,
        request: Request<v1::WarmupRequest>,
    ) -> Result<Response<v1::WarmupResponse>, Status> {
        let tokens = match request.into_inner().tokens {
            0 => 16,
            n => n as usize,
        };
        let duration = self.engine.warmup(tokens).await?;
        tracing::info!(ms = duration.as_millis() as u64, "warmup done");
        Ok(Response::new(v1::WarmupResponse {
            duration_ns: duration.as_nanos() as u64,
        }))
    }

    async fn calibrate(
        &self,
        request: Request<v1::CalibrateRequest>,
    ) -> Result<Response<v1::Calibration>, Status> {
        let r = request.into_inner();
        let rows = if r.rows == 0 { 4 } else { r.rows as usize };
        let context = if r.context == 0 {
            64
        } else {
            r.context as usize
        };
        let sent = sent_weights_for(
            &self.identity.weights,
            "Calibrate",
            r.model_fingerprint,
            Part::Probes,
            r.weights,
        )
        .await?;
        let c = self
            .engine
            .calibrate(rows, context, r.keep_probes, sent)
            .await?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let calibration = v1::Calibration {
            layer_ms: ms(c.layer),
            embedding_ms: ms(c.embedding),
            head_ms: ms(c.head),
            layer_bytes: c.layer_bytes as u64,
            embedding_bytes: c.embedding_bytes as u64,
            head_bytes: c.head_bytes as u64,
            rows: c.rows as u32,
            memory_available_bytes: self.memory().available,
        };
        tracing::info!(?calibration, "calibrated");
        *self.calibration.lock().unwrap_or_else(|e| e.into_inner()) = Some(calibration);
        Ok(Response::new(calibration))
    }

    async fn health(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        let stats = self.engine.stats();
        let (status, message) = match stats.loaded {
            Some(r) => (
                v1::health_response::Status::Serving,
                format!("serving layers {}..{}", r.start, r.end),
            ),
            None => (
                v1::health_response::Status::NotReady,
                "no stage loaded".to_string(),
            ),
        };
        Ok(Response::new(v1::HealthResponse {
            status: status as i32,
            message,
        }))
    }

    async fn have_blobs(
        &self,
        request: Request<v1::HaveBlobsRequest>,
    ) -> Result<Response<v1::HaveBlobsResponse>, Status> {
        let store = self.blob_store()?;
        let r = request.into_inner();
        if r.blobs.len() > MAX_BLOBS_PER_CALL {
            return Err(WorkerError::invalid(format!(
                "HaveBlobs asks about {} blobs; at most {MAX_BLOBS_PER_CALL} a call",
                r.blobs.len()
            ))
            .into());
        }
        let blobs = r
            .blobs
            .iter()
            .map(|b| blob_from_wire(Some(b), "HaveBlobs"))
            .collect::<Result<Vec<_>, _>>()?;
        let held = tokio::task::spawn_blocking(move || {
            let held: Vec<u64> = blobs.iter().map(|b| store.held(b)).collect();
            (held, store.max_bytes())
        })
        .await
        .map_err(|e| Status::internal(format!("HaveBlobs failed: {e}")))?;
        Ok(Response::new(v1::HaveBlobsResponse {
            held_bytes: held.0,
            cache_max_bytes: held.1,
        }))
    }

    async fn push_blobs(
        &self,
        request: Request<Streaming<v1::BlobChunk>>,
    ) -> Result<Response<v1::PushBlobsResponse>, Status> {
        let store = self.blob_store()?;
        let mut chunks = request.into_inner();
        // One thread writes while the stream receives the next chunks; the bounded queue between
        // them is all the worker holds beyond the files, and HTTP/2 flow control holds back the
        // sender when it is full.
        let (queue, mut written) = tokio::sync::mpsc::channel::<v1::BlobChunk>(PUSH_CHUNKS_QUEUED);
        let writer =
            tokio::task::spawn_blocking(move || -> Result<v1::PushBlobsResponse, WorkerError> {
                let mut done = v1::PushBlobsResponse::default();
                while let Some(chunk) = written.blocking_recv() {
                    let blob = blob_from_wire(chunk.blob.as_ref(), "PushBlobs")?;
                    if store.write(&blob, chunk.offset, &chunk.data)? {
                        done.blobs_completed += 1;
                    }
                    done.bytes_written += chunk.data.len() as u64;
                }
                Ok(done)
            });
        let mut received = Ok(());
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) => {
                    // A closed queue means the writer stopped on an error, which it returns below.
                    if queue.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(status) => {
                    received = Err(status);
                    break;
                }
            }
        }
        drop(queue);
        let done = writer
            .await
            .map_err(|e| Status::internal(format!("PushBlobs failed: {e}")))??;
        received?;
        Ok(Response::new(done))
    }
}

/// The model a LoadStage or Calibrate (`rpc`) reads `part` from: `None` for a worker with its own
/// file (which takes no weights), else the weights the request names, checked (off the async
/// threads: it reads the header) — which a worker without a file needs.
async fn sent_weights_for(
    mine: &Weights,
    rpc: &str,
    fingerprint: String,
    part: Part,
    weights: Option<v1::StageWeights>,
) -> Result<Option<ModelFile>, WorkerError> {
    match (mine, weights) {
        (Weights::File(_), None) => Ok(None),
        (Weights::File(file), Some(_)) => Err(WorkerError::invalid(format!(
            "this worker reads its own model file ({}): {rpc} carries no weights for it",
            file.path.display()
        ))),
        (Weights::Sent(_), None) => Err(WorkerError::FailedPrecondition(format!(
            "this worker has no model file: {rpc} must carry the {} weights (sent with PushBlobs)",
            match part {
                Part::Stage(_) => "stage's",
                Part::Probes => "probe stages'",
            }
        ))),
        (Weights::Sent(store), Some(weights)) => {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                crate::sent_weights::stage_model(&store, &fingerprint, &part, &weights)
            })
            .await
            .map_err(|e| WorkerError::Internal(format!("checking the weights failed: {e}")))?
            .map(Some)
        }
    }
}

/// Chunks received ahead of the writer.
const PUSH_CHUNKS_QUEUED: usize = 4;

/// Blobs one HaveBlobs may ask about: a stage of the largest models has a few thousand tensors.
const MAX_BLOBS_PER_CALL: usize = 100_000;
