//! The bodies of one exchange between a client and a guest, and what they
//! tell the front about it.
//!
//! [`RequestBody`] is what a guest reads: it stops at `limits.body`, and
//! fails a client that sends slower than `[http] min_body_rate` while the
//! guest waits for it, so a slow upload cannot hold an instance for its
//! whole timeout. [`ResponseBody`] is what hyper sends: it cuts the
//! connection (no final chunk, a short `content-length`) when the unit
//! failed after it answered or the request went over its limit, so a client
//! can always tell a half answer from a whole one.
//!
//! Both record what they saw in the exchange's [`Exchange`], which the
//! front reads to tell a client's fault (hung up, too slow, too large) from
//! a guest's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// How long a client may send nothing at the start of a body before the
/// minimum rate applies.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(2);

/// How a client broke an exchange. Not the guest's fault: the unit's
/// failure is counted under its own reason and never as a crash-loop step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// The client went away before the exchange ended.
    HungUp,
    /// The client sent its body slower than `[http] min_body_rate`.
    TooSlow,
    /// The body went over `limits.body`.
    TooLarge,
}

impl ClientFault {
    /// A few words for logs.
    pub fn describe(self) -> &'static str {
        match self {
            ClientFault::HungUp => "the client hung up",
            ClientFault::TooSlow => "the client sent its body too slowly",
            ClientFault::TooLarge => "the request body is over the limit",
        }
    }

    fn code(self) -> u8 {
        match self {
            ClientFault::HungUp => 1,
            ClientFault::TooSlow => 2,
            ClientFault::TooLarge => 3,
        }
    }

    fn from_code(code: u8) -> Option<ClientFault> {
        match code {
            1 => Some(ClientFault::HungUp),
            2 => Some(ClientFault::TooSlow),
            3 => Some(ClientFault::TooLarge),
            _ => None,
        }
    }
}

/// What the front, the unit and the bodies of one request know about it.
#[derive(Default)]
pub struct Exchange {
    /// The first client fault seen, as a [`ClientFault`] code (0: none).
    fault: AtomicU8,
    /// The guest's answer went to hyper.
    answered: AtomicBool,
    /// The unit failed (set before its instance is dropped, so before the
    /// guest's body can end).
    failed: AtomicBool,
}

