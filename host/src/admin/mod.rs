//! The admin API: a second HTTP listener, on loopback, for operators, for
//! other services on the machine, and for the dashboard.
//!
//! | method and path                              | does                                   |
//! |----------------------------------------------|----------------------------------------|
//! | `GET /healthz`                               | `200 ok` while the host runs           |
//! | `GET /readyz`                                | `200` when every type has its minimum running, else `503` |
//! | `GET /metrics`                               | Prometheus text format                 |
//! | `GET /ps`                                    | the process types, as JSON             |
//! | `POST /scale` (body `web=3 mailer+1 web-1`)  | changes scales at once                 |
//! | `POST /deploy/NAME` (body: the component)    | compiles, checks and swaps in a new component |
//! | `POST /queues/Q/messages[?delay=5s]`         | enqueues the body (its `content-type` kept); `202 {"id": …}`, or `200 {"id": …, "duplicate": true}` for an `Idempotency-Key` seen before |
//! | `GET /queues/Q/dead-letters[?limit=N]`       | the dead letters of Q (the first N), as JSON |
//! | `POST /queues/Q/dead-letters/replay[?ids=a,b]` | moves dead letters back to Q; `{"replayed": n}` |
//! | `GET /kv/B[?cursor=N]`                       | a page of bucket B's keys: `{"keys": [...], "cursor": n or null}` |
//! | `GET /kv/B/K`                                | the value of K (404 if none)           |
//! | `PUT /kv/B/K` (body: the value)              | sets K                                 |
//! | `DELETE /kv/B/K`                             | removes K                              |
//! | `GET /ui/login?code=C`                       | trades a one-time code for a dashboard session |
//! | `POST /ui/link`                              | a fresh one-time dashboard link: `{"url": …}` |
//! | `GET /ui/events?session=S`                   | the dashboard's live snapshots (see [`ui`]) |
//! | `POST /ui/logout`                            | ends the dashboard session that sends it |
//! | `GET /ui`, `/ui/app.js`, `/ui/style.css`     | the dashboard's page: static, public, no data |
//!
//! Errors are JSON `{"error": "…"}`: 404 for an unknown queue, type or
//! path, 405 for a known path with another method, 413 for a message over
//! `[queue] max_message`, 400 for a bad parameter (a delay over `[queue]
//! max_delay`, a bad idempotency key), 409 for a scale beyond capacity, 422
//! for a refused artifact, 503 when the backend fails or the queue is full
//! (`[queue] max_bytes`; with `Retry-After`), 504 when the backend did not
//! confirm an enqueue (the message may or may not be there: send it again
//! with the same `Idempotency-Key`), 401 without a valid bearer token or
//! dashboard session and 403 for a request a web page sent (see [`guard`];
//! `/healthz`, `/readyz` and the dashboard's static page need neither). A
//! dashboard session reaches only what the dashboard shows and does:
//! `/ps`, `/metrics`, `/scale`, the dead letters and their replay, its
//! event stream and its logout.
//!
//! The bound address is logged (`admin API on http://…`) and written to
//! `.wasmproc/admin.addr` beside the formation, and the token generated at
//! start to `.wasmproc/admin.token` (mode 0600), where the CLI finds them.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

mod api;
mod guard;
pub mod ui;

pub use guard::Keys;

use crate::accept::{Connections, accept_until};
use crate::control::Control;
use guard::{Caller, Refusal};

/// Connections the admin API keeps open at once: its own small budget, so
/// it never competes with the HTTP front for descriptors.
pub const MAX_CONNECTIONS: u32 = 64;
/// How long an admin connection may take to send a request's head (and
/// sit idle between requests).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What every admin route sees.
#[derive(Clone)]
struct Admin {
    control: Arc<Control>,
    keys: Arc<Keys>,
    /// The listener's address, for links to the dashboard.
    addr: std::net::SocketAddr,
    /// What the dashboard calls this host (the formation file).
    title: Arc<str>,
    /// Dashboard event streams open at once (each holds a connection).
    streams: Arc<Semaphore>,
    /// Turns true when the host stops: event streams end.
    stopping: watch::Receiver<bool>,
}

impl Admin {
    /// Whether the listener is on a loopback address.
    fn loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }
}

