//! The formation: `formation.toml` parsed, validated and resolved.
//!
//! A formation names process types and how each one runs. This module turns
//! the file into a [`Formation`] whose every value is already checked, so the
//! rest of the host never re-validates and never sees a relative path.
//!
//! Invariants of a [`Formation`]:
//! - every process type has a valid name, a `kind`, a component path that is
//!   absolute (resolved against the formation file's folder), and limits
//!   within [`limits`](crate::formation::ProcessType::limits)' documented bounds;
//! - no two web routes are equal;
//! - the `[http] listen` address has had `${VAR}` / `${VAR:-default}`
//!   expanded and parses as a socket address.
//!
//! Errors are collected, not thrown: one pass reports every problem it can
//! find, each with the file, line and column it comes from (see
//! [`FormationErrors`]). Component files are checked later, when they are
//! loaded (see [`crate::engine`]), but their errors point back into this file
//! through [`ProcessType::component_span`].

mod raw;
mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// Where `[http] listen` binds when the formation does not say: every
/// interface, on `$PORT` or 8080 (12-factor port binding).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:${PORT:-8080}";
/// How long in-flight requests may take to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest `[http] shutdown_grace`: a host asked to stop must stop.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);
/// How long a connection may take to send a request's headers, counted
/// from when it is ready for one (accepted, or the previous answer sent):
/// also how long a keep-alive connection may sit idle.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `[http] header_timeout`.
pub const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Connections the HTTP front keeps open at once, when `[http]
/// max_connections` is absent.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Largest `[http] max_connections`.
pub const MAX_MAX_CONNECTIONS: u32 = 1_000_000;
/// Bytes per second a client must send a request body at while a guest
/// waits for it, when `[http] min_body_rate` is absent.
pub const DEFAULT_MIN_BODY_RATE: u64 = 1 << 10;
/// Instances of a process type that run units at once, when `scale` is absent.
pub const DEFAULT_SCALE: u32 = 1;
/// The most instances one process type may ask for.
pub const MAX_SCALE: u32 = 100_000;
/// Units one instance serves before it is retired; 1 = a fresh instance per unit.
pub const DEFAULT_REUSE: NonZeroU32 = NonZeroU32::MIN;
/// Requests that may wait for a free instance, per process type, before 503.
pub const DEFAULT_BACKLOG: u32 = 256;
/// Largest backlog a process type may ask for.
pub const MAX_BACKLOG: u32 = 1_000_000;
/// Requests one WASI 0.3 instance serves at once, when `concurrency` is absent.
pub const DEFAULT_CONCURRENCY: NonZeroU32 = NonZeroU32::MIN;
/// Most `concurrency`.
pub const MAX_CONCURRENCY: u32 = 1000;
/// Linear memory one instance may grow to, when `limits.memory` is absent.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Smallest memory limit: one WebAssembly page.
pub const MIN_MEMORY: u64 = 64 << 10;
/// Largest memory limit: all a 32-bit linear memory can address.
pub const MAX_MEMORY: u64 = 4 << 30;
/// Wall-clock time one unit of work may take, when `limits.timeout` is absent.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest timeout a process type may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest request body a web instance accepts, when `limits.body` is absent.
pub const DEFAULT_BODY: u64 = 10 << 20;
/// Largest `limits.body` a process type may ask for.
pub const MAX_BODY: u64 = 1 << 30;
/// Host resources (the entries of its resource table: streams, fields,
/// bodies, pollables, …) one instance may hold at once, when
/// `limits.resources` is absent.
pub const DEFAULT_RESOURCES: u32 = 1000;
/// Fewest and most `limits.resources`.
pub const RESOURCES_BOUNDS: (u32, u32) = (16, 1_000_000);
/// Bytes one set of headers or trailers a guest builds may hold (as
/// wasi-http counts them), when `limits.headers` is absent.
pub const DEFAULT_HEADERS: u64 = 16 << 10;
/// Fewest and most bytes `limits.headers` may allow.
pub const HEADERS_BOUNDS: (u64, u64) = (1 << 10, 1 << 20);
/// Outbound HTTP requests one instance may have in flight, when
/// `limits.connections` is absent.
pub const DEFAULT_CONNECTIONS: u32 = 16;
/// Outbound HTTP requests all instances of a type may have in flight, when
/// `limits.type_connections` is absent.
pub const DEFAULT_TYPE_CONNECTIONS: u32 = 256;
/// Most outbound requests in flight a type or an instance may ask for.
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Lines per second an instance may write to stdout and stderr together
/// (with a burst of ten seconds' worth), when `limits.log_rate` is absent.
pub const DEFAULT_LOG_RATE: u32 = 100;
/// Most `limits.log_rate`.
pub const MAX_LOG_RATE: u32 = 1_000_000;
/// Fewest and most thousandths of a core `limits.cpu` may grant.
pub const CPU_MILLICORES_BOUNDS: (u32, u32) = (10, 1_024_000);
/// Where the embedded queue keeps its data, relative to the formation file.
pub const DEFAULT_QUEUE_PATH: &str = ".wasmproc/queue";
/// Largest message body accepted by `enqueue`, when `[queue] max_message` is absent.
pub const DEFAULT_MAX_MESSAGE: u64 = 1 << 20;
/// Largest `[queue] max_message`.
pub const MAX_MAX_MESSAGE: u64 = 64 << 20;
/// Longest delay a message may be enqueued with (and longest retry delay),
/// when `[queue] max_delay` is absent.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest and longest `[queue] max_delay` (ten years of 365.25 days, so
/// a due time in milliseconds never comes near overflowing).
pub const MAX_DELAY_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(10 * 31_557_600));
/// Bytes of messages (bodies, content types and headers) one queue may
/// hold, waiting, delayed or in flight, when `[queue] max_bytes` is absent.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Largest `[queue] max_bytes`.
pub const MAX_MAX_BYTES: u64 = 1 << 40;
/// A worker's `limits.memory` must be at least this many times `[queue]
/// max_message`: a delivery's body is copied into the instance's linear
/// memory, and the guest needs room besides it.
pub const MEMORY_PER_MESSAGE: u64 = 2;
/// How long load must stay low before an autoscaled type scales down.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
/// The least instance capacity the pool reserves (see `[pool] capacity`).
pub const MIN_CAPACITY: u32 = 1024;
/// The most instances one host can pool.
pub const MAX_CAPACITY: u32 = 2 * MAX_SCALE;
/// The environment variable holding the admin API's bearer token, when
/// `[admin] token_env` is absent.
pub const DEFAULT_TOKEN_ENV: &str = "WASMPROC_ADMIN_TOKEN";
/// Where the admin API listens when `[admin] listen` is absent: loopback, any free port.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:0";
/// Deliveries of one message before it is dead-lettered, when `retry.attempts` is absent.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 5;
/// Most `retry.attempts`.
pub const MAX_RETRY_ATTEMPTS: u32 = 1000;
/// Largest `wasi:keyvalue` value, when `[keyvalue] max_value` is absent.
pub const DEFAULT_KV_MAX_VALUE: u64 = 1 << 20;
/// Largest `[keyvalue] max_value`.
pub const MAX_KV_MAX_VALUE: u64 = 64 << 20;
/// Bytes of keys and values one bucket holds, when `[keyvalue]
/// max_bucket_bytes` is absent.
pub const DEFAULT_KV_MAX_BUCKET_BYTES: u64 = 64 << 20;
/// Largest `[keyvalue] max_bucket_bytes`.
pub const MAX_KV_MAX_BUCKET_BYTES: u64 = 64 << 30;
/// First and longest redelivery delay, when `retry.backoff` is absent.
pub const DEFAULT_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(300));