impl Exchange {
    /// Records a client fault; the first one recorded stays.
    pub fn client_fault(&self, fault: ClientFault) {
        let _ = self
            .fault
            .compare_exchange(0, fault.code(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// The client's fault, if it broke the exchange.
    pub fn fault(&self) -> Option<ClientFault> {
        ClientFault::from_code(self.fault.load(Ordering::Acquire))
    }

    /// Marks the guest's answer as handed to hyper.
    pub fn answered(&self) {
        self.answered.store(true, Ordering::Release);
    }

    /// Whether the guest's answer went to hyper.
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Marks the unit as failed.
    pub fn failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Whether the answer must not end cleanly.
    fn broken(&self) -> bool {
        self.failed.load(Ordering::Acquire) || self.fault() == Some(ClientFault::TooLarge)
    }
}

/// What a [`Guard`] records if it is dropped armed.
#[derive(Clone, Copy)]
enum Mark {
    /// The unit failed.
    Failed,
    /// The client hung up.
    HungUp,
}

/// Records something in an exchange when dropped, unless disarmed: what
/// the front knows only because a future was dropped before it ended.
pub struct Guard {
    exchange: Option<Arc<Exchange>>,
    mark: Mark,
}

impl Guard {
    /// Held by a unit around its guest call: a call that errs, or is
    /// dropped at its deadline, marks the exchange failed before the
    /// instance goes, so before the guest's body can end.
    pub fn failing(exchange: &Arc<Exchange>) -> Self {
        Guard {
            exchange: Some(exchange.clone()),
            mark: Mark::Failed,
        }
    }

    /// Held by the front until it answers: hyper drops a request it is
    /// answering only when the client went away.
    pub fn hanging_up(exchange: &Arc<Exchange>) -> Self {
        Guard {
            exchange: Some(exchange.clone()),
            mark: Mark::HungUp,
        }
    }

    /// What it guarded ended well.
    pub fn disarm(mut self) {
        self.exchange = None;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        match (self.exchange.take(), self.mark) {
            (Some(exchange), Mark::Failed) => exchange.failed(),
            (Some(exchange), Mark::HungUp) => exchange.client_fault(ClientFault::HungUp),
            (None, _) => {}
        }
    }
}

/// A request body as a guest reads it.
pub struct RequestBody {
    inner: hyper::body::Incoming,
    exchange: Arc<Exchange>,
    limit: u64,
    received: u64,
    /// Bytes per second the client must keep up while waited for; 0: off.
    min_rate: u64,
    /// Time spent waiting for the client, before the current wait.
    waited: Duration,
    /// When the current wait began, and its deadline timer.
    waiting: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
}

impl RequestBody {
    /// `inner`, read at most `limit` bytes of, at least `min_rate` bytes a
    /// second while waited for.
    pub fn new(
        inner: hyper::body::Incoming,
        exchange: Arc<Exchange>,
        limit: u64,
        min_rate: u64,
    ) -> Self {
        RequestBody {
            inner,
            exchange,
            limit,
            received: 0,
            min_rate,
            waited: Duration::ZERO,
            waiting: None,
        }
    }

    /// How long the client may yet make us wait in all, given what it sent.
    fn allowance(&self) -> Duration {
        let earned = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        (BODY_RATE_GRACE + earned).saturating_sub(self.waited)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_ready()
            && let Some((since, _)) = this.waiting.take()
        {
            this.waited += since.elapsed();
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.received > this.limit {
                        this.exchange.client_fault(ClientFault::TooLarge);
                        return Poll::Ready(Some(Err(
                            wasmtime_wasi_http::Error::HttpRequestBodySize(Some(this.limit)),
                        )));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.exchange.client_fault(ClientFault::HungUp);
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::Hyper(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.min_rate == 0 => Poll::Pending,
            Poll::Pending => {
                if this.waiting.is_none() {
                    let deadline = tokio::time::Instant::now() + this.allowance();
                    this.waiting =
                        Some((Instant::now(), Box::pin(tokio::time::sleep_until(deadline))));
                }
                let Some((_, timer)) = this.waiting.as_mut() else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.exchange.client_fault(ClientFault::TooSlow);
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a connection's requests not yet fully answered (from when hyper
/// hands one to the front until its answer's body is sent or dropped), so
/// shutdown can close at once a connection that has none — idle, or
/// halfway through a request's headers — and let the others finish.
#[derive(Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    /// A request has come in.
    pub fn begin(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every request has been answered.
    pub fn is_idle(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }
}

/// An answer as hyper sends it.
pub struct ResponseBody {
    inner: HyperOutgoingBody,
    /// The exchange, for a guest's answer; `None` for the front's own.
    exchange: Option<Arc<Exchange>>,
    in_flight: Arc<InFlight>,
    ended: bool,
}

impl ResponseBody {
    /// Wraps `inner`, the answer to one of `in_flight`'s requests (counted
    /// by [`InFlight::begin`]); a guest's answer carries its `exchange`.
    pub fn new(
        inner: HyperOutgoingBody,
        exchange: Option<Arc<Exchange>>,
        in_flight: Arc<InFlight>,
    ) -> Self {
        ResponseBody {
            inner,
            exchange,
            in_flight,
            ended: false,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.in_flight.0.fetch_sub(1, Ordering::AcqRel);
        if !self.ended
            && let Some(exchange) = &self.exchange
        {
            // hyper gives up on an answer only when its connection is gone.
            exchange.client_fault(ClientFault::HungUp);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.ended = true;
                if self.exchange.as_ref().is_some_and(|e| e.broken()) {
                    // Cut the connection rather than end a broken answer
                    // as if it were whole.
                    return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpProtocolError)));
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never claim the end early: the last poll decides whether it is clean.
        self.exchange.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A WASI 0.3 guest's answer body, which tells its unit when hyper is done
/// with it — sent whole, failed, or dropped. The guest writes such a body
/// from tasks of its own, which run only while the instance's event loop
/// does, so the unit keeps the loop running until then.
pub struct SentBody {
    inner: HyperOutgoingBody,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SentBody {
    /// A signal that resolves once the body made by [`SentBodyMaker::wrap`]
    /// is done with, and the maker.
    pub fn signal() -> (impl Future<Output = ()> + Send, SentBodyMaker) {
        let (done, signal) = tokio::sync::oneshot::channel();
        let signal = async move {
            let _ = signal.await;
        };
        (signal, SentBodyMaker(done))
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

/// Makes the one [`SentBody`] a signal waits for.
pub struct SentBodyMaker(tokio::sync::oneshot::Sender<()>);

impl SentBodyMaker {
    /// Wraps the guest's body `inner`.
    pub fn wrap(self, inner: HyperOutgoingBody) -> HyperOutgoingBody {
        use http_body_util::BodyExt as _;
        SentBody {
            inner,
            done: Some(self.0),
        }
        .boxed_unsync()
    }
}

impl Drop for SentBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
