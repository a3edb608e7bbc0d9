//! A stage: a contiguous range of layers on one device, plus the embedding if it is the first stage and
//! the final norm and output head if it is the last.

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use strata_model::config::RopeScaling;
use strata_model::{ModelConfig, ModelFile, ModelFormat};

use super::cpu_kernels::Isa;
use super::embedding::Embedding;
use super::kv_cache::SequenceKv;
use super::kv_pool::KvPool;
use super::layer::{add_pending_and_norm, Layer, Segment, StepContext};
use super::linear::Linear;
use super::mask::MaskCache;
use super::paged_step::{PagedStep, PagedStepPlan};
use super::phase_timer::{self, PhaseTimer};
use super::rope::RopeTable;
use super::step_indexes::{IndexBuffer, IndexSlot, UploadedIndexes};
use super::weights::{Role, WeightLoader};
use crate::WorkerError;

/// Switches for the per-stage optimizations, on by default; turning one off exists only to measure it.
#[derive(Debug, Clone, Copy)]
pub struct StageOptions {
    /// Optimizations turned off to measure them; the default turns none off.
    pub ablations: Ablations,
    /// How sequences' keys and values are stored (and so how attention is batched).
    pub kv_layout: KvLayout,
    /// Compute dtype of safetensors stages; `None` chooses per device (see [`StageOptions::compute_dtype`]).
    pub dtype: Option<DType>,
    /// Whether and how each step's phases are timed (diagnosis only; `--phase-times`).
    pub phase_times: phase_timer::Mode,
}

impl StageOptions {
    /// The dtype a stage of a model in `format` computes in on `device`: GGUF stages always use f32 activations
    /// (their weights stay quantized); safetensors stages use `dtype` if given, else bf16 on CUDA,
    /// f16 on Metal and f32 on the CPU (where half-precision matmuls are slower, not faster).
    pub fn compute_dtype(
        &self,
        format: ModelFormat,
        device: &Device,
    ) -> std::result::Result<DType, WorkerError> {
        match (format, self.dtype) {
            (ModelFormat::Gguf, None | Some(DType::F32)) => Ok(DType::F32),
            (ModelFormat::Gguf, Some(other)) => Err(WorkerError::invalid(format!(
                "--dtype {} applies to safetensors models: a GGUF stage keeps its weights quantized \
                 and computes activations in f32",
                dtype_name(other)
            ))),
            (_, Some(dtype)) => Ok(dtype),
            (_, None) if device.is_cuda() => Ok(DType::BF16),
            (_, None) if device.is_metal() => Ok(DType::F16),
            (_, None) => Ok(DType::F32),
        }
    }
}

/// Parses `f32`, `bf16` or `f16` (what `--dtype` takes).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!(
            "unknown dtype {other:?}; expected f32, bf16 or f16"
        )),
    }
}

/// The name `--dtype` uses for a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Where a stage keeps keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvLayout {
    /// Paged on CUDA, contiguous on the CPU and on Metal.
    #[default]
    Auto,
    /// A growing tensor per sequence and layer; attention per sequence, reading the cache in place.
    Contiguous,
    /// One pool of pages per layer for all sequences; decode attention batched (`kv_pool.rs`).
    Paged,
}

impl std::str::FromStr for KvLayout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "contiguous" => Ok(Self::Contiguous),
            "paged" => Ok(Self::Paged),
            other => Err(format!(
                "unknown KV layout {other:?}; expected auto, contiguous or paged"
            )),
        }
    }
}

impl Default for StageOptions {
    fn default() -> Self {
        Self {
            ablations: Ablations::default(),
            kv_layout: KvLayout::Auto,
            dtype: None,
            phase_times: phase_timer::Mode::Off,
        }
    }
}

