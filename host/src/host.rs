//! The running host as the admin API and the autoscaler see it: its pools
//! by name, and the operations that change them at run time — scale,
//! deploy, reload — plus what `ps` and `/metrics` report.
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::registry::Registry;
use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::Linker;

use crate::engine::{CompileCache, Footprint};
use crate::formation::Kind;
use crate::instance::InstanceState;
use crate::pool::Pool;
use crate::queue::Queues;

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

/// The running host.
pub struct Host {
    pools: BTreeMap<String, Arc<Pool>>,
    engine: Engine,
    linker: Linker<InstanceState>,
    cache: CompileCache,
    capacity: u32,
    slot: Footprint,
    queues: Option<Queues>,
    registry: Registry,
    ready: AtomicBool,
    rates: BTreeMap<String, (AtomicU64, AtomicU64)>,
}

impl Host {
    /// A host over prepared pools.
    pub fn new(
        pools: &[Arc<Pool>],
        engine: Engine,
        linker: Linker<InstanceState>,
        cache: CompileCache,
        capacity: u32,
        slot: Footprint,
        queues: Option<Queues>,
    ) -> Host {
        let pools: BTreeMap<String, Arc<Pool>> = pools
            .iter()
            .map(|p| (p.process().name.clone(), p.clone()))
            .collect();
        let registry = crate::metrics::registry(&pools, &cache);
        let rates = pools
            .keys()
            .map(|k| (k.clone(), Default::default()))
            .collect();
        Host {
            pools,
            engine,
            linker,
            cache,
            capacity,
            slot,
            queues,
            registry,
            ready: AtomicBool::new(false),
            rates,
        }
    }

    /// The pools, by process type name.
    pub fn pools(&self) -> &BTreeMap<String, Arc<Pool>> {
        &self.pools
    }

    /// The queues, when the formation has workers.
    pub fn queues(&self) -> Option<&Queues> {
        self.queues.as_ref()
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
                .all(|p| p.scale() >= p.process().autoscale.map_or(p.process().scale, |a| a.min))
    }

    /// Sets one type's scale, within capacity; with `reuse > 1` the new
    /// instances are created in the background, so they are live before
    /// units arrive.
    pub fn scale(&self, name: &str, target: u32) -> Result<u32, ChangeError> {
        let pool = self
            .pools
            .get(name)
            .ok_or_else(|| ChangeError::UnknownType(name.to_string()))?;
        if target == 0 && pool.process().kind != Kind::Worker {
            return Err(ChangeError::Zero(name.to_string()));
        }
        let others: u64 = self
            .pools
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, p)| u64::from(p.scale()))
            .sum();
        let wanted = others + u64::from(target);
        if wanted > u64::from(self.capacity) {
            return Err(ChangeError::Capacity {
                wanted,
                capacity: self.capacity,
            });
        }
        let old = pool.scale();
        pool.scale_to(target);
        if target > old && pool.process().reuse > 1 {
            let pool = pool.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                let started = Instant::now();
                let n = crate::pool::prewarm_parallel(&pool).await;
                tracing::info!(process = %name, "{n} `{name}` instances live in {} ms", started.elapsed().as_millis());
            });
        }
        Ok(target)
    }

    /// Applies `web=3`, `web+2`, `web-1` changes, all or none.
    pub fn scale_all(&self, changes: &[String]) -> Result<BTreeMap<String, u32>, ChangeError> {
        let mut targets = BTreeMap::new();
        for change in changes {
            let split = change
                .find(['=', '+', '-'])
                .ok_or_else(|| ChangeError::Syntax(change.clone()))?;
            let (name, rest) = change.split_at(split);
            let pool = self
                .pools
                .get(name)
                .ok_or_else(|| ChangeError::UnknownType(name.to_string()))?;
            let n: u32 = rest[1..]
                .parse()
                .map_err(|_| ChangeError::Syntax(change.clone()))?;
            let current = *targets.get(name).unwrap_or(&pool.scale());
            let target = match &rest[..1] {
                "=" => n,
                "+" => current.saturating_add(n),
                _ => current.saturating_sub(n),
            };
            targets.insert(name.to_string(), target);
        }
        let wanted: u64 = self
            .pools
            .iter()
            .map(|(name, p)| u64::from(*targets.get(name).unwrap_or(&p.scale())))
            .sum();
        if wanted > u64::from(self.capacity) {
            return Err(ChangeError::Capacity {
                wanted,
                capacity: self.capacity,
            });
        }
        for (name, target) in &targets {
            if *target == 0 && self.pools[name].process().kind != Kind::Worker {
                return Err(ChangeError::Zero(name.clone()));
            }
        }
        for (name, target) in &targets {
            let old = self.pools[name].scale();
            self.scale(name, *target)?;
            tracing::info!(process = %name, old, new = target, "scaled `{name}` from {old} to {target} (admin API)");
        }
        Ok(targets)
    }

    /// Compiles, checks and swaps in a new component for `name`.
    pub fn deploy(&self, name: &str, bytes: &[u8]) -> Result<u64, ChangeError> {
        let pool = self
            .pools
            .get(name)
            .ok_or_else(|| ChangeError::UnknownType(name.to_string()))?;
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
        let (component, _) = self
            .cache
            .load(&self.engine, bytes)
            .map_err(|e| ChangeError::Artifact(format!("the artifact does not compile: {e:#}")))?;
        let generation = pool.deploy(&component, &self.linker).map_err(|e| {
            ChangeError::Artifact(format!(
                "the artifact does not fit `{name}`: {e:#}; it must export {}",
                crate::pool::required_export(pool.process().kind)
            ))
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

    /// Records each type's units-per-second since the last call (the
    /// sampler calls this every second).
    pub fn sample_rates(&self, elapsed: std::time::Duration) {
        for (name, pool) in &self.pools {
            let total = pool.stats.succeeded.get() + pool.stats.failures();
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
            let queue_depth = match (&p.queue, &self.queues) {
                (Some(q), Some(queues)) => queues.backend().depth(q).await.ok(),
                _ => None,
            };
            rows.push(ProcessStatus {
                name: name.clone(),
                kind: p.kind.to_string(),
                scale,
                min: p.autoscale.map(|a| a.min),
                max: p.autoscale.map(|a| a.max),
                busy,
                idle: u64::from(scale).saturating_sub(busy),
                rate: f64::from_bits(self.rates[name].1.load(Ordering::Relaxed)),
                restarts: pool.stats.failures(),
                queue_depth,
                generation: pool.generation(),
                warm: pool.warm() as u64,
            });
        }
        rows
    }
}
