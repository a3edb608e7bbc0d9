//! What the scheduler tells a request's stream, in the coordinator's own terms. The scheduler knows
//! nothing of gRPC or HTTP: `service.rs` converts these to the wire (`GenerateResponse`, `Status`)
//! and the HTTP API reads them through it.

use std::time::Duration;

use tokio::sync::mpsc;

/// The events of one request, ending with `Finished` or an error.
pub type EventSender = mpsc::UnboundedSender<Result<GenerationEvent, Failure>>;
pub type EventReceiver = mpsc::UnboundedReceiver<Result<GenerationEvent, Failure>>;

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    Token(TokenEvent),
    Finished(Finished),
}

/// A generated token as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// The text this token completes (whole characters; may be empty, and never part of a stop
    /// string).
    pub text: String,
    pub logprob: f32,
    /// The most likely alternatives `(id, log-probability)`, as many as asked for.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Since the request arrived.
    pub elapsed: Duration,
}

/// Why a generation ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// `max_tokens` were generated.
    Length,
    /// A stop string appeared.
    Stop,
    /// The context is full.
    Context,
}

impl FinishReason {
    /// The label in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Context => "context",
        }
    }
}

/// The last event of a request that finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_ids: Vec<u32>,
    pub generated_tokens: u32,
    /// From arrival to the first step.
    pub queue: Duration,
    /// From arrival to the first token.
    pub ttft: Duration,
    pub total: Duration,
    /// Device time per stage over the request's steps.
    pub stage_forward: Vec<Duration>,
    /// Round trip minus device time per stage over the request's steps.
    pub stage_hop: Vec<Duration>,
    /// Text held back until the end (an incomplete character, a possible stop string's start).
    pub trailing_text: String,
    /// Prompt tokens copied from the prefix cache rather than computed.
    pub cached_tokens: u32,
}

/// Why a request ended without finishing: what kind of failure, and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// The kinds of failure a client is told apart (each API maps them to its own codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request itself is wrong.
    InvalidRequest,
    /// Out of room (queue, KV memory); the same request may work later.
    Overloaded,
    /// A stage is down.
    Unavailable,
    /// The request ran out of time.
    DeadlineExceeded,
    /// The cluster is set up wrong (model, plan, TLS).
    FailedPrecondition,
    /// A bug or a worker breaking the protocol.
    Internal,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}
