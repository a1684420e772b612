//! `wasmproc check` and `wasmproc run`: from a validated formation to a
//! serving host.
//!
//! Order matters, and is the same for both commands: build (with
//! `--build`), read and inspect every component, size and create the engine,
//! compile (through the cache), link — collecting every problem before
//! reporting — and only then, for `run`, bind the socket. So a bad formation
//! never binds a port, and a user sees all that is wrong at once.
//!
//! Compiling is the slow step: a cold compile of a 13–22 MB JavaScript or
//! Python component takes seconds. Every distinct component compiles at
//! once, each on a thread of its own, and each type logs its component's
//! size when its compile starts and the time it took when done. What can be
//! refused from the binary alone (not a component, more initial memory than
//! `limits.memory`) is refused before anything compiles.

use std::collections::BTreeSet;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use wasmtime::Engine;

use tokio::sync::watch;

use crate::clock::ClockWorld;
use crate::control::Control;
use crate::engine::{self, CacheOutcome, CompileCache, Demand, EpochTicker, Footprint};
use crate::formation::{Formation, FormationError, Kind, ProcessType, Role};
use crate::http::{PoolRouter, ProxyWorld};
use crate::keyvalue::KeyValue;
use crate::pool::{Parts, Pool, ProcessPool, Unsuited, World};
use crate::queue::Queues;
use crate::router::Router;
use crate::worker::WorkerWorld;
use crate::{admin, autoscale, clock, instance, worker};

/// A refusal to start that is the formation's fault (exit code 2), such as
/// a pool that cannot be reserved or a build command that fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Where compiled components are cached when `--cache-dir` is not given:
/// `.wasmproc/cache` beside the formation file.
pub fn default_cache_dir(formation: &Formation) -> PathBuf {
    formation.dir.join(".wasmproc").join("cache")
}

/// Runs each process type's `build` command (each distinct command once),
/// in the formation's folder.
pub fn build(formation: &Formation) -> anyhow::Result<()> {
    let mut done = BTreeSet::new();
    for process in &formation.processes {
        let Some(command) = &process.build else {
            continue;
        };
        if !done.insert(command.clone()) {
            continue;
        }
        tracing::info!(process = %process.name, "building `{}`: {command}", process.name);
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(&formation.dir)
            .stdout(std::process::Stdio::inherit())
            .status()
            .with_context(|| format!("cannot run the build command of `{}`", process.name))?;
        if !status.success() {
            return Err(Refused(format!(
                "the build command of `{}` failed ({status}): {command}",
                process.name
            ))
            .into());
        }
    }
    Ok(())
}

/// A prepared pool, typed by its kind, for the kind's front.
#[derive(Clone)]
pub enum KindPool {
    /// A web type's pool.
    Web(Arc<Pool<ProxyWorld>>),
    /// A worker's pool.
    Worker(Arc<Pool<WorkerWorld>>),
    /// A clock's pool.
    Clock(Arc<Pool<ClockWorld>>),
}

impl KindPool {
    /// A pool of `process`'s kind.
    fn new(process: &ProcessType, parts: &Parts<'_>) -> anyhow::Result<KindPool> {
        let p = process.clone();
        Ok(match &process.role {
            Role::Web(web) => KindPool::Web(Arc::new(Pool::new(p, web.clone(), parts)?)),
            Role::Worker(w) => KindPool::Worker(Arc::new(Pool::new(p, w.clone(), parts)?)),
            Role::Clock(c) => KindPool::Clock(Arc::new(Pool::new(p, c.clone(), parts)?)),
        })
    }

    /// The same pool, as the control plane sees every kind.
    pub fn erased(&self) -> Arc<dyn ProcessPool> {
        match self {
            KindPool::Web(pool) => pool.clone(),
            KindPool::Worker(pool) => pool.clone(),
            KindPool::Clock(pool) => pool.clone(),
        }
    }
}

/// What a component of `kind` must export, for error messages.
fn required_export(kind: Kind) -> &'static str {
    match kind {
        Kind::Web => ProxyWorld::REQUIRED_EXPORT,
        Kind::Worker => WorkerWorld::REQUIRED_EXPORT,
        Kind::Clock => ClockWorld::REQUIRED_EXPORT,
    }
}

