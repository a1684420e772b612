//! The control plane of a running host: its pools by name, as the admin API,
//! the autoscaler and signals see them, and the operations that change them
//! at run time — scale, deploy, reload on SIGHUP — plus what `ps` and
//! `/metrics` report.
//!
//! Invariants:
//! - the sum of every type's scale never exceeds `[pool] capacity`, the
//!   number of instances the pooling allocator reserved at start; a request
//!   beyond it is refused with the numbers, and nothing changes;
//! - a deploy compiles, inspects and links the new component before
//!   anything changes; a component that does not fit the pool's slots
//!   (more memories, tables or core instances than reserved), does not
//!   compile or lacks its kind's export is refused and the old one keeps
//!   serving.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::registry::Registry;
use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Linker;

use crate::engine::{self, CompileCache, Footprint};
use crate::formation::{Formation, Kind};
use crate::instance::InstanceState;
use crate::keyvalue::KeyValue;
use crate::pool::ProcessPool;
use crate::queue::Queues;
use crate::run::{Backing, Prepared};

/// Why a scale or deploy request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// No process type has that name.
    #[error("unknown process type `{0}`")]
    UnknownType(String),
    /// A change is not of the form `web=3`, `web+2` or `web-1`.
    #[error("invalid scale `{0}`: expected NAME=N, NAME+N or NAME-N")]
    Syntax(String),
    /// The instance pool has no room.
    #[error(
        "cannot scale to {wanted} instances in all: the instance pool holds {capacity} (raise `[pool] capacity` in the formation and restart)"
    )]
    Capacity {
        /// Instances the change would need in all.
        wanted: u64,
        /// The pool's capacity.
        capacity: u32,
    },
    /// Scale to zero is for workers only.
    #[error("`{0}` is not a worker: only workers may scale to zero")]
    Zero(String),
    /// The artifact was refused.
    #[error("{0}")]
    Artifact(String),
}

/// One row of `wasmproc ps`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProcessStatus {
    /// The process type.
    pub name: String,
    /// `web`, `worker` or `clock`.
    pub kind: String,
    /// Current number of instances (slots).
    pub scale: u32,
    /// Autoscaling bounds, if any.
    pub min: Option<u32>,
    /// Autoscaling bounds, if any.
    pub max: Option<u32>,
    /// Instances running a unit now.
    pub busy: u64,
    /// Instances idle.
    pub idle: u64,
    /// Units per second, over the last sampling interval.
    pub rate: f64,
    /// Instances discarded after a failed unit (and replaced).
    pub restarts: u64,
    /// Messages waiting or in flight (workers).
    pub queue_depth: Option<u64>,
    /// The deployed component's generation (1 at start, +1 per deploy).
    pub generation: u64,
    /// Idle instances that are live (created ahead, `reuse > 1`).
    pub warm: u64,
}

/// One change of `wasmproc scale`: `web=3`, `web+2` or `web-1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleChange {
    /// The process type.
    pub name: String,
    /// How the number applies.
    pub op: ScaleOp,
    /// The number.
    pub n: u32,
}

/// How a [`ScaleChange`]'s number applies to the current scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleOp {
    /// `=`: becomes the scale.
    Set,
    /// `+`: added to it.
    Add,
    /// `-`: taken from it (not below zero).
    Remove,
}

impl std::str::FromStr for ScaleChange {
    type Err = ChangeError;

    /// Parses `NAME=N`, `NAME+N` or `NAME-N`. The operator is the last
    /// `=`, `+` or `-`, so names may hold `-` (`my-web=3`).
    fn from_str(text: &str) -> Result<Self, ChangeError> {
        let syntax = || ChangeError::Syntax(text.to_string());
        let at = text.rfind(['=', '+', '-']).ok_or_else(syntax)?;
        let (name, rest) = text.split_at(at);
        let op = match rest.as_bytes().first() {
            Some(b'=') => ScaleOp::Set,
            Some(b'+') => ScaleOp::Add,
            _ => ScaleOp::Remove,
        };
        let n = rest[1..].parse().map_err(|_| syntax())?;
        if name.is_empty() || name.contains(['=', '+']) {
            return Err(syntax());
        }
        Ok(ScaleChange {
            name: name.to_string(),
            op,
            n,
        })
    }
}

impl ScaleChange {
    /// The scale this change asks for, from `current`.
    fn apply(&self, current: u32) -> u32 {
        match self.op {
            ScaleOp::Set => self.n,
            ScaleOp::Add => current.saturating_add(self.n),
            ScaleOp::Remove => current.saturating_sub(self.n),
        }
    }
}

