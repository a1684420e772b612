//! Worker throughput: how fast queued messages are handled by no-op worker
//! instances, through the embedded queue and through Redis, at scale 1, 2
//! and 8 — and how fast a native no-op consumer drains the same queue (the
//! limit the host can approach). Run with `bench/worker.sh`, which starts a
//! `redis-server` and passes `--redis URL`; without it Redis is skipped.
//!
//! Each scale runs `ROUNDS` times (default 3) and reports the median.
//! Each run enqueues `MESSAGES` messages first (from 64 concurrent
//! producers, through the same `Backend` the host uses), then starts the
//! consumers and times the drain until every message is acknowledged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmproc::engine::{CompileCache, EpochTicker};
use wasmproc::formation::{DEFAULT_MAX_BYTES, DEFAULT_MAX_DELAY, Formation};
use wasmproc::pool::Pool;
use wasmproc::queue::{Backend, Embedded, NewMessage, Queues, Redis};
use wasmproc::run::KindPool;
use wasmproc::worker::WorkerWorld;

const QUEUE: &str = "bench";

/// The worker throughput target through the embedded queue (issue #5).
const TARGET: u32 = 20_000;

/// Runs per scale (`ROUNDS`, default 3); the median is reported.
fn rounds() -> usize {
    std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

fn messages() -> usize {
    std::env::var("MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

async fn fill(backend: &Arc<dyn Backend>, n: usize) -> f64 {
    let started = Instant::now();
    let producers = 64;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let backend = backend.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (p..n).step_by(producers) {
                let message = NewMessage {
                    body: b"noop".to_vec(),
                    ..NewMessage::default()
                };
                backend.enqueue(QUEUE, message).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Waits until `n` units have succeeded in `pool` and the queue is empty;
/// returns messages per second since `started`. Success is read from the
/// pool's counter: counting the queue scans every entry, and doing that
/// while it drains would take CPU from the consumers being measured.
async fn drained(
    backend: &Arc<dyn Backend>,
    pool: &Pool<WorkerWorld>,
    started: Instant,
    n: usize,
) -> f64 {
    let deadline = Duration::from_secs(600);
    while pool.stats.succeeded.get() < n as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(started.elapsed() < deadline, "drain took too long");
    }
    // The last acknowledgements may still be on their way.
    while backend.depth(QUEUE).await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(started.elapsed() < deadline, "drain took too long");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn native(backend: Arc<dyn Backend>, n: usize) -> f64 {
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = backend
            .lease(QUEUE, 256, Duration::from_secs(60))
            .await
            .unwrap();
        let acks: Vec<_> = batch
            .into_iter()
            .map(|d| {
                let backend = backend.clone();
                tokio::spawn(async move { backend.ack(&d).await.unwrap() })
            })
            .collect();
        done += acks.len();
        for a in acks {
            a.await.unwrap();
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn wasmproc(backend: Arc<dyn Backend>, component: &Path, scale: u32, n: usize) -> f64 {
    let text = format!(
        "[process.bench]\nkind = \"worker\"\ncomponent = \"{}\"\nqueue = \"{QUEUE}\"\nscale = {scale}\n",
        component.display()
    );
    let formation = Formation::parse(Path::new("bench.toml"), &text, |_| None).unwrap();
    let queues = Queues::with_backend(
        backend.clone(),
        BTreeSet::from([QUEUE.to_string()]),
        1 << 20,
        DEFAULT_MAX_DELAY,
    );
    let cache = CompileCache::new(std::env::temp_dir().join("wasmproc-bench-cache"));
    let prepared = wasmproc::run::prepare(
        &formation,
        &cache,
        &wasmproc::run::Backing {
            queues: Some(queues.clone()),
            keyvalue: None,
        },
    )
    .unwrap();
    let _ticker = EpochTicker::start(&prepared.engine).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let KindPool::Worker(pool) = prepared.pools[0].clone() else {
        panic!("the bench formation has one worker");
    };
    let consumer = tokio::spawn(wasmproc::worker::consume(pool.clone(), queues, stopped));
    let rate = drained(&backend, &pool, started, n).await;
    stop.send(true).unwrap();
    consumer.await.unwrap();
    rate
}

/// Where a run's messages live.
enum Store {
    Embedded,
    Redis(String),
}

/// A fresh, empty backend for run number `run`.
async fn open(store: &Store, run: u32, dirs: &mut Vec<tempfile::TempDir>) -> Arc<dyn Backend> {
    match store {
        Store::Embedded => {
            let dir = tempfile::tempdir().unwrap();
            let backend = Arc::new(Embedded::open(dir.path(), DEFAULT_MAX_BYTES).unwrap());
            dirs.push(dir);
            backend
        }
        // A database of its own per run (bench/worker.sh starts a fresh server).
        Store::Redis(url) => Arc::new(
            Redis::connect(
                &format!("{}/{run}", url.trim_end_matches('/')),
                DEFAULT_MAX_BYTES,
            )
            .await
            .unwrap(),
        ),
    }
}

async fn suite(name: &str, store: Store, component: &Path) {
    let n = messages();
    let mut dirs = Vec::new();
    let backend = open(&store, 0, &mut dirs).await;
    let enqueue = fill(&backend, n).await;
    let limit = native(backend, n).await;
    println!("{name:9} enqueue (64 producers)        {enqueue:>10.0} msg/s");
    println!("{name:9} native no-op consumer         {limit:>10.0} msg/s   (the limit)");
    let mut run = 0;
    for scale in [1, 2, 8] {
        let mut rates = Vec::new();
        for _ in 0..rounds() {
            run += 1;
            let backend = open(&store, run, &mut dirs).await;
            fill(&backend, n).await;
            rates.push(wasmproc(backend, component, scale, n).await);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "{name:9} wasmproc no-op worker scale {scale}  {median:>10.0} msg/s   ({:.0}% of the limit; median of {})",
            100.0 * median / limit,
            each.join(", ")
        );
        if scale == 8 && matches!(store, Store::Embedded) {
            println!(
                "{name:9} target ≥ {TARGET} msg/s at scale 8: {}",
                if median >= f64::from(TARGET) {
                    "met"
                } else {
                    "not met"
                }
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let redis = args
        .iter()
        .position(|a| a == "--redis")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let component = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guests/target/wasm32-wasip2/release/testworker.wasm");
    assert!(
        component.exists(),
        "build the guests first: guests/build.sh"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        println!("{} messages per run, body `noop`", messages());
        suite("embedded", Store::Embedded, &component).await;
        match redis {
            Some(url) => suite("redis", Store::Redis(url), &component).await,
            None => println!("redis: skipped (pass --redis URL, as bench/worker.sh does)"),
        }
    });
}
