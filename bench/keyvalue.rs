//! `wasi:keyvalue` store throughput, without wasm: sets, gets and
//! increments per second through the same `KeyValue` the guests use, on the
//! embedded store (redb, a durable commit per write) and on Redis, from 64
//! concurrent callers. Run with `bench/keyvalue.sh`, which starts a
//! `redis-server` and passes `--redis URL`; without it Redis is skipped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wasmproc::formation::Formation;
use wasmproc::keyvalue::KeyValue;

const CALLERS: usize = 64;

fn operations() -> usize {
    std::env::var("OPERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Runs `n` operations from [`CALLERS`] tasks; returns operations a second.
async fn rate<F>(store: &Arc<KeyValue>, n: usize, op: F) -> f64
where
    F: Fn(Arc<KeyValue>, usize) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync
        + Copy
        + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in (c..n).step_by(CALLERS) {
                    op(store.clone(), i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn measure(label: &str, queue_table: &str) {
    let text = format!(
        "{queue_table}\n[process.bench]\nkind = \"worker\"\ncomponent = \"bench.wasm\"\nqueue = \"bench\"\nkeyvalue = [\"bench\"]\n"
    );
    let formation = Formation::parse(Path::new("/tmp/bench.toml"), &text, |_| None).unwrap();
    let store = Arc::new(KeyValue::open(&formation).await.unwrap());
    let n = operations();
    let set = rate(&store, n, |s, i| {
        Box::pin(async move {
            s.set("bench", &format!("k{i}"), b"a value of some bytes")
                .await
                .unwrap()
        })
    })
    .await;
    let get = rate(&store, n, |s, i| {
        Box::pin(async move {
            s.get("bench", &format!("k{i}")).await.unwrap().unwrap();
        })
    })
    .await;
    let increment = rate(&store, n, |s, _| {
        Box::pin(async move {
            s.increment("bench", "counter", 1).await.unwrap();
        })
    })
    .await;
    println!("{label:<24} set {set:>9.0}/s   get {get:>9.0}/s   increment {increment:>9.0}/s");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let args: Vec<String> = std::env::args().collect();
    let redis = args
        .iter()
        .position(|a| a == "--redis")
        .and_then(|i| args.get(i + 1).cloned());
    println!("{} operations per kind, {CALLERS} callers", operations());
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(measure(
        "embedded (redb)",
        &format!("[queue]\npath = \"{}\"", dir.path().display()),
    ));
    if let Some(url) = redis {
        runtime.block_on(measure(
            "Redis (local server)",
            &format!("[queue]\nbackend = \"redis\"\nurl = \"{url}\""),
        ));
    }
}
