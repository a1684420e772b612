//! The pool of one process type: where units of work meet instances.
//!
//! # Design
//!
//! A pool has `scale` **slots**, numbered from 1; slot `k` runs instance
//! `NAME.k`. A unit of work (here, one HTTP request) goes through three gates:
//!
//! 1. **admission**: at most `scale + backlog` units may be inside the pool at
//!    once. A unit that finds no admission permit is refused at once (the
//!    HTTP front answers 503 with `Retry-After`). Nothing queues unbounded.
//! 2. **slot**: an admitted unit waits for one of the `scale` slots, for at
//!    most the type's `limits.timeout`; then it is refused as busy too.
//! 3. **instance**: the slot's warm instance if it has one, else a fresh
//!    instance from the type's [`ProxyPre`].
//!
//! `reuse = 1` (the default) gives every unit a fresh instance: no state
//! survives from one request to the next, as under `wasmtime serve`. The
//! pooling allocator and copy-on-write memory images make a fresh instance
//! cost microseconds, so isolation is the default. `reuse = N` keeps an
//! instance warm in its slot for up to N units, one at a time, then retires it.
//!
//! # Where a unit runs
//!
//! An HTTP unit runs on its connection's task, not a task of its own: a
//! guest that answers and ends within one poll (most do) costs no spawn and
//! no cross-thread wake-up. Once the guest has answered, hyper must send the
//! answer while the guest may still write its body, so whatever is left of
//! the unit moves to a task of its own (`Detached`). A started unit always
//! runs to its end, even when its client hangs up: its instance is settled
//! and counted like any other.
//!
//! # Failure
//!
//! A unit fails when its guest traps (a Rust panic is a trap), runs past
//! `limits.timeout` (epoch interruption, checked every [`EPOCH_TICK`], with a
//! host-side timer as a backstop for a guest blocked in a host call), burns
//! its `limits.fuel`, tries to grow memory past `limits.memory`, or never
//! answers. The failed unit's instance is dropped — never reused — and the
//! slot gets a fresh instance for its next unit. Other slots never notice:
//! each instance has its own `Store` and linear memory.
//!
//! # Supervision
//!
//! After [`CRASH_LOOP_THRESHOLD`] failed units in a row with no success in
//! between, the type is crash-looping: each new instance waits an
//! exponential backoff (from [`CRASH_LOOP_BACKOFF_MIN`] to
//! [`CRASH_LOOP_BACKOFF_MAX`]) before it starts, and the log says so. The
//! first success ends the backoff.
//!
//! [`EPOCH_TICK`]: crate::engine::EPOCH_TICK

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use wasmtime::component::Component;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::bindings::clock::exports::wasmproc::host::scheduled::Tick;
use crate::bindings::clock::{Clock, ClockPre};
use crate::bindings::worker::exports::wasmproc::host::handler::{Delivery, Outcome};
use crate::bindings::worker::{Worker, WorkerPre};
use crate::engine::EPOCH_TICK;
use crate::formation::{Kind, ProcessType};
use crate::instance::InstanceState;
use crate::queue::Queues;

/// Failed units in a row after which a type counts as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 5;
/// First backoff of a crash-looping type.
pub const CRASH_LOOP_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest backoff of a crash-looping type.
pub const CRASH_LOOP_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// `Retry-After` seconds sent with a 503 when the pool is full.
const RETRY_AFTER_SECS: u32 = 1;

/// The HTTP response type of the front and the pools.
pub type HttpResponse = Response<HyperOutgoingBody>;

/// Why a unit of work failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The guest trapped (or panicked).
    Trap(String),
    /// The unit ran past `limits.timeout`.
    Timeout,
    /// The unit burned its `limits.fuel`.
    Fuel,
    /// The guest tried to grow memory past `limits.memory`.
    Memory,
    /// No instance could be created.
    Instantiate(String),
    /// The guest returned without answering.
    NoResponse,
}

impl Failure {
    /// Every reason, as [`Failure::reason`] spells it.
    pub const REASONS: [&'static str; 6] = [
        "trap",
        "timeout",
        "fuel",
        "memory",
        "instantiate",
        "no-response",
    ];