/// A JSON answer.
fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    ApiError::new(status, message).into_response()
}

/// An admin request that failed: answered as JSON `{"error": …}` with its
/// status, and `Retry-After` when the client should try again later.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    /// An error answered with `status`.
    fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            message: message.to_string(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry in `seconds`.
    fn retry_after(self, seconds: u32) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json(self.status, &serde_json::json!({ "error": self.message }));
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The session in an event stream's query string (`?session=`); other
/// routes take it in a header only, so it stays out of their addresses.
fn query_session(request: &Request) -> Option<&str> {
    if request.uri().path() != "/ui/events" {
        return None;
    }
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("session="))
}

/// Lets through a request with a valid token or dashboard session; a
/// dashboard request carries its [`guard::Session`] on.
async fn authorize(State(admin): State<Admin>, mut request: Request, next: Next) -> Response {
    let checked = admin.keys.check(
        request.method(),
        request.headers(),
        query_session(&request),
        admin.loopback(),
    );
    match checked {
        Ok(Caller::Operator) => next.run(request).await,
        Ok(Caller::Dashboard(session)) if dashboard_may(request.uri().path()) => {
            request.extensions_mut().insert(session);
            next.run(request).await
        }
        Ok(Caller::Dashboard(_)) => error(
            StatusCode::FORBIDDEN,
            "the dashboard's session may not do this: use a bearer token",
        ),
        Err(refusal) => {
            let status = match refusal {
                Refusal::Token => StatusCode::UNAUTHORIZED,
                Refusal::Browser | Refusal::Host | Refusal::Origin => StatusCode::FORBIDDEN,
            };
            closing(error(status, refusal.message()))
        }
    }
}

/// `response`, closing its connection after it: a client without a token
/// (or a probe) does not keep one of the admin API's few connections.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// What a dashboard session may reach: what the dashboard shows and its
/// buttons do (scale, replay, log out), not deploys, messages or the
/// store.
fn dashboard_may(path: &str) -> bool {
    match path {
        "/ps" | "/scale" | "/metrics" | "/ui/events" | "/ui/logout" => true,
        _ => path.strip_prefix("/queues/").is_some_and(|rest| {
            let mut parts = rest.split('/');
            let _queue = parts.next();
            parts.next() == Some("dead-letters")
        }),
    }
}

async fn healthz() -> Response {
    closing("ok\n".into_response())
}

async fn readyz(State(admin): State<Admin>) -> Response {
    closing(if admin.control.ready() {
        "ready\n".into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    })
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such admin endpoint")
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "this admin endpoint does not take that method",
    )
}

/// The admin API's routes.
fn router(admin: Admin) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(api::metrics))
        .route("/ps", get(api::ps))
        .route("/scale", post(api::scale))
        .route("/deploy/{name}", post(api::deploy))
        .route("/queues/{queue}/messages", post(api::enqueue))
        .route("/queues/{queue}/dead-letters", get(api::dead_letters))
        .route("/queues/{queue}/dead-letters/replay", post(api::replay))
        .route("/kv/{bucket}", get(api::kv_list))
        .route(
            "/kv/{bucket}/{key}",
            get(api::kv_get).put(api::kv_set).delete(api::kv_delete),
        )
        .merge(ui::guarded_routes())
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(ui::public_routes())
        .merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(admin)
}

/// Serves the admin API on `listener` until `shutdown` resolves; every
/// request but the probes and the dashboard's login must carry one of
/// `keys`' tokens or a dashboard session. `title` names the host on the
/// dashboard.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    keys: Arc<Keys>,
    title: String,
    shutdown: impl Future<Output = ()>,
) {
    let Ok(addr) = listener.local_addr() else {
        tracing::error!("the admin listener has no address");
        return;
    };
    let (stop, stopping) = watch::channel(false);
    let admin = Admin {
        control,
        keys,
        addr,
        title: title.into(),
        streams: Arc::new(Semaphore::new(ui::MAX_STREAMS)),
        stopping,
    };
    let app = router(admin);
    let connections = Connections::new(MAX_CONNECTIONS);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    accept_until(
        &listener,
        shutdown,
        "admin API",
        &connections,
        |stream, _, permit| {
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(crate::http::MAX_HEAD_BYTES)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        },
    )
    .await;
}
