//! Outbound HTTP from guests: which requests an instance may send, where
//! they may go, how many may be open, and how they are sent.
//!
//! # Design
//!
//! A guest's `wasi:http/outgoing-handler.handle` lands in
//! [`Outbound::send_request`], the `WasiHttpHooks` of its store. Each
//! request passes four gates, in this order:
//!
//! 1. **Rules.** Its scheme, host and port must match a rule of the
//!    process type's `allow_outbound` list, parsed once per type into
//!    [`Rule`]s (see [`rules`] for the forms: `host`, `host:port`,
//!    `host:*`, `*.domain`, IP literals, `*`).
//! 2. **Caps.** It takes a permit from its instance's semaphore
//!    (`limits.connections`) and one from its type's
//!    (`limits.type_connections`), without waiting: when either is spent
//!    it fails at once with `connection-limit-reached`. Resolution happens
//!    under these permits, so lookups in flight are bounded too.
//! 3. **Addresses.** The host resolves the name itself, within the connect
//!    timeout, and refuses the request if *any* address it gets is not
//!    public (loopback, private, link-local, metadata, … see [`address`]).
//!    Only a rule that is an IP literal vouches for a non-public address,
//!    and only when the request names that address itself.
//!    Then, whatever the rule, an address that is one of the host's own
//!    listeners is refused.
//! 4. **Sending.** [`send`] connects to a vetted address — it never
//!    resolves again, so there is no window for DNS rebinding — and sends
//!    one HTTP/1.1 request, over TLS for `https`.
//!
//! A request stopped at gate 1 or 3 gets `HTTP-request-denied`, at gate 2
//! `connection-limit-reached`; each writes a warning naming the instance,
//! the authority and why, at most [`WARNINGS_PER_SECOND`] a second per
//! instance (then a count of those suppressed): a guest may call in a loop.
//!
//! # Invariants
//!
//! - A name never leads a guest to a non-public address, whatever its DNS
//!   records say; `*` and `*.domain` reach public addresses only.
//! - An instance has at most `limits.connections` outbound connections
//!   open, all instances of a type together at most
//!   `limits.type_connections`. A permit is held from the request until
//!   both the response body and the connection's I/O future have ended (or
//!   been dropped, as when the guest drops the response or the instance
//!   goes away), so the count is of open connections and their file
//!   descriptors.
//! - Every phase of a request has a deadline ([`DEFAULT_CONNECT_TIMEOUT`],
//!   [`DEFAULT_FIRST_BYTE_TIMEOUT`], [`DEFAULT_BETWEEN_BYTES_TIMEOUT`],
//!   guest-chosen values capped at [`MAX_OUTBOUND_TIMEOUT`]).
//!
//! - No guest reaches the host's own listeners (the HTTP front, the admin
//!   API), whatever the rules say: see [`listeners`].

pub mod address;
mod listeners;
pub mod rules;
mod send;
mod warnings;

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument as _;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::formation::ProcessType;
use crate::telemetry;
pub use address::{AddressClass, classify};
pub use listeners::guard_listener;
use rules::{Host, Target};
pub use rules::{Rule, parse_rule};
pub use send::{
    DEFAULT_BETWEEN_BYTES_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FIRST_BYTE_TIMEOUT,
    MAX_OUTBOUND_TIMEOUT,
};
use send::{IoFuture, Permits, Timeouts};
pub use warnings::WARNINGS_PER_SECOND;

/// The largest chunk of a body a guest writes that the host buffers (see
/// [`WasiHttpHooks::p2_outgoing_body_chunk_size`]).
pub const BODY_CHUNK_BYTES: usize = 16 << 10;
use warnings::Warnings;

/// What every instance of one process type shares about outbound requests:
/// its rules and its connection cap. Created once per pool.
pub struct TypeOutbound {
    policy: Arc<TypePolicy>,
}

