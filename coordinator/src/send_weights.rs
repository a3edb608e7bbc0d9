//! Sending a stage its weights when its worker has no model file: the model's GGUF header and the
//! stage's tensors as the file stores them, each a blob named by its blake3 digest. The worker says
//! first how much of each its cache holds, so only what it lacks goes, from where a cut transfer
//! stopped; its `LoadStage` then names the blobs (`v1::StageWeights`).
//!
//! Digests are computed once per tensor, when a stage first needs it, and kept.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use strata_model::stage_weights::{
    digest_reader, probe_stages, stages_tensor_names, BlobRef, GgufLayout,
};
use strata_model::{ModelFile, ModelFormat};
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_transport::AuthChannel;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::Metrics;
use crate::pipeline::ConnectedWorker;
use crate::CoordinatorError;

/// Bytes per `PushBlobs` message: large enough that framing costs nothing, small enough that the
/// worker holds little beyond the tensors themselves.
const CHUNK_BYTES: usize = 4 << 20;
/// Chunks read ahead of the stream: the coordinator holds at most this many beyond what is sent.
const CHUNKS_AHEAD: usize = 4;
/// How often progress is logged during a transfer.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How far a transfer to one worker has come, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    pub sent: u64,
    pub total: u64,
}

/// Where each worker's transfer stands, by address, for whoever shows progress (the `strata
/// coordinator` terminal's bars). An entry is updated after every chunk and stays once complete.
pub type TransferProgress = tokio::sync::watch::Sender<BTreeMap<String, Transfer>>;

/// A blob of the model file: its bytes at `offset`.
#[derive(Debug, Clone, Copy)]
struct FileBlob {
    blob: BlobRef,
    offset: u64,
}

/// The coordinator's model file as a source of stage weights.
pub struct WeightSender {
    model: ModelFile,
    /// Read when a stage first needs it: most coordinators never send weights.
    layout: OnceLock<GgufLayout>,
    metrics: Arc<Metrics>,
    progress: Option<TransferProgress>,
    /// Digests by tensor name (and `""` for the header), as computed.
    known: Mutex<HashMap<String, FileBlob>>,
}

impl std::fmt::Debug for WeightSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSender")
            .field("path", &self.model.path)
            .finish_non_exhaustive()
    }
}

impl WeightSender {
    /// A sender for `model`, or `None` when it is not a GGUF file (only GGUF tensors are sent).
    pub fn new(
        model: &ModelFile,
        metrics: Arc<Metrics>,
        progress: Option<TransferProgress>,
    ) -> Option<Self> {
        if model.format != ModelFormat::Gguf {
            return None;
        }
        Some(Self {
            model: model.clone(),
            layout: OnceLock::new(),
            metrics,
            progress,
            known: Mutex::new(HashMap::new()),
        })
    }

    fn layout(&self) -> Result<&GgufLayout, CoordinatorError> {
        if let Some(layout) = self.layout.get() {
            return Ok(layout);
        }
        let layout = GgufLayout::read(&self.model)?;
        Ok(self.layout.get_or_init(|| layout))
    }

    /// The header and each tensor of `layers`, with digests (computed now for those not yet known:
    /// this reads the file, so it runs off the async threads).
    fn stage_blobs(
        &self,
        stages: &[Range<usize>],
    ) -> Result<(FileBlob, Vec<(String, FileBlob)>), CoordinatorError> {
        let layout = self.layout()?;
        let names = stages_tensor_names(
            layout.tensors.keys().map(String::as_str),
            stages,
            self.model.config.num_layers,
        );
        let mut file = File::open(&self.model.path).map_err(|e| self.io(e))?;
        let header = self.blob(&mut file, "", 0, layout.header_bytes)?;
        let tensors = names
            .into_iter()
            .map(|name| {
                let (offset, size) = layout.tensors[&name];
                let blob = self.blob(&mut file, &name, offset, size)?;
                Ok((name, blob))
            })
            .collect::<Result<Vec<_>, CoordinatorError>>()?;
        Ok((header, tensors))
    }

