//! `wasmproc check` and `wasmproc run`: from a validated formation to a
//! serving host.
//!
//! Order matters, and is the same for both commands: build (with
//! `--build`), read and inspect every component, size and create the engine,
//! compile (through the cache), link — collecting every problem before
//! reporting — and only then, for `run`, bind the socket. So a bad formation
//! never binds a port, and a user sees all that is wrong at once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use wasmtime::Engine;

use crate::engine::{self, CacheOutcome, CompileCache, Demand, EpochTicker, Footprint};
use crate::formation::{Formation, FormationError};
use crate::http::PoolRouter;
use crate::instance;
use crate::pool::Pool;
use crate::router::Router;

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

/// Everything a host needs to serve: compiled, linked pools.
pub struct Prepared {
    /// The engine all pools share.
    pub engine: Engine,
    /// One pool per process type, in formation order.
    pub pools: Vec<Arc<Pool>>,
}

/// Reads, inspects, compiles and links every component of `formation`.
pub fn prepare(formation: &Formation, cache: &CompileCache) -> anyhow::Result<Prepared> {
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
            Ok(footprint) => loaded.push((process, bytes, footprint)),
            Err(why) => errors.push(at(format!("`{}` {why}", process.component.display()))),
        }
    }
    if !errors.is_empty() {
        return Err(formation.errors(errors).into());
    }

    let demands: Vec<Demand> = loaded.iter().map(|(p, _, f)| Demand::new(p, *f)).collect();
    let engine = engine::build_engine(&demands).map_err(|e| Refused(format!("{e:#}")))?;
    let linker = instance::linker(&engine)?;
    let fuel_metered = demands.iter().any(|d| d.fuel);

    let mut pools = Vec::new();
    for (process, bytes, _) in loaded {
        let at = |message: String| formation.error_at(process.component_span.clone(), message);
        let started = Instant::now();
        let component = match cache.load(&engine, &bytes) {
            Ok((component, outcome)) => {
                let how = match outcome {
                    CacheOutcome::Hit => "loaded from the compile cache",
                    CacheOutcome::Miss => "compiled",
                };
                tracing::info!(
                    process = %process.name,
                    "`{}` {how} in {} ms ({} KiB)",
                    process.name,
                    started.elapsed().as_millis(),
                    bytes.len() / 1024
                );
                component
            }
            Err(e) => {
                errors.push(at(format!(
                    "cannot compile `{}`: {e:#}",
                    process.component.display()
                )));
                continue;
            }
        };
        match Pool::new(process.clone(), &component, &linker, fuel_metered) {
            Ok(pool) => pools.push(Arc::new(pool)),
            Err(e) => errors.push(at(link_error(process.component.display(), &e))),
        }
    }
    if !errors.is_empty() {
        return Err(formation.errors(errors).into());
    }
    Ok(Prepared { engine, pools })
}

/// Words a linking failure the way a user can act on.
fn link_error(component: std::path::Display<'_>, error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    if text.contains("wasi:http/incoming-handler") {
        format!(
            "`{component}` does not export `wasi:http/incoming-handler`: a web process type must be a `wasi:http/proxy` component"
        )
    } else {
        format!("`{component}` cannot be linked: {text}")
    }
}

/// Serves `formation` until SIGTERM or SIGINT.
pub async fn run(formation: Formation, cache: CompileCache) -> anyhow::Result<()> {
    let prepared = prepare(&formation, &cache)?;
    let _ticker = EpochTicker::start(&prepared.engine)?;
    let mut routes = Vec::new();
    for pool in &prepared.pools {
        for route in &pool.process().routes {
            routes.push((route.clone(), pool.clone()));
        }
    }
    let router: Arc<PoolRouter> = Arc::new(Router::new(routes));

    let listen = formation.http.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Refused(format!("cannot listen on {listen}: {e}")))?;
    let bound = listener.local_addr()?;
    for pool in &prepared.pools {
        let p = pool.process();
        let routes: Vec<String> = p.routes.iter().map(ToString::to_string).collect();
        tracing::info!(
            process = %p.name,
            "process type `{}`: kind {}, scale {}, reuse {}, routes {}",
            p.name,
            p.kind,
            p.scale,
            p.reuse,
            routes.join(" ")
        );
    }
    tracing::info!(addr = %bound, "listening on http://{bound}");

    crate::http::serve(
        listener,
        router,
        shutdown_signal(),
        formation.http.shutdown_grace,
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM received: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: shutting down"),
    }
}
