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
//!   `now + visibility`, with the delivery counted, so a lease that is never
//!   settled (the host died) simply comes due again — that is the whole
//!   crash-recovery story;
//! - `dead`: `(queue, seq)` → the dead letter (postcard);
//! - `bytes`: `queue` → the stored size of its messages (dead letters not
//!   counted), checked against `max_bytes` by every enqueue;
//! - `keys`: `(queue, idempotency key)` → `(seq, expires_ms)`, and
//!   `key-expiry`: `(expires_ms, queue, key)`, so expired keys are purged
//!   oldest first, a few with every enqueue;
//! - `meta`: `"seq"` → the last sequence number used.
//!
//! # Group commit and what a crash can cause
//! One writer thread owns the database. Callers send commands over a
//! channel; the thread takes every command waiting (up to [`MAX_BATCH`]),
//! applies them in one write transaction, commits once and then answers
//! each caller:
//! - a batch holding an enqueue, a lease, a dead-letter move or a replay
//!   commits with `Durability::Immediate` (fsync) before anyone hears of
//!   it: an accepted message survives `kill -9`, and so does the delivery a
//!   lease counted — a message redelivered after a crash says `attempt=2`;
//! - a batch of acks and retries only commits without fsync, and the writer
//!   makes it durable at most [`ACK_WINDOW`] later (with the next fsynced
//!   batch, or an empty fsynced commit of its own). So a crash redelivers
//!   at most the messages acknowledged in the last [`ACK_WINDOW`] (plus one
//!   fsync) before it; a retry lost that way comes back when its lease
//!   expires, counted;
//! - a batch that changed nothing (a lease that found no message) is
//!   aborted, so an idle worker costs no disk writes.
//!
//! Replays move dead letters in batches of [`REPLAY_BATCH`], each its own
//! command, so a replay of many never holds up the enqueues in between.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use super::{
    Backend, DeadLetter, Delivery, Enqueued, IDEMPOTENCY_WINDOW, NewMessage, QueueError, due,
    now_ms,
};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const READY: TableDefinition<(&str, u64, u64), u32> = TableDefinition::new("ready");
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BYTES: TableDefinition<&str, u64> = TableDefinition::new("bytes");
const KEYS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("keys");
const KEY_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("key-expiry");

/// Set in `meta` once `bytes` counts every message (databases written
/// before it existed are counted once, when opened).
const BYTES_COUNTED: &str = "bytes-counted";

/// Most commands applied in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Longest time an acknowledgement (or retry) stays committed without
/// fsync: what a crash may undo.
pub const ACK_WINDOW: Duration = Duration::from_millis(10);
/// Dead letters moved back per transaction by a replay.
pub const REPLAY_BATCH: usize = 256;
/// Expired idempotency keys purged per batch that enqueues.
const KEY_PURGE: usize = 64;
/// The database's page cache. redb's default (1 GiB) would let large
/// messages grow the host's memory by as much; the operating system's
/// page cache still holds what is read often.
const CACHE_BYTES: usize = 64 << 20;

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

/// Which dead letters one replay command moves.
enum Selection {
    /// The first [`REPLAY_BATCH`] whose sequence number is above this.
    After(u64),
    /// These (at most [`REPLAY_BATCH`]).
    Seqs(Vec<u64>),
}

/// What one replay command did.
struct Replayed {
    moved: usize,
    /// The highest sequence number looked at, if any: where the next
    /// [`Selection::After`] starts.
    last: Option<u64>,
    /// Stopped because the queue reached `max_bytes`.
    full: bool,
}

enum Command {
    Enqueue(String, NewMessage, Reply<Enqueued>),
    Lease(String, usize, Duration, Reply<Vec<Delivery>>),
    Ack(Delivery, Reply<()>),
    Retry(Delivery, Duration, Reply<()>),
    DeadLetter(Delivery, String, Reply<()>),
    Replay(String, Selection, Reply<Replayed>),
}