/// Everything a host needs to serve: compiled, linked pools.
pub struct Prepared {
    /// The engine all pools share.
    pub engine: Engine,
    /// The linker every pool uses (and deploys use).
    pub linker: wasmtime::component::Linker<crate::instance::InstanceState>,
    /// What one pool slot holds.
    pub slot: Footprint,
    /// One pool per process type, in formation order.
    pub pools: Vec<KindPool>,
    /// The SHA-256 of each type's component, by name (a reload redeploys
    /// only what changed).
    pub digests: std::collections::BTreeMap<String, Vec<u8>>,
}

/// The backing services (12-factor IV) guests reach through the host: the
/// queues and the key-value store, each opened only when some process
/// type uses it (`None` when checking only).
#[derive(Clone, Default)]
pub struct Backing {
    /// The queues, when the formation has workers.
    pub queues: Option<Queues>,
    /// The key-value store, when some type lists `keyvalue` buckets.
    pub keyvalue: Option<KeyValue>,
}

impl Backing {
    /// Opens what `formation` needs.
    pub async fn open(formation: &Formation) -> Result<Backing, Refused> {
        let queues = if needs_queues(formation) {
            let queues = Queues::open(formation)
                .await
                .map_err(|e| Refused(format!("cannot open the queue: {e:#}")))?;
            Some(queues)
        } else {
            None
        };
        let keyvalue = if KeyValue::needed(formation) {
            let store = KeyValue::open(formation)
                .await
                .map_err(|e| Refused(format!("cannot open the key-value store: {e:#}")))?;
            Some(store)
        } else {
            None
        };
        Ok(Backing { queues, keyvalue })
    }
}

/// Reads, inspects, compiles and links every component of `formation`.
/// Guests enqueue through `queues` (`None` when checking only). First
/// refuses ([`Refused`]) a compile cache directory others could write.
pub fn prepare(
    formation: &Formation,
    cache: &CompileCache,
    backing: &Backing,
) -> anyhow::Result<Prepared> {
    cache.open().map_err(|e| Refused(e.to_string()))?;
    let mut errors: Vec<FormationError> = Vec::new();
    let mut loaded = Vec::new();
    for process in &formation.processes {
        let at = |message: String| formation.error_at(process.component_span.clone(), message);
        let bytes = match engine::read_component(&process.component) {
            Ok(bytes) => bytes,
            Err(e) => {
                errors.push(at(format!("{e:#}")));
                continue;
            }
        };
        match Footprint::of(&bytes) {
            Ok(footprint) => {
                let memory = process.limits.memory;
                let what = format!("`{}`", process.component.display());
                match engine::memory_below_initial(&what, &footprint, memory) {
                    Some(why) => errors.push(memory_error(formation, process, why)),
                    None => loaded.push((process, bytes, footprint)),
                }
            }
            Err(why) => errors.push(at(format!("`{}` {why}", process.component.display()))),
        }
    }
    if !errors.is_empty() {
        return Err(formation.errors(errors).into());
    }

    let demands: Vec<Demand> = loaded.iter().map(|(p, _, f)| Demand::new(p, *f)).collect();
    let engine = engine::build_engine(&demands, formation.capacity)
        .map_err(|e| Refused(format!("{e:#}")))?;
    let slot = engine::slot_footprint(&demands);
    let linker = instance::linker(&engine, slot.wasi_p3)?;
    let digests = loaded
        .iter()
        .map(|(p, bytes, _)| (p.name.clone(), engine::digest(bytes)))
        .collect();
    let fuel_metered = demands.iter().any(|d| d.fuel);

    let compiled = compile_all(&engine, cache, &loaded);
    let mut pools = Vec::new();
    for ((process, _, footprint), component) in loaded.iter().zip(compiled) {
        let at = |message: String| formation.error_at(process.component_span.clone(), message);
        let component = match component {
            Ok(component) => component,
            Err(e) => {
                errors.push(at(format!(
                    "cannot compile `{}`: {e}",
                    process.component.display()
                )));
                continue;
            }
        };
        let parts = Parts {
            component: &component,
            linker: &linker,
            fuel_metered,
            queues: backing.queues.as_ref(),
            keyvalue: backing.keyvalue.as_ref(),
        };
        match KindPool::new(&serving(process, footprint), &parts) {
            Ok(pool) => pools.push(pool),
            Err(e) => errors.push(at(link_error(process, &e))),
        }
    }
    if !errors.is_empty() {
        return Err(formation.errors(errors).into());
    }
    Ok(Prepared {
        engine,
        linker,
        slot,
        pools,
        digests,
    })
}

