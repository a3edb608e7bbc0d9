//! The Rust client of a strata coordinator: [`StrataClient`] connects (plaintext, or TLS with a
//! token), streams a generation as [`Event`]s, collects one, batches several, and tokenizes.
//!
//! It depends on the wire format and the transport only, so a program that calls a cluster does
//! not build the model code, the worker or the coordinator (`examples/stream.rs` is such a program).

pub mod client;

pub use client::{
    collect, ClientError, Event, FinishReason, Finished, GenerateParams, Generation,
    OutputConstraint, StrataClient, Token, TokenStream,
};
pub use strata_transport::{Security, SecurityFiles, TransportError};
