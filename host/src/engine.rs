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
//! - a component that starts with more linear memory than its type's
//!   `limits.memory` is refused from its binary ([`memory_below_initial`]),
//!   before the engine exists, so nothing is compiled for it and the cache
//!   is never consulted (wasmtime would refuse it only after a compile);
//! - a compiled artifact is cached under the SHA-256 of the component bytes
//!   and the engine's compatibility hash, so a second start of the same
//!   artifact never recompiles, and a wasmproc built with other settings
//!   never loads an incompatible artifact.
//!
//! ## The compile cache: the disk → engine boundary
//!
//! A cached artifact is native code, loaded with the unsafe
//! `Component::deserialize` and run outside the sandbox: whoever can change
//! an entry can run code as the host, and a corrupted entry can crash it. So
//! the cache trusts nothing it did not check:
//! - the directory is private: [`CompileCache::open`] creates it with mode
//!   0700 and refuses to start ([`UnsafeCacheDir`]) with a directory that
//!   another user owns or that group or others may write;
//! - each entry is written with mode 0600 as one file: an 80-byte header
//!   (the format, the entry's key, a SHA-256 over both and the artifact),
//!   then the artifact, through a rename so no one sees half of it;
//! - an entry is loaded only if the file, checked through the descriptor it
//!   is read from, is a regular file owned by the host's user and not
//!   writable by group or others (so a file planted while the directory was
//!   open is still refused after `chmod go-w`), and its header names this
//!   very key and its SHA-256 matches the bytes read. The check runs over
//!   the bytes in memory that are then handed to wasmtime, so nothing can
//!   change them in between.
//!
//! An entry that fails a check is named in a warning, and the component is
//! compiled and the entry rewritten: a swapped, truncated or corrupted entry
//! costs one compile, never the wrong code or a crash. The SHA-256 is not
//! keyed with a secret, so it does not stop a process of the host's own
//! user from forging an entry; such a process could as well replace the
//! wasmproc binary, and the private directory keeps every other user out.
//!
//! A cache that cannot be used — its directory cannot be created (a parent
//! that is read-only or not writable by the host's user), read or written —
//! only costs compiles: a warning, and every start compiles.

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
/// often: short, so a type whose guests compute cannot hold the async
/// workers in long slices while a bystander's requests wait (see
/// `bench/bystander.sh`).
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

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
    /// Whether it imports or exports a WASI 0.3 interface (`…@0.3…`), and
    /// so needs the engine's support for the component model's async ABI.
    pub wasi_p3: bool,
    /// Bytes of linear memory its largest defined memory starts with: an
    /// instance needs at least this much of `limits.memory` before it runs
    /// a single instruction (a pre-initialised JavaScript or Python runtime
    /// starts with tens of MiB).
    pub initial_memory: u64,
    /// Whether it is recognisably a componentize-js *fetch-event* guest
    /// (see [`Footprint::of`]), which answers one request per instance.
    pub fetch_event: bool,
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
        let invalid =
            |e: wasmparser::BinaryReaderError| NotAComponent::Invalid(e.message().to_string());
        let mut footprint = Footprint::default();
        let mut guest = Producer::default();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(invalid)? {
                Payload::MemorySection(s) => {
                    footprint.memories += s.count();
                    for memory in s {
                        let memory = memory.map_err(invalid)?;
                        let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                        let initial = memory.initial.saturating_mul(page);
                        footprint.initial_memory = footprint.initial_memory.max(initial);
                    }
                }
                Payload::ExportSection(s) => {
                    for export in s {
                        guest.core_export(export.map_err(invalid)?.name);
                    }
                }
                Payload::CustomSection(s) => {
                    if let wasmparser::KnownCustom::Producers(producers) = s.as_known() {
                        guest.producers(producers);
                    }
                }
                Payload::TableSection(s) => footprint.tables += s.count(),
                Payload::InstanceSection(s) => footprint.core_instances += s.count(),
                Payload::ComponentImportSection(s) => {
                    for import in s {
                        let import =
                            import.map_err(|e| NotAComponent::Invalid(e.message().to_string()))?;
                        footprint.wasi_p3 |= is_wasi_p3(import.name.name);
                    }
                }
                Payload::ComponentExportSection(s) => {
                    for export in s {
                        let export =
                            export.map_err(|e| NotAComponent::Invalid(e.message().to_string()))?;
                        footprint.wasi_p3 |= is_wasi_p3(export.name.name);
                    }
                }
                _ => {}
            }
        }
        footprint.fetch_event = guest.is_fetch_event();
        Ok(footprint)
    }
}