/// The error of a component that starts with more linear memory than its
/// type's `limits.memory`: at `memory = "…"` when the file sets it, else at
/// `component` (the limit is the default).
fn memory_error(formation: &Formation, process: &ProcessType, why: String) -> FormationError {
    match &process.memory_span {
        Some(span) => formation.error_at(span.clone(), why),
        None => formation.error_at(
            process.component_span.clone(),
            format!(
                "{why}; `limits.memory` defaults to {} MiB: set it with `limits = {{ memory = \"…\" }}`",
                crate::formation::DEFAULT_MEMORY >> 20
            ),
        ),
    }
}

/// Compiles (or loads from the cache) the component of every loaded type,
/// each distinct component once and all of them at once, one thread each:
/// a cold compile of a 20 MB JavaScript or Python component takes seconds,
/// and a formation of several should wait for the slowest, not their sum.
/// Logs, per type, the component's size when a compile starts (so a long
/// wait is explained while it lasts) and the time when it is done. Returns
/// one result per entry of `loaded`, in order.
fn compile_all(
    engine: &Engine,
    cache: &CompileCache,
    loaded: &[(&ProcessType, Vec<u8>, Footprint)],
) -> Vec<Result<wasmtime::component::Component, String>> {
    use std::collections::BTreeMap;
    use wasmtime::component::Component;
    // The first type of each distinct component compiles it for the others.
    let mut first: BTreeMap<&[u8], usize> = BTreeMap::new();
    let owners: Vec<usize> = loaded
        .iter()
        .enumerate()
        .map(|(i, (_, bytes, _))| *first.entry(bytes.as_slice()).or_insert(i))
        .collect();
    let compiled: BTreeMap<usize, Result<Component, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = loaded
            .iter()
            .enumerate()
            .filter(|(i, _)| owners[*i] == *i)
            .map(|(i, (process, bytes, _))| {
                (
                    i,
                    scope.spawn(move || compile_one(engine, cache, process, bytes)),
                )
            })
            .collect();
        threads
            .into_iter()
            .map(|(i, thread)| {
                let panicked = || Err("the compiling thread panicked".to_string());
                (i, thread.join().unwrap_or_else(|_| panicked()))
            })
            .collect()
    });
    loaded
        .iter()
        .zip(&owners)
        .map(|((process, _, _), &owner)| {
            if let Some((first, _, _)) = loaded.get(owner)
                && first.name != process.name
            {
                tracing::info!(process = %process.name, "`{}` runs the component of `{}`", process.name, first.name);
            }
            compiled
                .get(&owner)
                .cloned()
                .unwrap_or_else(|| Err("its component was not compiled".to_string()))
        })
        .collect()
}

