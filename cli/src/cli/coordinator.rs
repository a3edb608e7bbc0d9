//! `strata coordinator`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use strata_coordinator::plan::SplitSpec;
use strata_coordinator::scheduler::SchedulerLimits;
use strata_coordinator::service::RequestLimits;
use strata_coordinator::{ClientAccess, CoordinatorConfig};
use strata_transport::Peers;
use tokio::net::TcpListener;

use super::cluster_file::ClusterFile;
use super::security::SecurityArgs;
use super::shutdown_signal;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// A cluster file (see deploy/cluster.toml): workers, devices, split, addresses, TLS and token.
    /// Flags given here override its values.
    #[arg(long, env = "STRATA_CLUSTER")]
    cluster: Option<PathBuf>,
    /// Read and check the cluster file and flags, print the resulting settings, and exit without
    /// connecting to anything.
    #[arg(long)]
    check_config: bool,
    /// Address clients connect to [default: 127.0.0.1:7000].
    #[arg(long, env = "STRATA_LISTEN")]
    listen: Option<String>,
    /// Also serve the HTTP API here: OpenAI-compatible /v1/completions, /v1/chat/completions and
    /// /v1/models, plus /health and Prometheus /metrics (same TLS and token as the gRPC port).
    #[arg(long, env = "STRATA_HTTP")]
    http: Option<String>,
    /// Worker addresses in pipeline order, comma-separated (host:port).
    #[arg(
        long,
        env = "STRATA_WORKERS",
        value_delimiter = ',',
        required_unless_present = "cluster"
    )]
    workers: Vec<String>,
    /// Idle workers (comma-separated) that take over the stage of a worker that is lost; the
    /// affected requests continue with the same tokens after a replay of their caches.
    #[arg(long = "spare", env = "STRATA_SPARES", value_delimiter = ',')]
    spares: Vec<String>,
    /// Seconds one stage may take to answer a step before its worker counts as lost [default: 120].
    #[arg(long, env = "STRATA_STAGE_TIMEOUT")]
    stage_timeout: Option<u64>,
    /// The same model the workers hold (for the tokenizer and to check fingerprints). Default:
    /// SmolLM2-135M-Instruct Q4_1.
    #[arg(long, env = "STRATA_MODEL")]
    model: Option<PathBuf>,
    /// How to split the layers: `auto` (each worker is calibrated, then stage times are balanced
    /// within each worker's memory), `even`, or explicit half-open ranges like `0-10,10-30`
    /// [default: auto].
    #[arg(long, env = "STRATA_SPLIT")]
    split: Option<SplitSpec>,
    /// Serve without warming the stages first (the first request pays for kernel compilation).
    #[arg(long, env = "STRATA_NO_WARMUP")]
    no_warmup: bool,
    /// Sequences generating at once; more wait in a queue [default: 64].
    #[arg(long, env = "STRATA_MAX_ACTIVE")]
    max_active: Option<usize>,
    /// Requests that may wait; more are refused with RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, env = "STRATA_MAX_QUEUED")]
    max_queued: Option<usize>,
    /// Prompt tokens of one sequence per step; longer prompts are prefilled over several steps.
    #[arg(long, env = "STRATA_MAX_PREFILL_CHUNK", default_value_t = SchedulerLimits::default().max_prefill_chunk)]
    max_prefill_chunk: usize,
    /// Positions (over all sequences) of one step: a burst of prompts is prefilled over several
    /// steps, so each stays well within `--stage-timeout` and decoding sequences wait at most one
    /// such step for their next token. Workers' own Forward limits bound it too.
    #[arg(long, env = "STRATA_MAX_STEP_POSITIONS", default_value_t = SchedulerLimits::default().max_step_positions as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_step_positions: u32,
    /// Finished requests whose KV caches the workers keep, so a request that starts the same way
    /// (the next turn of a chat, a shared system prompt) copies those positions instead of
    /// computing them. The workers bound the memory (`strata worker --max-parked-mib`); 0 turns
    /// prefix caching off.
    #[arg(long, env = "STRATA_PREFIX_CACHE_ENTRIES", default_value_t = SchedulerLimits::default().prefix_cache_entries)]
    prefix_cache_entries: usize,
    /// Let every API key's requests copy from the prefix-cache entries of every key. Off (the
    /// default), each key's entries are its own. On suits a cluster that serves one user: with
    /// several users, `cached_tokens` and the time to the first token tell one key, token by
    /// token, whether another key sent a guessed prompt.
    #[arg(long, env = "STRATA_SHARE_PREFIX_CACHE")]
    share_prefix_cache: bool,
    /// The most new tokens one request may ask for.
    #[arg(long, env = "STRATA_MAX_NEW_TOKENS", default_value_t = RequestLimits::default().max_new_tokens)]
    max_new_tokens: usize,
    #[command(flatten)]
    security: SecurityArgs,
    /// Client API keys, one `NAME KEY` per line (`strata keys` writes one; `strata keys client`
    /// adds more). Reread every second: edit it to add or revoke a key. Names appear in logs and
    /// metrics. One key may instead be in STRATA_API_KEY. Without keys the client ports are open.
    #[arg(long, env = "STRATA_API_KEYS")]
    api_keys: Option<PathBuf>,
    /// A file whose first line is the token `/metrics` scrapes must carry (client keys are not
    /// accepted there). Without it, `/metrics` is open only where the API is.
    #[arg(long, env = "STRATA_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Allow listening beyond loopback without TLS and client keys (anyone who can reach the port
    /// can use it).
    #[arg(long, env = "STRATA_INSECURE")]
    insecure: bool,
    /// The longest a request may run, queueing included, in seconds (a client's grpc-timeout can
    /// only shorten it); past it the request ends with DEADLINE_EXCEEDED [default: 600].
    #[arg(long, env = "STRATA_MAX_REQUEST_SECS")]
    max_request_secs: Option<u64>,
    /// Print `STRATA_LISTENING <addr>` on stdout once serving (for the process that started us).
    #[arg(long, hide = true)]
    announce: bool,
}

