//! WASI 0.3 instances that serve several requests at once (`concurrency = N`).
//!
//! # Design
//!
//! A WASI 0.3 handler is `async`: while one request waits (on a timer, an
//! outbound call, a slow client), the same instance can run another. A web
//! type with `concurrency = N` therefore runs each instance in a task of its
//! own — its *host task* — which holds the instance's slot of the pool (so
//! `scale` still bounds the instances and the pool's capacity holds), owns
//! its store and drives the store's event loop. Each instance has N
//! *seats*. A request is admitted while fewer than `scale × N + backlog`
//! are in, takes a seat of the least busy instance that accepts requests —
//! starting a host task in a free slot when every running instance is full
//! — and is sent to it over a channel; it waits at most `limits.timeout`
//! for a seat, then gets 503 like any request of a full pool.
//!
//! Inside the event loop each request is one guest task: the host calls
//! `wasi:http/handler#handle`, hands the answer to the request's
//! connection, and keeps the request's task alive until hyper has sent its
//! body. Every request is counted as a unit of the pool, as in the slot
//! model.
//!
//! # Limits and failure
//!
//! - A request has its own deadline, `limits.timeout` from its start: one
//!   that waits past it fails alone (504), and its instance takes no new
//!   request and retires once the others have ended (its guest task may
//!   still run: wasmtime cannot cancel it yet).
//! - The epoch deadline of the store is the earliest deadline of the
//!   requests in flight, so a guest that computes past it is interrupted:
//!   that, a trap, exhausted fuel or memory fails the *instance* — every
//!   request in flight on it fails with that reason, and only those — and
//!   its slot gets a fresh instance for the next request.
//! - Fuel is refilled to `limits.fuel` when a request starts, so it bounds
//!   the computing between two request starts rather than per request.
//! - An instance retires after `reuse` requests, after a deploy (it serves
//!   no request of the new generation), and when the pool scales down (an
//!   idle instance gives its slot back within [`IDLE_CHECK`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use wasmtime::AsContextMut as _;
use wasmtime::component::Accessor;
use wasmtime_wasi_http::p3::bindings::Service;

use super::answers;
use super::body::{Exchange, RequestBody, SentBody};
use super::request::{Answer, ProxyWorld, Served, WebExports};
use crate::instance::InstanceState;
use crate::outbound::SendsNothing;
use crate::pool::{Failure, Lease, Pool};

/// How often an idle instance checks whether it should retire (a deploy, a
/// scale-down).
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The running instances of one web type with `concurrency > 1`.
#[derive(Default)]
pub struct Shared {
    instances: Mutex<Vec<Arc<Seats>>>,
    /// Notified when a seat frees up or an instance ends.
    changed: Notify,
}

/// One running instance, as requests see it.
struct Seats {
    name: Arc<str>,
    /// Requests sent to it and not yet ended. Changed under the lock of
    /// [`Shared::instances`] when a request takes a seat.
    taken: AtomicU32,
    /// Whether it takes new requests. Cleared under the same lock, when the
    /// instance also leaves the list.
    accepting: AtomicBool,
    jobs: mpsc::UnboundedSender<Job>,
    /// Why the instance failed, once it has.
    failure: watch::Sender<Option<Failure>>,
}

