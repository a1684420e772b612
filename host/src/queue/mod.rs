//! Queues: durable, at-least-once delivery of messages to worker instances.
//!
//! # Contract of a [`Backend`]
//!
//! - `enqueue` returns `Ok` only once the message is durable: it will be
//!   delivered after a crash of the host (for the embedded backend, even
//!   `kill -9`; for Redis, as durable as the server is configured). An
//!   error means it was not enqueued — except [`QueueError::Unconfirmed`],
//!   which means the backend was asked but did not answer: the message may
//!   or may not be there. Enqueuing again with the same idempotency key
//!   ([`NewMessage::key`]) within [`IDEMPOTENCY_WINDOW`] then answers with
//!   the first message's id instead of adding a second message.
//! - A queue holds at most its backend's `max_bytes` of messages (waiting,
//!   delayed or in flight; dead letters do not count): an enqueue that
//!   would go past it fails with [`QueueError::Full`].
//! - `lease` hands a ready message to one consumer for `visibility`; until
//!   the lease is settled (`ack`, `retry`, `dead_letter`) or expires, no other
//!   consumer gets it. An expired lease (its host died) makes the message
//!   ready again, with its attempt counted.
//! - `attempt` is 1 on the first delivery and grows by one per delivery.
//! - Settling a lease that already expired is harmless: at-least-once means
//!   a message may be handled twice, never that it is lost.
//! - Due times are computed with saturating arithmetic: a delay too large
//!   to represent means "never", not "at once".
//!
//! Which messages a guest may enqueue, how large and how far ahead, is
//! checked by [`Queues`] before a backend sees them. The worker loop (in
//! [`crate::worker`]) talks to `dyn Backend` and never knows which one.

mod embedded;
mod redis;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Instrument as _;

pub use embedded::Embedded;
pub use redis::Redis;

use crate::formation::{Formation, QueueBackend};
use crate::telemetry;

/// A message to enqueue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// The payload.
    pub body: Vec<u8>,
    /// The payload's media type.
    pub content_type: Option<String>,
    /// Name/value pairs delivered with the message.
    pub headers: Vec<(String, String)>,
    /// Deliver no earlier than this long from now.
    pub delay: Duration,
    /// An idempotency key: while a message enqueued with the same key on
    /// the same queue is less than [`IDEMPOTENCY_WINDOW`] old, enqueuing
    /// answers with that message's id and adds nothing.
    pub key: Option<String>,
}

impl NewMessage {
    /// The bytes this message counts toward `[queue] max_bytes`: its body,
    /// content type and headers.
    pub fn size(&self) -> u64 {
        message_size(&self.body, self.content_type.as_deref(), &self.headers)
    }
}

/// The bytes of a message's body, content type and headers.
pub(crate) fn message_size(
    body: &[u8],
    content_type: Option<&str>,
    headers: &[(String, String)],
) -> u64 {
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (body.len() + content_type.map_or(0, str::len) + headers) as u64
}

/// What an enqueue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The message id.
    pub id: String,
    /// True when the idempotency key named a message enqueued before, whose
    /// id this is; nothing was added.
    pub duplicate: bool,
}

/// How long an idempotency key keeps naming the message first enqueued
/// with it.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// One delivery of a message, leased to one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The queue.
    pub queue: String,
    /// The message id, stable across redeliveries.
    pub id: String,
    /// 1 on the first delivery.
    pub attempt: u32,
    /// The payload.
    pub body: Vec<u8>,
    /// The payload's media type.
    pub content_type: Option<String>,
    /// The producer's name/value pairs.
    pub headers: Vec<(String, String)>,
    /// Backend-specific handle of this lease.
    pub(crate) lease: String,
}

/// A message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The message id.
    pub id: String,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// Why: the guest's reject reason, or the last failure.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub failed_at_ms: u64,
    /// The payload, as text where it is UTF-8.
    #[serde(serialize_with = "lossy")]
    pub body: Vec<u8>,
    /// The payload's media type.
    pub content_type: Option<String>,
}

fn lossy<S: serde::Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(body))
}

/// Why a queue operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// No worker consumes this queue (or the caller may not use it).
    #[error("unknown queue `{0}`")]
    UnknownQueue(String),
    /// The body is larger than `[queue] max_message`.
    #[error("message of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The body's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The delay is longer than `[queue] max_delay`.
    #[error(
        "a delay of {} is longer than the limit of {} (`[queue] max_delay`)",
        humantime::format_duration(*delay),
        humantime::format_duration(*limit)
    )]
    DelayTooLong {
        /// The delay asked for.
        delay: Duration,
        /// The limit.
        limit: Duration,
    },
    /// The queue holds `[queue] max_bytes` of messages already.
    #[error(
        "queue `{queue}` is full: it may hold {limit} bytes of messages (`[queue] max_bytes`); try again once its workers have caught up"
    )]
    Full {
        /// The queue.
        queue: String,
        /// The limit.
        limit: u64,
    },
    /// The idempotency key is empty or too long.
    #[error("invalid idempotency key: expected 1 to {MAX_KEY_BYTES} bytes, got {0}")]
    InvalidKey(usize),
    /// The backend was asked to enqueue but did not answer (a timeout, a
    /// connection lost mid-command): the message may or may not have been
    /// enqueued.
    #[error(
        "the queue backend did not confirm the enqueue ({0}): the message may or may not have been enqueued; enqueue it again with the same idempotency key to be sure"
    )]
    Unconfirmed(String),
    /// The backend failed.
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
}