/// The whole `formation.toml`, validated.
#[derive(Debug, Clone)]
pub struct Formation {
    /// The file this formation was read from.
    pub path: PathBuf,
    /// The folder relative paths were resolved against.
    pub dir: PathBuf,
    /// The file's text, kept so late errors can point into it.
    pub source: String,
    /// The `[http]` table.
    pub http: HttpSettings,
    /// The `[queue]` table.
    pub queue: QueueSettings,
    /// The `[admin]` table.
    pub admin: AdminSettings,
    /// The `[keyvalue]` table.
    pub keyvalue: KeyValueSettings,
    /// `[pool] capacity`: the most instances, of all types together, the
    /// host can run at once (the pooling allocator reserves this many slots).
    pub capacity: u32,
    /// Process types, in name order.
    pub processes: Vec<ProcessType>,
}

/// The `[http]` table: where the HTTP front listens and how it stops.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The address to bind, after `${VAR}` expansion.
    pub listen: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// How long a connection may take to send a request's headers (and sit
    /// idle between requests).
    pub header_timeout: Duration,
    /// Connections kept open at once; one more is answered 503 and closed.
    pub max_connections: u32,
    /// Bytes per second a client must send a request body at, while a
    /// guest waits for it; 0 turns the check off.
    pub min_body_rate: u64,
}

