//! The coordinator's HTTP port (`--http ADDR`): the OpenAI-compatible API, `/health` and
//! `/metrics`, with the same TLS certificate and client API keys as the gRPC port; `/metrics` has
//! its own scrape token.
//!
//! Handlers go through [`CoordinatorService`] exactly like gRPC calls do (one validation, one
//! scheduler, one set of metrics); `openai.rs` converts OpenAI's JSON to and from it.

mod connection;
mod openai;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use strata_transport::{Security, HANDSHAKE_TIMEOUT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use connection::{Activity, TrackedIo};

use crate::server::ClientAccess;
use crate::service::CoordinatorService;
use crate::CoordinatorError;

pub use openai::model_id;

/// How long running requests may take to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    service: CoordinatorService,
    access: ClientAccess,
}

/// The routes, with the API key check in front of the API, the scrape token's in front of
/// `/metrics`, and none in front of `/health` (load balancers and orchestrators probe it without
/// credentials; without a key it says only whether the pipeline serves).
fn router(service: CoordinatorService, access: ClientAccess) -> Router {
    let state = AppState { service, access };
    let api = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let scrape =
        Router::new()
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_scrape_token,
            ));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .merge(scrape)
        .fallback(not_found)
        .with_state(state)
}

fn authorization(request: &Request) -> Option<&[u8]> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
}

async fn require_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match state.access.clients.check(authorization(&request)) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(message) => openai::ApiError::unauthorized(message).into_response(),
    }
}

async fn require_scrape_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let checked = match &state.access.metrics {
        Some(token) => token.check(authorization(&request)).map(drop),
        None if state.access.clients.is_open() => Ok(()),
        None => {
            Err("this coordinator has no metrics scrape token: start it with --metrics-token-file")
        }
    };
    match checked {
        Ok(()) => next.run(request).await,
        Err(message) => openai::ApiError::unauthorized(message).into_response(),
    }
}

/// Ready or not, for anyone (load balancers probe without credentials); why, with which worker,
/// only for a caller with an API key: the reason names worker addresses and their errors.
async fn health(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let authorized = state
        .access
        .clients
        .check(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
        )
        .is_ok();
    let body = |status: &str, message: String| {
        let mut body = serde_json::json!({ "status": status });
        if authorized {
            body["message"] = message.into();
        }
        axum::Json(body)
    };
    match state.service.health().await {
        Ok((true, message)) => body("ok", message).into_response(),
        Ok((false, message)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            body("unavailable", message),
        )
            .into_response(),
        Err(status) => openai::ApiError::from(status).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.service.metrics_text().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(status) => openai::ApiError::from(status).into_response(),
    }
}

async fn not_found(request: Request) -> Response {
    openai::ApiError::not_found(format!(
        "no route {} {}: strata serves /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

/// Serves the HTTP API on `listener` until `shutdown` resolves, then lets running requests finish
/// (up to 30 s). Idle connections are closed after 20 s, headers must arrive within 10 s, and at
/// most 4,096 connections are open at once (see `connection.rs`).
pub async fn serve(
    listener: TcpListener,
    service: CoordinatorService,
    security: &Security,
    access: ClientAccess,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let tls = security
        .http_tls_config()?
        .map(|config| TlsAcceptor::from(Arc::clone(&config)));
    let address = listener.local_addr().ok();
    tracing::info!(
        address = ?address,
        tls = tls.is_some(),
        api_keys = !access.clients.is_open(),
        metrics_token = access.metrics.is_some(),
        "HTTP API listening"
    );
    let app = router(service, access);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(connection::MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP connection refused: {} open", connection::MAX_CONNECTIONS);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let activity = Activity::new();
            let tcp = TrackedIo::new(tcp, activity.clone());
            let Some(acceptor) = tls else {
                return serve_connection(tcp, app, watcher, peer, activity).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => serve_connection(stream, app, watcher, peer, activity).await,
                // A plaintext client on the TLS port lands here: worth a line, not an error.
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "HTTP TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "HTTP TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still running after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

/// Serves HTTP/1.1 or HTTP/2 on one (plain or TLS) connection until it closes, shutdown drains it,
/// or it is idle too long.
async fn serve_connection<I>(
    io: I,
    app: Router,
    watcher: Watcher,
    peer: SocketAddr,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(connection::HEADER_TIMEOUT);
    let service = connection::counted(app, activity.clone());
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
        .into_owned();
    tokio::select! {
        ended = watcher.watch(connection) => {
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }
        () = activity.until_idle() => {
            tracing::debug!(%peer, "HTTP connection closed: idle for {:?}", connection::IDLE_TIMEOUT);
        }
    }
}
