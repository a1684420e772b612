//! One HTTP request as a unit of work in a web pool.
//!
//! # Where a request runs
//!
//! A request runs on its connection's task, not a task of its own: a guest
//! that answers and ends within one poll (most do) costs no spawn and no
//! cross-thread wake-up. Once the guest has answered, hyper must send the
//! answer while the guest may still write its body, so whatever is left of
//! the unit moves to a task of its own ([`Detached`]). A started unit always
//! runs to its end, even when its client hangs up: its instance is settled
//! and counted like any other.
//!
//! # What the client gets
//!
//! The guest's answer, as soon as it sets one. If the unit fails before the
//! guest answered — or the guest answered with an error code, or returned
//! without answering — the front answers instead (see [`super::answers`]),
//! and the log says why with the instance's name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header;
use tokio::sync::oneshot;
use tracing::Instrument as _;
use wasmtime::Store;
use wasmtime::component::InstancePre;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p3::bindings::{Service, ServicePre};

use super::answers::{self, HttpResponse};
use super::body::{ClientFault, Exchange, Guard, RequestBody, SentBody};
use crate::formation::WebRole;
use crate::instance::InstanceState;
use crate::outbound::SendsNothing;
use crate::pool::{Failure, Lease, Pool, World};
use crate::telemetry;

/// The world web components target: `wasi:http/proxy`.
pub struct ProxyWorld;

/// A web component pre-instantiated: WASI 0.2 or 0.3, told apart by its
/// exports when it is loaded (so one pool may hold either, and a deploy may
/// swap one for the other).
pub enum WebPre {
    /// A `wasi:http/proxy` component (`incoming-handler`).
    P2(ProxyPre<InstanceState>),
    /// A `wasi:http/service` component (`handler`, WASI 0.3).
    P3(ServicePre<InstanceState>),
}

/// A live web instance's exports.
pub enum WebExports {
    /// WASI 0.2.
    P2(Proxy),
    /// WASI 0.3.
    P3(Service),
}

impl World for ProxyWorld {
    type Role = WebRole;
    type Pre = WebPre;
    type Exports = WebExports;
    type State = super::shared::Shared;
    const REQUIRED_EXPORT: &'static str = "`wasi:http/incoming-handler` (a WASI 0.2 `wasi:http/proxy` component) or `wasi:http/handler` (a WASI 0.3 `wasi:http/service` component)";

    fn pre(pre: InstancePre<InstanceState>) -> wasmtime::Result<WebPre> {
        match ServicePre::new(pre.clone()) {
            Ok(service) => Ok(WebPre::P3(service)),
            Err(_) => ProxyPre::new(pre).map(WebPre::P2),
        }
    }

    fn suits(role: &WebRole, pre: &WebPre) -> Result<(), String> {
        match pre {
            WebPre::P2(_) if role.concurrency.get() > 1 => Err(format!(
                "`concurrency = {}` needs a WASI 0.3 `wasi:http/service` component, whose handler is async; this is a WASI 0.2 `wasi:http/proxy` component (set `concurrency = 1`, or use `reuse`)",
                role.concurrency
            )),
            WebPre::P2(_) | WebPre::P3(_) => Ok(()),
        }
    }

    async fn instantiate(
        pre: &WebPre,
        store: &mut Store<InstanceState>,
    ) -> wasmtime::Result<WebExports> {
        Ok(match pre {
            WebPre::P2(pre) => WebExports::P2(pre.instantiate_async(store).await?),
            WebPre::P3(pre) => WebExports::P3(pre.instantiate_async(store).await?),
        })
    }
}

/// What a guest's answer, or its absence, came to.
pub(crate) type Answer = Result<HttpResponse, ErrorCode>;

/// What the connection saw first of a running unit.
enum Progress {
    /// The guest set its response outparam (an answer or an error code).
    Answered(Answer),
    /// The guest dropped its response outparam without setting it.
    Dropped,
    /// The unit ended before the outparam was looked at.
    Ended(Result<(), Failure>),
}

/// What [`serve`] hands the connection: the answer, and for a guest's
/// answer the exchange its body reports to.
pub(crate) struct Served {
    /// The answer.
    pub response: HttpResponse,
    /// The exchange, when the guest answered.
    pub exchange: Option<Arc<Exchange>>,
}

impl From<HttpResponse> for Served {
    fn from(response: HttpResponse) -> Self {
        Served {
            response,
            exchange: None,
        }
    }
}

