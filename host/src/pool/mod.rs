//! The pool of one process type: where units of work meet instances.
//!
//! # Design
//!
//! A pool has `scale` **slots**, numbered from 1; slot `k` runs instance
//! `NAME.k`. A unit of work (an HTTP request, a queue message, a clock tick)
//! takes a slot through a [`Lease`], runs in the slot's instance, and gives
//! the slot back when the lease drops. The pool knows nothing of kinds: each
//! kind's front implements [`World`] (how to create an instance of its
//! components, what they export) and decides what a unit is and how its
//! outcome is reported; the pool decides *whether* a unit may run and
//! *where*.
//!
//! A unit goes through up to three gates:
//!
//! 1. **admission** (HTTP only, [`Pool::admit`]): at most `scale + backlog`
//!    units may be inside the pool at once. A unit that finds no room is
//!    refused at once, and the front answers for it. Nothing queues
//!    unbounded; workers and clocks need no admission (a queue is its own
//!    backlog; a clock skips a tick).
//! 2. **slot**: an admitted unit waits for one of the `scale` slots, for at
//!    most the type's `limits.timeout`; then it is refused as busy too.
//! 3. **instance**: the slot's warm instance if it has one of the current
//!    deployment, else a fresh one from the type's pre-instantiated component.
//!
//! `reuse = 1` (the default) gives every unit a fresh instance: no state
//! survives from one unit to the next, as under `wasmtime serve`. The
//! pooling allocator and copy-on-write memory images make a fresh instance
//! cost microseconds, so isolation is the default. `reuse = N` keeps an
//! instance warm in its slot for up to N units, one at a time. When an
//! instance is retired, and how slots come and go with the scale, is
//! [`slots`]' business.
//!
//! # Failure
//!
//! A unit fails when its guest traps (a Rust panic is a trap), runs past
//! `limits.timeout` (epoch interruption, checked every [`EPOCH_TICK`], with a
//! host-side timer as a backstop for a guest blocked in a host call), burns
//! its `limits.fuel`, tries to grow memory past `limits.memory`, or (for a
//! front that expects an answer) never answers. The failed unit's instance
//! is dropped — never reused — and the slot gets a fresh instance for its
//! next unit. Other slots never notice: each instance has its own `Store`
//! and linear memory.
//!
//! # Supervision
//!
//! Failed units in a row make a type crash-loop: new instances then start
//! after a backoff (see [`supervisor`]).
//!
//! # Locks
//!
//! A pool has two locks: `slots` (a mutex) and `deployment` (a read-write
//! lock). Neither is ever held across an `await`, and no code path holds
//! both, so there is no lock order to keep. The `free` semaphore has one
//! permit per idle slot; it is only awaited with no lock held, and only
//! `try_acquire`d under `slots` (by a scale-down).
//!
//! [`EPOCH_TICK`]: crate::engine::EPOCH_TICK

pub mod cpu;
mod failure;
pub mod slots;
mod stats;
pub mod supervisor;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::Instrument as _;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};

pub use failure::Failure;
pub(crate) use failure::classify as classify_error;
pub use stats::Stats;
pub use supervisor::CRASH_LOOP_THRESHOLD;

use crate::engine::EPOCH_TICK;
use crate::formation::ProcessType;
use crate::instance::{Grants, InstanceState};
use crate::keyvalue::KeyValue;
use crate::queue::Queues;
use crate::telemetry;
use cpu::CpuShare;
use failure::classify;
use slots::{Returned, Slot, Slots, Warm};
use supervisor::Supervisor;

/// The world the components of a kind target, as a pool needs it. Each
/// kind's front implements it, so a pool of that kind hands out instances
/// whose exports are already typed: a worker pool's instances can only be
/// asked to handle a message.
pub trait World: Send + Sync + 'static {
    /// The formation's settings of the kind (a worker's queue, …).
    type Role: Send + Sync + 'static;
    /// A component pre-instantiated against the host's linker.
    type Pre: Send + Sync + 'static;
    /// A live instance's exports.
    type Exports: Send + Sync + 'static;
    /// What the kind's front keeps in each pool of the kind while it runs.
    type State: Default + Send + Sync + 'static;
    /// What a component of the kind must export, for error messages.
    const REQUIRED_EXPORT: &'static str;

    /// Checks that `pre`'s component exports what the kind needs.
    fn pre(pre: InstancePre<InstanceState>) -> wasmtime::Result<Self::Pre>;

    /// Whether a component pre-instantiated as `pre` can serve a type of
    /// this kind with `role` (a web type with `concurrency > 1` needs a WASI
    /// 0.3 component); why not, if it cannot.
    fn suits(_role: &Self::Role, _pre: &Self::Pre) -> Result<(), String> {
        Ok(())
    }

    /// Creates an instance in `store`.
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<InstanceState>,
    ) -> impl Future<Output = wasmtime::Result<Self::Exports>> + Send;
}