/// Compiles or loads `process`'s component, logging as [`compile_all`] says.
fn compile_one(
    engine: &Engine,
    cache: &CompileCache,
    process: &ProcessType,
    bytes: &[u8],
) -> Result<wasmtime::component::Component, String> {
    let name = &process.name;
    let size = bytes.len() as u64;
    let (shown, _, unit) = engine::same_unit(size, size);
    let started = Instant::now();
    let compiling = || {
        tracing::info!(process = %name, "compiling `{name}` ({shown} {unit}): not in the compile cache");
    };
    match cache.load_telling(engine, bytes, compiling) {
        Ok((component, outcome)) => {
            let how = match outcome {
                CacheOutcome::Hit => "loaded from the compile cache",
                CacheOutcome::Miss => "compiled",
            };
            tracing::info!(
                process = %name,
                "`{name}` {how} in {} ms ({} KiB)",
                started.elapsed().as_millis(),
                size / 1024
            );
            Ok(component)
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The process type as its pool runs it. A componentize-js fetch-event
/// guest answers one request per instance (its `respondWith` cannot be
/// called twice), so with `reuse > 1` every second request would fail: its
/// instances are retired after their first request instead, and a warning
/// says so (`check` prints it too).
fn serving<'a>(
    process: &'a ProcessType,
    footprint: &Footprint,
) -> std::borrow::Cow<'a, ProcessType> {
    if !(footprint.fetch_event && process.reuse.get() > 1) {
        return std::borrow::Cow::Borrowed(process);
    }
    tracing::warn!(
        process = %process.name,
        "`{}` is a componentize-js fetch-event guest, which answers one request per instance: each instance is retired after its first request (`reuse = {}` is treated as 1; set `reuse = 1`, or export an `incomingHandler` to serve many requests per instance)",
        process.name,
        process.reuse
    );
    let mut once = process.clone();
    once.reuse = std::num::NonZeroU32::MIN;
    std::borrow::Cow::Owned(once)
}

/// Words a linking failure the way a user can act on.
fn link_error(process: &ProcessType, error: &anyhow::Error) -> String {
    let component = process.component.display();
    if let Some(unsuited) = error.downcast_ref::<Unsuited>() {
        return format!("`{component}` cannot serve `{}`: {unsuited}", process.name);
    }
    let text = format!("{error:#}");
    if text.contains("no exported instance named")
        || text.contains("export") && !text.contains("import")
    {
        format!(
            "`{component}` does not export {}",
            required_export(process.kind())
        )
    } else {
        format!("`{component}` cannot be linked: {text}")
    }
}

/// Whether the formation needs a queue backend: it has a worker, or a
/// clock whose firings hosts sharing a Redis backend must claim.
pub fn needs_queues(formation: &Formation) -> bool {
    let shared = matches!(
        formation.queue.backend,
        crate::formation::QueueBackend::Redis { .. }
    );
    formation
        .processes
        .iter()
        .any(|p| p.kind() == Kind::Worker || shared && p.kind() == Kind::Clock)
}

/// Serves `formation` until SIGTERM or SIGINT.
pub async fn run(formation: Formation, cache: CompileCache) -> anyhow::Result<()> {
    serve(formation, cache, false).await
}

/// Serves `formation` like [`run`], rebuilding and redeploying its types
/// when their sources change (`wasmproc dev`, see [`crate::dev`]).
pub async fn dev(formation: Formation, cache: CompileCache) -> anyhow::Result<()> {
    serve(formation, cache, true).await
}

async fn serve(formation: Formation, cache: CompileCache, watch: bool) -> anyhow::Result<()> {
    let backing = Backing::open(&formation).await?;
    let queues = backing.queues.clone();
    let prepared = prepare(&formation, &cache, &backing)?;
    check_map_count(formation.capacity);
    check_open_files(&formation);
    let _ticker = EpochTicker::start(&prepared.engine)?;
    let grace = formation.http.shutdown_grace;

    // Bind every socket before anything runs, so a taken port fails the start.
    let admin_listener = bind(formation.admin.listen, "the admin API").await?;
    let admin_addr = admin_listener.local_addr()?;
    let web: Vec<&Arc<Pool<ProxyWorld>>> = prepared
        .pools
        .iter()
        .filter_map(|p| match p {
            KindPool::Web(pool) => Some(pool),
            KindPool::Worker(_) | KindPool::Clock(_) => None,
        })
        .collect();
    let http_listener = if web.is_empty() {
        None
    } else {
        Some(bind(formation.http.listen, "HTTP").await?)
    };

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let control = Arc::new(Control::new(&prepared, &formation, cache, &backing));
    let mut tasks = tokio::task::JoinSet::new();
    let keys = Arc::new(admin::Keys::generate(formation.admin.token.as_deref())?);
    let admin_files = AdminFiles::write(&formation.dir, admin_addr, keys.per_start());
    tasks.spawn(admin::serve(
        admin_listener,
        control.clone(),
        keys.clone(),
        formation.path.display().to_string(),
        until_stopped(stopped.clone()),
    ));
    tasks.spawn(autoscale::run(control.clone(), stopped.clone()));
    if watch {
        tasks.spawn(crate::dev::watch(
            control.clone(),
            formation.clone(),
            stopped.clone(),
        ));
    }
    tracing::info!(addr = %admin_addr, "admin API on http://{admin_addr}");
    // A login link is a secret: it goes to the operator's terminal, never
    // into the log, which others often read.
    tracing::info!(
        "dashboard: http://{admin_addr}/ui (`wasmproc ui -f {}` prints a one-time login link)",
        formation.path.display()
    );
    if std::io::stderr().is_terminal() {
        let link = admin::ui::login_link(&keys, admin_addr)?;
        eprintln!("dashboard login link (works once, within 15 minutes): {link}");
    }

    for pool in &prepared.pools {
        let p = pool.erased();
        let p = p.process();
        let what = match &p.role {
            Role::Web(web) => {
                let routes: Vec<String> = web.routes.iter().map(ToString::to_string).collect();
                format!("routes {}", routes.join(" "))
            }
            Role::Worker(worker) => format!("queue {}", worker.queue),
            Role::Clock(clock) => format!("schedule \"{}\" ({})", clock.expression, clock.timezone),
        };
        tracing::info!(
            process = %p.name,
            "process type `{}`: kind {}, scale {}, reuse {}, {what}",
            p.name,
            p.kind(),
            p.scale,
            p.reuse
        );
        match (pool, &queues) {
            (KindPool::Worker(pool), Some(queues)) => {
                tasks.spawn(worker::consume(
                    pool.clone(),
                    queues.clone(),
                    stopped.clone(),
                ));
            }
            (KindPool::Clock(pool), queues) => {
                let shared = queues.as_ref().map(|q| q.backend().clone());
                tasks.spawn(clock::schedule(pool.clone(), shared, stopped.clone()));
            }
            (KindPool::Web(_) | KindPool::Worker(_), _) => {}
        }
    }
    if let Some(listener) = http_listener {
        let routes = web
            .iter()
            .flat_map(|pool| {
                pool.role()
                    .routes
                    .iter()
                    .map(|route| (route.clone(), (*pool).clone()))
            })
            .collect();
        let router: Arc<PoolRouter> = Arc::new(Router::new(routes));
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "listening on http://{bound}");
        tasks.spawn(crate::http::serve(
            listener,
            router,
            formation.http.clone(),
            until_stopped(stopped.clone()),
        ));
    }

    for pool in control.pools().values() {
        if pool.process().reuse.get() > 1 {
            let started = std::time::Instant::now();
            let n = pool.clone().prewarm_parallel().await;
            tracing::info!(process = %pool.process().name, "{n} `{}` instances live in {} ms", pool.process().name, started.elapsed().as_millis());
        }
    }
    control.set_ready(true);
    tracing::info!("ready: {} process types running", prepared.pools.len());
    while let Signal::Reload = next_signal().await {
        control.reload(&formation.path);
    }
    control.set_ready(false);
    let _ = stop.send(true);
    // The HTTP front drains its connections within the grace period; the
    // worker and clock loops stop taking work. Then every pool drains.
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    for pool in control.pools().values() {
        if !pool.drain(grace).await {
            tracing::warn!(process = %pool.process().name, "grace period over: abandoning running units");
        }
    }
    drop(admin_files);
    tracing::info!("stopped");
    Ok(())
}