/// What [`Footprint::of`] gathers to recognise a componentize-js
/// fetch-event guest: StarlingMonkey's own `wasi:http/incoming-handler`
/// export, kept when the JavaScript calls `addEventListener('fetch', …)`.
///
/// componentize-js names itself in the component's `producers` section.
/// When the JavaScript exports its own `incomingHandler` instead, the
/// handler is a generated binding, and every generated export comes with a
/// `cabi_post_…` function to free its results; StarlingMonkey's built-in
/// handler has none. So: a `ComponentizeJS` producer, a core export
/// `wasi:http/incoming-handler@…#handle`, and no `cabi_post_` export for it.
#[derive(Debug, Default)]
struct Producer {
    componentize_js: bool,
    handle_exports: Vec<String>,
    post_returns: Vec<String>,
}

impl Producer {
    fn core_export(&mut self, name: &str) {
        if let Some(handled) = name.strip_prefix("cabi_post_") {
            self.post_returns.push(handled.to_string());
        } else if name.starts_with("wasi:http/incoming-handler@") && name.ends_with("#handle") {
            self.handle_exports.push(name.to_string());
        }
    }

    fn producers(&mut self, producers: wasmparser::ProducersSectionReader<'_>) {
        for field in producers.into_iter().flatten() {
            if field
                .values
                .into_iter()
                .flatten()
                .any(|value| value.name == "ComponentizeJS")
            {
                self.componentize_js = true;
            }
        }
    }

    fn is_fetch_event(&self) -> bool {
        self.componentize_js
            && self
                .handle_exports
                .iter()
                .any(|handle| !self.post_returns.contains(handle))
    }
}

/// A size in the unit a person reads best for both `a` and `b` (so two
/// sizes compared in one message are in the same unit): `(a, b, unit)`,
/// rounded up to a tenth.
pub fn same_unit(a: u64, b: u64) -> (String, String, &'static str) {
    let (scale, unit) = if a.max(b) >= 1 << 20 {
        (1u64 << 20, "MiB")
    } else {
        (1 << 10, "KiB")
    };
    let show = |n: u64| {
        let tenths = (u128::from(n) * 10).div_ceil(u128::from(scale));
        if tenths % 10 == 0 {
            format!("{}", tenths / 10)
        } else {
            format!("{}.{}", tenths / 10, tenths % 10)
        }
    };
    (show(a), show(b), unit)
}

/// Why a component (`what`: its name in the message) cannot run within a
/// type's `limits.memory` of `limit` bytes: it starts with more linear
/// memory than that. Checked from the binary, before anything is compiled;
/// both sizes in one unit.
pub fn memory_below_initial(what: &str, footprint: &Footprint, limit: u64) -> Option<String> {
    if footprint.initial_memory <= limit {
        return None;
    }
    let (limit_shown, initial, unit) = same_unit(limit, footprint.initial_memory);
    let mib = footprint.initial_memory.div_ceil(1 << 20);
    let suggested = (mib + mib / 2).next_power_of_two();
    Some(format!(
        "`limits.memory` is {limit_shown} {unit}, but {what} starts with {initial} {unit} of linear memory: expected more than {initial} {unit}, with room to grow (for example `memory = \"{suggested}MiB\"`)"
    ))
}

