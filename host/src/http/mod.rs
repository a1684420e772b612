//! The HTTP front: accepts connections, routes each request to the pool of
//! a web process type, and shuts down gracefully. How one request runs in
//! an instance is [`request`]'s business; every answer the front writes
//! itself (400, 404, 413, 503, 504, 500) is in [`answers`].
//!
//! Invariants:
//! - the listener is bound before this module runs (so a bad address fails
//!   at start, and port 0 can be reported);
//! - a request with no matching route gets 404 from the host; one with no
//!   `Host` header (and no authority in its target), an empty one or more
//!   than one gets 400; a guest is never started for any of them;
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
mod body;
mod request;
mod shared;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::header;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument as _;

pub use answers::HttpResponse;
pub use request::ProxyWorld;

use crate::accept::{Connections, accept_until};
use crate::formation::HttpSettings;
use crate::pool::Pool;
use crate::router::Router;
use crate::telemetry;
use body::{InFlight, ResponseBody};
use request::Served;

/// Largest request head (request line and headers) a client may send; a
/// larger one gets 431.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// Routes requests to the pools of web process types.
pub type PoolRouter = Router<Arc<Pool<ProxyWorld>>>;

async fn dispatch(
    router: &PoolRouter,
    request: http::Request<hyper::body::Incoming>,
    min_body_rate: u64,
) -> Served {
    // RFC 9112 §3.2: a request with no Host, an empty one or several is
    // answered 400 (an absolute-form target carries its own authority).
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (Some(host), None) if !host.is_empty() => host.to_str().ok(),
        (None, None) => None,
        _ => return answers::bad_host().into(),
    };
    let host = request.uri().authority().map(|a| a.as_str()).or(header);
    let Some(host) = host else {
        return answers::missing_host().into();
    };
    match router.matching(Some(host), request.uri().path()) {
        Some((route, pool)) => {
            if telemetry::enabled() {
                tracing::Span::current().record("http.route", route.to_string());
            }
            request::serve(pool, request, min_body_rate).await
        }
        None => answers::no_route(request.uri().path()).into(),
    }
}

/// [`dispatch`] in a server span that follows the request's
/// `traceparent`; only called when tracing is on.
async fn traced(
    router: &PoolRouter,
    request: http::Request<hyper::body::Incoming>,
    min_body_rate: u64,
) -> Served {
    let span = tracing::info_span!(
        "http.request",
        otel.name = %request.method(),
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.route = tracing::field::Empty,
        process = tracing::field::Empty,
        instance = tracing::field::Empty,
        error.type = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    telemetry::follow_headers(&span, request.headers());
    let served = dispatch(router, request, min_body_rate)
        .instrument(span.clone())
        .await;
    let status = served.response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    served
}

/// Serves HTTP on `listener` as `settings` say until `shutdown` resolves,
/// then lets open connections finish their answers for at most
/// `settings.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    router: Arc<PoolRouter>,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()>,
) {
    let connections = Connections::new(settings.max_connections);
    let (stop, stopping) = watch::channel(false);
    let min_body_rate = settings.min_body_rate;
    accept_until(
        &listener,
        shutdown,
        "HTTP",
        &connections,
        |stream, peer, permit| {
            let router = router.clone();
            let in_flight = Arc::new(InFlight::default());
            let counted = in_flight.clone();
            let service = service_fn(move |request| {
                let router = router.clone();
                let in_flight = counted.clone();
                in_flight.begin();
                async move {
                    let Served { response, exchange } = if telemetry::enabled() {
                        traced(&router, request, min_body_rate).await
                    } else {
                        dispatch(&router, request, min_body_rate).await
                    };
                    let response =
                        response.map(|body| ResponseBody::new(body, exchange, in_flight));
                    // See the module docs: let the worker's other ready
                    // connections run before this answer is written.
                    tokio::task::yield_now().await;
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let mut stopping = stopping.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(%peer, "connection ended: {e}");
                        }
                        return;
                    }
                    _ = stopping.wait_for(|stop| *stop) => {}
                }
                // Shutting down: a connection with no request to answer (idle,
                // or halfway through a request's head) closes now; the others
                // finish the answer they are sending, without keep-alive.
                if in_flight.is_idle() {
                    return;
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        },
    )
    .await;
    drop(listener);
    let _ = stop.send(true);
    let grace = settings.shutdown_grace;
    tracing::info!(
        "stopped accepting connections; finishing in-flight requests (grace {})",
        humantime::format_duration(grace)
    );
    if !connections.all_closed(grace).await {
        tracing::warn!("grace period over: dropping the remaining connections");
    }
}
