//! The queue contract, checked against both backends through the library:
//! the embedded store in a temporary folder, and a real `redis-server`.
//! Redis faults (a flushed server, entries written by others, a second
//! host claiming clock ticks) are made with `redis-cli`.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use wasmproc::formation::DEFAULT_MAX_BYTES;
use wasmproc::queue::{Backend, Embedded, Enqueued, NewMessage, QueueError, Redis};

fn message(body: &str) -> NewMessage {
    NewMessage {
        body: body.as_bytes().to_vec(),
        content_type: Some("text/plain".into()),
        headers: vec![("trace".into(), "abc".into())],
        delay: Duration::ZERO,
        key: None,
    }
}

fn keyed(body: &str, key: &str) -> NewMessage {
    NewMessage {
        key: Some(key.into()),
        ..message(body)
    }
}

/// The id of a message that was added (not a duplicate).
fn added(enqueued: Enqueued) -> String {
    assert!(!enqueued.duplicate, "{enqueued:?}");
    enqueued.id
}

/// Leases until `n` messages arrive or a deadline passes.
async fn lease_n(
    backend: &dyn Backend,
    n: usize,
    visibility: Duration,
) -> Vec<wasmproc::queue::Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(backend.lease("q", n - got.len(), visibility).await.unwrap());
        if got.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} messages leased",
                got.len()
            );
            backend.wait("q", Duration::from_millis(20)).await;
        }
    }
    got
}

async fn contract(backend: Arc<dyn Backend>) {
    let long = Duration::from_secs(60);
    // Enqueue, lease with everything the producer gave, ack: gone for good.
    let id = added(backend.enqueue("q", message("one")).await.unwrap());
    let got = lease_n(backend.as_ref(), 1, long).await;
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].attempt, 1);
    assert_eq!(got[0].body, b"one");
    assert_eq!(got[0].content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        got[0].headers,
        vec![("trace".to_string(), "abc".to_string())]
    );
    assert!(
        backend.lease("q", 10, long).await.unwrap().is_empty(),
        "a leased message is not leased twice"
    );
    assert!(backend.bytes("q").await.unwrap() > 0);
    backend.ack(&got[0]).await.unwrap();
    assert_eq!(backend.depth("q").await.unwrap(), 0);
    assert_eq!(
        backend.bytes("q").await.unwrap(),
        0,
        "an ack frees its bytes"
    );

    // Retry: the same id comes back with the next attempt number.
    let id = added(backend.enqueue("q", message("two")).await.unwrap());
    let first = lease_n(backend.as_ref(), 1, long).await.remove(0);
    backend
        .retry(&first, Duration::from_millis(50))
        .await
        .unwrap();
    let second = lease_n(backend.as_ref(), 1, long).await.remove(0);
    assert_eq!(
        (second.id.as_str(), second.attempt, second.body.as_slice()),
        (id.as_str(), 2, &b"two"[..])
    );

    // A lease that is never settled expires and the message is delivered again.
    let short = Duration::from_millis(300);
    let expired = second;
    backend.retry(&expired, Duration::ZERO).await.unwrap();
    let held = lease_n(backend.as_ref(), 1, short).await.remove(0);
    assert_eq!(held.attempt, 3);
    let again = lease_n(backend.as_ref(), 1, short).await.remove(0);
    assert_eq!(
        (again.id.as_str(), again.attempt),
        (id.as_str(), 4),
        "redelivered after the lease expired"
    );

    // Dead letters are listed, and replayed as first attempts.
    backend.dead_letter(&again, "gave up").await.unwrap();
    let dead = backend.dead_letters("q").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].id.as_str(),
            dead[0].attempts,
            dead[0].reason.as_str()
        ),
        (id.as_str(), 4, "gave up")
    );
    assert_eq!(backend.replay("q", &[]).await.unwrap(), 1);
    assert!(backend.dead_letters("q").await.unwrap().is_empty());
    let replayed = lease_n(backend.as_ref(), 1, long).await.remove(0);
    assert_eq!((replayed.id.as_str(), replayed.attempt), (id.as_str(), 1));
    backend.ack(&replayed).await.unwrap();

    // A delayed message waits for its time.
    let mut later = message("later");
    later.delay = Duration::from_millis(400);
    backend.enqueue("q", later).await.unwrap();
    assert!(
        backend.lease("q", 1, long).await.unwrap().is_empty(),
        "not before its delay"
    );
    let on_time = lease_n(backend.as_ref(), 1, long).await.remove(0);
    assert_eq!(on_time.body, b"later");
    backend.ack(&on_time).await.unwrap();

    // An idempotency key names its first message: a second enqueue with it
    // adds nothing and answers with the first id.
    let first = added(backend.enqueue("q", keyed("k1", "order-42")).await.unwrap());
    let again = backend.enqueue("q", keyed("k1", "order-42")).await.unwrap();
    assert_eq!((again.id.as_str(), again.duplicate), (first.as_str(), true));
    let other = added(backend.enqueue("q", keyed("k2", "order-43")).await.unwrap());
    assert_ne!(other, first);
    let got = lease_n(backend.as_ref(), 2, long).await;
    assert!(backend.lease("q", 10, long).await.unwrap().is_empty());
    for delivery in &got {
        backend.ack(delivery).await.unwrap();
    }

    // A delay too large to represent means never, not at once.
    let mut never = message("never");
    never.delay = Duration::MAX;
    backend.enqueue("q", never).await.unwrap();
    let mut soon = message("soon");
    soon.delay = Duration::from_millis(50);
    backend.enqueue("q", soon).await.unwrap();
    let got = lease_n(backend.as_ref(), 1, long).await.remove(0);
    assert_eq!(got.body, b"soon");
    backend
        .retry(&got, Duration::from_millis(u64::MAX))
        .await
        .unwrap();
    backend.wait("q", Duration::from_millis(100)).await;
    assert!(backend.lease("q", 10, long).await.unwrap().is_empty());
    assert_eq!(backend.depth("q").await.unwrap(), 2);

    // Queues are separate.
    backend.enqueue("other", message("x")).await.unwrap();
    assert!(backend.lease("q", 1, long).await.unwrap().is_empty());
    assert_eq!(backend.depth("other").await.unwrap(), 1);
}

