//! CUDA graphs of a stage's decode steps: the kernels of one step recorded once and replayed, so
//! that a step costs one launch from the host instead of several hundred.
//!
//! At batch 1 a CUDA stage is bound by the host: candle launches each op separately, and a token's
//! few hundred launches take longer than the GPU needs to read the weights. A decode step of a
//! given shape launches the same kernels on the same buffers every time, apart from the contents of
//! its inputs: the step's index array (token ids, positions, pool rows, lengths) and its hidden
//! states. Each graph therefore owns fixed device buffers for those inputs; a step copies its
//! inputs into them and replays the graph, whose result lands in the graph's own output buffer.
//!
//! A graph is valid while everything its kernels address stays where it was:
//! - the shape of the step (sequences, the padded history length its gather array is laid out
//!   with, which attention variant runs, how the stage's input arrives): the [`GraphKey`];
//! - the KV pool's tensors, which move when the pool grows or shrinks (its generation is part of
//!   the key);
//! - candle's quantized-matmul scratch buffers, which candle reallocates larger when a matmul
//!   needs more (see [`note_quantized_matmul`]; their epoch is part of the key).
//!
//! A step shape seen for the first time runs eagerly under candle's host-copy cache (which records
//! the small shape arrays its kernels upload, so that a capture finds them), the second time it is
//! captured and replayed, and from then on replayed. A capture that fails (an op that cannot be
//! recorded) marks the shape as eager for good.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use candle_core::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda::cudarc::driver::{result, CudaGraph, CudaStream, DevicePtr};
use candle_core::cuda::CudaStorageSlice;
use candle_core::{DType, Device, Result, Shape, Storage, Tensor};

use super::cuda_kernel::contiguous;

/// How many step shapes keep a graph; the least recently used one goes first. Batch sizes that
/// come and go as streams start and finish, times the history buckets in use, stay below this.
const CAPACITY: usize = 8;

/// Decode histories are laid out padded to a multiple of this many positions, so one graph serves
/// that many consecutive steps of a sequence.
pub const LEN_BUCKET: usize = 256;

/// What a step's graph depends on besides buffer contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphKey {
    pub sequences: usize,
    /// The padded history length (the gather array's row length).
    pub len: usize,
    pub wide: bool,
    /// Length of the step's packed index array (`step_indexes`).
    pub indexes: usize,
    /// Whether hidden states (or embedding rows looked up on the host) enter the stage, rather than
    /// token ids in the index array.
    pub hidden_input: bool,
    pub pool_generation: u64,
    pub workspace_epoch: u64,
}

enum State {
    /// Not run yet.
    New,
    /// Run once eagerly under the host-copy cache; its result had this shape and dtype.
    Warmed {
        shape: Shape,
        dtype: DType,
    },
    Captured {
        graph: CudaGraph,
        output: Tensor,
    },
    /// The capture failed; this shape runs eagerly.
    Eager,
}

/// A step shape's fixed input buffers and its graph.
pub struct GraphSlot {
    /// The step's packed index array, `[GraphKey::indexes]` u32.
    pub indexes: Tensor,
    /// The stage's input rows, `[sequences, hidden]`, when they do not come from the index array.
    pub input: Option<Tensor>,
    state: State,
}

/// What [`StepGraphs::prepare`] says to do with a step.
pub enum Plan {
    /// Run the step eagerly on the slot's buffers under candle's host-copy cache (first sighting).
    Warm,
    /// Capture the step on the slot's buffers, then replay it.
    Capture,
    /// Replay the captured graph.
    Replay,
    /// Run eagerly on the slot's buffers.
    Eager,
}

/// A stage's graphs, most recently used last.
#[derive(Default)]
pub struct StepGraphs {
    slots: Vec<(GraphKey, GraphSlot)>,
}

// SAFETY: a `CudaGraph` is not internally synchronized, so it must not be used from two threads at
// once. Graphs live inside one `Stage`, whose steps run one at a time (it is driven through `&mut
// self`), so at most one thread touches them at any moment.
unsafe impl Send for StepGraphs {}

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraphs")
            .field("shapes", &self.slots.len())
            .finish()
    }
}

impl StepGraphs {
    /// Takes the slot of `key` out of the set (creating its buffers if the shape is new), with what
    /// to do with it; the caller puts it back with [`StepGraphs::put`].
    pub fn take(
        &mut self,
        key: GraphKey,
        input: Option<(usize, DType)>,
        device: &Device,
    ) -> Result<(GraphSlot, Plan)> {
        if let Some(i) = self.slots.iter().position(|(k, _)| *k == key) {
            let (_, slot) = self.slots.remove(i);
            let plan = match slot.state {
                State::New => Plan::Warm,
                State::Warmed { .. } => Plan::Capture,
                State::Captured { .. } => Plan::Replay,
                State::Eager => Plan::Eager,
            };
            return Ok((slot, plan));
        }
        // Buffers of their own (zeros, not uploads): candle's host-copy cache shares uploaded
        // slices between equal contents, and these are written in place.
        let slot = GraphSlot {
            indexes: Tensor::zeros(key.indexes, DType::U32, device)?,
            input: input
                .map(|(hidden, dtype)| Tensor::zeros((key.sequences, hidden), dtype, device))
                .transpose()?,
            state: State::New,
        };
        Ok((slot, Plan::Warm))
    }

    /// Puts a slot back as the most recently used, dropping the least recently used beyond
    /// [`CAPACITY`].
    pub fn put(&mut self, key: GraphKey, slot: GraphSlot) {
        self.slots.push((key, slot));
        if self.slots.len() > CAPACITY {
            self.slots.remove(0);
        }
    }