/// The one place for switches that exist only to measure an optimization: each turns one off.
/// Users never need them; `strata bench optimizations`, the GPU bench scripts and the worker's
/// hidden `--no-*` flags set them, and the default (every optimization on) is what everyone runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ablations {
    /// Compute RoPE cos/sin every step instead of slicing a table computed at load.
    pub no_rope_table: bool,
    /// Build causal masks every step and layer instead of keeping them per `(q_len, kv_len)`.
    pub no_mask_cache: bool,
    /// Run quantized weights on the CPU with candle's kernels instead of strata's (`cpu_kernels/`).
    pub candle_kernels: bool,
    /// Keep dense q/k/v and gate/up weights apart (three and two matmuls instead of one each).
    pub no_fused_projections: bool,
    /// On CUDA, candle's primitives instead of strata's kernels: gathers, matmuls, mask and softmax
    /// instead of decode attention from the paged pool and the RoPE + pool write
    /// (`paged_attention.rs`), and two kernels each for residual add + RMSNorm and SiLU · up
    /// (`fused_ops.rs`).
    pub no_fused_kernels: bool,
    /// On CUDA, strata's attention kernels but candle's add, norm and activation (the
    /// `fused_ops.rs` fusions alone).
    pub no_fused_ops: bool,
    /// The history length from which CUDA decode attention runs its wide variant, instead of
    /// [`ATTENTION_WIDE_FROM`].
    pub attention_wide_from: Option<usize>,
    /// On the CPU, candle's matmuls, mask and softmax for attention instead of strata's kernel
    /// (`cpu_attention.rs`).
    pub no_cpu_attention: bool,
    /// On the CPU, strata's kernels (matmuls and attention) use no instruction set above this one
    /// (e.g. AVX2 on an AVX-512 machine), instead of the best the CPU runs.
    pub cpu_isa: Option<Isa>,
    /// On CUDA, every decode step launched op by op instead of replayed as a CUDA graph
    /// (`step_graph.rs`).
    pub no_cuda_graphs: bool,
}

/// The longest history in a batch from which CUDA decode attention runs its wide variant (32 warps
/// a block instead of 8). Each warp walks its positions one tile after another, so with 8 warps a
/// block of a long history waits on a long chain of loads; shorter histories keep 8 warps (fewer
/// idle ones, a cheaper merge).
pub const ATTENTION_WIDE_FROM: usize = 256;

/// What enters a stage.
#[derive(Debug)]
pub enum StageInput {
    /// Token ids of every row of the micro-batch (first stage).
    Tokens(Vec<u32>),
    /// Hidden states `[rows, hidden]` on the stage's device, in its dtype (later stages).
    Hidden(Tensor),
}

/// What a step's first block reads: the previous stage's hidden states, or (on the first stage) the
/// embedding rows of token ids that travel in the step's index upload.
#[derive(Clone)]
enum StepEntry {
    Hidden(Tensor),
    /// Ids in the index upload, and the dense table they select from on the device.
    Tokens(IndexSlot, Tensor),
    /// Rows already looked up on the host (a quantized table).
    Rows(Tensor),
}

/// How a decode step that runs as a CUDA graph is laid out (made only in CUDA builds).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GraphLayout {
    /// The history length its gather array is padded to (`step_graph::LEN_BUCKET`).
    len: usize,
    /// Whether decode attention runs its wide variant (the longest history reaches
    /// `attention_wide_from`), as the paged plan decides from the same histories.
    wide: bool,
}

/// What a step's work on the device reads besides its entry and uploaded arrays.
struct StepArrays<'a> {
    positions: &'a [u32],
    segments: &'a [Segment],
    angle_rows: IndexSlot,
    last_rows: Option<IndexSlot>,
}

/// The final norm and output projection.
#[derive(Debug)]
struct Head {
    norm: Tensor,
    output: Linear,
}

