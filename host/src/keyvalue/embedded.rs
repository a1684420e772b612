//! The embedded key-value store: a redb database (`kv.redb`) in the
//! formation's queue folder.
//!
//! Layout: `entries`: `(bucket, key)` → value; `sizes`: `bucket` → bytes of
//! its keys and values. Every write is one write transaction that updates
//! both and commits with `Durability::Immediate` (fsync) before the caller
//! hears `Ok`: a value survives `kill -9` once its write returned. Reads
//! are read transactions (MVCC: they never wait for a writer). Each
//! operation runs on tokio's blocking pool, so the disk never stalls an
//! async worker thread.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, KvError, LIST_PAGE, incremented};

const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
const SIZES: TableDefinition<&str, u64> = TableDefinition::new("sizes");

/// The redb key-value store.
pub struct Embedded {
    db: Arc<Database>,
}

fn unavailable(e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(e.to_string())
}

impl Embedded {
    /// Opens (or creates) `kv.redb` in the folder `path`.
    pub fn open(path: &Path) -> anyhow::Result<Embedded> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create the data folder `{}`", path.display()))?;
        let file = path.join("kv.redb");
        let db = Database::create(&file)
            .with_context(|| format!("cannot open the key-value database `{}`", file.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(SIZES)?;
        txn.commit()?;
        Ok(Embedded { db: Arc::new(db) })
    }

    /// Runs `op` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, KvError> + Send + 'static,
    ) -> Result<T, KvError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(unavailable)?
    }

    /// Writes `value` (or removes the key, for `None`) in one durable
    /// transaction that keeps the bucket's size within `max_bytes`; `make`
    /// computes the new value from the old.
    async fn write<T: Send + 'static>(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
        make: impl FnOnce(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T), KvError> + Send + 'static,
    ) -> Result<T, KvError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(unavailable)?;
            txn.set_durability(Durability::Immediate)
                .map_err(unavailable)?;
            let out = {
                let mut entries = txn.open_table(ENTRIES).map_err(unavailable)?;
                let mut sizes = txn.open_table(SIZES).map_err(unavailable)?;
                let old = entries
                    .get((bucket.as_str(), key.as_str()))
                    .map_err(unavailable)?
                    .map(|v| v.value().to_vec());
                let (new, out) = make(old.as_deref())?;
                let size = sizes
                    .get(bucket.as_str())
                    .map_err(unavailable)?
                    .map_or(0, |v| v.value());
                let entry = |value: &Option<Vec<u8>>| {
                    value.as_ref().map_or(0, |v| (key.len() + v.len()) as u64)
                };
                let wanted = size.saturating_sub(entry(&old)) + entry(&new);
                if wanted > size && wanted > max_bytes {
                    return Err(KvError::BucketFull {
                        bucket,
                        wanted,
                        limit: max_bytes,
                    });
                }
                match &new {
                    Some(value) => {
                        entries
                            .insert((bucket.as_str(), key.as_str()), value.as_slice())
                            .map_err(unavailable)?;
                    }
                    None => {
                        entries
                            .remove((bucket.as_str(), key.as_str()))
                            .map_err(unavailable)?;
                    }
                }
                sizes.insert(bucket.as_str(), wanted).map_err(unavailable)?;
                out
            };
            txn.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }
}

#[async_trait::async_trait]
impl Backend for Embedded {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let entries = txn.open_table(ENTRIES).map_err(unavailable)?;
            Ok(entries
                .get((bucket.as_str(), key.as_str()))
                .map_err(unavailable)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn set(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        max_bytes: u64,
    ) -> Result<(), KvError> {
        let value = value.to_vec();
        self.write(bucket, key, max_bytes, move |_| Ok((Some(value), ())))
            .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        self.write(bucket, key, u64::MAX, |_| Ok((None, ()))).await
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvError> {
        Ok(self.get(bucket, key).await?.is_some())
    }

    async fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        let bucket = bucket.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let entries = txn.open_table(ENTRIES).map_err(unavailable)?;
            // Keys are ordered within a bucket; the cursor counts the keys
            // already returned.
            let skip = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
            let mut keys = Vec::new();
            let range = entries
                .range((bucket.as_str(), "")..)
                .map_err(unavailable)?;
            let mut more = false;
            for entry in range.skip(skip) {
                let (k, _) = entry.map_err(unavailable)?;
                let (b, key) = k.value();
                if b != bucket {
                    break;
                }
                if keys.len() == LIST_PAGE {
                    more = true;
                    break;
                }
                keys.push(key.to_string());
            }
            let next = more.then(|| (skip + keys.len()) as u64);
            Ok((keys, next))
        })
        .await
    }

    async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: u64,
        max_bytes: u64,
    ) -> Result<u64, KvError> {
        let name = key.to_string();
        self.write(bucket, key, max_bytes, move |old| {
            let new = incremented(&name, old, delta)?;
            Ok((Some(new.to_string().into_bytes()), new))
        })
        .await
    }
}
