//! The `strata` subcommands, one module each.

mod bench;
mod cluster;
mod cluster_file;
mod coordinator;
mod fetch;
mod generate;
mod keys;
mod make_model;
mod profile;
mod security;
mod serve;
mod tokenize;
mod worker;

use clap::{Parser, Subcommand};

/// strata runs one language model across several devices: each worker holds a contiguous range of
/// layers, a coordinator forwards activations between them and streams tokens to clients.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` for people, `json` (one object per line) for log collectors.
    /// Filter with RUST_LOG, e.g. `RUST_LOG=strata_coordinator=debug,info`.
    #[arg(long, global = true, env = "STRATA_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Threads of this process's async runtime; 0 runs it on one thread (a worker's default: its
    /// runtime only moves messages between sockets and its compute thread). Other roles default to
    /// one per core.
    #[arg(long, global = true, env = "STRATA_IO_THREADS")]
    io_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a stage of a model on one device (the coordinator decides which layers).
    Worker(worker::WorkerArgs),
    /// Plan the split, load the stages on the workers and serve clients.
    Coordinator(coordinator::CoordinatorArgs),
    /// Start local workers and serve the gRPC and OpenAI-compatible HTTP APIs until interrupted.
    Serve(serve::ServeArgs),
    /// Generate text, from a running coordinator or on local workers started for the purpose.
    Generate(generate::GenerateArgs),
    /// Print the token ids of a text as generation would encode it.
    Tokenize(tokenize::TokenizeArgs),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the cache and verify it.
    FetchModel(fetch::FetchArgs),
    /// Write a random-weight Llama model of a real shape (safetensors), for tests and benchmarks.
    MakeModel(make_model::MakeModelArgs),
    /// Profile a pipeline: cold vs warm start, output/input length scaling, sustained load, batches.
    Profile(profile::ProfileArgs),
    /// Benchmarks that print numbers and JSON.
    Bench(bench::BenchArgs),
    /// Write a private CA, a node certificate and a shared token for a secure cluster.
    Keys(keys::KeysArgs),
}

impl Cli {
    /// The compute threads this process should use, if the role sets them.
    pub fn compute_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Worker(a) => a.threads,
            Command::Bench(a) => a.compute_threads(),
            _ => None,
        }
    }

    /// Threads of this process's async runtime: `Some(0)` for a single-threaded one. A worker's
    /// runtime only moves messages between its sockets and its compute thread, and on one thread
    /// each hand-off between its tasks is a queue push instead of waking another thread (a 2-stage
    /// pipeline on 2 cores: hop per step 0.5 instead of 0.6-0.8 ms, decode +9%; BENCHMARKS.md).
    /// Other roles tokenize and serve clients on theirs and keep one thread per core.
    pub fn io_threads(&self) -> Option<usize> {
        if self.io_threads.is_some() {
            return self.io_threads;
        }
        match self.command {
            Command::Worker(_) => Some(0),
            _ => None,
        }
    }

    /// Servers log at info; client commands only warn, so their output stays clean.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Worker(_) | Command::Coordinator(_) | Command::Serve(_) => "info",
            _ => "warn",
        }
    }

    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Worker(a) => worker::run(a).await,
            Command::Coordinator(a) => coordinator::run(a).await,
            Command::Serve(a) => serve::run(a).await,
            Command::Generate(a) => generate::run(a).await,
            Command::Tokenize(a) => tokenize::run(a),
            Command::FetchModel(a) => fetch::run(a),
            Command::MakeModel(a) => make_model::run(a),
            Command::Profile(a) => profile::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Keys(a) => keys::run(a),
        }
    }
}

impl Cli {
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: `level`), as text or JSON lines.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves when the process is asked to stop: Ctrl-C, SIGTERM, or (with `stdin_eof`) stdin closing,
/// which is how a parent that started us says stop, and how we notice that parent died.
pub async fn shutdown_signal(stdin_eof: bool) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    let eof = async {
        if !stdin_eof {
            return std::future::pending::<()>().await;
        }
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupted; shutting down"),
        _ = term => tracing::info!("SIGTERM; shutting down"),
        _ = eof => tracing::info!("stdin closed; shutting down"),
    }
}
