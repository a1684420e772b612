//! The HTTP front: accepts connections, routes each request to the pool of
//! a web process type, and shuts down gracefully. How one request runs in
//! an instance is [`request`]'s business; every answer the front writes
//! itself (400, 404, 413, 503, 504, 500) is in [`answers`].
//!
//! Invariants:
//! - the listener is bound before this module runs (so a bad address fails
//!   at start, and port 0 can be reported);
//! - a request with no matching route gets 404 from the host; one with no
//!   `Host` header (and no authority in its target) gets 400; a guest is
//!   never started for either;
//! - on shutdown the listener is closed first, then every open connection
//!   finishes its in-flight request (keep-alive is turned off) within the
//!   grace period; what remains after it is dropped.
//!
//! # Answers go out in bursts
//!
//! A connection does not write its answer the moment it has one: it first
//! yields to the runtime ([`tokio::task::yield_now`]), which runs it again
//! only once its worker thread has run every other ready connection and
//! polled for I/O. Under load, a worker thus runs a batch of guests, then
//! writes a batch of answers. A client waiting on many connections (a load
//! balancer, a benchmark) is woken once per burst instead of once per
//! answer, and each wake-up of a sleeping thread is a context switch on
//! both sides. On this project's 2-core benchmark machine this raised
//! requests per second by about a third, with a lower p99; an idle server
//! answers as fast as before, since a worker with nothing else to run polls
//! for I/O without blocking and resumes the connection at once.

mod answers;
mod request;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use answers::HttpResponse;
pub use request::ProxyWorld;

use crate::pool::Pool;
use crate::router::Router;

/// Routes requests to the pools of web process types.
pub type PoolRouter = Router<Arc<Pool<ProxyWorld>>>;

async fn dispatch(
    router: &PoolRouter,
    request: http::Request<hyper::body::Incoming>,
) -> HttpResponse {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(http::header::HOST)?.to_str().ok());
    let Some(host) = host else {
        return answers::missing_host();
    };
    match router.resolve(Some(host), request.uri().path()) {
        Some(pool) => request::serve(pool, request).await,
        None => answers::no_route(request.uri().path()),
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then drains open
/// connections for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Arc<PoolRouter>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    crate::accept::accept_until(&listener, shutdown, "HTTP", |stream, peer| {
        let router = router.clone();
        let service = service_fn(move |request| {
            let router = router.clone();
            async move {
                let response = dispatch(&router, request).await;
                // See the module docs: let the worker's other ready
                // connections run before this answer is written.
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(response)
            }
        });
        let connection = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    })
    .await;
    drop(listener);
    tracing::info!(
        "stopped accepting connections; finishing in-flight requests (grace {})",
        humantime::format_duration(grace)
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: dropping the remaining connections");
    }
}
