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
use http_body_util::{BodyExt as _, Limited};
use tokio::sync::oneshot;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};

use super::answers::{self, HttpResponse};
use crate::formation::WebRole;
use crate::pool::{Failure, Lease, Pool};

/// The world web components target: `wasi:http/proxy`.
pub struct ProxyWorld;

crate::pool::world!(ProxyWorld, role: WebRole, pre: ProxyPre, exports: Proxy,
    requires: "`wasi:http/incoming-handler`: a web process type must be a `wasi:http/proxy` component");

/// What a guest's answer, or its absence, came to.
type Answer = Result<HttpResponse, ErrorCode>;

/// What the connection saw first of a running unit.
enum Progress {
    /// The guest set its response outparam (an answer or an error code).
    Answered(Answer),
    /// The guest dropped its response outparam without setting it.
    Dropped,
    /// The unit ended before the outparam was looked at.
    Ended(Result<(), Failure>),
}

/// Serves one request with an instance of `pool`'s type.
pub(crate) async fn serve(
    pool: &Arc<Pool<ProxyWorld>>,
    request: http::Request<hyper::body::Incoming>,
) -> HttpResponse {
    let process = pool.process();
    let limit = process.limits.body;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return answers::too_large(limit);
    }
    let Some(mut lease) = pool.admit(pool.role().backlog).await else {
        pool.stats.rejected.inc();
        tracing::debug!(process = %process.name, "pool full: 503");
        return answers::at_capacity(process);
    };
    let name = lease.instance().clone();
    let method = request.method().clone();
    let uri = request.uri().clone();
    let (sender, mut receiver) = oneshot::channel();
    // The unit runs on this connection's task until the guest answers;
    // a guest still streaming its body then goes on in a task of its
    // own while hyper sends what it writes. Most units end before the
    // answer is even read, and cost no task, no wake-up, no other thread.
    let mut unit = Detached(Some(Box::pin(async move {
        let outcome = run(&mut lease, limit, request, sender).await;
        drop(lease);
        outcome
    })));
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
    let failure = match answer {
        Some(Ok(response)) => return response,
        Some(Err(code)) => Failure::Trap(format!("guest answered with error {code:?}")),
        None => ended.err().unwrap_or(Failure::NoResponse),
    };
    let detail = failure.detail();
    tracing::warn!(
        instance = %name,
        http.method = %method,
        url.path = %uri.path(),
        reason = failure.reason(),
        "request failed ({}); instance discarded{}{detail}",
        failure.reason(),
        if detail.is_empty() { "" } else { ": " },
    );
    answers::failed(process, &failure)
}

/// Runs one request in the lease's instance, reading at most `limit` bytes
/// of its body.
async fn run(
    lease: &mut Lease<ProxyWorld>,
    limit: u64,
    request: http::Request<hyper::body::Incoming>,
    sender: oneshot::Sender<Answer>,
) -> Result<(), Failure> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let request = request.map(move |body| {
        Limited::new(body, limit).map_err(move |e| match e.downcast::<hyper::Error>() {
            Ok(e) => wasmtime_wasi_http::Error::Hyper(*e),
            Err(_) => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(limit as u64)),
        })
    });
    lease
        .run(async move |proxy, store| {
            let mut http = store.data_mut().http();
            let req = http.new_incoming_request(Scheme::Http, request)?;
            let out = http.new_response_outparam(sender)?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(store, req, out)
                .await
        })
        .await
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