/// A queue store: the embedded one or Redis Streams.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Durably adds `message` to `queue`; returns its id (or, for a key
    /// seen within [`IDEMPOTENCY_WINDOW`], the id of the first message).
    async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<Enqueued, QueueError>;
    /// Leases up to `max` ready messages of `queue` for `visibility`.
    async fn lease(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;
    /// Waits until `queue` may have a ready message — one was enqueued or
    /// given back on this host, or the earliest delayed or retried message
    /// comes due — or `timeout` passes.
    async fn wait(&self, queue: &str, timeout: Duration);
    /// Settles a lease: done.
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError>;
    /// Settles a lease: deliver again after `delay`.
    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<(), QueueError>;
    /// Settles a lease: move to the dead-letter queue with `reason`.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError>;
    /// The dead letters of `queue`, oldest first.
    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, QueueError>;
    /// How many dead letters `queue` has.
    async fn dead_letter_count(&self, queue: &str) -> Result<u64, QueueError>;
    /// Moves dead letters of `queue` back to it, as new first attempts: the
    /// ones named in `ids`, or all when `ids` is empty. Returns how many.
    async fn replay(&self, queue: &str, ids: &[String]) -> Result<usize, QueueError>;
    /// Messages waiting or in flight in `queue`.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;
    /// How long the oldest deliverable message of `queue` has waited.
    async fn oldest_age(&self, queue: &str) -> Result<Option<Duration>, QueueError>;
    /// Bytes of messages waiting, delayed or in flight in `queue`, as
    /// counted against `max_bytes`.
    async fn bytes(&self, queue: &str) -> Result<u64, QueueError>;
    /// Claims the firing of clock `clock` scheduled at `at_ms` (ms since
    /// the Unix epoch): true on exactly one of the hosts that share this
    /// backend and ask. A backend only one host uses claims every firing.
    async fn claim_tick(&self, clock: &str, at_ms: u64) -> Result<bool, QueueError> {
        let _ = (clock, at_ms);
        Ok(true)
    }
}

/// The formation's queues: a backend, which queues exist, how large a
/// message may be and how far ahead it may be due.
#[derive(Clone)]
pub struct Queues {
    backend: Arc<dyn Backend>,
    known: Arc<BTreeSet<String>>,
    max_message: u64,
    max_delay: Duration,
}

impl Queues {
    /// Opens the backend the formation names.
    pub async fn open(formation: &Formation) -> anyhow::Result<Queues> {
        let settings = &formation.queue;
        let backend: Arc<dyn Backend> = match &settings.backend {
            QueueBackend::Embedded { path } => Arc::new(Embedded::open(path, settings.max_bytes)?),
            QueueBackend::Redis { url } => Arc::new(Redis::connect(url, settings.max_bytes).await?),
        };
        let known = formation
            .processes
            .iter()
            .filter_map(|p| p.queue().map(String::from))
            .collect();
        Ok(Queues {
            backend,
            known: Arc::new(known),
            max_message: settings.max_message,
            max_delay: settings.max_delay,
        })
    }

