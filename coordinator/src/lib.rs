//! The strata coordinator: plans which layers run where, schedules sequences, forwards activations
//! from stage to stage and streams tokens to clients.
//!
//! - [`server`]: `Coordinator::start` (connect, plan, load, warm up) and `run(listener, config, shutdown)`.
//! - [`service`]: the gRPC boundary; validates and tokenizes requests (for the HTTP API too).
//! - [`http`]: the HTTP port: OpenAI-compatible API, `/health`, `/metrics`.
//! - [`metrics`]: the Prometheus metrics.
//! - [`events`]: what the scheduler tells a request's stream (tokens, the end, failures), in its
//!   own types; the service converts them to the wire.
//! - [`scheduler`]: the one task that owns every sequence and drives the pipeline step by step.
//! - [`pipeline`]: the workers in order; one micro-batch through every stage.
//! - [`plan`]: the split planner, a pure function.
//! - [`send_weights`]: a stage's weights sent to a worker without the model file (only what its
//!   cache lacks).
//! - [`recovery`]: noticing a lost stage and loading it again on a spare or the same worker.
//! - [`detokenize`]: token ids to text deltas; stop strings.
//! - [`prefix_cache`]: which prompt prefixes the stages hold parked, for requests that start alike.
//! - [`grammar`]: constrained decoding (JSON Schema, Lark): the mask of tokens a grammar allows next.

pub mod detokenize;
pub mod error;
pub mod events;
pub mod forward_link;
pub mod grammar;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod prefix_cache;
pub mod prompt_threads;
pub mod recovery;
pub mod scheduler;
pub mod send_weights;
pub mod server;
pub mod service;

pub use error::CoordinatorError;
pub use server::{run, ClientAccess, Coordinator, CoordinatorConfig};
