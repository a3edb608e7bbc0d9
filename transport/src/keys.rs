//! `strata keys`: a private CA, one certificate for every node of a cluster, and a token.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::{AuthToken, TransportError};

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const TOKEN_FILE: &str = "token";

/// Names every node certificate is valid for besides the user's: loopback, and `strata` (for
/// `--tls-server-name strata` when dialing by an address the certificate does not list).
const BUILTIN_NAMES: [&str; 4] = ["localhost", "127.0.0.1", "::1", "strata"];

/// What `generate` wrote.
#[derive(Debug, Clone)]
pub struct GeneratedKeys {
    pub files: Vec<PathBuf>,
    pub names: Vec<String>,
}

/// Writes `ca.pem`, `cert.pem`, `key.pem` (mode 0600) and `token` (0600) into `dir`. The node
/// certificate is valid for `hosts` (DNS names or IP addresses) plus loopback and `strata`, for
/// both server and client authentication, so one set serves every node and mutual TLS.
pub fn generate(dir: &Path, hosts: &[String]) -> Result<GeneratedKeys, TransportError> {
    let invalid = |e: rcgen::Error| TransportError::Invalid(format!("certificate generation: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| TransportError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    ca_params.distinguished_name = name("strata cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(invalid)?)
        .map_err(invalid)?;

    let mut names: Vec<String> = BUILTIN_NAMES.iter().map(|s| s.to_string()).collect();
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut params = CertificateParams::new(names.clone()).map_err(invalid)?;
    params.distinguished_name = name("strata node");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().map_err(invalid)?;
    let cert = params.signed_by(&key, &ca).map_err(invalid)?;
    let token = AuthToken::generate()?;

    let files = vec![
        write(dir, CA_FILE, ca.pem().as_bytes(), false)?,
        write(dir, CERT_FILE, cert.pem().as_bytes(), false)?,
        write(dir, KEY_FILE, key.serialize_pem().as_bytes(), true)?,
        write(
            dir,
            TOKEN_FILE,
            format!("{}\n", token.as_str()).as_bytes(),
            true,
        )?,
    ];
    Ok(GeneratedKeys { files, names })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
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
    use crate::{Security, SecurityFiles};

    #[test]
    fn generated_files_load_as_a_secure_node() {
        let dir = tempfile::tempdir().unwrap();
        let keys = generate(dir.path(), &["gpu-host-1".into(), "10.0.0.7".into()]).unwrap();
        assert_eq!(keys.files.len(), 4);
        assert!(keys.names.contains(&"gpu-host-1".to_string()));
        let security = Security::load(&SecurityFiles::from_keys_dir(dir.path())).unwrap();
        assert!(security.tls_enabled());
        assert!(security.token().is_some());
        let public: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert!(security.check_listen(public, false).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the private key is readable by others");
        }
    }

    #[test]
    fn public_bind_without_security_needs_insecure() {
        let public: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let none = Security::none();
        assert!(none.check_listen(loopback, false).is_ok());
        let err = none.check_listen(public, false).unwrap_err().to_string();
        assert!(err.contains("--insecure"), "{err}");
        assert!(none.check_listen(public, true).is_ok());
    }

    #[test]
    fn swapped_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[]).unwrap();
        let files = SecurityFiles {
            cert: Some(dir.path().join(KEY_FILE)),
            key: Some(dir.path().join(CERT_FILE)),
            ..SecurityFiles::default()
        };
        let err = Security::load(&files).unwrap_err().to_string();
        assert!(
            err.contains("TLS certificate") && err.contains("key.pem"),
            "{err}"
        );
    }
}
