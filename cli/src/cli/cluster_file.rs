//! `cluster.toml`: a whole cluster's coordinator settings in one file, read by
//! `strata coordinator --cluster FILE`. Flags given on the command line win over the file.
//! Unknown keys are errors, so a typo is named instead of silently ignored.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use strata_coordinator::plan::SplitSpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The model file or directory on the coordinator's host.
    pub model: Option<PathBuf>,
    /// The gRPC listen address.
    pub listen: Option<String>,
    /// The HTTP API's listen address.
    pub http: Option<String>,
    /// `auto`, `even` or ranges like `0-10,10-30`.
    #[serde(default, deserialize_with = "parse_split")]
    pub split: Option<SplitSpec>,
    #[serde(default)]
    pub workers: Vec<WorkerEntry>,
    #[serde(default)]
    pub spares: Vec<String>,
    pub stage_timeout_secs: Option<u64>,
    pub max_active: Option<usize>,
    pub max_queued: Option<usize>,
    pub max_request_secs: Option<u64>,
    /// Listen beyond loopback without TLS and a token.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub security: SecuritySection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEntry {
    /// `host:port` of the worker's gRPC port.
    pub address: String,
    /// The device the worker must report (`cpu`, `cuda:0`, `metal:0`; kept in the canonical form
    /// workers report); checked at start, so a worker on the wrong device is refused instead of
    /// silently slow.
    #[serde(default, deserialize_with = "parse_device")]
    pub device: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// A directory written by `strata keys`.
    pub keys: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub mutual_tls: bool,
    pub tls_server_name: Option<String>,
    pub auth_token_file: Option<PathBuf>,
    /// CA certificate(s) trusted for clients' certificates besides `tls_ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// The client API keys file (`NAME KEY` lines).
    pub api_keys: Option<PathBuf>,
    /// The `/metrics` scrape token's file.
    pub metrics_token_file: Option<PathBuf>,
}

impl ClusterFile {
    /// Reads and checks `path`; relative paths inside it are taken from the file's directory.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read cluster file {}", path.display()))?;
        let mut file: ClusterFile = toml::from_str(&text)
            .with_context(|| format!("invalid cluster file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        file.resolve_paths(base);
        file.check()
            .with_context(|| format!("invalid cluster file {}", path.display()))?;
        Ok(file)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut Option<PathBuf>| {
            if let Some(path) = p.as_mut().filter(|p| p.is_relative()) {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.model);
        let s = &mut self.security;
        for p in [
            &mut s.keys,
            &mut s.tls_cert,
            &mut s.tls_key,
            &mut s.tls_ca,
            &mut s.auth_token_file,
            &mut s.tls_client_ca,
            &mut s.api_keys,
            &mut s.metrics_token_file,
        ] {
            resolve(p);
        }
    }

    /// What can be checked without the network: addresses, the split, the security pairing.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.workers.is_empty(),
            "no [[workers]]: name at least one worker address"
        );
        for w in &self.workers {
            check_address(&w.address).with_context(|| format!("worker {:?}", w.address))?;
        }
        for s in &self.spares {
            check_address(s).with_context(|| format!("spare {s:?}"))?;
        }
        for (name, address) in [("listen", &self.listen), ("http", &self.http)] {
            if let Some(a) = address {
                a.parse::<std::net::SocketAddr>()
                    .with_context(|| format!("{name} = {a:?} is not an ip:port address"))?;
            }
        }
        let s = &self.security;
        anyhow::ensure!(
            s.tls_cert.is_some() == s.tls_key.is_some(),
            "[security] tls_cert and tls_key go together"
        );
        Ok(())
    }
}

fn parse_split<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SplitSpec>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("split {text:?}: {e}")))
}

fn parse_device<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    strata_worker::device::canonical(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `host:port` with a port number.
fn check_address(address: &str) -> anyhow::Result<()> {
    let address = address.split_once("://").map_or(address, |(_, rest)| rest);
    let (host, port) = address.rsplit_once(':').context("expected host:port")?;
    anyhow::ensure!(!host.is_empty(), "expected host:port (the host is empty)");
    port.parse::<u16>()
        .with_context(|| format!("{port:?} is not a port number"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ClusterFile> {
        let file: ClusterFile = toml::from_str(text)?;
        file.check()?;
        Ok(file)
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster.toml");
        let file = ClusterFile::read(&path).unwrap();
        assert_eq!(file.workers.len(), 2);
        assert!(file.security.keys.unwrap().is_absolute());
    }

    #[test]
    fn mistakes_are_named() {
        for (text, expected) in [
            ("workers = []", "no [[workers]]"),
            ("[[workers]]\naddress = \"gpu\"", "expected host:port"),
            ("[[workers]]\naddress = \"gpu:x\"", "not a port number"),
            (
                "[[workers]]\naddress = \"gpu:1\"\ndevice = \"tpu:0\"",
                "tpu",
            ),
            ("split = \"0-x\"\n[[workers]]\naddress = \"a:1\"", "split"),
            ("wokers = 1", "unknown field `wokers`"),
            (
                "[[workers]]\naddress = \"a:1\"\n[security]\ntls_cert = \"c\"",
                "go together",
            ),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }
}