impl CoordinatorArgs {
    /// Fills every setting the command line left out from the cluster file.
    fn merge(mut self, file: ClusterFile) -> Self {
        if self.workers.is_empty() {
            self.workers = file.workers.iter().map(|w| w.address.clone()).collect();
        }
        if self.spares.is_empty() {
            self.spares = file.spares;
        }
        self.model = self.model.or(file.model);
        self.listen = self.listen.or(file.listen);
        self.http = self.http.or(file.http);
        self.split = self.split.or(file.split);
        self.stage_timeout = self.stage_timeout.or(file.stage_timeout_secs);
        self.max_active = self.max_active.or(file.max_active);
        self.max_queued = self.max_queued.or(file.max_queued);
        self.max_request_secs = self.max_request_secs.or(file.max_request_secs);
        self.insecure |= file.insecure;
        let s = &mut self.security;
        let f = file.security;
        s.keys = s.keys.take().or(f.keys);
        s.tls_cert = s.tls_cert.take().or(f.tls_cert);
        s.tls_key = s.tls_key.take().or(f.tls_key);
        s.tls_ca = s.tls_ca.take().or(f.tls_ca);
        s.mutual_tls |= f.mutual_tls;
        s.tls_server_name = s.tls_server_name.take().or(f.tls_server_name);
        s.auth_token_file = s.auth_token_file.take().or(f.auth_token_file);
        s.tls_client_ca = s.tls_client_ca.take().or(f.tls_client_ca);
        self.api_keys = self.api_keys.take().or(f.api_keys);
        self.metrics_token_file = self.metrics_token_file.take().or(f.metrics_token_file);
        self
    }
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let (args, expected_devices) = match &args.cluster {
        Some(path) => {
            let file = ClusterFile::read(path)?;
            // Devices pair with the file's workers; workers given by flag replace that list.
            let devices = if args.workers.is_empty() {
                file.workers.iter().map(|w| w.device.clone()).collect()
            } else {
                Vec::new()
            };
            (args.merge(file), devices)
        }
        None => (args, Vec::new()),
    };
    let listen = args.listen.as_deref().unwrap_or("127.0.0.1:7000");
    let split = args.split.clone().unwrap_or(SplitSpec::Auto);
    if args.check_config {
        println!("workers: {}", args.workers.join(", "));
        println!("devices: {expected_devices:?}");
        println!("spares: {}", args.spares.join(", "));
        println!("split: {split:?}");
        println!(
            "listen: {listen}; http: {}",
            args.http.as_deref().unwrap_or("off")
        );
        let files = args.security.files();
        println!(
            "tls: {}; token: {}; mutual tls: {}; api keys: {}; metrics token: {}",
            files.cert.is_some(),
            files.token_file.is_some() || files.token.is_some(),
            files.mutual_tls,
            args.api_keys
                .as_deref()
                .map_or("none".into(), |p| p.display().to_string()),
            args.metrics_token_file.is_some()
        );
        return Ok(());
    }
    let model = strata_harness::model_cache::resolve_model(args.model.as_deref())?;
    let security = args.security.load()?;
    let single_key = std::env::var(super::security::API_KEY_ENV)
        .ok()
        .filter(|k| !k.is_empty())
        .map(|k| strata_transport::AuthToken::new(&k))
        .transpose()
        .context("STRATA_API_KEY")?;
    let clients = ClientAccess::load(
        args.api_keys.as_deref(),
        single_key.map(|key| ("env", key)),
        args.metrics_token_file.as_deref(),
    )?;
    // Check the listen addresses before loading anything, so a refused bind fails at once.
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let check =
        |address| security.check_listen(address, Peers::Clients, &clients.clients, args.insecure);
    check(listener.local_addr()?)?;
    let http = match &args.http {
        Some(address) => {
            let l = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (--http)"))?;
            check(l.local_addr()?)?;
            Some(l)
        }
        None => None,
    };
    let tls = security.tls_enabled();
    let (transfers, _) = tokio::sync::watch::channel(Default::default());
    let scheduler_defaults = SchedulerLimits::default();
    let request_defaults = RequestLimits::default();
    let config = CoordinatorConfig {
        model,
        workers: args.workers,
        expected_devices,
        split,
        warmup: !args.no_warmup,
        scheduler: SchedulerLimits {
            max_active: args.max_active.unwrap_or(scheduler_defaults.max_active),
            max_queued: args.max_queued.unwrap_or(scheduler_defaults.max_queued),
            max_prefill_chunk: args.max_prefill_chunk,
            max_step_positions: args.max_step_positions as usize,
            prefix_cache_entries: args.prefix_cache_entries,
            share_prefix_cache: args.share_prefix_cache,
        },
        requests: RequestLimits {
            max_new_tokens: args.max_new_tokens,
            max_request_time: args
                .max_request_secs
                .map_or(request_defaults.max_request_time, |s| {
                    Duration::from_secs(s.max(1))
                }),
            ..request_defaults
        },
        max_message_bytes: strata_worker::server::DEFAULT_MAX_MESSAGE_BYTES,
        security,
        clients,
        spares: args.spares,
        stage_timeout: Duration::from_secs(args.stage_timeout.unwrap_or(120).max(1)),
        transfer_progress: Some(transfers.clone()),
    };
    // Connecting, calibrating, loading and warming up take seconds to minutes on big models; on a
    // terminal a spinner says so (the log lines say which step it is in), with a bar per worker
    // that is sent its weights.
    let bars = indicatif::MultiProgress::new();
    let spinner = bars.add(indicatif::ProgressBar::new_spinner().with_message(format!(
        "connecting to {} workers, planning, loading and warming up the stages",
        config.workers.len()
    )));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let shown = tokio::spawn(show_transfers(bars.clone(), transfers.subscribe()));
    let started = strata_coordinator::Coordinator::start(config).await;
    shown.abort();
    spinner.finish_and_clear();
    let _ = bars.clear();
    let coordinator = started?;
    eprintln!("strata: plan");
    for (i, s) in coordinator.stages().iter().enumerate() {
        eprintln!(
            "strata:   stage {i}: layers {:>3}..{:<3} on {} ({}), {:.1} MiB of weights",
            s.layers.start,
            s.layers.end,
            s.address,
            s.device,
            s.weight_bytes as f64 / (1 << 20) as f64
        );
    }
    let scheme = if tls { "https" } else { "http" };
    eprintln!("strata: gRPC API at {scheme}://{}", listener.local_addr()?);
    if let Some(l) = &http {
        eprintln!(
            "strata: OpenAI-compatible API at {scheme}://{}/v1 (metrics at /metrics with the scrape token, or open where the API is)",
            l.local_addr()?
        );
    }
    if args.announce {
        println!(
            "{}{}",
            strata_harness::local::ANNOUNCE_PREFIX,
            listener.local_addr()?
        );
    }
    coordinator
        .serve_with_http(listener, http, shutdown_signal(false))
        .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// A progress bar per worker being sent its weights: bytes, rate and ETA.
async fn show_transfers(
    bars: indicatif::MultiProgress,
    mut transfers: tokio::sync::watch::Receiver<
        std::collections::BTreeMap<String, strata_coordinator::send_weights::Transfer>,
    >,
) {
    let style = indicatif::ProgressStyle::with_template(
        "weights to {prefix}: [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut shown: std::collections::HashMap<String, indicatif::ProgressBar> = Default::default();
    while transfers.changed().await.is_ok() {
        let now = transfers.borrow_and_update().clone();
        for (worker, transfer) in now {
            let bar = shown.entry(worker.clone()).or_insert_with(|| {
                bars.add(
                    indicatif::ProgressBar::new(transfer.total)
                        .with_style(style.clone())
                        .with_prefix(worker),
                )
            });
            bar.set_length(transfer.total);
            bar.set_position(transfer.sent);
            if transfer.sent >= transfer.total && !bar.is_finished() {
                bar.finish();
            }
        }
    }
}
