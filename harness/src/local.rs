//! A whole cluster on this machine: N `strata worker` processes on free loopback ports and an
//! in-process coordinator, for `--local N`, the examples and the tests.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use strata_coordinator::plan::SplitSpec;
use strata_coordinator::scheduler::SchedulerLimits;
use strata_coordinator::service::RequestLimits;
use strata_coordinator::{ClientAccess, Coordinator, CoordinatorConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use strata_transport::{AuthToken, Security, SecurityFiles};

use strata_client::{ClientError, StrataClient};

/// The line a worker started with `--announce` prints on stdout once it listens.
pub const ANNOUNCE_PREFIX: &str = "STRATA_LISTENING ";

/// Finds the `strata` binary for programs that are not it (examples, benches): `$STRATA_BIN`, else
/// `strata` beside the running executable or one directory up (cargo puts examples in
/// `target/<profile>/examples/`).
pub fn strata_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("STRATA_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the running executable: {e}"))?;
    let name = format!("strata{}", std::env::consts::EXE_SUFFIX);
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no strata binary beside {}: run `cargo build --release` first, or set STRATA_BIN",
                exe.display()
            )
        })
}

/// How to start a local cluster.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The `strata` binary to run workers with.
    pub binary: PathBuf,
    pub workers: usize,
    pub model: PathBuf,
    pub split: SplitSpec,
    pub warmup: bool,
    /// Compute threads per worker; `None` lets each use every core.
    pub threads: Option<usize>,
    /// Extra arguments for every worker.
    pub worker_args: Vec<String>,
    /// Start the workers without the model file: the coordinator sends each its stage's weights,
    /// which worker `i` of [`LocalCluster::start`] keeps in `DIR/worker-i` (workers spawned by
    /// hand get a directory of their own).
    pub weight_cache: Option<PathBuf>,
    /// The coordinator's admission bounds.
    pub scheduler: SchedulerLimits,
    /// TLS files and the cluster's token for every port. Without a token, the cluster makes one
    /// up, so other users of this host cannot drive its workers.
    pub security: SecurityFiles,
    /// The coordinator's client API keys file. Without it (and without `api_key`), the cluster
    /// makes up one key, named `local`.
    pub api_keys: Option<PathBuf>,
    /// One client API key (named `env`), instead of a file.
    pub api_key: Option<String>,
    /// The `/metrics` scrape token's file.
    pub metrics_token: Option<PathBuf>,
    /// Where the coordinator's gRPC port listens (default: a free loopback port).
    pub listen: String,
    /// Where the coordinator's HTTP API (OpenAI, `/metrics`) listens, if anywhere.
    pub http: Option<String>,
}

impl LocalOptions {
    /// `workers` CPU workers on `model`, split evenly, warmed up, each using every core.
    pub fn new(binary: PathBuf, workers: usize, model: PathBuf) -> Self {
        Self {
            binary,
            workers,
            model,
            split: SplitSpec::Even,
            warmup: true,
            threads: None,
            worker_args: Vec::new(),
            weight_cache: None,
            scheduler: SchedulerLimits::default(),
            security: SecurityFiles::default(),
            api_keys: None,
            api_key: None,
            metrics_token: None,
            listen: "127.0.0.1:0".into(),
            http: None,
        }
    }
}

/// A running local cluster. Stop it with [`LocalCluster::stop`]; dropping it kills the workers.
pub struct LocalCluster {
    workers: Vec<WorkerProcess>,
    url: String,
    http_url: Option<String>,
    stop_coordinator: Option<oneshot::Sender<()>>,
    coordinator: Option<JoinHandle<Result<(), strata_coordinator::CoordinatorError>>>,
    plan: Vec<(String, std::ops::Range<usize>)>,
    security: Security,
    /// What a client of this cluster presents: its TLS and the client key, when it is known.
    client_security: Security,
    api_key: Option<AuthToken>,
}

/// A worker child process.
pub struct WorkerProcess {
    pub address: String,
    child: Child,
}

