//! `strata serve`: local workers and a coordinator serving the gRPC and OpenAI-compatible HTTP
//! APIs until interrupted; the one-command way to put a model behind an OpenAI endpoint.

use clap::Args;

use super::cluster::ClusterArgs;
use super::shutdown_signal;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Where the gRPC API listens.
    #[arg(long, env = "STRATA_LISTEN", default_value = "127.0.0.1:7000")]
    listen: String,
    /// Where the HTTP API (OpenAI /v1, /health, /metrics) listens.
    #[arg(long, env = "STRATA_HTTP", default_value = "127.0.0.1:8000")]
    http: String,
    /// Client API keys, one `NAME KEY` per line, reread every second (see `strata coordinator
    /// --api-keys`). Without it, the key is STRATA_API_KEY's, or one made up and printed.
    #[arg(long, env = "STRATA_API_KEYS")]
    api_keys: Option<std::path::PathBuf>,
    /// A file whose first line is the token `/metrics` scrapes must carry.
    #[arg(long, env = "STRATA_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<std::path::PathBuf>,
    /// Skip warming the stages (the first request pays for it).
    #[arg(long)]
    no_warmup: bool,
    /// Finished requests whose KV caches the workers keep for requests that start the same way (see
    /// `strata coordinator --prefix-cache-entries`); 0 turns prefix caching off.
    #[arg(long, env = "STRATA_PREFIX_CACHE_ENTRIES",
          default_value_t = strata_coordinator::scheduler::SchedulerLimits::default().prefix_cache_entries)]
    prefix_cache_entries: usize,
    /// Let every API key's requests copy from the prefix-cache entries of every key. Off (the
    /// default), each key's entries are its own. On suits a cluster that serves one user: with
    /// several users, `cached_tokens` and the time to the first token tell one key, token by
    /// token, whether another key sent a guessed prompt.
    #[arg(long, env = "STRATA_SHARE_PREFIX_CACHE")]
    share_prefix_cache: bool,
    /// Print `STRATA_LISTENING <grpc addr> <http addr>` on stdout once serving (for scripts).
    #[arg(long, hide = true)]
    announce: bool,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.cluster.coordinator.is_none(),
        "`strata serve` starts its own workers; to serve HTTP from a running cluster, pass --http to `strata coordinator`"
    );
    let mut options = args.cluster.local_options(!args.no_warmup, Vec::new())?;
    options.listen = args.listen.clone();
    options.scheduler.prefix_cache_entries = args.prefix_cache_entries;
    options.scheduler.share_prefix_cache = args.share_prefix_cache;
    options.http = Some(args.http.clone());
    options.api_keys = args.api_keys.clone();
    options.api_key = std::env::var(super::security::API_KEY_ENV)
        .ok()
        .filter(|k| !k.is_empty() && args.api_keys.is_none());
    options.metrics_token = args.metrics_token_file.clone();
    // Without keys the local cluster makes one up; it must be shown, or nobody could use the API.
    let made_up_key = options.api_keys.is_none() && options.api_key.is_none();
    let cluster = strata_harness::LocalCluster::start(options)
        .await
        .map_err(anyhow::Error::msg)?;
    for (worker, layers) in cluster.plan() {
        eprintln!(
            "strata: stage layers {:>3}..{:<3} on {worker}",
            layers.start, layers.end
        );
    }
    let http = cluster.http_url().unwrap_or_default().to_string();
    eprintln!("strata: gRPC API at {}", cluster.url());
    eprintln!("strata: OpenAI-compatible API at {http}/v1");
    if args.metrics_token_file.is_some() {
        eprintln!("strata: Prometheus metrics at {http}/metrics (with the scrape token)");
    } else {
        eprintln!("strata: /metrics needs a scrape token: pass --metrics-token-file to serve it");
    }
    if let (true, Some(key)) = (made_up_key, cluster.api_key()) {
        eprintln!(
            "strata: API key (send `Authorization: Bearer <key>`; set your own with STRATA_API_KEY or --api-keys):\n{}",
            key.as_str()
        );
    }
    if args.announce {
        let strip = |u: &str| u.split("://").nth(1).unwrap_or(u).to_string();
        println!(
            "{}{} {}",
            strata_harness::local::ANNOUNCE_PREFIX,
            strip(cluster.url()),
            strip(&http)
        );
    }
    shutdown_signal(false).await;
    cluster.stop().await.map_err(anyhow::Error::msg)?;
    Ok(())
}