struct TypePolicy {
    /// The process type's name, for messages.
    process: String,
    rules: Vec<Rule>,
    /// Outbound connections all instances of the type may have open.
    connections: Arc<Semaphore>,
    type_limit: u32,
    /// Outbound connections one instance may have open.
    instance_limit: u32,
    /// The TLS client settings; `None` if they could not be built.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl TypeOutbound {
    /// The outbound policy of `process`. An `allow_outbound` entry that is
    /// not a valid rule allows nothing, and is reported in the log.
    pub fn new(process: &ProcessType) -> TypeOutbound {
        let mut rules = Vec::new();
        for entry in process.allow_outbound.iter() {
            match parse_rule(entry) {
                Ok(rule) => rules.push(rule),
                Err(why) => tracing::warn!(
                    process = %process.name,
                    "`allow_outbound` entry `{entry}` of `{}` is ignored: {why}",
                    process.name
                ),
            }
        }
        TypeOutbound::with_rules(
            &process.name,
            rules,
            process.limits.connections,
            process.limits.type_connections,
        )
    }

    /// The policy of a type named `process` with these rules and caps.
    pub fn with_rules(
        process: &str,
        rules: Vec<Rule>,
        instance_limit: u32,
        type_limit: u32,
    ) -> TypeOutbound {
        TypeOutbound::with_tls(
            process,
            rules,
            instance_limit,
            type_limit,
            send::tls_config(),
        )
    }

    /// [`TypeOutbound::with_rules`] with given TLS settings (tests trust
    /// their own certificate authority).
    fn with_tls(
        process: &str,
        rules: Vec<Rule>,
        instance_limit: u32,
        type_limit: u32,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> TypeOutbound {
        TypeOutbound {
            policy: Arc::new(TypePolicy {
                process: process.to_string(),
                rules,
                connections: Arc::new(Semaphore::new(permits(type_limit))),
                type_limit,
                instance_limit,
                tls,
            }),
        }
    }

    /// The policy of one instance of the type.
    pub fn for_instance(&self, instance: &Arc<str>) -> Outbound {
        Outbound {
            instance: instance.clone(),
            policy: self.policy.clone(),
            connections: Arc::new(Semaphore::new(permits(self.policy.instance_limit))),
            warnings: Arc::new(Warnings::new(instance)),
        }
    }

    /// Outbound connections of the type open now.
    pub fn open_connections(&self) -> u32 {
        open(&self.policy.connections, self.policy.type_limit)
    }
}

fn permits(limit: u32) -> usize {
    usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

fn open(semaphore: &Semaphore, limit: u32) -> u32 {
    let free = u32::try_from(semaphore.available_permits()).unwrap_or(u32::MAX);
    limit.saturating_sub(free)
}

/// Decides which outbound HTTP requests an instance may send, and sends
/// them: the `WasiHttpHooks` of its store.
pub struct Outbound {
    instance: Arc<str>,
    policy: Arc<TypePolicy>,
    /// Outbound connections this instance may still open.
    connections: Arc<Semaphore>,
    warnings: Arc<Warnings>,
}

/// Where the rules let a request go, before any address is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// A rule names this address: connect to it, whatever its class.
    Named(SocketAddr),
    /// A name or wildcard rule matched: the addresses must be public.
    Vetted,
}

/// Why a request was denied; shown in the log, never to the guest (which
/// gets `HTTP-request-denied`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Denial {
    /// No rule names the host.
    #[error("`{target}` is not in `allow_outbound`")]
    NotListed { target: String },
    /// A rule names the host, but not this port.
    #[error(
        "`{target}` is not in `allow_outbound`: `{rule}` allows {ports} only (write `{host}:{port}` or `{host}:*` to allow more)"
    )]
    Port {
        target: String,
        rule: String,
        ports: String,
        host: String,
        port: u16,
    },
    /// A name resolved to a non-public address.
    #[error(
        "`{name}` resolves to {ip}, {class}; a name may only lead to public addresses (to allow this one, name it: `{literal}`)"
    )]
    ResolvesPrivate {
        name: String,
        ip: IpAddr,
        class: AddressClass,
        literal: String,
    },
    /// An address a wildcard matched is not public.
    #[error("`{target}` is {class}; only a rule naming the address may reach it (`{target}`)")]
    Private { target: String, class: AddressClass },
    /// The address is one the host itself listens on.
    #[error("{address} is the host's own listener {listener}, which guests may not reach")]
    HostListener {
        address: SocketAddr,
        listener: SocketAddr,
    },
}

/// Why a request was refused for want of a connection slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Limit {
    #[error("the instance already has {0} outbound connections open, its `limits.connections`")]
    Instance(u32),
    #[error(
        "process type `{process}` already has {limit} outbound connections open, its `limits.type_connections`"
    )]
    Type { process: String, limit: u32 },
}