/// Whether an import or export name is of a WASI 0.3 interface
/// (`wasi:http/handler@0.3.0`, and release candidates).
fn is_wasi_p3(name: &str) -> bool {
    name.starts_with("wasi:") && name.contains("@0.3")
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
        wasi_p3: demands.iter().any(|d| d.footprint.wasi_p3),
        initial_memory: demands
            .iter()
            .map(|d| d.footprint.initial_memory)
            .max()
            .unwrap_or(0),
        fetch_event: false,
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
        // The async ABI's bookkeeping costs every call of every store about
        // fifteen allocations: pay it only when a WASI 0.3 component needs it.
        .concurrency_support(slot.wasi_p3)
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

/// Why wasmproc refuses to start with a compile cache directory: code
/// loaded from it runs outside the sandbox, so no one but the host's own
/// user may write it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnsafeCacheDir {
    /// Another user owns it.
    #[error(
        "the compile cache directory `{dir}` (mode {mode:04o}) is owned by uid {owner}, not by wasmproc's user (uid {me}): its owner could plant native code that runs outside the sandbox; pick another `--cache-dir`"
    )]
    Owner {
        /// The directory.
        dir: String,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        owner: u32,
        /// The host's effective user.
        me: u32,
    },
    /// Group or others may write it.
    #[error(
        "the compile cache directory `{dir}` is writable by group or others (mode {mode:04o}): they could plant native code that runs outside the sandbox; run `chmod go-w {dir}` or pick another `--cache-dir`"
    )]
    Writable {
        /// The directory.
        dir: String,
        /// Its permission bits.
        mode: u32,
    },
}

impl UnsafeCacheDir {
    /// Judges the directory `dir`, owned by `owner` with permission bits
    /// `mode`, for a host running as `me`.
    fn judge(dir: &Path, owner: u32, mode: u32, me: u32) -> Result<(), UnsafeCacheDir> {
        let dir = dir.display().to_string();
        let mode = mode & 0o7777;
        if owner != me {
            return Err(UnsafeCacheDir::Owner {
                dir,
                mode,
                owner,
                me,
            });
        }
        if mode & 0o022 != 0 {
            return Err(UnsafeCacheDir::Writable { dir, mode });
        }
        Ok(())
    }
}

/// The host's effective user: the owner of every file it creates.
fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates `dir` with mode 0700 (its missing parents with the default
/// mode); one that already exists is left as it is, for the caller to judge.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Compiled components on disk, keyed by content, verified before they are
/// loaded (see the module docs).
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    /// Components loaded from the cache.
    pub hits: Counter,
    /// Components compiled (and stored).
    pub misses: Counter,
}

impl CompileCache {
    /// A cache in `dir`; [`CompileCache::open`] it before loading.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }

    /// Makes the directory ready before anything is loaded from it: creates
    /// it with mode 0700 if it is missing, and refuses one that another user
    /// owns or that group or others may write. A directory that cannot be
    /// created or looked at only costs compiles (a warning).
    pub fn open(&self) -> Result<(), UnsafeCacheDir> {
        use std::os::unix::fs::MetadataExt as _;
        let stat = || match std::fs::metadata(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_private_dir(&self.dir)?;
                std::fs::metadata(&self.dir)
            }
            other => other,
        };
        match stat() {
            Ok(meta) if meta.is_dir() => {
                UnsafeCacheDir::judge(&self.dir, meta.uid(), meta.mode(), effective_uid())
            }
            Ok(_) => {
                tracing::warn!(dir = %self.dir.display(), "the compile cache `{}` is not a directory; every component compiles at each start", self.dir.display());
                Ok(())
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot use the compile cache directory `{}`: {e}; every component compiles at each start", self.dir.display());
                Ok(())
            }
        }
    }

    /// Returns the compiled form of `bytes`, from the cache when an entry
    /// passes every check; otherwise compiles it and (re)writes the entry.
    /// A cache that cannot be read or written only costs a compile.
    pub fn load(&self, engine: &Engine, bytes: &[u8]) -> anyhow::Result<(Component, CacheOutcome)> {
        self.load_telling(engine, bytes, || {})
    }

    /// [`CompileCache::load`], calling `compiling` first when it has to
    /// compile (a cold compile of a large component takes seconds: the
    /// caller says so before the wait, not only after it).
    pub fn load_telling(
        &self,
        engine: &Engine,
        bytes: &[u8],
        compiling: impl FnOnce(),
    ) -> anyhow::Result<(Component, CacheOutcome)> {
        let key = entry::Key::of(engine, bytes);
        let path = self.dir.join(key.file_name());
        match entry::read(&path, &key, effective_uid()) {
            Ok(Some(verified)) => match deserialize(engine, &verified) {
                Ok(component) => {
                    self.hits.inc();
                    return Ok((component, CacheOutcome::Hit));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "wasmtime refuses compile cache entry `{}`: {e:#}; compiling again", path.display())
                }
            },
            Ok(None) => {}
            Err(why) => {
                tracing::warn!(path = %path.display(), "refusing compile cache entry `{}`: {why}; compiling again", path.display())
            }
        }
        compiling();
        let started = Instant::now();
        let component = Component::new(engine, bytes).map_err(anyhow::Error::from)?;
        self.misses.inc();
        tracing::debug!(elapsed = ?started.elapsed(), "compiled component");
        if let Err(e) = self.store(&path, &key, &component) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compile cache: {e:#}");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn store(&self, path: &Path, key: &entry::Key, component: &Component) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        create_private_dir(&self.dir)?;
        let artifact = component.serialize().map_err(anyhow::Error::from)?;
        // Write then rename, so a concurrent or interrupted start never
        // sees half an entry (and if it did, the digest would not match).
        let mut tmp = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)?;
        tmp.write_all(&entry::header(key, &artifact))?;
        tmp.write_all(&artifact)?;
        tmp.persist(path)?;
        Ok(())
    }
}

