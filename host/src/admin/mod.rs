//! The admin API: a second HTTP listener, on loopback, for operators and
//! for other services on the machine.
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
//! | `GET /queues/Q/dead-letters`                 | the dead letters of Q, as JSON         |
//! | `POST /queues/Q/dead-letters/replay[?ids=a,b]` | moves dead letters back to Q; `{"replayed": n}` |
//! | `GET /kv/B[?cursor=N]`                       | a page of bucket B's keys: `{"keys": [...], "cursor": n or null}` |
//! | `GET /kv/B/K`                                | the value of K (404 if none)           |
//! | `PUT /kv/B/K` (body: the value)              | sets K                                 |
//! | `DELETE /kv/B/K`                             | removes K                              |
//!
//! Errors are JSON `{"error": "…"}`: 404 for an unknown queue, type or
//! path, 413 for a message over `[queue] max_message`, 400 for a bad
//! parameter (a delay over `[queue] max_delay`, a bad idempotency key), 409
//! for a scale beyond capacity, 422 for a refused artifact, 503 when the
//! backend fails or the queue is full (`[queue] max_bytes`; with
//! `Retry-After`), 504 when the backend did not confirm an enqueue (the
//! message may or may not be there: send it again with the same
//! `Idempotency-Key`), 401 without a valid bearer token and 403 for a
//! request a browser sent for a web page (see [`guard`]; `/healthz` and
//! `/readyz` need neither, for probes).
//!
//! The bound address is logged (`admin API on http://…`) and written to
//! `.wasmproc/admin.addr` beside the formation, and the token generated at
//! start to `.wasmproc/admin.token` (mode 0600), where the CLI finds them.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

mod guard;

pub use guard::Keys;

use crate::accept::{Connections, accept_until};
use crate::control::{ChangeError, Control, ScaleChange};
use crate::keyvalue::{KeyValue, KvError};
use crate::queue::{NewMessage, QueueError, Queues};
use guard::Refusal;

type AdminResponse = Response<Full<Bytes>>;

/// Largest component a deploy accepts.
const MAX_ARTIFACT: usize = crate::engine::MAX_COMPONENT_BYTES as usize;
/// Connections the admin API keeps open at once: its own small budget, so
/// it never competes with the HTTP front for descriptors.
pub const MAX_CONNECTIONS: u32 = 64;
/// How long an admin connection may take to send a request's head (and
/// sit idle between requests).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// `Retry-After` of a 503 for a full queue, in seconds: it drains at its
/// workers' pace.
const QUEUE_FULL_RETRY_AFTER: u32 = 5;
/// The header naming an enqueue, so a client that retries it does not add
/// a second message.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn change_error(e: &ChangeError) -> AdminResponse {
    let status = match e {
        ChangeError::UnknownType(_) => StatusCode::NOT_FOUND,
        ChangeError::Syntax(_) => StatusCode::BAD_REQUEST,
        ChangeError::Capacity { .. } | ChangeError::Zero(_) => StatusCode::CONFLICT,
        ChangeError::Artifact(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    error(status, e)
}

async fn body(
    request: http::Request<hyper::body::Incoming>,
    limit: usize,
) -> Result<Bytes, AdminResponse> {
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> AdminResponse {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

fn kv_error(e: &KvError) -> AdminResponse {
    let status = match e {
        KvError::AccessDenied(_) => StatusCode::NOT_FOUND,
        KvError::TooLarge { .. } | KvError::BucketFull { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        KvError::NotANumber(_) | KvError::Overflow(_) => StatusCode::CONFLICT,
        KvError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e)
}

/// The `/kv/BUCKET[/KEY]` routes: list keys, get, set, delete.
async fn keyvalue(
    store: &KeyValue,
    bucket: &str,
    method: Method,
    rest: &[&str],
    request: http::Request<hyper::body::Incoming>,
) -> AdminResponse {
    match (method, rest) {
        (Method::GET, [] | [""]) => {
            let cursor = query(request.uri(), "cursor").and_then(|c| c.parse().ok());
            match store.list(bucket, cursor).await {
                Ok((keys, cursor)) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "keys": keys, "cursor": cursor }),
                ),
                Err(e) => kv_error(&e),
            }
        }
        (Method::GET, [key]) => match store.get(bucket, key).await {
            Ok(Some(value)) => Response::new(Full::new(Bytes::from(value))),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                format!("no key `{key}` in `{bucket}`"),
            ),
            Err(e) => kv_error(&e),
        },
        (Method::PUT, [key]) => {
            let limit = usize::try_from(store.max_value()).unwrap_or(usize::MAX);
            let value = match body(request, limit).await {
                Ok(value) => value,
                Err(response) => return response,
            };
            match store.set(bucket, key, &value).await {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "bucket": bucket, "key": key }),
                ),
                Err(e) => kv_error(&e),
            }
        }
        (Method::DELETE, [key]) => match store.delete(bucket, key).await {
            Ok(()) => json(
                StatusCode::OK,
                &serde_json::json!({ "bucket": bucket, "key": key }),
            ),
            Err(e) => kv_error(&e),
        },
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