/// Serves one request with an instance of `pool`'s type; a client must
/// send its body at `min_body_rate` bytes a second or more (0: no check).
pub(crate) async fn serve(
    pool: &Arc<Pool<ProxyWorld>>,
    request: http::Request<hyper::body::Incoming>,
    min_body_rate: u64,
) -> Served {
    let process = pool.process();
    let limit = process.limits.body;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return answers::too_large(limit).into();
    }
    if pool.role().concurrency.get() > 1 {
        return super::shared::serve(pool, request, min_body_rate).await;
    }
    let Some(mut lease) = pool.admit(pool.role().backlog).await else {
        pool.stats.rejected.inc();
        tracing::debug!(process = %process.name, "pool full: 503");
        return answers::at_capacity(process).into();
    };
    let name = lease.instance().clone();
    if telemetry::enabled() {
        let span = tracing::Span::current();
        span.record("process", &*process.name);
        span.record("instance", &*name);
    }
    let method = request.method().clone();
    let uri = request.uri().clone();
    let exchange = Arc::new(Exchange::default());
    let waiting = Guard::hanging_up(&exchange);
    let request =
        request.map(|body| RequestBody::new(body, exchange.clone(), limit, min_body_rate));
    let (sender, mut receiver) = oneshot::channel();
    // The unit runs on this connection's task until the guest answers;
    // a guest still streaming its body then goes on in a task of its
    // own while hyper sends what it writes. Most units end before the
    // answer is even read, and cost no task, no wake-up, no other thread.
    let unit_exchange = exchange.clone();
    let unit_name = name.clone();
    let unit_uri = uri.clone();
    let unit_method = method.clone();
    let unit = async move {
        let outcome = run(&mut lease, request, sender, &unit_exchange).await;
        drop(lease);
        if let Err(failure) = &outcome
            && unit_exchange.has_answered()
        {
            // The client got the head of an answer; its body is cut.
            log_failure(
                &unit_name,
                &unit_method,
                &unit_uri,
                failure,
                "after it answered",
            );
        }
        outcome
    };
    // A unit that detaches stays in the request's span (tracing on only:
    // looking up the current span costs every request).
    let mut unit = Detached(Some(if telemetry::enabled() {
        Box::pin(unit.instrument(tracing::Span::current()))
    } else {
        Box::pin(unit)
    }));
    let progress = std::future::poll_fn(|cx| {
        if let Poll::Ready(outcome) = unit.poll_unit(cx) {
            return Poll::Ready(Progress::Ended(outcome));
        }
        Pin::new(&mut receiver).poll(cx).map(|sent| match sent {
            Ok(answer) => Progress::Answered(answer),
            Err(_) => Progress::Dropped,
        })
    })
    .await;
    let (answer, ended) = match progress {
        // Answered while running: what is left of the unit detaches.
        Progress::Answered(answer) => (Some(answer), Ok(())),
        // The unit's end says why there is no answer.
        Progress::Dropped => (None, std::future::poll_fn(|cx| unit.poll_unit(cx)).await),
        // It may have answered in the poll it ended in.
        Progress::Ended(outcome) => (receiver.try_recv().ok(), outcome),
    };
    waiting.disarm();
    let failure = match (answer, exchange.fault()) {
        // The client broke the request: its fault decides the answer.
        (_, Some(ClientFault::TooLarge)) => return answers::too_large(limit).into(),
        (_, Some(ClientFault::TooSlow)) => return answers::too_slow().into(),
        (Some(Ok(response)), _) if ended.is_ok() => {
            exchange.answered();
            return Served {
                response,
                exchange: Some(exchange),
            };
        }
        (Some(Err(code)), _) => Failure::Trap(format!("guest answered with error {code:?}")),
        (_, _) => ended.err().unwrap_or(Failure::NoResponse),
    };
    log_failure(&name, &method, &uri, &failure, "");
    answers::failed(process, &failure).into()
}

/// Logs a failed request: a warning for a guest's failure, a debug line
/// for a client's.
pub(crate) fn log_failure(
    instance: &str,
    method: &http::Method,
    uri: &http::Uri,
    failure: &Failure,
    when: &str,
) {
    if telemetry::enabled() {
        tracing::Span::current().record("error.type", failure.reason());
    }
    let detail = failure.detail();
    let sep = if detail.is_empty() { "" } else { ": " };
    let when = if when.is_empty() {
        String::new()
    } else {
        format!(" {when}")
    };
    if failure.is_guests() {
        tracing::warn!(
            instance = %instance,
            http.method = %method,
            url.path = %uri.path(),
            reason = failure.reason(),
            "request failed{when} ({}); instance discarded{sep}{detail}",
            failure.reason(),
        );
    } else {
        tracing::debug!(
            instance = %instance,
            http.method = %method,
            url.path = %uri.path(),
            reason = failure.reason(),
            "request ended by the client{when}{sep}{detail}",
        );
    }
}