/// What the formation file said when it was last read (at start, or on
/// SIGHUP): a reload applies only what changed in the file since, so it
/// never undoes `wasmproc scale` or `wasmproc deploy` for a type whose
/// lines did not change.
#[derive(Default)]
struct FileState {
    /// The SHA-256 of each type's component file.
    digests: BTreeMap<String, Vec<u8>>,
    /// Each type's fixed `scale`.
    scales: BTreeMap<String, u32>,
}

/// The control plane of a running host.
pub struct Control {
    pools: BTreeMap<String, Arc<dyn ProcessPool>>,
    engine: Engine,
    linker: Linker<InstanceState>,
    cache: CompileCache,
    capacity: u32,
    slot: Footprint,
    queues: Option<Queues>,
    keyvalue: Option<KeyValue>,
    /// Every bucket some type is granted.
    buckets: BTreeSet<String>,
    registry: Registry,
    ready: AtomicBool,
    rates: BTreeMap<String, (AtomicU64, AtomicU64)>,
    file: Mutex<FileState>,
    /// The last autoscale decisions, oldest first.
    decisions: Mutex<VecDeque<Decision>>,
}

/// Autoscale decisions the host remembers for the dashboard.
const DECISIONS: usize = 50;

/// An autoscale decision, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The process type.
    pub process: String,
    /// The scale before.
    pub from: u32,
    /// The scale asked for.
    pub to: u32,
    /// The signal that asked for it, and the outcome when it was refused.
    pub why: String,
}

impl Control {
    /// The control plane over the pools `prepare` made for `formation`,
    /// whose guests use `backing`.
    pub fn new(
        prepared: &Prepared,
        formation: &Formation,
        cache: CompileCache,
        backing: &Backing,
    ) -> Control {
        let pools: BTreeMap<String, Arc<dyn ProcessPool>> = prepared
            .pools
            .iter()
            .map(|p| {
                let pool = p.erased();
                (pool.process().name.clone(), pool)
            })
            .collect();
        let registry = crate::metrics::registry(&pools, &cache);
        let rates = pools
            .keys()
            .map(|k| (k.clone(), Default::default()))
            .collect();
        let file = FileState {
            digests: prepared.digests.clone(),
            scales: fixed_scales(formation),
        };
        Control {
            pools,
            engine: prepared.engine.clone(),
            linker: prepared.linker.clone(),
            cache,
            capacity: formation.capacity,
            slot: prepared.slot,
            queues: backing.queues.clone(),
            keyvalue: backing.keyvalue.clone(),
            buckets: formation
                .processes
                .iter()
                .flat_map(|p| p.keyvalue.iter().cloned())
                .collect(),
            registry,
            ready: AtomicBool::new(false),
            rates,
            file: Mutex::new(file),
            decisions: Mutex::default(),
        }
    }

    /// Remembers an autoscale decision.
    pub fn record_decision(&self, decision: Decision) {
        let mut decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        if decisions.len() == DECISIONS {
            decisions.pop_front();
        }
        decisions.push_back(decision);
    }

    /// The last autoscale decisions, oldest first.
    pub fn decisions(&self) -> Vec<Decision> {
        let decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        decisions.iter().cloned().collect()
    }

    /// The pools, by process type name.
    pub fn pools(&self) -> &BTreeMap<String, Arc<dyn ProcessPool>> {
        &self.pools
    }

    /// The queues, when the formation has workers.
    pub fn queues(&self) -> Option<&Queues> {
        self.queues.as_ref()
    }

