//! TLS and credential flags, shared by every command that serves or dials a port. A node (worker,
//! coordinator) sends the cluster's token; a client (`generate --coordinator` and kin) sends an API
//! key.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_transport::{Security, SecurityFiles};

/// The environment variable that may hold the cluster's token itself (never a flag: it would show
/// in `ps`).
pub const TOKEN_ENV: &str = "STRATA_AUTH_TOKEN";
/// The environment variable that may hold a client's API key (what a client sends; for `strata
/// serve` and `strata coordinator`, one key clients may use).
pub const API_KEY_ENV: &str = "STRATA_API_KEY";

#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// A directory written by `strata keys`: TLS with its cert.pem, key.pem and ca.pem, and its
    /// token (a node's directory) or api-key (a client's). The flags below override single files.
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
    /// CA certificate(s) a coordinator trusts, besides --tls-ca, for its clients' certificates
    /// (`client-ca.pem` of `strata keys`). Workers never trust them.
    #[arg(long, env = "STRATA_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The coordinator requires clients to present a certificate (mutual TLS). Workers always
    /// require their callers' certificates once they have a certificate and a CA.
    #[arg(long, env = "STRATA_MUTUAL_TLS")]
    pub mutual_tls: bool,
    /// The name peers' certificates must carry, when it differs from the host being dialed
    /// (certificates from `strata keys` always carry `strata`).
    #[arg(long, env = "STRATA_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// A file whose first line is the cluster's token: every call to a worker must carry it, and
    /// nodes send it. The token itself may instead be in the STRATA_AUTH_TOKEN variable.
    #[arg(long, env = "STRATA_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// A client's API key file (its first line), sent to a coordinator. The key itself may instead
    /// be in the STRATA_API_KEY variable.
    #[arg(long, env = "STRATA_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

impl SecurityArgs {
    /// A node's files (explicit flags over `--keys`): it sends the cluster's token.
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
            client_ca: self.tls_client_ca.clone().or(base.client_ca),
            mutual_tls: self.mutual_tls,
            token_file: self.auth_token_file.clone().or(base.token_file),
            token: env(TOKEN_ENV),
            server_name: self.tls_server_name.clone(),
        }
    }

    /// A client's files: it sends an API key (`--api-key-file`, STRATA_API_KEY, or the `--keys`
    /// directory's), never the cluster's token unless told to with --auth-token-file.
    pub fn client_files(&self) -> SecurityFiles {
        let node = self.files();
        let (token_file, token) = match (&self.auth_token_file, &self.api_key_file) {
            (Some(file), _) | (None, Some(file)) => (Some(file.clone()), None),
            (None, None) => match env(API_KEY_ENV) {
                Some(key) => (None, Some(key)),
                None => (node.token_file, node.token),
            },
        };
        SecurityFiles {
            token_file,
            token,
            ..node
        }
    }

    pub fn load(&self) -> anyhow::Result<Security> {
        Security::load(&self.files()).context("invalid TLS or token settings")
    }

    pub fn load_client(&self) -> anyhow::Result<Security> {
        Security::load(&self.client_files()).context("invalid TLS or API key settings")
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|t| !t.is_empty())
}