/// What a command asks of its batch's commit, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Effect {
    /// It changed nothing.
    Nothing,
    /// It changed something a crash may undo (at-least-once allows it):
    /// durable within [`ACK_WINDOW`].
    Lazy,
    /// Durable before anyone hears of it.
    Durable,
}

/// The embedded backend.
pub struct Embedded {
    db: Arc<Database>,
    commands: Sender<Command>,
    notify: Mutex<HashMap<String, Arc<Notify>>>,
}

fn storage(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

impl Embedded {
    /// Opens (or creates) the queue database in folder `path`, whose queues
    /// may each hold `max_bytes` of messages.
    pub fn open(path: &Path, max_bytes: u64) -> anyhow::Result<Embedded> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create the queue folder `{}`", path.display()))?;
        let file = path.join("queue.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&file)
            .with_context(|| format!("cannot open the queue database `{}`", file.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(MESSAGES)?;
        txn.open_table(READY)?;
        txn.open_table(DEAD)?;
        txn.open_table(KEYS)?;
        txn.open_table(KEY_EXPIRY)?;
        count_bytes(&txn)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (commands, receiver) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("wasmproc-queue".into())
            .spawn(move || writer(&writer_db, &receiver, max_bytes))
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

    /// When the earliest entry of `queue` comes due (ms since the epoch): a
    /// delayed or retried message, or a lease that expires.
    fn next_due(&self, queue: &str) -> Result<Option<u64>, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(READY).map_err(storage)?;
        let first = table
            .range((queue, 0, 0)..=(queue, u64::MAX, u64::MAX))
            .map_err(storage)?
            .next()
            .transpose()
            .map_err(storage)?;
        Ok(first.map(|(key, _)| key.value().1))
    }
}

/// Fills `bytes` from `messages` in a database written before `bytes`
/// existed; does nothing once done.
fn count_bytes(txn: &redb::WriteTransaction) -> anyhow::Result<()> {
    let mut meta = txn.open_table(META)?;
    let mut sizes = txn.open_table(BYTES)?;
    if meta.get(BYTES_COUNTED)?.is_some() {
        return Ok(());
    }
    let messages = txn.open_table(MESSAGES)?;
    let mut counted: HashMap<String, u64> = HashMap::new();
    for entry in messages.iter()? {
        let (key, value) = entry?;
        *counted.entry(key.value().0.to_string()).or_default() += value.value().len() as u64;
    }
    for (queue, bytes) in counted {
        sizes.insert(queue.as_str(), bytes)?;
    }
    meta.insert(BYTES_COUNTED, 1)?;
    Ok(())
}

#[async_trait::async_trait]
impl Backend for Embedded {
    async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<Enqueued, QueueError> {
        let ready_now = message.delay.is_zero();
        let enqueued = self
            .call(|r| Command::Enqueue(queue.to_string(), message, r))
            .await?;
        if ready_now && !enqueued.duplicate {
            self.notifier(queue).notify_one();
        }
        Ok(enqueued)
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
        // A due time of 12:00:00.000 is leasable from then on: wake 1 ms
        // after, so the lease that follows finds it.
        let timeout = match self.next_due(queue) {
            Ok(Some(at)) => timeout.min(Duration::from_millis(
                at.saturating_sub(now_ms()).saturating_add(1),
            )),
            Ok(None) | Err(_) => timeout,
        };
        let _ = tokio::time::timeout(timeout, notify.notified()).await;
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.call(|r| Command::Ack(delivery.clone(), r)).await
    }

    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<(), QueueError> {
        self.call(|r| Command::Retry(delivery.clone(), delay, r))
            .await?;
        // An idle consumer recomputes how long to wait: this message may
        // now be the first to come due.
        self.notifier(&delivery.queue).notify_one();
        Ok(())
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

    async fn dead_letter_count(&self, queue: &str) -> Result<u64, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(DEAD).map_err(storage)?;
        let range = table
            .range((queue, 0)..=(queue, u64::MAX))
            .map_err(storage)?;
        Ok(range.count() as u64)
    }

    async fn replay(&self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        let mut moved = 0;
        if ids.is_empty() {
            let mut after = 0;
            loop {
                let step = self
                    .call(|r| Command::Replay(queue.to_string(), Selection::After(after), r))
                    .await?;
                moved += step.moved;
                match step.last {
                    Some(last) if !step.full => after = last,
                    _ => break,
                }
            }
        } else {
            // Ids that are not sequence numbers name no dead letter here.
            let mut seqs: Vec<u64> = ids.iter().filter_map(|id| id.parse().ok()).collect();
            seqs.sort_unstable();
            seqs.dedup();
            for chunk in seqs.chunks(REPLAY_BATCH) {
                let step = self
                    .call(|r| {
                        Command::Replay(queue.to_string(), Selection::Seqs(chunk.to_vec()), r)
                    })
                    .await?;
                moved += step.moved;
                if step.full {
                    break;
                }
            }
        }
        if moved > 0 {
            self.notifier(queue).notify_one();
        }
        Ok(moved)
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

    async fn bytes(&self, queue: &str) -> Result<u64, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(BYTES).map_err(storage)?;
        Ok(table.get(queue).map_err(storage)?.map_or(0, |v| v.value()))
    }
}

/// The writer thread: batches commands into transactions until every
/// sender is gone, and makes lazy commits durable within [`ACK_WINDOW`].
fn writer(db: &Database, receiver: &Receiver<Command>, max_bytes: u64) {
    // When the oldest commit not yet fsynced was made.
    let mut unsynced: Option<Instant> = None;
    loop {
        let first = match unsynced {
            None => match receiver.recv() {
                Ok(command) => command,
                Err(_) => return,
            },
            Some(since) => {
                match receiver.recv_timeout(ACK_WINDOW.saturating_sub(since.elapsed())) {
                    Ok(command) => command,
                    Err(RecvTimeoutError::Timeout) => {
                        if sync(db) {
                            unsynced = None;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        sync(db);
                        return;
                    }
                }
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let window_over = unsynced.is_some_and(|since| since.elapsed() >= ACK_WINDOW);
        let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
        let result = (|| -> Result<Effect, QueueError> {
            let mut txn = db.begin_write().map_err(storage)?;
            let mut effect = Effect::Nothing;
            {
                let mut tables = Tables {
                    messages: txn.open_table(MESSAGES).map_err(storage)?,
                    ready: txn.open_table(READY).map_err(storage)?,
                    dead: txn.open_table(DEAD).map_err(storage)?,
                    meta: txn.open_table(META).map_err(storage)?,
                    bytes: txn.open_table(BYTES).map_err(storage)?,
                    keys: txn.open_table(KEYS).map_err(storage)?,
                    key_expiry: txn.open_table(KEY_EXPIRY).map_err(storage)?,
                    max_bytes,
                    now: now_ms(),
                };
                let mut enqueued = false;
                for command in batch {
                    enqueued |= matches!(command, Command::Enqueue(..));
                    let (answer, this) = apply(&mut tables, command)?;
                    answers.push(answer);
                    effect = effect.max(this);
                }
                if enqueued && purge_keys(&mut tables)? {
                    effect = effect.max(Effect::Lazy);
                }
            }
            // Past the window, even a batch that changed nothing commits
            // with fsync: a steady stream of idle leases must not put off
            // making earlier acknowledgements durable.
            if effect == Effect::Nothing && !window_over {
                txn.abort().map_err(storage)?;
                return Ok(effect);
            }
            let durable = effect == Effect::Durable || window_over;
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(storage)?;
            txn.commit().map_err(storage)?;
            Ok(if durable { Effect::Durable } else { effect })
        })();
        match &result {
            Ok(Effect::Durable) => unsynced = None,
            Ok(Effect::Lazy) => {
                unsynced.get_or_insert_with(Instant::now);
            }
            Ok(Effect::Nothing) => {}
            Err(e) => tracing::error!("queue transaction failed: {e}"),
        }
        let failed = result.err();
        for answer in answers {
            answer(failed.as_ref());
        }
    }
}

/// Makes every commit so far durable with an empty fsynced commit; false
/// (and a log line) if that failed.
fn sync(db: &Database) -> bool {
    let synced = (|| -> Result<(), String> {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())
    })();
    match synced {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("cannot make queue acknowledgements durable: {e}");
            false
        }
    }
}

/// The tables of one write transaction, opened once per batch, and what
/// every command of the batch shares.
struct Tables<'txn> {
    messages: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    ready: redb::Table<'txn, (&'static str, u64, u64), u32>,
    dead: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    meta: redb::Table<'txn, &'static str, u64>,
    bytes: redb::Table<'txn, &'static str, u64>,
    keys: redb::Table<'txn, (&'static str, &'static str), (u64, u64)>,
    key_expiry: redb::Table<'txn, (u64, &'static str, &'static str), ()>,
    max_bytes: u64,
    now: u64,
}

impl Tables<'_> {
    fn used(&self, queue: &str) -> Result<u64, QueueError> {
        Ok(self
            .bytes
            .get(queue)
            .map_err(storage)?
            .map_or(0, |v| v.value()))
    }

    /// Adds `added` bytes to `queue`'s count and takes `removed` away.
    fn count(&mut self, queue: &str, added: u64, removed: u64) -> Result<(), QueueError> {
        let used = self.used(queue)?;
        let now = used.saturating_add(added).saturating_sub(removed);
        self.bytes.insert(queue, now).map_err(storage)?;
        Ok(())
    }

    /// Removes message `seq` of `queue`; returns it, stored, if it was there.
    fn take_message(&mut self, queue: &str, seq: u64) -> Result<Option<Vec<u8>>, QueueError> {
        let taken = self
            .messages
            .remove((queue, seq))
            .map_err(storage)?
            .map(|bytes| bytes.value().to_vec());
        if let Some(bytes) = &taken {
            self.count(queue, 0, bytes.len() as u64)?;
        }
        Ok(taken)
    }
}

/// Applies one command to the batch's tables; returns how to answer its
/// caller once the transaction's fate is known, and what it asks of the
/// commit. A storage error aborts the batch.
fn apply(tables: &mut Tables<'_>, command: Command) -> Result<(Answer, Effect), QueueError> {
    fn answer<T: Send + 'static>(reply: Reply<T>, value: Result<T, QueueError>) -> Answer {
        Box::new(move |failed: Option<&QueueError>| {
            let _ = reply.send(match failed {
                Some(e) => Err(e.clone()),
                None => value,
            });
        })
    }
    let now = tables.now;
    Ok(match command {
        Command::Enqueue(queue, message, reply) => {
            let result = enqueue(tables, &queue, message)?;
            let effect = match &result {
                Ok(enqueued) if !enqueued.duplicate => Effect::Durable,
                Ok(_) | Err(_) => Effect::Nothing,
            };
            (answer(reply, result), effect)
        }
        Command::Lease(queue, max, visibility, reply) => {
            let q = queue.as_str();
            let mut due_now = Vec::new();
            for entry in tables
                .ready
                .range((q, 0, 0)..=(q, now, u64::MAX))
                .map_err(storage)?
            {
                let (key, value) = entry.map_err(storage)?;
                let (_, at, seq) = key.value();
                due_now.push((at, seq, value.value()));
                if due_now.len() >= max {
                    break;
                }
            }
            let effect = if due_now.is_empty() {
                Effect::Nothing
            } else {
                Effect::Durable
            };
            let until = due(now, visibility);
            let mut leased = Vec::new();
            for (at, seq, deliveries) in due_now {
                tables.ready.remove((q, at, seq)).map_err(storage)?;
                let Some(bytes) = tables.messages.get((q, seq)).map_err(storage)? else {
                    continue; // settled by an earlier lease-holder
                };
                let stored: Stored = postcard::from_bytes(bytes.value()).map_err(storage)?;
                drop(bytes);
                let attempt = deliveries.saturating_add(1);
                tables
                    .ready
                    .insert((q, until, seq), attempt)
                    .map_err(storage)?;
                leased.push(Delivery {
                    queue: queue.clone(),
                    id: seq.to_string(),
                    attempt,
                    body: stored.body,
                    content_type: stored.content_type,
                    headers: stored.headers,
                    lease: until.to_string(),
                });
            }
            (answer(reply, Ok(leased)), effect)
        }
        Command::Ack(delivery, reply) => {
            let (seq, until) = keys(&delivery)?;
            let q = delivery.queue.as_str();
            tables.ready.remove((q, until, seq)).map_err(storage)?;
            tables.take_message(q, seq)?;
            (answer(reply, Ok(())), Effect::Lazy)
        }
        Command::Retry(delivery, delay, reply) => {
            let (seq, until) = keys(&delivery)?;
            let q = delivery.queue.as_str();
            let removed = tables
                .ready
                .remove((q, until, seq))
                .map_err(storage)?
                .map(|d| d.value());
            if let Some(deliveries) = removed {
                tables
                    .ready
                    .insert((q, due(now, delay), seq), deliveries)
                    .map_err(storage)?;
            }
            (answer(reply, Ok(())), Effect::Lazy)
        }
        Command::DeadLetter(delivery, reason, reply) => {
            let (seq, until) = keys(&delivery)?;
            let q = delivery.queue.as_str();
            tables.ready.remove((q, until, seq)).map_err(storage)?;
            if let Some(bytes) = tables.take_message(q, seq)? {
                let message: Stored = postcard::from_bytes(&bytes).map_err(storage)?;
                let letter = StoredDead {
                    attempts: delivery.attempt,
                    reason,
                    failed_at_ms: now,
                    message,
                };
                let bytes = postcard::to_stdvec(&letter).map_err(storage)?;
                tables
                    .dead
                    .insert((q, seq), bytes.as_slice())
                    .map_err(storage)?;
            }
            (answer(reply, Ok(())), Effect::Durable)
        }
        Command::Replay(queue, selection, reply) => {
            let replayed = replay(tables, &queue, selection)?;
            let effect = if replayed.moved > 0 {
                Effect::Durable
            } else {
                Effect::Nothing
            };
            (answer(reply, Ok(replayed)), effect)
        }
    })
}

