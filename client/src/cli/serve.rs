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
    /// Skip warming the stages (the first request pays for it).
    #[arg(long)]
    no_warmup: bool,
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
    options.http = Some(args.http.clone());
    // Without a token the local cluster makes one up; it must be shown, or nobody could use the API.
    let made_up_token = options.security.token.is_none() && options.security.token_file.is_none();
    let cluster = strata_client::LocalCluster::start(options)
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
    eprintln!("strata: OpenAI-compatible API at {http}/v1 (metrics at {http}/metrics)");
    if let (true, Some(token)) = (made_up_token, cluster.security().token()) {
        eprintln!(
            "strata: API key (send `Authorization: Bearer <key>`; set your own with STRATA_AUTH_TOKEN or --auth-token-file):\n{}",
            token.as_str()
        );
    }
    if args.announce {
        let strip = |u: &str| u.split("://").nth(1).unwrap_or(u).to_string();
        println!(
            "{}{} {}",
            strata_client::local::ANNOUNCE_PREFIX,
            strip(cluster.url()),
            strip(&http)
        );
    }
    shutdown_signal(false).await;
    cluster.stop().await.map_err(anyhow::Error::msg)?;
    Ok(())
}
