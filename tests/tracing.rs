//! End-to-end tests of distributed tracing: the real `wasmproc run` with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/HTTP collector the
//! test runs on loopback. What they assert is what an operator's tracing
//! backend would show: which spans arrive, in which trace, under which
//! parent, and the `traceparent` a guest's outbound request carries.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DEADLINE, Host, RedisServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

/// One request a [`Recorder`] received.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and answers
/// `200 ok`; stopped when dropped.
struct Recorder {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || serve(stream, &log));
            }
        });
        Recorder {
            port,
            received,
            stop,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Answers the requests of one keep-alive connection.
fn serve(stream: TcpStream, log: &Mutex<Vec<Received>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let length = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        log.lock().unwrap().push(Received {
            path,
            headers,
            body,
        });
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// The spans a collector has received so far.
fn spans(collector: &Recorder) -> Vec<Span> {
    collector
        .received()
        .iter()
        .filter(|r| r.path == "/v1/traces")
        .flat_map(|r| {
            ExportTraceServiceRequest::decode(r.body.as_slice())
                .unwrap()
                .resource_spans
        })
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .collect()
}

/// Waits until the collector has a span that `wanted` accepts.
fn wait_for_span(collector: &Recorder, what: &str, wanted: impl Fn(&Span) -> bool) -> Span {
    let start = Instant::now();
    loop {
        if let Some(span) = spans(collector).into_iter().find(&wanted) {
            return span;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no span {what} within {DEADLINE:?}; got {:#?}",
            spans(collector).iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `service.name` of the host that exported `span`.
fn exporter_of(collector: &Recorder, span: &Span) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    collector
        .received()
        .iter()
        .filter(|r| r.path == "/v1/traces")
        .flat_map(|r| {
            ExportTraceServiceRequest::decode(r.body.as_slice())
                .unwrap()
                .resource_spans
        })
        .find(|r| {
            r.scope_spans
                .iter()
                .any(|s| s.spans.iter().any(|x| x.span_id == span.span_id))
        })
        .and_then(|r| r.resource)
        .and_then(|r| r.attributes.into_iter().find(|kv| kv.key == "service.name"))
        .and_then(|kv| match kv.value?.value? {
            Value::StringValue(s) => Some(s),
            _ => None,
        })
        .unwrap()
}

/// A span attribute's value, as text.
fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span.attributes.iter().find(|kv| kv.key == key)?;
    Some(match value.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced(formation: &str, collector: &Recorder) -> Host {
    traced_as(formation, collector, "wasmproc-under-test")
}

/// Starts `formation` exporting to `collector` as the service `name`.
fn traced_as(formation: &str, collector: &Recorder, name: &str) -> Host {
    let endpoint = format!("http://127.0.0.1:{}", collector.port);
    Host::start_with(
        formation,
        &common::shared_cache(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SERVICE_NAME", name),
        ],
    )
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

#[test]
fn a_request_joins_the_callers_trace_and_its_outbound_call_carries_it_on() {
    let collector = Recorder::start();
    let target = Recorder::start();
    let port = target.port;
    let mut host = traced(
        &format!(
            r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{{testbed}}"
allow_outbound = ["127.0.0.1:{port}"]
"#
        ),
        &collector,
    );

    let reply = common::request_with(
        &host.addr,
        "GET",
        &format!("/fetch?url=http://127.0.0.1:{port}/downstream"),
        &[("traceparent", &format!("00-{TRACE}-{CALLER}-01"))],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    // The server span: in the caller's trace, under the caller's span.
    let server = wait_for_span(&collector, "http.request", |s| {
        attribute(s, "url.path").as_deref() == Some("/fetch")
    });
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(hex(&server.parent_span_id), CALLER);
    assert_eq!(attribute(&server, "process").as_deref(), Some("web"));
    assert_eq!(attribute(&server, "instance").as_deref(), Some("web.1"));
    assert_eq!(
        attribute(&server, "http.response.status_code").as_deref(),
        Some("200")
    );

    // The guest's outbound call: a client span under the server span, and
    // the downstream server got its context.
    let client = wait_for_span(&collector, "http.client", |s| {
        s.name == "GET" && s.kind == 3
    });
    assert_eq!(hex(&client.trace_id), TRACE);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(
        attribute(&client, "http.response.status_code").as_deref(),
        Some("200")
    );
    let downstream = target
        .received()
        .into_iter()
        .find(|r| r.path == "/downstream")
        .unwrap();
    let traceparent = downstream.header("traceparent").unwrap();
    assert_eq!(
        traceparent,
        format!("00-{TRACE}-{}-01", hex(&client.span_id)),
        "the downstream server's traceparent names the client span"
    );

    // The instance started for this request is part of it too.
    let started = wait_for_span(&collector, "instantiate", |s| s.name == "instantiate");
    assert_eq!(started.parent_span_id, server.span_id);

    // The resource names the service as the environment says.
    let resource = collector
        .received()
        .iter()
        .filter(|r| r.path == "/v1/traces")
        .flat_map(|r| {
            ExportTraceServiceRequest::decode(r.body.as_slice())
                .unwrap()
                .resource_spans
        })
        .filter_map(|r| r.resource)
        .next()
        .unwrap();
    let service = resource
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone())
        .unwrap();
    assert_eq!(
        format!("{:?}", service.value.unwrap()),
        "StringValue(\"wasmproc-under-test\")"
    );

    // Spans never show in the log.
    host.terminate();
    assert!(
        !host.log().iter().any(|l| l.contains("http.request")),
        "{:#?}",
        host.log()
    );
}

#[test]
fn a_request_without_a_traceparent_starts_a_trace_and_a_failure_is_an_error_span() {
    let collector = Recorder::start();
    let host = traced(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{testbed}"
"#,
        &collector,
    );
    assert_eq!(host.get("/trap").status, 500);
    let span = wait_for_span(&collector, "for /trap", |s| {
        attribute(s, "url.path").as_deref() == Some("/trap")
    });
    assert!(span.parent_span_id.is_empty(), "a root span: {span:?}");
    assert_eq!(span.trace_id.len(), 16);
    assert_eq!(
        attribute(&span, "http.response.status_code").as_deref(),
        Some("500")
    );
    assert_eq!(attribute(&span, "error.type").as_deref(), Some("trap"));
    assert_eq!(attribute(&span, "http.route").as_deref(), Some("/"));
    // STATUS_CODE_ERROR
    assert_eq!(span.status.as_ref().map(|s| s.code), Some(2));
}

#[test]
fn otel_sdk_disabled_turns_tracing_off_even_with_an_endpoint() {
    let collector = Recorder::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.port);
    let mut host = Host::start_with(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{testbed}"
"#,
        &common::shared_cache(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    );
    assert_eq!(host.get("/").status, 200);
    // A clean stop flushes whatever spans exist.
    assert!(host.terminate().success());
    assert!(
        collector.received().is_empty(),
        "{:?}",
        collector.received()
    );
}

#[test]
fn one_trace_runs_from_a_web_request_through_redis_into_a_worker_on_another_host() {
    let collector = Recorder::start();
    let redis = RedisServer::start();
    let queue = format!("[queue]\nbackend = \"redis\"\nurl = \"{}\"", redis.url);
    // Host A serves the web type; its worker is scaled to zero, so host B's
    // worker handles the message.
    let front = traced_as(
        &format!(
            r#"
[http]
listen = "127.0.0.1:0"
{queue}

[process.web]
kind = "web"
component = "{{testbed}}"
enqueue = ["jobs"]

[process.jobs]
kind = "worker"
component = "{{testworker}}"
queue = "jobs"
"#
        ),
        &collector,
        "host-a",
    );
    let (code, _, stderr) = front.cli(&["scale", "jobs=0"]);
    assert_eq!(code, 0, "{stderr}");
    let mut back = traced_as(
        &format!(
            r#"
{queue}

[process.jobs]
kind = "worker"
component = "{{testworker}}"
queue = "jobs"
"#
        ),
        &collector,
        "host-b",
    );

    let reply = common::request_with(
        &front.addr,
        "GET",
        "/enqueue?queue=jobs&body=ok:traced",
        &[("traceparent", &format!("00-{TRACE}-{CALLER}-01"))],
        None,
    );
    assert_eq!(reply.status, 200);
    assert!(reply.body.starts_with("enqueued "), "{}", reply.body);
    let id = reply
        .body
        .trim()
        .trim_start_matches("enqueued ")
        .to_string();
    back.wait_for_log("processed traced attempt=1");

    let server = wait_for_span(&collector, "http.request", |s| {
        attribute(s, "url.path").as_deref() == Some("/enqueue")
    });
    let publish = wait_for_span(&collector, "queue.publish", |s| s.name == "send jobs");
    let process = wait_for_span(&collector, "queue.process", |s| s.name == "process jobs");

    // web (host A) → enqueue (host A) → delivery (host B), one trace.
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(hex(&publish.trace_id), TRACE);
    assert_eq!(hex(&process.trace_id), TRACE);
    assert_eq!(publish.parent_span_id, server.span_id);
    assert_eq!(process.parent_span_id, publish.span_id);
    assert_eq!(publish.kind, 4, "a producer span");
    assert_eq!(process.kind, 5, "a consumer span");
    assert_eq!(exporter_of(&collector, &server), "host-a");
    assert_eq!(exporter_of(&collector, &process), "host-b");

    assert_eq!(
        attribute(&publish, "messaging.message.id"),
        Some(id.clone())
    );
    assert_eq!(attribute(&process, "messaging.message.id"), Some(id));
    assert_eq!(
        attribute(&process, "messaging.destination.name").as_deref(),
        Some("jobs")
    );
    assert_eq!(
        attribute(&process, "wasmproc.attempt").as_deref(),
        Some("1")
    );
    assert_eq!(
        attribute(&process, "wasmproc.outcome").as_deref(),
        Some("handled")
    );
    assert_eq!(attribute(&process, "instance").as_deref(), Some("jobs.1"));
}

#[test]
fn a_clock_tick_starts_a_trace_that_its_messages_carry_to_the_worker() {
    let collector = Recorder::start();
    let _host = traced(
        r#"
[process.tick]
kind = "clock"
component = "{testclock}"
schedule = "* * * * * *"
env = { ENQUEUE = "jobs" }
enqueue = ["jobs"]

[process.jobs]
kind = "worker"
component = "{testworker}"
queue = "jobs"
retry = { attempts = 2, backoff = "10ms..10ms" }
"#,
        &collector,
    );
    let tick = wait_for_span(&collector, "clock.tick", |s| s.name == "tick tick");
    assert!(tick.parent_span_id.is_empty(), "a root span: {tick:?}");
    assert_eq!(attribute(&tick, "process").as_deref(), Some("tick"));
    assert_eq!(
        attribute(&tick, "wasmproc.outcome").as_deref(),
        Some("done")
    );
    let process = wait_for_span(&collector, "its message's delivery", |s| {
        s.name == "process jobs" && s.trace_id == tick.trace_id
    });
    let publish = spans(&collector)
        .into_iter()
        .find(|s| s.span_id == process.parent_span_id)
        .unwrap();
    assert_eq!(publish.name, "send jobs");
    assert_eq!(publish.parent_span_id, tick.span_id);
}
