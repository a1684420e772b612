//! The embedded key-value store: a redb database (`kv.redb`) in the
//! formation's queue folder.
//!
//! Layout: `entries`: `(bucket, key)` → value; `sizes`: `bucket` → bytes of
//! its keys and values.
//!
//! # Group commit
//!
//! One writer thread owns every write. Callers send it a write over a
//! channel; it takes every write waiting (up to [`MAX_BATCH`]), applies them
//! in order in one transaction — each one checked against its bucket's
//! bound as the batch has left it — commits once with
//! `Durability::Immediate` (fsync), and only then answers each caller. So a
//! value survives `kill -9` once its write returned, and 64 concurrent
//! writers cost one fsync, not 64. Reads are read transactions (MVCC: they
//! never wait for the writer) on tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::oneshot;

use super::{Backend, KvError, LIST_PAGE, incremented};

const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
const SIZES: TableDefinition<&str, u64> = TableDefinition::new("sizes");

/// Most writes committed together.
pub const MAX_BATCH: usize = 1024;

/// The redb key-value store.
pub struct Embedded {
    db: Arc<Database>,
    writes: std::sync::mpsc::Sender<Write>,
}

/// What a write does to its key.
enum Change {
    Set(Vec<u8>),
    Delete,
    Increment(u64),
}

/// One write, and where its answer goes: for an increment, the new value.
struct Write {
    bucket: String,
    key: String,
    change: Change,
    max_bytes: u64,
    reply: oneshot::Sender<Result<u64, KvError>>,
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
        let db = Arc::new(db);
        let (writes, queue) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("wasmproc-kv".into())
            .spawn(move || writer(&writer_db, &queue))
            .context("cannot start the key-value writer thread")?;
        Ok(Embedded { db, writes })
    }

    /// Runs a read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, KvError> + Send + 'static,
    ) -> Result<T, KvError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(unavailable)?
    }

    /// Sends a write to the writer; its answer once committed.
    async fn write(
        &self,
        bucket: &str,
        key: &str,
        change: Change,
        max_bytes: u64,
    ) -> Result<u64, KvError> {
        let (reply, answer) = oneshot::channel();
        let write = Write {
            bucket: bucket.to_string(),
            key: key.to_string(),
            change,
            max_bytes,
            reply,
        };
        self.writes
            .send(write)
            .map_err(|_| KvError::Unavailable("the key-value writer stopped".into()))?;
        answer
            .await
            .map_err(|_| KvError::Unavailable("the key-value writer stopped".into()))?
    }
}

/// The writer thread: batches of writes, one commit each, until every
/// sender is gone.
fn writer(db: &Database, queue: &std::sync::mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        match commit(db, &batch) {
            Ok(results) => {
                for (write, result) in batch.into_iter().zip(results) {
                    let _ = write.reply.send(result);
                }
            }
            Err(e) => {
                for write in batch {
                    let _ = write.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies `batch` in order in one transaction and commits it; returns
/// each write's own result (a write refused by its bound changes nothing).
fn commit(db: &Database, batch: &[Write]) -> Result<Vec<Result<u64, KvError>>, KvError> {
    let mut txn = db.begin_write().map_err(unavailable)?;
    txn.set_durability(Durability::Immediate)
        .map_err(unavailable)?;
    let results = batch.iter().map(|write| apply(&txn, write)).collect();
    txn.commit().map_err(unavailable)?;
    Ok(results)
}

/// One write inside `txn`, keeping its bucket's size within its bound.
fn apply(txn: &WriteTransaction, write: &Write) -> Result<u64, KvError> {
    let (bucket, key) = (write.bucket.as_str(), write.key.as_str());
    let mut entries = txn.open_table(ENTRIES).map_err(unavailable)?;
    let mut sizes = txn.open_table(SIZES).map_err(unavailable)?;
    let old = entries
        .get((bucket, key))
        .map_err(unavailable)?
        .map(|v| v.value().to_vec());
    let (new, answer) = match &write.change {
        Change::Set(value) => (Some(value.clone()), 0),
        Change::Delete => (None, 0),
        Change::Increment(delta) => {
            let n = incremented(key, old.as_deref(), *delta)?;
            (Some(n.to_string().into_bytes()), n)
        }
    };
    let size = sizes
        .get(bucket)
        .map_err(unavailable)?
        .map_or(0, |v| v.value());
    let entry =
        |value: &Option<Vec<u8>>| value.as_ref().map_or(0, |v| (key.len() + v.len()) as u64);
    let wanted = size.saturating_sub(entry(&old)) + entry(&new);
    if wanted > size && wanted > write.max_bytes {
        return Err(KvError::BucketFull {
            bucket: bucket.to_string(),
            wanted,
            limit: write.max_bytes,
        });
    }
    match &new {
        Some(value) => {
            entries
                .insert((bucket, key), value.as_slice())
                .map_err(unavailable)?;
        }
        None => {
            entries.remove((bucket, key)).map_err(unavailable)?;
        }
    }
    sizes.insert(bucket, wanted).map_err(unavailable)?;
    Ok(answer)
}

#[async_trait::async_trait]
impl Backend for Embedded {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.read(move |db| {
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
        self.write(bucket, key, Change::Set(value.to_vec()), max_bytes)
            .await
            .map(drop)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        self.write(bucket, key, Change::Delete, u64::MAX)
            .await
            .map(drop)
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
        self.read(move |db| {
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
        self.write(bucket, key, Change::Increment(delta), max_bytes)
            .await
    }
}