/// Implements [`World`] for a kind's marker type from what `bindgen!`
/// generated for the kind's world: every world's `*Pre` has the same `new`
/// and `instantiate_async`, but no trait says so.
macro_rules! world {
    ($world:ty, role: $role:ty, pre: $pre:ident, exports: $exports:ty, requires: $requires:literal) => {
        impl $crate::pool::World for $world {
            type Role = $role;
            type Pre = $pre<$crate::instance::InstanceState>;
            type Exports = $exports;
            type State = ();
            const REQUIRED_EXPORT: &'static str = $requires;

            fn pre(
                pre: wasmtime::component::InstancePre<$crate::instance::InstanceState>,
            ) -> wasmtime::Result<Self::Pre> {
                $pre::new(pre)
            }

            fn instantiate(
                pre: &Self::Pre,
                store: &mut wasmtime::Store<$crate::instance::InstanceState>,
            ) -> impl std::future::Future<Output = wasmtime::Result<$exports>> + Send {
                pre.instantiate_async(store)
            }
        }
    };
}
pub(crate) use world;

/// A live instance: its store and its exports.
pub(crate) struct Live<E> {
    store: Store<InstanceState>,
    exports: E,
}

/// The component a pool currently instantiates.
struct Deployment<W: World> {
    pre: W::Pre,
    generation: u64,
}

/// The instances of one process type, of the kind `W`.
pub struct Pool<W: World> {
    process: Arc<ProcessType>,
    role: W::Role,
    engine: Engine,
    deployment: RwLock<Arc<Deployment<W>>>,
    /// The current deployment's generation, readable without the lock (a
    /// warm instance's check on every unit).
    generation: AtomicU64,
    grants: Arc<Grants>,
    fuel_metered: bool,
    /// The type's share of the cores, under `limits.cpu`.
    cpu: Option<Arc<CpuShare>>,
    /// One permit per idle slot.
    free: Semaphore,
    slots: Mutex<Slots<Live<W::Exports>>>,
    supervisor: Supervisor,
    /// What the kind's front keeps here.
    state: W::State,
    /// Counters for `ps` and `/metrics`.
    pub stats: Stats,
}

/// A component that links, but cannot serve its type as configured (see
/// [`World::suits`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsuited(pub String);

/// A request admitted by [`Pool::admit_seat`]; dropping it lets another in.
pub(crate) struct Admitted<W: World>(Arc<Pool<W>>);

impl<W: World> Drop for Admitted<W> {
    fn drop(&mut self) {
        self.0.stats.admitted.dec();
    }
}

/// A unit's hold on a slot. Dropping it gives the slot back — or, during a
/// scale-down, retires it.
pub struct Lease<W: World> {
    pool: Arc<Pool<W>>,
    slot: Slot<Live<W::Exports>>,
    admitted: bool,
}

impl<W: World> Drop for Lease<W> {
    fn drop(&mut self) {
        if self.admitted {
            self.pool.stats.admitted.dec();
        }
        let slot = self.slot.take();
        let name = slot.name().clone();
        match self.pool.lock_slots().give_back(slot) {
            Returned::Idle => self.pool.free.add_permits(1),
            Returned::Retired => tracing::debug!(instance = %name, "instance retired (scale-down)"),
        }
    }
}

impl<W: World> Lease<W> {
    /// The name of the instance this lease runs (`mailer.2`).
    pub fn instance(&self) -> &Arc<str> {
        self.slot.name()
    }

