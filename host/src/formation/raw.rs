//! The formation file as written: serde structs that mirror the TOML tables
//! one to one (`deny_unknown_fields` everywhere), and the checks that turn
//! them into the validated types of the parent module.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::{ByteSize, Cores, HumanDuration, Lenient, ScaleSpec};
use super::*;

/// `[http]`
///
/// ```toml
/// [http]
/// listen = "127.0.0.1:${PORT:-8080}"
/// shutdown_grace = "10s"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Http {
    listen: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<Lenient<HumanDuration>>>,
    header_timeout: Option<Spanned<Lenient<HumanDuration>>>,
    max_connections: Option<Spanned<u32>>,
    min_body_rate: Option<Spanned<Lenient<ByteSize>>>,
}

/// Expands `${VAR}` in a listen address and parses it.
fn listen_address(
    value: &Option<Spanned<String>>,
    default: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<SocketAddr> {
    let (text, span) = match value {
        Some(listen) => (listen.get_ref().as_str(), Some(listen.span())),
        None => (default, None),
    };
    let expanded = shellexpand::env_with_context_no_errors(text, |name: &str| lookup(name));
    match expanded.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            let message = format!(
                "invalid listen address `{expanded}`: expected `IP:PORT` such as `127.0.0.1:8080` (`${{PORT:-8080}}` reads $PORT)"
            );
            problems.0.push(FormationError { span, message });
            None
        }
    }
}

impl Http {
    pub(super) fn validate(
        self,
        lookup: &impl Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<HttpSettings> {
        let listen = listen_address(&self.listen, DEFAULT_LISTEN, lookup, problems);
        let shutdown_grace = duration_within(
            &self.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
            Duration::ZERO..=MAX_SHUTDOWN_GRACE,
            "shutdown_grace",
            problems,
        );
        let header_timeout = duration_within(
            &self.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
            Duration::from_secs(1)..=MAX_HEADER_TIMEOUT,
            "header_timeout",
            problems,
        );
        let max_connections = bounded(
            self.max_connections.as_ref(),
            DEFAULT_MAX_CONNECTIONS,
            1..=MAX_MAX_CONNECTIONS,
            "max_connections",
            problems,
        );
        let min_body_rate = checked(&self.min_body_rate, problems)
            .map_or(DEFAULT_MIN_BODY_RATE, |(rate, _)| rate.0);
        Some(HttpSettings {
            listen: listen?,
            shutdown_grace,
            header_timeout,
            max_connections,
            min_body_rate,
        })
    }
}

/// `[admin]`
///
/// ```toml
/// [admin]
/// listen = "127.0.0.1:0"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Admin {
    listen: Option<Spanned<String>>,
    token_env: Option<String>,
}

/// `[pool]`
///
/// ```toml
/// [pool]
/// capacity = 4096   # instances of all types at once
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Pool {
    pub(super) capacity: Option<Spanned<u32>>,
}

impl Admin {
    pub(super) fn validate(
        self,
        lookup: &impl Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<AdminSettings> {
        let listen = listen_address(&self.listen, DEFAULT_ADMIN_LISTEN, lookup, problems)?;
        let token_env = self
            .token_env
            .unwrap_or_else(|| DEFAULT_TOKEN_ENV.to_string());
        let token = lookup(&token_env).filter(|t| !t.trim().is_empty());
        if !listen.ip().is_loopback() && token.is_none() {
            let span = self.listen.as_ref().map(|l| l.span());
            problems.0.push(FormationError {
                span,
                message: format!(
                    "the admin API would listen on `{listen}`, which is not loopback, without a token: set ${token_env} to a secret (requests must then carry `Authorization: Bearer …`), or listen on `127.0.0.1`"
                ),
            });
            return None;
        }
        Some(AdminSettings {
            listen,
            token,
            token_env,
        })
    }
}

/// `[queue]`
///
/// ```toml
/// [queue]
/// backend = "embedded"        # or "redis"
/// path = ".wasmproc/queue"    # embedded only
/// url = "redis://127.0.0.1/"  # redis only
/// max_message = "1MiB"
/// max_bytes = "1GiB"          # per queue
/// max_delay = "30days"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Queue {
    backend: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    max_message: Option<Spanned<Lenient<ByteSize>>>,
    max_bytes: Option<Spanned<Lenient<ByteSize>>>,
    max_delay: Option<Spanned<Lenient<HumanDuration>>>,
}

