//! The embedded queue: a [redb](https://docs.rs/redb) database in the
//! formation's data folder. No server; survives `kill -9`.
//!
//! Why redb: a pure-Rust, ACID, copy-on-write B-tree store with explicit
//! durability per commit; no hand-made file format, no C library.
//!
//! # Layout
//! - `messages`: `(queue, seq)` → the message (postcard);
//! - `ready`: `(queue, due_ms, seq)` → deliveries so far. A message is
//!   deliverable once `due_ms` has passed. Leasing moves its entry to
//!   `now + visibility`, so a lease that is never settled (the host died)
//!   simply comes due again — that is the whole crash-recovery story;
//! - `dead`: `(queue, seq)` → the dead letter (postcard);
//! - `meta`: `"seq"` → the last sequence number used.
//!
//! # Group commit
//! One writer thread owns the database. Callers send commands over a
//! channel; the thread takes every command waiting (up to
//! [`MAX_BATCH`]), applies them in one write transaction, commits once and
//! then answers each caller. A batch that holds an `enqueue` (or a
//! dead-letter move or replay) commits with `Durability::Immediate` (fsync)
//! before anyone hears `Ok`; batches of leases, acks and retries commit
//! without fsync — if those are lost in a crash, messages are delivered
//! again, which at-least-once allows.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use super::{Backend, DeadLetter, Delivery, NewMessage, QueueError, ms, now_ms};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const READY: TableDefinition<(&str, u64, u64), u32> = TableDefinition::new("ready");
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most commands applied in one transaction.
pub const MAX_BATCH: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Stored {
    body: Vec<u8>,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct StoredDead {
    attempts: u32,
    reason: String,
    failed_at_ms: u64,
    message: Stored,
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

/// Answers a caller once its batch's fate (`Some(error)`: aborted) is known.
type Answer = Box<dyn FnOnce(Option<&QueueError>)>;

enum Command {
    Enqueue(String, NewMessage, Reply<String>),
    Lease(String, usize, Duration, Reply<Vec<Delivery>>),
    Ack(Delivery, Reply<()>),
    Retry(Delivery, Duration, Reply<()>),
    DeadLetter(Delivery, String, Reply<()>),
    Replay(String, Vec<String>, Reply<usize>),
}

impl Command {
    fn needs_fsync(&self) -> bool {
        matches!(
            self,
            Command::Enqueue(..) | Command::DeadLetter(..) | Command::Replay(..)
        )
    }
}

/// The embedded backend.
pub struct Embedded {
    db: Arc<Database>,
    commands: std::sync::mpsc::Sender<Command>,
    notify: Mutex<HashMap<String, Arc<Notify>>>,
}

fn storage(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

impl Embedded {
    /// Opens (or creates) the queue database in folder `path`.
    pub fn open(path: &Path) -> anyhow::Result<Embedded> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create the queue folder `{}`", path.display()))?;
        let file = path.join("queue.redb");
        let db = Database::create(&file)
            .with_context(|| format!("cannot open the queue database `{}`", file.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(MESSAGES)?;
        txn.open_table(READY)?;
        txn.open_table(DEAD)?;
        txn.open_table(META)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (commands, receiver) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("wasmproc-queue".into())
            .spawn(move || writer(&writer_db, &receiver))
            .context("cannot start the queue writer thread")?;
        Ok(Embedded {
            db,
            commands,
            notify: Mutex::new(HashMap::new()),
        })
    }

    fn notifier(&self, queue: &str) -> Arc<Notify> {
        let mut map = self.notify.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(queue.to_string()).or_default().clone()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .map_err(|_| QueueError::Unavailable("the queue writer stopped".into()))?;
        answer
            .await
            .map_err(|_| QueueError::Unavailable("the queue writer stopped".into()))?
    }
}

#[async_trait::async_trait]
impl Backend for Embedded {
    async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<String, QueueError> {
        let ready_now = message.delay.is_zero();
        let id = self
            .call(|r| Command::Enqueue(queue.to_string(), message, r))
            .await?;
        if ready_now {
            self.notifier(queue).notify_one();
        }
        Ok(id)
    }

    async fn lease(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.call(|r| Command::Lease(queue.to_string(), max, visibility, r))
            .await
    }

    async fn wait(&self, queue: &str, timeout: Duration) {
        let notify = self.notifier(queue);
        let _ = tokio::time::timeout(timeout, notify.notified()).await;
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.call(|r| Command::Ack(delivery.clone(), r)).await
    }

    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<(), QueueError> {
        self.call(|r| Command::Retry(delivery.clone(), delay, r))
            .await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.call(|r| Command::DeadLetter(delivery.clone(), reason.to_string(), r))
            .await
    }

    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(DEAD).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table
            .range((queue, 0)..=(queue, u64::MAX))
            .map_err(storage)?
        {
            let (key, value) = entry.map_err(storage)?;
            let dead: StoredDead = postcard::from_bytes(value.value()).map_err(storage)?;
            out.push(DeadLetter {
                id: key.value().1.to_string(),
                attempts: dead.attempts,
                reason: dead.reason,
                failed_at_ms: dead.failed_at_ms,
                body: dead.message.body,
                content_type: dead.message.content_type,
            });
        }
        Ok(out)
    }

    async fn replay(&self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        let n = self
            .call(|r| Command::Replay(queue.to_string(), ids.to_vec(), r))
            .await?;
        if n > 0 {
            self.notifier(queue).notify_one();
        }
        Ok(n)
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(READY).map_err(storage)?;
        let range = table
            .range((queue, 0, 0)..=(queue, u64::MAX, u64::MAX))
            .map_err(storage)?;
        Ok(range.count() as u64)
    }

    async fn oldest_age(&self, queue: &str) -> Result<Option<Duration>, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(READY).map_err(storage)?;
        let now = now_ms();
        let first = table
            .range((queue, 0, 0)..=(queue, now, u64::MAX))
            .map_err(storage)?
            .next()
            .transpose()
            .map_err(storage)?;
        Ok(first.map(|(key, _)| Duration::from_millis(now.saturating_sub(key.value().1))))
    }
}

/// The writer thread: batches commands into transactions until every
/// sender is gone.
fn writer(db: &Database, receiver: &std::sync::mpsc::Receiver<Command>) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(Command::needs_fsync);
        let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), QueueError> {
            let mut txn = db.begin_write().map_err(storage)?;
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(storage)?;
            {
                let mut tables = Tables {
                    messages: txn.open_table(MESSAGES).map_err(storage)?,
                    ready: txn.open_table(READY).map_err(storage)?,
                    dead: txn.open_table(DEAD).map_err(storage)?,
                    meta: txn.open_table(META).map_err(storage)?,
                };
                for command in batch {
                    answers.push(apply(&mut tables, command)?);
                }
            }
            txn.commit().map_err(storage)
        })();
        if let Err(e) = &result {
            tracing::error!("queue transaction failed: {e}");
        }
        for answer in answers {
            answer(result.as_ref().err());
        }
    }
}