/// An enqueue: a duplicate of a live idempotency key answers with the
/// first message's id; a queue at `max_bytes` refuses.
fn enqueue(
    tables: &mut Tables<'_>,
    queue: &str,
    message: NewMessage,
) -> Result<Result<Enqueued, QueueError>, QueueError> {
    let now = tables.now;
    if let Some(key) = &message.key
        && let Some(entry) = tables.keys.get((queue, key.as_str())).map_err(storage)?
    {
        let (seq, expires) = entry.value();
        if expires > now {
            return Ok(Ok(Enqueued {
                id: seq.to_string(),
                duplicate: true,
            }));
        }
    }
    let stored = Stored {
        body: message.body,
        content_type: message.content_type,
        headers: message.headers,
    };
    let bytes = postcard::to_stdvec(&stored).map_err(storage)?;
    let size = bytes.len() as u64;
    if tables.used(queue)?.saturating_add(size) > tables.max_bytes {
        return Ok(Err(QueueError::Full {
            queue: queue.to_string(),
            limit: tables.max_bytes,
        }));
    }
    let seq = tables
        .meta
        .get("seq")
        .map_err(storage)?
        .map_or(0, |v| v.value())
        + 1;
    tables.meta.insert("seq", seq).map_err(storage)?;
    tables
        .messages
        .insert((queue, seq), bytes.as_slice())
        .map_err(storage)?;
    tables
        .ready
        .insert((queue, due(now, message.delay), seq), 0)
        .map_err(storage)?;
    tables.count(queue, size, 0)?;
    if let Some(key) = &message.key {
        let expires = due(now, IDEMPOTENCY_WINDOW);
        tables
            .keys
            .insert((queue, key.as_str()), (seq, expires))
            .map_err(storage)?;
        tables
            .key_expiry
            .insert((expires, queue, key.as_str()), ())
            .map_err(storage)?;
    }
    Ok(Ok(Enqueued {
        id: seq.to_string(),
        duplicate: false,
    }))
}