    /// A one-word reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Trap(_) => "trap",
            Failure::Timeout => "timeout",
            Failure::Fuel => "fuel",
            Failure::Memory => "memory",
            Failure::Instantiate(_) => "instantiate",
            Failure::NoResponse => "no-response",
        }
    }
}

/// How instances of a type are created: the pre-instantiated component,
/// typed by the world its kind serves.
enum Entry {
    Web(ProxyPre<InstanceState>),
    Worker(WorkerPre<InstanceState>),
    Clock(ClockPre<InstanceState>),
}

impl Entry {
    fn engine(&self) -> &wasmtime::Engine {
        match self {
            Entry::Web(pre) => pre.engine(),
            Entry::Worker(pre) => pre.engine(),
            Entry::Clock(pre) => pre.engine(),
        }
    }
}

/// A live instance's exports.
enum Exports {
    Web(Proxy),
    Worker(Worker),
    Clock(Clock),
}

/// An instance: its store and its exports, how many units it served, and
/// which deployment it was created from.
struct Warm {
    store: Store<InstanceState>,
    exports: Exports,
    served: u32,
    generation: u64,
}

/// One of the pool's `scale` places to run a unit.
struct Slot {
    number: u32,
    name: Arc<str>,
    warm: Option<Warm>,
}

/// The component a pool currently instantiates.
struct Deployment {
    entry: Entry,
    generation: u64,
}

/// How many slots a pool has, and how many it still has to give up.
#[derive(Default)]
struct Scale {
    /// The target number of slots.
    target: u32,
    /// Busy slots to drop when their unit ends (a scale-down in progress).
    retiring: u32,
    /// The numbers of the slots that exist (idle or busy, not retiring).
    numbers: std::collections::BTreeSet<u32>,
}

/// The metrics of a pool, read by `ps`, the autoscaler and `/metrics`
/// (where [`crate::metrics`] registers them with a `process` label).
#[derive(Clone)]
pub struct Stats {
    /// Units that started (took a slot).
    pub started: Counter,
    /// Units that ran to completion.
    pub succeeded: Counter,
    /// Units that failed, by `reason`: trap, timeout, fuel, memory, instantiate, no-response.
    pub failed: Family<Vec<(String, String)>, Counter>,
    /// Requests refused with 503 because the pool and its backlog were full.
    pub rejected: Counter,
    /// Units running now.
    pub busy: Gauge,
    /// Requests admitted (running or waiting for a slot).
    pub admitted: Gauge,
    /// The number of slots.
    pub scale: Gauge,
    /// Instances created.
    pub instantiated: Counter,
    /// Time to create an instance, in seconds.
    pub instantiate_seconds: Histogram,
    /// Unit durations, in seconds.
    pub latency: Histogram,
    /// Messages waiting or in flight in a worker's queue (set by the autoscaler's sampler).
    pub queue_depth: Gauge,
    /// Seconds the oldest ready message of a worker's queue has waited.
    pub queue_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: Counter,
    /// Idle instances (set by the sampler).
    pub idle: Gauge,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Counter::default(),
            succeeded: Counter::default(),
            failed: Family::default(),
            rejected: Counter::default(),
            busy: Gauge::default(),
            admitted: Gauge::default(),
            scale: Gauge::default(),
            instantiated: Counter::default(),
            // 1µs to ~0.5s.
            instantiate_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 20)),
            // 100µs to ~13s.
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            queue_depth: Gauge::default(),
            queue_age_seconds: Gauge::default(),
            dead_lettered: Counter::default(),
            idle: Gauge::default(),
        }
    }
}

impl Stats {
    fn record_failure(&self, failure: &Failure) {
        self.failed
            .get_or_create(&vec![("reason".to_string(), failure.reason().to_string())])
            .inc();
    }

    /// Failed units, all reasons.
    pub fn failures(&self) -> u64 {
        Failure::REASONS
            .iter()
            .map(|r| {
                self.failed
                    .get_or_create(&vec![("reason".to_string(), (*r).to_string())])
                    .get()
            })
            .sum()
    }
}