impl Queue {
    /// Where `max_message` stands, if the file sets it.
    pub(super) fn max_message_span(&self) -> Option<Range<usize>> {
        self.max_message.as_ref().map(Spanned::span)
    }

    pub(super) fn validate(self, dir: &Path, problems: &mut Problems) -> QueueSettings {
        let max_message = checked(&self.max_message, problems)
            .map_or(DEFAULT_MAX_MESSAGE, |(size, span)| {
                size_within(size, span, 1..=MAX_MAX_MESSAGE, "max_message", problems)
            });
        let max_bytes =
            checked(&self.max_bytes, problems).map_or(DEFAULT_MAX_BYTES, |(size, span)| {
                // At least one message of the largest size must fit.
                let least = max_message.min(MAX_MAX_BYTES);
                size_within(size, span, least..=MAX_MAX_BYTES, "max_bytes", problems)
            });
        let max_delay = duration_within(
            &self.max_delay,
            DEFAULT_MAX_DELAY,
            MAX_DELAY_BOUNDS.0..=MAX_DELAY_BOUNDS.1,
            "max_delay",
            problems,
        );
        let backend = self
            .backend
            .as_ref()
            .map_or("embedded", |b| b.get_ref().as_str());
        let backend = match backend {
            "embedded" => {
                if let Some(url) = &self.url {
                    problems.at(url.span(), "`url` applies to `backend = \"redis\"` only");
                }
                let path = self
                    .path
                    .as_ref()
                    .map_or(DEFAULT_QUEUE_PATH, |p| p.get_ref().as_str());
                QueueBackend::Embedded {
                    path: normalize(&dir.join(path)),
                }
            }
            "redis" => {
                if let Some(path) = &self.path {
                    problems.at(
                        path.span(),
                        "`path` applies to `backend = \"embedded\"` only",
                    );
                }
                QueueBackend::Redis {
                    url: self.redis_url(problems),
                }
            }
            other => {
                let span = self.backend.as_ref().map(|b| b.span());
                problems.0.push(FormationError {
                    span,
                    message: format!(
                        "unknown queue backend `{other}`, expected `embedded` or `redis`"
                    ),
                });
                QueueBackend::Embedded {
                    path: dir.join(DEFAULT_QUEUE_PATH),
                }
            }
        };
        QueueSettings {
            backend,
            max_message,
            max_delay,
            max_bytes,
        }
    }

    /// `url` of a Redis backend: required, `redis://`. A `rediss://` url
    /// (TLS) is refused here, where the file can point at it, rather than
    /// when the host first connects: this build has no TLS client.
    fn redis_url(&self, problems: &mut Problems) -> String {
        let Some(url) = &self.url else {
            let span = self.backend.as_ref().map(|b| b.span());
            problems.0.push(FormationError {
                span,
                message: "`backend = \"redis\"` needs `url = \"redis://HOST:PORT\"`".into(),
            });
            return String::new();
        };
        let text = url.get_ref();
        if text.starts_with("redis://") {
            return text.clone();
        }
        let message = if text.starts_with("rediss://") {
            format!(
                "Redis over TLS (`{text}`) is not supported: expected `redis://HOST:PORT` (to encrypt, run a TLS tunnel such as stunnel on this machine and point `url` at it)"
            )
        } else {
            format!("invalid Redis url `{text}`: expected `redis://HOST:PORT`")
        };
        problems.at(url.span(), message);
        String::new()
    }
}

/// `[keyvalue]`
///
/// ```toml
/// [keyvalue]
/// max_value = "1MiB"
/// max_bucket_bytes = "64MiB"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyValue {
    max_value: Option<Spanned<Lenient<ByteSize>>>,
    max_bucket_bytes: Option<Spanned<Lenient<ByteSize>>>,
}

