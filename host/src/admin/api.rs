//! The admin API's operator routes: status, scale, deploy, queues and the
//! key-value store. Every handler here runs behind the guard.

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Admin, ApiError, json};

/// What an admin handler answers.
type Answer = Result<Response, ApiError>;
use crate::control::{ChangeError, ScaleChange};
use crate::keyvalue::KvError;
use crate::queue::{NewMessage, QueueError, Queues};

/// Largest component a deploy accepts.
const MAX_ARTIFACT: usize = crate::engine::MAX_COMPONENT_BYTES as usize;
/// Largest `POST /scale` body.
const MAX_SCALE_BODY: usize = 64 << 10;
/// `Retry-After` of a 503 for a full queue, in seconds: it drains at its
/// workers' pace.
const QUEUE_FULL_RETRY_AFTER: u32 = 5;
/// The header naming an enqueue, so a client that retries it does not add
/// a second message.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn change_error(e: &ChangeError) -> ApiError {
    let status = match e {
        ChangeError::UnknownType(_) => StatusCode::NOT_FOUND,
        ChangeError::Syntax(_) => StatusCode::BAD_REQUEST,
        ChangeError::Capacity { .. } | ChangeError::Zero(_) => StatusCode::CONFLICT,
        ChangeError::Artifact(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, e)
}

fn kv_error(e: &KvError) -> ApiError {
    let status = match e {
        KvError::AccessDenied(_) => StatusCode::NOT_FOUND,
        KvError::TooLarge { .. } | KvError::BucketFull { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        KvError::NotANumber(_) | KvError::Overflow(_) => StatusCode::CONFLICT,
        KvError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e)
}

fn queue_error(e: &QueueError) -> ApiError {
    let status = match e {
        QueueError::UnknownQueue(_) => StatusCode::NOT_FOUND,
        QueueError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        QueueError::DelayTooLong { .. } | QueueError::InvalidKey(_) => StatusCode::BAD_REQUEST,
        QueueError::Full { .. } | QueueError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        QueueError::Unconfirmed(_) => StatusCode::GATEWAY_TIMEOUT,
    };
    let error = ApiError::new(status, e);
    match e {
        QueueError::Full { .. } => error.retry_after(QUEUE_FULL_RETRY_AFTER),
        _ => error,
    }
}

/// A route's query parameters; a malformed one is a JSON 400 like every
/// other admin error, saying which parameter and what was expected.
pub(super) struct Params<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(params)| Params(params))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

/// Reads a body of at most `limit` bytes.
async fn read(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
    }
}

/// The queues, if `queue` is one of them.
fn known<'a>(admin: &'a Admin, queue: &str) -> Result<&'a Queues, ApiError> {
    let Some(queues) = admin.control.queues() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown queue `{queue}`: the formation has no workers"),
        ));
    };
    queues.check_known(queue).map_err(|e| queue_error(&e))?;
    Ok(queues)
}

pub(super) async fn metrics(State(admin): State<Admin>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::encode(admin.control.registry()),
    )
        .into_response()
}

pub(super) async fn ps(State(admin): State<Admin>) -> Response {
    json(StatusCode::OK, &serde_json::json!(admin.control.ps().await))
}

pub(super) async fn scale(State(admin): State<Admin>, body: Body) -> Answer {
    let body = read(body, MAX_SCALE_BODY).await?;
    let changes = String::from_utf8_lossy(&body)
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<ScaleChange>, ChangeError>>()
        .map_err(|e| change_error(&e))?;
    let scales = admin
        .control
        .scale_all(&changes)
        .map_err(|e| change_error(&e))?;
    Ok(json(StatusCode::OK, &serde_json::json!(scales)))
}

pub(super) async fn deploy(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    body: Body,
) -> Answer {
    let bytes = read(body, MAX_ARTIFACT).await?;
    // Compiling takes a while: keep it off the async workers.
    let generation =
        tokio::task::block_in_place(|| admin.control.deploy(&name, &bytes)).map_err(|e| {
            tracing::warn!(process = %name, "deploy refused: {e}");
            change_error(&e)
        })?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "process": name, "generation": generation }),
    ))
}

/// `?delay=` of an enqueue.
#[derive(Deserialize)]
pub(super) struct EnqueueQuery {
    delay: Option<String>,
}

