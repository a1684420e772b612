//! The Redis Streams backend: several wasmproc hosts share one queue.
//!
//! # Keys, for queue `Q`
//! - `wasmproc:q:Q` — a stream; every host reads it through the consumer
//!   group `wasmproc`, each host as its own consumer;
//! - `wasmproc:q:Q:delayed` — a sorted set of message ids by due time, with
//!   their payloads in the hash `wasmproc:q:Q:payload`; a Lua script moves
//!   due messages into the stream atomically, so two hosts never move one
//!   twice;
//! - `wasmproc:q:Q:dead` — a stream of dead letters;
//! - `wasmproc:q:Q:bytes` — the size of the queue's messages (waiting,
//!   delayed, in flight), checked against `max_bytes` by the enqueue script;
//! - `wasmproc:q:Q:key:K` — the id of the message enqueued with idempotency
//!   key `K`, expiring after [`IDEMPOTENCY_WINDOW`];
//! - `wasmproc:clock:NAME:MS` — which host runs the firing of clock `NAME`
//!   scheduled at `MS`, expiring after [`TICK_LEASE`].
//!
//! Every stream entry has two fields: `mid`, the message id (stable across
//! redeliveries; the stream entry id is the lease), and `p`, the payload
//! (postcard: body, content type, headers, deliveries made before this
//! entry was written). An entry without them (written by something other
//! than wasmproc) is moved to the dead letters when read, with a log line,
//! instead of staying pending forever.
//!
//! # Enqueues are one script
//! Checking the idempotency key, checking and counting `max_bytes`, and
//! adding the message happen in one Lua script, so two hosts cannot both
//! pass the check. A command Redis does not answer within
//! [`RESPONSE_TIMEOUT`] (or whose connection breaks mid-command) may still
//! have run: such an enqueue fails with [`QueueError::Unconfirmed`], never
//! as "not enqueued".
//!
//! # Leases and dead hosts
//! A message read with `XREADGROUP` stays in the group's pending list until
//! acknowledged. When a host dies, its pending entries age; every host runs
//! `XAUTOCLAIM` (at most once per [`RECLAIM_EVERY`]) to take over entries
//! idle longer than the lease's visibility timeout, and counts the attempt
//! from the entry's delivery counter (`XPENDING`).
//!
//! # A server that lost its data
//! A Redis restarted without persistence (or flushed) comes back without
//! the consumer group. Reading then fails with `NOGROUP`; the host logs it,
//! creates the group again and carries on, so messages enqueued from then
//! on are delivered. What the server lost is lost.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamRangeReply, StreamReadReply,
};
use redis::{RedisError, RedisResult};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{
    Backend, DeadLetter, Delivery, Enqueued, IDEMPOTENCY_WINDOW, NewMessage, QueueError, due,
    message_size, ms, now_ms,
};

const GROUP: &str = "wasmproc";
/// How often a host looks for leases left by dead hosts.
pub const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// How often an idle consumer polls the stream.
const POLL: Duration = Duration::from_millis(50);
/// How long a command may take to be answered before it counts as failed
/// (with an unknown outcome, for a command that changes data).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a claim of a clock's firing is kept: the hosts' clocks must
/// agree within this, or a late host runs a firing again.
pub const TICK_LEASE: Duration = Duration::from_secs(600);
/// Dead letters read and moved back per round trip by a replay.
const REPLAY_BATCH: usize = 256;

/// Moves due delayed messages into the stream. KEYS: delayed, stream,
/// payload. ARGV: now (ms), max.
const MOVE_DUE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, mid in ipairs(due) do
  local p = redis.call('HGET', KEYS[3], mid)
  if p then redis.call('XADD', KEYS[2], '*', 'mid', mid, 'p', p) end
  redis.call('HDEL', KEYS[3], mid)
  redis.call('ZREM', KEYS[1], mid)
end
return #due
";

/// Enqueues one message. KEYS: stream, delayed, payload, bytes, key.
/// ARGV: id, payload, due (ms; 0 = now), size, max bytes, key window (ms;
/// 0 = no key). Returns `{0, id}` (added), `{1, first id}` (the key is
/// known) or `{2, ''}` (full).
const ENQUEUE: &str = r"
if ARGV[6] ~= '0' then
  local first = redis.call('GET', KEYS[5])
  if first then return {1, first} end
end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used < 0 then used = 0 end
local size = tonumber(ARGV[4])
if used + size > tonumber(ARGV[5]) then return {2, ''} end
if ARGV[3] == '0' then
  redis.call('XADD', KEYS[1], '*', 'mid', ARGV[1], 'p', ARGV[2])
