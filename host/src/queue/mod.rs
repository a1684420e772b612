//! Queues: durable, at-least-once delivery of messages to worker instances.
//!
//! # Contract of a [`Backend`]
//!
//! - `enqueue` returns `Ok` only once the message is durable: it will be
//!   delivered after a crash of the host (for the embedded backend, even
//!   `kill -9`; for Redis, as durable as the server is configured).
//! - `lease` hands a ready message to one consumer for `visibility`; until
//!   the lease is settled (`ack`, `retry`, `dead_letter`) or expires, no other
//!   consumer gets it. An expired lease (its host died) makes the message
//!   ready again, with its attempt counted.
//! - `attempt` is 1 on the first delivery and grows by one per delivery.
//! - Settling a lease that already expired is harmless: at-least-once means
//!   a message may be handled twice, never that it is lost.
//!
//! Which messages a guest may enqueue, and how large, is checked by
//! [`Queues`] before a backend sees them. The worker loop (in
//! [`crate::worker`]) talks to `dyn Backend` and never knows which one.

mod embedded;
mod redis;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use embedded::Embedded;
pub use redis::Redis;

use crate::formation::{Formation, QueueBackend};

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
}

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
    /// The backend failed.
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
}

/// A queue store: the embedded one or Redis Streams.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Durably adds `message` to `queue`; returns its id.
    async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<String, QueueError>;
    /// Leases up to `max` ready messages of `queue` for `visibility`.
    async fn lease(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;
    /// Waits until `queue` may have a ready message, or `timeout` passes.
    async fn wait(&self, queue: &str, timeout: Duration);
    /// Settles a lease: done.
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError>;
    /// Settles a lease: deliver again after `delay`.
    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<(), QueueError>;
    /// Settles a lease: move to the dead-letter queue with `reason`.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError>;
    /// The dead letters of `queue`, oldest first.
    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, QueueError>;
    /// Moves dead letters of `queue` back to it, as new first attempts: the
    /// ones named in `ids`, or all when `ids` is empty. Returns how many.
    async fn replay(&self, queue: &str, ids: &[String]) -> Result<usize, QueueError>;
    /// Messages waiting or in flight in `queue`.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;
    /// How long the oldest deliverable message of `queue` has waited.
    async fn oldest_age(&self, queue: &str) -> Result<Option<Duration>, QueueError>;
}

/// The formation's queues: a backend, which queues exist, how large a
/// message may be.
#[derive(Clone)]
pub struct Queues {
    backend: Arc<dyn Backend>,
    known: Arc<BTreeSet<String>>,
    max_message: u64,
}

impl Queues {
    /// Opens the backend the formation names.
    pub async fn open(formation: &Formation) -> anyhow::Result<Queues> {
        let backend: Arc<dyn Backend> = match &formation.queue.backend {
            QueueBackend::Embedded { path } => Arc::new(Embedded::open(path)?),
            QueueBackend::Redis { url } => Arc::new(Redis::connect(url).await?),
        };
        let known = formation
            .processes
            .iter()
            .filter_map(|p| p.queue().map(String::from))
            .collect();
        Ok(Queues {
            backend,
            known: Arc::new(known),
            max_message: formation.queue.max_message,
        })
    }

    /// Queues over `backend` (for tests and benchmarks).
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        known: BTreeSet<String>,
        max_message: u64,
    ) -> Queues {
        Queues {
            backend,
            known: Arc::new(known),
            max_message,
        }
    }

    /// The largest message body accepted, in bytes.
    pub fn max_message(&self) -> u64 {
        self.max_message
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

    /// Enqueues after checking the queue exists and the size limit.
    pub async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<String, QueueError> {
        self.check_known(queue)?;
        let size = message.body.len() as u64;
        if size > self.max_message {
            return Err(QueueError::TooLarge {
                size,
                limit: self.max_message,
            });
        }
        self.backend.enqueue(queue, message).await
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
