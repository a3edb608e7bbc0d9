//! The tensor math of a stage: loading a layer range and running micro-batches through it.
//!
//! - [`stage`]: the stage itself (embedding, blocks, head) and its forward pass.
//! - [`layer`]: one transformer block on a ragged micro-batch.
//! - [`kv_cache`], [`kv_pool`], [`rope`], [`mask`]: per-sequence caches (CPU), the paged pool
//!   (accelerators) and per-stage tables.
//! - [`weights`], [`linear`]: reading tensors from GGUF or safetensors; quantized or dense projections.
//! - [`cpu_kernels`]: strata's AVX2 matmuls for GGUF weights on the CPU (Q4_0..Q8_0, Q4_K..Q6_K).
//! - `paged_attention` (CUDA builds): decode attention from the paged pool in one kernel.
//! - `fused_ops` (CUDA builds): residual add + RMSNorm and SiLU · up, one kernel each.
//! - `step_graph` (CUDA builds): decode steps recorded once as CUDA graphs and replayed.
//! - `cuda_kernel` (CUDA builds): what those two share (NVRTC compilation, device slices).
//! - [`sampling`]: choosing the next token from logits on the last stage.

pub mod cpu_attention;
pub mod cpu_kernels;
#[cfg(feature = "cuda")]
pub mod cuda_kernel;
pub mod embedding;
#[cfg(feature = "cuda")]
pub mod fused_ops;
pub mod kv_cache;
pub mod kv_pool;
pub mod layer;
pub mod linear;
pub mod mask;
#[cfg(feature = "cuda")]
pub mod paged_attention;
pub mod paged_step;
pub mod phase_timer;
pub mod prompt_softmax;
pub mod rope;
pub mod sampling;
pub mod stage;
#[cfg(feature = "cuda")]
pub mod step_graph;
pub mod step_indexes;
pub mod weights;

pub use layer::Segment;

/// Whether this build runs paged decode attention as one CUDA kernel for heads of size `head_dim`.
pub fn paged_attention_supported(head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    return paged_attention::supports_head_dim(head_dim);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = head_dim;
        false
    }
}
pub use stage::{Ablations, KvLayout, Stage, StageInput, StageOptions};
