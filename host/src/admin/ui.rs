//! The dashboard: a page on the admin listener that shows the host live —
//! every process type with its scale, busy and idle instances, units/s and
//! failures/s as small charts; the queues with depth, oldest age and dead
//! letters (with replay buttons); the autoscaler's decisions; the last
//! failures with their reasons — and scales types with a click.
//!
//! The page, its script and its style are embedded in the binary (no
//! build step, no CDN: it works offline). The page opens `/ui/events`, a
//! Server-Sent Events stream of one JSON snapshot a second, and draws it;
//! its buttons call the admin API (`/scale`, the dead-letter routes).
//!
//! Invariants:
//! - the page, script and style are public (they are in the binary, and
//!   hold no data); everything else needs a session, which a browser gets
//!   only through a one-time login link (see [`super::guard`]): `wasmproc
//!   ui` asks the host for one with the per-start token; the link trades
//!   its code for a session and redirects to `/ui#session=…`, where the
//!   script moves the session into the page's own storage and out of the
//!   address bar;
//! - every dashboard answer forbids framing, inline script and third-party
//!   requests (`Content-Security-Policy`), and is never cached; the script
//!   sets text, never markup, so what a guest writes (a failure's detail, a
//!   message body) cannot run in the operator's browser;
//! - at most [`MAX_STREAMS`] event streams are open at once, so dashboards
//!   never take the admin API's connections from the CLI; a stream ends
//!   when the host stops or its session ends (expired, pushed out by newer
//!   ones, or logged out).

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse as _, Redirect, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::guard::{Session, local_request};
use super::{Admin, error, json};
use crate::control::Decision;
use crate::formation::Kind;

/// Dashboard event streams open at once.
pub const MAX_STREAMS: usize = 8;
/// How often a dashboard gets a snapshot.
const EVERY: Duration = Duration::from_secs(1);
/// Failures a snapshot lists, newest first.
const FAILURES: usize = 50;

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// What every dashboard answer carries: no framing (the buttons cannot be
/// clickjacked), nothing but its own scripts and styles, no caching, no
/// referrer (the login link's code).
const POLICY: &[(header::HeaderName, &str)] = &[
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// `response` with the dashboard's headers.
fn guarded(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in POLICY {
        headers.insert(name.clone(), HeaderValue::from_static(value));
    }
    response
}

/// `body` as `content_type`, with the dashboard's headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    guarded(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The dashboard's routes anyone may fetch: its static files, and the
/// login, which checks its code itself.
pub(super) fn public_routes() -> Router<Admin> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/style.css", get(style))
        .route("/ui/login", get(login))
}