/// A backend whose queues may hold `max_bytes`: full is full, an ack
/// makes room, dead letters do not count and replays stop at the limit.
async fn bounded(backend: Arc<dyn Backend>, max_bytes: u64) {
    let long = Duration::from_secs(60);
    let body = "x".repeat(usize::try_from(max_bytes / 3).unwrap());
    let mut ids = Vec::new();
    loop {
        match backend.enqueue("q", message(&body)).await {
            Ok(enqueued) => ids.push(enqueued.id),
            Err(e) => {
                assert_eq!(
                    e,
                    QueueError::Full {
                        queue: "q".into(),
                        limit: max_bytes
                    }
                );
                break;
            }
        }
        assert!(ids.len() < 10, "never full");
    }
    assert_eq!(ids.len(), 2, "two thirds fit, a third does not");
    let used = backend.bytes("q").await.unwrap();
    assert!(used > 2 * (max_bytes / 3) && used <= max_bytes, "{used}");
    // A small message still fits; the queue is full by bytes, not count.
    backend.enqueue("q", message("small")).await.unwrap();
    let got = lease_n(backend.as_ref(), 3, long).await;
    backend.ack(&got[0]).await.unwrap();
    backend.dead_letter(&got[1], "dead").await.unwrap();
    backend.dead_letter(&got[2], "dead").await.unwrap();
    assert_eq!(
        backend.bytes("q").await.unwrap(),
        0,
        "dead letters do not count"
    );
    backend.enqueue("q", message(&body)).await.unwrap();
    backend.enqueue("q", message(&body)).await.unwrap();
    // A replay stops at the limit, and moves them once there is room.
    assert_eq!(backend.replay("q", &[]).await.unwrap(), 0);
    assert_eq!(backend.dead_letters("q").await.unwrap().len(), 2);
    let got = lease_n(backend.as_ref(), 1, long).await.remove(0);
    backend.ack(&got).await.unwrap();
    assert_eq!(backend.replay("q", &[]).await.unwrap(), 2);
    assert!(backend.dead_letters("q").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(
        Embedded::open(dir.path(), DEFAULT_MAX_BYTES).unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_backend_is_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    bounded(Arc::new(Embedded::open(dir.path(), 3000).unwrap()), 3000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_backend_keeps_messages_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let backend = Embedded::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        backend.enqueue("q", message("durable")).await.unwrap().id
    };
    // The first handle is gone (its writer thread ends with it).
    let reopened = loop {
        match Embedded::open(dir.path(), DEFAULT_MAX_BYTES) {
            Ok(backend) => break backend,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let got = lease_n(&reopened, 1, Duration::from_secs(60)).await;
    assert_eq!(
        (got[0].id.as_str(), got[0].body.as_slice()),
        (id.as_str(), &b"durable"[..])
    );
}

/// An idle consumer is woken when a retried message comes due, not after
/// a fixed poll: a retry of 50 ms is redelivered in about 50 ms.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_embedded_consumer_wakes_when_a_retry_comes_due() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Embedded::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
    backend.enqueue("q", message("again")).await.unwrap();
    let long = Duration::from_secs(60);
    let first = lease_n(&backend, 1, long).await.remove(0);
    backend.retry(&first, Duration::from_secs(1)).await.unwrap();
    // The wait ends with the due time, long before its timeout.
    let started = tokio::time::Instant::now();
    let mut second = Vec::new();
    while second.is_empty() {
        backend.wait("q", Duration::from_secs(30)).await;
        second = backend.lease("q", 1, long).await.unwrap();
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert_eq!(second[0].attempt, 2);
}

/// A replay of many dead letters moves them in batches: an enqueue made
/// while it runs is answered before the replay ends, not after.
#[tokio::test(flavor = "multi_thread")]
async fn an_enqueue_is_not_held_up_by_a_large_replay() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(Embedded::open(dir.path(), DEFAULT_MAX_BYTES).unwrap());
    let total = 20_000;
    let producers: Vec<_> = (0..64)
        .map(|p| {
            let backend = backend.clone();
            tokio::spawn(async move {
                for i in (p..total).step_by(64) {
                    backend
                        .enqueue("q", message(&format!("m{i}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    let long = Duration::from_secs(600);
    let mut dead = 0;
    while dead < total {
        let batch = backend.lease("q", 1000, long).await.unwrap();
        let settles: Vec<_> = batch
            .into_iter()
            .map(|d| {
                let backend = backend.clone();
                tokio::spawn(async move { backend.dead_letter(&d, "dead").await.unwrap() })
            })
            .collect();
        dead += settles.len();
        for settle in settles {
            settle.await.unwrap();
        }
    }
    let replay = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.replay("q", &[]).await.unwrap() })
    };
    // Once the first batch is back, enqueue.
    while backend.depth("q").await.unwrap() == 0 {
        assert!(!replay.is_finished(), "the replay ended before it was seen");
        tokio::task::yield_now().await;
    }
    backend.enqueue("q", message("during")).await.unwrap();
    assert!(
        !replay.is_finished(),
        "the enqueue waited for the whole replay"
    );
    assert_eq!(replay.await.unwrap(), total);
    assert_eq!(backend.depth("q").await.unwrap(), total as u64 + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_backend_keeps_the_contract() {
    let redis = common::RedisServer::start();
    contract(Arc::new(
        Redis::connect(&redis.url, DEFAULT_MAX_BYTES).await.unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_backend_is_bounded_by_bytes() {
    let redis = common::RedisServer::start();
    bounded(
        Arc::new(Redis::connect(&redis.url, 3000).await.unwrap()),
        3000,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_redis_gets_its_consumer_group_back() {
    let redis = common::RedisServer::start();
    let backend = Redis::connect(&redis.url, DEFAULT_MAX_BYTES).await.unwrap();
    let long = Duration::from_secs(60);
    backend.enqueue("q", message("before")).await.unwrap();
    let got = lease_n(&backend, 1, long).await.remove(0);
    backend.ack(&got).await.unwrap();
    redis.cli(&["FLUSHALL"]);
    let id = backend.enqueue("q", message("after")).await.unwrap().id;
    let got = lease_n(&backend, 1, long).await.remove(0);
    assert_eq!((got.id, got.body), (id, b"after".to_vec()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_redis_entry_is_dead_lettered_not_left_pending() {
    let redis = common::RedisServer::start();
    let backend = Redis::connect(&redis.url, DEFAULT_MAX_BYTES).await.unwrap();
    let long = Duration::from_secs(60);
    assert!(backend.lease("q", 10, long).await.unwrap().is_empty());
    let entry = redis.cli(&["XADD", "wasmproc:q:q", "*", "foo", "bar"]);
    backend.enqueue("q", message("fine")).await.unwrap();
    let got = lease_n(&backend, 1, long).await;
    assert_eq!(got[0].body, b"fine");
    let dead = backend.dead_letters("q").await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, entry.trim());
    assert_eq!(
        dead[0].reason,
        format!(
            "malformed stream entry `{}`: it has no `mid` field",
            entry.trim()
        )
    );
    assert_eq!(dead[0].body, b"foo=bar\n");
    let pending = redis.cli(&["XPENDING", "wasmproc:q:q", "wasmproc"]);
    assert!(
        pending.starts_with("1\n"),
        "only `fine` is pending: {pending}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_host_of_several_claims_each_clock_tick() {
    let redis = common::RedisServer::start();
    let a = Redis::connect(&redis.url, DEFAULT_MAX_BYTES).await.unwrap();
    let b = Redis::connect(&redis.url, DEFAULT_MAX_BYTES).await.unwrap();
    assert!(a.claim_tick("report", 1_000).await.unwrap());
    assert!(!b.claim_tick("report", 1_000).await.unwrap());
    assert!(!a.claim_tick("report", 1_000).await.unwrap());
    assert!(b.claim_tick("report", 2_000).await.unwrap());
    assert!(a.claim_tick("other", 1_000).await.unwrap());
    // A single host's embedded backend claims every firing.
    let dir = tempfile::tempdir().unwrap();
    let embedded = Embedded::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
    assert!(embedded.claim_tick("report", 1_000).await.unwrap());
    assert!(embedded.claim_tick("report", 1_000).await.unwrap());
}