    /// The slot's instance (created ahead, or now), armed, for a front
    /// that drives it itself and runs several units in it at once (a WASI
    /// 0.3 web type with `concurrency > 1`): such a front counts each unit
    /// with [`Pool::begin_unit`] and [`Pool::end_unit`], and the instance
    /// lives as long as it keeps it.
    pub(crate) async fn host(&mut self) -> Result<(Store<InstanceState>, W::Exports), Failure> {
        let pool = &*self.pool;
        let generation = pool.generation();
        let live = match self.slot.take_warm(generation) {
            // Created ahead (`reuse > 1` prewarms idle slots).
            Some(warm) => Ok(warm.instance),
            None => pool.instantiate(self.slot.name()).await,
        };
        match live {
            Ok(mut live) => {
                pool.arm(&mut live.store);
                Ok((live.store, live.exports))
            }
            Err(failure) => {
                pool.stats.record_failure(self.slot.name(), &failure);
                pool.supervisor.failed(&pool.process.name);
                Err(failure)
            }
        }
    }

    /// Runs `call` on the slot's instance as one unit of work: takes the
    /// instance (warm or new, armed with the unit's budgets), stops the
    /// call at the backstop, names a failure, and keeps or retires the
    /// instance by the outcome.
    pub async fn run<R>(
        &mut self,
        call: impl AsyncFnOnce(&W::Exports, &mut Store<InstanceState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let pool = &*self.pool;
        let started = Instant::now();
        let mut warm = pool.checkout(&mut self.slot).await?;
        let live = &mut warm.instance;
        let backstop = live.store.data().deadline + EPOCH_TICK * 2;
        let call = call(&live.exports, &mut live.store);
        let result = match within(backstop, call).await {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(classify(&e, live.store.data())),
            None => Err(Failure::Timeout),
        };
        pool.checkin(&mut self.slot, warm, result.as_ref().map(|_| ()), started);
        result
    }
}

/// What a pool is made from, whatever its kind.
pub struct Parts<'a> {
    /// The compiled component.
    pub component: &'a Component,
    /// The host's linker.
    pub linker: &'a Linker<InstanceState>,
    /// Whether the engine consumes fuel.
    pub fuel_metered: bool,
    /// What guests enqueue through.
    pub queues: Option<&'a Queues>,
    /// Where guests keep state.
    pub keyvalue: Option<&'a KeyValue>,
}

impl<W: World> Pool<W> {
    /// A pool for `process`, whose kind's settings are `role`.
    pub fn new(process: ProcessType, role: W::Role, parts: &Parts<'_>) -> anyhow::Result<Pool<W>> {
        let pre = Self::pre(parts.component, parts.linker)?;
        W::suits(&role, &pre).map_err(Unsuited)?;
        let process = Arc::new(process);
        let grants = Arc::new(Grants::new(
            &process,
            parts.queues.cloned(),
            parts.keyvalue.cloned(),
        ));
        let stats = Stats::default();
        let cpu = process.limits.cpu_millicores.map(|m| {
            let slept = stats.cpu_throttled_seconds.clone();
            Arc::new(CpuShare::new(m, process.limits.timeout, slept))
        });
        let pool = Pool {
            slots: Mutex::new(Slots::new(&process.name)),
            free: Semaphore::new(0),
            deployment: RwLock::new(Arc::new(Deployment { pre, generation: 1 })),
            generation: AtomicU64::new(1),
            engine: parts.linker.engine().clone(),
            process,
            role,
            grants,
            fuel_metered: parts.fuel_metered,
            cpu,
            supervisor: Supervisor::default(),
            state: W::State::default(),
            stats,
        };
        pool.scale_to(pool.process.scale);
        Ok(pool)
    }