    /// The key-value store and `bucket` in it, if some type is granted
    /// that bucket.
    pub fn bucket<'a>(&self, bucket: &'a str) -> Option<(&KeyValue, &'a str)> {
        let store = self.keyvalue.as_ref()?;
        self.buckets.contains(bucket).then_some((store, bucket))
    }

    /// The metrics registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Marks the host ready (every type started) or not (shutting down).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Ready: started, not shutting down, every type at or above its minimum.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && self
                .pools
                .values()
                .all(|p| p.scale() >= p.process().min_scale())
    }

    fn pool(&self, name: &str) -> Result<&Arc<dyn ProcessPool>, ChangeError> {
        self.pools
            .get(name)
            .ok_or_else(|| ChangeError::UnknownType(name.to_string()))
    }

    /// Sets one type's scale (see [`Control::scale_all`]).
    pub fn scale(&self, name: &str, target: u32) -> Result<u32, ChangeError> {
        self.set_scales(&BTreeMap::from([(name.to_string(), target)]))?;
        Ok(target)
    }

    /// Applies `web=3`, `web+2`, `web-1` changes, all or none; returns the
    /// new scale of every type named.
    pub fn scale_all(&self, changes: &[ScaleChange]) -> Result<BTreeMap<String, u32>, ChangeError> {
        let mut targets = BTreeMap::new();
        for change in changes {
            let current = match targets.get(&change.name) {
                Some(target) => *target,
                None => self.pool(&change.name)?.scale(),
            };
            targets.insert(change.name.clone(), change.apply(current));
        }
        let old: BTreeMap<String, u32> = targets
            .keys()
            .map(|name| (name.clone(), self.pools[name].scale()))
            .collect();
        self.set_scales(&targets)?;
        for (name, target) in &targets {
            let old = old[name];
            tracing::info!(process = %name, old, new = target, "scaled `{name}` from {old} to {target} (admin API)");
        }
        Ok(targets)
    }

    /// Sets the scales of `targets` at once, or none if one is refused:
    /// every type must exist, only workers may go to zero, and all scales
    /// together must fit the pool's capacity. With `reuse > 1` the new
    /// instances are created in the background, so they are live before
    /// units arrive.
    fn set_scales(&self, targets: &BTreeMap<String, u32>) -> Result<(), ChangeError> {
        for (name, target) in targets {
            let pool = self.pool(name)?;
            if *target == 0 && pool.process().kind() != Kind::Worker {
                return Err(ChangeError::Zero(name.clone()));
            }
        }
        let wanted: u64 = self
            .pools
            .iter()
            .map(|(name, p)| u64::from(targets.get(name).copied().unwrap_or_else(|| p.scale())))
            .sum();
        if wanted > u64::from(self.capacity) {
            return Err(ChangeError::Capacity {
                wanted,
                capacity: self.capacity,
            });
        }
        for (name, target) in targets {
            let pool = &self.pools[name];
            let old = pool.scale();
            pool.scale_to(*target);
            if *target > old && pool.process().reuse.get() > 1 {
                let pool = pool.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let n = pool.prewarm_parallel().await;
                    tracing::info!(process = %name, "{n} `{name}` instances live in {} ms", started.elapsed().as_millis());
                });
            }
        }
        Ok(())
    }

    /// Compiles, checks and swaps in a new component for `name`.
    pub fn deploy(&self, name: &str, bytes: &[u8]) -> Result<u64, ChangeError> {
        let pool = self.pool(name)?;
        let started = Instant::now();
        let footprint =
            Footprint::of(bytes).map_err(|e| ChangeError::Artifact(format!("the artifact {e}")))?;
        if footprint.memories > self.slot.memories
            || footprint.tables > self.slot.tables
            || footprint.core_instances > self.slot.core_instances
        {
            return Err(ChangeError::Artifact(format!(
                "the artifact needs {} memories, {} tables and {} core instances per instance; the pool's slots hold {}, {} and {} (restart to resize)",
                footprint.memories,
                footprint.tables,
                footprint.core_instances,
                self.slot.memories,
                self.slot.tables,
                self.slot.core_instances
            )));
        }
        if footprint.wasi_p3 && !self.slot.wasi_p3 {
            return Err(ChangeError::Artifact(
                "the artifact is a WASI 0.3 component, and this host started without one, so without the engine's async ABI (restart with it in the formation)".into(),
            ));
        }
        let process = pool.process();
        if let Some(why) =
            engine::memory_below_initial("the artifact", &footprint, process.limits.memory)
        {
            return Err(ChangeError::Artifact(why));
        }
        if footprint.fetch_event && process.reuse.get() > 1 {
            return Err(ChangeError::Artifact(format!(
                "the artifact is a componentize-js fetch-event guest, which answers one request per instance, and `{name}` reuses each instance for {} requests: set `reuse = 1` and restart (or export an `incomingHandler` from the JavaScript)",
                process.reuse
            )));
        }
        let (component, _) = self
            .cache
            .load(&self.engine, bytes)
            .map_err(|e| ChangeError::Artifact(format!("the artifact does not compile: {e:#}")))?;
        let generation = pool.deploy(&component, &self.linker).map_err(|e| {
            ChangeError::Artifact(match e.downcast_ref::<crate::pool::Unsuited>() {
                Some(unsuited) => format!("the artifact cannot serve `{name}`: {unsuited}"),
                None => format!(
                    "the artifact does not fit `{name}`: {e:#}; it must export {}",
                    pool.required_export()
                ),
            })
        })?;
        tracing::info!(
            process = name,
            generation,
            "deployed a new component to `{name}` (generation {generation}, {} KiB, ready in {} ms); old instances finish their units",
            bytes.len() / 1024,
            started.elapsed().as_millis()
        );
        Ok(generation)
    }

    /// SIGHUP: reads the formation file at `path` again; deploys every
    /// component whose file changed since it was last read and applies
    /// every fixed `scale` the file changed. Anything that needs a restart
    /// (types added or removed, other settings) is logged and left.
    pub fn reload(&self, path: &Path) {
        let formation = match Formation::load(path, |name| std::env::var(name).ok()) {
            Ok(f) => f,
            Err(errors) => {
                tracing::error!("reload refused; the running formation stays:\n{errors}");
                return;
            }
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        for process in &formation.processes {
            let name = &process.name;
            let Some(pool) = self.pools.get(name) else {
                tracing::warn!(process = %name, "reload: new process type `{name}` needs a restart");
                continue;
            };
            match engine::read_component(&process.component) {
                Ok(bytes) => {
                    let new = engine::digest(&bytes);
                    if file.digests.get(name) != Some(&new) {
                        match self.deploy(name, &bytes) {
                            Ok(_) => {
                                file.digests.insert(name.clone(), new);
                            }
                            Err(e) => {
                                tracing::error!(process = %name, "reload: deploy refused: {e}")
                            }
                        }
                    }
                }
                Err(e) => tracing::error!(process = %name, "reload: {e:#}"),
            }
            if process.autoscale.is_none() && file.scales.get(name) != Some(&process.scale) {
                let old = pool.scale();
                let new = process.scale;
                match self.scale(name, new) {
                    Ok(_) => {
                        file.scales.insert(name.clone(), new);
                        tracing::info!(process = %name, old, new, "reload: scaled `{name}` from {old} to {new}");
                    }
                    Err(e) => tracing::error!(process = %name, "reload: {e}"),
                }
            }
        }
        for name in self.pools.keys() {
            if !formation.processes.iter().any(|p| &p.name == name) {
                tracing::warn!(process = %name, "reload: removing process type `{name}` needs a restart");
            }
        }
    }

    /// Records each type's units-per-second since the last call (the
    /// sampler calls this every second).
    pub fn sample_rates(&self, elapsed: std::time::Duration) {
        for (name, pool) in &self.pools {
            let total = pool.stats().ended();
            let (last, rate) = &self.rates[name];
            let before = last.swap(total, Ordering::Relaxed);
            let per_second = total.saturating_sub(before) as f64 / elapsed.as_secs_f64().max(0.001);
            rate.store(per_second.to_bits(), Ordering::Relaxed);
        }
    }

    /// The `ps` table.
    pub async fn ps(&self) -> Vec<ProcessStatus> {
        let mut rows = Vec::new();
        for (name, pool) in &self.pools {
            let p = pool.process();
            let busy = pool.busy();
            let scale = pool.scale();
            let queue_depth = match (p.queue(), &self.queues) {
                (Some(q), Some(queues)) => queues.backend().depth(q).await.ok(),
                _ => None,
            };
            rows.push(ProcessStatus {
                name: name.clone(),
                kind: p.kind().to_string(),
                scale,
                min: p.autoscale.map(|a| a.min),
                max: p.autoscale.map(|a| a.max),
                busy,
                idle: u64::from(scale).saturating_sub(busy),
                rate: f64::from_bits(self.rates[name].1.load(Ordering::Relaxed)),
                restarts: pool.stats().failures(),
                queue_depth,
                generation: pool.generation(),
                warm: pool.warm() as u64,
            });
        }
        rows
    }
}

/// The fixed scales of `formation`'s types (autoscaled types have none).
fn fixed_scales(formation: &Formation) -> BTreeMap<String, u32> {
    formation
        .processes
        .iter()
        .filter(|p| p.autoscale.is_none())
        .map(|p| (p.name.clone(), p.scale))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_changes_split_at_their_last_operator() {
        let change = |text: &str| text.parse::<ScaleChange>();
        assert_eq!(
            change("my-web=3").unwrap(),
            ScaleChange {
                name: "my-web".into(),
                op: ScaleOp::Set,
                n: 3
            }
        );
        assert_eq!(change("web+2").unwrap().op, ScaleOp::Add);
        let down = change("my-worker-1").unwrap();
        assert_eq!(
            (down.name.as_str(), down.op, down.n),
            ("my-worker", ScaleOp::Remove, 1)
        );
        assert_eq!(down.apply(0), 0);
        for bad in ["web", "web=", "=3", "web=x", "web=-1"] {
            assert!(change(bad).is_err(), "{bad}");
        }
    }
}
