//! The worker loop: moves messages from a queue into a worker pool's
//! instances and settles each one by what its instance said.
//!
//! Invariants:
//! - a message is leased only when a slot is free to run it, so every lease
//!   this host holds is being worked on; the queue itself is the backlog;
//! - the lease lasts [`visibility`] (twice the type's timeout, plus a
//!   second), longer than any unit may run, so a live host never loses a
//!   lease it is still using;
//! - a message is acknowledged only when the handler returns `ok`. `retry`,
//!   a trap, a timeout, exhausted fuel or memory → redelivery after backoff
//!   (exponential between the type's bounds, with jitter); `reject`, or a
//!   failure on the last allowed attempt → the dead-letter queue;
//! - on shutdown the loop stops leasing and the pool drains.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::bindings::worker::exports::wasmproc::host::handler::{self, Outcome};
use crate::formation::RetryPolicy;
use crate::pool::{Lease, Pool};
use crate::queue::{Delivery, Queues};

/// How long an idle worker loop waits for a message before looking again
/// (a local enqueue wakes it at once).
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
pub async fn consume(pool: Arc<Pool>, queues: Queues, mut shutdown: watch::Receiver<bool>) {
    let process = pool.process().clone();
    let Some(queue) = process.queue.clone() else {
        return;
    };
    let visibility = visibility(process.limits.timeout);
    let backend = queues.backend().clone();
    // Messages leased ahead of a free slot, at most `scale` of them, so a
    // slot that frees up finds work without a round trip to the queue.
    let mut prefetched: std::collections::VecDeque<Delivery> = std::collections::VecDeque::new();
    loop {
        let first = tokio::select! {
            lease = pool.lease_wait() => lease,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Some(first) = first else { break };
        let mut leases = vec![first];
        while let Some(more) = pool.try_lease() {
            leases.push(more);
        }
        let ahead = pool.scale() as usize;
        if prefetched.len() < leases.len() {
            let want = leases.len() + ahead - prefetched.len();
            match backend.lease(&queue, want, visibility).await {
                Ok(deliveries) => prefetched.extend(deliveries),
                Err(e) => {
                    tracing::warn!(process = %process.name, %queue, "cannot lease messages: {e}");
                    drop(leases);
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            }
        }
        if prefetched.is_empty() {
            drop(leases);
            tokio::select! {
                () = backend.wait(&queue, IDLE_WAIT) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            continue;
        }
        for lease in leases {
            let Some(delivery) = prefetched.pop_front() else {
                break;
            };
            let pool = pool.clone();
            let queues = queues.clone();
            tokio::spawn(async move { run(&pool, &queues, lease, delivery).await });
        }
    }
    // Give back what was leased ahead, so another consumer need not wait
    // for the leases to expire.
    for delivery in prefetched {
        if let Err(e) = backend.retry(&delivery, Duration::ZERO).await {
            tracing::warn!(queue = %delivery.queue, message.id = %delivery.id, "cannot release a prefetched message: {e}");
        }
    }
    tracing::info!(process = %process.name, %queue, "worker stopped leasing messages");
}

/// Runs one delivery and settles it.
async fn run(pool: &Pool, queues: &Queues, mut lease: Lease, delivery: Delivery) {
    let process = pool.process();
    let instance = lease.instance();
    let message = handler::Delivery {
        queue: delivery.queue.clone(),
        id: delivery.id.clone(),
        attempt: delivery.attempt,
        body: delivery.body.clone(),
        content_type: delivery.content_type.clone(),
        headers: delivery.headers.clone(),
    };
    let outcome = pool.run_message(&mut lease, &message).await;
    drop(lease);
    let backend = queues.backend();
    let last = delivery.attempt >= process.retry.attempts;
    let (verdict, settled) = match outcome {
        Ok(Outcome::Ok) => ("handled", backend.ack(&delivery).await),
        Ok(Outcome::Reject(reason)) => (
            "rejected: dead-lettered",
            backend
                .dead_letter(&delivery, &format!("rejected: {reason}"))
                .await,
        ),
        Ok(Outcome::Retry(_)) if last => (
            "asked to retry on the last attempt: dead-lettered",
            backend
                .dead_letter(
                    &delivery,
                    &format!("retries exhausted after {} attempts", delivery.attempt),
                )
                .await,
        ),
        Ok(Outcome::Retry(after)) => {
            let delay = after.map_or_else(
                || backoff(&process.retry, delivery.attempt),
                Duration::from_millis,
            );
            tracing::info!(
                instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
                attempt = delivery.attempt, "retry requested: redelivery in {}",
                humantime::format_duration(round(delay))
            );
            ("retrying", backend.retry(&delivery, delay).await)
        }
        Err(failure) if last => {
            let reason = format!(
                "{} on the last attempt ({})",
                failure.reason(),
                delivery.attempt
            );
            tracing::warn!(
                instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
                attempt = delivery.attempt, reason = failure.reason(),
                "message failed ({}); instance discarded; dead-lettered", failure.reason()
            );
            (
                "dead-lettered",
                backend.dead_letter(&delivery, &reason).await,
            )
        }
        Err(failure) => {
            let delay = backoff(&process.retry, delivery.attempt);
            tracing::warn!(
                instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
                attempt = delivery.attempt, reason = failure.reason(),
                "message failed ({}); instance discarded; redelivery in {}",
                failure.reason(),
                humantime::format_duration(round(delay))
            );
            ("retrying", backend.retry(&delivery, delay).await)
        }
    };
    if settled.is_ok() && verdict.contains("dead-lettered") {
        pool.stats.dead_lettered.inc();
    }
    match settled {
        Ok(()) if verdict == "handled" => tracing::debug!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, "message handled"
        ),
        Ok(()) if verdict == "retrying" => {}
        Ok(()) => tracing::warn!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, "message {verdict}"
        ),
        Err(e) => tracing::error!(
            instance = %instance, queue = %delivery.queue, message.id = %delivery.id,
            attempt = delivery.attempt, "cannot settle the message ({verdict}): {e}; it will be redelivered"
        ),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

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
