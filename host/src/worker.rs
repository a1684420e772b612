//! The worker loop: moves messages from a queue into a worker pool's
//! instances and settles each one by what its instance said.
//!
//! Invariants:
//! - messages are leased only for free slots, plus a bounded number ahead
//!   of them (`Prefetch`: from the pool's scale up to [`MAX_AHEAD`],
//!   adapting to how fast units run); a message leased ahead that waited a
//!   whole timeout is given back instead of run, so every unit starts with
//!   more than a timeout left on its lease;
//! - the lease lasts [`visibility`] (twice the type's timeout, plus a
//!   second), longer than any unit may run, so a live host never loses a
//!   lease it is still using;
//! - a message is acknowledged only when the handler returns `ok`. `retry`,
//!   a trap, a timeout, exhausted fuel or memory → redelivery after backoff
//!   (exponential between the type's bounds, with jitter); `reject`, or a
//!   failure on the last allowed attempt → the dead-letter queue;
//! - no redelivery is further off than `[queue] max_delay`: a longer retry
//!   delay is capped at it, with a log line;
//! - an idle loop waits for the backend to say a message may be ready —
//!   including when a retried or delayed message comes due — so a short
//!   retry delay is kept, not rounded up to `IDLE_WAIT`;
//! - on shutdown the loop stops leasing and the pool drains.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::Instrument as _;

use crate::bindings::worker::exports::wasmproc::host::handler::{self, Outcome};
use crate::bindings::worker::{Worker, WorkerPre};
use crate::formation::{RetryPolicy, WorkerRole};
use crate::pool::{Failure, Lease, Pool};
use crate::queue::{Backend, Delivery, Queues};
use crate::telemetry;

/// The world worker components target: `wasmproc:host/worker`.
pub struct WorkerWorld;

crate::pool::world!(WorkerWorld, role: WorkerRole, pre: WorkerPre, exports: Worker,
    requires: "`wasmproc:host/handler`: a worker must target the `wasmproc:host/worker` world");

/// Longest an idle worker loop waits for a message before looking again
/// (a local enqueue, a local retry or a due time wakes it sooner).
const IDLE_WAIT: Duration = Duration::from_millis(250);
/// How long the loop pauses after the backend failed.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How long a message stays leased to this host.
pub fn visibility(timeout: Duration) -> Duration {
    timeout * 2 + Duration::from_secs(1)
}