impl WorkerProcess {
    /// Starts `strata worker` on a free loopback port and waits until it listens.
    pub async fn spawn(options: &LocalOptions) -> Result<Self, String> {
        Self::spawn_at(options, "127.0.0.1:0").await
    }

    /// Starts `strata worker` listening on `listen` (e.g. the address of one that died).
    pub async fn spawn_at(options: &LocalOptions, listen: &str) -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1000);
        let index = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self::spawn_numbered(options, listen, index).await
    }

    /// Starts worker `index` (which names its weight cache, with [`LocalOptions::weight_cache`]).
    async fn spawn_numbered(
        options: &LocalOptions,
        listen: &str,
        index: usize,
    ) -> Result<Self, String> {
        let mut command = Command::new(&options.binary);
        command
            .arg("worker")
            .args([
                "--listen",
                listen,
                "--device",
                "cpu",
                "--announce",
                "--exit-on-stdin-eof",
            ])
            .args(&options.worker_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        match &options.weight_cache {
            Some(dir) => command
                .arg("--weight-cache")
                .arg(dir.join(format!("worker-{index}"))),
            None => command.arg("--model").arg(&options.model),
        };
        if let Some(threads) = options.threads {
            command.args(["--threads", &threads.to_string()]);
        }
        let files = &options.security;
        for (flag, path) in [
            ("--tls-cert", &files.cert),
            ("--tls-key", &files.key),
            ("--tls-ca", &files.ca),
            ("--auth-token-file", &files.token_file),
        ] {
            if let Some(path) = path {
                command.arg(flag).arg(path);
            }
        }
        if files.mutual_tls {
            command.arg("--mutual-tls");
        }
        // In the environment, not on the command line, where every user of the host could read it.
        command.env_remove("STRATA_KEYS");
        match &files.token {
            Some(token) => command.env("STRATA_AUTH_TOKEN", token),
            None => command.env_remove("STRATA_AUTH_TOKEN"),
        };
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {} worker: {e}", options.binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let address = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix(ANNOUNCE_PREFIX) {
                    return Some(address.trim().to_string());
                }
            }
            None
        })
        .await
        .map_err(|_| "a local worker did not start listening within 120 s".to_string())?;
        let Some(address) = address else {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            return Err(format!(
                "a local worker exited before listening ({status}); see its log above"
            ));
        };
        // Keep draining stdout so the worker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { address, child })
    }

    /// Asks the worker to stop (closing its stdin) and waits; kills it if it takes too long.
    pub async fn stop(mut self) -> Result<(), String> {
        drop(self.child.stdin.take());
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("worker {} exited with {status}", self.address)),
            Ok(Err(e)) => Err(format!("worker {}: {e}", self.address)),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(format!(
                    "worker {} did not stop within 10 s; killed",
                    self.address
                ))
            }
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// The OS process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Listens on `address` (refusing a non-loopback one without TLS and a token); the URL to reach it.
async fn bind(
    address: &str,
    security: &Security,
    clients: &ClientAccess,
) -> Result<(TcpListener, String), String> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    security
        .check_listen(
            local,
            strata_transport::Peers::Clients,
            &clients.clients,
            false,
        )
        .map_err(|e| e.to_string())?;
    let scheme = if security.tls_enabled() {
        "https"
    } else {
        "http"
    };
    Ok((listener, format!("{scheme}://{local}")))
}

