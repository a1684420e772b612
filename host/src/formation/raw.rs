//! The formation file as written: serde structs that mirror the TOML tables
//! one to one (`deny_unknown_fields` everywhere), and the checks that turn
//! them into the validated types of the parent module.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::values::{ByteSize, HumanDuration, Lenient};
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

impl Http {
    pub(super) fn validate(
        self,
        lookup: &impl Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<HttpSettings> {
        let (text, span) = match &self.listen {
            Some(listen) => (listen.get_ref().as_str(), Some(listen.span())),
            None => (DEFAULT_LISTEN, None),
        };
        let expanded = shellexpand::env_with_context_no_errors(text, |name: &str| lookup(name));
        let listen = match expanded.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                let message = format!(
                    "invalid listen address `{expanded}`: expected `IP:PORT` such as `127.0.0.1:8080` (`${{PORT:-8080}}` reads $PORT)"
                );
                match span {
                    Some(span) => problems.at(span, message),
                    None => problems.0.push(FormationError {
                        span: None,
                        message,
                    }),
                }
                None
            }
        };
        let shutdown_grace =
            checked(&self.shutdown_grace, problems).map_or(DEFAULT_SHUTDOWN_GRACE, |(g, _)| g.0);
        Some(HttpSettings {
            listen: listen?,
            shutdown_grace,
        })
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
    scale: Option<Spanned<u32>>,
    reuse: Option<Spanned<u32>>,
    backlog: Option<Spanned<u32>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    allow_outbound: Vec<Spanned<String>>,
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
    ) -> Option<(ProcessType, Vec<Range<usize>>)> {
        let before = problems.0.len();
        let kind = *self.kind.get_ref();
        if kind != Kind::Web {
            problems.at(
                self.kind.span(),
                format!("process kind `{kind}` is not supported by this version of wasmproc: expected `web`"),
            );
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
            None => {
                routes.push(Route {
                    host: None,
                    prefix: "/".into(),
                });
                route_spans.push(component_span.clone());
            }
            Some(list) => {
                if list.is_empty() && kind == Kind::Web {
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

        let scale = bounded(&self.scale, DEFAULT_SCALE, 1, MAX_SCALE, "scale", problems);
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
        Some((
            ProcessType {
                name,
                kind,
                component,
                component_span,
                build: self.build,
                routes,
                scale,
                reuse,
                backlog,
                limits,
                env,
                allow_outbound,
            },
            route_spans,
        ))
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