/// The `[queue]` table: where messages for workers are kept, and the
/// bounds every enqueue is checked against.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// The backend.
    pub backend: QueueBackend,
    /// Largest message body accepted, in bytes.
    pub max_message: u64,
    /// Longest delay a message may be enqueued with; longer retry delays
    /// are capped at it.
    pub max_delay: Duration,
    /// Bytes of messages one queue may hold; beyond, enqueues fail as full.
    pub max_bytes: u64,
}

/// Where queued messages live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// A durable store on local disk, in this folder (absolute).
    Embedded {
        /// The data folder.
        path: PathBuf,
    },
    /// Redis Streams, shared by every host that names the same server.
    Redis {
        /// `redis://host:port/db`.
        url: String,
    },
}

/// The `[keyvalue]` table: bounds of the `wasi:keyvalue` store (which lives
/// where the `[queue]` backend says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueSettings {
    /// Largest value, in bytes.
    pub max_value: u64,
    /// Most bytes of keys and values one bucket holds.
    pub max_bucket_bytes: u64,
}

impl Default for KeyValueSettings {
    fn default() -> Self {
        KeyValueSettings {
            max_value: DEFAULT_KV_MAX_VALUE,
            max_bucket_bytes: DEFAULT_KV_MAX_BUCKET_BYTES,
        }
    }
}

/// The `[admin]` table: the control API (enqueue, dead letters).
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The address to bind, after `${VAR}` expansion.
    pub listen: SocketAddr,
    /// The bearer token every request must carry, read from the environment
    /// variable `[admin] token_env` names. Required off loopback.
    pub token: Option<String>,
    /// The name of that variable (the CLI reads the same one).
    pub token_env: String,
}

/// Autoscaling bounds of a process type (`scale = { min, max }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    /// Fewest instances (0 allowed for workers: scale to zero).
    pub min: u32,
    /// Most instances.
    pub max: u32,
    /// How long load must stay low before scaling down.
    pub cooldown: Duration,
}

/// How a worker retries a message that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Deliveries before the message goes to the dead-letter queue.
    pub attempts: u32,
    /// Delay before the second delivery; it doubles each time (with jitter).
    pub backoff_min: Duration,
    /// Longest delay between deliveries.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            backoff_min: DEFAULT_BACKOFF.0,
            backoff_max: DEFAULT_BACKOFF.1,
        }
    }
}

/// What a process type does, with the settings only its kind has. Decoded
/// once, when the formation is read: a worker always has a queue, a clock
/// always a schedule, and no other kind has either.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Serves `wasi:http/proxy`: HTTP requests are its units of work.
    Web(WebRole),
    /// Consumes a queue: messages are its units of work.
    Worker(WorkerRole),
    /// Runs on a schedule: ticks are its units of work.
    Clock(ClockRole),
}

impl Role {
    /// The kind this role belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            Role::Web(_) => Kind::Web,
            Role::Worker(_) => Kind::Worker,
            Role::Clock(_) => Kind::Clock,
        }
    }
}