else
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
redis.call('SET', KEYS[4], string.format('%d', used + size))
if ARGV[6] ~= '0' then redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[6]) end
return {0, ARGV[1]}
";

/// Moves one dead letter back, if it fits. KEYS: stream, dead, bytes.
/// ARGV: message id, payload, dead entry id, size, max bytes. Returns 1 if
/// moved, 0 if the queue is full.
const REPLAY: &str = r"
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used < 0 then used = 0 end
local size = tonumber(ARGV[4])
if used + size > tonumber(ARGV[5]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'mid', ARGV[1], 'p', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], string.format('%d', used + size))
return 1
";

#[derive(Serialize, Deserialize)]
struct Payload {
    deliveries: u32,
    body: Vec<u8>,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
}

/// The Redis Streams backend.
pub struct Redis {
    conn: ConnectionManager,
    consumer: String,
    max_bytes: u64,
    groups: Mutex<HashSet<String>>,
    last_reclaim: Mutex<Option<Instant>>,
    notify: Notify,
    move_due: redis::Script,
    enqueue: redis::Script,
    replay: redis::Script,
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// An enqueue that failed: unconfirmed when the command may have reached
/// the server (a timeout, a connection lost mid-command), else not done.
fn enqueue_error(e: &RedisError) -> QueueError {
    let maybe_sent = (e.is_timeout() || e.is_io_error() || e.is_connection_dropped())
        && !e.is_connection_refusal();
    if maybe_sent {
        QueueError::Unconfirmed(e.to_string())
    } else {
        unavailable(e)
    }
}

/// Why a lease failed: the server lost the consumer group (which can be
/// created again), or anything else.
enum LeaseFailed {
    NoGroup,
    Queue(QueueError),
}

impl From<RedisError> for LeaseFailed {
    fn from(e: RedisError) -> Self {
        if e.code() == Some("NOGROUP") {
            LeaseFailed::NoGroup
        } else {
            LeaseFailed::Queue(unavailable(e))
        }
    }
}

impl From<QueueError> for LeaseFailed {
    fn from(e: QueueError) -> Self {
        LeaseFailed::Queue(e)
    }
}

fn stream(queue: &str) -> String {
    format!("wasmproc:q:{queue}")
}

fn new_id() -> String {
    format!("{:x}-{:016x}", now_ms(), fastrand::u64(..))
}

/// Why a stream entry cannot be delivered, if it cannot.
fn malformed(entry: &StreamId) -> Option<String> {
    if entry.get::<String>("mid").is_none() {
        return Some("it has no `mid` field".into());
    }
    let Some(packed) = entry.get::<Vec<u8>>("p") else {
        return Some("it has no `p` field".into());
    };
    postcard::from_bytes::<Payload>(&packed)
        .err()
        .map(|e| format!("its payload does not decode ({e})"))
}

/// A malformed entry as a dead letter's body: its payload if it has one,
/// else its fields as `name=value` lines.
fn malformed_body(entry: &StreamId) -> Vec<u8> {
    if let Some(packed) = entry.get::<Vec<u8>>("p") {
        return packed;
    }
    let mut names: Vec<&String> = entry.map.keys().collect();
    names.sort();
    let mut body = Vec::new();
    for name in names {
        let value: Vec<u8> = entry.get(name).unwrap_or_default();
        body.extend_from_slice(name.as_bytes());
        body.push(b'=');
        body.extend_from_slice(&value);
        body.push(b'\n');
    }
    body
}

impl Redis {
    /// Connects to the server at `url` (`redis://host:port/db`), whose
    /// queues may each hold `max_bytes` of messages.
    pub async fn connect(url: &str, max_bytes: u64) -> anyhow::Result<Redis> {
        let client =
            redis::Client::open(url).with_context(|| format!("invalid Redis url `{url}`"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT));
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_connection_manager_with_config(config),
        )
        .await
        .with_context(|| format!("cannot reach Redis at `{url}` within 10s"))?
        .with_context(|| format!("cannot connect to Redis at `{url}`"))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        Ok(Redis {
            conn,
            consumer: format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..)),
            max_bytes,
            groups: Mutex::new(HashSet::new()),
            last_reclaim: Mutex::new(None),
            notify: Notify::new(),
            move_due: redis::Script::new(MOVE_DUE),
            enqueue: redis::Script::new(ENQUEUE),
            replay: redis::Script::new(REPLAY),
        })
    }

    async fn ensure_group(&self, key: &str) -> Result<(), QueueError> {
        if self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
        {
            return Ok(());
        }
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(unavailable(e)),
        }
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        Ok(())
    }

    /// Creates the consumer group of `queue` again after the server lost it.
    async fn recreate_group(&self, queue: &str, key: &str) -> Result<(), QueueError> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        tracing::warn!(
            %queue,
            "the consumer group of queue `{queue}` is gone (Redis restarted without persistence, or was flushed): creating it again; messages the server lost are lost"
        );
        self.ensure_group(key).await
    }

    fn due_for_reclaim(&self) -> bool {
        let mut last = self.last_reclaim.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < RECLAIM_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    fn delivery(queue: &str, entry: &StreamId, deliveries_now: u32) -> Option<Delivery> {
        let mid: String = entry.get("mid")?;
        let packed: Vec<u8> = entry.get("p")?;
        let payload: Payload = postcard::from_bytes(&packed).ok()?;
        Some(Delivery {
            queue: queue.to_string(),
            id: mid,
            attempt: payload.deliveries.saturating_add(deliveries_now),
            body: payload.body,
            content_type: payload.content_type,
            headers: payload.headers,
            lease: entry.id.clone(),
        })
    }

    /// Deliveries of the entries read (each with the deliveries this read
    /// counts); entries that are not wasmproc messages go to the dead
    /// letters, each with a log line.
    async fn deliveries(
        &self,
        queue: &str,
        entries: &[(&StreamId, u32)],
        out: &mut Vec<Delivery>,
    ) -> Result<(), QueueError> {
        for &(entry, deliveries_now) in entries {
            match malformed(entry) {
                None => out.extend(Self::delivery(queue, entry, deliveries_now)),
                Some(why) => self.dead_letter_malformed(queue, entry, &why).await?,
            }
        }
        Ok(())
    }

    /// Moves a malformed entry to the dead letters, so it does not stay
    /// pending (and be reclaimed) forever.
    async fn dead_letter_malformed(
        &self,
        queue: &str,
        entry: &StreamId,
        why: &str,
    ) -> Result<(), QueueError> {
        let key = stream(queue);
        let id = entry
            .get::<String>("mid")
            .unwrap_or_else(|| entry.id.clone());
        let reason = format!("malformed stream entry `{}`: {why}", entry.id);
        let packed = postcard::to_stdvec(&Payload {
            deliveries: 1,
            body: malformed_body(entry),
            content_type: None,
            headers: Vec::new(),
        })
        .map_err(unavailable)?;
        let () = redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(format!("{key}:dead"))
            .arg("*")
            .arg("mid")
            .arg(&id)
            .arg("p")
            .arg(packed)
            .arg("reason")
            .arg(&reason)
            .arg("at")
            .arg(now_ms())
            .ignore()
            .cmd("XACK")
            .arg(&key)
            .arg(GROUP)
            .arg(&entry.id)
            .ignore()
            .cmd("XDEL")
            .arg(&key)
            .arg(&entry.id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        tracing::warn!(%queue, message.id = %id, "dead-lettered a {reason}");
        Ok(())
    }

    /// One lease: due delayed messages moved in, leases of dead consumers
    /// reclaimed, new entries read.
    async fn lease_once(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, LeaseFailed> {
        let key = stream(queue);
        let mut conn = self.conn.clone();
        let _: i64 = self
            .move_due
            .key(format!("{key}:delayed"))
            .key(&key)
            .key(format!("{key}:payload"))
            .arg(now_ms())
            .arg(max.max(1))
            .invoke_async(&mut conn)
            .await?;
        let mut out = Vec::new();
        if self.due_for_reclaim() {
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&key)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(ms(visibility))
                .arg("0-0")
                .arg("COUNT")
                .arg(max.max(1))
                .query_async(&mut conn)
                .await?;
            let mut entries = Vec::with_capacity(claimed.claimed.len());
            for entry in &claimed.claimed {
                let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(GROUP)
                    .arg(&entry.id)
                    .arg(&entry.id)
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                let times = pending.ids.first().map_or(1, |p| p.times_delivered);
                entries.push((entry, u32::try_from(times).unwrap_or(u32::MAX)));
            }
            self.deliveries(queue, &entries, &mut out).await?;
            for d in &out {
                tracing::info!(%queue, message.id = %d.id, attempt = d.attempt, "reclaimed a lease left by another consumer");
            }
        }
        if out.len() < max {
            let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max - out.len())
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query_async(&mut conn)
                .await?;
            for stream in read.map(|r| r.keys).unwrap_or_default() {
                let entries: Vec<_> = stream.ids.iter().map(|e| (e, 1)).collect();
                self.deliveries(queue, &entries, &mut out).await?;
            }
        }
        Ok(out)
    }

    /// Runs `pipe` (the commands that go with settling, if any) atomically
    /// together with settling the lease: acknowledge the entry, delete it,
    /// and take `uncount` bytes off the queue's size.
    async fn settle(
        &self,
        mut pipe: redis::Pipeline,
        delivery: &Delivery,
        uncount: u64,
    ) -> Result<(), QueueError> {
        let key = stream(&delivery.queue);
        pipe.atomic()
            .cmd("XACK")
            .arg(&key)
            .arg(GROUP)
            .arg(&delivery.lease)
            .ignore()
            .cmd("XDEL")
            .arg(&key)
            .arg(&delivery.lease)
            .ignore();
        if uncount > 0 {
            pipe.cmd("DECRBY")
                .arg(format!("{key}:bytes"))
                .arg(uncount)
                .ignore();
        }
        let () = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn pack(delivery: &Delivery, deliveries: u32) -> Result<Vec<u8>, QueueError> {
        postcard::to_stdvec(&Payload {
            deliveries,
            body: delivery.body.clone(),
            content_type: delivery.content_type.clone(),
            headers: delivery.headers.clone(),
        })
        .map_err(unavailable)
    }
}

/// The bytes a delivery counts in its queue.
fn size(delivery: &Delivery) -> u64 {
    message_size(
        &delivery.body,
        delivery.content_type.as_deref(),
        &delivery.headers,
    )
}

#[async_trait::async_trait]
impl Backend for Redis {
    async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<Enqueued, QueueError> {
        let key = stream(queue);
        self.ensure_group(&key).await?;
        let size = message.size();
        let delay = message.delay;
        let idempotency = message
            .key
            .as_ref()
            .map(|k| (format!("{key}:key:{k}"), ms(IDEMPOTENCY_WINDOW)));
        let packed = postcard::to_stdvec(&Payload {
            deliveries: 0,
            body: message.body,
            content_type: message.content_type,
            headers: message.headers,
        })
        .map_err(unavailable)?;
        let id = new_id();
        let due = if delay.is_zero() {
            0
        } else {
            due(now_ms(), delay).max(1)
        };
        let (outcome, id): (i64, String) = self
            .enqueue
            .key(&key)
            .key(format!("{key}:delayed"))
            .key(format!("{key}:payload"))
            .key(format!("{key}:bytes"))
            .key(
                idempotency
                    .as_ref()
                    .map_or_else(|| format!("{key}:key:"), |(k, _)| k.clone()),
            )
            .arg(&id)
            .arg(packed)
            .arg(due)
            .arg(size)
            .arg(self.max_bytes)
            .arg(idempotency.as_ref().map_or(0, |(_, window)| *window))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| enqueue_error(&e))?;
        match outcome {
            0 => {
                if delay.is_zero() {
                    self.notify.notify_one();
                }
                Ok(Enqueued {
                    id,
                    duplicate: false,
                })
            }
            1 => Ok(Enqueued {
                id,
                duplicate: true,
            }),
            _ => Err(QueueError::Full {
                queue: queue.to_string(),
                limit: self.max_bytes,
            }),
        }
    }

    async fn lease(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let key = stream(queue);
        self.ensure_group(&key).await?;
        match self.lease_once(queue, max, visibility).await {
            Ok(out) => Ok(out),
            Err(LeaseFailed::Queue(e)) => Err(e),
            Err(LeaseFailed::NoGroup) => {
                self.recreate_group(queue, &key).await?;
                match self.lease_once(queue, max, visibility).await {
                    Ok(out) => Ok(out),
                    Err(LeaseFailed::Queue(e)) => Err(e),
                    Err(LeaseFailed::NoGroup) => Err(QueueError::Unavailable(format!(
                        "the consumer group of queue `{queue}` vanished again as it was created"
                    ))),
                }
            }
        }
    }

    async fn wait(&self, _queue: &str, timeout: Duration) {
        // Other hosts enqueue too, so poll (often enough that a retried or
        // delayed message is found soon after it comes due); a local
        // enqueue wakes us early.
        let _ = tokio::time::timeout(timeout.min(POLL), self.notify.notified()).await;
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.settle(redis::pipe(), delivery, size(delivery)).await
    }

    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<(), QueueError> {
        let key = stream(&delivery.queue);
        let packed = Self::pack(delivery, delivery.attempt)?;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(format!("{key}:payload"))
            .arg(&delivery.id)
            .arg(packed)
            .ignore()
            .cmd("ZADD")
            .arg(format!("{key}:delayed"))
            .arg(due(now_ms(), delay))
            .arg(&delivery.id)
            .ignore();
        self.settle(pipe, delivery, 0).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let key = stream(&delivery.queue);
        let packed = Self::pack(delivery, delivery.attempt)?;
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(format!("{key}:dead"))
            .arg("*")
            .arg("mid")
            .arg(&delivery.id)
            .arg("p")
            .arg(packed)
            .arg("reason")
            .arg(reason)
            .arg("at")
            .arg(now_ms())
            .ignore();
        self.settle(pipe, delivery, size(delivery)).await
    }

    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, QueueError> {
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{}:dead", stream(queue)))
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(range
            .ids
            .iter()
            .filter_map(|entry| {
                let packed: Vec<u8> = entry.get("p")?;
                let payload: Payload = postcard::from_bytes(&packed).ok()?;
                Some(DeadLetter {
                    id: entry.get("mid")?,
                    attempts: payload.deliveries,
                    reason: entry.get("reason").unwrap_or_default(),
                    failed_at_ms: entry.get("at").unwrap_or_default(),
                    body: payload.body,
                    content_type: payload.content_type,
                })
            })
            .collect())
    }

    async fn dead_letter_count(&self, queue: &str) -> Result<u64, QueueError> {
        redis::cmd("XLEN")
            .arg(format!("{}:dead", stream(queue)))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn replay(&self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        let key = stream(queue);
        self.ensure_group(&key).await?;
        let dead = format!("{key}:dead");
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut conn = self.conn.clone();
        let mut moved = 0;
        let mut start = "-".to_string();
        'pages: loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&dead)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(REPLAY_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut entries: VecDeque<_> = page.ids.into();
            let Some(last) = entries.back().map(|e| e.id.clone()) else {
                break;
            };
            while let Some(entry) = entries.pop_front() {
                let (Some(mid), Some(packed)) =
                    (entry.get::<String>("mid"), entry.get::<Vec<u8>>("p"))
                else {
                    continue;
                };
                if !wanted.is_empty() && !wanted.contains(mid.as_str()) {
                    continue;
                }
                let Ok(mut payload) = postcard::from_bytes::<Payload>(&packed) else {
                    continue;
                };
                payload.deliveries = 0;
                let size = message_size(
                    &payload.body,
                    payload.content_type.as_deref(),
                    &payload.headers,
                );
                let packed = postcard::to_stdvec(&payload).map_err(unavailable)?;
                let done: i64 = self
                    .replay
                    .key(&key)
                    .key(&dead)
                    .key(format!("{key}:bytes"))
                    .arg(&mid)
                    .arg(packed)
                    .arg(&entry.id)
                    .arg(size)
                    .arg(self.max_bytes)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if done == 0 {
                    break 'pages; // the queue is full
                }
                moved += 1;
            }
            // Exclusive start: the next page begins after this one.
            start = format!("({last}");
        }
        if moved > 0 {
            self.notify.notify_one();
        }
        Ok(moved)
    }

    async fn oldest_age(&self, queue: &str) -> Result<Option<Duration>, QueueError> {
        // The oldest entry not yet delivered, or the oldest pending one.
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream(queue))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(range.ids.first().and_then(|entry| {
            let ms: u64 = entry.id.split('-').next()?.parse().ok()?;
            Some(Duration::from_millis(now_ms().saturating_sub(ms)))
        }))
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let key = stream(queue);
        let (len, delayed): (u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(&key)
            .cmd("ZCARD")
            .arg(format!("{key}:delayed"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(len + delayed)
    }

    async fn bytes(&self, queue: &str) -> Result<u64, QueueError> {
        let used: Option<i64> = redis::cmd("GET")
            .arg(format!("{}:bytes", stream(queue)))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(used.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    async fn claim_tick(&self, clock: &str, at_ms: u64) -> Result<bool, QueueError> {
        let claimed: Option<String> = redis::cmd("SET")
            .arg(format!("wasmproc:clock:{clock}:{at_ms}"))
            .arg(&self.consumer)
            .arg("NX")
            .arg("PX")
            .arg(ms(TICK_LEASE))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(claimed.is_some())
    }
}
