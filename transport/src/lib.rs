//! Security for every strata port: TLS (rustls) and bearer credentials, by role.
//!
//! Two kinds of port: a worker's admits cluster members (the node CA's certificates and the
//! cluster's token); a coordinator's client ports admit clients (the client CA's certificates too,
//! and client API keys, [`ApiKeys`], never the token). Servers are built with
//! [`Security::configure_server`] for their [`Peers`] and wrap each service in a [`ServerAuth`];
//! callers dial with [`Security::connect`], whose channel attaches this node's credential to every
//! call. `strata keys` writes a cluster's files with [`keys::generate`]. [`spin::spin_first`] is how GPU pipelines wait for a message that is due soon.

mod api_keys;
mod auth;
pub mod keys;
pub mod spin;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};

pub use api_keys::{new_key_line, ApiKeys, Reload};
pub use auth::{AuthToken, Caller, ClientAuth, ServerAuth};
pub use tls::{Peers, TlsMaterial, HANDSHAKE_TIMEOUT};

/// A channel that carries the token on every call.
pub type AuthChannel = InterceptedService<Channel, ClientAuth>;

/// What can go wrong setting up security or dialing a peer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {what} from {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("invalid security setup: {0}")]
    Invalid(String),
    #[error(
        "refusing to listen on {address} without TLS and {credential}: anyone who can reach it \
         could use it. Run `strata keys --out DIR` and pass {hint}, or pass --insecure to accept \
         the risk"
    )]
    InsecureBind {
        address: SocketAddr,
        credential: &'static str,
        hint: &'static str,
    },
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Concurrent streams one client connection may open on a gRPC port.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// How often an idle gRPC connection is pinged, and how long the answer may take.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Where a node's security material lives (all optional; each part works alone).
#[derive(Debug, Clone, Default)]
pub struct SecurityFiles {
    /// This node's certificate chain (PEM); with `key`, enables TLS on its server and is presented as
    /// a client certificate when it dials.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Certificates trusted for peers (PEM); dialing uses TLS when this is set.
    pub ca: Option<PathBuf>,
    /// Certificates trusted, besides `ca`, for the clients of a client-facing port.
    pub client_ca: Option<PathBuf>,
    /// Servers also require clients to present a certificate signed by `ca` (or, on a client
    /// port, `client_ca`): mutual TLS.
    pub mutual_tls: bool,
    /// The file of the credential this node sends (its first line): the cluster's token for a
    /// node, an API key for a client. A worker also admits only its holders.
    pub token_file: Option<PathBuf>,
    /// The credential itself (e.g. from an environment variable); `token_file` wins if both are set.
    pub token: Option<String>,
    /// The name to expect in peers' certificates instead of the host in their address.
    pub server_name: Option<String>,
}

impl SecurityFiles {
    /// The files of a directory `strata keys` wrote: a node's (`token`, and `client-ca.pem` for a
    /// coordinator's client ports) or a client's (`api-key`). Given a new cluster's top directory,
    /// the node's files in it.
    pub fn from_keys_dir(dir: &Path) -> Self {
        let node = dir.join(keys::NODE_DIR);
        let dir = if !dir.join(keys::CERT_FILE).exists() && node.join(keys::CERT_FILE).exists() {
            node
        } else {
            dir.to_path_buf()
        };
        let token = dir.join(keys::TOKEN_FILE);
        let api_key = dir.join(keys::API_KEY_FILE);
        let client_ca = dir.join(keys::CLIENT_CA_FILE);
        Self {
            cert: Some(dir.join(keys::CERT_FILE)),
            key: Some(dir.join(keys::KEY_FILE)),
            ca: Some(dir.join(keys::CA_FILE)),
            client_ca: client_ca.exists().then_some(client_ca),
            token_file: Some(if !token.exists() && api_key.exists() {
                api_key
            } else {
                token
            }),
            ..Self::default()
        }
    }
}

/// A node's loaded security: TLS material and the shared token, either of which may be absent.
#[derive(Debug, Clone, Default)]
pub struct Security {
    tls: Option<TlsMaterial>,
    token: Option<AuthToken>,
    server_name: Option<String>,
}

impl Security {
    /// No TLS, no token: only for loopback or with `--insecure`.
    pub fn none() -> Self {
        Self::default()
    }

    /// A token only (e.g. local workers started by one process).
    pub fn with_token(token: AuthToken) -> Self {
        Self {
            token: Some(token),
            ..Self::default()
        }
    }

