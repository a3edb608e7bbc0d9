//! `strata coordinator`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_coordinator::plan::SplitSpec;
use strata_coordinator::scheduler::SchedulerLimits;
use strata_coordinator::service::RequestLimits;
use strata_coordinator::CoordinatorConfig;
use tokio::net::TcpListener;

use super::security::SecurityArgs;
use super::shutdown_signal;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address clients connect to.
    #[arg(long, env = "STRATA_LISTEN", default_value = "127.0.0.1:7000")]
    listen: String,
    /// Worker addresses in pipeline order, comma-separated (host:port).
    #[arg(long, env = "STRATA_WORKERS", value_delimiter = ',', required = true)]
    workers: Vec<String>,
    /// Idle workers (comma-separated) that take over the stage of a worker that is lost; the
    /// affected requests continue with the same tokens after a replay of their caches.
    #[arg(long = "spare", env = "STRATA_SPARES", value_delimiter = ',')]
    spares: Vec<String>,
    /// Seconds one stage may take to answer a step before its worker counts as lost.
    #[arg(long, env = "STRATA_STAGE_TIMEOUT", default_value_t = 120)]
    stage_timeout: u64,
    /// The same model the workers hold (for the tokenizer and to check fingerprints). Default:
    /// SmolLM2-135M-Instruct Q4_1.
    #[arg(long, env = "STRATA_MODEL")]
    model: Option<PathBuf>,
    /// How to split the layers: `auto` (each worker is calibrated, then stage times are balanced
    /// within each worker's memory), `even`, or explicit half-open ranges like `0-10,10-30`.
    #[arg(long, env = "STRATA_SPLIT", default_value = "auto")]
    split: SplitSpec,
    /// Serve without warming the stages first (the first request pays for kernel compilation).
    #[arg(long, env = "STRATA_NO_WARMUP")]
    no_warmup: bool,
    /// Sequences generating at once; more wait in a queue.
    #[arg(long, env = "STRATA_MAX_ACTIVE", default_value_t = SchedulerLimits::default().max_active)]
    max_active: usize,
    /// Requests that may wait; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "STRATA_MAX_QUEUED", default_value_t = SchedulerLimits::default().max_queued)]
    max_queued: usize,
    /// Prompt tokens of one sequence per step; longer prompts are prefilled over several steps.
    #[arg(long, env = "STRATA_MAX_PREFILL_CHUNK", default_value_t = SchedulerLimits::default().max_prefill_chunk)]
    max_prefill_chunk: usize,
    /// The most new tokens one request may ask for.
    #[arg(long, env = "STRATA_MAX_NEW_TOKENS", default_value_t = RequestLimits::default().max_new_tokens)]
    max_new_tokens: usize,
    #[command(flatten)]
    security: SecurityArgs,
    /// Allow listening beyond loopback without TLS and a token (anyone who can reach the port can
    /// use it).
    #[arg(long, env = "STRATA_INSECURE")]
    insecure: bool,
    /// The longest a request may run, queueing included, in seconds (a client's grpc-timeout can
    /// only shorten it); past it the request ends with DEADLINE_EXCEEDED.
    #[arg(long, env = "STRATA_MAX_REQUEST_SECS", default_value_t = RequestLimits::default().max_request_time.as_secs())]
    max_request_secs: u64,
    /// Print `STRATA_LISTENING <addr>` on stdout once serving (for the process that started us).
    #[arg(long, hide = true)]
    announce: bool,
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let model = strata_client::model_cache::resolve_model(args.model.as_deref())?;
    let security = args.security.load()?;
    // Check the listen address before loading anything, so a refused bind fails at once.
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    security.check_listen(listener.local_addr()?, args.insecure)?;
    let config = CoordinatorConfig {
        model,
        workers: args.workers,
        split: args.split,
        warmup: !args.no_warmup,
        scheduler: SchedulerLimits {
            max_active: args.max_active,
            max_queued: args.max_queued,
            max_prefill_chunk: args.max_prefill_chunk,
        },
        requests: RequestLimits {
            max_new_tokens: args.max_new_tokens,
            max_request_time: std::time::Duration::from_secs(args.max_request_secs.max(1)),
            ..RequestLimits::default()
        },
        max_message_bytes: strata_worker::server::DEFAULT_MAX_MESSAGE_BYTES,
        security,
        spares: args.spares,
        stage_timeout: std::time::Duration::from_secs(args.stage_timeout.max(1)),
    };
    let coordinator = strata_coordinator::Coordinator::start(config).await?;
    for s in coordinator.stages() {
        eprintln!(
            "strata: stage layers {:>3}..{:<3} on {} ({})",
            s.layers.start, s.layers.end, s.address, s.device
        );
    }
    if args.announce {
        println!(
            "{}{}",
            strata_client::local::ANNOUNCE_PREFIX,
            listener.local_addr()?
        );
    }
    coordinator.serve(listener, shutdown_signal(false)).await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