    /// The blob of `size` bytes at `offset`, digested on first use.
    fn blob(
        &self,
        file: &mut File,
        name: &str,
        offset: u64,
        size: u64,
    ) -> Result<FileBlob, CoordinatorError> {
        if let Some(known) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(*known);
        }
        file.seek(SeekFrom::Start(offset)).map_err(|e| self.io(e))?;
        let blob = digest_reader(file.take(size)).map_err(|e| self.io(e))?;
        if blob.size != size {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{name:?} needs {size} bytes at {offset}; the file ends first"),
            )));
        }
        let found = FileBlob { blob, offset };
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), found);
        Ok(found)
    }

    fn io(&self, e: std::io::Error) -> CoordinatorError {
        CoordinatorError::Model(strata_model::ModelError::io(&self.model.path, e))
    }

    /// Makes sure `worker`'s cache holds every blob of `layers`, sending what it lacks, and returns
    /// the stage's weights for its `LoadStage`.
    pub async fn send(
        self: &Arc<Self>,
        stage: usize,
        worker: &ConnectedWorker,
        layers: Range<usize>,
    ) -> Result<v1::StageWeights, CoordinatorError> {
        self.send_stages(stage, worker, vec![layers]).await
    }

    /// Digests the probe stages' tensors, so that sending them to several workers at once
    /// digests each only once.
    pub async fn digest_probes(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        let this = self.clone();
        let probes = probe_stages(self.model.config.num_layers).to_vec();
        tokio::task::spawn_blocking(move || this.stage_blobs(&probes))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("reading weights failed: {e}")))??;
        Ok(())
    }

    /// The same for a calibration's probe stages: the weights for `worker`'s `Calibrate`.
    pub async fn send_probes(
        self: &Arc<Self>,
        stage: usize,
        worker: &ConnectedWorker,
    ) -> Result<v1::StageWeights, CoordinatorError> {
        let probes = probe_stages(self.model.config.num_layers).to_vec();
        self.send_stages(stage, worker, probes).await
    }

    async fn send_stages(
        self: &Arc<Self>,
        stage: usize,
        worker: &ConnectedWorker,
        stages: Vec<Range<usize>>,
    ) -> Result<v1::StageWeights, CoordinatorError> {
        let layers = stages
            .iter()
            .map(|l| format!("{}..{}", l.start, l.end))
            .collect::<Vec<_>>()
            .join(", ");
        let this = self.clone();
        let digested = Instant::now();
        let (header, tensors) = tokio::task::spawn_blocking(move || this.stage_blobs(&stages))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("reading weights failed: {e}")))??;
        tracing::debug!(
            stage,
            ms = digested.elapsed().as_millis() as u64,
            "stage weights digested"
        );
        let all: Vec<FileBlob> = std::iter::once(header)
            .chain(tensors.iter().map(|(_, b)| *b))
            .collect();
        let fail = |status: tonic::Status| CoordinatorError::stage(stage, &worker.address, status);
        let mut client = worker.client.clone();
        let have = client
            .have_blobs(v1::HaveBlobsRequest {
                blobs: all.iter().map(|b| blob_to_wire(&b.blob)).collect(),
            })
            .await
            .map_err(fail)?
            .into_inner();
        if have.held_bytes.len() != all.len() {
            return Err(CoordinatorError::Protocol(format!(
                "{} answered HaveBlobs for {} of {} blobs",
                worker.address,
                have.held_bytes.len(),
                all.len()
            )));
        }
        let total: u64 = all.iter().map(|b| b.blob.size).sum();
        if total > have.cache_max_bytes {
            return Err(CoordinatorError::InvalidRequest(format!(
                "layers {layers} weigh {} MiB, more than the weight cache of {} ({} MiB): start it \
                 with a larger --weight-cache-gib",
                total >> 20,
                worker.address,
                have.cache_max_bytes >> 20
            )));
        }
        let todo: Vec<(FileBlob, u64)> = all
            .iter()
            .zip(&have.held_bytes)
            .filter(|(b, &held)| held < b.blob.size)
            .map(|(b, &held)| (*b, held))
            .collect();
        let bytes_sent: u64 = todo.iter().map(|(b, held)| b.blob.size - held).sum();
        let sent = todo.len() as u64;
        let hits = all.len() as u64 - sent;
        if !todo.is_empty() {
            tracing::info!(
                stage,
                worker = %worker.address,
                blobs = sent,
                cached = hits,
                mib = bytes_sent >> 20,
                "sending weights"
            );
            let started = Instant::now();
            self.push(&mut client, &worker.address, todo, bytes_sent)
                .await
                .map_err(fail)?;
            let seconds = started.elapsed().as_secs_f64();
            tracing::info!(
                stage,
                worker = %worker.address,
                mib = bytes_sent >> 20,
                seconds = format!("{seconds:.2}"),
                mib_per_s = format!("{:.0}", (bytes_sent >> 20) as f64 / seconds.max(1e-9)),
                "weights sent"
            );
        } else {
            tracing::info!(stage, worker = %worker.address, blobs = hits, "the worker's cache holds every weight of the stage");
        }
        self.metrics
            .weights_sent(&worker.address, bytes_sent, hits, sent);
        let weights = v1::StageWeights {
            header: Some(blob_to_wire(&header.blob)),
            tensors: tensors
                .into_iter()
                .map(|(name, b)| v1::NamedBlob {
                    name,
                    blob: Some(blob_to_wire(&b.blob)),
                })
                .collect(),
        };
        Ok(weights)
    }

    /// Streams the rest of each blob (from `held` on), read by a thread of its own a few chunks
    /// ahead of the stream.
    async fn push(
        &self,
        client: &mut WorkerClient<AuthChannel>,
        address: &str,
        todo: Vec<(FileBlob, u64)>,
        total: u64,
    ) -> Result<(), tonic::Status> {
        let (chunks, stream) = tokio::sync::mpsc::channel::<v1::BlobChunk>(CHUNKS_AHEAD);
        let path = self.model.path.clone();
        let address = address.to_string();
        let logged_as = address.clone();
        let progress = self.progress.clone();
        let report = move |sent: u64| {
            if let Some(progress) = &progress {
                progress.send_modify(|all| {
                    all.insert(address.clone(), Transfer { sent, total });
                });
            }
        };
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let file = File::open(&path)?;
            let map = map_file(&file)?;
            let started = Instant::now();
            let mut last_report = started;
            let mut sent = 0u64;
            report(0);
            for (blob, held) in todo {
                let end = blob.offset + blob.blob.size;
                if end > map.len() as u64 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file is shorter than when it was digested",
                    ));
                }
                let mut at = blob.offset + held;
                while at < end {
                    let n = (end - at).min(CHUNK_BYTES as u64);
                    let data = map.slice(at as usize..(at + n) as usize);
                    // Page faults here, on this thread, not in the stream's encoder on an async
                    // thread: the file may not be in the page cache.
                    touch_pages(&data);
                    let chunk = v1::BlobChunk {
                        blob: Some(blob_to_wire(&blob.blob)),
                        offset: at - blob.offset,
                        data,
                    };
                    if chunks.blocking_send(chunk).is_err() {
                        // The stream ended early; its status says why.
                        return Ok(());
                    }
                    at += n;
                    sent += n;
                    report(sent);
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        last_report = Instant::now();
                        log_progress(&logged_as, sent, total, started.elapsed());
                    }
                }
            }
            Ok(())
        });
        let pushed = client.push_blobs(ReceiverStream::new(stream)).await;
        let read = reader
            .await
            .map_err(|e| tonic::Status::internal(format!("reading weights failed: {e}")))?;
        pushed?;
        read.map_err(|e| {
            tonic::Status::internal(format!("reading {}: {e}", self.model.path.display()))
        })?;
        Ok(())
    }
}

