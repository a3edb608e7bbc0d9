//! A strata worker: one process, one device, one contiguous range of a model's layers.
//!
//! - [`server`]: `run(listener, config, shutdown)`, the entry point.
//! - [`service`]: the gRPC boundary; converts wire messages to domain types and back.
//! - [`engine`]: the compute thread that owns the device, the stage and every sequence's KV cache,
//!   and validates each micro-batch before touching them.
//! - [`model`]: the tensor math (stage, layers, caches, RoPE, masks, sampling, weight loading).
//! - [`blob_store`]: the cache of weights a coordinator sent, named by digest.
//! - [`sent_weights`]: a stage's weights as the coordinator sent them, checked against the plan.
//! - [`codec`]: tensors on the wire, checked.
//! - [`device`]: `cpu` / `cuda:N` / `metal:N`.

pub mod blob_store;
pub mod codec;
pub mod device;
pub mod engine;
pub mod error;
pub mod memory;
pub mod model;
pub mod sent_weights;
pub mod server;
pub mod service;

pub use error::WorkerError;
pub use server::{run, WorkerConfig};