/// Counts failures in a row to detect a crash loop.
#[derive(Default)]
struct Supervisor {
    failures_in_a_row: AtomicU32,
}

impl Supervisor {
    fn backoff(failures: u32) -> Option<Duration> {
        let over = failures.checked_sub(CRASH_LOOP_THRESHOLD)?;
        let backoff = CRASH_LOOP_BACKOFF_MIN.saturating_mul(1u32 << over.min(16));
        Some(backoff.min(CRASH_LOOP_BACKOFF_MAX))
    }

    fn failed(&self, process: &str) {
        let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(backoff) = Self::backoff(n)
            && (Self::backoff(n - 1) != Some(backoff))
        {
            tracing::warn!(
                process,
                failures = n,
                "process type `{process}` is crash-looping ({n} failed units in a row): new instances start after a {} backoff",
                humantime::format_duration(backoff)
            );
        }
    }

    fn succeeded(&self, process: &str) {
        // Read first: a write on every unit would bounce this cache line
        // between the cores running units.
        if self.failures_in_a_row.load(Ordering::Relaxed) == 0 {
            return;
        }
        let n = self.failures_in_a_row.swap(0, Ordering::Relaxed);
        if n >= CRASH_LOOP_THRESHOLD {
            tracing::info!(
                process,
                "process type `{process}` recovered after {n} failed units in a row"
            );
        }
    }

    fn current_backoff(&self) -> Option<Duration> {
        Self::backoff(self.failures_in_a_row.load(Ordering::Relaxed))
    }
}

/// The instances of one process type.
pub struct Pool {
    process: Arc<ProcessType>,
    deployment: std::sync::RwLock<Arc<Deployment>>,
    /// The current deployment's generation, readable without the lock (a
    /// warm instance's check on every unit).
    generation: AtomicU64,
    queues: Option<Queues>,
    fuel_metered: bool,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Slot>>,
    scale: Mutex<Scale>,
    supervisor: Supervisor,
    /// Counters for `ps` and `/metrics`.
    pub stats: Stats,
}

/// A unit's hold on a slot. Dropping it gives the slot back — or, during a
/// scale-down, retires it.
pub struct Lease {
    pool: Arc<Pool>,
    slot: Option<Slot>,
    permit: Option<OwnedSemaphorePermit>,
    admitted: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.admitted {
            self.pool.stats.admitted.dec();
        }
        let Some(slot) = self.slot.take() else { return };
        let mut scale = self.pool.lock_scale();
        if scale.retiring > 0 {
            scale.retiring -= 1;
            scale.numbers.remove(&slot.number);
            if let Some(permit) = self.permit.take() {
                permit.forget();
            }
            tracing::debug!(instance = %slot.name, "instance retired (scale-down)");
        } else {
            self.pool.lock_idle().push(slot);
        }
    }
}

impl Lease {
    /// The name of the instance this lease runs (`mailer.2`).
    pub fn instance(&self) -> Arc<str> {
        self.slot
            .as_ref()
            .map_or_else(|| Arc::from("?"), |s| s.name.clone())
    }
}

/// The export a component of `kind` must have, for error messages.
pub fn required_export(kind: Kind) -> &'static str {
    match kind {
        Kind::Web => {
            "`wasi:http/incoming-handler`: a web process type must be a `wasi:http/proxy` component"
        }
        Kind::Worker => {
            "`wasmproc:host/handler`: a worker must target the `wasmproc:host/worker` world"
        }
        Kind::Clock => {
            "`wasmproc:host/scheduled`: a clock must target the `wasmproc:host/clock` world"
        }
    }
}

