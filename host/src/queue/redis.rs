//! The Redis Streams backend: several wasmproc hosts share one queue.
//!
//! # Keys, for queue `Q`
//! - `wasmproc:q:Q` — a stream; every host reads it through the consumer
//!   group `wasmproc`, each host as its own consumer;
//! - `wasmproc:q:Q:delayed` — a sorted set of message ids by due time, with
//!   their payloads in the hash `wasmproc:q:Q:payload`; a Lua script moves
//!   due messages into the stream atomically, so two hosts never move one
//!   twice;
//! - `wasmproc:q:Q:dead` — a stream of dead letters.
//!
//! Every stream entry has two fields: `mid`, the message id (stable across
//! redeliveries; the stream entry id is the lease), and `p`, the payload
//! (postcard: body, content type, headers, deliveries made before this
//! entry was written).
//!
//! # Leases and dead hosts
//! A message read with `XREADGROUP` stays in the group's pending list until
//! acknowledged. When a host dies, its pending entries age; every host runs
//! `XAUTOCLAIM` (at most once per [`RECLAIM_EVERY`]) to take over entries
//! idle longer than the lease's visibility timeout, and counts the attempt
//! from the entry's delivery counter (`XPENDING`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamRangeReply, StreamReadReply,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{Backend, DeadLetter, Delivery, NewMessage, QueueError, ms, now_ms};

const GROUP: &str = "wasmproc";
/// How often a host looks for leases left by dead hosts.
pub const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// How often an idle consumer polls the stream.
const POLL: Duration = Duration::from_millis(50);

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
    groups: Mutex<HashSet<String>>,
    last_reclaim: Mutex<Option<Instant>>,
    notify: Notify,
    move_due: redis::Script,
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn stream(queue: &str) -> String {
    format!("wasmproc:q:{queue}")
}

fn new_id() -> String {
    format!("{:x}-{:016x}", now_ms(), fastrand::u64(..))
}

impl Redis {
    /// Connects to the server at `url` (`redis://host:port/db`).
    pub async fn connect(url: &str) -> anyhow::Result<Redis> {
        let client =
            redis::Client::open(url).with_context(|| format!("invalid Redis url `{url}`"))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager())
            .await
            .with_context(|| format!("cannot reach Redis at `{url}` within 10s"))?
            .with_context(|| format!("cannot connect to Redis at `{url}`"))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        Ok(Redis {
            conn,
            consumer: format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..)),
            groups: Mutex::new(HashSet::new()),
            last_reclaim: Mutex::new(None),
            notify: Notify::new(),
            move_due: redis::Script::new(MOVE_DUE),
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
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(unavailable(e)),
        }
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        Ok(())
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
            attempt: payload.deliveries + deliveries_now,
            body: payload.body,
            content_type: payload.content_type,
            headers: payload.headers,
            lease: entry.id.clone(),
        })
    }

    /// Runs `pipe` (the commands that go with settling, if any) atomically
    /// together with settling the lease: acknowledge the entry, delete it.
    async fn settle(
        &self,
        mut pipe: redis::Pipeline,
        delivery: &Delivery,
    ) -> Result<(), QueueError> {
        let key = stream(&delivery.queue);
        let () = pipe
            .atomic()
            .cmd("XACK")
            .arg(&key)
            .arg(GROUP)
            .arg(&delivery.lease)
            .ignore()
            .cmd("XDEL")
            .arg(&key)
            .arg(&delivery.lease)
            .ignore()
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

#[async_trait::async_trait]
impl Backend for Redis {
    async fn enqueue(&self, queue: &str, message: NewMessage) -> Result<String, QueueError> {
        let key = stream(queue);
        self.ensure_group(&key).await?;
        let id = new_id();
        let packed = postcard::to_stdvec(&Payload {
            deliveries: 0,
            body: message.body,
            content_type: message.content_type,
            headers: message.headers,
        })
        .map_err(unavailable)?;
        let mut conn = self.conn.clone();
        if message.delay.is_zero() {
            let _: String = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("mid")
                .arg(&id)
                .arg("p")
                .arg(packed)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            self.notify.notify_one();
        } else {
            let () = redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(format!("{key}:payload"))
                .arg(&id)
                .arg(packed)
                .ignore()
                .cmd("ZADD")
                .arg(format!("{key}:delayed"))
                .arg(now_ms() + ms(message.delay))
                .arg(&id)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(id)
    }

    async fn lease(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let key = stream(queue);
        self.ensure_group(&key).await?;
        let mut conn = self.conn.clone();
        let _: i64 = self
            .move_due
            .key(format!("{key}:delayed"))
            .key(&key)
            .key(format!("{key}:payload"))
            .arg(now_ms())
            .arg(max.max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;

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
                .await
                .map_err(unavailable)?;
            for entry in &claimed.claimed {
                let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(GROUP)
                    .arg(&entry.id)
                    .arg(&entry.id)
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                let times = pending.ids.first().map_or(1, |p| p.times_delivered);
                if let Some(d) =
                    Self::delivery(queue, entry, u32::try_from(times).unwrap_or(u32::MAX))
                {
                    tracing::info!(queue, message.id = %d.id, attempt = d.attempt, "reclaimed a lease left by another consumer");
                    out.push(d);
                }
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
                .await
                .map_err(unavailable)?;
            for stream in read.map(|r| r.keys).unwrap_or_default() {
                out.extend(
                    stream
                        .ids
                        .iter()
                        .filter_map(|e| Self::delivery(queue, e, 1)),
                );
            }
        }
        Ok(out)
    }

    async fn wait(&self, _queue: &str, timeout: Duration) {
        // Other hosts enqueue too, so poll; a local enqueue wakes us early.
        let _ = tokio::time::timeout(timeout.min(POLL), self.notify.notified()).await;
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.settle(redis::pipe(), delivery).await
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
            .arg(now_ms() + ms(delay))
            .arg(&delivery.id)
            .ignore();
        self.settle(pipe, delivery).await
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
        self.settle(pipe, delivery).await
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

    async fn replay(&self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        let key = stream(queue);
        self.ensure_group(&key).await?;
        let dead = format!("{key}:dead");
        let mut conn = self.conn.clone();
        let range: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&dead)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut moved = 0;
        for entry in &range.ids {
            let (Some(mid), Some(packed)) = (entry.get::<String>("mid"), entry.get::<Vec<u8>>("p"))
            else {
                continue;
            };
            if !ids.is_empty() && !ids.contains(&mid) {
                continue;
            }
            let Ok(mut payload) = postcard::from_bytes::<Payload>(&packed) else {
                continue;
            };
            payload.deliveries = 0;
            let packed = postcard::to_stdvec(&payload).map_err(unavailable)?;
            let () = redis::pipe()
                .atomic()
                .cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("mid")
                .arg(&mid)
                .arg("p")
                .arg(packed)
                .ignore()
                .cmd("XDEL")
                .arg(&dead)
                .arg(&entry.id)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            moved += 1;
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
}