/// Why the addresses of a request could not be used.
enum Unusable {
    Denied(Denial),
    Failed(Error),
}

impl Outbound {
    /// Outbound connections of this instance open now.
    pub fn open_connections(&self) -> u32 {
        open(&self.connections, self.policy.instance_limit)
    }

    /// Which rule lets `target` through, and whether it names the address.
    fn route(&self, target: &Target) -> Result<Route, Denial> {
        let mut matching = self.policy.rules.iter().filter(|r| r.matches(target));
        let Some(first) = matching.next() else {
            return Err(self.unlisted(target));
        };
        let named = |rule: &Rule| match target.host {
            Host::Ip(ip) => rule.names_address(ip),
            Host::Name(_) => false,
        };
        match target.host {
            Host::Ip(ip) if named(first) || matching.any(named) => {
                Ok(Route::Named(SocketAddr::new(ip, target.port)))
            }
            _ => Ok(Route::Vetted),
        }
    }

    /// The denial of a target no rule matches, with a hint when only the
    /// port was wrong.
    fn unlisted(&self, target: &Target) -> Denial {
        let host_only = self
            .policy
            .rules
            .iter()
            .find(|r| r.matches_host(&target.host));
        match host_only {
            Some(rule) => Denial::Port {
                target: target.to_string(),
                rule: rule.to_string(),
                ports: match rule.port() {
                    rules::PortPattern::Exact(port) => format!("port {port}"),
                    _ => format!("port {}", target.default_port()),
                },
                host: target.host.to_string(),
                port: target.port,
            },
            None => Denial::NotListed {
                target: target.to_string(),
            },
        }
    }

    /// A permit from the instance and one from the type, or the cap that
    /// is spent.
    fn acquire(&self) -> Result<Permits, Limit> {
        let instance = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Limit::Instance(self.policy.instance_limit))?;
        let process = self
            .policy
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Limit::Type {
                process: self.policy.process.clone(),
                limit: self.policy.type_limit,
            })?;
        Ok(Permits {
            _instance: instance,
            _process: process,
        })
    }
}

/// The addresses of `target` a request may connect to: all of them public,
/// or none. Resolution must end by `deadline`.
async fn public_addresses(target: &Target, deadline: Instant) -> Result<Vec<SocketAddr>, Unusable> {
    let addresses = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.as_str(), target.port));
            let found = tokio::time::timeout_at(deadline, lookup)
                .await
                .map_err(|_| Unusable::Failed(Error::DnsTimeout))?
                .map_err(|e| {
                    Unusable::Failed(Error::DnsError {
                        rcode: Some(e.to_string()),
                        info_code: None,
                    })
                })?;
            found.collect()
        }
    };
    if addresses.is_empty() {
        return Err(Unusable::Failed(Error::DnsError {
            rcode: Some("no addresses".to_string()),
            info_code: None,
        }));
    }
    for address in &addresses {
        let class = classify(address.ip());
        if class.is_public() {
            continue;
        }
        let literal = Target {
            host: Host::Ip(address.ip()),
            port: target.port,
            tls: target.tls,
        }
        .to_string();
        return Err(Unusable::Denied(match &target.host {
            Host::Name(name) => Denial::ResolvesPrivate {
                name: name.clone(),
                ip: address.ip(),
                class,
                literal,
            },
            Host::Ip(_) => Denial::Private {
                target: literal,
                class,
            },
        }));
    }
    Ok(addresses)
}

/// `addresses`, unless one of them is a listener of the host itself.
fn outside_the_host(addresses: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Unusable> {
    for address in &addresses {
        if let Some(listener) = listeners::host_listener(*address) {
            return Err(Unusable::Denied(Denial::HostListener {
                address: *address,
                listener,
            }));
        }
    }
    Ok(addresses)
}

type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), Error>> + Send>;

fn failed(error: Error) -> SendFuture {
    Box::new(async move { Err(error) })
}

/// Hooks that send nothing: what wasmproc reads a WASI 0.3 request with,
/// for wasi-http's filter of forbidden headers and its defaults.
pub struct SendsNothing;