/// A loaded stage.
pub struct Stage {
    config: ModelConfig,
    layers: Range<usize>,
    embedding: Option<Embedding>,
    blocks: Vec<Layer>,
    head: Option<Head>,
    /// The RoPE tables the stage's layers read: one, or two where sliding layers have a base of
    /// their own (Gemma 3).
    ropes: Vec<RopeTable>,
    masks: MaskCache,
    /// Every sequence's keys and values, when the stage keeps them paged.
    pool: Option<KvPool>,
    device: Device,
    dtype: DType,
    weight_bytes: usize,
    /// Whether paged decode attention runs as one kernel here (CUDA, and a head size it handles).
    fused_attention: bool,
    /// Whether RoPE and the pool write run as one kernel here (also needs fused q/k/v weights).
    fused_write: bool,
    /// Whether residual add + RMSNorm and SiLU · up run as one kernel each here (CUDA).
    fused_ops: bool,
    /// See [`Ablations::attention_wide_from`].
    attention_wide_from: usize,
    /// The instruction set CPU attention runs strata's kernel on where it applies
    /// (`cpu_attention.rs`); `None`: candle's everywhere.
    cpu_attention: Option<Isa>,
    /// The marks of `--phase-times` (diagnosis only).
    timer: PhaseTimer,
    /// Decode steps recorded as CUDA graphs (`step_graph`), unless switched off or not on CUDA.
    #[cfg(feature = "cuda")]
    graphs: Option<super::step_graph::StepGraphs>,
}

impl Stage {
    /// Embedding rows times the family's scale (Gemma's √hidden).
    fn scale_embedding(&self, x: Tensor) -> Result<Tensor> {
        match self.config.embedding_scale() {
            Some(scale) => x.affine(scale, 0.0),
            None => Ok(x),
        }
    }