/// What only a web process type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRole {
    /// The routes it serves (at least one).
    pub routes: Vec<Route>,
    /// Requests that may wait for a free instance before 503.
    pub backlog: u32,
    /// Requests one instance serves at once; above 1 only for WASI 0.3
    /// components, whose handler is async.
    pub concurrency: NonZeroU32,
}

/// What only a worker has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRole {
    /// The queue it consumes (no other worker consumes it).
    pub queue: String,
    /// How failed messages are retried.
    pub retry: RetryPolicy,
}

/// What only a clock has: its schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ClockRole {
    /// The cron expression as written (seconds first).
    pub expression: String,
    /// The parsed expression (boxed: it is many times the size of the
    /// other roles).
    pub schedule: Box<croner::Cron>,
    /// The timezone the expression is read in.
    pub timezone: chrono_tz::Tz,
}

/// The kinds of process type, for messages and for code that treats every
/// kind alike but for a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Serves HTTP.
    Web,
    /// Consumes a queue.
    Worker,
    /// Runs on a schedule.
    Clock,
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl serde::de::Visitor<'_> for KindVisitor {
            type Value = Kind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one of `web`, `worker`, `clock`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Kind, E> {
                match v {
                    "web" => Ok(Kind::Web),
                    "worker" => Ok(Kind::Worker),
                    "clock" => Ok(Kind::Clock),
                    other => Err(E::unknown_variant(other, &["web", "worker", "clock"])),
                }
            }
        }
        deserializer.deserialize_str(KindVisitor)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Web => "web",
            Kind::Worker => "worker",
            Kind::Clock => "clock",
        })
    }
}

/// One `[process.NAME]` table.
#[derive(Debug, Clone)]
pub struct ProcessType {
    /// The table's name: `web` in `[process.web]`, and the prefix of its
    /// instances' names (`web.1`, `web.2`, …).
    pub name: String,
    /// What the process type does, and the settings of its kind.
    pub role: Role,
    /// The component file, absolute.
    pub component: PathBuf,
    /// Where `component = "…"` stands in the formation file.
    pub component_span: Range<usize>,
    /// The shell command `wasmproc run --build` runs (in the formation's
    /// folder) to produce the component.
    pub build: Option<String>,
    /// Instances that may run units at once, at start.
    pub scale: u32,
    /// Autoscaling bounds, when `scale = { min, max }`.
    pub autoscale: Option<Autoscale>,
    /// Units an instance serves before it is retired (1 = fresh per unit).
    pub reuse: NonZeroU32,
    /// Resource limits per instance and per unit.
    pub limits: Limits,
    /// Where `memory = "…"` stands in `limits`, when the file sets it
    /// (errors about a component's memory point there).
    pub memory_span: Option<Range<usize>>,
    /// The only environment variables the guest sees (besides the ones
    /// wasmproc documents: `WASMPROC_PROCESS`, `WASMPROC_INSTANCE`), with
    /// `${VAR}` expanded.
    pub env: Vec<(String, String)>,
    /// What the guest reads through `wasi:config/store`, with `${VAR}`
    /// expanded; no other type sees it.
    pub config: Vec<(String, String)>,
    /// Hosts (`host` or `host:port`, or `*` for any) the guest may send
    /// outbound HTTP requests to. Empty: none. Shared by every instance.
    pub allow_outbound: Arc<[String]>,
    /// Queues the guest may enqueue onto (each consumed by some worker).
    /// Shared by every instance.
    pub enqueue: Arc<[String]>,
    /// The `wasi:keyvalue` buckets the guest may open.
    pub keyvalue: Vec<String>,
}

impl ProcessType {
    /// The process type's kind.
    pub fn kind(&self) -> Kind {
        self.role.kind()
    }

    /// The queue a worker consumes; `None` for other kinds.
    pub fn queue(&self) -> Option<&str> {
        match &self.role {
            Role::Worker(worker) => Some(&worker.queue),
            Role::Web(_) | Role::Clock(_) => None,
        }
    }

