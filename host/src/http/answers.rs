//! Every answer the HTTP front writes itself, instead of a guest: what a
//! client sees when there is no route, no room, too large a body, or a
//! failed unit. One function per answer, so each has one wording and one
//! status, in one place.
//!
//! | status | when | body |
//! |---|---|---|
//! | 400 | no `Host` header and no authority in the target | `missing Host header` |
//! | 400 | an empty `Host` header, or several | `expected exactly one non-empty Host header` |
//! | 404 | no route matches | ``no process type serves `PATH` `` |
//! | 408 | the body came slower than `[http] min_body_rate` | `request body arrived too slowly` |
//! | 413 | the body is over `limits.body` (declared, or found while read) | `request body is larger than N bytes` |
//! | 431 | the request head is over 64 KiB (hyper answers) | |
//! | 503 + `Retry-After: 1` | the pool and its backlog are full, or no slot freed up within the timeout | `` `TYPE` is at capacity, retry later `` |
//! | 504 | the unit ran past `limits.timeout` | `` `TYPE` did not answer within T `` |
//! | 500 | any other failure: trap, fuel, memory, resources, no instance, no answer | `` `TYPE` failed (trap) `` and the like |
//!
//! A connection beyond `[http] max_connections` gets a fixed 503 from the
//! accept loop (`crate::accept`) before any request is read.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::formation::ProcessType;
use crate::pool::Failure;

/// The HTTP response type of the front.
pub type HttpResponse = Response<HyperOutgoingBody>;

/// `Retry-After` seconds sent with a 503 when the pool is full.
const RETRY_AFTER_SECS: u32 = 1;

/// A short plain-text response.
fn text(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// 400: the request names no host.
pub(crate) fn missing_host() -> HttpResponse {
    text(StatusCode::BAD_REQUEST, "missing Host header\n".into())
}

/// 400: the request has an empty `Host` header, or several.
pub(crate) fn bad_host() -> HttpResponse {
    text(
        StatusCode::BAD_REQUEST,
        "expected exactly one non-empty Host header\n".into(),
    )
}

/// 404: no process type serves `path`.
pub(crate) fn no_route(path: &str) -> HttpResponse {
    text(
        StatusCode::NOT_FOUND,
        format!("no process type serves `{path}`\n"),
    )
}

/// 413: the declared body is over the type's `limits.body`.
pub(crate) fn too_large(limit: u64) -> HttpResponse {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than {limit} bytes\n"),
    )
}

/// 408: the client sent its body slower than `[http] min_body_rate`.
pub(crate) fn too_slow() -> HttpResponse {
    text(
        StatusCode::REQUEST_TIMEOUT,
        "request body arrived too slowly\n".into(),
    )
}

/// 503 with `Retry-After`: no room in the type's pool.
pub(crate) fn at_capacity(process: &ProcessType) -> HttpResponse {
    let mut response = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("`{}` is at capacity, retry later\n", process.name),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    response
}

/// 504 for a timeout, 500 for every other failure of a unit.
pub(crate) fn failed(process: &ProcessType, failure: &Failure) -> HttpResponse {
    let name = &process.name;
    let (status, what) = match failure {
        Failure::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "did not answer within {}",
                humantime::format_duration(process.limits.timeout)
            ),
        ),
        Failure::Fuel => (StatusCode::INTERNAL_SERVER_ERROR, "ran out of fuel".into()),
        Failure::Memory => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "exceeded its memory limit".into(),
        ),
        Failure::Resources => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "held more host resources than its limit".into(),
        ),
        // The client is gone or at fault; what it is told hardly matters.
        Failure::Client(what) => (StatusCode::BAD_REQUEST, format!("could not finish: {what}")),
        Failure::Trap(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed (trap)".into()),
        Failure::Instantiate(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not start an instance".into(),
        ),
        Failure::NoResponse => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "returned without a response".into(),
        ),
    };
    text(status, format!("`{name}` {what}\n"))
}