pub(super) async fn enqueue(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
    Params(query): Params<EnqueueQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let queues = known(&admin, &queue)?;
    let delay = match query.delay.map(|d| humantime::parse_duration(&d)) {
        None => Default::default(),
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid `delay`: {e}; expected a duration such as 5s, at most {} (`[queue] max_delay`)",
                    humantime::format_duration(queues.max_delay())
                ),
            ));
        }
    };
    let key = match headers.get(IDEMPOTENCY_KEY).map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) => Some(key.to_string()),
        Some(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid `Idempotency-Key`: expected visible ASCII",
            ));
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    // Read one byte past the limit, so an oversize body is reported as such.
    let limit = usize::try_from(queues.max_message())
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let body = match Limited::new(body, limit).collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(queue_error(&QueueError::TooLarge {
                size: limit as u64,
                limit: queues.max_message(),
            }));
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            ));
        }
    };
    let message = NewMessage {
        body,
        content_type,
        headers: Vec::new(),
        delay,
        key,
    };
    let enqueued = queues.enqueue(&queue, message).await.map_err(|e| {
        if let QueueError::Unconfirmed(_) = e {
            tracing::warn!(%queue, "enqueue through the admin API unconfirmed: {e}");
        }
        queue_error(&e)
    })?;
    if enqueued.duplicate {
        tracing::debug!(%queue, message.id = %enqueued.id, "enqueue through the admin API repeated an idempotency key");
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "id": enqueued.id, "queue": queue, "duplicate": true }),
        ))
    } else {
        tracing::debug!(%queue, message.id = %enqueued.id, "enqueued through the admin API");
        Ok(json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": enqueued.id, "queue": queue }),
        ))
    }
}

/// `?limit=` of a dead-letter listing.
#[derive(Deserialize)]
pub(super) struct LettersQuery {
    limit: Option<usize>,
}

pub(super) async fn dead_letters(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
    Params(query): Params<LettersQuery>,
) -> Answer {
    let queues = known(&admin, &queue)?;
    let mut letters = queues
        .backend()
        .dead_letters(&queue)
        .await
        .map_err(|e| queue_error(&e))?;
    if let Some(limit) = query.limit {
        letters.truncate(limit);
    }
    Ok(json(StatusCode::OK, &serde_json::json!(letters)))
}

/// `?ids=a,b` of a replay.
#[derive(Deserialize)]
pub(super) struct ReplayQuery {
    ids: Option<String>,
}

pub(super) async fn replay(
    State(admin): State<Admin>,
    Path(queue): Path<String>,
    Params(query): Params<ReplayQuery>,
) -> Answer {
    let queues = known(&admin, &queue)?;
    let ids: Vec<String> = query
        .ids
        .map(|ids| {
            ids.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let replayed = queues
        .backend()
        .replay(&queue, &ids)
        .await
        .map_err(|e| queue_error(&e))?;
    tracing::info!(%queue, replayed, "dead letters replayed through the admin API");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "replayed": replayed }),
    ))
}

/// The store and the bucket, if some type is granted it.
fn bucket<'a>(
    admin: &'a Admin,
    bucket: &'a str,
) -> Result<(&'a crate::keyvalue::KeyValue, &'a str), ApiError> {
    admin.control.bucket(bucket).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown bucket `{bucket}`: no process type lists it in `keyvalue`"),
        )
    })
}

/// `?cursor=` of a key listing.
#[derive(Deserialize)]
pub(super) struct ListQuery {
    cursor: Option<u64>,
}

pub(super) async fn kv_list(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    Params(query): Params<ListQuery>,
) -> Answer {
    let (store, name) = bucket(&admin, &name)?;
    let (keys, cursor) = store
        .list(name, query.cursor)
        .await
        .map_err(|e| kv_error(&e))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "keys": keys, "cursor": cursor }),
    ))
}

pub(super) async fn kv_get(
    State(admin): State<Admin>,
    Path((name, key)): Path<(String, String)>,
) -> Answer {
    let (store, name) = bucket(&admin, &name)?;
    match store.get(name, &key).await.map_err(|e| kv_error(&e))? {
        Some(value) => Ok(value.into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no key `{key}` in `{name}`"),
        )),
    }
}

pub(super) async fn kv_set(
    State(admin): State<Admin>,
    Path((name, key)): Path<(String, String)>,
    body: Body,
) -> Answer {
    let (store, name) = bucket(&admin, &name)?;
    let limit = usize::try_from(store.max_value()).unwrap_or(usize::MAX);
    let value = read(body, limit).await?;
    store
        .set(name, &key, &value)
        .await
        .map_err(|e| kv_error(&e))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "bucket": name, "key": key }),
    ))
}

pub(super) async fn kv_delete(
    State(admin): State<Admin>,
    Path((name, key)): Path<(String, String)>,
) -> Answer {
    let (store, name) = bucket(&admin, &name)?;
    store.delete(name, &key).await.map_err(|e| kv_error(&e))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "bucket": name, "key": key }),
    ))
}