    /// The fewest instances it runs: its fixed scale, or its autoscaling minimum.
    pub fn min_scale(&self) -> u32 {
        self.autoscale.map_or(self.scale, |a| a.min)
    }

    /// The most instances it may run: its fixed scale, or its autoscaling maximum.
    pub fn max_scale(&self) -> u32 {
        self.autoscale.map_or(self.scale, |a| a.max)
    }
}

/// Limits of one process type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of linear memory one instance may grow to.
    pub memory: u64,
    /// Wall-clock time one unit of work may take.
    pub timeout: Duration,
    /// Fuel (roughly, wasm instructions) one unit of work may burn.
    pub fuel: Option<u64>,
    /// Largest HTTP request body accepted, in bytes.
    pub body: u64,
    /// Host resources (resource-table entries) one instance may hold at once.
    pub resources: u32,
    /// Bytes one set of headers or trailers the guest builds may hold.
    pub headers: u64,
    /// Outbound HTTP requests one instance may have in flight.
    pub connections: u32,
    /// Outbound HTTP requests all instances of the type may have in flight.
    pub type_connections: u32,
    /// Lines per second the instance may log (burst: ten seconds' worth).
    pub log_rate: u32,
    /// Thousandths of a core the type's instances may compute on together
    /// (`limits.cpu = 0.5` is 500); `None`: no limit.
    pub cpu_millicores: Option<u32>,
}

/// One HTTP route: an optional host and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lowercase host without port; `None` matches any host.
    pub host: Option<String>,
    /// Path prefix, starting with `/`, without a trailing `/` unless it is `/`.
    pub prefix: String,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "{host}{}", self.prefix),
            None => f.write_str(&self.prefix),
        }
    }
}

impl Route {
    /// Parses `"/api"` or `"api.example.com/api"`.
    pub fn parse(text: &str) -> Result<Route, String> {
        let slash = text.find('/').ok_or_else(|| {
            format!("route `{text}` has no path: expected `/prefix` or `host/prefix`")
        })?;
        let (host, path) = text.split_at(slash);
        let host = if host.is_empty() {
            None
        } else {
            if host.contains(':') {
                return Err(format!(
                    "route `{text}` names a port: routes match the host only, expected `host/prefix`"
                ));
            }
            if !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(format!("route `{text}` has an invalid host `{host}`"));
            }
            Some(host.to_ascii_lowercase())
        };
        if path.contains(['?', '#', '*']) {
            return Err(format!(
                "route `{text}` contains `?`, `#` or `*`: expected a plain path prefix"
            ));
        }
        let prefix = if path.len() > 1 {
            path.trim_end_matches('/').to_string()
        } else {
            path.to_string()
        };
        let prefix = if prefix.is_empty() {
            "/".into()
        } else {
            prefix
        };
        Ok(Route { host, prefix })
    }
}

/// One problem in a formation file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormationError {
    /// Byte range in the file, when the problem has a place.
    pub span: Option<Range<usize>>,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Every problem found in one formation file. Its `Display` is what
/// `wasmproc check` prints: one `error:` block per problem, each naming
/// `file:line:column` and quoting the line with a caret under the problem.
#[derive(Debug, Clone)]
pub struct FormationErrors {
    path: PathBuf,
    source: String,
    errors: Vec<FormationError>,
}

impl FormationErrors {
    /// A set of errors in the file at `path` whose text is `source`.
    /// Errors are ordered by their place in the file.
    pub fn new(path: &Path, source: &str, mut errors: Vec<FormationError>) -> Self {
        errors.sort_by_key(|e| e.span.as_ref().map_or(usize::MAX, |s| s.start));
        Self {
            path: path.to_path_buf(),
            source: source.to_string(),
            errors,
        }
    }

    /// The individual errors.
    pub fn errors(&self) -> &[FormationError] {
        &self.errors
    }