impl KeyValue {
    pub(super) fn validate(self, problems: &mut Problems) -> KeyValueSettings {
        let max_value = checked(&self.max_value, problems)
            .map_or(DEFAULT_KV_MAX_VALUE, |(size, span)| {
                size_within(size, span, 1..=MAX_KV_MAX_VALUE, "max_value", problems)
            });
        let max_bucket_bytes = checked(&self.max_bucket_bytes, problems).map_or(
            DEFAULT_KV_MAX_BUCKET_BYTES,
            |(size, span)| {
                size_within(
                    size,
                    span,
                    1..=MAX_KV_MAX_BUCKET_BYTES,
                    "max_bucket_bytes",
                    problems,
                )
            },
        );
        KeyValueSettings {
            max_value,
            max_bucket_bytes,
        }
    }
}

/// `retry = { attempts = 5, backoff = "1s..5m" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Retry {
    attempts: Option<Spanned<u32>>,
    backoff: Option<Spanned<String>>,
}

impl Retry {
    fn validate(&self, problems: &mut Problems) -> RetryPolicy {
        let attempts = bounded(
            self.attempts.as_ref(),
            DEFAULT_RETRY_ATTEMPTS,
            1..=MAX_RETRY_ATTEMPTS,
            "retry.attempts",
            problems,
        );
        let (backoff_min, backoff_max) = match &self.backoff {
            None => DEFAULT_BACKOFF,
            Some(text) => {
                let parsed = text.get_ref().split_once("..").and_then(|(a, b)| {
                    Some((
                        humantime::parse_duration(a.trim()).ok()?,
                        humantime::parse_duration(b.trim()).ok()?,
                    ))
                });
                match parsed {
                    Some((min, max)) if min <= max => (min, max),
                    _ => {
                        problems.at(
                            text.span(),
                            format!(
                                "invalid backoff `{}`: expected `MIN..MAX` durations such as \"1s..5m\", MIN no larger than MAX",
                                text.get_ref()
                            ),
                        );
                        DEFAULT_BACKOFF
                    }
                }
            }
        };
        RetryPolicy {
            attempts,
            backoff_min,
            backoff_max,
        }
    }
}

/// `[process.NAME]`
///
/// ```toml
/// [process.web]
/// kind = "web"
/// component = "hello.wasm"
/// build = "cargo build --release --target wasm32-wasip2"
/// routes = ["/", "api.example.com/v1"]
/// scale = 8
/// reuse = 1
/// backlog = 256
/// limits = { memory = "64MiB", timeout = "10s", fuel = 5_000_000_000, body = "1MiB" }
/// env = { GREETING = "hello" }
/// allow_outbound = ["api.example.com", "127.0.0.1:9000"]
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Process {
    kind: Spanned<Kind>,
    component: Spanned<String>,
    build: Option<String>,
    routes: Option<Vec<Spanned<String>>>,
    scale: Option<Spanned<ScaleSpec>>,
    reuse: Option<Spanned<u32>>,
    backlog: Option<Spanned<u32>>,
    concurrency: Option<Spanned<u32>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    config: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    allow_outbound: Vec<Spanned<String>>,
    #[serde(default)]
    enqueue: Vec<Spanned<String>>,
    #[serde(default)]
    keyvalue: Vec<Spanned<String>>,
    queue: Option<Spanned<String>>,
    retry: Option<Spanned<Retry>>,
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
}

/// `limits = { … }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    memory: Option<Spanned<Lenient<ByteSize>>>,
    timeout: Option<Spanned<Lenient<HumanDuration>>>,
    fuel: Option<Spanned<u64>>,
    body: Option<Spanned<Lenient<ByteSize>>>,
    resources: Option<Spanned<u32>>,
    headers: Option<Spanned<Lenient<ByteSize>>>,
    connections: Option<Spanned<u32>>,
    type_connections: Option<Spanned<u32>>,
    log_rate: Option<Spanned<u32>>,
    cpu: Option<Spanned<Cores>>,
}

/// The value of a [`Lenient`] field, reporting its error if it has one.
fn checked<T: Copy>(
    value: &Option<Spanned<Lenient<T>>>,
    problems: &mut Problems,
) -> Option<(T, Range<usize>)> {
    let value = value.as_ref()?;
    match &value.get_ref().0 {
        Ok(v) => Some((*v, value.span())),
        Err(why) => {
            problems.at(value.span(), why.clone());
            None
        }
    }
}

