//! `strata keys`: a cluster's credentials, each role apart.
//!
//! `generate` writes a new cluster: two private CAs (one signs nodes, one signs clients) whose keys
//! stay in `ca/` with the operator, the cluster's token, a first node identity, a first client
//! identity and a client API key. `issue_node` and `issue_client` sign more from `ca/`. Workers
//! trust only the node CA, so a client certificate is never a node's, and the token (the cluster's
//! credential) is never a client's API key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::{AuthToken, TransportError};

pub const CA_FILE: &str = "ca.pem";
pub const CLIENT_CA_FILE: &str = "client-ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const TOKEN_FILE: &str = "token";
/// A client's own key (one line), in a client directory.
pub const API_KEY_FILE: &str = "api-key";
/// The coordinator's keys file (`NAME KEY` lines), at the top of a new cluster's directory.
pub const API_KEYS_FILE: &str = "api-keys";
/// The operator's directory: the CAs' private keys.
pub const CA_DIR: &str = "ca";
pub const NODE_DIR: &str = "node";
pub const CLIENT_DIR: &str = "client";
const CA_KEY_FILE: &str = "ca-key.pem";
const CLIENT_CA_KEY_FILE: &str = "client-ca-key.pem";

/// Names every node certificate is valid for besides the user's: loopback, and `strata` (for
/// `--tls-server-name strata` when dialing by an address the certificate does not list).
const BUILTIN_NAMES: [&str; 4] = ["localhost", "127.0.0.1", "::1", "strata"];

/// What was written.
#[derive(Debug, Clone)]
pub struct GeneratedKeys {
    pub files: Vec<PathBuf>,
    /// The names the node certificate is valid for.
    pub names: Vec<String>,
}

/// The two CAs differ in name as well as key, so a chain is never built through the wrong one.
fn ca_params(common_name: &str) -> Result<CertificateParams, TransportError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

const NODE_CA_NAME: &str = "strata node CA";
const CLIENT_CA_NAME: &str = "strata client CA";

fn invalid(e: rcgen::Error) -> TransportError {
    TransportError::Invalid(format!("certificate generation: {e}"))
}

/// Writes a new cluster into `dir`:
/// - `ca/`: both CAs with their private keys, and the token (the operator's; never copied)
/// - `node/`: `ca.pem`, `client-ca.pem`, `cert.pem` + `key.pem` (a node valid for `hosts`,
///   loopback and `strata`, for server and client auth), `token`: for workers and coordinators
/// - `client/`: `ca.pem` (to check the coordinator), a client certificate and `api-key`
/// - `api-keys`: the coordinator's keys file, holding the client's key as `default`
pub fn generate(dir: &Path, hosts: &[String]) -> Result<GeneratedKeys, TransportError> {
    let ca_dir = dir.join(CA_DIR);
    if ca_dir.join(CA_KEY_FILE).exists() {
        return Err(TransportError::Invalid(format!(
            "{} already holds a cluster's CA; issue more with `strata keys node` or `strata keys client`, or choose another --out",
            dir.display()
        )));
    }
    create_dir(&ca_dir)?;
    let mut files = Vec::new();
    for (common_name, cert_file, key_file) in [
        (NODE_CA_NAME, CA_FILE, CA_KEY_FILE),
        (CLIENT_CA_NAME, CLIENT_CA_FILE, CLIENT_CA_KEY_FILE),
    ] {
        let key = KeyPair::generate().map_err(invalid)?;
        let cert = ca_params(common_name)?.self_signed(&key).map_err(invalid)?;
        files.push(write(&ca_dir, cert_file, cert.pem().as_bytes(), false)?);
        files.push(write(
            &ca_dir,
            key_file,
            key.serialize_pem().as_bytes(),
            true,
        )?);
    }
    let token = AuthToken::generate()?;
    files.push(write(
        &ca_dir,
        TOKEN_FILE,
        format!("{}\n", token.as_str()).as_bytes(),
        true,
    )?);
    let node = issue_node(&ca_dir, &dir.join(NODE_DIR), "node", hosts)?;
    files.extend(node.files);
    let (client_files, line) = issue_client(&ca_dir, &dir.join(CLIENT_DIR), "default")?;
    files.extend(client_files);
    files.push(write(dir, API_KEYS_FILE, line.as_bytes(), true)?);
    Ok(GeneratedKeys {
        files,
        names: node.names,
    })
}