    fn line_col(&self, offset: usize) -> (usize, usize, &str) {
        let offset = offset.min(self.source.len());
        let line_start = self.source[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.source[offset..]
            .find('\n')
            .map_or(self.source.len(), |i| offset + i);
        let line_no = self.source[..line_start].matches('\n').count() + 1;
        let col = self.source[line_start..offset].chars().count() + 1;
        (line_no, col, &self.source[line_start..line_end])
    }
}

impl fmt::Display for FormationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match &error.span {
                Some(span) => {
                    let (line, col, text) = self.line_col(span.start);
                    let width = self.source[span.clone()]
                        .lines()
                        .next()
                        .map_or(1, |l| l.chars().count().max(1));
                    let gutter = " ".repeat(line.to_string().len());
                    writeln!(f, "error: {path}:{line}:{col}: {}", error.message)?;
                    writeln!(f, "{gutter} |")?;
                    writeln!(f, "{line} | {text}")?;
                    writeln!(f, "{gutter} | {}{}", " ".repeat(col - 1), "^".repeat(width))?;
                }
                None => writeln!(f, "error: {path}: {}", error.message)?,
            }
        }
        let n = self.errors.len();
        write!(f, "\n{path}: {n} error{}", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for FormationErrors {}

/// Collects errors while a formation is validated.
struct Problems(Vec<FormationError>);

impl Problems {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.0.push(FormationError {
            span: Some(span),
            message: message.into(),
        });
    }

    fn toml(&mut self, error: toml::de::Error) {
        self.0.push(FormationError {
            span: error.span(),
            message: error.message().trim_end().to_string(),
        });
    }
}