    /// Queues over `backend` (for tests and benchmarks).
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        known: BTreeSet<String>,
        max_message: u64,
        max_delay: Duration,
    ) -> Queues {
        Queues {
            backend,
            known: Arc::new(known),
            max_message,
            max_delay,
        }
    }

    /// The largest message body accepted, in bytes.
    pub fn max_message(&self) -> u64 {
        self.max_message
    }

    /// The longest delay accepted; longer retry delays are capped at it.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Fails unless some worker consumes `queue`.
    pub fn check_known(&self, queue: &str) -> Result<(), QueueError> {
        if self.known.contains(queue) {
            Ok(())
        } else {
            Err(QueueError::UnknownQueue(queue.to_string()))
        }
    }

    /// Enqueues after checking the queue exists, the size and delay limits
    /// and the idempotency key.
    pub async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<Enqueued, QueueError> {
        self.check_known(queue)?;
        let size = message.body.len() as u64;
        if size > self.max_message {
            return Err(QueueError::TooLarge {
                size,
                limit: self.max_message,
            });
        }
        if message.delay > self.max_delay {
            return Err(QueueError::DelayTooLong {
                delay: message.delay,
                limit: self.max_delay,
            });
        }
        if let Some(key) = &message.key
            && (key.is_empty() || key.len() > MAX_KEY_BYTES)
        {
            return Err(QueueError::InvalidKey(key.len()));
        }
        if telemetry::enabled() {
            return self.traced(queue, message).await;
        }
        self.backend.enqueue(queue, message).await
    }

    /// Enqueues in a producer span whose context the message carries in its
    /// headers, so the delivery joins the trace of whatever enqueued it.
    async fn traced(&self, queue: &str, mut message: NewMessage) -> Result<Enqueued, QueueError> {
        let span = tracing::info_span!(
            "queue.publish",
            otel.name = format!("send {queue}"),
            otel.kind = "producer",
            messaging.system = "wasmproc",
            messaging.operation.type = "send",
            messaging.destination.name = queue,
            messaging.message.id = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        telemetry::stamp_pairs(&span, &mut message.headers);
        let enqueued = self
            .backend
            .enqueue(queue, message)
            .instrument(span.clone())
            .await;
        match &enqueued {
            Ok(enqueued) => span.record("messaging.message.id", enqueued.id.as_str()),
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", e.to_string())
            }
        };
        enqueued
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The time `delay` after `now` (both in ms), saturating: a delay too
/// large to represent is due never, not at once.
fn due(now: u64, delay: Duration) -> u64 {
    now.saturating_add(ms(delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_saturate_instead_of_wrapping() {
        assert_eq!(due(1_000, Duration::from_millis(500)), 1_500);
        assert_eq!(due(now_ms(), Duration::from_millis(u64::MAX)), u64::MAX);
        assert_eq!(due(now_ms(), Duration::MAX), u64::MAX);
    }

    #[test]
    fn a_message_counts_its_body_content_type_and_headers() {
        let message = NewMessage {
            body: vec![0; 10],
            content_type: Some("text/plain".into()),
            headers: vec![("a".into(), "bc".into())],
            ..NewMessage::default()
        };
        assert_eq!(message.size(), 10 + 10 + 3);
    }

    struct Nowhere;

    #[async_trait::async_trait]
    impl Backend for Nowhere {
        async fn enqueue(&self, _: &str, _: NewMessage) -> Result<Enqueued, QueueError> {
            Ok(Enqueued {
                id: "1".into(),
                duplicate: false,
            })
        }
        async fn lease(&self, _: &str, _: usize, _: Duration) -> Result<Vec<Delivery>, QueueError> {
            Ok(Vec::new())
        }
        async fn wait(&self, _: &str, _: Duration) {}
        async fn ack(&self, _: &Delivery) -> Result<(), QueueError> {
            Ok(())
        }
        async fn retry(&self, _: &Delivery, _: Duration) -> Result<(), QueueError> {
            Ok(())
        }
        async fn dead_letter(&self, _: &Delivery, _: &str) -> Result<(), QueueError> {
            Ok(())
        }
        async fn dead_letters(&self, _: &str) -> Result<Vec<DeadLetter>, QueueError> {
            Ok(Vec::new())
        }
        async fn dead_letter_count(&self, _: &str) -> Result<u64, QueueError> {
            Ok(0)
        }
        async fn replay(&self, _: &str, _: &[String]) -> Result<usize, QueueError> {
            Ok(0)
        }
        async fn depth(&self, _: &str) -> Result<u64, QueueError> {
            Ok(0)
        }
        async fn oldest_age(&self, _: &str) -> Result<Option<Duration>, QueueError> {
            Ok(None)
        }
        async fn bytes(&self, _: &str) -> Result<u64, QueueError> {
            Ok(0)
        }
    }

    #[tokio::test]
    async fn queues_refuse_delays_past_the_limit_and_bad_keys_before_the_backend() {
        let queues = Queues::with_backend(
            Arc::new(Nowhere),
            BTreeSet::from(["q".to_string()]),
            16,
            Duration::from_secs(60),
        );
        let delayed = |delay| NewMessage {
            delay,
            ..NewMessage::default()
        };
        assert!(
            queues
                .enqueue("q", delayed(Duration::from_secs(60)))
                .await
                .is_ok()
        );
        let refused = queues
            .enqueue("q", delayed(Duration::from_millis(u64::MAX)))
            .await
            .unwrap_err();
        assert_eq!(
            refused,
            QueueError::DelayTooLong {
                delay: Duration::from_millis(u64::MAX),
                limit: Duration::from_secs(60)
            }
        );
        assert!(
            refused
                .to_string()
                .ends_with("longer than the limit of 1m (`[queue] max_delay`)")
        );
        let keyed = |key: &str| NewMessage {
            key: Some(key.into()),
            ..NewMessage::default()
        };
        assert_eq!(
            queues.enqueue("q", keyed("")).await,
            Err(QueueError::InvalidKey(0))
        );
        assert_eq!(
            queues
                .enqueue("q", keyed(&"k".repeat(MAX_KEY_BYTES + 1)))
                .await,
            Err(QueueError::InvalidKey(MAX_KEY_BYTES + 1))
        );
        assert!(queues.enqueue("q", keyed("k")).await.is_ok());
    }
}
