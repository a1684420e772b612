//! The cost of one instance, without the network: create and drop an
//! instance of the hello component; create one, handle one request in it,
//! drop it (what `reuse = 1` does per request); and handle one request in
//! an instance kept alive (what `reuse = N` does). Each on one thread, with
//! wasmproc's engine (pooling allocator sized from the formation) and with
//! wasmtime's default engine (on-demand allocation, what `wasmtime serve`
//! uses without `-O` options). Run with `cargo bench --bench instance`
//! (`bench/http.sh` runs it too); `HELLO=path.wasm` measures another build
//! of the hello guest in its place.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use wasmtime::component::Component;
use wasmtime::{Engine, Store};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use wasmproc::engine::{CompileCache, EpochTicker};
use wasmproc::formation::Formation;
use wasmproc::instance::{Grants, InstanceState};

/// How long each figure is measured for.
const MEASURE: Duration = Duration::from_secs(2);

struct Subject {
    pre: ProxyPre<InstanceState>,
    grants: Arc<Grants>,
    name: Arc<str>,
}

impl Subject {
    async fn instantiate(
        &self,
    ) -> (
        Store<InstanceState>,
        wasmtime_wasi_http::p2::bindings::Proxy,
    ) {
        let state = InstanceState::new(&self.grants, &self.name);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| state);
        store.set_epoch_deadline(u64::MAX / 2);
        let proxy = self.pre.instantiate_async(&mut store).await.unwrap();
        (store, proxy)
    }

    async fn handle(
        &self,
        store: &mut Store<InstanceState>,
        proxy: &wasmtime_wasi_http::p2::bindings::Proxy,
    ) {
        let request = http::Request::builder()
            .uri("http://localhost/")
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| -> wasmtime_wasi_http::Error { match never {} }),
            )
            .unwrap();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let mut http = store.data_mut().http();
        let req = http
            .new_incoming_request::<_>(Scheme::Http, request)
            .unwrap();
        let out = http.new_response_outparam(sender).unwrap();
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut *store, req, out)
            .await
            .unwrap();
        let response = receiver.await.unwrap().unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Hello from wasmproc\n");
    }
}

/// Runs `op` repeatedly for [`MEASURE`] and returns µs per call.
async fn per_call(mut op: impl AsyncFnMut()) -> f64 {
    for _ in 0..200 {
        op().await;
    }
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < MEASURE {
        for _ in 0..100 {
            op().await;
        }
        n += 100;
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

async fn measure(label: &str, subject: &Subject) {
    let create_drop = per_call(async || drop(subject.instantiate().await)).await;
    let create_handle_drop = per_call(async || {
        let (mut store, proxy) = subject.instantiate().await;
        subject.handle(&mut store, &proxy).await;
    })
    .await;
    let (mut store, proxy) = subject.instantiate().await;
    let handle = per_call(async || subject.handle(&mut store, &proxy).await).await;
    println!("{label:<34} {create_drop:>8.1} µs {create_handle_drop:>8.1} µs {handle:>8.1} µs");
}

fn default_engine() -> Engine {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true).epoch_interruption(true);
    Engine::new(&config).unwrap()
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hello = std::env::var_os("HELLO").map_or_else(
        || root.join("guests/target/wasm32-wasip2/release/hello.wasm"),
        std::path::PathBuf::from,
    );
    let text = format!(
        "[process.web]\nkind = \"web\"\ncomponent = \"{}\"\nscale = 64\n",
        hello.display()
    );
    let formation = Formation::parse(&root.join("bench.toml"), &text, |_| None).unwrap();
    let process = formation.processes[0].clone();
    let bytes = std::fs::read(&hello).expect("run guests/build.sh hello first");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = CompileCache::new(cache_dir.path());
    let prepared = wasmproc::run::prepare(&formation, &cache, &Default::default()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    println!(
        "{:<34} {:>11} {:>11} {:>11}",
        "engine", "create+drop", "+handle", "handle only"
    );
    for (label, engine) in [
        ("wasmproc (pooling, sized)", prepared.engine.clone()),
        ("wasmtime defaults (on demand)", default_engine()),
    ] {
        let linker = wasmproc::instance::linker(&engine, false).unwrap();
        let _ticker = EpochTicker::start(&engine).unwrap();
        let component = Component::new(&engine, &bytes).unwrap();
        let pre = ProxyPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
        let subject = Subject {
            pre,
            grants: Arc::new(Grants::new(&Arc::new(process.clone()), None, None)),
            name: Arc::from("web.1"),
        };
        runtime.block_on(measure(label, &subject));
    }
}