/// Checks that an optional number lies in `bounds`; the message states
/// them as the constants define them.
fn bounded<T: Copy + PartialOrd + std::fmt::Display>(
    value: Option<&Spanned<T>>,
    default: T,
    bounds: std::ops::RangeInclusive<T>,
    what: &str,
    problems: &mut Problems,
) -> T {
    let Some(value) = value else {
        return default;
    };
    let n = *value.get_ref();
    if !bounds.contains(&n) {
        problems.at(
            value.span(),
            format!(
                "`{what}` is {n}: expected a number from {} to {}",
                bounds.start(),
                bounds.end()
            ),
        );
    }
    n
}

impl Process {
    /// Checks every rule of a `[process.NAME]` table, reporting each broken
    /// one; `None` if any was.
    pub(super) fn validate(
        self,
        name: String,
        dir: &Path,
        lookup: &impl Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<Located> {
        let before = problems.0.len();
        let kind = *self.kind.get_ref();
        self.keys_of_other_kinds(&name, kind, problems);
        let component_span = self.component.span();
        let component = component_path(&self.component, dir, problems);
        let mut route_spans = Vec::new();
        let role = match kind {
            Kind::Web => self.web_role(&name, &component_span, &mut route_spans, problems),
            Kind::Worker => self.worker_role(&name, problems),
            Kind::Clock => self.clock_role(&name, problems),
        };
        let (scale, autoscale) = scale(self.scale.as_ref(), kind, problems);
        let reuse = reuse(self.reuse.as_ref(), problems);
        let memory_span = self.limits.memory.as_ref().map(Spanned::span);
        let limits = self.limits.validate(problems);
        let env = pairs(self.env, "environment variable", lookup, problems);
        let config = pairs(self.config, "config key", lookup, problems);
        let allow_outbound = outbound_hosts(self.allow_outbound, problems);
        let keyvalue = buckets(&self.keyvalue, problems);
        let (enqueue, enqueue_spans) = self
            .enqueue
            .into_iter()
            .map(|queue| (queue.get_ref().clone(), queue.span()))
            .unzip::<_, _, Vec<_>, Vec<_>>();
        if problems.0.len() != before {
            return None;
        }
        Some(Located {
            process: ProcessType {
                name,
                role: role?,
                component,
                component_span,
                build: self.build,
                scale,
                autoscale,
                reuse,
                limits,
                memory_span,
                env,
                config,
                allow_outbound: allow_outbound.into(),
                enqueue: enqueue.into(),
                keyvalue,
            },
            route_spans,
            enqueue_spans,
        })
    }

    /// Keys that belong to another kind are errors that say which kind.
    fn keys_of_other_kinds(&self, name: &str, kind: Kind, problems: &mut Problems) {
        fn at<T>(value: &Option<Spanned<T>>) -> Option<Range<usize>> {
            value.as_ref().map(Spanned::span)
        }
        let first_route = self.routes.as_ref().and_then(|r| r.first());
        for (applies, key, at) in [
            (Kind::Web, "routes", first_route.map(Spanned::span)),
            (Kind::Web, "backlog", at(&self.backlog)),
            (Kind::Web, "concurrency", at(&self.concurrency)),
            (Kind::Worker, "queue", at(&self.queue)),
            (Kind::Worker, "retry", at(&self.retry)),
            (Kind::Clock, "schedule", at(&self.schedule)),
            (Kind::Clock, "timezone", at(&self.timezone)),
        ] {
            if kind != applies
                && let Some(at) = at
            {
                problems.at(
                    at,
                    format!(
                        "`{key}` applies to {applies} process types only; `{name}` is a {kind}"
                    ),
                );
            }
        }
    }

    /// A web type's routes (`["/"]` when absent, never empty) and backlog.
    fn web_role(
        &self,
        name: &str,
        component_span: &Range<usize>,
        route_spans: &mut Vec<Range<usize>>,
        problems: &mut Problems,
    ) -> Option<Role> {
        let mut routes = Vec::new();
        match &self.routes {
            None => {
                routes.push(Route {
                    host: None,
                    prefix: "/".into(),
                });
                route_spans.push(component_span.clone());
            }
            Some(list) => {
                if list.is_empty() {
                    problems.at(
                        component_span.clone(),
                        format!("`{name}` has `routes = []`: a web process type needs at least one route"),
                    );
                }
                for route in list {
                    match Route::parse(route.get_ref()) {
                        Ok(r) => {
                            routes.push(r);
                            route_spans.push(route.span());
                        }
                        Err(why) => problems.at(route.span(), why),
                    }
                }
            }
        }
        let backlog = bounded(
            self.backlog.as_ref(),
            DEFAULT_BACKLOG,
            0..=MAX_BACKLOG,
            "backlog",
            problems,
        );
        let concurrency = bounded(
            self.concurrency.as_ref(),
            DEFAULT_CONCURRENCY.get(),
            1..=MAX_CONCURRENCY,
            "concurrency",
            problems,
        );
        let concurrency = NonZeroU32::new(concurrency).unwrap_or(DEFAULT_CONCURRENCY);
        Some(Role::Web(WebRole {
            routes,
            backlog,
            concurrency,
        }))
    }

    /// A worker's queue (required, a valid name) and retry policy.
    fn worker_role(&self, name: &str, problems: &mut Problems) -> Option<Role> {
        let retry = self
            .retry
            .as_ref()
            .map_or_else(RetryPolicy::default, |r| r.get_ref().validate(problems));
        let Some(queue) = &self.queue else {
            problems.at(
                self.kind.span(),
                format!("worker `{name}` needs `queue = \"NAME\"`: the queue it consumes"),
            );
            return None;
        };
        if let Err(why) = check_name("queue", queue.get_ref()) {
            problems.at(queue.span(), why);
        }
        Some(Role::Worker(WorkerRole {
            queue: queue.get_ref().clone(),
            retry,
        }))
    }

    /// A clock's schedule (required, cron with seconds) and timezone.
    fn clock_role(&self, name: &str, problems: &mut Problems) -> Option<Role> {
        let timezone = timezone(self.timezone.as_ref(), problems);
        let Some(expression) = &self.schedule else {
            problems.at(
                self.kind.span(),
                format!("clock `{name}` needs `schedule = \"CRON\"`, such as \"0 */5 * * * *\""),
            );
            return None;
        };
        let text = expression.get_ref();
        let parsed = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .build()
            .parse(text);
        let schedule = match parsed {
            Ok(schedule) => schedule,
            Err(e) => {
                problems.at(
                    expression.span(),
                    format!(
                        "invalid schedule `{text}` ({e}): expected a cron expression with seconds, such as \"0 */5 * * * *\" (sec min hour day month weekday)"
                    ),
                );
                return None;
            }
        };
        // A schedule that never fires (`0 0 0 31 2 *`) is a mistake.
        let now = chrono::Utc::now();
        if schedule.find_next_occurrence(&now, false).is_err() {
            problems.at(
                expression.span(),
                format!(
                    "schedule `{text}` never fires: no date matches it (expected a cron expression that some date matches)"
                ),
            );
            return None;
        }
        Some(Role::Clock(ClockRole {
            expression: expression.get_ref().clone(),
            schedule: Box::new(schedule),
            timezone: timezone?,
        }))
    }
}

/// `component`: not empty, resolved against the formation's folder.
fn component_path(
    component: &Spanned<String>,
    dir: &Path,
    problems: &mut Problems,
) -> std::path::PathBuf {
    if component.get_ref().trim().is_empty() {
        problems.at(
            component.span(),
            "`component` is empty: expected the path of a `.wasm` file",
        );
    }
    normalize(&dir.join(component.get_ref()))
}

/// `timezone`: an IANA name; UTC when absent.
fn timezone(value: Option<&Spanned<String>>, problems: &mut Problems) -> Option<chrono_tz::Tz> {
    let Some(tz) = value else {
        return Some(chrono_tz::UTC);
    };
    match tz.get_ref().parse::<chrono_tz::Tz>() {
        Ok(tz) => Some(tz),
        Err(_) => {
            problems.at(
                tz.span(),
                format!(
                    "unknown timezone `{}`: expected an IANA name such as \"Europe/Paris\" or \"UTC\"",
                    tz.get_ref()
                ),
            );
            None
        }
    }
}

/// `scale`: a fixed number in `1..=MAX_SCALE`, or autoscaling bounds (whose
/// minimum may be 0 for workers only).
fn scale(
    value: Option<&Spanned<ScaleSpec>>,
    kind: Kind,
    problems: &mut Problems,
) -> (u32, Option<Autoscale>) {
    let Some(spec) = value else {
        return (DEFAULT_SCALE, None);
    };
    match spec.get_ref() {
        ScaleSpec::Fixed(n) => {
            let n = bounded(
                Some(&Spanned::new(spec.span(), *n)),
                u64::from(DEFAULT_SCALE),
                1..=u64::from(MAX_SCALE),
                "scale",
                problems,
            );
            (u32::try_from(n).unwrap_or(MAX_SCALE), None)
        }
        ScaleSpec::Range { min, max, cooldown } => {
            let least = if kind == Kind::Worker { 0 } else { 1 };
            if *min < least || min > max || *max > u64::from(MAX_SCALE) || *max == 0 {
                problems.at(
                    spec.span(),
                    format!(
                        "`scale = {{ min = {min}, max = {max} }}`: expected {least} ≤ min ≤ max ≤ {MAX_SCALE}, max ≥ 1{}",
                        if kind == Kind::Worker {
                            ""
                        } else {
                            " (only workers may scale to zero)"
                        }
                    ),
                );
            }
            let min = u32::try_from(*min).unwrap_or(0);
            let max = u32::try_from(*max).unwrap_or(MAX_SCALE);
            let cooldown = cooldown.unwrap_or(DEFAULT_COOLDOWN);
            (min, Some(Autoscale { min, max, cooldown }))
        }
    }
}

/// `keyvalue`: bucket names, each a valid name, none twice.
fn buckets(list: &[Spanned<String>], problems: &mut Problems) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for bucket in list {
        let name = bucket.get_ref();
        if let Err(why) = check_name("bucket", name) {
            problems.at(bucket.span(), why);
        } else if out.contains(name) {
            problems.at(bucket.span(), format!("bucket `{name}` is listed twice"));
        } else {
            out.push(name.clone());
        }
    }
    out
}