impl Formation {
    /// Reads and validates the formation file at `path`.
    ///
    /// `lookup` resolves `${VAR}` in `[http] listen` (pass
    /// `|k| std::env::var(k).ok()` for the real environment).
    pub fn load(
        path: &Path,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Formation, FormationErrors> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            FormationErrors::new(
                path,
                "",
                vec![FormationError {
                    span: None,
                    message: format!("cannot read the formation file: {e}"),
                }],
            )
        })?;
        Self::parse(path, &source, lookup)
    }

    /// Validates a formation whose text is `source`, as if read from `path`.
    pub fn parse(
        path: &Path,
        source: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Formation, FormationErrors> {
        let mut problems = Problems(Vec::new());
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());

        let (document, syntax_errors) = DeTable::parse_recoverable(source);
        let had_syntax_errors = !syntax_errors.is_empty();
        for error in syntax_errors {
            problems.toml(error);
        }
        let mut http = None;
        let mut queue = None;
        let mut max_message_span = None;
        let mut admin = None;
        let mut keyvalue = None;
        let mut capacity: Option<Option<Spanned<u32>>> = None;
        let mut processes = Vec::new();
        let mut complete = true;
        if !had_syntax_errors {
            let document = document.into_inner();
            for (key, value) in document {
                match key.get_ref().as_ref() {
                    "http" => {
                        http = deserialize::<raw::Http>(value, &mut problems)
                            .map(|raw| raw.validate(&lookup, &mut problems));
                    }
                    "queue" => {
                        if let Some(raw) = deserialize::<raw::Queue>(value, &mut problems) {
                            max_message_span = raw.max_message_span();
                            queue = Some(raw.validate(&dir, &mut problems));
                        }
                    }
                    "pool" => {
                        capacity = deserialize::<raw::Pool>(value, &mut problems).map(|raw| raw.capacity);
                    }
                    "admin" => {
                        admin = deserialize::<raw::Admin>(value, &mut problems)
                            .map(|raw| raw.validate(&lookup, &mut problems));
                    }
                    "keyvalue" => {
                        keyvalue = deserialize::<raw::KeyValue>(value, &mut problems)
                            .map(|raw| raw.validate(&mut problems));
                    }
                    "process" => {
                        (processes, complete) =
                            process_tables(value, &dir, &lookup, &mut problems)
                    }
                    other => problems.at(
                        key.span(),
                        format!(
                            "unknown table `{other}`, expected `http`, `queue`, `keyvalue`, `admin`, `pool` or `process`"
                        ),
                    ),
                }
            }
            if processes.is_empty() && problems.0.is_empty() {
                problems.0.push(FormationError {
                    span: None,
                    message: "no process types: expected at least one `[process.NAME]` table"
                        .into(),
                });
            }
            check_routes(&processes, &mut problems);
            check_queues(&processes, complete, &mut problems);
        }

        let http = match http {
            Some(http) => http,
            None => raw::Http::default().validate(&lookup, &mut problems),
        };
        let queue = queue.unwrap_or_else(|| raw::Queue::default().validate(&dir, &mut problems));
        check_message_fits(&queue, max_message_span, &processes, &mut problems);
        let admin = match admin {
            Some(admin) => admin,
            None => raw::Admin::default().validate(&lookup, &mut problems),
        };
        let most: u64 = processes
            .iter()
            .map(|p| u64::from(p.process.max_scale()))
            .sum();
        let capacity = match capacity.flatten() {
            Some(c) => {
                let n = *c.get_ref();
                if u64::from(n) < most || n > MAX_CAPACITY {
                    problems.at(
                        c.span(),
                        format!("`capacity` is {n}: expected from {most} (the process types' scales added up) to {MAX_CAPACITY}"),
                    );
                }
                n
            }
            None => {
                if most > u64::from(MAX_CAPACITY) {
                    problems.0.push(FormationError {
                        span: None,
                        message: format!(
                            "the process types' scales add up to {most} instances: expected at most {MAX_CAPACITY}, the most one host can pool"
                        ),
                    });
                }
                // Twice the scales, for deploys and scale-ups, within bounds.
                let doubled = most.saturating_mul(2).min(u64::from(MAX_CAPACITY));
                u32::try_from(doubled)
                    .unwrap_or(MAX_CAPACITY)
                    .max(MIN_CAPACITY)
            }
        };
        match (http, queue, admin) {
            (Some(http), queue, Some(admin)) if problems.0.is_empty() => Ok(Formation {
                path: path.to_path_buf(),
                dir,
                source: source.to_string(),
                http,
                queue,
                admin,
                keyvalue: keyvalue.unwrap_or_default(),
                capacity,
                processes: processes
                    .into_iter()
                    .map(|located| located.process)
                    .collect(),
            }),
            _ => Err(FormationErrors::new(path, source, problems.0)),
        }
    }

    /// An error about this formation at `span` (for problems found after
    /// parsing, such as a component file that is not a component).
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> FormationError {
        FormationError {
            span: Some(span),
            message: message.into(),
        }
    }

    /// Wraps errors found after parsing so they print like parse errors.
    pub fn errors(&self, errors: Vec<FormationError>) -> FormationErrors {
        FormationErrors::new(&self.path, &self.source, errors)
    }
}

fn deserialize<T: for<'de> Deserialize<'de>>(
    value: Spanned<DeValue<'_>>,
    problems: &mut Problems,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.toml(e);
            None
        }
    }
}

/// A validated process type and the places of what later checks look at.
struct Located {
    process: ProcessType,
    route_spans: Vec<Range<usize>>,
    enqueue_spans: Vec<Range<usize>>,
}

/// Validates every `[process.NAME]` table.
fn process_tables(
    value: Spanned<DeValue<'_>>,
    dir: &Path,
    lookup: &impl Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> (Vec<Located>, bool) {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        problems.at(span, "`process` must be a table of `[process.NAME]` tables");
        return (Vec::new(), false);
    };
    let tables = table.len();
    let mut out = Vec::new();
    for (name, body) in table {
        let name_span = name.span();
        let name = name.into_inner().to_string();
        if let Err(why) = check_name("process type", &name) {
            problems.at(name_span, why);
            continue;
        }
        if let Some(raw) = deserialize::<raw::Process>(body, problems)
            && let Some(process) = raw.validate(name, dir, lookup, problems)
        {
            out.push(process);
        }
    }
    let complete = out.len() == tables;
    (out, complete)
}