/// Turns a verified cache entry into a component.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, entry: &entry::Verified) -> anyhow::Result<Component> {
    // SAFETY: `Component::deserialize` requires bytes that
    // `Component::serialize` produced. `entry` is an `entry::Verified`,
    // which only `entry::read` makes, and only when:
    // - the bytes were read into this process's memory, from a regular file
    //   that (by `fstat` on the descriptor they were read from) is owned by
    //   this process's effective user and not writable by group or others;
    // - the file starts with wasmproc's header, naming this component's key
    //   (SHA-256 of its bytes, this engine's compatibility hash, wasmproc's
    //   version), and the SHA-256 of the header's format and key and of the
    //   rest of the file equals the digest the header records.
    // wasmtime gets exactly the bytes that were hashed, from our memory (it
    // copies them), so nothing can change them after the check. Hence these
    // are the bytes `CompileCache::store` wrote from `Component::serialize`
    // for this component and engine, unless a process of this same user
    // forged the entry (the digest is not keyed), which could as well
    // replace the wasmproc binary. wasmtime still checks its own header
    // (its version, the target, the engine's settings).
    unsafe { Component::deserialize(engine, entry.artifact()) }.map_err(anyhow::Error::from)
}

/// One file of the compile cache: a header that records what its artifact
/// was compiled for and its digest, then the artifact.
///
/// The header (80 bytes): `wasmproc-cache/1` (16 bytes, the format: the
/// bare artifacts an older wasmproc wrote lack it), the entry's [`Key`]
/// (32 bytes), and the SHA-256 of those 48 bytes followed by the artifact
/// (32 bytes). A file moved from another key carries that key; a changed
/// byte anywhere changes the digest.
mod entry {
    use std::hash::{Hash as _, Hasher as _};
    use std::io::Read as _;
    use std::path::Path;

    use sha2::{Digest as _, Sha256};
    use wasmtime::Engine;

    /// The format, at the start of every entry.
    const MAGIC: &[u8; 16] = b"wasmproc-cache/1";
    /// Bytes before the artifact.
    pub(super) const HEADER: usize = 80;
    /// The largest entry read: far above any artifact (compiled code is a
    /// few times the component's size), a bound on what one read allocates.
    pub(super) const MAX_BYTES: u64 = 1 << 30;

    /// What an entry holds: a component compiled for an engine, named by
    /// the SHA-256 of the component bytes, the engine's compatibility hash
    /// and wasmproc's version.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Key(pub(super) [u8; 32]);

    impl Key {
        /// The key of the component `bytes` compiled by `engine`.
        pub(super) fn of(engine: &Engine, bytes: &[u8]) -> Key {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            let mut sha = Sha256::new();
            sha.update(bytes);
            sha.update(hasher.finish().to_le_bytes());
            sha.update(env!("CARGO_PKG_VERSION").as_bytes());
            Key(sha.finalize().into())
        }

        /// The entry's file name in the cache directory.
        pub(super) fn file_name(&self) -> String {
            let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
            format!("{hex}.cwasm")
        }
    }

