//! `strata worker`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_worker::engine::EngineLimits;
use strata_worker::model::cpu_kernels::Isa;
use strata_worker::model::{phase_timer, Ablations, KvLayout, StageOptions};
use strata_worker::WorkerConfig;
use tokio::net::TcpListener;

use super::security::SecurityArgs;
use super::shutdown_signal;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "STRATA_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Device: cpu, cuda:N or metal:N.
    #[arg(long, env = "STRATA_DEVICE", default_value = "cpu")]
    device: String,
    /// Model: a .gguf file or a Hugging Face safetensors directory, or the name of a model strata
    /// fetches. Without it, the coordinator sends each stage's weights (GGUF), and the worker keeps
    /// them in its weight cache, so that a restart or a reload sends only what it lacks.
    #[arg(long, env = "STRATA_MODEL")]
    model: Option<PathBuf>,
    /// The weight cache of a worker without --model (default: `$STRATA_HOME/weights`, else
    /// `~/.cache/strata/weights`).
    #[arg(long, env = "STRATA_WEIGHT_CACHE")]
    weight_cache: Option<PathBuf>,
    /// The most the weight cache keeps, in GiB; the least recently used tensors go first.
    #[arg(long, env = "STRATA_WEIGHT_CACHE_GIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..))]
    weight_cache_gib: u64,
    /// Compute threads of a CPU stage (default: every core). Stages sharing a host split its cores.
    #[arg(long, env = "STRATA_THREADS")]
    pub threads: Option<usize>,
    /// Most sequences that may hold a KV cache at once.
    #[arg(long, env = "STRATA_MAX_SEQUENCES", default_value_t = EngineLimits::default().max_sequences)]
    max_sequences: usize,
    /// Most positions (over all sequences) one Forward may carry: bounds the activations a step
    /// holds. The coordinator sizes its micro-batches to fit.
    #[arg(long, env = "STRATA_MAX_BATCH_ROWS", default_value_t = EngineLimits::default().max_batch_rows as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_batch_rows: u32,
    /// Memory all KV caches together may take, in MiB (default: half the memory the device can give
    /// at start: the GPU's own on a CUDA worker).
    /// Requests that would grow past it are refused with RESOURCE_EXHAUSTED instead of running out.
    #[arg(long, env = "STRATA_MAX_CACHE_MIB")]
    max_cache_mib: Option<usize>,
    /// Memory the caches of ended sequences may keep, within --max-cache-mib, in MiB: the prefix
    /// cache, which lets a request that starts like an earlier one (the next turn of a chat) skip
    /// computing that part. They give way to running sequences, least recently used first. Default:
    /// a quarter of the KV bound, at most 2048. 0 keeps none.
    #[arg(long, env = "STRATA_MAX_PARKED_MIB")]
    max_parked_mib: Option<usize>,
    /// Microseconds the compute thread polls for the next step, and the async side for the compute
    /// thread's answer, before they sleep (default: 5000 on a GPU, where it saves a thread wake-up
    /// per hop; 0 on the CPU). 0 turns polling off.
    #[arg(long, env = "STRATA_IDLE_SPIN_US")]
    idle_spin_us: Option<u64>,
    /// MiB of freed memory a CUDA device's memory pool keeps for the next step; 0 returns it to the
    /// driver at every synchronize (its default), so each step maps its tensors anew.
    #[arg(long, env = "STRATA_CUDA_POOL_KEEP_MIB", default_value_t = strata_worker::device::KEPT_POOL_BYTES >> 20)]
    cuda_pool_keep_mib: u64,
    /// A name for the physical device this worker computes on. Workers that give the same one take
    /// turns on one device, and the coordinator then keeps one micro-batch in flight for them
    /// instead of one per stage. Default: the GPU's UUID on CUDA (so workers on one GPU match by
    /// themselves); none on the CPU, where each worker computes on threads of its own. Give CPU
    /// workers that share cores one name.
    #[arg(long, env = "STRATA_PHYSICAL_DEVICE")]
    physical_device: Option<String>,
    /// Largest gRPC message, in MiB.
    #[arg(long, env = "STRATA_MAX_MESSAGE_MIB", default_value_t = strata_worker::server::DEFAULT_MAX_MESSAGE_BYTES >> 20)]
    max_message_mib: usize,
    /// Compute dtype of a safetensors stage: f32, bf16 or f16 (default: bf16 on CUDA, f16 on Metal,
    /// f32 on the CPU). GGUF stages keep their weights quantized and compute in f32.
    #[arg(long, env = "STRATA_DTYPE", value_parser = strata_worker::model::stage::parse_dtype)]
    dtype: Option<candle_core::DType>,
    /// Where keys and values live: `paged` (one pool for all sequences; decode attention runs as one
    /// batch, a few kernels per layer), `contiguous` (a tensor per sequence, attention per sequence,
    /// no copies), or `auto`: paged on GPUs, where kernel launches dominate, contiguous on the CPU.
    #[arg(long, env = "STRATA_KV_LAYOUT", default_value = "auto")]
    kv_layout: KvLayout,
    /// Log where each step's time goes every 50 steps, for diagnosis (off, sync or host): `sync` waits for the device
    /// after each phase (device time per phase), `host` only reads the clock (the host's time to
    /// queue each phase and each layer). Slows the stage; off by default.
    #[arg(long, env = "STRATA_PHASE_TIMES", default_value = "off")]
    phase_times: phase_timer::Mode,
    #[command(flatten)]
    ablations: AblationArgs,
    #[command(flatten)]
    security: SecurityArgs,
    /// Allow listening beyond loopback without TLS and a token (anyone who can reach the port can
    /// use it).
    #[arg(long, env = "STRATA_INSECURE")]
    insecure: bool,
    /// Print `STRATA_LISTENING <addr>` on stdout once listening (for the process that started us).
    #[arg(long, hide = true)]
    announce: bool,
    /// Shut down when stdin closes (for the process that started us).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let model = args
        .model
        .as_deref()
        .map(|m| strata_harness::model_cache::resolve_model(Some(m)))
        .transpose()?;
    let weight_cache = args
        .weight_cache
        .unwrap_or_else(|| strata_harness::model_cache::strata_home().join("weights"));
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let security = worker_security(&args.security)?;
    security.check_listen(
        listener.local_addr()?,
        strata_transport::Peers::Members,
        &security.auth_check(),
        args.insecure,
    )?;
    if args.announce {
        println!(
            "{}{}",
            strata_harness::local::ANNOUNCE_PREFIX,
            listener.local_addr()?
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = WorkerConfig {
        model,
        weight_cache,
        weight_cache_max_bytes: args.weight_cache_gib << 30,
        device: args.device,
        cuda_pool_keep_bytes: args.cuda_pool_keep_mib << 20,
        physical_device: args.physical_device,
        threads,
        options: StageOptions {
            ablations: args.ablations.into(),
            kv_layout: args.kv_layout,
            dtype: args.dtype,
            phase_times: args.phase_times,
        },
        limits: EngineLimits {
            max_sequences: args.max_sequences,
            max_batch_rows: args.max_batch_rows as usize,
            max_cache_bytes: args.max_cache_mib.map(|mib| mib << 20),
            max_parked_bytes: args.max_parked_mib.map(|mib| mib << 20),
            idle_spin: args.idle_spin_us.map(std::time::Duration::from_micros),
        },
        max_message_bytes: args.max_message_mib << 20,
        security,
    };
    strata_worker::run(listener, config, shutdown_signal(args.exit_on_stdin_eof)).await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// A worker admits cluster members only: serving TLS, its callers must present a certificate of the
/// node CA (mutual TLS, always; a certificate without the CA to check callers is refused), and it
/// never trusts a client CA.
fn worker_security(args: &SecurityArgs) -> anyhow::Result<strata_transport::Security> {
    let mut files = args.files();
    files.client_ca = None;
    anyhow::ensure!(
        files.cert.is_none() || files.ca.is_some(),
        "a worker serving TLS checks its callers' certificates: give --tls-ca (the node CA) with --tls-cert, or --keys DIR"
    );
    files.mutual_tls = files.cert.is_some();
    strata_transport::Security::load(&files).context("invalid TLS or token settings")
}

/// The hidden flags that turn one optimization off each, to measure it (`strata bench
/// optimizations` and the GPU bench scripts pass them; see [`Ablations`]).
#[derive(Args, Debug, Clone, Copy)]
struct AblationArgs {
    #[arg(long, hide = true, alias = "no-rope-reuse")]
    no_rope_table: bool,
    #[arg(long, hide = true, alias = "no-mask-reuse")]
    no_mask_cache: bool,
    #[arg(long, hide = true)]
    no_fused_projections: bool,
    #[arg(long, hide = true, alias = "no-fused-attention")]
    no_fused_kernels: bool,
    #[arg(long, hide = true)]
    no_fused_ops: bool,
    #[arg(long, hide = true)]
    candle_kernels: bool,
    #[arg(long, hide = true)]
    attention_wide_from: Option<usize>,
    #[arg(long, hide = true)]
    no_cpu_attention: bool,
    /// The highest instruction set strata's CPU kernels use: avx2 or avx512.
    #[arg(long, hide = true, value_parser = parse_isa)]
    cpu_isa: Option<Isa>,
    #[arg(long, hide = true)]
    no_cuda_graphs: bool,
}

fn parse_isa(name: &str) -> Result<Isa, String> {
    match name {
        "avx2" => Ok(Isa::Avx2),
        "avx512" => Ok(Isa::Avx512),
        _ => Err(format!("{name:?} is not avx2 or avx512")),
    }
}

impl From<AblationArgs> for Ablations {
    fn from(a: AblationArgs) -> Self {
        Self {
            no_rope_table: a.no_rope_table,
            no_mask_cache: a.no_mask_cache,
            candle_kernels: a.candle_kernels,
            no_fused_projections: a.no_fused_projections,
            no_fused_kernels: a.no_fused_kernels,
            no_fused_ops: a.no_fused_ops,
            attention_wide_from: a.attention_wide_from,
            no_cpu_attention: a.no_cpu_attention,
            cpu_isa: a.cpu_isa,
            no_cuda_graphs: a.no_cuda_graphs,
        }
    }
}
