//! The queue contract, checked against both backends through the library:
//! the embedded store in a temporary folder, and a real `redis-server`.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use wasmproc::queue::{Backend, Embedded, NewMessage, Redis};

fn message(body: &str) -> NewMessage {
    NewMessage {
        body: body.as_bytes().to_vec(),
        content_type: Some("text/plain".into()),
        headers: vec![("trace".into(), "abc".into())],
        delay: Duration::ZERO,
    }
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
    let id = backend.enqueue("q", message("one")).await.unwrap();
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
    backend.ack(&got[0]).await.unwrap();
    assert_eq!(backend.depth("q").await.unwrap(), 0);

    // Retry: the same id comes back with the next attempt number.
    let id = backend.enqueue("q", message("two")).await.unwrap();
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

    // Queues are separate.
    backend.enqueue("other", message("x")).await.unwrap();
    assert!(backend.lease("q", 1, long).await.unwrap().is_empty());
    assert_eq!(backend.depth("other").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(Embedded::open(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_backend_keeps_messages_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let backend = Embedded::open(dir.path()).unwrap();
        backend.enqueue("q", message("durable")).await.unwrap()
    };
    // The first handle is gone (its writer thread ends with it).
    let reopened = loop {
        match Embedded::open(dir.path()) {
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

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_backend_keeps_the_contract() {
    let redis = common::RedisServer::start();
    contract(Arc::new(Redis::connect(&redis.url).await.unwrap())).await;
}
