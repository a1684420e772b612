//! The one wasmtime [`Engine`] of a host, sized from the formation, and the
//! on-disk compile cache.
//!
//! Why one engine: compiled code, the pooling allocator and the epoch
//! counter are all per engine, and every process type shares them.
//!
//! Invariants:
//! - the pooling allocator is sized from the formation before anything is
//!   compiled: `[pool] capacity` component instances (room for every type at
//!   its largest scale, twice over for deploys and scale-ups), each with
//!   room for the largest footprint among the components — the memories,
//!   tables and core instances it defines (counted from the binary by
//!   [`Footprint::of`]). If the pool cannot be reserved, [`build_engine`]
//!   fails with the arithmetic and what to lower; there is no silent
//!   fallback to on-demand allocation;
//! - epoch interruption is always on, driven by one [`EpochTicker`] thread;
//!   a store's deadline is counted in ticks of [`EPOCH_TICK`];
//! - fuel is consumed only when some process type sets `limits.fuel`;
//! - a compiled artifact is cached under the SHA-256 of the component bytes
//!   and the engine's compatibility hash, so a second start of the same
//!   artifact never recompiles, and a wasmproc built with other settings
//!   never loads an incompatible artifact.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::formation::ProcessType;

/// How often the epoch ticker advances the engine's epoch. Timeouts are
/// enforced to this precision, and a busy guest yields to other tasks this
/// often.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Address space the pool may reserve for linear memories before wasmproc
/// stops giving each memory a 4 GiB reservation (which lets compiled code
/// skip bounds checks) and reserves only each type's `limits.memory`.
pub const FAST_MEMORY_ADDRESS_BUDGET: u64 = 16 << 40;

/// Guard region after each linear memory in the fast (4 GiB) layout.
const FAST_MEMORY_GUARD: u64 = 32 << 20;
/// Guard region after each linear memory in the dense layout.
const DENSE_MEMORY_GUARD: u64 = 64 << 10;
/// Bytes of each slot that stay mapped between instances and are reset with
/// `memset` (or PAGEMAP_SCAN) instead of `madvise`: cheaper for small guests.
const KEEP_RESIDENT: usize = 1 << 20;
/// Wasm stack limit per call.
const MAX_WASM_STACK: usize = 512 << 10;

/// What one instance of a component takes from the pooling allocator,
/// counted from the component binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Linear memories defined (not imported) by its core modules.
    pub memories: u32,
    /// Tables defined by its core modules.
    pub tables: u32,
    /// Core instances it instantiates.
    pub core_instances: u32,
}

/// Why a file cannot be a component.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotAComponent {
    /// Not WebAssembly at all.
    #[error("is not a WebAssembly file (expected a WASI 0.2 component)")]
    NotWasm,
    /// A core module.
    #[error(
        "is a core WebAssembly module, not a component: build it for `wasm32-wasip2` or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// Malformed.
    #[error("is not a valid component: {0}")]
    Invalid(String),
}

impl Footprint {
    /// Counts what one instance of the component `bytes` takes.
    pub fn of(bytes: &[u8]) -> Result<Footprint, NotAComponent> {
        use wasmparser::{Parser, Payload};
        if !bytes.starts_with(b"\0asm") {
            return Err(NotAComponent::NotWasm);
        }
        if Parser::is_core_wasm(bytes) {
            return Err(NotAComponent::CoreModule);
        }
        if !Parser::is_component(bytes) {
            return Err(NotAComponent::Invalid(
                "unknown WebAssembly encoding".into(),
            ));
        }
        let mut footprint = Footprint::default();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(|e| NotAComponent::Invalid(e.message().to_string()))? {
                Payload::MemorySection(s) => footprint.memories += s.count(),
                Payload::TableSection(s) => footprint.tables += s.count(),
                Payload::InstanceSection(s) => footprint.core_instances += s.count(),
                _ => {}
            }
        }
        Ok(footprint)
    }
}