impl Pool {
    /// A pool for `process`, whose compiled component is `component`.
    /// `fuel_metered` says whether the engine consumes fuel; `queues` is
    /// what its guests may enqueue onto.
    pub fn new(
        process: ProcessType,
        component: &Component,
        linker: &wasmtime::component::Linker<InstanceState>,
        fuel_metered: bool,
        queues: Option<Queues>,
    ) -> anyhow::Result<Pool> {
        let pre = linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)?;
        let entry = Self::entry(process.kind, pre)?;
        let pool = Pool {
            slots: Arc::new(Semaphore::new(0)),
            idle: Mutex::new(Vec::new()),
            scale: Mutex::new(Scale::default()),
            deployment: std::sync::RwLock::new(Arc::new(Deployment {
                entry,
                generation: 1,
            })),
            generation: AtomicU64::new(1),
            process: Arc::new(process),
            queues,
            fuel_metered,
            supervisor: Supervisor::default(),
            stats: Stats::default(),
        };
        pool.scale_to(pool.process.scale);
        Ok(pool)
    }

    fn entry(
        kind: Kind,
        pre: wasmtime::component::InstancePre<InstanceState>,
    ) -> anyhow::Result<Entry> {
        Ok(match kind {
            Kind::Web => Entry::Web(ProxyPre::new(pre).map_err(anyhow::Error::from)?),
            Kind::Worker => Entry::Worker(WorkerPre::new(pre).map_err(anyhow::Error::from)?),
            Kind::Clock => Entry::Clock(ClockPre::new(pre).map_err(anyhow::Error::from)?),
        })
    }

    fn lock_scale(&self) -> std::sync::MutexGuard<'_, Scale> {
        self.scale
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The number of slots the pool is scaled to.
    pub fn scale(&self) -> u32 {
        self.lock_scale().target
    }

    /// Changes the number of slots at once. Scaling up adds idle slots;
    /// scaling down drops idle slots now and busy ones when their unit ends,
    /// so no work in flight is lost. Slot numbers are reused lowest first.
    pub fn scale_to(&self, target: u32) {
        let mut scale = self.lock_scale();
        let old = scale.target;
        scale.target = target;
        self.stats.scale.set(i64::from(target));
        if target > old {
            let mut add = target - old;
            // Cancel pending retirements first: those slots are still here.
            let keep = add.min(scale.retiring);
            scale.retiring -= keep;
            add -= keep;
            let mut idle = self.lock_idle();
            let mut number = 0;
            for _ in 0..add {
                number = (number + 1..)
                    .find(|n| !scale.numbers.contains(n))
                    .unwrap_or(u32::MAX);
                scale.numbers.insert(number);
                idle.push(Slot {
                    number,
                    name: format!("{}.{number}", self.process.name).into(),
                    warm: None,
                });
            }
            // Lowest numbers on top: a lightly loaded pool keeps reusing the
            // same few (warm) slots.
            idle.sort_by_key(|slot| std::cmp::Reverse(slot.number));
            drop(idle);
            self.slots.add_permits(add as usize);
        } else {
            for _ in target..old {
                match self.slots.try_acquire() {
                    Ok(permit) => {
                        // An idle slot exists for every available permit:
                        // drop the highest-numbered one.
                        permit.forget();
                        let mut idle = self.lock_idle();
                        if let Some(i) = (0..idle.len()).max_by_key(|&i| idle[i].number) {
                            let slot = idle.remove(i);
                            scale.numbers.remove(&slot.number);
                        }
                    }
                    Err(_) => scale.retiring += 1,
                }
            }
        }
    }

    /// Swaps in a new component: units that start from now on run in
    /// instances of it; units in flight finish in their old instance, and
    /// warm old instances are retired instead of reused.
    pub fn deploy(
        &self,
        component: &Component,
        linker: &wasmtime::component::Linker<InstanceState>,
    ) -> anyhow::Result<u64> {
        let pre = linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)?;
        let entry = Self::entry(self.process.kind, pre)?;
        let mut current = self.deployment.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.generation + 1;
        *current = Arc::new(Deployment { entry, generation });
        self.generation.store(generation, Ordering::Release);
        Ok(generation)
    }

    /// The deployed component's generation: 1 at start, +1 per deploy.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn current(&self) -> Arc<Deployment> {
        self.deployment
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Units running now.
    pub fn busy(&self) -> u64 {
        u64::try_from(self.stats.busy.get()).unwrap_or(0)
    }

    /// The process type this pool runs.
    pub fn process(&self) -> &ProcessType {
        &self.process
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lease_with(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Option<Lease> {
        let slot = self.lock_idle().pop()?;
        Some(Lease {
            pool: self.clone(),
            slot: Some(slot),
            permit: Some(permit),
            admitted: false,
        })
    }

    /// Takes a slot for a request: admission first (refused at once when
    /// `scale + backlog` requests are already in), then a slot (waiting at
    /// most the type's timeout).
    async fn lease(self: &Arc<Self>) -> Option<Lease> {
        let bound = self.stats.scale.get() + i64::from(self.process.backlog);
        if self.stats.admitted.inc() >= bound {
            self.stats.admitted.dec();
            return None;
        }
        // A free slot is taken at once; only a unit that must wait for one
        // sets up a timer.
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let wait = self.process.limits.timeout;
                tokio::time::timeout(wait, self.slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        let Some(mut lease) = permit.and_then(|p| self.lease_with(p)) else {
            self.stats.admitted.dec();
            return None;
        };
        lease.admitted = true;
        Some(lease)
    }

    /// With `reuse > 1`, creates an instance in every idle slot that has
    /// none, so scaled-up instances are live before the first unit comes.
    /// Returns how many were created.
    pub async fn prewarm(self: &Arc<Self>) -> usize {
        /// Slots taken per batch: enough to amortize the scan of the idle
        /// list, few enough that units are not starved meanwhile.
        const BATCH: usize = 256;
        if self.process.reuse <= 1 {
            return 0;
        }
        let mut created = 0;
        loop {
            let mut permits = Vec::new();
            while permits.len() < BATCH {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let cold: Vec<Slot> = {
                let mut idle = self.lock_idle();
                idle.extract_if(.., |s| s.warm.is_none())
                    .take(permits.len())
                    .collect()
            };
            if cold.is_empty() {
                return created;
            }
            let mut failed = false;
            for (mut slot, permit) in cold.into_iter().zip(permits.drain(..)) {
                if !failed {
                    match self.instantiate(&slot.name).await {
                        Ok(warm) => {
                            slot.warm = Some(warm);
                            created += 1;
                        }
                        Err(failure) => {
                            let detail = match &failure {
                                Failure::Trap(m) | Failure::Instantiate(m) => m.clone(),
                                _ => String::new(),
                            };
                            tracing::warn!(instance = %slot.name, reason = failure.reason(), "cannot create an instance ahead: {detail}");
                            failed = true;
                        }
                    }
                }
                // Back on top: a warm slot is the next one used.
                drop(Lease {
                    pool: self.clone(),
                    slot: Some(slot),
                    permit: Some(permit),
                    admitted: false,
                });
            }
            if failed {
                return created;
            }
        }
    }

    /// Idle slots holding a live instance.
    pub fn warm(&self) -> usize {
        self.lock_idle().iter().filter(|s| s.warm.is_some()).count()
    }

    /// Waits for a free slot (workers: the queue itself is the backlog).
    pub async fn lease_wait(self: &Arc<Self>) -> Option<Lease> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        self.lease_with(permit)
    }

    /// Takes a free slot if there is one.
    pub fn try_lease(self: &Arc<Self>) -> Option<Lease> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.lease_with(permit)
    }

    /// Waits until no unit runs (for at most `grace`); true if all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, async {
            while self.busy() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok()
    }

    async fn instantiate(&self, name: &Arc<str>) -> Result<Warm, Failure> {
        if let Some(backoff) = self.supervisor.current_backoff() {
            tokio::time::sleep(backoff).await;
        }
        let started = Instant::now();
        let deployment = self.current();
        let state = InstanceState::new(&self.process, name, self.queues.as_ref());
        let mut store = Store::new(deployment.entry.engine(), state);
        store.limiter(|state| state);
        store.epoch_deadline_callback(|ctx| {
            Ok(if Instant::now() >= ctx.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        self.arm(&mut store);
        let exports = match &deployment.entry {
            Entry::Web(pre) => pre.instantiate_async(&mut store).await.map(Exports::Web),
            Entry::Worker(pre) => pre.instantiate_async(&mut store).await.map(Exports::Worker),
            Entry::Clock(pre) => pre.instantiate_async(&mut store).await.map(Exports::Clock),
        }
        .map_err(|e| match classify(&e, store.data()) {
            Failure::Trap(msg) => Failure::Instantiate(msg),
            other => other,
        })?;
        let elapsed = started.elapsed();
        self.stats.instantiated.inc();
        self.stats
            .instantiate_seconds
            .observe(elapsed.as_secs_f64());
        tracing::debug!(instance = %name, ?elapsed, generation = deployment.generation, "instance started");
        Ok(Warm {
            store,
            exports,
            served: 0,
            generation: deployment.generation,
        })
    }

    /// Resets the per-unit budgets of a store: deadline, fuel, memory flag.
    fn arm(&self, store: &mut Store<InstanceState>) {
        let state = store.data_mut();
        state.deadline = Instant::now() + self.process.limits.timeout;
        state.memory_exceeded = false;
        store.set_epoch_deadline(1);
        if self.fuel_metered {
            // Infallible when fuel consumption is on, which `fuel_metered` says.
            let _ = store.set_fuel(self.process.limits.fuel.unwrap_or(u64::MAX));
        }
    }

    /// The slot's warm instance, or a new one; armed for one unit.
    async fn checkout(&self, lease: &mut Lease) -> Result<Warm, Failure> {
        let Some(slot) = lease.slot.as_mut() else {
            return Err(Failure::Instantiate("no slot".into()));
        };
        let generation = self.generation();
        self.stats.started.inc();
        self.stats.busy.inc();
        let warm = match slot.warm.take() {
            Some(warm) if warm.generation == generation => Ok(warm),
            // A new instance (first unit, or a deploy retired the old one).
            // Boxed: this path is the rare one with `reuse`, and inline its
            // state would make every unit's future half as large again.
            _ => Box::pin(self.instantiate(&slot.name)).await,
        };
        let mut warm = match warm {
            Ok(warm) => warm,
            Err(failure) => {
                self.stats.busy.dec();
                self.stats.record_failure(&failure);
                self.supervisor.failed(&self.process.name);
                return Err(failure);
            }
        };
        self.arm(&mut warm.store);
        Ok(warm)
    }

    /// Ends a unit: keeps the instance warm if it succeeded and `reuse`
    /// allows, drops it otherwise; tells the supervisor.
    fn checkin(
        &self,
        lease: &mut Lease,
        mut warm: Warm,
        outcome: Result<(), &Failure>,
        started: Instant,
    ) {
        self.stats.busy.dec();
        self.stats.latency.observe(started.elapsed().as_secs_f64());
        if let Err(failure) = outcome {
            self.stats.record_failure(failure);
        } else {
            self.stats.succeeded.inc();
        }
        if outcome.is_ok() {
            self.supervisor.succeeded(&self.process.name);
            warm.served += 1;
            if warm.served < self.process.reuse
                && let Some(slot) = lease.slot.as_mut()
            {
                slot.warm = Some(warm);
            }
        } else {
            self.supervisor.failed(&self.process.name);
        }
    }

    /// When the host-side timer stops an armed store's call: two epoch
    /// ticks after its deadline. The epoch deadline stops a guest that
    /// computes; this one a guest that waits on the host (an outbound
    /// request, a sleep).
    fn backstop(store: &Store<InstanceState>) -> Instant {
        store.data().deadline + EPOCH_TICK * 2
    }

    /// Runs `call` on the lease's instance as one unit of work: checks the
    /// instance out (warm or new, armed), stops the call at the backstop,
    /// names a failure, and checks the instance back in.
    async fn unit<R>(
        &self,
        lease: &mut Lease,
        call: impl AsyncFnOnce(&Exports, &mut Store<InstanceState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let started = Instant::now();
        let mut warm = self.checkout(lease).await?;
        let backstop = Self::backstop(&warm.store);
        let call = call(&warm.exports, &mut warm.store);
        let result = match within(backstop, call).await {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(classify(&e, warm.store.data())),
            None => Err(Failure::Timeout),
        };
        self.checkin(lease, warm, result.as_ref().map(|_| ()), started);
        result
    }

    /// Runs one queue message in the lease's instance.
    pub async fn run_message(
        &self,
        lease: &mut Lease,
        delivery: &Delivery,
    ) -> Result<Outcome, Failure> {
        self.unit(lease, async |exports, store| match exports {
            Exports::Worker(worker) => {
                worker
                    .wasmproc_host_handler()
                    .call_handle(store, delivery)
                    .await
            }
            _ => Err(wasmtime::format_err!("not a worker")),
        })
        .await
    }

    /// Runs one clock tick in the lease's instance.
    pub async fn run_tick(
        &self,
        lease: &mut Lease,
        tick: &Tick,
    ) -> Result<Result<(), String>, Failure> {
        self.unit(lease, async |exports, store| match exports {
            Exports::Clock(clock) => {
                clock
                    .wasmproc_host_scheduled()
                    .call_on_tick(store, tick)
                    .await
            }
            _ => Err(wasmtime::format_err!("not a clock")),
        })
        .await
    }

    /// Serves one HTTP request with an instance of this type.
    pub async fn serve(
        self: &Arc<Self>,
        request: http::Request<hyper::body::Incoming>,
    ) -> HttpResponse {
        let limits = self.process.limits;
        let too_large = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > limits.body);
        if too_large {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {} bytes\n", limits.body),
            );
        }
        let Some(mut lease) = self.lease().await else {
            self.stats.rejected.inc();
            tracing::debug!(process = %self.process.name, "pool full: 503");
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("`{}` is at capacity, retry later\n", self.process.name),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
            return response;
        };
        let Some(slot) = lease.slot.as_mut() else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "no slot\n".into());
        };
        let name = slot.name.clone();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let (sender, mut receiver) = oneshot::channel();
        let pool = self.clone();
        // The unit runs on this connection's task until the guest answers;
        // a guest still streaming its body then goes on in a task of its
        // own while hyper sends what it writes. Most units end before the
        // answer is even read, and cost no task, no wake-up, no other thread.
        let mut unit = Detached(Some(Box::pin(async move {
            let outcome = pool.run_request(&mut lease, request, sender).await;
            drop(lease);
            outcome
        })));
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(outcome) = unit.poll_unit(cx) {
                return Poll::Ready(Err(outcome));
            }
            Pin::new(&mut receiver).poll(cx).map(Ok)
        })
        .await;
        let failure = match first {
            // Answered while running: the rest of the unit detaches.
            Ok(Ok(Ok(response))) => return response,
            Ok(Ok(Err(code))) => Failure::Trap(format!("guest answered with error {code:?}")),
            // The guest dropped its answer unsent: the unit's end says why.
            Ok(Err(_)) => std::future::poll_fn(|cx| unit.poll_unit(cx))
                .await
                .err()
                .unwrap_or(Failure::NoResponse),
            Err(outcome) => match receiver.try_recv() {
                Ok(Ok(response)) => return response,
                Ok(Err(code)) => Failure::Trap(format!("guest answered with error {code:?}")),
                Err(_) => outcome.err().unwrap_or(Failure::NoResponse),
            },
        };
        let detail = match &failure {
            Failure::Trap(msg) | Failure::Instantiate(msg) => msg.as_str(),
            _ => "",
        };
        tracing::warn!(
            instance = %name,
            http.method = %method,
            url.path = %uri.path(),
            reason = failure.reason(),
            "request failed ({}); instance discarded{}{detail}",
            failure.reason(),
            if detail.is_empty() { "" } else { ": " },
        );
        failure_response(&self.process, &failure)
    }

    /// Runs one HTTP request in the lease's instance.
    async fn run_request(
        &self,
        lease: &mut Lease,
        request: http::Request<hyper::body::Incoming>,
        sender: oneshot::Sender<
            Result<HttpResponse, wasmtime_wasi_http::p2::bindings::http::types::ErrorCode>,
        >,
    ) -> Result<(), Failure> {
        let limit = usize::try_from(self.process.limits.body).unwrap_or(usize::MAX);
        let request = request.map(move |body| {
            Limited::new(body, limit).map_err(move |e| match e.downcast::<hyper::Error>() {
                Ok(e) => wasmtime_wasi_http::Error::Hyper(*e),
                Err(_) => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(limit as u64)),
            })
        });
        self.unit(lease, async move |exports, store| {
            let Exports::Web(proxy) = exports else {
                return Err(wasmtime::format_err!("not a web component"));
            };
            let mut http = store.data_mut().http();
            let req = http.new_incoming_request(Scheme::Http, request)?;
            let out = http.new_response_outparam(sender)?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(store, req, out)
                .await
        })
        .await
    }
}