/// One request sent to an instance.
struct Job {
    request: http::Request<RequestBody>,
    answer: oneshot::Sender<Answer>,
    ended: oneshot::Sender<Result<(), Failure>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Seats>>> {
        self.instances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A seat for one request: of the least busy running instance with one
    /// free, or of a new instance in a free slot; waits until `deadline`.
    async fn seat(
        &self,
        pool: &Arc<Pool<ProxyWorld>>,
        n: u32,
        deadline: Instant,
    ) -> Option<Arc<Seats>> {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let instances = self.lock();
                let free = instances
                    .iter()
                    .filter(|s| s.taken.load(Ordering::Acquire) < n)
                    .min_by_key(|s| s.taken.load(Ordering::Acquire));
                if let Some(seats) = free {
                    seats.taken.fetch_add(1, Ordering::AcqRel);
                    return Some(seats.clone());
                }
            }
            if let Some(lease) = pool.try_lease() {
                return Some(self.start(pool, lease));
            }
            tokio::time::timeout_at(deadline.into(), notified)
                .await
                .ok()?;
        }
    }

    /// Starts a host task in `lease`'s slot, with its first seat taken.
    fn start(&self, pool: &Arc<Pool<ProxyWorld>>, lease: Lease<ProxyWorld>) -> Arc<Seats> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let seats = Arc::new(Seats {
            name: lease.instance().clone(),
            taken: AtomicU32::new(1),
            accepting: AtomicBool::new(true),
            jobs,
            failure: watch::Sender::new(None),
        });
        self.lock().push(seats.clone());
        // Requests that found no seat while this slot was being leased
        // wait for a change: this instance has seats for them.
        self.changed.notify_waiters();
        tokio::spawn(host(pool.clone(), lease, seats.clone(), queue));
        seats
    }

    /// Takes `seats` out of the list: it gets no new request.
    fn close(&self, seats: &Seats) {
        let mut instances = self.lock();
        seats.accepting.store(false, Ordering::Release);
        instances.retain(|s| !std::ptr::eq(&**s, seats));
        drop(instances);
        self.changed.notify_waiters();
    }

    /// A request ended: its seat is free.
    fn free(&self, seats: &Seats) {
        seats.taken.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// Serves one request of a web type with `concurrency > 1`.
pub(crate) async fn serve(
    pool: &Arc<Pool<ProxyWorld>>,
    request: http::Request<hyper::body::Incoming>,
    min_body_rate: u64,
) -> Served {
    let process = pool.process();
    let role = pool.role();
    let n = role.concurrency.get();
    let Some(_admitted) = pool.admit_seat(n, role.backlog) else {
        pool.stats.rejected.inc();
        return answers::at_capacity(process).into();
    };
    let deadline = Instant::now() + process.limits.timeout;
    let Some(seats) = pool.state().seat(pool, n, deadline).await else {
        pool.stats.rejected.inc();
        return answers::at_capacity(process).into();
    };
    if crate::telemetry::enabled() {
        tracing::Span::current().record("process", &*process.name);
    }
    let exchange = Arc::new(Exchange::default());
    let limit = process.limits.body;
    let method = request.method().clone();
    let uri = request.uri().clone();
    let request =
        request.map(|body| RequestBody::new(body, exchange.clone(), limit, min_body_rate));
    let (answer, mut answered) = oneshot::channel();
    let (ended, mut end) = oneshot::channel();
    if seats
        .jobs
        .send(Job {
            request,
            answer,
            ended,
        })
        .is_err()
    {
        // The instance ended in between: its seat went with it.
        return answers::at_capacity(process).into();
    }
    let first = std::future::poll_fn(|cx| {
        if let Poll::Ready(answer) = std::pin::Pin::new(&mut answered).poll(cx) {
            return Poll::Ready(Ok(answer));
        }
        std::pin::Pin::new(&mut end).poll(cx).map(Err)
    })
    .await;
    let failure = match first {
        Ok(Ok(Ok(response))) => {
            exchange.answered();
            return Served {
                response,
                exchange: Some(exchange),
            };
        }
        Ok(Ok(Err(code))) => Failure::Trap(format!("guest answered with error {code:?}")),
        // No answer: the request's end, or its instance's failure, says why.
        Ok(Err(_)) | Err(_) => match end.await {
            Ok(Err(failure)) => failure,
            Ok(Ok(())) => Failure::NoResponse,
            Err(_) => instance_failure(&seats).await,
        },
    };
    super::request::log_failure(&seats.name, &method, &uri, &failure, "");
    answers::failed(process, &failure).into()
}

/// Why `seats`' instance failed, once its host task has said.
async fn instance_failure(seats: &Seats) -> Failure {
    let mut failure = seats.failure.subscribe();
    match failure.wait_for(Option::is_some).await {
        Ok(failure) => failure.clone().unwrap_or(Failure::NoResponse),
        Err(_) => Failure::NoResponse,
    }
}

/// What became of one request in an instance.
enum Ended {
    /// It ended (well or not), and the instance is fine.
    Request(Result<(), Failure>),
    /// It waited past its deadline.
    Late,
    /// The instance failed while running it.
    Instance(wasmtime::Error),
}

/// The host task of one instance: creates it in `lease`'s slot, runs the
/// requests `queue` brings in its event loop until it retires or fails,
/// then gives the slot back.
async fn host(
    pool: Arc<Pool<ProxyWorld>>,
    mut lease: Lease<ProxyWorld>,
    seats: Arc<Seats>,
    mut queue: mpsc::UnboundedReceiver<Job>,
) {
    let shared = pool.state();
    let generation = pool.generation();
    let exports = lease.host().await;
    let (mut store, service) = match exports {
        Ok((store, WebExports::P3(service))) => (store, service),
        Ok((_, WebExports::P2(_))) => {
            // `ProxyWorld::suits` refuses WASI 0.2 components here.
            let failure =
                Failure::Instantiate("a WASI 0.2 component cannot serve requests at once".into());
            return fail_queued(&pool, &seats, &mut queue, failure);
        }
        Err(failure) => return fail_queued(&pool, &seats, &mut queue, failure),
    };
    // Requests in flight, by id: when each started, for the units of a
    // failed instance.
    let in_flight: Mutex<BTreeMap<u64, Instant>> = Mutex::new(BTreeMap::new());
    let outcome = store
        .run_concurrent(async |accessor| {
            serve_requests(
                &pool, &seats, &mut queue, &service, accessor, &in_flight, generation,
            )
            .await
        })
        .await;
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) | Err(error) => Some(crate::pool::classify_error(&error, store.data())),
    };
    shared.close(&seats);
    if let Some(failure) = failure {
        let lost = std::mem::take(&mut *in_flight.lock().unwrap_or_else(|p| p.into_inner()));
        for started in lost.values() {
            pool.end_unit(&seats.name, *started, Err(&failure));
        }
        tracing::warn!(
            instance = %seats.name,
            reason = failure.reason(),
            "instance failed ({}) with {} requests in flight; they failed; instance discarded{}{}",
            failure.reason(),
            lost.len(),
            if failure.detail().is_empty() { "" } else { ": " },
            failure.detail()
        );
        seats.failure.send_replace(Some(failure));
    }
    drop(store);
    drop(lease);
    shared.changed.notify_waiters();
}