/// A process type's demand on the engine.
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    /// What each instance takes.
    pub footprint: Footprint,
    /// The type's `limits.memory`.
    pub memory: u64,
    /// Whether the type sets `limits.fuel`.
    pub fuel: bool,
}

impl Demand {
    /// The demand of `process` whose component has `footprint`.
    pub fn new(process: &ProcessType, footprint: Footprint) -> Demand {
        Demand {
            footprint,
            memory: process.limits.memory,
            fuel: process.limits.fuel.is_some(),
        }
    }
}

/// Core instances and tables cost the pool little (no linear memory), so
/// each slot holds this many more than today's largest component needs,
/// leaving room for a deploy of a bigger one.
const SLOT_HEADROOM: u32 = 2;

/// What one pool slot can hold: the largest footprint of `demands`, with
/// headroom for tables and core instances (not memories, which reserve
/// address space). A component deployed later must fit in it.
pub fn slot_footprint(demands: &[Demand]) -> Footprint {
    let most = |f: &dyn Fn(&Footprint) -> u32| {
        demands
            .iter()
            .map(|d| f(&d.footprint))
            .max()
            .unwrap_or(1)
            .max(1)
    };
    Footprint {
        memories: most(&|f| f.memories),
        tables: (most(&|f| f.tables) * SLOT_HEADROOM).max(8),
        core_instances: (most(&|f| f.core_instances) * SLOT_HEADROOM).max(32),
    }
}

/// Creates the host's engine with a pooling allocator of `capacity`
/// instances sized for `demands`.
pub fn build_engine(demands: &[Demand], capacity: u32) -> anyhow::Result<Engine> {
    let slot = slot_footprint(demands);
    let instances = u64::from(capacity.max(1));
    let memories = instances * u64::from(slot.memories);
    let tables = instances * u64::from(slot.tables);
    let core_instances = instances * u64::from(slot.core_instances);
    let max_memory = demands.iter().map(|d| d.memory).max().unwrap_or(64 << 10);

    // One 4 GiB reservation per memory lets Cranelift drop bounds checks;
    // past the budget, reserve only what the largest limit needs.
    let fast = memories.saturating_mul((4 << 30) + FAST_MEMORY_GUARD) <= FAST_MEMORY_ADDRESS_BUDGET;
    let (reservation, guard) = if fast {
        (4u64 << 30, FAST_MEMORY_GUARD)
    } else {
        (max_memory.next_multiple_of(64 << 10), DENSE_MEMORY_GUARD)
    };

    let to_u32 = |n: u64, what: &str| -> anyhow::Result<u32> {
        u32::try_from(n).with_context(|| {
            format!("the formation asks for {n} {what}, more than one host can pool")
        })
    };
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(to_u32(instances, "instances")?)
        .total_memories(to_u32(memories, "linear memories")?)
        .total_tables(to_u32(tables, "tables")?)
        .total_core_instances(to_u32(core_instances, "core instances")?)
        .total_stacks(to_u32(instances, "stacks")?)
        .max_memories_per_component(slot.memories)
        .max_tables_per_component(slot.tables)
        .max_core_instances_per_component(slot.core_instances)
        .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .consume_fuel(demands.iter().any(|d| d.fuel))
        .max_wasm_stack(MAX_WASM_STACK)
        .memory_reservation(reservation)
        .memory_guard_size(guard)
        .memory_reservation_for_growth(0)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

    Engine::new(&config).map_err(anyhow::Error::from).with_context(|| {
        let slot = reservation + guard;
        format!(
            "cannot reserve the instance pool: {memories} linear memories × {} MiB ({} MiB reservation + {} MiB guard) = {} GiB of address space, for {instances} instances; lower `[pool] capacity`, `scale` or `limits.memory` in the formation",
            slot >> 20,
            reservation >> 20,
            guard >> 20,
            (memories * slot) >> 30,
        )
    })
}

