//! Logs and traces.
//!
//! # Logs
//!
//! One stream on stdout (12-factor), as text or JSON lines. Every event about
//! an instance carries an `instance` field (`web.3`); guest stdout and stderr
//! lines are events with target `guest`. Spans never show in log lines.
//!
//! # Traces
//!
//! When `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! is set (and `OTEL_SDK_DISABLED` is not `true`), spans go to that OTLP/HTTP
//! endpoint as protobuf, batched on a thread of their own; the other
//! standard variables apply (`OTEL_SERVICE_NAME`, default `wasmproc`;
//! `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_EXPORTER_OTLP_HEADERS`; the sampler
//! variables). Otherwise tracing is off, and free: no span is created at
//! all — [`enabled`] is one relaxed load — so a request costs what it cost
//! before tracing existed.
//!
//! Context follows W3C Trace Context: an incoming request's `traceparent`
//! is honoured, a guest's outbound requests carry one, and an enqueue keeps
//! the context in the message's headers, so one trace runs from a web
//! request through the queue into the worker that handles the message —
//! across hosts on Redis too.

use std::sync::atomic::{AtomicBool, Ordering};

use clap::ValueEnum;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether spans are exported; set once, at start.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether tracing is on: only then are spans created.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The telemetry installed by [`init`]; dropping it flushes the spans not
/// yet exported.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: cannot flush the last spans: {e}");
        }
    }
}

/// Whether the environment asks for traces.
fn traces_wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber: logs filtered by `level` (such as `info`
/// or `info,guest=warn`), and spans exported over OTLP when the environment
/// asks for them.
pub fn init(format: LogFormat, level: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("invalid `--log-level` `{level}`: {e}"))?;
    // Logs are events only: spans are for the trace exporter. The hint
    // keeps the filter's most verbose level known, so `log` records below
    // it (wasmtime writes many at debug and trace level) are dropped where
    // they are made instead of each being built and filtered.
    let most = filter
        .max_level_hint()
        .unwrap_or(tracing::level_filters::LevelFilter::TRACE);
    let logs = tracing_subscriber::filter::filter_fn(|meta| meta.is_event())
        .with_max_level_hint(most)
        .and(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stdout)
        .with_target(false);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(false).with_filter(logs).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(logs).boxed(),
    };
    let (traces, provider) = if traces_wanted() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(
                        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "wasmproc".into()),
                    )
                    .build(),
            )
            .build();
        let tracer = provider.tracer("wasmproc");
        // wasmproc's own spans, whatever `--log-level` says of logs.
        let spans = tracing_subscriber::filter::Targets::new()
            .with_target("wasmproc", tracing::Level::INFO);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(spans)
            .boxed();
        ENABLED.store(true, Ordering::Relaxed);
        (Some(layer), Some(provider))
    } else {
        (None, None)
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(traces)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(Telemetry { provider })
}

/// Reads a trace context from HTTP headers (`traceparent`, `tracestate`).
struct FromHeaders<'a>(&'a http::HeaderMap);

impl Extractor for FromHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes a trace context into HTTP headers.
struct IntoHeaders<'a>(&'a mut http::HeaderMap);

impl Injector for IntoHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads a trace context from a message's name/value headers.
struct FromPairs<'a>(&'a [(String, String)]);

impl Extractor for FromPairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Writes a trace context into a message's headers, replacing any the
/// producer set.
struct IntoPairs<'a>(&'a mut Vec<(String, String)>);

impl Injector for IntoPairs<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        self.0.push((key.to_string(), value));
    }
}

/// Makes `span` a child of the trace context in `headers`, if any.
pub fn follow_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&FromHeaders(headers));
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of the trace context in a message's `headers`.
pub fn follow_pairs(span: &tracing::Span, headers: &[(String, String)]) {
    if !enabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&FromPairs(headers));
    let _ = span.set_parent(parent);
}

/// Writes the context of `span` into outgoing HTTP `headers`.
pub fn stamp_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut IntoHeaders(headers));
}

/// Writes the context of `span` into a message's `headers`.
pub fn stamp_pairs(span: &tracing::Span, headers: &mut Vec<(String, String)>) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut IntoPairs(headers));
}
