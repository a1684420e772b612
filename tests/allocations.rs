//! Regression guard for the request path: how many heap allocations one
//! HTTP request costs the host, counted by a global allocator, not timed.
//!
//! The host runs in this process (the library's `prepare` and `http::serve`);
//! the client is a blocking `std` socket with buffers allocated up front, so
//! every allocation counted while requests run belongs to the host and the
//! guest's host calls. The bounds sit a little above what the code does
//! today: a change that adds work to every request fails here, whatever the
//! machine's speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmproc::engine::{CompileCache, EpochTicker};
use wasmproc::formation::Formation;
use wasmproc::http::PoolRouter;
use wasmproc::router::Router;
use wasmproc::run::KindPool;

/// Counts allocations (and reallocations, which may move) process-wide.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Requests measured per run (after as many to warm up).
const REQUESTS: u64 = 2_000;

/// Serves the hello guest with `reuse` in this process and returns the
/// allocations per request over one keep-alive connection.
fn allocations_per_request(reuse: u32) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[process.web]\nkind = \"web\"\ncomponent = \"{}\"\nscale = 4\nreuse = {reuse}\n",
        common::guest("hello")
    );
    let formation = Formation::parse(&dir.path().join("formation.toml"), &text, |_| None).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = CompileCache::new(common::shared_cache());
    let prepared = wasmproc::run::prepare(&formation, &cache, &Default::default()).unwrap();
    let _ticker = EpochTicker::start(&prepared.engine).unwrap();
    let KindPool::Web(pool) = prepared.pools[0].clone() else {
        panic!("the formation has one web type");
    };
    let routes = pool
        .role()
        .routes
        .iter()
        .map(|r| (r.clone(), pool.clone()))
        .collect();
    let router: Arc<PoolRouter> = Arc::new(Router::new(routes));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(wasmproc::http::serve(
        listener,
        router,
        formation.http.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    let mut client = TcpStream::connect(addr).unwrap();
    client.set_nodelay(true).unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut buffer = vec![0u8; 64 << 10];
    let mut round_trip = |client: &mut TcpStream| {
        client.write_all(request).unwrap();
        // The hello guest answers with a chunked body: read until its end.
        let mut filled = 0;
        loop {
            let n = client.read(&mut buffer[filled..]).unwrap();
            assert!(n > 0, "connection closed mid-response");
            filled += n;
            let seen = &buffer[..filled];
            if seen.ends_with(b"0\r\n\r\n") {
                assert!(seen.starts_with(b"HTTP/1.1 200 OK"));
                assert!(
                    seen.windows(19).any(|w| w == b"Hello from wasmproc"),
                    "unexpected response: {}",
                    String::from_utf8_lossy(seen)
                );
                return;
            }
        }
    };
    for _ in 0..REQUESTS {
        round_trip(&mut client);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..REQUESTS {
        round_trip(&mut client);
    }
    let per_request = (ALLOCATIONS.load(Ordering::Relaxed) - before) / REQUESTS;
    drop(client);
    let _ = stop.send(());
    runtime.block_on(server).unwrap();
    per_request
}

/// Allocations per request measured when the bounds were set (wasmtime
/// 48.0.8, hyper 1): 102 with a fresh instance, 46 with a reused one (99
/// and 43 before the front was hardened: the exchange record, the relay of
/// the guest's answer and hyper's header-timeout timer cost one each). Most
/// are wasmtime's and wasi-http's own (resources, fields, body streams; the
/// guest's `blocking-write-and-flush` boxes the host's stream futures); the
/// host's share is the instance state, the request body adapter and the unit.
const FRESH_BOUND: u64 = 112;
const REUSE_BOUND: u64 = 50;

#[test]
fn a_request_allocates_a_bounded_number_of_times() {
    let fresh = allocations_per_request(1);
    let reuse = allocations_per_request(1000);
    eprintln!("allocations per request: fresh instance {fresh}, reused instance {reuse}");
    assert!(
        fresh <= FRESH_BOUND,
        "a request in a fresh instance allocates {fresh} times, more than {FRESH_BOUND}"
    );
    assert!(
        reuse <= REUSE_BOUND,
        "a request in a reused instance allocates {reuse} times, more than {REUSE_BOUND}"
    );
}