/// The model file mapped into memory, so chunks are slices of the page cache rather than copies
/// of it (the stream's encoder copies each once into its frames).
fn map_file(file: &File) -> std::io::Result<bytes::Bytes> {
    // SAFETY: the mapping is read-only and the model file is not written while strata serves
    // it; every range used is checked against the mapping's length first.
    let map = unsafe { memmap2::Mmap::map(file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(bytes::Bytes::from_owner(map))
}

/// Reads a byte of each page of `data`, faulting it in.
fn touch_pages(data: &[u8]) {
    for at in (0..data.len()).step_by(4096) {
        // SAFETY: `at` is within `data`.
        std::hint::black_box(unsafe { std::ptr::read_volatile(data.as_ptr().add(at)) });
    }
}

fn log_progress(address: &str, sent: u64, total: u64, elapsed: Duration) {
    let rate = sent as f64 / elapsed.as_secs_f64().max(1e-9);
    let eta = total.saturating_sub(sent) as f64 / rate.max(1.0);
    tracing::info!(
        worker = %address,
        sent_mib = sent >> 20,
        total_mib = total >> 20,
        mib_per_s = format!("{:.0}", rate / (1 << 20) as f64),
        eta_s = format!("{eta:.0}"),
        "sending weights"
    );
}

fn blob_to_wire(blob: &BlobRef) -> v1::Blob {
    v1::Blob {
        digest: blob.digest.to_vec(),
        size: blob.size,
    }
}