    fn pre(component: &Component, linker: &Linker<InstanceState>) -> anyhow::Result<W::Pre> {
        let pre = linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)?;
        W::pre(pre).map_err(anyhow::Error::from)
    }

    /// The process type this pool runs.
    pub fn process(&self) -> &ProcessType {
        &self.process
    }

    /// The settings of its kind.
    pub fn role(&self) -> &W::Role {
        &self.role
    }

    /// What the kind's front keeps in this pool.
    pub(crate) fn state(&self) -> &W::State {
        &self.state
    }

    /// Whether a scale-down waits for busy slots to end (a front that keeps
    /// an instance across units gives its slot back then).
    pub(crate) fn shrinking(&self) -> bool {
        self.lock_slots().shrinking()
    }

    fn lock_slots(&self) -> MutexGuard<'_, Slots<Live<W::Exports>>> {
        // No code panics while holding this lock, and its state is
        // consistent between statements: a poisoned lock is still sound.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The number of slots the pool is scaled to.
    pub fn scale(&self) -> u32 {
        self.lock_slots().target()
    }

    /// Changes the number of slots at once. Scaling up adds idle slots;
    /// scaling down drops idle slots now and busy ones when their unit ends,
    /// so no work in flight is lost.
    pub fn scale_to(&self, target: u32) {
        let mut slots = self.lock_slots();
        let added = slots.scale_to(target, || match self.free.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        });
        self.stats.scale.set(i64::from(target));
        drop(slots);
        self.free.add_permits(added as usize);
    }

    /// Swaps in a new component: units that start from now on run in
    /// instances of it; units in flight finish in their old instance, and
    /// warm old instances are retired instead of reused.
    pub fn deploy(
        &self,
        component: &Component,
        linker: &Linker<InstanceState>,
    ) -> anyhow::Result<u64> {
        let pre = Self::pre(component, linker)?;
        W::suits(&self.role, &pre).map_err(Unsuited)?;
        let mut current = self.deployment.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.generation + 1;
        *current = Arc::new(Deployment { pre, generation });
        self.generation.store(generation, Ordering::Release);
        Ok(generation)
    }

    /// The deployed component's generation: 1 at start, +1 per deploy.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn current(&self) -> Arc<Deployment<W>> {
        self.deployment
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Units running now.
    pub fn busy(&self) -> u64 {
        u64::try_from(self.stats.busy.get()).unwrap_or(0)
    }

    /// Idle slots holding a live instance.
    pub fn warm(&self) -> usize {
        self.lock_slots().warm()
    }

    /// A lease on a slot whose permit the caller took (and gave up).
    fn lease_slot(self: &Arc<Self>) -> Option<Lease<W>> {
        match self.lock_slots().take() {
            Some(slot) => Some(Lease {
                pool: self.clone(),
                slot,
                admitted: false,
            }),
            None => {
                // A permit with no idle slot: a scale-down removed it while
                // the permit was being taken. Nothing to give back.
                None
            }
        }
    }

    /// Takes a slot for an HTTP request: admission first (refused at once
    /// when `scale + backlog` requests are already in), then a slot
    /// (waiting at most the type's timeout). `None`: refused as busy.
    pub async fn admit(self: &Arc<Self>, backlog: u32) -> Option<Lease<W>> {
        let bound = self.stats.scale.get() + i64::from(backlog);
        if self.stats.admitted.inc() >= bound {
            self.stats.admitted.dec();
            return None;
        }
        // A free slot is taken at once; only a unit that must wait for one
        // sets up a timer.
        let permit = match self.free.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let wait = self.process.limits.timeout;
                tokio::time::timeout(wait, self.free.acquire())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        let lease = permit.and_then(|permit| {
            permit.forget();
            self.lease_slot()
        });
        let Some(mut lease) = lease else {
            self.stats.admitted.dec();
            return None;
        };
        lease.admitted = true;
        Some(lease)
    }

    /// Admits a request that will take a seat of an instance rather than a
    /// slot of its own (a web type with `concurrency = n`): refused at once
    /// when `scale × n + backlog` requests are already in.
    pub(crate) fn admit_seat(self: &Arc<Self>, n: u32, backlog: u32) -> Option<Admitted<W>> {
        let bound = self.stats.scale.get() * i64::from(n) + i64::from(backlog);
        if self.stats.admitted.inc() >= bound {
            self.stats.admitted.dec();
            return None;
        }
        Some(Admitted(self.clone()))
    }

    /// Waits for a free slot (workers: the queue itself is the backlog).
    pub async fn lease(self: &Arc<Self>) -> Option<Lease<W>> {
        loop {
            self.free.acquire().await.ok()?.forget();
            if let Some(lease) = self.lease_slot() {
                return Some(lease);
            }
        }
    }

    /// Takes a free slot if there is one.
    pub fn try_lease(self: &Arc<Self>) -> Option<Lease<W>> {
        let permit = self.free.try_acquire().ok()?;
        permit.forget();
        self.lease_slot()
    }

    /// With `reuse > 1`, creates an instance in every idle slot that has
    /// none, so scaled-up instances are live before the first unit comes.
    /// Returns how many were created.
    pub async fn prewarm(self: &Arc<Self>) -> usize {
        /// Slots taken per batch: enough to amortize the scan of the idle
        /// list, few enough that units are not starved meanwhile.
        const BATCH: usize = 256;
        if self.process.reuse.get() <= 1 {
            return 0;
        }
        let mut created = 0;
        loop {
            let mut permits = 0;
            while permits < BATCH {
                match self.free.try_acquire() {
                    Ok(permit) => {
                        permit.forget();
                        permits += 1;
                    }
                    Err(_) => break,
                }
            }
            let cold = self.lock_slots().take_cold(permits);
            // Permits taken for slots that turned out warm go back.
            self.free.add_permits(permits - cold.len());
            if cold.is_empty() {
                return created;
            }
            let mut failed = false;
            for mut slot in cold {
                if !failed {
                    match self.instantiate(slot.name()).await {
                        Ok(live) => {
                            slot.prepare(Warm::new(live, self.generation()));
                            created += 1;
                        }
                        Err(failure) => {
                            tracing::warn!(
                                instance = %slot.name(),
                                reason = failure.reason(),
                                "cannot create an instance ahead: {}",
                                failure.detail()
                            );
                            failed = true;
                        }
                    }
                }
                drop(Lease {
                    pool: self.clone(),
                    slot,
                    admitted: false,
                });
            }
            if failed {
                return created;
            }
        }
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

    async fn instantiate(&self, name: &Arc<str>) -> Result<Live<W::Exports>, Failure> {
        // In a unit's trace, the start of its instance is a span of its own.
        if telemetry::enabled() && !tracing::Span::current().is_none() {
            let span =
                tracing::info_span!("instantiate", process = %self.process.name, instance = %name);
            return self.start(name).instrument(span).await;
        }
        self.start(name).await
    }

    /// Starts an instance named `name` of the current deployment.
    async fn start(&self, name: &Arc<str>) -> Result<Live<W::Exports>, Failure> {
        if let Some(backoff) = self.supervisor.current_backoff() {
            tokio::time::sleep(backoff).await;
        }
        let started = Instant::now();
        let deployment = self.current();
        let state = InstanceState::new(&self.grants, name);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state);
        let cpu = self.cpu.clone();
        store.epoch_deadline_callback(move |mut ctx| {
            let now = Instant::now();
            let state = ctx.data_mut();
            if now >= state.deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            // Under `limits.cpu`, a guest ahead of its type's share sleeps.
            let wait = cpu.as_ref().map_or(Duration::ZERO, |cpu| {
                cpu.at_tick(&mut state.cpu, now, state.deadline)
            });
            Ok(if wait.is_zero() {
                UpdateDeadline::Yield(1)
            } else {
                UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(wait)))
            })
        });
        if self.cpu.is_some() {
            // The clock `limits.cpu` charges: wasm time only.
            store.call_hook(|mut ctx, hook| {
                let now = Instant::now();
                let clock = &mut ctx.data_mut().cpu;
                if hook.entering_host() {
                    clock.pause(now);
                } else {
                    clock.resume(now);
                }
                Ok(())
            });
        }
        self.arm(&mut store);
        let exports =
            W::instantiate(&deployment.pre, &mut store)
                .await
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
        Ok(Live { store, exports })
    }

    /// Resets the per-unit budgets of a store: deadline, fuel, memory flag.
    pub(crate) fn arm(&self, store: &mut Store<InstanceState>) {
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
    async fn checkout(
        &self,
        slot: &mut Slot<Live<W::Exports>>,
    ) -> Result<Warm<Live<W::Exports>>, Failure> {
        let generation = self.generation();
        let started = self.begin_unit();
        let warm = match slot.take_warm(generation) {
            Some(warm) => Ok(warm),
            // A new instance (first unit, or the old one was retired).
            // Boxed: this path is the rare one with `reuse`, and inline its
            // state would make every unit's future half as large again.
            None => Box::pin(self.instantiate(slot.name()))
                .await
                .map(|live| Warm::new(live, generation)),
        };
        let mut warm = match warm {
            Ok(warm) => warm,
            Err(failure) => {
                self.end_unit(slot.name(), started, Err(&failure));
                return Err(failure);
            }
        };
        self.arm(&mut warm.instance.store);
        if let Some(cpu) = &self.cpu {
            // A type over its share waits before a unit starts (units that
            // end between ticks are charged only when they end).
            let wait = cpu.before_unit(Instant::now(), warm.instance.store.data().deadline);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(warm)
    }

    /// The type's share of the cores, under `limits.cpu`.
    pub(crate) fn cpu(&self) -> Option<&CpuShare> {
        self.cpu.as_deref()
    }

    /// Counts a unit that starts now; [`Pool::end_unit`] counts its end. A
    /// front that runs several units in one instance at once counts each.
    pub(crate) fn begin_unit(&self) -> Instant {
        self.stats.started.inc();
        self.stats.busy.inc();
        Instant::now()
    }

    /// Counts a unit that ended with `outcome`, and tells the supervisor:
    /// a guest's failure is a step toward a crash loop, a success ends one.
    pub(crate) fn end_unit(&self, instance: &str, started: Instant, outcome: Result<(), &Failure>) {
        self.stats.busy.dec();
        self.stats.latency.observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                self.stats.succeeded.inc();
                self.supervisor.succeeded(&self.process.name);
            }
            Err(failure) => {
                self.stats.record_failure(instance, failure);
                if failure.is_guests() {
                    self.supervisor.failed(&self.process.name);
                }
            }
        }
    }

    /// Ends a unit: keeps the instance if it succeeded and `reuse` allows,
    /// drops it otherwise; tells the supervisor.
    fn checkin(
        &self,
        slot: &mut Slot<Live<W::Exports>>,
        mut warm: Warm<Live<W::Exports>>,
        outcome: Result<(), &Failure>,
        started: Instant,
    ) {
        self.end_unit(slot.name(), started, outcome);
        if let Some(cpu) = &self.cpu {
            cpu.after_unit(&mut warm.instance.store.data_mut().cpu);
        }
        if outcome.is_ok() {
            slot.keep(warm, self.process.reuse);
        }
    }
}