/// `reuse`: at least 1.
fn reuse(value: Option<&Spanned<u32>>, problems: &mut Problems) -> NonZeroU32 {
    let n = bounded(value, DEFAULT_REUSE.get(), 1..=u32::MAX, "reuse", problems);
    NonZeroU32::new(n).unwrap_or(DEFAULT_REUSE)
}

/// `env` and `config`: names non-empty, without `=` or NUL; values without
/// NUL, with `${VAR}` and `${VAR:-default}` expanded from the host's
/// environment (`what` names the table's entries in messages).
fn pairs(
    table: BTreeMap<Spanned<String>, String>,
    what: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, value) in table {
        let k = key.get_ref();
        if k.is_empty() || k.contains(['=', '\0']) || value.contains('\0') {
            problems.at(
                key.span(),
                format!("invalid {what} `{k}`: names must be non-empty without `=` or NUL"),
            );
        }
        let value = shellexpand::env_with_context_no_errors(&value, |name: &str| lookup(name));
        out.push((key.into_inner(), value.into_owned()));
    }
    out
}

/// `allow_outbound`: each entry a rule [`crate::outbound::parse_rule`]
/// accepts (`host`, `host:port`, `host:*`, `*.domain`, an IP literal, `*`),
/// lowercased.
fn outbound_hosts(hosts: Vec<Spanned<String>>, problems: &mut Problems) -> Vec<String> {
    let mut out = Vec::new();
    for host in hosts {
        let h = host.get_ref().trim().to_ascii_lowercase();
        if let Err(why) = crate::outbound::parse_rule(&h) {
            problems.at(host.span(), format!("invalid outbound rule `{h}`: {why}"));
        }
        out.push(h);
    }
    out
}