/// Advances an engine's epoch every [`EPOCH_TICK`] on one thread, for as
/// long as the ticker lives. Stores turn ticks into wall-clock deadlines.
pub struct EpochTicker {
    stop: std::sync::mpsc::Sender<()>,
}

impl EpochTicker {
    /// Starts ticking `engine`.
    pub fn start(engine: &Engine) -> anyhow::Result<EpochTicker> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("wasmproc-epoch".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(EPOCH_TICK)
                {
                    engine.increment_epoch();
                }
            })
            .context("cannot start the epoch ticker thread")?;
        Ok(EpochTicker { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

/// Whether a component came from the compile cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a previously compiled artifact.
    Hit,
    /// Compiled now (and stored for next time).
    Miss,
}

/// Compiled components on disk, keyed by content.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    /// Components loaded from the cache.
    pub hits: Counter,
    /// Components compiled (and stored).
    pub misses: Counter,
}

impl CompileCache {
    /// A cache in `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }

    fn key(engine: &Engine, bytes: &[u8]) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let mut sha = Sha256::new();
        sha.update(bytes);
        sha.update(hasher.finish().to_le_bytes());
        sha.update(env!("CARGO_PKG_VERSION").as_bytes());
        sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Returns the compiled form of `bytes`, from the cache when present.
    /// A cache that cannot be read or written only costs a compile.
    pub fn load(&self, engine: &Engine, bytes: &[u8]) -> anyhow::Result<(Component, CacheOutcome)> {
        let path = self.dir.join(format!("{}.cwasm", Self::key(engine, bytes)));
        if path.exists() {
            match deserialize(engine, &path) {
                Ok(component) => {
                    self.hits.inc();
                    return Ok((component, CacheOutcome::Hit));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable compile cache entry: {e:#}")
                }
            }
        }
        let started = Instant::now();
        let component = Component::new(engine, bytes).map_err(anyhow::Error::from)?;
        self.misses.inc();
        tracing::debug!(elapsed = ?started.elapsed(), "compiled component");
        if let Err(e) = self.store(&path, &component) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compile cache: {e:#}");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn store(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize().map_err(anyhow::Error::from)?;
        // Write then rename, so a concurrent or interrupted start never
        // sees half an artifact.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&bytes)?;
        tmp.persist(path)?;
        Ok(())
    }
}

/// Loads a compiled artifact from the cache.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    // SAFETY: the file lives in wasmproc's own cache folder, was written by
    // `Component::serialize` through an atomic rename, and its name includes
    // the engine's compatibility hash; wasmtime still checks the header and
    // refuses artifacts built for another engine configuration.
    unsafe { Component::deserialize_file(engine, path) }.map_err(anyhow::Error::from)
}

/// The SHA-256 of a component's bytes.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// Reads a component file, with a message that names it.
///
/// Only a regular file of at most [`MAX_COMPONENT_BYTES`] is read: a FIFO
/// would block `check` forever, and `/dev/zero` would fill memory.
pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let shown = path.display();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("component file `{shown}` does not exist")
        }
        Err(e) => bail!("cannot read component file `{shown}`: {e}"),
    };
    if !metadata.is_file() {
        bail!("component `{shown}` is not a regular file: expected a `.wasm` file");
    }
    if metadata.len() > MAX_COMPONENT_BYTES {
        bail!(
            "component file `{shown}` is {} bytes: expected at most {MAX_COMPONENT_BYTES}",
            metadata.len()
        );
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_COMPONENT_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot read component file `{shown}`: {e}"))?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        bail!("component file `{shown}` grew past {MAX_COMPONENT_BYTES} bytes while read");
    }
    Ok(bytes)
}

/// The largest component file wasmproc reads (or accepts in a deploy).
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_refuses_what_is_not_a_component() {
        assert_eq!(Footprint::of(b"hello"), Err(NotAComponent::NotWasm));
        assert_eq!(
            Footprint::of(b"\0asm\x01\0\0\0"),
            Err(NotAComponent::CoreModule)
        );
    }
}