    /// Why an entry is not loaded.
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub(super) enum Refusal {
        /// It cannot be opened or read.
        #[error("cannot read it: {0}")]
        Unreadable(String),
        /// A directory, a device, a socket.
        #[error("it is not a regular file")]
        NotAFile,
        /// Another user owns it.
        #[error("it is owned by uid {owner}, not by wasmproc's user (uid {me})")]
        Owner { owner: u32, me: u32 },
        /// Group or others may write it.
        #[error("it is writable by group or others (mode {0:04o})")]
        Writable(u32),
        /// Over [`MAX_BYTES`].
        #[error("it is larger than {} MiB", MAX_BYTES >> 20)]
        TooLarge,
        /// No header.
        #[error("it has no integrity record (an older wasmproc or something else wrote it)")]
        NoRecord,
        /// The digest does not match.
        #[error(
            "its bytes do not match the SHA-256 recorded when it was written (it was modified or corrupted)"
        )]
        Modified,
        /// A sound entry of another key.
        #[error(
            "it was written for another component or engine (copied or renamed from another entry)"
        )]
        OtherKey,
    }

    /// An entry that passed every check of [`read`], which alone makes one:
    /// its artifact may be deserialized.
    pub(super) struct Verified {
        entry: Vec<u8>,
    }

    impl Verified {
        /// The artifact `Component::serialize` wrote.
        pub(super) fn artifact(&self) -> &[u8] {
            self.entry.get(HEADER..).unwrap_or_default()
        }
    }

    /// The digest of an entry's format and key and its artifact.
    fn digest(record: &[u8], artifact: &[u8]) -> [u8; 32] {
        let mut sha = Sha256::new();
        sha.update(record);
        sha.update(artifact);
        sha.finalize().into()
    }

    /// The header of the entry for `key` holding `artifact`.
    pub(super) fn header(key: &Key, artifact: &[u8]) -> [u8; HEADER] {
        let mut header = [0u8; HEADER];
        header[..16].copy_from_slice(MAGIC);
        header[16..48].copy_from_slice(&key.0);
        let digest = digest(&header[..48], artifact);
        header[48..].copy_from_slice(&digest);
        header
    }

    /// Checks that `entry` (header and artifact) is a sound entry for `key`.
    pub(super) fn verify(key: &Key, entry: &[u8]) -> Result<(), Refusal> {
        let Some((header, artifact)) = entry.split_first_chunk::<HEADER>() else {
            return Err(Refusal::NoRecord);
        };
        let (record, recorded) = header.split_at(48);
        if !record.starts_with(MAGIC) {
            return Err(Refusal::NoRecord);
        }
        if digest(record, artifact) != recorded {
            return Err(Refusal::Modified);
        }
        if record.get(16..) != Some(&key.0[..]) {
            return Err(Refusal::OtherKey);
        }
        Ok(())
    }

    /// Reads and verifies the entry at `path` for `key`, in a cache of the
    /// user `me`. `Ok(None)`: there is no entry.
    pub(super) fn read(path: &Path, key: &Key, me: u32) -> Result<Option<Verified>, Refusal> {
        use std::os::unix::fs::MetadataExt as _;
        let unreadable = |e: std::io::Error| Refusal::Unreadable(e.to_string());
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unreadable(e)),
        };
        // The descriptor's own metadata: the file judged is the file read.
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.is_file() {
            return Err(Refusal::NotAFile);
        }
        if meta.uid() != me {
            return Err(Refusal::Owner {
                owner: meta.uid(),
                me,
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(Refusal::Writable(meta.mode() & 0o7777));
        }
        if meta.len() > MAX_BYTES {
            return Err(Refusal::TooLarge);
        }
        let mut entry = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.take(MAX_BYTES + 1)
            .read_to_end(&mut entry)
            .map_err(unreadable)?;
        if u64::try_from(entry.len()).unwrap_or(u64::MAX) > MAX_BYTES {
            return Err(Refusal::TooLarge);
        }
        verify(key, &entry)?;
        Ok(Some(Verified { entry }))
    }
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
    fn sizes_compared_in_one_message_share_a_unit_rounded_up() {
        assert_eq!(
            same_unit(8 << 20, 197 * (64 << 10)),
            ("8".into(), "12.4".into(), "MiB")
        );
        assert_eq!(
            same_unit(64 << 10, 1 << 20),
            ("0.1".into(), "1".into(), "MiB")
        );
        assert_eq!(
            same_unit(64 << 10, 128 << 10),
            ("64".into(), "128".into(), "KiB")
        );
    }

    #[test]
    fn a_memory_limit_below_the_initial_memory_says_both_sizes_and_a_limit_that_fits() {
        let footprint = Footprint {
            initial_memory: 197 * (64 << 10),
            ..Footprint::default()
        };
        assert_eq!(
            memory_below_initial("`web.wasm`", &footprint, 16 << 20),
            None
        );
        assert_eq!(
            memory_below_initial("`web.wasm`", &footprint, 8 << 20).as_deref(),
            Some(
                "`limits.memory` is 8 MiB, but `web.wasm` starts with 12.4 MiB of linear memory: expected more than 12.4 MiB, with room to grow (for example `memory = \"32MiB\"`)"
            )
        );
    }

    #[test]
    fn a_fetch_event_guest_is_componentize_js_without_a_post_return_for_its_handler() {
        let handle = "wasi:http/incoming-handler@0.2.10#handle";
        let guest = |componentize_js: bool, exports: &[&str]| {
            let mut producer = Producer {
                componentize_js,
                ..Producer::default()
            };
            for export in exports {
                producer.core_export(export);
            }
            producer.is_fetch_event()
        };
        // StarlingMonkey's own handler: `addEventListener('fetch', …)`.
        assert!(guest(true, &["memory", "wasi:cli/run@0.2.10#run", handle]));
        // A JavaScript `incomingHandler` export: a generated binding.
        let post = format!("cabi_post_{handle}");
        assert!(!guest(true, &[handle, &post]));
        // A Rust guest's handler has no post-return either.
        assert!(!guest(false, &["wasi:http/incoming-handler@0.2.6#handle"]));
        // Not a web guest at all.
        assert!(!guest(true, &["wasi:cli/run@0.2.10#run"]));
    }

    #[test]
    fn footprint_refuses_what_is_not_a_component() {
        assert_eq!(Footprint::of(b"hello"), Err(NotAComponent::NotWasm));
        assert_eq!(
            Footprint::of(b"\0asm\x01\0\0\0"),
            Err(NotAComponent::CoreModule)
        );
    }

    use entry::{Key, Refusal};
    use std::os::unix::fs::PermissionsExt as _;

    /// The smallest component: a preamble and no sections.
    const EMPTY: &[u8] = b"\0asm\x0d\0\x01\0";

    /// Another component: [`EMPTY`] with a custom section, so another key.
    fn other() -> Vec<u8> {
        [EMPTY, &[0, 4, 3, b'x', b'y', b'z']].concat()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_entry_verifies_only_for_its_own_key_and_bytes() {
        let key = Key([1; 32]);
        let artifact = b"compiled code".repeat(20);
        let sound = [&entry::header(&key, &artifact)[..], &artifact].concat();
        let verify = entry::verify;
        assert_eq!(verify(&key, &sound), Ok(()));
        assert_eq!(verify(&Key([2; 32]), &sound), Err(Refusal::OtherKey));

        let mut last = sound.clone();
        *last.last_mut().unwrap() ^= 1;
        assert_eq!(verify(&key, &last), Err(Refusal::Modified));
        let mut relabelled = sound.clone();
        relabelled[20] ^= 1;
        assert_eq!(
            verify(&key, &relabelled),
            Err(Refusal::Modified),
            "a key changed without its digest"
        );
        assert_eq!(verify(&key, &artifact), Err(Refusal::NoRecord));
        assert_eq!(verify(&key, &sound[..40]), Err(Refusal::NoRecord));
    }

    #[test]
    fn a_cache_directory_others_could_write_is_refused_with_what_to_do() {
        let dir = Path::new("/srv/cache");
        assert_eq!(UnsafeCacheDir::judge(dir, 1000, 0o40700, 1000), Ok(()));
        assert_eq!(UnsafeCacheDir::judge(dir, 1000, 0o40755, 1000), Ok(()));
        let writable = UnsafeCacheDir::judge(dir, 1000, 0o41777, 1000).unwrap_err();
        assert_eq!(
            writable.to_string(),
            "the compile cache directory `/srv/cache` is writable by group or others (mode 1777): they could plant native code that runs outside the sandbox; run `chmod go-w /srv/cache` or pick another `--cache-dir`"
        );
        assert!(UnsafeCacheDir::judge(dir, 1000, 0o40770, 1000).is_err());
        let owner = UnsafeCacheDir::judge(dir, 0, 0o40755, 1000).unwrap_err();
        assert_eq!(
            owner.to_string(),
            "the compile cache directory `/srv/cache` (mode 0755) is owned by uid 0, not by wasmproc's user (uid 1000): its owner could plant native code that runs outside the sandbox; pick another `--cache-dir`"
        );
    }

    #[test]
    fn open_creates_a_private_directory_and_entries_only_the_user_can_read() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state/cache");
        let cache = CompileCache::new(&dir);
        assert_eq!(cache.open(), Ok(()));
        assert_eq!(mode(&dir), 0o700);
        let engine = Engine::default();
        cache.load(&engine, EMPTY).unwrap();
        let entry = dir.join(Key::of(&engine, EMPTY).file_name());
        assert_eq!(mode(&entry), 0o600);
    }

    #[test]
    fn open_refuses_an_existing_directory_others_can_write() {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let message = CompileCache::new(root.path())
            .open()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&format!("`{}`", root.path().display())),
            "{message}"
        );
        assert!(message.contains("(mode 0777)"), "{message}");
        assert!(message.contains("chmod go-w"), "{message}");
    }

    #[test]
    fn a_cache_that_cannot_be_created_only_costs_compiles() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, "not a directory").unwrap();
        let cache = CompileCache::new(file.join("cache"));
        assert_eq!(cache.open(), Ok(()));
        let engine = Engine::default();
        assert_eq!(cache.load(&engine, EMPTY).unwrap().1, CacheOutcome::Miss);
        assert_eq!(cache.load(&engine, EMPTY).unwrap().1, CacheOutcome::Miss);
    }

    #[test]
    fn a_swapped_corrupted_or_exposed_entry_is_compiled_again_and_rewritten() {
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(root.path().join("cache"));
        cache.open().unwrap();
        let engine = Engine::default();
        let outcome = |bytes: &[u8]| cache.load(&engine, bytes).unwrap().1;
        let path = |bytes: &[u8]| cache.dir.join(Key::of(&engine, bytes).file_name());
        let me = effective_uid();
        let refusal = |bytes: &[u8]| entry::read(&path(bytes), &Key::of(&engine, bytes), me).err();
        let recompiled_then_cached = |why: &str| {
            assert_eq!(outcome(EMPTY), CacheOutcome::Miss, "{why}: compiled again");
            assert_eq!(outcome(EMPTY), CacheOutcome::Hit, "{why}: rewritten");
            assert_eq!(mode(&path(EMPTY)), 0o600, "{why}: rewritten privately");
        };
        assert_eq!(outcome(EMPTY), CacheOutcome::Miss);
        assert_eq!(outcome(EMPTY), CacheOutcome::Hit);
        assert_eq!(outcome(&other()), CacheOutcome::Miss);

        std::fs::copy(path(&other()), path(EMPTY)).unwrap();
        assert_eq!(refusal(EMPTY), Some(Refusal::OtherKey));
        recompiled_then_cached("swapped");

        let mut bytes = std::fs::read(path(EMPTY)).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle..middle + 16].fill(0xCC);
        std::fs::write(path(EMPTY), &bytes).unwrap();
        assert_eq!(refusal(EMPTY), Some(Refusal::Modified));
        recompiled_then_cached("corrupted");

        std::fs::set_permissions(path(EMPTY), std::fs::Permissions::from_mode(0o620)).unwrap();
        assert_eq!(refusal(EMPTY), Some(Refusal::Writable(0o620)));
        recompiled_then_cached("group-writable");

        let bare = Component::new(&engine, EMPTY).unwrap().serialize().unwrap();
        std::fs::write(path(EMPTY), bare).unwrap();
        assert_eq!(refusal(EMPTY), Some(Refusal::NoRecord));
        recompiled_then_cached("written by an older wasmproc");

        assert_eq!(
            entry::read(&path(EMPTY), &Key::of(&engine, EMPTY), me + 1).err(),
            Some(Refusal::Owner {
                owner: me,
                me: me + 1
            })
        );
    }
}
