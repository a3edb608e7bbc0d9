//! Arguments shared by the commands that either start a local cluster or use a running coordinator.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_client::StrataClient;
use strata_coordinator::plan::SplitSpec;
use strata_harness::{LocalCluster, LocalOptions};

use super::security::SecurityArgs;

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// A running coordinator, e.g. http://127.0.0.1:7000.
    #[arg(long, env = "STRATA_COORDINATOR", conflicts_with = "local")]
    pub coordinator: Option<String>,
    /// Start N local worker processes and a coordinator (default 2 without --coordinator).
    #[arg(long)]
    pub local: Option<usize>,
    /// Model for --local: a .gguf file or a safetensors directory. Default: SmolLM2-135M-Instruct Q4_1.
    #[arg(long, env = "STRATA_MODEL")]
    pub model: Option<PathBuf>,
    /// Split for --local: `auto` (balanced by each worker's measured speed and memory), `even`, or
    /// half-open ranges like `0-10,10-30`.
    #[arg(long, default_value = "auto")]
    pub split: SplitSpec,
    /// Compute threads per local worker (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub security: SecurityArgs,
}

impl ClusterArgs {
    /// The local cluster these arguments describe, with extra worker flags.
    pub fn local_options(
        &self,
        warmup: bool,
        worker_args: Vec<String>,
    ) -> anyhow::Result<LocalOptions> {
        let workers = self.local.unwrap_or(2);
        anyhow::ensure!(workers > 0, "--local needs at least 1 worker");
        Ok(LocalOptions {
            binary: std::env::current_exe().context("cannot find the strata binary")?,
            workers,
            model: strata_harness::model_cache::resolve_model(self.model.as_deref())?,
            split: self.split.clone(),
            warmup,
            threads: self.threads,
            worker_args,
            weight_cache: None,
            scheduler: Default::default(),
            security: self.security.files(),
            api_keys: None,
            api_key: None,
            metrics_token: None,
            listen: "127.0.0.1:0".into(),
            http: None,
        })
    }

    /// Connects to `url` as a client: these TLS settings and an API key.
    pub async fn connect(&self, url: &str) -> anyhow::Result<StrataClient> {
        Ok(StrataClient::connect_with(url, &self.security.load_client()?).await?)
    }

    /// Starts the local cluster these arguments describe, with extra worker flags.
    pub async fn start_local_with(
        &self,
        warmup: bool,
        worker_args: Vec<String>,
    ) -> anyhow::Result<LocalCluster> {
        LocalCluster::start(self.local_options(warmup, worker_args)?)
            .await
            .map_err(anyhow::Error::msg)
    }

    pub async fn start_local(&self, warmup: bool) -> anyhow::Result<LocalCluster> {
        self.start_local_with(warmup, Vec::new()).await
    }
}
