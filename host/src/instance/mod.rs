//! One instance's host state: what lives in its wasmtime `Store`, and the
//! sandbox every instance starts in.
//!
//! The sandbox, by construction of [`InstanceState::new`]:
//! - no preopened directories, so no files;
//! - no inherited environment: only the process type's `env`, plus
//!   `WASMPROC_PROCESS` (the type's name) and `WASMPROC_INSTANCE` (`web.3`);
//! - no sockets (`wasi:sockets` is linked but every address is denied);
//! - outbound HTTP only as [`crate::outbound`] allows;
//! - `wasi:config/store` reads the type's own `config` table, nothing else;
//! - `wasi:keyvalue` opens only the buckets the type lists in `keyvalue`;
//! - stdin is empty; stdout and stderr become log events carrying the
//!   instance's name;
//! - linear memory may not grow past `limits.memory` ([`ResourceLimiter`]).
//!
//! The whole WASI 0.2 set is linked (as `wasmtime serve -Scli` does), since
//! Rust guests built with std import `wasi:cli` interfaces outside the
//! `wasi:http/proxy` world.

mod log;

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::bindings::queue;
use crate::formation::ProcessType;
use crate::keyvalue::KeyValue;
use crate::outbound::{Outbound, TypeOutbound};
use crate::pool::cpu::CpuClock;
use crate::queue::{NewMessage, QueueError, Queues};
use crate::throttle::Throttle;
use log::GuestLog;
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

/// The most table elements an instance may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The data in each instance's `Store`.
pub struct InstanceState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: Outbound,
    memory_limit: usize,
    /// Set when the guest tried to grow memory past its limit during the
    /// current unit: the unit's failure is then reported as `memory`.
    pub memory_exceeded: bool,
    /// When the current unit must end; checked on every epoch tick.
    pub deadline: Instant,
    /// The wasm time it ran and was not yet charged for, under `limits.cpu`.
    pub cpu: CpuClock,
    instance: Arc<str>,
    grants: Arc<Grants>,
    /// Warnings the guest causes (denied enqueues), at most a few a second.
    warnings: Throttle,
}

/// What every instance of one process type is granted, built once per pool:
/// the queues it may enqueue onto, its outbound policy, its `wasi:config`
/// values.
pub struct Grants {
    process: Arc<ProcessType>,
    queues: Option<Queues>,
    keyvalue: Option<KeyValue>,
    outbound: TypeOutbound,
    config: WasiConfigVariables,
}

impl Grants {
    /// The grants of `process`, whose guests enqueue through `queues` and
    /// keep state in `keyvalue`.
    pub fn new(
        process: &Arc<ProcessType>,
        queues: Option<Queues>,
        keyvalue: Option<KeyValue>,
    ) -> Grants {
        Grants {
            process: process.clone(),
            queues,
            keyvalue,
            outbound: TypeOutbound::new(process),
            config: process.config.iter().cloned().collect(),
        }
    }
}

impl InstanceState {
    /// Fresh state for instance `instance` (`web.3`) of the type `grants`
    /// are for.
    pub fn new(grants: &Arc<Grants>, instance: &Arc<str>) -> InstanceState {
        let process = &*grants.process;
        let mut wasi = WasiCtx::builder();
        wasi.args(&[process.name.as_str()]);
        for (key, value) in &process.env {
            wasi.env(key, value);
        }
        wasi.env("WASMPROC_PROCESS", &process.name);
        wasi.env("WASMPROC_INSTANCE", instance);
        let (stdout, stderr) = GuestLog::pair(instance, process.limits.log_rate);
        wasi.stdout(stdout);
        wasi.stderr(stderr);
        wasi.socket_addr_check(|_, _| Box::pin(async { false }));
        let mut table = ResourceTable::new();
        table.set_max_capacity(process.limits.resources as usize);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(usize::try_from(process.limits.headers).unwrap_or(usize::MAX));
        InstanceState {
            table,
            wasi: wasi.max_random_size(MAX_RANDOM_BYTES).build(),
            http,
            hooks: grants.outbound.for_instance(instance),
            memory_limit: usize::try_from(process.limits.memory).unwrap_or(usize::MAX),
            memory_exceeded: false,
            deadline: Instant::now(),
            cpu: CpuClock::default(),
            instance: instance.clone(),
            grants: grants.clone(),
            warnings: Throttle::per_second(WARNINGS_PER_SECOND),
        }
    }
}