/// [`Pool::prewarm`] on every core at once; returns how many instances
/// were created.
pub async fn prewarm_parallel(pool: &Arc<Pool>) -> usize {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.prewarm().await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        created += task.await.unwrap_or(0);
    }
    created
}

/// Runs `future` until `deadline`; `None` if the deadline came first.
///
/// Unlike `tokio::time::timeout`, no timer exists until the future has
/// returned `Pending` once: a unit that ends within its first poll (a warm
/// instance answering a request) never touches the runtime's timer wheel.
/// A unit that waits pays one allocation for its timer.
async fn within<F: Future>(deadline: Instant, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())))
            .as_mut()
            .poll(cx)
            .map(|()| None)
    })
    .await
}

/// A unit of work started on a connection's task. If it is dropped before
/// it ends (the answer went out while the guest still streams its body, or
/// the client went away), the unit goes on in a task of its own: a started
/// unit always runs to its end, so its instance is settled and counted.
struct Detached(Option<UnitFuture>);

/// A unit of work in flight, boxed so it can move to a task of its own.
type UnitFuture = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

impl Detached {
    /// Polls the unit; once it has ended, it is gone and reads as `Ok`.
    fn poll_unit(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Failure>> {
        let Some(running) = self.0.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let outcome = std::task::ready!(running.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(outcome)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(unit) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(unit);
        }
    }
}

/// Names the failure behind a wasmtime error.
fn classify(error: &wasmtime::Error, state: &InstanceState) -> Failure {
    if state.memory_exceeded {
        return Failure::Memory;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::Fuel,
        Some(Trap::Interrupt) => Failure::Timeout,
        Some(trap) => Failure::Trap(trap.to_string()),
        None => Failure::Trap(format!("{error:#}")),
    }
}

/// A short plain-text response.
pub fn text(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn failure_response(process: &ProcessType, failure: &Failure) -> HttpResponse {
    let name = &process.name;
    match failure {
        Failure::Timeout => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "`{name}` did not answer within {}\n",
                humantime::format_duration(process.limits.timeout)
            ),
        ),
        Failure::Fuel => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("`{name}` ran out of fuel\n"),
        ),
        Failure::Memory => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("`{name}` exceeded its memory limit\n"),
        ),
        Failure::Trap(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("`{name}` failed (trap)\n"),
        ),
        Failure::Instantiate(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("`{name}` could not start an instance\n"),
        ),
        Failure::NoResponse => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("`{name}` returned without a response\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_the_threshold_and_is_capped() {
        assert_eq!(Supervisor::backoff(CRASH_LOOP_THRESHOLD - 1), None);
        assert_eq!(
            Supervisor::backoff(CRASH_LOOP_THRESHOLD),
            Some(CRASH_LOOP_BACKOFF_MIN)
        );
        assert_eq!(
            Supervisor::backoff(CRASH_LOOP_THRESHOLD + 1),
            Some(CRASH_LOOP_BACKOFF_MIN * 2)
        );
        assert_eq!(Supervisor::backoff(u32::MAX), Some(CRASH_LOOP_BACKOFF_MAX));
    }
}