/// An instance that could not start fails the requests sent to it.
fn fail_queued(
    pool: &Pool<ProxyWorld>,
    seats: &Seats,
    queue: &mut mpsc::UnboundedReceiver<Job>,
    failure: Failure,
) {
    pool.state().close(seats);
    queue.close();
    while let Ok(job) = queue.try_recv() {
        let started = pool.begin_unit();
        pool.end_unit(&seats.name, started, Err(&failure));
        let _ = job.ended.send(Err(failure.clone()));
    }
    seats.failure.send_replace(Some(failure));
}

/// The event loop's work: takes requests as they come, runs each as a
/// guest task, and settles each as it ends; returns when the instance
/// retires (`Ok`) or fails (`Err`).
async fn serve_requests(
    pool: &Arc<Pool<ProxyWorld>>,
    seats: &Arc<Seats>,
    queue: &mut mpsc::UnboundedReceiver<Job>,
    service: &Service,
    accessor: &Accessor<InstanceState>,
    in_flight: &Mutex<BTreeMap<u64, Instant>>,
    generation: u64,
) -> wasmtime::Result<()> {
    let shared = pool.state();
    let limits = pool.process().limits;
    let reuse = pool.process().reuse.get();
    let next_id = AtomicU64::new(0);
    let mut running = FuturesUnordered::new();
    // Deadlines of the requests in flight, for the store's epoch deadline.
    let mut deadlines: BTreeMap<(Instant, u64), ()> = BTreeMap::new();
    let mut served: u32 = 0;
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    loop {
        let retiring = !seats.accepting.load(Ordering::Acquire);
        if retiring && running.is_empty() && seats.taken.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        tokio::select! {
            biased;
            Some((id, deadline, started, ended, outcome)) = running.next(), if !running.is_empty() => {
                deadlines.remove(&(deadline, id));
                set_deadline(accessor, &deadlines, limits.timeout);
                in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(cpu) = pool.cpu() {
                    accessor.with(|mut access| cpu.after_unit(&mut access.data_mut().cpu));
                }
                served += 1;
                shared.free(seats);
                let ended: oneshot::Sender<Result<(), Failure>> = ended;
                match outcome {
                    Ended::Request(result) => {
                        pool.end_unit(&seats.name, started, result.as_ref().map(|_| ()));
                        let _ = ended.send(result);
                    }
                    Ended::Late => {
                        pool.end_unit(&seats.name, started, Err(&Failure::Timeout));
                        let _ = ended.send(Err(Failure::Timeout));
                        // Its guest task may still run: no new request here.
                        shared.close(seats);
                    }
                    Ended::Instance(error) => {
                        let failure = accessor.with(|mut access| crate::pool::classify_error(&error, access.data_mut()));
                        pool.end_unit(&seats.name, started, Err(&failure));
                        let _ = ended.send(Err(failure));
                        return Err(error);
                    }
                }
                if served >= reuse {
                    shared.close(seats);
                }
            }
            job = queue.recv() => {
                let Some(job) = job else { return Ok(()) };
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let started = pool.begin_unit();
                let deadline = started + limits.timeout;
                in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(id, started);
                deadlines.insert((deadline, id), ());
                set_deadline(accessor, &deadlines, limits.timeout);
                if let Some(fuel) = limits.fuel {
                    accessor.with(|mut access| {
                        let _ = access.as_context_mut().set_fuel(fuel);
                    });
                }
                let Job { request, answer, ended } = job;
                running.push(async move {
                    let outcome = match tokio::time::timeout_at(deadline.into(), run(service, accessor, request, answer)).await {
                        Ok(outcome) => outcome,
                        Err(_) => Ended::Late,
                    };
                    (id, deadline, started, ended, outcome)
                });
            }
            _ = idle_check.tick(), if running.is_empty() => {
                if pool.generation() != generation || pool.shrinking() {
                    shared.close(seats);
                }
            }
        }
    }
}