    /// Drops every graph (their buffers and the memory their steps allocate).
    pub fn clear(&mut self) {
        self.slots.clear();
    }
}

impl GraphSlot {
    /// Records `step` (which must read its inputs from this slot's buffers and launch only
    /// capturable work) as this slot's graph and replays it once; the result is a copy of the
    /// graph's output. If the capture fails, the slot turns eager and `Ok(None)` says to run the
    /// step eagerly.
    pub fn capture(
        &mut self,
        device: &Device,
        step: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        let State::Warmed { shape, dtype } = &self.state else {
            candle_core::bail!("capturing a step shape that has not run once");
        };
        // The output is copied into a buffer allocated outside the graph, and every tensor the
        // step allocates is dropped before the capture ends, so the graph frees what it allocates.
        let output = Tensor::zeros(shape, *dtype, device)?;
        let stream = stream(device)?;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        let recorded = step().and_then(|out| copy_device(&out, &output));
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        match (recorded, graph) {
            (Ok(()), Ok(Some(graph))) => {
                self.state = State::Captured { graph, output };
                self.replay().map(Some)
            }
            (recorded, graph) => {
                let why = match (recorded, graph) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => e.to_string(),
                    _ => "the capture recorded nothing".into(),
                };
                tracing::warn!("a decode step could not be captured as a CUDA graph ({why}); this step shape runs without one");
                self.state = State::Eager;
                Ok(None)
            }
        }
    }

    /// Replays the captured graph; gives a copy of its output (the buffer is overwritten by the
    /// next replay).
    pub fn replay(&self) -> Result<Tensor> {
        let State::Captured { graph, output } = &self.state else {
            candle_core::bail!("replaying a step graph that was not captured");
        };
        graph.launch().map_err(candle_core::Error::wrap)?;
        output.copy()
    }

    /// Marks a slot that ran eagerly on first sighting, giving `out`, as ready to capture.
    pub fn warmed(&mut self, out: &Tensor) {
        self.state = State::Warmed {
            shape: out.shape().clone(),
            dtype: out.dtype(),
        };
    }
}

fn stream(device: &Device) -> Result<std::sync::Arc<CudaStream>> {
    match device {
        Device::Cuda(cuda) => Ok(cuda.cuda_stream()),
        _ => candle_core::bail!("CUDA graphs need a CUDA device"),
    }
}

/// The device address of a contiguous CUDA tensor's first element and its size in bytes.
fn address(t: &Tensor, what: &str) -> Result<(u64, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("{what} is not on a CUDA device");
    };
    let (start, end) = contiguous(layout, what)?;
    let size = t.dtype().size_in_bytes();
    let stream = storage.device.cuda_stream();
    let base = match &storage.slice {
        CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!("{what}: no CUDA graph input of dtype {:?}", t.dtype()),
    };
    Ok((base + (start * size) as u64, (end - start) * size))
}

/// Copies `src` into `dst` (same dtype and element count, both contiguous) on the device's stream.
pub fn copy_device(src: &Tensor, dst: &Tensor) -> Result<()> {
    if src.dtype() != dst.dtype() || src.elem_count() != dst.elem_count() {
        candle_core::bail!(
            "copying {:?} {:?} into {:?} {:?}",
            src.dtype(),
            src.shape(),
            dst.dtype(),
            dst.shape()
        );
    }
    let src = src.contiguous()?;
    let (from, bytes) = address(&src, "a copied tensor")?;
    let (to, _) = address(dst, "a graph buffer")?;
    let stream = stream(dst.device())?;
    // SAFETY: both ranges are live device memory of `bytes` bytes (checked above), and the copy
    // is ordered on the stream every op of this device runs on.
    unsafe { result::memcpy_dtod_async(to, from, bytes, stream.cu_stream()) }
        .map_err(candle_core::Error::wrap)
}

/// Copies `values` into the u32 buffer `dst` of the same length.
pub fn copy_host(values: &[u32], dst: &Tensor) -> Result<()> {
    let (to, bytes) = address(dst, "a graph's index buffer")?;
    if dst.dtype() != DType::U32 || bytes != std::mem::size_of_val(values) {
        candle_core::bail!("{} indexes for a buffer of {bytes} bytes", values.len());
    }
    let stream = stream(dst.device())?;
    // SAFETY: `dst` holds exactly `values.len()` u32s; a copy from pageable host memory returns once
    // the values are staged, so `values` may go away afterwards.
    unsafe { result::memcpy_htod_async(to, values, stream.cu_stream()) }
        .map_err(candle_core::Error::wrap)
}

/// The largest `rows × padded in-features` a quantized matmul has run with, in candle's two
/// scratch regimes (up to 8 rows: MMVQ; more: MMQ), and an epoch that changes whenever either grows.
static HIGH_WATER: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Called before every quantized matmul on CUDA: candle keeps one grow-only scratch buffer per
/// regime for the quantized activations and reallocates it when a matmul needs more, which would
/// leave a captured graph writing to freed memory. A new high-water mark changes the epoch, and so
/// every graph key made after it.
pub fn note_quantized_matmul(rows: usize, in_features: usize) {
    let need = rows * in_features.div_ceil(512) * 512;
    let regime = usize::from(rows > 8);
    // One atomic read-modify-write on each matmul's path; the epoch moves only on a new maximum.
    if HIGH_WATER[regime].fetch_max(need, Ordering::Relaxed) < need {
        EPOCH.fetch_add(1, Ordering::Relaxed);
    }
}

/// See [`note_quantized_matmul`].
pub fn workspace_epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}