/// Signs a node identity with the node CA in `ca_dir` into `out`, with the CA certificates and the
/// cluster's token beside it.
pub fn issue_node(
    ca_dir: &Path,
    out: &Path,
    node_name: &str,
    hosts: &[String],
) -> Result<GeneratedKeys, TransportError> {
    let issuer = load_issuer(ca_dir, NODE_CA_NAME, CA_KEY_FILE)?;
    let mut names: Vec<String> = BUILTIN_NAMES.iter().map(|s| s.to_string()).collect();
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut params = CertificateParams::new(names.clone()).map_err(invalid)?;
    params.distinguished_name = name(&format!("strata node {node_name}"));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().map_err(invalid)?;
    let cert = params.signed_by(&key, &issuer).map_err(invalid)?;
    create_dir(out)?;
    let files = vec![
        copy(ca_dir, out, CA_FILE, false)?,
        copy(ca_dir, out, CLIENT_CA_FILE, false)?,
        write(out, CERT_FILE, cert.pem().as_bytes(), false)?,
        write(out, KEY_FILE, key.serialize_pem().as_bytes(), true)?,
        copy(ca_dir, out, TOKEN_FILE, true)?,
    ];
    Ok(GeneratedKeys { files, names })
}

/// Signs a client identity named `client_name` with the client CA in `ca_dir` into `out`, with a
/// fresh API key (`api-key`) and the node CA to check the coordinator by. Returns the files and
/// the `NAME KEY` line for the coordinator's keys file. The certificate is for client auth only,
/// and no worker trusts its CA.
pub fn issue_client(
    ca_dir: &Path,
    out: &Path,
    client_name: &str,
) -> Result<(Vec<PathBuf>, String), TransportError> {
    let (line, key_value) = crate::new_key_line(client_name)?;
    let issuer = load_issuer(ca_dir, CLIENT_CA_NAME, CLIENT_CA_KEY_FILE)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    params.distinguished_name = name(&format!("strata client {client_name}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(invalid)?;
    let cert = params.signed_by(&key, &issuer).map_err(invalid)?;
    create_dir(out)?;
    let files = vec![
        copy(ca_dir, out, CA_FILE, false)?,
        write(out, CERT_FILE, cert.pem().as_bytes(), false)?,
        write(out, KEY_FILE, key.serialize_pem().as_bytes(), true)?,
        write(
            out,
            API_KEY_FILE,
            format!("{}\n", key_value.as_str()).as_bytes(),
            true,
        )?,
    ];
    Ok((files, line))
}

/// The issuer for a CA of ours: its parameters are fixed, so its private key is all that is read.
fn load_issuer(
    ca_dir: &Path,
    common_name: &str,
    key_file: &str,
) -> Result<Issuer<'static, KeyPair>, TransportError> {
    let path = ca_dir.join(key_file);
    let pem = std::fs::read_to_string(&path).map_err(|e| TransportError::Read {
        what: "a CA's private key (the `ca/` directory `strata keys` wrote)",
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let key = KeyPair::from_pem(&pem).map_err(|e| TransportError::Read {
        what: "a CA's private key",
        path,
        reason: e.to_string(),
    })?;
    Ok(Issuer::new(ca_params(common_name)?, key))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn create_dir(dir: &Path) -> Result<(), TransportError> {
    std::fs::create_dir_all(dir).map_err(|e| TransportError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })
}

fn copy(from: &Path, to: &Path, file: &str, secret: bool) -> Result<PathBuf, TransportError> {
    let path = from.join(file);
    let bytes = std::fs::read(&path).map_err(|e| TransportError::Read {
        what: "the operator's CA directory",
        path,
        reason: e.to_string(),
    })?;
    write(to, file, &bytes, secret)
}

fn write(dir: &Path, file: &str, bytes: &[u8], secret: bool) -> Result<PathBuf, TransportError> {
    let path = dir.join(file);
    let failed = |e: std::io::Error| TransportError::Write {
        path: path.clone(),
        reason: e.to_string(),
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write;
    options
        .open(&path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(failed)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Peers, Security, SecurityFiles, ServerAuth};

    #[test]
    fn a_new_cluster_keeps_each_role_apart() {
        let dir = tempfile::tempdir().unwrap();
        let keys = generate(dir.path(), &["gpu-host-1".into(), "10.0.0.7".into()]).unwrap();
        assert!(keys.names.contains(&"gpu-host-1".to_string()));
        let node = SecurityFiles::from_keys_dir(dir.path());
        assert_eq!(node.cert, Some(dir.path().join(NODE_DIR).join(CERT_FILE)));
        assert!(node.client_ca.is_some());
        let security = Security::load(&node).unwrap();
        assert!(security.tls_enabled());
        let token = security.token().unwrap().clone();
        let public: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert!(security
            .check_listen(public, Peers::Members, &security.auth_check(), false)
            .is_ok());

        let client = SecurityFiles::from_keys_dir(&dir.path().join(CLIENT_DIR));
        assert_eq!(
            client.token_file,
            Some(dir.path().join(CLIENT_DIR).join(API_KEY_FILE))
        );
        assert!(client.client_ca.is_none());
        let client = Security::load(&client).unwrap();
        let api_key = client.token().unwrap().clone();
        assert_ne!(api_key, token, "a client's key is not the cluster's token");
        let keys = crate::ApiKeys::load(&dir.path().join(API_KEYS_FILE)).unwrap();
        assert_eq!(
            keys.check(api_key.as_str().as_bytes()).as_deref(),
            Some("default")
        );
        assert_eq!(keys.check(token.as_str().as_bytes()), None);
        assert!(ServerAuth::new(Some(token))
            .check(Some(api_key.as_str().as_bytes()))
            .is_err());

        // The node directory holds no CA key; the operator's does.
        for entry in std::fs::read_dir(dir.path().join(NODE_DIR)).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(!name.to_string_lossy().contains("ca-key"), "{name:?}");
        }
        #[cfg(unix)]
        for secret in [
            dir.path().join(NODE_DIR).join(KEY_FILE),
            dir.path().join(CA_DIR).join(CA_KEY_FILE),
            dir.path().join(API_KEYS_FILE),
        ] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{} is readable by others",
                secret.display()
            );
        }
        let again = generate(dir.path(), &[]).unwrap_err().to_string();
        assert!(again.contains("already holds"), "{again}");
    }

    #[test]
    fn more_nodes_and_clients_are_signed_by_the_same_cas() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[]).unwrap();
        let ca = dir.path().join(CA_DIR);
        let node = issue_node(&ca, &dir.path().join("gpu-2"), "gpu-2", &["gpu-2".into()]).unwrap();
        assert!(node.names.contains(&"gpu-2".to_string()));
        let first = std::fs::read(dir.path().join(NODE_DIR).join(CA_FILE)).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("gpu-2").join(CA_FILE)).unwrap(),
            first
        );
        assert_eq!(
            std::fs::read(dir.path().join("gpu-2").join(TOKEN_FILE)).unwrap(),
            std::fs::read(dir.path().join(NODE_DIR).join(TOKEN_FILE)).unwrap()
        );
        let (_, line) = issue_client(&ca, &dir.path().join("alice"), "alice").unwrap();
        assert!(line.starts_with("alice "), "{line}");
        assert!(issue_client(&ca, &dir.path().join("x"), "bad name").is_err());
        let missing = issue_node(&dir.path().join("nowhere"), &dir.path().join("n"), "n", &[])
            .unwrap_err()
            .to_string();
        assert!(missing.contains("CA's private key"), "{missing}");
    }

    #[test]
    fn public_bind_without_security_needs_insecure() {
        let public: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let none = Security::none();
        let open = ServerAuth::new(None);
        assert!(none
            .check_listen(loopback, Peers::Members, &open, false)
            .is_ok());
        let err = none
            .check_listen(public, Peers::Members, &open, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--insecure") && err.contains("token"), "{err}");
        let err = none
            .check_listen(public, Peers::Clients, &open, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--api-keys"), "{err}");
        assert!(none
            .check_listen(public, Peers::Members, &open, true)
            .is_ok());
    }

    #[test]
    fn swapped_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[]).unwrap();
        let node = dir.path().join(NODE_DIR);
        let files = SecurityFiles {
            cert: Some(node.join(KEY_FILE)),
            key: Some(node.join(CERT_FILE)),
            ..SecurityFiles::default()
        };
        let err = Security::load(&files).unwrap_err().to_string();
        assert!(
            err.contains("TLS certificate") && err.contains("key.pem"),
            "{err}"
        );
    }
}