/// The tables of one write transaction, opened once per batch.
struct Tables<'txn> {
    messages: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    ready: redb::Table<'txn, (&'static str, u64, u64), u32>,
    dead: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    meta: redb::Table<'txn, &'static str, u64>,
}

/// Applies one command to the batch's tables; returns how to answer its
/// caller once the transaction's fate is known. A storage error aborts the
/// batch.
fn apply(tables: &mut Tables<'_>, command: Command) -> Result<Answer, QueueError> {
    fn answer<T: Send + 'static>(reply: Reply<T>, value: Result<T, QueueError>) -> Answer {
        Box::new(move |failed: Option<&QueueError>| {
            let _ = reply.send(match failed {
                Some(e) => Err(e.clone()),
                None => value,
            });
        })
    }
    let Tables {
        messages,
        ready,
        dead,
        meta,
    } = tables;
    let now = now_ms();
    Ok(match command {
        Command::Enqueue(queue, message, reply) => {
            let seq = meta.get("seq").map_err(storage)?.map_or(0, |v| v.value()) + 1;
            meta.insert("seq", seq).map_err(storage)?;
            let stored = Stored {
                body: message.body,
                content_type: message.content_type,
                headers: message.headers,
            };
            let bytes = postcard::to_stdvec(&stored).map_err(storage)?;
            messages
                .insert((queue.as_str(), seq), bytes.as_slice())
                .map_err(storage)?;
            ready
                .insert((queue.as_str(), now + ms(message.delay), seq), 0)
                .map_err(storage)?;
            answer(reply, Ok(seq.to_string()))
        }
        Command::Lease(queue, max, visibility, reply) => {
            let mut due = Vec::new();
            for entry in ready
                .range((queue.as_str(), 0, 0)..=(queue.as_str(), now, u64::MAX))
                .map_err(storage)?
            {
                let (key, value) = entry.map_err(storage)?;
                let (_, at, seq) = key.value();
                due.push((at, seq, value.value()));
                if due.len() >= max {
                    break;
                }
            }
            let until = now + ms(visibility);
            let mut leased = Vec::new();
            for (at, seq, deliveries) in due {
                ready.remove((queue.as_str(), at, seq)).map_err(storage)?;
                let Some(bytes) = messages.get((queue.as_str(), seq)).map_err(storage)? else {
                    continue; // settled by an earlier lease-holder
                };
                let stored: Stored = postcard::from_bytes(bytes.value()).map_err(storage)?;
                drop(bytes);
                ready
                    .insert((queue.as_str(), until, seq), deliveries + 1)
                    .map_err(storage)?;
                leased.push(Delivery {
                    queue: queue.clone(),
                    id: seq.to_string(),
                    attempt: deliveries + 1,
                    body: stored.body,
                    content_type: stored.content_type,
                    headers: stored.headers,
                    lease: until.to_string(),
                });
            }
            answer(reply, Ok(leased))
        }
        Command::Ack(delivery, reply) => {
            let (seq, until) = keys(&delivery)?;
            ready
                .remove((delivery.queue.as_str(), until, seq))
                .map_err(storage)?;
            messages
                .remove((delivery.queue.as_str(), seq))
                .map_err(storage)?;
            answer(reply, Ok(()))
        }
        Command::Retry(delivery, delay, reply) => {
            let (seq, until) = keys(&delivery)?;
            let q = delivery.queue.as_str();
            let removed = ready
                .remove((q, until, seq))
                .map_err(storage)?
                .map(|d| d.value());
            if let Some(deliveries) = removed {
                ready
                    .insert((q, now + ms(delay), seq), deliveries)
                    .map_err(storage)?;
            }
            answer(reply, Ok(()))
        }
        Command::DeadLetter(delivery, reason, reply) => {
            let (seq, until) = keys(&delivery)?;
            let q = delivery.queue.as_str();
            ready.remove((q, until, seq)).map_err(storage)?;
            if let Some(bytes) = messages.remove((q, seq)).map_err(storage)? {
                let message: Stored = postcard::from_bytes(bytes.value()).map_err(storage)?;
                drop(bytes);
                let letter = StoredDead {
                    attempts: delivery.attempt,
                    reason,
                    failed_at_ms: now,
                    message,
                };
                let bytes = postcard::to_stdvec(&letter).map_err(storage)?;
                dead.insert((q, seq), bytes.as_slice()).map_err(storage)?;
            }
            answer(reply, Ok(()))
        }
        Command::Replay(queue, ids, reply) => {
            let q = queue.as_str();
            let mut chosen = Vec::new();
            for entry in dead.range((q, 0)..=(q, u64::MAX)).map_err(storage)? {
                let (key, _) = entry.map_err(storage)?;
                let seq = key.value().1;
                if ids.is_empty() || ids.iter().any(|id| *id == seq.to_string()) {
                    chosen.push(seq);
                }
            }
            for seq in &chosen {
                if let Some(bytes) = dead.remove((q, *seq)).map_err(storage)? {
                    let letter: StoredDead =
                        postcard::from_bytes(bytes.value()).map_err(storage)?;
                    drop(bytes);
                    let message = postcard::to_stdvec(&letter.message).map_err(storage)?;
                    messages
                        .insert((q, *seq), message.as_slice())
                        .map_err(storage)?;
                    ready.insert((q, now, *seq), 0).map_err(storage)?;
                }
            }
            answer(reply, Ok(chosen.len()))
        }
    })
}

fn keys(delivery: &Delivery) -> Result<(u64, u64), QueueError> {
    let bad = || QueueError::Unavailable(format!("malformed delivery `{}`", delivery.id));
    let seq = delivery.id.parse().map_err(|_| bad())?;
    let until = delivery.lease.parse().map_err(|_| bad())?;
    Ok((seq, until))
}