impl LocalCluster {
    /// Starts the workers, then a coordinator over them on a free loopback port.
    pub async fn start(mut options: LocalOptions) -> Result<Self, String> {
        if options.workers == 0 {
            return Err("a local cluster needs at least one worker".into());
        }
        if options.security.token.is_none() && options.security.token_file.is_none() {
            let token = AuthToken::generate().map_err(|e| e.to_string())?;
            options.security.token = Some(token.as_str().to_string());
        }
        let security = Security::load(&options.security).map_err(|e| e.to_string())?;
        let api_key = match (&options.api_keys, &options.api_key) {
            (Some(_), _) => None,
            (None, Some(key)) => Some(AuthToken::new(key).map_err(|e| e.to_string())?),
            (None, None) => Some(AuthToken::generate().map_err(|e| e.to_string())?),
        };
        let name = if options.api_key.is_some() {
            "env"
        } else {
            "local"
        };
        let clients = ClientAccess::load(
            options.api_keys.as_deref(),
            api_key.clone().map(|key| (name, key)),
            options.metrics_token.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let client_security = security.with_credential(api_key.clone());
        let spawns =
            (0..options.workers).map(|i| WorkerProcess::spawn_numbered(&options, "127.0.0.1:0", i));
        let mut workers = Vec::new();
        let mut failure = None;
        for result in futures::future::join_all(spawns).await {
            match result {
                Ok(w) => workers.push(w),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for w in workers {
                let _ = w.stop().await;
            }
            return Err(e);
        }
        let config = CoordinatorConfig {
            model: options.model.clone(),
            workers: workers.iter().map(|w| w.address.clone()).collect(),
            expected_devices: Vec::new(),
            split: options.split.clone(),
            warmup: options.warmup,
            scheduler: options.scheduler,
            requests: RequestLimits::default(),
            max_message_bytes: strata_worker::server::DEFAULT_MAX_MESSAGE_BYTES,
            security: security.clone(),
            clients: clients.clone(),
            spares: Vec::new(),
            stage_timeout: Duration::from_secs(120),
            transfer_progress: None,
        };
        let coordinator = match Coordinator::start(config).await {
            Ok(c) => c,
            Err(e) => {
                for w in workers {
                    let _ = w.stop().await;
                }
                return Err(e.to_string());
            }
        };
        let plan = coordinator
            .stages()
            .iter()
            .map(|s| (s.address.clone(), s.layers.clone()))
            .collect();
        let (listener, url) = bind(&options.listen, &security, &clients).await?;
        let (http_listener, http_url) = match &options.http {
            Some(address) => {
                let (l, u) = bind(address, &security, &clients).await?;
                (Some(l), Some(u))
            }
            None => (None, None),
        };
        let (stop_coordinator, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(coordinator.serve_with_http(listener, http_listener, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            workers,
            url,
            http_url,
            stop_coordinator: Some(stop_coordinator),
            coordinator: Some(server),
            plan,
            security,
            client_security,
            api_key,
        })
    }

    /// A client of this cluster's coordinator, with its TLS and API key.
    pub async fn client(&self) -> Result<StrataClient, ClientError> {
        StrataClient::connect_with(&self.url, &self.client_security).await
    }

    /// The TLS and cluster token of this cluster's nodes (what its workers require).
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// What a client of this cluster presents: its TLS and the client API key.
    pub fn client_security(&self) -> &Security {
        &self.client_security
    }

    /// The client API key, when the cluster made it up or was given it (not from a keys file).
    pub fn api_key(&self) -> Option<&AuthToken> {
        self.api_key.as_ref()
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The HTTP API's base URL, when the cluster serves one.
    pub fn http_url(&self) -> Option<&str> {
        self.http_url.as_deref()
    }

    /// Each stage's worker address and layers.
    pub fn plan(&self) -> &[(String, std::ops::Range<usize>)] {
        &self.plan
    }

    /// The worker processes, in pipeline order.
    pub fn workers_mut(&mut self) -> &mut [WorkerProcess] {
        &mut self.workers
    }

    /// Stops the coordinator, then every worker; reports the first failure.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop_coordinator.take() {
            let _ = stop.send(());
        }
        let mut result = Ok(());
        if let Some(server) = self.coordinator.take() {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e.to_string()),
                Err(e) => result = Err(e.to_string()),
            }
        }
        for w in std::mem::take(&mut self.workers) {
            if let Err(e) = w.stop().await {
                result = result.and(Err(e));
            }
        }
        result
    }
}
