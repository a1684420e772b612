//! `wasi:keyvalue` (`store`, `atomics`, `batch` at `0.2.0-draft`, the
//! version wasmtime 48 implements) on a durable store: a 12-factor process
//! keeps its state in a backing service, never in an instance.
//!
//! # Where values live
//!
//! The store follows the formation's `[queue]` backend: the embedded
//! backend keeps buckets in a redb database beside the queue's
//! (`kv.redb`), durable once a write has returned, even across `kill -9`;
//! the Redis backend keeps each bucket in a hash (`wasmproc:kv:BUCKET`),
//! shared by every host on that server, with `increment` atomic across
//! them (`HINCRBY`).
//!
//! # Invariants
//!
//! - a guest opens only the buckets its process type lists in `keyvalue`;
//!   any other name is `access-denied`, and the log says so (rate-limited);
//! - keys are at most [`MAX_KEY_BYTES`], values at most `[keyvalue]
//!   max_value`, and a bucket holds at most `[keyvalue] max_bucket_bytes`
//!   of keys and values together; a write beyond fails with `other(…)`
//!   naming the bound, and nothing is written;
//! - `increment` reads and writes the value as a decimal `u64` (so `get`
//!   of a counter returns its digits), and fails on a value that is not
//!   one, or on overflow;
//! - `list-keys` pages at most [`LIST_PAGE`] keys, with a cursor;
//! - a backend failure reaches the guest as `other("the key-value store is
//!   unavailable")`; the host's own error text stays in the host's log.

mod embedded;
pub(crate) mod host;
mod redis;

use std::sync::Arc;

pub use embedded::Embedded;
pub use redis::Redis;

use crate::formation::{Formation, KeyValueSettings, QueueBackend};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Most keys one `list-keys` call returns.
pub const LIST_PAGE: usize = 1000;

/// Why a key-value operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The bucket is not granted to the caller (or does not exist).
    #[error("bucket `{0}` is not granted to this process type")]
    AccessDenied(String),
    /// A key or value is over its bound.
    #[error("{what} is {size} bytes: expected at most {limit}")]
    TooLarge {
        /// `the key` or `the value`.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The bound.
        limit: u64,
    },
    /// The bucket would hold more than `max_bucket_bytes`.
    #[error("bucket `{bucket}` would hold {wanted} bytes: expected at most {limit}")]
    BucketFull {
        /// The bucket.
        bucket: String,
        /// What it would hold after the write.
        wanted: u64,
        /// The bound.
        limit: u64,
    },
    /// `increment` found a value that is not a decimal `u64`.
    #[error("the value of `{0}` is not a decimal u64")]
    NotANumber(String),
    /// `increment` would overflow a `u64`.
    #[error("incrementing `{0}` would overflow")]
    Overflow(String),
    /// The backend failed.
    #[error("key-value store unavailable: {0}")]
    Unavailable(String),
}

/// A store of buckets of key-value pairs: redb or Redis. Bounds on sizes
/// are checked by [`KeyValue`] before a backend sees a write; the bucket
/// byte bound is the backend's to keep, atomically with the write.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// The value of `key`.
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Sets `key` to `value`, unless the bucket would then hold more than
    /// `max_bytes` of keys and values.
    async fn set(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        max_bytes: u64,
    ) -> Result<(), KvError>;
    /// Removes `key` (no error if absent).
    async fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError>;
    /// Whether `key` exists.
    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvError>;
    /// Up to [`LIST_PAGE`] keys from `cursor` on, and the cursor of the
    /// next page if there is one.
    async fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvError>;
    /// Adds `delta` to the decimal `u64` at `key` (0 if absent); returns
    /// the new value. Atomic.
    async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: u64,
        max_bytes: u64,
    ) -> Result<u64, KvError>;
}

/// The formation's key-value store: a backend and its bounds.
#[derive(Clone)]
pub struct KeyValue {
    backend: Arc<dyn Backend>,
    settings: KeyValueSettings,
}

impl KeyValue {
    /// Opens the store the formation's `[queue]` backend names.
    pub async fn open(formation: &Formation) -> anyhow::Result<KeyValue> {
        let backend: Arc<dyn Backend> = match &formation.queue.backend {
            QueueBackend::Embedded { path } => Arc::new(Embedded::open(path)?),
            QueueBackend::Redis { url } => Arc::new(Redis::connect(url).await?),
        };
        Ok(KeyValue {
            backend,
            settings: formation.keyvalue.clone(),
        })
    }

    /// Whether any process type of `formation` uses the store.
    pub fn needed(formation: &Formation) -> bool {
        formation.processes.iter().any(|p| !p.keyvalue.is_empty())
    }

    /// The largest value accepted, in bytes.
    pub fn max_value(&self) -> u64 {
        self.settings.max_value
    }

    fn check_key(key: &str) -> Result<(), KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::TooLarge {
                what: "the key",
                size: key.len(),
                limit: MAX_KEY_BYTES as u64,
            });
        }
        Ok(())
    }

    /// The value of `key` in `bucket`.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Self::check_key(key)?;
        self.backend.get(bucket, key).await
    }

    /// Sets `key` in `bucket` to `value`, within the bounds.
    pub async fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        Self::check_key(key)?;
        if value.len() as u64 > self.settings.max_value {
            return Err(KvError::TooLarge {
                what: "the value",
                size: value.len(),
                limit: self.settings.max_value,
            });
        }
        self.backend
            .set(bucket, key, value, self.settings.max_bucket_bytes)
            .await
    }

    /// Removes `key` from `bucket`.
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        Self::check_key(key)?;
        self.backend.delete(bucket, key).await
    }

    /// Whether `key` exists in `bucket`.
    pub async fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvError> {
        Self::check_key(key)?;
        self.backend.exists(bucket, key).await
    }

    /// A page of `bucket`'s keys.
    pub async fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        self.backend.list(bucket, cursor).await
    }

    /// Adds `delta` to the counter at `key`.
    pub async fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, KvError> {
        Self::check_key(key)?;
        self.backend
            .increment(bucket, key, delta, self.settings.max_bucket_bytes)
            .await
    }
}

/// `increment`'s arithmetic on a stored value: the decimal `u64` in
/// `value` (0 when absent) plus `delta`.
pub(crate) fn incremented(key: &str, value: Option<&[u8]>, delta: u64) -> Result<u64, KvError> {
    let current = match value {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| KvError::NotANumber(key.to_string()))?,
    };
    current
        .checked_add(delta)
        .ok_or_else(|| KvError::Overflow(key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increment_reads_decimal_and_refuses_the_rest() {
        assert_eq!(incremented("k", None, 5), Ok(5));
        assert_eq!(incremented("k", Some(b"41"), 1), Ok(42));
        assert_eq!(
            incremented("k", Some(b"forty"), 1),
            Err(KvError::NotANumber("k".into()))
        );
        assert_eq!(
            incremented("k", Some(b"18446744073709551615"), 1),
            Err(KvError::Overflow("k".into()))
        );
    }
}
