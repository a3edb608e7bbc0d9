//! TLS material read from PEM files, turned into tonic's server and client configurations.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{SecurityFiles, TransportError};

/// A node's PEM files, loaded.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// Certificate chain and private key: this node's identity as a server and as a client.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Trusted roots for peers: the servers this node dials, and the clients of a members' port.
    ca: Option<Vec<u8>>,
    /// Roots trusted besides `ca` for the clients of a client-facing port (the coordinator's).
    client_ca: Option<Vec<u8>>,
    mutual: bool,
}

/// Who connects to a server: this decides which CAs its mutual TLS trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Cluster members only (a worker's port): certificates of the node CA.
    Members,
    /// Clients (the coordinator's ports): the client CA's certificates, and nodes'.
    Clients,
}

/// A TLS handshake that has not finished by then is dropped, so half-open connections cannot pile
/// up on a port.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl TlsMaterial {
    /// `None` when no TLS file is named.
    pub fn load(files: &SecurityFiles) -> Result<Option<Self>, TransportError> {
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "the TLS certificate", "CERTIFICATE")?,
                read_pem(key, "the TLS private key", "PRIVATE KEY")?,
            )),
            (None, None) => None,
            _ => {
                return Err(TransportError::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ))
            }
        };
        let ca = match &files.ca {
            Some(path) => Some(read_pem(path, "the TLS CA certificate", "CERTIFICATE")?),
            None => None,
        };
        let client_ca = match &files.client_ca {
            Some(path) => Some(read_pem(
                path,
                "the TLS client CA certificate",
                "CERTIFICATE",
            )?),
            None => None,
        };
        if files.mutual_tls && (ca.is_none() || identity.is_none()) {
            return Err(TransportError::Invalid(
                "mutual TLS needs --tls-ca (to check peers) and --tls-cert/--tls-key (to be checked)"
                    .into(),
            ));
        }
        if identity.is_none() && ca.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            identity,
            ca,
            client_ca,
            mutual: files.mutual_tls,
        }))
    }

    /// Whether this node serves TLS.
    pub fn can_serve(&self) -> bool {
        self.identity.is_some()
    }

    /// The roots a server of `peers` checks client certificates against (PEM, concatenated).
    fn client_roots(&self, peers: Peers) -> Option<Vec<u8>> {
        let mut roots = self.ca.clone()?;
        if let (Peers::Clients, Some(client_ca)) = (peers, &self.client_ca) {
            if !roots.ends_with(b"\n") {
                roots.push(b'\n');
            }
            roots.extend_from_slice(client_ca);
        }
        Some(roots)
    }

    pub fn server_config(&self, peers: Peers) -> Option<ServerTlsConfig> {
        let (cert, key) = self.identity.as_ref()?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(HANDSHAKE_TIMEOUT);
        if self.mutual {
            if let Some(roots) = self.client_roots(peers) {
                config = config.client_ca_root(Certificate::from_pem(roots));
            }
        }
        Some(config)
    }

    /// The same server identity (and client checks) as a rustls configuration, for the HTTP port
    /// (a client port). Offers HTTP/2 and HTTP/1.1.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TransportError> {
        let invalid = |e: String| TransportError::Invalid(format!("TLS server setup failed: {e}"));
        let (cert, key) = self
            .identity
            .as_ref()
            .ok_or_else(|| invalid("no certificate and key".into()))?;
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid(format!("key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?;
        let builder = match (self.client_roots(Peers::Clients), self.mutual) {
            (Some(ca), true) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&ca) {
                    let c = c.map_err(|e| invalid(format!("CA certificate: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| invalid(format!("CA certificate: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| invalid(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| invalid(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// TLS for dialing, when this node trusts a CA; presents its own certificate too (for servers
    /// that require mutual TLS).
    pub fn client_config(&self, server_name: Option<&str>) -> Option<ClientTlsConfig> {
        let ca = self.ca.as_ref()?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = server_name {
            config = config.domain_name(name);
        }
        Some(config)
    }
}

/// Reads a PEM file and checks it holds a block of the expected kind, so a swapped or empty file
/// is named here rather than failing later inside a handshake.
fn read_pem(path: &Path, what: &'static str, label: &str) -> Result<Vec<u8>, TransportError> {
    let read_error = |reason: String| TransportError::Read {
        what,
        path: PathBuf::from(path),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| read_error(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(label));
    if !has_block {
        return Err(read_error(format!("no PEM block with {label:?} in it")));
    }
    Ok(bytes)
}
