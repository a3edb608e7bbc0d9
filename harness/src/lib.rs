//! What the `strata` binary, the examples and the end-to-end tests share. Nothing here is needed
//! to call a cluster (that is `strata-client`) or to serve one (the worker and coordinator crates).
//!
//! - [`local`]: a cluster on this machine (worker processes plus an in-process coordinator), for
//!   `--local N`, the examples and the tests.
//! - [`model_cache`]: the known models, fetched once from PyPI and checked by sha256.
//! - [`bench`]: the optimization on/off benchmark.
//! - [`profile`]: phase reports (TTFT, throughput, latency percentiles) for `strata profile` and the benches.
//! - [`soak`]: many clients, hang-ups and checks that nothing is lost or wrong.
//! - [`single_process`]: the whole model in this process, no gRPC: the baseline for pipeline overhead.
//! - [`logits`]: whole last-position logits from the stages in one process, for fidelity checks.
//! - [`candle_reference`]: candle's own `quantized_llama`, the fixed point for per-core speed.
//! - [`candle_llama`]: candle's own `llama` on safetensors, the fixed point for GPU speed.
//! - [`llama_cpp`]: runs llama.cpp's `llama-bench` beside `strata bench kernels`.

pub mod bench;
pub mod candle_llama;
pub mod candle_reference;
pub mod llama_cpp;
pub mod local;
pub mod logits;
pub mod model_cache;
pub mod profile;
pub mod single_process;
pub mod soak;

pub use local::{LocalCluster, LocalOptions};