/// The delay before delivery `attempt + 1`, after `attempt` failed:
/// `min · 2^(attempt-1)`, capped at `max`, with "equal jitter" (half fixed,
/// half random) so retries of a burst spread out.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy
        .backoff_min
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(policy.backoff_max);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Consumes the pool's queue until `shutdown` turns true.
pub async fn consume(
    pool: Arc<Pool<WorkerWorld>>,
    queues: Queues,
    mut shutdown: watch::Receiver<bool>,
) {
    let process = pool.process().clone();
    let queue = pool.role().queue.clone();
    let timeout = process.limits.timeout;
    let visibility = visibility(timeout);
    let backend = queues.backend().clone();
    let mut prefetch = Prefetch::default();
    let mut stale = Vec::new();
    loop {
        let first = tokio::select! {
            lease = pool.lease() => lease,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Some(first) = first else { break };
        let mut leases = vec![first];
        while let Some(more) = pool.try_lease() {
            leases.push(more);
        }
        let want = prefetch.wanted(leases.len(), pool.scale() as usize, timeout);
        if want > 0 {
            match backend.lease(&queue, want, visibility).await {
                Ok(deliveries) => prefetch.fill(deliveries, Instant::now()),
                Err(e) => {
                    tracing::warn!(process = %process.name, %queue, "cannot lease messages: {e}");
                    drop(leases);
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            }
        }
        // A free slot that finds no message means the queue is empty.
        let mut idle = false;
        let now = Instant::now();
        for lease in leases {
            let Some(delivery) = prefetch.take(timeout, now, &mut stale) else {
                idle = true;
                break;
            };
            let pool = pool.clone();
            let queues = queues.clone();
            if telemetry::enabled() {
                let span = delivery_span(&pool, &lease, &delivery);
                tokio::spawn(
                    async move { run(&pool, &queues, lease, delivery).await }.instrument(span),
                );
            } else {
                tokio::spawn(async move { run(&pool, &queues, lease, delivery).await });
            }
        }
        for delivery in stale.drain(..) {
            release(&backend, &delivery, "waited a timeout since it was leased").await;
        }
        if idle {
            tokio::select! {
                () = backend.wait(&queue, IDLE_WAIT) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
    }
    // Give back what was leased ahead, so another consumer need not wait
    // for the leases to expire.
    for delivery in prefetch.drain() {
        release(&backend, &delivery, "leased ahead at shutdown").await;
    }
    tracing::info!(process = %process.name, %queue, "worker stopped leasing messages");
}

/// Gives a leased message back to its queue, due at once.
async fn release(backend: &Arc<dyn Backend>, delivery: &Delivery, why: &str) {
    match backend.retry(delivery, Duration::ZERO).await {
        Ok(()) => {
            tracing::debug!(queue = %delivery.queue, message.id = %delivery.id, "message given back: {why}")
        }
        Err(e) => {
            tracing::warn!(queue = %delivery.queue, message.id = %delivery.id, "cannot give back a message ({why}): {e}")
        }
    }
}

/// Most messages a worker loop leases ahead of its free slots.
pub const MAX_AHEAD: usize = 256;
/// Most bytes of message bodies a worker loop leases ahead of its free
/// slots, as far as it can tell from the largest body of its last lease
/// (so 8 MiB messages are leased 8 ahead, not 256: 2 GiB of them).
pub const MAX_AHEAD_BYTES: usize = 64 << 20;

/// Messages leased ahead of free slots, so a slot that frees up finds work
/// without a round trip to the queue — and so one lease call serves many
/// units (with fast units, leasing one message per unit makes the queue's
/// transactions, not the guests, the bottleneck).
///
/// How far ahead adapts: it starts at the pool's scale and doubles (up to
/// [`MAX_AHEAD`]) each time the loop runs out while no message it ran had
/// waited a quarter of the timeout since its lease; it halves for every
/// message that waited a whole timeout. Such a message is not run but given
/// back (it counts as a delivery), so every unit starts with more than a
/// timeout left on its lease (which lasts twice the timeout plus a second)
/// and no message runs twice at once. Large messages lease fewer ahead:
/// at most [`MAX_AHEAD_BYTES`] of them, by the largest body last leased.
#[derive(Default)]
struct Prefetch {
    leased: std::collections::VecDeque<(Delivery, Instant)>,
    ahead: usize,
    longest_wait: Duration,
    largest_body: usize,
}

impl Prefetch {
    /// How many messages to lease now for `free` free slots of `scale`:
    /// none while enough are leased already.
    fn wanted(&mut self, free: usize, scale: usize, timeout: Duration) -> usize {
        if self.leased.len() >= free {
            return 0;
        }
        if self.longest_wait < timeout / 4 {
            self.ahead = (self.ahead * 2).min(MAX_AHEAD);
        }
        self.ahead = self.ahead.max(scale);
        self.longest_wait = Duration::ZERO;
        let by_bytes = (MAX_AHEAD_BYTES / self.largest_body.max(1)).max(1);
        (free + self.ahead.min(by_bytes)).saturating_sub(self.leased.len())
    }

    /// Adds `deliveries`, leased at `now`.
    fn fill(&mut self, deliveries: Vec<Delivery>, now: Instant) {
        if let Some(largest) = deliveries.iter().map(|d| d.body.len()).max() {
            self.largest_body = largest;
        }
        self.leased.extend(deliveries.into_iter().map(|d| (d, now)));
    }

    /// The next message fit to run at `now`; those that waited a timeout
    /// since their lease go to `stale`.
    fn take(
        &mut self,
        timeout: Duration,
        now: Instant,
        stale: &mut Vec<Delivery>,
    ) -> Option<Delivery> {
        while let Some((delivery, leased)) = self.leased.pop_front() {
            let waited = now.saturating_duration_since(leased);
            if waited >= timeout {
                stale.push(delivery);
                self.ahead /= 2;
                continue;
            }
            self.longest_wait = self.longest_wait.max(waited);
            return Some(delivery);
        }
        None
    }

    fn drain(&mut self) -> impl Iterator<Item = Delivery> + '_ {
        self.leased.drain(..).map(|(delivery, _)| delivery)
    }
}

/// What becomes of a delivery once its unit has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The handler returned `ok`: acknowledged, done.
    Handled,
    /// Delivered again after this delay: the handler asked for it, or the
    /// unit failed with attempts left.
    Retry(Duration),
    /// Moved to the dead-letter queue, for this reason: the handler
    /// rejected it, or it failed or asked to retry on its last attempt.
    DeadLetter(String),
}

impl Verdict {
    /// One word for logs.
    fn word(&self) -> &'static str {
        match self {
            Verdict::Handled => "handled",
            Verdict::Retry(_) => "retrying",
            Verdict::DeadLetter(_) => "dead-lettered",
        }
    }
}

/// Caps a redelivery at `max_delay`; returns the verdict and, when it was
/// capped, the delay that was asked for.
fn cap(verdict: Verdict, max_delay: Duration) -> (Verdict, Option<Duration>) {
    match verdict {
        Verdict::Retry(delay) if delay > max_delay => (Verdict::Retry(max_delay), Some(delay)),
        other => (other, None),
    }
}

/// Decides what becomes of `delivery` after its unit ended with `outcome`,
/// under `policy`. The handler decides whether a redelivery can help; a
/// failed unit (trap, timeout, fuel, memory) counts as a retry.
fn verdict(
    outcome: &Result<Outcome, Failure>,
    delivery: &Delivery,
    policy: &RetryPolicy,
) -> Verdict {
    let last = delivery.attempt >= policy.attempts;
    match outcome {
        Ok(Outcome::Ok) => Verdict::Handled,
        Ok(Outcome::Reject(reason)) => Verdict::DeadLetter(format!("rejected: {reason}")),
        Ok(Outcome::Retry(_)) if last => Verdict::DeadLetter(format!(
            "retries exhausted after {} attempts",
            delivery.attempt
        )),
        Ok(Outcome::Retry(Some(ms))) => Verdict::Retry(Duration::from_millis(*ms)),
        Ok(Outcome::Retry(None)) => Verdict::Retry(backoff(policy, delivery.attempt)),
        Err(failure) if last => Verdict::DeadLetter(format!(
            "{} on the last attempt ({})",
            failure.reason(),
            delivery.attempt
        )),
        Err(_) => Verdict::Retry(backoff(policy, delivery.attempt)),
    }
}

/// A consumer span for one delivery, the child of the span that enqueued
/// the message (its context travels in the message's headers).
fn delivery_span(
    pool: &Pool<WorkerWorld>,
    lease: &Lease<WorkerWorld>,
    delivery: &Delivery,
) -> tracing::Span {
    let span = tracing::info_span!(
        "queue.process",
        otel.name = format!("process {}", delivery.queue),
        otel.kind = "consumer",
        messaging.system = "wasmproc",
        messaging.operation.type = "process",
        messaging.destination.name = %delivery.queue,
        messaging.message.id = %delivery.id,
        wasmproc.attempt = delivery.attempt,
        process = %pool.process().name,
        instance = %lease.instance(),
        wasmproc.outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    telemetry::follow_pairs(&span, &delivery.headers);
    span
}

/// Runs one delivery and settles it.
async fn run(
    pool: &Pool<WorkerWorld>,
    queues: &Queues,
    mut lease: Lease<WorkerWorld>,
    delivery: Delivery,
) {
    let instance = lease.instance().clone();
    let message = handler::Delivery {
        queue: delivery.queue.clone(),
        id: delivery.id.clone(),
        attempt: delivery.attempt,
        body: delivery.body.clone(),
        content_type: delivery.content_type.clone(),
        headers: delivery.headers.clone(),
    };
    let outcome = lease
        .run(async |worker, store| {
            worker
                .wasmproc_host_handler()
                .call_handle(store, &message)
                .await
        })
        .await;
    drop(lease);
    let (verdict, asked) = cap(
        verdict(&outcome, &delivery, &pool.role().retry),
        queues.max_delay(),
    );
    if let Some(asked) = asked {
        tracing::warn!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt,
            "retry delay of {} capped at `[queue] max_delay` ({})",
            humantime::format_duration(round(asked)),
            humantime::format_duration(queues.max_delay())
        );
    }
    let backend = queues.backend();
    let settled = match &verdict {
        Verdict::Handled => backend.ack(&delivery).await,
        Verdict::Retry(delay) => backend.retry(&delivery, *delay).await,
        Verdict::DeadLetter(reason) => backend.dead_letter(&delivery, reason).await,
    };
    let failed = outcome.as_ref().err().map(Failure::reason);
    if telemetry::enabled() {
        let span = tracing::Span::current();
        span.record("wasmproc.outcome", verdict.word());
        if let Some(reason) = failed {
            span.record("error.type", reason);
        }
        if failed.is_some() || matches!(verdict, Verdict::DeadLetter(_)) {
            span.record("otel.status_code", "ERROR");
        }
    }
    if let Err(e) = settled {
        tracing::error!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, reason = failed,
            "cannot settle the message ({}): {e}; it will be redelivered", verdict.word()
        );
        return;
    }
    if let Verdict::DeadLetter(_) = verdict {
        pool.stats.dead_lettered.inc();
    }
    // Logged once settled, so a line says what has happened to the message.
    match (&outcome, &verdict) {
        (_, Verdict::Handled) => tracing::debug!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, "message handled"
        ),
        (Ok(_), Verdict::Retry(delay)) => tracing::info!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, "retry requested: redelivery in {}",
            humantime::format_duration(round(*delay))
        ),
        (Err(failure), Verdict::Retry(delay)) => tracing::warn!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, reason = failure.reason(),
            "message failed ({}); instance discarded; redelivery in {}",
            failure.reason(),
            humantime::format_duration(round(*delay))
        ),
        (Err(failure), Verdict::DeadLetter(_)) => tracing::warn!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, reason = failure.reason(),
            "message failed ({}); instance discarded; dead-lettered", failure.reason()
        ),
        (Ok(outcome), Verdict::DeadLetter(_)) => tracing::warn!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, "message {}: dead-lettered",
            if let Outcome::Reject(_) = outcome { "rejected" } else { "asked to retry on the last attempt" }
        ),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(n: usize) -> Vec<Delivery> {
        (0..n)
            .map(|i| Delivery {
                queue: "q".into(),
                id: i.to_string(),
                attempt: 1,
                body: Vec::new(),
                content_type: None,
                headers: Vec::new(),
                lease: String::new(),
            })
            .collect()
    }

    #[test]
    fn prefetch_grows_while_messages_run_soon_after_their_lease() {
        let timeout = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut prefetch = Prefetch::default();
        let mut stale = Vec::new();
        let mut asked = Vec::new();
        for _ in 0..12 {
            let want = prefetch.wanted(2, 2, timeout);
            asked.push(want);
            prefetch.fill(deliveries(want), t0);
            while prefetch.take(timeout, t0, &mut stale).is_some() {}
        }
        assert_eq!(asked[..3], [2 + 2, 2 + 4, 2 + 8]);
        assert_eq!(asked.last(), Some(&(2 + MAX_AHEAD)));
        assert!(stale.is_empty());
        // Enough leased already: nothing more is asked for.
        prefetch.fill(deliveries(5), t0);
        assert_eq!(prefetch.wanted(2, 2, timeout), 0);
    }

    #[test]
    fn prefetch_leases_fewer_large_messages_ahead() {
        let timeout = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut prefetch = Prefetch::default();
        let mut stale = Vec::new();
        let mut large = deliveries(4);
        for delivery in &mut large {
            delivery.body = vec![0; 16 << 20];
        }
        assert_eq!(prefetch.wanted(4, 4, timeout), 4 + 4);
        prefetch.fill(large, t0);
        while prefetch.take(timeout, t0, &mut stale).is_some() {}
        // 64 MiB of 16 MiB messages: four ahead, not eight.
        assert_eq!(prefetch.wanted(4, 4, timeout), 4 + 4);
        prefetch.fill(deliveries(1), t0);
        while prefetch.take(timeout, t0, &mut stale).is_some() {}
        // Small again: as far ahead as it would have gone.
        assert_eq!(prefetch.wanted(4, 4, timeout), 4 + 16);
    }

    #[test]
    fn prefetch_gives_back_what_waited_a_timeout_and_shrinks() {
        let timeout = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut prefetch = Prefetch::default();
        let mut stale = Vec::new();
        for _ in 0..4 {
            let want = prefetch.wanted(1, 1, timeout);
            prefetch.fill(deliveries(want), t0);
            while prefetch.take(timeout, t0, &mut stale).is_some() {}
        }
        let want = prefetch.wanted(1, 1, timeout);
        assert_eq!(want, 1 + 16);
        prefetch.fill(deliveries(want), t0);
        // Slow units: the first runs at once, the rest waited too long.
        assert!(prefetch.take(timeout, t0, &mut stale).is_some());
        assert!(prefetch.take(timeout, t0 + timeout, &mut stale).is_none());
        assert_eq!(stale.len(), 16);
        // It shrank back to the scale.
        assert_eq!(prefetch.wanted(1, 1, timeout), 1 + 1);
    }

    #[test]
    fn the_handler_decides_and_the_last_attempt_dead_letters() {
        let policy = RetryPolicy {
            attempts: 3,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
        };
        let mut delivery = deliveries(1).remove(0);
        let trap = Err(Failure::Trap("boom".into()));
        assert_eq!(
            verdict(&Ok(Outcome::Ok), &delivery, &policy),
            Verdict::Handled
        );
        assert_eq!(
            verdict(&Ok(Outcome::Retry(Some(50))), &delivery, &policy),
            Verdict::Retry(Duration::from_millis(50))
        );
        assert_eq!(
            verdict(&Ok(Outcome::Reject("bad".into())), &delivery, &policy),
            Verdict::DeadLetter("rejected: bad".into())
        );
        assert!(matches!(
            verdict(&trap, &delivery, &policy),
            Verdict::Retry(d) if d <= Duration::from_secs(1)
        ));
        delivery.attempt = 3;
        assert_eq!(
            verdict(&Ok(Outcome::Retry(None)), &delivery, &policy),
            Verdict::DeadLetter("retries exhausted after 3 attempts".into())
        );
        assert_eq!(
            verdict(&trap, &delivery, &policy),
            Verdict::DeadLetter("trap on the last attempt (3)".into())
        );
    }

    #[test]
    fn a_retry_beyond_the_maximum_delay_is_capped() {
        let max = Duration::from_secs(30 * 24 * 3600);
        let huge = Duration::from_millis(u64::MAX);
        assert_eq!(
            cap(Verdict::Retry(huge), max),
            (Verdict::Retry(max), Some(huge))
        );
        assert_eq!(
            cap(Verdict::Retry(Duration::from_millis(50)), max),
            (Verdict::Retry(Duration::from_millis(50)), None)
        );
        assert_eq!(cap(Verdict::Handled, max), (Verdict::Handled, None));
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let policy = RetryPolicy {
            attempts: 10,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
        };
        for _ in 0..100 {
            let first = backoff(&policy, 1);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let third = backoff(&policy, 3);
            assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
            let late = backoff(&policy, 30);
            assert!(late >= Duration::from_secs(5) && late <= Duration::from_secs(10));
        }
    }
}