impl RawLimits {
    fn validate(self, problems: &mut Problems) -> Limits {
        let memory = checked(&self.memory, problems).map_or(DEFAULT_MEMORY, |(size, span)| {
            size_within(
                size,
                span,
                MIN_MEMORY..=MAX_MEMORY,
                "limits.memory",
                problems,
            )
        });
        let body = checked(&self.body, problems).map_or(DEFAULT_BODY, |(size, span)| {
            size_within(size, span, 0..=MAX_BODY, "limits.body", problems)
        });
        let timeout = match checked(&self.timeout, problems) {
            None => DEFAULT_TIMEOUT,
            Some((HumanDuration(d), span)) => {
                if d.is_zero() || d > MAX_TIMEOUT {
                    problems.at(
                        span,
                        format!(
                            "`limits.timeout` is {}: expected more than 0s and at most {}",
                            humantime::format_duration(d),
                            humantime::format_duration(MAX_TIMEOUT)
                        ),
                    );
                }
                d
            }
        };
        let headers = checked(&self.headers, problems).map_or(DEFAULT_HEADERS, |(size, span)| {
            size_within(
                size,
                span,
                HEADERS_BOUNDS.0..=HEADERS_BOUNDS.1,
                "limits.headers",
                problems,
            )
        });

        let fuel = self.fuel.as_ref().map(|f| {
            if *f.get_ref() == 0 {
                problems.at(
                    f.span(),
                    "`limits.fuel` is 0: expected at least 1 (or leave it out for no fuel limit)",
                );
            }
            *f.get_ref()
        });
        Limits {
            memory,
            timeout,
            fuel,
            body,
            resources: bounded(
                self.resources.as_ref(),
                DEFAULT_RESOURCES,
                RESOURCES_BOUNDS.0..=RESOURCES_BOUNDS.1,
                "limits.resources",
                problems,
            ),
            headers,
            connections: bounded(
                self.connections.as_ref(),
                DEFAULT_CONNECTIONS,
                1..=MAX_CONNECTIONS,
                "limits.connections",
                problems,
            ),
            type_connections: bounded(
                self.type_connections.as_ref(),
                DEFAULT_TYPE_CONNECTIONS,
                1..=MAX_CONNECTIONS,
                "limits.type_connections",
                problems,
            ),
            log_rate: bounded(
                self.log_rate.as_ref(),
                DEFAULT_LOG_RATE,
                1..=MAX_LOG_RATE,
                "limits.log_rate",
                problems,
            ),
            cpu_millicores: self.cpu.as_ref().map(|cpu| cores(cpu, problems)),
        }
    }
}