/// Where the CLI finds a running host: `.wasmproc/admin.addr` (the admin
/// address) and `.wasmproc/admin.token` (the token generated at start,
/// readable by the owner only), beside the formation. The token is written
/// first, so a CLI that reads this start's address reads its token too.
/// Both are removed when the host stops.
struct AdminFiles {
    files: Vec<PathBuf>,
}

impl AdminFiles {
    fn write(dir: &std::path::Path, addr: std::net::SocketAddr, token: &str) -> AdminFiles {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let folder = dir.join(".wasmproc");
        let token_file = folder.join("admin.token");
        let addr_file = folder.join("admin.addr");
        let written = std::fs::create_dir_all(&folder)
            .and_then(|()| {
                // A fresh file, so an old one's looser mode is not kept.
                let _ = std::fs::remove_file(&token_file);
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&token_file)?
                    .write_all(token.as_bytes())
            })
            .and_then(|()| std::fs::write(&addr_file, addr.to_string()));
        if let Err(e) = written {
            tracing::warn!(
                "cannot write `{}` and `{}`: {e}; the CLI will need `--admin {addr}` and a token",
                addr_file.display(),
                token_file.display()
            );
        }
        AdminFiles {
            files: vec![addr_file, token_file],
        }
    }
}

impl Drop for AdminFiles {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Memory mappings one live instance takes (its linear memory, tables and
/// their guard regions split the pool's reservations), measured.
const MAPS_PER_INSTANCE: u64 = 10;

/// Warns when Linux's `vm.max_map_count` caps live instances below the
/// pool's capacity: past it, instantiation fails with ENOMEM.
fn check_map_count(capacity: u32) {
    let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    else {
        return;
    };
    let need = u64::from(capacity) * MAPS_PER_INSTANCE + 10_000;
    if need > limit {
        tracing::warn!(
            "the pool can hold {capacity} instances, but vm.max_map_count is {limit}: only about {} can be live at once (each takes ~{MAPS_PER_INSTANCE} memory mappings); raise it with `sysctl -w vm.max_map_count={need}`",
            limit / MAPS_PER_INSTANCE
        );
    }
}

/// Descriptors the host needs beyond its connections: the queue store, the
/// epoch ticker, the runtime's own, log pipes, compile cache reads.
const RESERVED_FILES: u64 = 256;

/// Raises the soft limit on open files to the hard limit (a host that
/// serves many connections must not stop at the usual 1,024), then warns
/// when the formation's connection bounds could still use them all up:
/// the HTTP front's `max_connections`, the admin API's own, and each
/// type's outbound `type_connections`.
fn check_open_files(formation: &Formation) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut current = limit.current;
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        ) {
            Ok(()) => current = Some(hard),
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    let Some(available) = current else {
        return;
    };
    let outbound: u64 = formation
        .processes
        .iter()
        .map(|p| u64::from(p.limits.type_connections))
        .sum();
    let need = u64::from(formation.http.max_connections)
        + u64::from(admin::MAX_CONNECTIONS)
        + outbound
        + RESERVED_FILES;
    if need > available {
        tracing::warn!(
            "the open-file limit is {available}, but the formation may use {need} (http.max_connections {} + admin {} + outbound type_connections {outbound} + {RESERVED_FILES} reserved): lower `[http] max_connections` or raise the limit (`ulimit -n`)",
            formation.http.max_connections,
            admin::MAX_CONNECTIONS
        );
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Refused(format!("cannot listen on {addr} for {what}: {e}")))?;
    // Out of guests' reach, whatever `allow_outbound` says.
    crate::outbound::guard_listener(listener.local_addr()?);
    Ok(listener)
}

/// What a signal asks of the host.
enum Signal {
    /// SIGHUP: reload the formation file.
    Reload,
    /// SIGTERM or SIGINT: shut down.
    Stop,
}

/// Waits for SIGHUP, SIGTERM or SIGINT.
async fn next_signal() -> Signal {
    use tokio::signal::unix::{SignalKind, signal};
    let wait = |kind: SignalKind, name: &'static str| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch {name}: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = wait(SignalKind::hangup(), "SIGHUP") => {
            tracing::info!("SIGHUP received: reloading the formation");
            Signal::Reload
        }
        () = wait(SignalKind::terminate(), "SIGTERM") => {
            tracing::info!("SIGTERM received: shutting down");
            Signal::Stop
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT received: shutting down");
            Signal::Stop
        }
    }
}
