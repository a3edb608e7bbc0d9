//! strata's wire format, generated from `proto/strata/v1/*.proto`.
//!
//! Only this crate knows the wire types; the other crates convert them to their own domain types at
//! their service boundaries. Every rpc and field is documented in the `.proto` files.

/// The `strata.v1` package: worker and coordinator services and their messages.
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

mod checks;
pub use checks::{penalties_apply, MAX_LOGIT_BIAS};