/// `limits.cpu`, a number of cores (`0.5`, `2`), in thousandths of a core.
fn cores(value: &Spanned<Cores>, problems: &mut Problems) -> u32 {
    let (min, max) = CPU_MILLICORES_BOUNDS;
    let Cores(cores) = *value.get_ref();
    let millicores = (cores * 1000.0).round();
    if !(f64::from(min)..=f64::from(max)).contains(&millicores) {
        problems.at(
            value.span(),
            format!(
                "`limits.cpu` is {cores}: expected a number of cores from {} to {} (0.5 is half a core)",
                f64::from(min) / 1000.0,
                max / 1000
            ),
        );
        return max;
    }
    // In bounds, so it fits.
    millicores as u32
}

/// A duration within `bounds` (or `default` when absent); the message
/// states the bounds as the constants define them.
fn duration_within(
    value: &Option<Spanned<Lenient<HumanDuration>>>,
    default: Duration,
    bounds: std::ops::RangeInclusive<Duration>,
    what: &str,
    problems: &mut Problems,
) -> Duration {
    let Some((HumanDuration(d), span)) = checked(value, problems) else {
        return default;
    };
    if !bounds.contains(&d) {
        problems.at(
            span,
            format!(
                "`{what}` is {}: expected from {} to {}",
                humantime::format_duration(d),
                humantime::format_duration(*bounds.start()),
                humantime::format_duration(*bounds.end())
            ),
        );
    }
    d
}

/// Checks that a size lies in `bounds`; the message states the bounds as
/// the constants define them (`from 64KiB to 4GiB`, `at most 1GiB`).
fn size_within(
    size: ByteSize,
    span: Range<usize>,
    bounds: std::ops::RangeInclusive<u64>,
    what: &str,
    problems: &mut Problems,
) -> u64 {
    let bytes = size.0;
    if !bounds.contains(&bytes) {
        let (min, max) = (ByteSize(*bounds.start()), ByteSize(*bounds.end()));
        let expected = if min.0 == 0 {
            format!("at most {max}")
        } else {
            format!("from {min} to {max}")
        };
        problems.at(
            span,
            format!("`{what}` is {bytes} bytes: expected {expected}"),
        );
    }
    bytes
}

/// `a/b/../c` → `a/c`, without touching the file system (the file may not
/// exist yet when `--build` will create it).
fn normalize(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}
