//! TLS and token flags, shared by every command that serves or dials a gRPC port.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_transport::{Security, SecurityFiles};

/// The environment variable that may hold the token itself (never a flag: it would show in `ps`).
pub const TOKEN_ENV: &str = "STRATA_AUTH_TOKEN";

#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// A directory written by `strata keys`: TLS with its cert.pem, key.pem and ca.pem, and its
    /// token. The flags below override single files.
    #[arg(long, env = "STRATA_KEYS")]
    pub keys: Option<PathBuf>,
    /// This node's TLS certificate chain (PEM). With --tls-key, its server speaks TLS only.
    #[arg(long, env = "STRATA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "STRATA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) to trust for peers (PEM); dialing a peer then uses TLS.
    #[arg(long, env = "STRATA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Servers also require clients to present a certificate signed by --tls-ca (mutual TLS).
    #[arg(long, env = "STRATA_MUTUAL_TLS")]
    pub mutual_tls: bool,
    /// The name peers' certificates must carry, when it differs from the host being dialed
    /// (certificates from `strata keys` always carry `strata`).
    #[arg(long, env = "STRATA_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// A file whose first line is the cluster's shared token: every call must carry it, and
    /// this node sends it. The token itself may instead be in the STRATA_AUTH_TOKEN variable.
    #[arg(long, env = "STRATA_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl SecurityArgs {
    /// The files these flags name (explicit flags over `--keys`).
    pub fn files(&self) -> SecurityFiles {
        let base = self
            .keys
            .as_deref()
            .map(SecurityFiles::from_keys_dir)
            .unwrap_or_default();
        SecurityFiles {
            cert: self.tls_cert.clone().or(base.cert),
            key: self.tls_key.clone().or(base.key),
            ca: self.tls_ca.clone().or(base.ca),
            mutual_tls: self.mutual_tls,
            token_file: self.auth_token_file.clone().or(base.token_file),
            token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
            server_name: self.tls_server_name.clone(),
        }
    }

    pub fn load(&self) -> anyhow::Result<Security> {
        Security::load(&self.files()).context("invalid TLS or token settings")
    }
}