/// A pool of any kind, as the control plane sees it: scale, deploy,
/// counters. [`Pool`] implements it for every kind.
pub trait ProcessPool: Send + Sync {
    /// The process type.
    fn process(&self) -> &ProcessType;
    /// Its counters.
    fn stats(&self) -> &Stats;
    /// The number of slots.
    fn scale(&self) -> u32;
    /// Changes the number of slots (see [`Pool::scale_to`]).
    fn scale_to(&self, target: u32);
    /// Units running now.
    fn busy(&self) -> u64;
    /// Idle slots holding a live instance.
    fn warm(&self) -> usize;
    /// The deployed component's generation.
    fn generation(&self) -> u64;
    /// What a component of this kind must export, for error messages.
    fn required_export(&self) -> &'static str;
    /// Swaps in a new component (see [`Pool::deploy`]).
    fn deploy(&self, component: &Component, linker: &Linker<InstanceState>) -> anyhow::Result<u64>;
    /// [`Pool::prewarm`] on every core at once; resolves to how many
    /// instances were created.
    fn prewarm_parallel(self: Arc<Self>) -> Pin<Box<dyn Future<Output = usize> + Send>>;
    /// Waits until no unit runs, for at most `grace`; true if all finished.
    fn drain(&self, grace: Duration) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

impl<W: World> ProcessPool for Pool<W> {
    fn process(&self) -> &ProcessType {
        &self.process
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }

    fn scale(&self) -> u32 {
        Pool::scale(self)
    }

    fn scale_to(&self, target: u32) {
        Pool::scale_to(self, target);
    }

    fn busy(&self) -> u64 {
        Pool::busy(self)
    }

    fn warm(&self) -> usize {
        Pool::warm(self)
    }

    fn generation(&self) -> u64 {
        Pool::generation(self)
    }

    fn required_export(&self) -> &'static str {
        W::REQUIRED_EXPORT
    }

    fn deploy(&self, component: &Component, linker: &Linker<InstanceState>) -> anyhow::Result<u64> {
        Pool::deploy(self, component, linker)
    }

    fn prewarm_parallel(self: Arc<Self>) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        Box::pin(async move {
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            let tasks: Vec<_> = (0..workers)
                .map(|_| {
                    let pool = self.clone();
                    tokio::spawn(async move { pool.prewarm().await })
                })
                .collect();
            let mut created = 0;
            for task in tasks {
                created += task.await.unwrap_or(0);
            }
            created
        })
    }

    fn drain(&self, grace: Duration) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(Pool::drain(self, grace))
    }
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
