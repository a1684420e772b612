//! The Redis key-value store, shared by every host on one server.
//!
//! Layout: a bucket's values in the hash `wasmproc:kv:BUCKET`, its keys also
//! in the set `wasmproc:kvkeys:BUCKET` (so listing them never transfers the
//! values), and every bucket's size in bytes in the hash `wasmproc:kvsize`.
//! Each write is one Lua script, so the value, the key set and the size
//! change together, atomically for every host: `increment` is `HINCRBY`
//! inside such a script. Redis counts in signed 64-bit integers, so a
//! counter here stops at `i64::MAX` (an increment beyond is an overflow).

use std::time::Duration;

use anyhow::Context as _;
use redis::aio::ConnectionManager;

use super::{Backend, KvError, LIST_PAGE};

/// Sets a value if the bucket stays within its bound.
/// KEYS: values hash, keys set, sizes hash. ARGV: bucket, key, value, max.
const SET: &str = r"
local existed = redis.call('HEXISTS', KEYS[1], ARGV[2])
local old = redis.call('HSTRLEN', KEYS[1], ARGV[2])
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local klen = string.len(ARGV[2])
local wanted = size + klen + string.len(ARGV[3])
if existed == 1 then wanted = wanted - klen - old end
if wanted > size and wanted > tonumber(ARGV[4]) then return {0, wanted} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], wanted)
return {1, wanted}
";

/// Removes a key. KEYS: values hash, keys set, sizes hash. ARGV: bucket, key.
const DELETE: &str = r"
local old = redis.call('HSTRLEN', KEYS[1], ARGV[2])
if redis.call('HDEL', KEYS[1], ARGV[2]) == 1 then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('HINCRBY', KEYS[3], ARGV[1], -(string.len(ARGV[2]) + old))
end
return 1
";

/// Adds to a counter. KEYS: values hash, keys set, sizes hash. ARGV:
/// bucket, key, delta. Returns {1, new value} or {0, error}.
const INCREMENT: &str = r"
local existed = redis.call('HEXISTS', KEYS[1], ARGV[2])
local old = redis.call('HSTRLEN', KEYS[1], ARGV[2])
local ok, err = pcall(redis.call, 'HINCRBY', KEYS[1], ARGV[2], ARGV[3])
if not ok then return {0, err['err'] or tostring(err)} end
local grown = redis.call('HSTRLEN', KEYS[1], ARGV[2]) - old
if existed == 0 then
  grown = grown + string.len(ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[2])
end
redis.call('HINCRBY', KEYS[3], ARGV[1], grown)
return {1, redis.call('HGET', KEYS[1], ARGV[2])}
";

/// The Redis key-value store.
pub struct Redis {
    conn: ConnectionManager,
    set: redis::Script,
    delete: redis::Script,
    increment: redis::Script,
}

fn unavailable(e: redis::RedisError) -> KvError {
    KvError::Unavailable(e.to_string())
}

fn values(bucket: &str) -> String {
    format!("wasmproc:kv:{bucket}")
}

fn keys(bucket: &str) -> String {
    format!("wasmproc:kvkeys:{bucket}")
}

const SIZES: &str = "wasmproc:kvsize";

impl Redis {
    /// Connects to the server at `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Redis> {
        let client =
            redis::Client::open(url).with_context(|| format!("invalid Redis url `{url}`"))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager())
            .await
            .with_context(|| format!("cannot reach Redis at `{url}` within 10s"))?
            .with_context(|| format!("cannot connect to Redis at `{url}`"))?;
        Ok(Redis {
            conn,
            set: redis::Script::new(SET),
            delete: redis::Script::new(DELETE),
            increment: redis::Script::new(INCREMENT),
        })
    }
}

#[async_trait::async_trait]
impl Backend for Redis {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        redis::cmd("HGET")
            .arg(values(bucket))
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn set(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        max_bytes: u64,
    ) -> Result<(), KvError> {
        let (stored, wanted): (u8, u64) = self
            .set
            .key(values(bucket))
            .key(keys(bucket))
            .key(SIZES)
            .arg(bucket)
            .arg(key)
            .arg(value)
            .arg(max_bytes)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if stored == 1 {
            Ok(())
        } else {
            Err(KvError::BucketFull {
                bucket: bucket.to_string(),
                wanted,
                limit: max_bytes,
            })
        }
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        let _: u8 = self
            .delete
            .key(values(bucket))
            .key(keys(bucket))
            .key(SIZES)
            .arg(bucket)
            .arg(key)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvError> {
        redis::cmd("HEXISTS")
            .arg(values(bucket))
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn list(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(keys(bucket))
            .arg(cursor.unwrap_or(0))
            .arg("COUNT")
            .arg(LIST_PAGE)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok((keys, (next != 0).then_some(next)))
    }

    async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: u64,
        _max_bytes: u64,
    ) -> Result<u64, KvError> {
        let delta = i64::try_from(delta).map_err(|_| KvError::Overflow(key.to_string()))?;
        let (ok, reply): (u8, String) = self
            .increment
            .key(values(bucket))
            .key(keys(bucket))
            .key(SIZES)
            .arg(bucket)
            .arg(key)
            .arg(delta)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            return reply
                .parse()
                .map_err(|_| KvError::NotANumber(key.to_string()));
        }
        if reply.contains("overflow") {
            Err(KvError::Overflow(key.to_string()))
        } else {
            Err(KvError::NotANumber(key.to_string()))
        }
    }
}