    /// Reads every file named in `files`.
    pub fn load(files: &SecurityFiles) -> Result<Self, TransportError> {
        let tls = TlsMaterial::load(files)?;
        let token = match (&files.token_file, &files.token) {
            (Some(path), _) => Some(AuthToken::read(path)?),
            (None, Some(token)) => Some(AuthToken::new(token)?),
            (None, None) => None,
        };
        Ok(Self {
            tls,
            token,
            server_name: files.server_name.clone(),
        })
    }

    /// The same TLS, sending `credential` instead (a client's API key in place of the token).
    pub fn with_credential(&self, credential: Option<AuthToken>) -> Self {
        Self {
            token: credential,
            ..self.clone()
        }
    }

    pub fn tls_enabled(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsMaterial::can_serve)
    }

    pub fn token(&self) -> Option<&AuthToken> {
        self.token.as_ref()
    }

    /// Refuses a non-loopback listen address for `peers` unless TLS is on and `admits` asks for a
    /// credential, or the user said `--insecure` (then it warns).
    pub fn check_listen(
        &self,
        address: SocketAddr,
        peers: Peers,
        admits: &ServerAuth,
        insecure: bool,
    ) -> Result<(), TransportError> {
        if address.ip().is_loopback() || (self.tls_enabled() && !admits.is_open()) {
            return Ok(());
        }
        if insecure {
            tracing::warn!(
                %address,
                tls = self.tls_enabled(),
                credential = !admits.is_open(),
                "listening beyond loopback without TLS and a credential (--insecure)"
            );
            return Ok(());
        }
        let (credential, hint) = if peers == Peers::Members {
            (
                "the cluster's token",
                "`--keys DIR/node` (or --tls-cert/--tls-key and --auth-token-file)",
            )
        } else {
            (
                "client API keys",
                "`--keys DIR/node --api-keys DIR/api-keys` (or --tls-cert/--tls-key and --api-keys)",
            )
        };
        Err(TransportError::InsecureBind {
            address,
            credential,
            hint,
        })
    }

    /// Turns on TLS for a server of `peers` when this node has a certificate and key.
    pub fn configure_server(&self, server: Server, peers: Peers) -> Result<Server, TransportError> {
        // One client connection cannot open streams without bound (the coordinator's clients
        // open one per request, a worker sees a handful), and a peer that vanishes without closing
        // its connection is noticed by HTTP/2 and TCP keepalives instead of holding it forever.
        let server = server
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .tcp_keepalive(Some(KEEPALIVE_INTERVAL));
        match self.tls.as_ref().and_then(|t| t.server_config(peers)) {
            Some(config) => server
                .tls_config(config)
                .map_err(|e| TransportError::Invalid(format!("TLS server setup failed: {e}"))),
            None => Ok(server),
        }
    }

    /// The check of a members' port: the cluster's token (when this node has one).
    pub fn auth_check(&self) -> ServerAuth {
        ServerAuth::new(self.token.clone())
    }

    /// A rustls configuration for serving HTTP over TLS with the same certificate (and client
    /// checks, with mutual TLS) as the gRPC port; `None` without a certificate.
    pub fn http_tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TransportError> {
        match &self.tls {
            Some(tls) if tls.can_serve() => tls.rustls_server_config().map(Some),
            _ => Ok(None),
        }
    }

    /// Wraps a members' service so every call must carry the cluster's token (when one is set).
    pub fn server_auth<S>(&self, service: S) -> InterceptedService<S, ServerAuth> {
        InterceptedService::new(service, self.auth_check())
    }

    /// The endpoint for `address` (`host:port`, or a URL): https when this node trusts a CA.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, TransportError> {
        let connect_error = |reason: String| TransportError::Connect {
            address: address.to_string(),
            reason,
        };
        let tls = self
            .tls
            .as_ref()
            .and_then(|t| t.client_config(self.server_name.as_deref()));
        let url = if address.contains("://") {
            address.to_string()
        } else if tls.is_some() {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| connect_error(format!("invalid address {url:?}: {e}")))?
            .tcp_nodelay(true);
        if let Some(config) = tls {
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| connect_error(format!("TLS setup failed: {e}")))?;
        }
        Ok(endpoint)
    }

    /// Connects to `address` within `timeout`; the channel attaches the token to every call.
    pub async fn connect(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<AuthChannel, TransportError> {
        let endpoint = self.endpoint(address)?;
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| TransportError::Connect {
                address: address.to_string(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| TransportError::Connect {
                address: address.to_string(),
                reason: error_chain(&e),
            })?;
        Ok(self.authorize(channel))
    }

    /// Attaches the token to every call on `channel`.
    pub fn authorize(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, ClientAuth::new(self.token.clone()))
    }
}

/// An error and its sources on one line (tonic's transport errors hide the reason in the chain).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