/// Forgets up to [`KEY_PURGE`] idempotency keys that expired; true if any.
fn purge_keys(tables: &mut Tables<'_>) -> Result<bool, QueueError> {
    let mut expired = Vec::new();
    for entry in tables
        .key_expiry
        .range((0, "", "")..(tables.now, "", ""))
        .map_err(storage)?
        .take(KEY_PURGE)
    {
        let (key, _) = entry.map_err(storage)?;
        let (expires, queue, name) = key.value();
        expired.push((expires, queue.to_string(), name.to_string()));
    }
    for (expires, queue, name) in &expired {
        tables
            .key_expiry
            .remove((*expires, queue.as_str(), name.as_str()))
            .map_err(storage)?;
        // The key may have been used again since: then it is not this one.
        let current = tables
            .keys
            .get((queue.as_str(), name.as_str()))
            .map_err(storage)?
            .map(|v| v.value().1);
        if current == Some(*expires) {
            tables
                .keys
                .remove((queue.as_str(), name.as_str()))
                .map_err(storage)?;
        }
    }
    Ok(!expired.is_empty())
}

/// One replay step: moves the selected dead letters back, as first
/// attempts due now, while they fit under `max_bytes`.
fn replay(
    tables: &mut Tables<'_>,
    queue: &str,
    selection: Selection,
) -> Result<Replayed, QueueError> {
    let seqs = match selection {
        Selection::Seqs(seqs) => seqs,
        Selection::After(after) => {
            let mut seqs = Vec::new();
            for entry in tables
                .dead
                .range((queue, after.saturating_add(1))..=(queue, u64::MAX))
                .map_err(storage)?
                .take(REPLAY_BATCH)
            {
                seqs.push(entry.map_err(storage)?.0.value().1);
            }
            seqs
        }
    };
    let mut replayed = Replayed {
        moved: 0,
        last: seqs.last().copied(),
        full: false,
    };
    for seq in seqs {
        let letter: StoredDead = match tables.dead.get((queue, seq)).map_err(storage)? {
            Some(bytes) => postcard::from_bytes(bytes.value()).map_err(storage)?,
            None => continue,
        };
        let message = postcard::to_stdvec(&letter.message).map_err(storage)?;
        let size = message.len() as u64;
        if tables.used(queue)?.saturating_add(size) > tables.max_bytes {
            replayed.full = true;
            break;
        }
        tables.dead.remove((queue, seq)).map_err(storage)?;
        tables
            .messages
            .insert((queue, seq), message.as_slice())
            .map_err(storage)?;
        tables
            .ready
            .insert((queue, tables.now, seq), 0)
            .map_err(storage)?;
        tables.count(queue, size, 0)?;
        replayed.moved += 1;
    }
    Ok(replayed)
}

fn keys(delivery: &Delivery) -> Result<(u64, u64), QueueError> {
    let bad = || QueueError::Unavailable(format!("malformed delivery `{}`", delivery.id));
    let seq = delivery.id.parse().map_err(|_| bad())?;
    let until = delivery.lease.parse().map_err(|_| bad())?;
    Ok((seq, until))
}