/// Runs one request in the lease's instance.
///
/// The guest's answer goes through a relay: wasi-http gets a channel of
/// the unit's own, and each poll of the unit forwards what the guest set
/// to `sender`. So when the call returns the unit knows whether the guest
/// answered — a guest that returned without answering fails its unit, and
/// its instance is never reused.
async fn run(
    lease: &mut Lease<ProxyWorld>,
    request: http::Request<RequestBody>,
    sender: oneshot::Sender<Answer>,
    exchange: &Arc<Exchange>,
) -> Result<(), Failure> {
    lease
        .run(async move |exports, store| {
            let guard = Guard::failing(exchange);
            let called = match exports {
                WebExports::P2(proxy) => call_p2(proxy, store, request, sender).await,
                WebExports::P3(service) => call_p3(service, store, request, sender).await,
            };
            match called {
                Err(error) => {
                    // A guest that trapped because its client broke the
                    // exchange (its reads or writes failed) is not to blame;
                    // its deadline, fuel and resources stay its own.
                    let budget = matches!(
                        error.downcast_ref::<wasmtime::Trap>(),
                        Some(wasmtime::Trap::Interrupt | wasmtime::Trap::OutOfFuel)
                    );
                    Err(match exchange.fault() {
                        Some(fault) if !budget => Failure::Client(fault.describe()).into(),
                        _ => error,
                    })
                }
                Ok(()) => {
                    guard.disarm();
                    Ok(())
                }
            }
        })
        .await
}

/// Calls a WASI 0.2 guest's `incoming-handler` with `request`; its answer
/// goes to `sender` through a relay, so when the call returns the unit
/// knows whether the guest answered (one that did not fails its unit).
async fn call_p2(
    proxy: &Proxy,
    store: &mut Store<InstanceState>,
    request: http::Request<RequestBody>,
    sender: oneshot::Sender<Answer>,
) -> wasmtime::Result<()> {
    let (relay, mut relayed) = oneshot::channel();
    let mut http = store.data_mut().http();
    let req = http.new_incoming_request(Scheme::Http, request)?;
    let out = http.new_response_outparam(relay)?;
    let call = proxy
        .wasi_http_incoming_handler()
        .call_handle(store, req, out);
    let mut call = std::pin::pin!(call);
    let mut sender = Some(sender);
    let mut forward = |cx: &mut Context<'_>| {
        if sender.is_some()
            && let Poll::Ready(Ok(answer)) = Pin::new(&mut relayed).poll(cx)
            && let Some(sender) = sender.take()
        {
            let _ = sender.send(answer);
        }
    };
    std::future::poll_fn(|cx| {
        let polled = call.as_mut().poll(cx);
        forward(cx);
        polled
    })
    .await?;
    if sender.is_some() {
        return Err(Failure::NoResponse.into());
    }
    Ok(())
}

/// Calls a WASI 0.3 guest's `handler` with `request` inside the store's
/// event loop, hands the answer to `sender`, and keeps the loop running —
/// the guest writes its body from tasks of its own — until hyper has sent
/// the whole body or given up on it.
async fn call_p3(
    service: &Service,
    store: &mut Store<InstanceState>,
    request: http::Request<RequestBody>,
    sender: oneshot::Sender<Answer>,
) -> wasmtime::Result<()> {
    let mut hooks = SendsNothing;
    let (request, request_io) = wasmtime_wasi_http::p3::Request::from_http(&mut hooks, request);
    store
        .run_concurrent(async |accessor| -> wasmtime::Result<()> {
            let response = match service.handle(accessor, request).await? {
                Ok(response) => response,
                Err(code) => {
                    return Err(Failure::Trap(format!("guest answered with error {code:?}")).into());
                }
            };
            let response =
                accessor.with(|mut access| response.into_http(&mut access, request_io))?;
            let (sent, body) = SentBody::signal();
            let _ = sender.send(Ok(response.map(|inner| body.wrap(inner))));
            sent.await;
            Ok(())
        })
        .await?
}

/// A unit of work started on a connection's task. If it is dropped before
/// it ends (the answer went out while the guest still streams its body, or
/// the client went away), the unit goes on in a task of its own: a started
/// unit always runs to its end, so its instance is settled and counted.
struct Detached(Option<UnitFuture>);

/// A unit of work in flight, boxed so it can move to a task of its own.
type UnitFuture = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

impl Detached {
    /// Polls the unit; once it has ended, it is gone and reads as `Ok`.
    fn poll_unit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let Some(running) = self.0.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let outcome = std::task::ready!(running.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(outcome)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(unit) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(unit);
        }
    }
}