/// Sets the store's epoch deadline to the earliest deadline in flight, or
/// a timeout from now when none is (a guest's background work is bounded
/// too).
fn set_deadline(
    accessor: &Accessor<InstanceState>,
    deadlines: &BTreeMap<(Instant, u64), ()>,
    timeout: Duration,
) {
    let earliest = deadlines
        .keys()
        .next()
        .map_or_else(|| Instant::now() + timeout, |(deadline, _)| *deadline);
    accessor.with(|mut access| access.data_mut().deadline = earliest);
}

/// One request as a guest task: calls the handler, hands the answer to the
/// request's connection, and waits until hyper is done with the body.
async fn run(
    service: &Service,
    accessor: &Accessor<InstanceState>,
    request: http::Request<RequestBody>,
    answer: oneshot::Sender<Answer>,
) -> Ended {
    let mut hooks = SendsNothing;
    let (request, request_io) = wasmtime_wasi_http::p3::Request::from_http(&mut hooks, request);
    let response = match service.handle(accessor, request).await {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => {
            return Ended::Request(Err(Failure::Trap(format!(
                "guest answered with error {code:?}"
            ))));
        }
        Err(error) => return Ended::Instance(error),
    };
    let response = match accessor.with(|mut access| response.into_http(&mut access, request_io)) {
        Ok(response) => response,
        Err(error) => return Ended::Instance(error),
    };
    let (sent, body) = SentBody::signal();
    let _ = answer.send(Ok(response.map(|inner| body.wrap(inner))));
    sent.await;
    Ended::Request(Ok(()))
}
