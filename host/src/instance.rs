//! One instance's host state: what lives in its wasmtime `Store`, and the
//! sandbox every instance starts in.
//!
//! The sandbox, by construction of [`InstanceState::new`]:
//! - no preopened directories, so no files;
//! - no inherited environment: only the process type's `env`, plus
//!   `WASMPROC_PROCESS` (the type's name) and `WASMPROC_INSTANCE` (`web.3`);
//! - no sockets (`wasi:sockets` is linked but every address is denied);
//! - outbound HTTP only as [`crate::outbound`] allows;
//! - stdin is empty; stdout and stderr become log events carrying the
//!   instance's name;
//! - linear memory may not grow past `limits.memory` ([`ResourceLimiter`]).
//!
//! The whole WASI 0.2 set is linked (as `wasmtime serve -Scli` does), since
//! Rust guests built with std import `wasi:cli` interfaces outside the
//! `wasi:http/proxy` world.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::bindings::queue;
use crate::formation::ProcessType;
use crate::outbound::{Outbound, TypeOutbound};
use crate::queue::{NewMessage, QueueError, Queues};

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
    instance: Arc<str>,
    queues: Option<Queues>,
    may_enqueue: Arc<[String]>,
}

impl InstanceState {
    /// Fresh state for instance `instance` (`web.3`) of `process`, which may
    /// enqueue onto the queues its type lists, through `queues`.
    pub fn new(
        process: &ProcessType,
        instance: &Arc<str>,
        queues: Option<&Queues>,
        outbound: &TypeOutbound,
    ) -> InstanceState {
        let mut wasi = WasiCtx::builder();
        wasi.args(&[process.name.as_str()]);
        for (key, value) in &process.env {
            wasi.env(key, value);
        }
        wasi.env("WASMPROC_PROCESS", &process.name);
        wasi.env("WASMPROC_INSTANCE", instance);
        wasi.stdout(GuestLog::new(instance, "stdout"));
        wasi.stderr(GuestLog::new(instance, "stderr"));
        wasi.socket_addr_check(|_, _| Box::pin(async { false }));
        InstanceState {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: outbound.for_instance(instance),
            memory_limit: usize::try_from(process.limits.memory).unwrap_or(usize::MAX),
            memory_exceeded: false,
            deadline: Instant::now(),
            instance: instance.clone(),
            queues: queues.cloned(),
            may_enqueue: process.enqueue.clone(),
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
        let Some(queues) = &self.queues else {
            return Err(denied());
        };
        if !self.may_enqueue.contains(&name) {
            tracing::warn!(
                instance = %self.instance,
                queue = %name,
                "enqueue denied: `{name}` is not in the process type's `enqueue` list"
            );
            return Err(denied());
        }
        let message = NewMessage {
            body: message.body,
            content_type: message.content_type,
            headers: message.headers,
            delay: std::time::Duration::from_millis(message.delay_ms.unwrap_or(0)),
        };
        match queues.enqueue(&name, message).await {
            Ok(id) => {
                tracing::debug!(instance = %self.instance, queue = %name, message.id = %id, "enqueued");
                Ok(id)
            }
            Err(QueueError::UnknownQueue(q)) => Err(queue::EnqueueError::UnknownQueue(q)),
            Err(QueueError::TooLarge { limit, .. }) => Err(queue::EnqueueError::TooLarge(limit)),
            Err(QueueError::Unavailable(why)) => {
                tracing::warn!(instance = %self.instance, queue = %name, "enqueue failed: {why}");
                Err(queue::EnqueueError::Unavailable(why))
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

/// A linker with the whole WASI 0.2 set, `wasi:http` and `wasmproc:host/queue`.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<InstanceState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    queue::add_to_linker::<_, wasmtime::component::HasSelf<InstanceState>>(&mut linker, |state| {
        state
    })?;
    Ok(linker)
}

/// A guest's stdout or stderr: each complete line becomes one log event
/// carrying the instance's name. A partial line is logged when the stream
/// is dropped.
#[derive(Clone)]
struct GuestLog {
    instance: Arc<str>,
    stream: &'static str,
}

impl GuestLog {
    fn new(instance: &Arc<str>, stream: &'static str) -> Self {
        Self {
            instance: instance.clone(),
            stream,
        }
    }

    fn writer(&self) -> GuestLogWriter {
        GuestLogWriter {
            log: self.clone(),
            partial: Vec::new(),
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.writer())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.writer())
    }
}

/// Longest line kept before it is logged in pieces.
const MAX_LOG_LINE: usize = 16 << 10;

struct GuestLogWriter {
    log: GuestLog,
    partial: Vec<u8>,
}

impl GuestLogWriter {
    fn emit(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches(['\r', '\n']);
        tracing::info!(
            target: "guest",
            instance = %self.log.instance,
            stream = self.log.stream,
            "{line}"
        );
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            if self.partial.is_empty() {
                self.emit(&bytes[..i]);
            } else {
                self.partial.extend_from_slice(&bytes[..i]);
                let line = std::mem::take(&mut self.partial);
                self.emit(&line);
            }
            bytes = &bytes[i + 1..];
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() >= MAX_LOG_LINE {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line);
        }
    }
}

impl Drop for GuestLogWriter {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line);
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestLogWriter {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestLogWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl AsyncWrite for GuestLogWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