impl WasiHttpHooks for SendsNothing {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        failed(Error::HttpRequestDenied)
    }
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        if !telemetry::enabled() {
            return self.send(request, options);
        }
        // A client span in the unit's trace; the request carries it on.
        let span = tracing::info_span!(
            "http.client",
            otel.name = %request.method(),
            otel.kind = "client",
            http.request.method = %request.method(),
            server.address = request.uri().host().unwrap_or_default(),
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        telemetry::stamp_headers(&span, request.headers_mut());
        let sending = {
            let _entered = span.enter();
            Pin::from(self.send(request, options))
        };
        Box::new(
            async move {
                let sent = sending.await;
                let span = tracing::Span::current();
                match &sent {
                    Ok((response, _)) => {
                        span.record("http.response.status_code", response.status().as_u16());
                    }
                    Err(error) => {
                        span.record("otel.status_code", "ERROR");
                        span.record("error.type", tracing::field::debug(error));
                    }
                }
                sent
            }
            .instrument(span),
        )
    }

    // The failures below are the guest's business (a server that refuses,
    // a bad certificate): they reach the guest as error codes, and the log
    // only at debug level, since a guest can cause them in a loop.

    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> ErrorCode {
        tracing::debug!(instance = %self.instance, "outbound HTTP error: {err}");
        if err.is_incomplete_message() {
            ErrorCode::HttpResponseIncomplete
        } else if err.is_timeout() {
            ErrorCode::HttpResponseTimeout
        } else if err.is_closed() || err.is_canceled() {
            ErrorCode::ConnectionTerminated
        } else {
            ErrorCode::HttpProtocolError
        }
    }

    fn p2_error_from_connect(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(instance = %self.instance, "outbound connection failed: {err}");
        ErrorCode::DestinationUnavailable
    }

    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(instance = %self.instance, "outbound TLS failed: {err}");
        ErrorCode::TlsProtocolError
    }

    /// Bodies a guest writes hold at most two chunks of
    /// [`BODY_CHUNK_BYTES`] on the host, not wasi-http's 2 × 1 MiB: part
    /// of the bound on what one instance can make the host hold.
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        BODY_CHUNK_BYTES
    }
}

impl Outbound {
    /// Sends a guest's request as the policy allows.
    fn send(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> SendFuture {
        let authority = request
            .uri()
            .authority()
            .map_or_else(String::new, |a| a.to_string());
        let target = match Target::from_uri(request.uri()) {
            Ok(target) => target,
            Err(why) => {
                tracing::debug!(instance = %self.instance, %authority, "outbound request invalid: {why}");
                return failed(Error::HttpRequestUriInvalid);
            }
        };
        let route = match self.route(&target) {
            Ok(route) => route,
            Err(denial) => {
                self.warnings.warn("denied", &authority, &denial);
                return failed(Error::HttpRequestDenied);
            }
        };
        let permits = match self.acquire() {
            Ok(permits) => permits,
            Err(limit) => {
                self.warnings.warn("refused", &authority, &limit);
                return failed(Error::ConnectionLimitReached);
            }
        };
        let timeouts = Timeouts::new(options.as_ref());
        let warnings = self.warnings.clone();
        let instance = self.instance.clone();
        let tls = self.policy.tls.clone();
        Box::new(async move {
            let deadline = Instant::now() + timeouts.connect;
            let usable = match route {
                Route::Named(address) => Ok(vec![address]),
                Route::Vetted => public_addresses(&target, deadline).await,
            }
            .and_then(outside_the_host);
            let addresses = match usable {
                Ok(addresses) => addresses,
                Err(Unusable::Denied(denial)) => {
                    warnings.warn("denied", &authority, &denial);
                    return Err(Error::HttpRequestDenied);
                }
                Err(Unusable::Failed(error)) => {
                    tracing::debug!(%instance, %authority, "outbound request failed: {error}");
                    return Err(error);
                }
            };
            tracing::debug!(%instance, %authority, addresses = ?addresses, "outbound request");
            let connection = send::Connection {
                target: &target,
                addresses: &addresses,
                tls,
                timeouts,
                deadline,
            };
            let sent = send::send(request, connection, permits).await;
            if let Err(error) = &sent {
                tracing::debug!(%instance, %authority, "outbound request failed: {error}");
            }
            sent
        })
    }
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("instance", &self.instance)
            .field("process", &self.policy.process)
            .field("rules", &self.policy.rules)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
