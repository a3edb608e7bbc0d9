//! What one HTTP connection may hold: a client that opens connections and sends nothing, or
//! stops between requests, or sends its headers a byte at a time, must not keep a socket (and a
//! task) forever. A connection is idle while none of its requests is running (a response body
//! counts until it is sent) and no byte has moved either way; past [`IDLE_TIMEOUT`] it is closed.
//! hyper's header timeout bounds a request's headers, and the server caps open connections.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceExt;

/// How long a connection may sit with no request running and no byte moving.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at most; more are closed as they arrive (each costs a socket and a task).
pub const MAX_CONNECTIONS: usize = 4096;
/// How often a connection checks whether it is idle.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// One connection's activity, shared by its socket and its requests.
pub struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` when a byte last moved.
    last_io_ms: AtomicU64,
    /// Requests whose response is not yet fully sent.
    running: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            running: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_io_ms.store(now, Ordering::Relaxed);
    }

    /// How long the connection has been idle (zero while a request runs).
    pub fn idle_for(&self) -> Duration {
        if self.running.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// Resolves once the connection has been idle for [`IDLE_TIMEOUT`].
    pub async fn until_idle(&self) {
        let mut tick = tokio::time::interval(IDLE_CHECK);
        loop {
            tick.tick().await;
            if self.idle_for() >= IDLE_TIMEOUT {
                return;
            }
        }
    }
}

/// Counts a request as running until it is dropped.
struct Running(Arc<Activity>);

impl Running {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.running.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// `app` with each request counted as running until its response body is sent (or dropped).
pub fn counted(
    app: Router,
    activity: Arc<Activity>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |request: Request<Incoming>| {
        let running = Running::start(&activity);
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await?;
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &running;
                    frame
                }))
            }))
        }
    })
}

/// A socket that records when bytes move.
pub struct TrackedIo<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> TrackedIo<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        activity.touch();
        Self { inner, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