fn queue_error(e: &QueueError) -> AdminResponse {
    let status = match e {
        QueueError::UnknownQueue(_) => StatusCode::NOT_FOUND,
        QueueError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        QueueError::DelayTooLong { .. } | QueueError::InvalidKey(_) => StatusCode::BAD_REQUEST,
        QueueError::Full { .. } | QueueError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        QueueError::Unconfirmed(_) => StatusCode::GATEWAY_TIMEOUT,
    };
    let mut response = error(status, e);
    if let QueueError::Full { .. } = e {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, QUEUE_FULL_RETRY_AFTER.into());
    }
    response
}

/// The percent-decoded value of the query parameter `name`.
fn query(uri: &http::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The request path's segments, percent-decoded.
fn segments(uri: &http::Uri) -> Vec<Cow<'_, str>> {
    uri.path()
        .trim_matches('/')
        .split('/')
        .map(|segment| percent_encoding::percent_decode_str(segment).decode_utf8_lossy())
        .collect()
}

async fn handle(
    control: &Control,
    keys: &Keys,
    loopback: bool,
    request: http::Request<hyper::body::Incoming>,
) -> AdminResponse {
    let uri = request.uri().clone();
    let segments = segments(&uri);
    let path: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
    let method = request.method().clone();
    let queues = control.queues();
    let refused = keys.check(request.headers(), loopback).err();
    match (method, path.as_slice()) {
        (Method::GET, ["healthz"]) => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        (Method::GET, ["readyz"]) => {
            if control.ready() {
                Response::new(Full::new(Bytes::from_static(b"ready\n")))
            } else {
                error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }
        _ if let Some(refusal) = refused => {
            let status = match refusal {
                Refusal::Token => StatusCode::UNAUTHORIZED,
                Refusal::Browser | Refusal::Host => StatusCode::FORBIDDEN,
            };
            error(status, refusal.message())
        }
        (Method::GET, ["metrics"]) => {
            let mut response = Response::new(Full::new(Bytes::from(crate::metrics::encode(
                control.registry(),
            ))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (Method::GET, ["ps"]) => json(StatusCode::OK, &serde_json::json!(control.ps().await)),
        (Method::POST, ["scale"]) => {
            let text = match body(request, 64 << 10).await {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(response) => return response,
            };
            let changes: Result<Vec<ScaleChange>, ChangeError> =
                text.split_whitespace().map(str::parse).collect();
            match changes.and_then(|changes| control.scale_all(&changes)) {
                Ok(scales) => json(StatusCode::OK, &serde_json::json!(scales)),
                Err(e) => change_error(&e),
            }
        }
        (Method::POST, ["deploy", name]) => {
            let name = (*name).to_string();
            let bytes = match body(request, MAX_ARTIFACT).await {
                Ok(b) => b,
                Err(response) => return response,
            };
            // Compiling takes a while: keep it off the async workers.
            match tokio::task::block_in_place(|| control.deploy(&name, &bytes)) {
                Ok(generation) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "process": name, "generation": generation }),
                ),
                Err(e) => {
                    tracing::warn!(process = %name, "deploy refused: {e}");
                    change_error(&e)
                }
            }
        }
        (method, ["kv", bucket, rest @ ..]) => {
            let Some((store, bucket)) = control.bucket(bucket) else {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown bucket `{bucket}`: no process type lists it in `keyvalue`"),
                );
            };
            keyvalue(store, bucket, method, rest, request).await
        }
        (method, ["queues", queue, rest @ ..]) => {
            let Some(queues) = queues else {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown queue `{queue}`: the formation has no workers"),
                );
            };
            if let Err(e) = queues.check_known(queue) {
                return queue_error(&e);
            }
            let queue = (*queue).to_string();
            match (method, rest) {
                (Method::POST, ["messages"]) => enqueue(queues, &queue, request).await,
                (Method::GET, ["dead-letters"]) => {
                    match queues.backend().dead_letters(&queue).await {
                        Ok(letters) => json(StatusCode::OK, &serde_json::json!(letters)),
                        Err(e) => queue_error(&e),
                    }
                }
                (Method::POST, ["dead-letters", "replay"]) => {
                    let ids: Vec<String> = query(&uri, "ids")
                        .map(|ids| {
                            ids.split(',')
                                .filter(|s| !s.is_empty())
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default();
                    match queues.backend().replay(&queue, &ids).await {
                        Ok(n) => json(StatusCode::OK, &serde_json::json!({ "replayed": n })),
                        Err(e) => queue_error(&e),
                    }
                }
                _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

async fn enqueue(
    queues: &Queues,
    queue: &str,
    request: http::Request<hyper::body::Incoming>,
) -> AdminResponse {
    let delay = match query(request.uri(), "delay").map(|d| humantime::parse_duration(&d)) {
        None => Default::default(),
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid `delay`: {e}; expected a duration such as 5s, at most {} (`[queue] max_delay`)",
                    humantime::format_duration(queues.max_delay())
                ),
            );
        }
    };
    let key = match request.headers().get(IDEMPOTENCY_KEY).map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) => Some(key.to_string()),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid `Idempotency-Key`: expected visible ASCII",
            );
        }
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    // Read one byte past the limit, so an oversize body is reported as such.
    let limit = usize::try_from(queues.max_message())
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return queue_error(&QueueError::TooLarge {
                size: limit as u64,
                limit: queues.max_message(),
            });
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            );
        }
    };
    let message = NewMessage {
        body,
        content_type,
        headers: Vec::new(),
        delay,
        key,
    };
    match queues.enqueue(queue, message).await {
        Ok(enqueued) if enqueued.duplicate => {
            tracing::debug!(%queue, message.id = %enqueued.id, "enqueue through the admin API repeated an idempotency key");
            json(
                StatusCode::OK,
                &serde_json::json!({ "id": enqueued.id, "queue": queue, "duplicate": true }),
            )
        }
        Ok(enqueued) => {
            tracing::debug!(%queue, message.id = %enqueued.id, "enqueued through the admin API");
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "id": enqueued.id, "queue": queue }),
            )
        }
        Err(e) => {
            if let QueueError::Unconfirmed(_) = e {
                tracing::warn!(%queue, "enqueue through the admin API unconfirmed: {e}");
            }
            queue_error(&e)
        }
    }
}

/// Serves the admin API on `listener` until `shutdown` resolves; every
/// request but the probes must carry one of `keys`' tokens.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    keys: Keys,
    shutdown: impl Future<Output = ()>,
) {
    let keys = Arc::new(keys);
    let loopback = listener
        .local_addr()
        .map(|addr| addr.ip().is_loopback())
        .unwrap_or(true);
    let connections = Connections::new(MAX_CONNECTIONS);
    accept_until(
        &listener,
        shutdown,
        "admin API",
        &connections,
        |stream, _, permit| {
            let control = control.clone();
            let keys = keys.clone();
            let service = service_fn(move |request| {
                let control = control.clone();
                let keys = keys.clone();
                async move { Ok::<_, Infallible>(handle(&control, &keys, loopback, request).await) }
            });
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