/// The dashboard's routes behind the guard.
pub(super) fn guarded_routes() -> Router<Admin> {
    Router::new()
        .route("/ui/events", get(events))
        .route("/ui/link", post(link))
        .route("/ui/logout", post(logout))
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// A small page saying how to get in.
fn notice(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>wasmproc: {title}</title></head>\
         <body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    guarded(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

/// `?code=` of a login.
#[derive(Deserialize)]
pub(super) struct Login {
    code: Option<String>,
}

/// Trades a one-time code for a session, and goes to the dashboard with it.
async fn login(
    State(admin): State<Admin>,
    Query(login): Query<Login>,
    headers: HeaderMap,
) -> Response {
    if !local_request(&headers, admin.loopback()) {
        return error(
            StatusCode::FORBIDDEN,
            "the Host header must be the admin API's IP address or localhost",
        );
    }
    // Opened by the operator (typed, pasted, from a terminal), not followed
    // from a page: no other site logs a browser into this dashboard.
    if headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes() != b"none")
    {
        return notice(
            StatusCode::FORBIDDEN,
            "open this link yourself",
            "A dashboard login link works when you open it yourself, not from another page.",
        );
    }
    let session = match login.code.as_deref().map(|code| admin.keys.log_in(code)) {
        Some(Ok(Some(session))) => session,
        Some(Err(e)) => {
            tracing::warn!("dashboard login failed: {e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot make a session");
        }
        Some(Ok(None)) | None => {
            return notice(
                StatusCode::UNAUTHORIZED,
                "this login link was used or has expired",
                "Each link works once, within 15 minutes. Run <code>wasmproc ui -f FORMATION</code> for a new one.",
            );
        }
    };
    tracing::info!("dashboard: a browser logged in");
    // The session rides in the fragment, which the browser never sends on.
    guarded(Redirect::to(&format!("/ui#session={session}")).into_response())
}

/// `POST /ui/logout`: ends the session that sent it.
async fn logout(State(admin): State<Admin>, session: Option<Extension<Session>>) -> Response {
    if let Some(Extension(session)) = session {
        admin.keys.log_out(&session);
        tracing::info!("dashboard: a browser logged out");
    }
    json(StatusCode::OK, &serde_json::json!({ "logged_out": true }))
}

/// A fresh one-time login link to the dashboard of the host at `addr`.
pub fn login_link(keys: &super::Keys, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    let code = keys.login_code()?;
    Ok(format!(
        "http://{}/ui/login?code={code}",
        std::net::SocketAddr::new(ip, addr.port())
    ))
}

/// `POST /ui/link`: a new one-time link, for `wasmproc ui`.
async fn link(State(admin): State<Admin>) -> Response {
    match login_link(&admin.keys, admin.addr) {
        Ok(url) => json(StatusCode::OK, &serde_json::json!({ "url": url })),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// One process type in a snapshot.
#[derive(Serialize)]
struct ProcessRow {
    name: String,
    kind: String,
    scale: u32,
    min: Option<u32>,
    max: Option<u32>,
    busy: u64,
    idle: u64,
    warm: u64,
    generation: u64,
    /// Units that ended, since start.
    units: u64,
    /// Units that failed, since start.
    failures: u64,
    /// Requests refused with 503, since start.
    rejected: u64,
}

/// One queue in a snapshot.
#[derive(Serialize)]
struct QueueRow {
    name: String,
    workers: Vec<String>,
    depth: i64,
    oldest_seconds: Option<f64>,
    dead_letters: Option<u64>,
}

/// One failed unit in a snapshot.
#[derive(Serialize)]
struct FailureRow {
    at_ms: u64,
    process: String,
    instance: String,
    reason: &'static str,
    detail: String,
}

/// What the dashboard draws, once a second.
#[derive(Serialize)]
struct Snapshot<'a> {
    formation: &'a str,
    version: &'static str,
    at_ms: u64,
    processes: Vec<ProcessRow>,
    queues: Vec<QueueRow>,
    decisions: Vec<Decision>,
    failures: Vec<FailureRow>,
}

async fn snapshot(admin: &Admin) -> Snapshot<'_> {
    let control = &admin.control;
    let mut processes = Vec::new();
    let mut queues: Vec<QueueRow> = Vec::new();
    let mut failures = Vec::new();
    for (name, pool) in control.pools() {
        let process = pool.process();
        let stats = pool.stats();
        let scale = pool.scale();
        let busy = pool.busy();
        processes.push(ProcessRow {
            name: name.clone(),
            kind: process.kind().to_string(),
            scale,
            min: process.autoscale.map(|a| a.min),
            max: process.autoscale.map(|a| a.max),
            busy,
            idle: u64::from(scale).saturating_sub(busy),
            warm: pool.warm() as u64,
            generation: pool.generation(),
            units: stats.ended(),
            failures: stats.failures(),
            rejected: stats.rejected.get(),
        });
        failures.extend(stats.recent_failures().into_iter().map(|f| FailureRow {
            at_ms: f.at_ms,
            process: name.clone(),
            instance: f.instance,
            reason: f.reason,
            detail: f.detail,
        }));
        if process.kind() == Kind::Worker
            && let Some(queue) = process.queue()
        {
            match queues.iter_mut().find(|q| q.name == queue) {
                Some(row) => row.workers.push(name.clone()),
                None => {
                    let age = stats.queue_age_seconds.get();
                    queues.push(QueueRow {
                        name: queue.to_string(),
                        workers: vec![name.clone()],
                        depth: stats.queue_depth.get(),
                        oldest_seconds: (age > 0.0).then_some(age),
                        dead_letters: None,
                    });
                }
            }
        }
    }
    if let Some(backend) = control.queues().map(|q| q.backend()) {
        for row in &mut queues {
            row.dead_letters = backend.dead_letter_count(&row.name).await.ok();
        }
    }
    failures.sort_by_key(|f| f.at_ms);
    let skip = failures.len().saturating_sub(FAILURES);
    failures.drain(..skip);
    Snapshot {
        formation: &admin.title,
        version: env!("CARGO_PKG_VERSION"),
        at_ms: crate::queue::now_ms(),
        processes,
        queues,
        decisions: control.decisions(),
        failures,
    }
}

/// `GET /ui/events`: a snapshot at once, then one a second, until the
/// browser goes away, the host stops or the dashboard's session ends.
async fn events(State(admin): State<Admin>, session: Option<Extension<Session>>) -> Response {
    let session = session.map(|Extension(session)| session);
    let Ok(permit) = admin.streams.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} dashboards are open already"),
        );
    };
    let stream = futures::stream::unfold(
        (admin, permit, session, true),
        |(mut admin, permit, session, first)| async move {
            if !first {
                tokio::select! {
                    () = tokio::time::sleep(EVERY) => {}
                    _ = admin.stopping.wait_for(|stop| *stop) => return None,
                }
            }
            if *admin.stopping.borrow() || session.as_ref().is_some_and(|s| !admin.keys.alive(s)) {
                return None;
            }
            let event = match Event::default()
                .event("snapshot")
                .json_data(snapshot(&admin).await)
            {
                Ok(event) => event,
                Err(e) => Event::default().comment(format!("cannot encode a snapshot: {e}")),
            };
            let event = if first {
                event.retry(Duration::from_secs(2))
            } else {
                event
            };
            Some((Ok::<_, Infallible>(event), (admin, permit, session, false)))
        },
    );
    guarded(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}
