//! The formation file as written: serde structs that mirror the TOML tables
//! one to one (`deny_unknown_fields` everywhere), and the checks that turn
//! them into the validated types of the parent module.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::values::{ByteSize, HumanDuration, Lenient, ScaleSpec};
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
        let shutdown_grace =
            checked(&self.shutdown_grace, problems).map_or(DEFAULT_SHUTDOWN_GRACE, |(g, _)| g.0);
        Some(HttpSettings {
            listen: listen?,
            shutdown_grace,
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
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Queue {
    backend: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    max_message: Option<Spanned<Lenient<ByteSize>>>,
}

impl Queue {
    pub(super) fn validate(self, dir: &Path, problems: &mut Problems) -> QueueSettings {
        let max_message = match checked(&self.max_message, problems) {
            None => DEFAULT_MAX_MESSAGE,
            Some((ByteSize(bytes), span)) => {
                if !(1..=MAX_MAX_MESSAGE).contains(&bytes) {
                    problems.at(
                        span,
                        format!("`max_message` is {bytes} bytes: expected from 1 byte to 64MiB"),
                    );
                }
                bytes
            }
        };
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
                let url = match &self.url {
                    Some(url)
                        if url.get_ref().starts_with("redis://")
                            || url.get_ref().starts_with("rediss://") =>
                    {
                        url.get_ref().clone()
                    }
                    Some(url) => {
                        problems.at(
                            url.span(),
                            format!(
                                "invalid Redis url `{}`: expected `redis://HOST:PORT`",
                                url.get_ref()
                            ),
                        );
                        String::new()
                    }
                    None => {
                        let span = self.backend.as_ref().map(|b| b.span());
                        problems.0.push(FormationError {
                            span,
                            message: "`backend = \"redis\"` needs `url = \"redis://HOST:PORT\"`"
                                .into(),
                        });
                        String::new()
                    }
                };
                QueueBackend::Redis { url }
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
            &self.attempts,
            DEFAULT_RETRY_ATTEMPTS,
            1,
            MAX_RETRY_ATTEMPTS,
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
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    allow_outbound: Vec<Spanned<String>>,
    #[serde(default)]
    enqueue: Vec<Spanned<String>>,
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

/// Checks that an optional number lies in `min..=max`.
fn bounded<T: Copy + PartialOrd + std::fmt::Display>(
    value: &Option<Spanned<T>>,
    default: T,
    min: T,
    max: T,
    what: &str,
    problems: &mut Problems,
) -> T {
    match value {
        None => default,
        Some(v) => {
            let n = *v.get_ref();
            if n < min || n > max {
                problems.at(
                    v.span(),
                    format!("`{what}` is {n}: expected a number from {min} to {max}"),
                );
            }
            n
        }
    }
}

impl Process {
    pub(super) fn validate(
        self,
        name: String,
        dir: &Path,
        problems: &mut Problems,
    ) -> Option<Located> {
        let before = problems.0.len();
        let kind = *self.kind.get_ref();
        let kind_span = self.kind.span();
        let routes_span = self
            .routes
            .as_ref()
            .and_then(|r| r.first())
            .map(|r| r.span());
        for (applies, key, span) in [
            (Kind::Web, "routes", routes_span),
            (
                Kind::Web,
                "backlog",
                self.backlog.as_ref().map(|b| b.span()),
            ),
            (Kind::Worker, "queue", self.queue.as_ref().map(|q| q.span())),
            (Kind::Worker, "retry", self.retry.as_ref().map(|r| r.span())),
            (
                Kind::Clock,
                "schedule",
                self.schedule.as_ref().map(|s| s.span()),
            ),
            (
                Kind::Clock,
                "timezone",
                self.timezone.as_ref().map(|t| t.span()),
            ),
        ] {
            if kind != applies
                && let Some(span) = span
            {
                problems.at(
                    span,
                    format!(
                        "`{key}` applies to {applies} process types only; `{name}` is a {kind}"
                    ),
                );
            }
        }

        let queue = match (&self.queue, kind) {
            (Some(queue), Kind::Worker) => {
                if let Err(why) = check_name("queue", queue.get_ref()) {
                    problems.at(queue.span(), why);
                }
                Some(queue.get_ref().clone())
            }
            (None, Kind::Worker) => {
                problems.at(
                    kind_span.clone(),
                    format!("worker `{name}` needs `queue = \"NAME\"`: the queue it consumes"),
                );
                None
            }
            _ => None,
        };
        let retry = self
            .retry
            .as_ref()
            .map_or_else(RetryPolicy::default, |r| r.get_ref().validate(problems));
        let schedule = match (&self.schedule, kind) {
            (Some(expression), Kind::Clock) => {
                let timezone = match &self.timezone {
                    None => Some(chrono_tz::UTC),
                    Some(tz) => match tz.get_ref().parse::<chrono_tz::Tz>() {
                        Ok(tz) => Some(tz),
                        Err(_) => {
                            problems.at(
                                tz.span(),
                                format!("unknown timezone `{}`: expected an IANA name such as \"Europe/Paris\" or \"UTC\"", tz.get_ref()),
                            );
                            None
                        }
                    },
                };
                match expression.get_ref().parse::<cron::Schedule>() {
                    Ok(parsed) => timezone.map(|timezone| ClockSchedule {
                        expression: expression.get_ref().clone(),
                        schedule: parsed,
                        timezone,
                    }),
                    Err(e) => {
                        // The cron crate's message repeats the expression and a
                        // caret on lines of its own; keep only its last line.
                        let text = e.to_string();
                        let why = text.lines().last().unwrap_or_default().trim();
                        problems.at(
                            expression.span(),
                            format!(
                                "invalid schedule `{}` ({why}): expected a cron expression with seconds, such as \"0 */5 * * * *\" (sec min hour day month weekday)",
                                expression.get_ref()
                            ),
                        );
                        None
                    }
                }
            }
            (None, Kind::Clock) => {
                problems.at(
                    kind_span.clone(),
                    format!(
                        "clock `{name}` needs `schedule = \"CRON\"`, such as \"0 */5 * * * *\""
                    ),
                );
                None
            }
            _ => None,
        };
        let mut enqueue = Vec::new();
        let mut enqueue_spans = Vec::new();
        for queue in &self.enqueue {
            enqueue.push(queue.get_ref().clone());
            enqueue_spans.push(queue.span());
        }

        let component_span = self.component.span();
        let component_text = self.component.into_inner();
        if component_text.trim().is_empty() {
            problems.at(
                component_span.clone(),
                "`component` is empty: expected the path of a `.wasm` file",
            );
        }
        let component = normalize(&dir.join(&component_text));

        let mut routes = Vec::new();
        let mut route_spans = Vec::new();
        match self.routes {
            _ if kind != Kind::Web => {}
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

        let (scale, autoscale) = match &self.scale {
            None => (DEFAULT_SCALE, None),
            Some(spec) => match spec.get_ref() {
                ScaleSpec::Fixed(n) => {
                    if !(1..=u64::from(MAX_SCALE)).contains(n) {
                        problems.at(
                            spec.span(),
                            format!("`scale` is {n}: expected a number from 1 to {MAX_SCALE}"),
                        );
                    }
                    (u32::try_from(*n).unwrap_or(MAX_SCALE), None)
                }
                ScaleSpec::Range { min, max, cooldown } => {
                    let least = if kind == Kind::Worker { 0 } else { 1 };
                    if *min < least || min > max || *max > u64::from(MAX_SCALE) || *max == 0 {
                        problems.at(
                            spec.span(),
                            format!(
                                "`scale = {{ min = {min}, max = {max} }}`: expected {least} ≤ min ≤ max ≤ {MAX_SCALE}, max ≥ 1{}",
                                if kind == Kind::Worker { "" } else { " (only workers may scale to zero)" }
                            ),
                        );
                    }
                    let min = u32::try_from(*min).unwrap_or(0);
                    let max = u32::try_from(*max).unwrap_or(MAX_SCALE);
                    (
                        min,
                        Some(Autoscale {
                            min,
                            max,
                            cooldown: cooldown.unwrap_or(DEFAULT_COOLDOWN),
                        }),
                    )
                }
            },
        };
        let reuse = bounded(&self.reuse, DEFAULT_REUSE, 1, u32::MAX, "reuse", problems);
        let backlog = bounded(
            &self.backlog,
            DEFAULT_BACKLOG,
            0,
            MAX_BACKLOG,
            "backlog",
            problems,
        );

        let limits = self.limits.validate(problems);

        let mut env = Vec::new();
        for (key, value) in self.env {
            let k = key.get_ref();
            if k.is_empty() || k.contains(['=', '\0']) || value.contains('\0') {
                problems.at(
                    key.span(),
                    format!("invalid environment variable `{k}`: names must be non-empty without `=` or NUL"),
                );
            }
            env.push((key.into_inner(), value));
        }

        let mut allow_outbound = Vec::new();
        for host in self.allow_outbound {
            let h = host.get_ref().trim().to_ascii_lowercase();
            if h.is_empty() || h.contains(['/', ' ']) {
                problems.at(
                    host.span(),
                    format!("invalid outbound host `{h}`: expected `host`, `host:port` or `*`"),
                );
            }
            allow_outbound.push(h);
        }

        if problems.0.len() != before {
            return None;
        }
        Some(Located {
            process: ProcessType {
                name,
                kind,
                component,
                component_span,
                build: self.build,
                routes,
                scale,
                autoscale,
                reuse,
                backlog,
                limits,
                env,
                allow_outbound: allow_outbound.into(),
                enqueue: enqueue.into(),
                queue,
                retry,
                schedule,
            },
            route_spans,
            enqueue_spans,
        })
    }
}

impl RawLimits {
    fn validate(self, problems: &mut Problems) -> Limits {
        let memory = match checked(&self.memory, problems) {
            None => DEFAULT_MEMORY,
            Some((ByteSize(bytes), span)) => {
                if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
                    problems.at(
                        span,
                        format!("`limits.memory` is {bytes} bytes: expected from 64KiB to 4GiB"),
                    );
                }
                bytes
            }
        };
        let timeout = match checked(&self.timeout, problems) {
            None => DEFAULT_TIMEOUT,
            Some((HumanDuration(d), span)) => {
                if d.is_zero() || d > MAX_TIMEOUT {
                    problems.at(
                        span,
                        format!(
                            "`limits.timeout` is {}: expected more than 0s and at most 1h",
                            humantime::format_duration(d)
                        ),
                    );
                }
                d
            }
        };
        let fuel = self.fuel.as_ref().map(|f| {
            if *f.get_ref() == 0 {
                problems.at(
                    f.span(),
                    "`limits.fuel` is 0: expected at least 1 (or leave it out for no fuel limit)",
                );
            }
            *f.get_ref()
        });
        let body = match checked(&self.body, problems) {
            None => DEFAULT_BODY,
            Some((ByteSize(bytes), span)) => {
                if bytes > MAX_BODY {
                    problems.at(
                        span,
                        format!("`limits.body` is {bytes} bytes: expected at most 1GiB"),
                    );
                }
                bytes
            }
        };
        Limits {
            memory,
            timeout,
            fuel,
            body,
        }
    }
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