    /// Loads `layers` of `model` onto `device`; `dtype` is the activation dtype (f32 for GGUF).
    pub fn load(
        model: &ModelFile,
        layers: Range<usize>,
        device: &Device,
        dtype: DType,
        options: StageOptions,
    ) -> std::result::Result<Self, WorkerError> {
        let config = model.config.clone();
        if layers.start >= layers.end || layers.end > config.num_layers {
            return Err(WorkerError::invalid(format!(
                "layer range {}..{} is not a non-empty part of 0..{}",
                layers.start, layers.end, config.num_layers
            )));
        }
        let ablations = &options.ablations;
        let isa = Isa::best_up_to(ablations.cpu_isa);
        let strata_kernels = isa.filter(|_| !ablations.candle_kernels);
        let mut w = WeightLoader::open(model, device, dtype, strata_kernels)?;
        let is_first = layers.start == 0;
        let is_last = layers.end == config.num_layers;
        let embedding = if is_first {
            Some(w.embedding(Role::TokenEmbedding)?)
        } else {
            None
        };
        // One table per distinct (base, scaling) among this stage's layers.
        let file_factors = match config.rope.scaling {
            RopeScaling::FileFactors => Some(w.host_vec(Role::RopeFreqs)?),
            _ => None,
        };
        let mut rope_keys: Vec<bool> = Vec::new();
        let mut layer_ropes = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let local = config.rope.local_theta.is_some() && config.window(i).is_some();
            let index = match rope_keys.iter().position(|&k| k == local) {
                Some(index) => index,
                None => {
                    rope_keys.push(local);
                    rope_keys.len() - 1
                }
            };
            layer_ropes.push(index);
        }
        let ropes = rope_keys
            .iter()
            .map(|&local| {
                RopeTable::new(
                    &config,
                    config.rope.for_layer(local),
                    file_factors.as_deref(),
                    dtype,
                    device,
                    !options.ablations.no_rope_table,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let blocks = layers
            .clone()
            .zip(&layer_ropes)
            .map(|(i, &rope)| {
                Layer::load(
                    &mut w,
                    i,
                    &config,
                    rope,
                    !options.ablations.no_fused_projections,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let head = if is_last {
            // A tied head reuses the embedding matrix; GGUF keeps it quantized for the projection.
            let role = if w.has(Role::Output) {
                Role::Output
            } else {
                Role::TokenEmbedding
            };
            Some(Head {
                norm: w.norm(Role::OutputNorm)?,
                output: w.linear(role)?,
            })
        } else {
            None
        };
        if let Some(kernels) = w.kernel_summary() {
            tracing::info!(
                layers = format!("{}..{}", layers.start, layers.end),
                device = crate::device::name(device),
                "quantized matmuls: {kernels}"
            );
        }
        let weight_bytes = blocks.iter().map(Layer::weight_bytes).sum::<usize>()
            + embedding.as_ref().map_or(0, |e| e.bytes())
            + head.as_ref().map_or(0, |h| h.output.weight_bytes());
        let paged = match options.kv_layout {
            // The pool's kernels (fused write, decode attention from the pool) are CUDA's; Metal
            // keeps the per-sequence caches whose candle ops the CPU runs and tests.
            KvLayout::Auto => device.is_cuda(),
            KvLayout::Contiguous => false,
            KvLayout::Paged => true,
        };
        let pool = paged
            .then(|| {
                KvPool::new(
                    blocks.len(),
                    config.num_kv_heads,
                    config.head_dim,
                    dtype,
                    device,
                )
            })
            .transpose()?;
        let fused_kernels = !options.ablations.no_fused_kernels && device.is_cuda();
        let fused_ops = fused_kernels && !options.ablations.no_fused_ops;
        // Strata's decode kernel neither soft-caps scores nor slides a window (sliding layers whose
        // window cuts a history short take the portable path step by step, see `DecodeBatch`), and
        // its RoPE-and-write kernel rotates the projection's output as it is, so q/k norms keep
        // the separate write.
        let fused_attention = fused_kernels
            && super::paged_attention_supported(config.head_dim)
            && !blocks.iter().any(Layer::has_softcap);
        let fused_write = fused_attention && !blocks.iter().any(Layer::has_qk_norm);
        Ok(Self {
            ropes,
            pool,
            masks: MaskCache::new(!options.ablations.no_mask_cache),
            config,
            layers,
            embedding,
            blocks,
            head,
            device: device.clone(),
            dtype,
            weight_bytes,
            fused_attention,
            fused_write,
            fused_ops,
            attention_wide_from: options
                .ablations
                .attention_wide_from
                .unwrap_or(ATTENTION_WIDE_FROM),
            cpu_attention: isa.filter(|_| device.is_cpu() && !options.ablations.no_cpu_attention),
            timer: PhaseTimer::new(options.phase_times),
            #[cfg(feature = "cuda")]
            graphs: (device.is_cuda() && !options.ablations.no_cuda_graphs)
                .then(super::step_graph::StepGraphs::default),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// How many of the stage's blocks compute q, k and v in one matmul, and whether its paged
    /// steps rotate and write keys and values in one kernel (what the CUDA tests check is taken).
    pub fn fusions(&self) -> (usize, bool) {
        let fused = self.blocks.iter().filter(|b| b.has_fused_qkv()).count();
        (fused, self.fused_write)
    }

    /// The marks of `--phase-times` this stage was loaded with.
    pub fn timer(&self) -> PhaseTimer {
        self.timer
    }

    /// Whether strata's fused CUDA kernels for elementwise work (and the greedy choice) run here.
    pub fn fused_ops(&self) -> bool {
        self.fused_ops
    }

    /// With a paged pool: gives every sequence of the step pages for its new positions (growing the
    /// pool up to its limit). Fails, changing no sequence's length, when the pool is full.
    pub fn reserve_pages(&mut self, segments: &[Segment], caches: &mut [SequenceKv]) -> Result<()> {
        let Some(pool) = &mut self.pool else {
            return Ok(());
        };
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            let pages = cache.pages_mut().ok_or_else(|| {
                candle_core::Error::msg("a contiguous cache sent to a paged stage")
            })?;
            pool.reserve(pages, seg.start_pos + seg.len)?;
        }
        Ok(())
    }

    /// Keeps the shared KV pool (if any) within `bytes`; the engine's admission check keeps the
    /// pages in use within it, so a pool that grows only this far never runs the device out of memory.
    pub fn limit_pool_bytes(&mut self, bytes: usize) -> Result<()> {
        match &mut self.pool {
            Some(pool) => pool.limit_bytes(bytes),
            None => Ok(()),
        }
    }

    /// Bytes of the shared KV pool, used or not (0 with per-sequence caches).
    pub fn pool_bytes(&self) -> usize {
        self.pool.as_ref().map_or(0, KvPool::capacity_bytes)
    }

    /// Whether sequences keep their keys and values in a shared paged pool (accelerators).
    pub fn is_paged(&self) -> bool {
        self.pool.is_some()
    }

    /// A new sequence's caches holding a copy of `source`'s first `len` positions, with room for
    /// `extra` more. Fails on a paged stage whose pool has no room for the copy.
    pub fn fork_cache(
        &mut self,
        source: &SequenceKv,
        len: usize,
        extra: usize,
    ) -> Result<SequenceKv> {
        match &mut self.pool {
            Some(pool) => {
                let pages = source.pages().ok_or_else(|| {
                    candle_core::Error::msg("a contiguous cache on a paged stage")
                })?;
                let len = len.min(source.len());
                Ok(SequenceKv::paged_holding(
                    pool.copy_prefix(pages, len)?,
                    len,
                ))
            }
            None => source.copy_prefix(len, extra),
        }
    }

    /// Empty caches for a new sequence with room for `initial` positions.
    pub fn new_cache(&self, initial: usize) -> Result<SequenceKv> {
        if let Some(pool) = &self.pool {
            return Ok(SequenceKv::paged(pool.sequence()));
        }
        SequenceKv::new(
            self.blocks.len(),
            self.config.num_kv_heads,
            self.config.head_dim,
            initial,
            self.dtype,
            &self.device,
        )
    }

    /// Runs a micro-batch. `segments[s]` places sequence `s` in the rows of `input`, `caches[s]` is its
    /// cache. Returns hidden states `[rows, hidden]`, or on the last stage the f32 logits of each
    /// sequence's last row, `[sequences, vocab]`. The caller validated shapes and positions.
    pub fn forward(
        &mut self,
        input: StageInput,
        segments: &[Segment],
        caches: &mut [SequenceKv],
    ) -> Result<Tensor> {
        self.timer.start(&self.device);
        let graph = self.graph_layout(segments);
        let positions: Vec<u32> = segments
            .iter()
            .flat_map(|s| (s.start_pos..s.start_pos + s.len).map(|p| p as u32))
            .collect();
        // Every index array of the step goes to the device in one copy; the first stage's token
        // ids are embedded once that copy is made.
        let mut indexes = IndexBuffer::default();
        let entry = match (input, &self.embedding) {
            (StageInput::Tokens(ids), Some(embedding)) if ids.len() == positions.len() => {
                match embedding {
                    Embedding::Dense(table) => StepEntry::Tokens(indexes.push(ids), table.clone()),
                    Embedding::Quantized(table) => {
                        StepEntry::Rows(table.rows_of(&ids, self.dtype)?)
                    }
                }
            }
            (StageInput::Tokens(ids), Some(_)) => {
                candle_core::bail!("{} token ids for {} positions", ids.len(), positions.len())
            }
            (StageInput::Hidden(h), None) => StepEntry::Hidden(h),
            (StageInput::Tokens(_), None) => candle_core::bail!("token ids sent to a later stage"),
            (StageInput::Hidden(_), Some(_)) => {
                candle_core::bail!("hidden states sent to the first stage")
            }
        };
        // Every table covers the whole context, so the rows are the same for each.
        let angle_rows = indexes.push(self.ropes[0].row_index(&positions)?);
        self.reserve_pages(segments, caches)?;
        let paged_plan = self
            .pool
            .as_ref()
            .map(|_| {
                PagedStep::plan(
                    segments,
                    caches,
                    self.fused_attention,
                    self.fused_write,
                    self.config.sliding_window,
                    graph.map(|g| g.len),
                    &mut indexes,
                )
            })
            .transpose()?;
        // On the last stage, each sequence's last row; in a decode-only step that is every row.
        let last_rows = (self.head.is_some() && segments.iter().any(|s| s.len != 1))
            .then(|| indexes.push(segments.iter().map(|s| (s.offset + s.len - 1) as u32)));
        let step = StepArrays {
            positions: &positions,
            segments,
            angle_rows,
            last_rows,
        };
        let out = match graph {
            #[cfg(feature = "cuda")]
            Some(graph) => self.forward_graphed(graph, &indexes, entry, paged_plan, &step)?,
            _ => {
                let uploaded = indexes.upload(&self.device)?;
                self.run(entry, &uploaded, paged_plan, &step, caches)?
            }
        };
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            cache.advance(seg.len);
        }
        Ok(out)
    }

    /// How a decode step is laid out to run as a CUDA graph, or `None` when the step runs
    /// eagerly: graphs need CUDA, decode rows only, the fused attention kernel (no masks), the
    /// RoPE table (no angles computed from positions on the host) and no sliding window that cuts
    /// a history short, and no phase timing (which synchronizes mid-step).
    fn graph_layout(&self, segments: &[Segment]) -> Option<GraphLayout> {
        #[cfg(feature = "cuda")]
        {
            let longest = segments.iter().map(|s| s.start_pos + 1).max()?;
            let eligible = self.graphs.is_some()
                && self.pool.is_some()
                && self.fused_attention
                && !self.timer.active()
                && segments.iter().all(|s| s.len == 1)
                && self.ropes.iter().all(RopeTable::keeps_table)
                && self.config.sliding_window.is_none_or(|w| longest <= w);
            let bucket = super::step_graph::LEN_BUCKET;
            eligible.then(|| GraphLayout {
                len: longest.div_ceil(bucket) * bucket,
                wide: longest >= self.attention_wide_from,
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = segments;
            None
        }
    }

    /// A decode step through the CUDA graph of its shape (see `step_graph`): its index array and
    /// input rows go into the graph's own buffers, then the graph is replayed, captured, or (the
    /// first time a shape is seen, or where it cannot be captured) the step runs eagerly on them.
    #[cfg(feature = "cuda")]
    fn forward_graphed(
        &mut self,
        layout: GraphLayout,
        indexes: &IndexBuffer,
        entry: StepEntry,
        plan: Option<PagedStepPlan>,
        step: &StepArrays<'_>,
    ) -> Result<Tensor> {
        use super::step_graph::{copy_device, copy_host, workspace_epoch, GraphKey, Plan};
        let (Some(pool), Some(graphs), Device::Cuda(cuda)) =
            (&self.pool, &mut self.graphs, &self.device)
        else {
            candle_core::bail!("a CUDA graph step needs the paged pool on a CUDA device");
        };
        let hidden_input = !matches!(entry, StepEntry::Tokens(..));
        let key = GraphKey {
            sequences: step.segments.len(),
            len: layout.len,
            wide: layout.wide,
            indexes: indexes.values().len(),
            hidden_input,
            pool_generation: pool.generation(),
            workspace_epoch: workspace_epoch(),
        };
        let hidden = hidden_input.then_some((self.config.hidden_size, self.dtype));
        let (mut slot, todo) = graphs.take(key, hidden, &self.device)?;
        let cuda = cuda.clone();
        let device = self.device.clone();
        let result = (|| {
            copy_host(indexes.values(), &slot.indexes)?;
            // Rows that enter the stage go into the graph's own input buffer (`hidden_input` in the
            // key gives every such slot one).
            let entry = match (entry, &slot.input) {
                (StepEntry::Hidden(x), Some(buffer)) => {
                    copy_device(&x, buffer)?;
                    StepEntry::Hidden(buffer.clone())
                }
                (StepEntry::Rows(x), Some(buffer)) => {
                    copy_device(&x, buffer)?;
                    StepEntry::Rows(buffer.clone())
                }
                (entry @ StepEntry::Tokens(..), None) => entry,
                _ => candle_core::bail!("a CUDA graph's input buffer does not match its step"),
            };
            let uploaded = UploadedIndexes::on_device(slot.indexes.clone());
            // Paged steps keep every sequence's history in the pool: no cache is read or written
            // but through it.
            let no_caches: &mut [SequenceKv] = &mut [];
            match todo {
                Plan::Replay => slot.replay(),
                Plan::Eager => self.run(entry, &uploaded, plan, step, no_caches),
                Plan::Warm => {
                    let _cache = cuda.enable_cuda_graph_htod_cache();
                    let out = self.run(entry, &uploaded, plan, step, no_caches)?;
                    slot.warmed(&out);
                    Ok(out)
                }
                Plan::Capture => {
                    let _cache = cuda.enable_cuda_graph_htod_cache();
                    let captured = slot.capture(&device, || {
                        self.run(entry.clone(), &uploaded, plan.clone(), step, &mut [])
                    })?;
                    match captured {
                        Some(out) => Ok(out),
                        None => self.run(entry, &uploaded, plan, step, no_caches),
                    }
                }
            }
        })();
        if let Some(graphs) = &mut self.graphs {
            graphs.put(key, slot);
        }
        result
    }

    /// The step's work on the device, from its uploaded index arrays on.
    fn run(
        &mut self,
        entry: StepEntry,
        uploaded: &UploadedIndexes,
        paged_plan: Option<PagedStepPlan>,
        step: &StepArrays<'_>,
        caches: &mut [SequenceKv],
    ) -> Result<Tensor> {
        let mut x = match entry {
            StepEntry::Hidden(hidden) => hidden,
            StepEntry::Tokens(ids, table) => {
                let x = table.index_select(&uploaded.get(ids)?, 0)?;
                self.scale_embedding(x)?
            }
            StepEntry::Rows(x) => self.scale_embedding(x)?,
        };
        let paged_step = paged_plan
            .map(|plan| {
                plan.resolve(
                    uploaded,
                    self.config.num_kv_heads,
                    self.config.head_dim,
                    self.dtype,
                    &self.device,
                )
            })
            .transpose()?;
        let fused_write = paged_step.as_ref().is_some_and(|step| step.fused_write);
        let angle_index = uploaded.get(step.angle_rows)?;
        let angles = self
            .ropes
            .iter()
            .map(|rope| rope.angles(step.positions, angle_index.clone(), fused_write))
            .collect::<Result<Vec<_>>>()?;
        self.timer.mark(&self.device, "embedding, step indexes");
        let mut ctx = StepContext {
            segments: step.segments,
            angles,
            ropes: &self.ropes,
            masks: &mut self.masks,
            max_len: self.config.context_length,
            paged: self.pool.as_ref().zip(paged_step.as_ref()),
            fused_ops: self.fused_ops,
            attention_wide_from: self.attention_wide_from,
            cpu_attention: self.cpu_attention,
            timer: self.timer,
        };
        // Each block's feed-forward output is added to the stream by the next block (with its
        // first norm) or below (with the head's norm).
        let mut pending = None;
        for (i, block) in self.blocks.iter().enumerate() {
            self.timer.layer_start();
            let (stream, out) = block.forward(&x, pending.as_ref(), i, caches, &mut ctx)?;
            x = stream;
            pending = Some(out);
            self.timer.layer_end(i);
        }
        let Some(head) = &self.head else {
            return match pending {
                Some(out) => x + out,
                None => Ok(x),
            };
        };
        let last_rows = uploaded.get_some(step.last_rows)?;
        let select = |t: Tensor| match &last_rows {
            Some(rows) => t.index_select(rows, 0),
            None => Ok(t),
        };
        let pending = pending.map(select).transpose()?;
        let (_, x) = add_pending_and_norm(
            &select(x)?,
            pending.as_ref(),
            &head.norm,
            self.config.rms_norm_eps as f32,
            self.fused_ops,
        )?;
        let logits = head.output.forward(&x)?.to_dtype(DType::F32)?;
        let logits = match self.config.final_softcap {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
            None => logits,
        };
        self.timer.mark(&self.device, "head");
        Ok(logits)
    }

    /// Drops cached masks and step graphs (after a warmup, so it leaves nothing behind).
    pub fn clear_scratch(&mut self) {
        self.masks.clear();
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &mut self.graphs {
            graphs.clear();
        }
    }
}