/// Process type and queue names become instance names (`web.3`), metric
/// labels, Redis keys and CLI arguments (`wasmproc scale web=3`), so they
/// are kept simple.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} name `{name}`: expected a lowercase letter followed by lowercase letters, digits, `-` or `_` (at most 63)"
        ))
    }
}

fn check_routes(processes: &[Located], problems: &mut Problems) {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for Located {
        process,
        route_spans,
        ..
    } in processes
    {
        let Role::Web(web) = &process.role else {
            continue;
        };
        for (route, span) in web.routes.iter().zip(route_spans) {
            let key = route.to_string();
            match seen.get(key.as_str()) {
                Some(owner) if *owner == process.name => problems.at(
                    span.clone(),
                    format!("route `{key}` is listed twice in `{}`", process.name),
                ),
                Some(owner) => problems.at(
                    span.clone(),
                    format!(
                        "route `{key}` is already served by `{owner}`: each route may belong to one process type"
                    ),
                ),
                None => {
                    seen.insert(key, &process.name);
                }
            }
        }
    }
}

/// Every queue a type may enqueue onto must be consumed by a worker, and
/// two workers may not consume one queue.
fn check_queues(processes: &[Located], complete: bool, problems: &mut Problems) {
    let mut consumers: BTreeMap<&str, &str> = BTreeMap::new();
    for Located { process, .. } in processes {
        if let Some(queue) = process.queue()
            && let Some(other) = consumers.insert(queue, &process.name)
        {
            problems.0.push(FormationError {
                span: Some(process.component_span.clone()),
                message: format!(
                    "queue `{queue}` is consumed by both `{other}` and `{}`: give each worker its own queue",
                    process.name
                ),
            });
        }
    }
    if !complete {
        // A worker with mistakes of its own is not in `processes`: an
        // enqueue naming its queue is not a mistake too.
        return;
    }
    let known: Vec<&str> = consumers.keys().copied().collect();
    for Located {
        process,
        enqueue_spans,
        ..
    } in processes
    {
        for (queue, span) in process.enqueue.iter().zip(enqueue_spans) {
            if !consumers.contains_key(queue.as_str()) {
                let expected = if known.is_empty() {
                    "no worker consumes a queue".to_string()
                } else {
                    format!("expected one of `{}`", known.join("`, `"))
                };
                problems.at(
                    span.clone(),
                    format!(
                        "unknown queue `{queue}`: no worker process type consumes it ({expected})"
                    ),
                );
            }
        }
    }
}

/// Every worker must be able to receive the largest message: its
/// `limits.memory` must be at least [`MEMORY_PER_MESSAGE`] times `[queue]
/// max_message`. The error points at `max_message` when the file sets it,
/// else at the worker's component.
fn check_message_fits(
    queue: &QueueSettings,
    max_message_span: Option<Range<usize>>,
    processes: &[Located],
    problems: &mut Problems,
) {
    for Located { process, .. } in processes {
        if process.queue().is_none() {
            continue;
        }
        let memory = process.limits.memory;
        if queue.max_message.saturating_mul(MEMORY_PER_MESSAGE) <= memory {
            continue;
        }
        let (max, at_most, memory) = (
            values::ByteSize(queue.max_message),
            values::ByteSize(memory / MEMORY_PER_MESSAGE),
            values::ByteSize(memory),
        );
        let name = &process.name;
        match &max_message_span {
            Some(span) => problems.at(
                span.clone(),
                format!(
                    "`max_message` is {max}, but worker `{name}` can receive at most {at_most} (half its `limits.memory` of {memory}): lower `max_message` or raise the `limits.memory` of `{name}`"
                ),
            ),
            None => problems.at(
                process.component_span.clone(),
                format!(
                    "worker `{name}` can receive at most {at_most} (half its `limits.memory` of {memory}), less than `[queue] max_message` ({max}, the default): raise its `limits.memory` or lower `max_message`"
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests;