/// Most random bytes a guest may ask for in one call (wasmtime's default is
/// 64 MiB, tens of milliseconds of the host's CPU on an executor thread).
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Warnings a guest may cause per second (with a burst of ten seconds' worth).
const WARNINGS_PER_SECOND: u32 = 1;

impl InstanceState {
    /// The instance's resource table.
    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// The key-value store, if the type may use one.
    pub(crate) fn keyvalue(&self) -> Option<KeyValue> {
        self.grants.keyvalue.clone()
    }

    /// Whether the type's `keyvalue` list grants `bucket`.
    pub(crate) fn may_open(&self, bucket: &str) -> bool {
        self.grants.process.keyvalue.iter().any(|b| b == bucket)
    }

    /// Logs a warning the guest caused, at most a few a second.
    pub(crate) fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.warnings.allow() {
            tracing::warn!(instance = %self.instance, suppressed, "{message}");
        }
    }
}

impl queue::Host for InstanceState {
    async fn enqueue(
        &mut self,
        name: String,
        message: queue::Message,
    ) -> Result<String, queue::EnqueueError> {
        let denied = || queue::EnqueueError::UnknownQueue(name.clone());
        let Some(queues) = &self.grants.queues else {
            return Err(denied());
        };
        if !self.grants.process.enqueue.contains(&name) {
            if let Some(suppressed) = self.warnings.allow() {
                tracing::warn!(
                    instance = %self.instance,
                    queue = %name,
                    suppressed,
                    "enqueue denied: `{name}` is not in the process type's `enqueue` list"
                );
            }
            return Err(denied());
        }
        let message = NewMessage {
            body: message.body,
            content_type: message.content_type,
            headers: message.headers,
            delay: std::time::Duration::from_millis(message.delay_ms.unwrap_or(0)),
            key: None,
        };
        match queues.enqueue(&name, message).await {
            Ok(enqueued) => {
                tracing::debug!(instance = %self.instance, queue = %name, message.id = %enqueued.id, "enqueued");
                Ok(enqueued.id)
            }
            Err(QueueError::UnknownQueue(q)) => Err(queue::EnqueueError::UnknownQueue(q)),
            Err(QueueError::TooLarge { limit, .. }) => Err(queue::EnqueueError::TooLarge(limit)),
            Err(QueueError::DelayTooLong { limit, .. }) => Err(queue::EnqueueError::DelayTooLong(
                u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            )),
            Err(QueueError::Full { .. }) => Err(queue::EnqueueError::QueueFull),
            Err(
                e @ (QueueError::Unavailable(_)
                | QueueError::Unconfirmed(_)
                | QueueError::InvalidKey(_)),
            ) => {
                if let Some(suppressed) = self.warnings.allow() {
                    tracing::warn!(instance = %self.instance, queue = %name, suppressed, "enqueue failed: {e}");
                }
                // The host's own error stays in the host's log; the guest
                // learns whether the message may have been enqueued.
                Err(queue::EnqueueError::Unavailable(
                    if let QueueError::Unconfirmed(_) = e {
                        "the queue backend did not confirm: the message may or may not have been enqueued"
                    } else {
                        "the queue backend is unavailable"
                    }
                    .into(),
                ))
            }
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl ResourceLimiter for InstanceState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A linker with the whole WASI 0.2 set (with `wasi:http`), `wasi:config`,
/// `wasi:keyvalue` and `wasmproc:host/queue`; with `wasi_p3` (the engine
/// supports the async ABI) the WASI 0.3 set too.
pub fn linker(engine: &Engine, wasi_p3: bool) -> anyhow::Result<Linker<InstanceState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    if wasi_p3 {
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
    }
    wasmtime_wasi_config::add_to_linker(&mut linker, |state: &mut InstanceState| {
        WasiConfig::from(&state.grants.config)
    })?;
    crate::keyvalue::host::add_to_linker(&mut linker)?;
    queue::add_to_linker::<_, wasmtime::component::HasSelf<InstanceState>>(&mut linker, |state| {
        state
    })?;
    Ok(linker)
}
