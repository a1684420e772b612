//! The scheduler of a clock process type: one tick per cron firing.
//!
//! Invariants:
//! - the next firing is always computed from *now*, so after a pause (a
//!   suspended laptop, a stopped process) missed firings are not burst;
//! - a tick takes a slot of the pool; when none is free (with the default
//!   `scale = 1`: while the previous tick still runs) the tick is skipped
//!   and the log says so;
//! - a tick's failure (trap, timeout, …) or error result is logged; the
//!   next tick comes as scheduled.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::watch;

use crate::bindings::clock::exports::wasmproc::host::scheduled::Tick;
use crate::pool::Pool;

/// Runs the pool's schedule until `shutdown` turns true.
pub async fn schedule(pool: Arc<Pool>, mut shutdown: watch::Receiver<bool>) {
    let process = pool.process().clone();
    let Some(clock) = process.schedule.clone() else {
        return;
    };
    loop {
        let now = Utc::now().with_timezone(&clock.timezone);
        let Some(next) = clock.schedule.after(&now).next() else {
            tracing::info!(process = %process.name, "schedule `{}` has no more firings", clock.expression);
            break;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let scheduled_at_ms = u64::try_from(next.timestamp_millis()).unwrap_or(0);
        let Some(mut lease) = pool.try_lease() else {
            tracing::warn!(
                process = %process.name,
                scheduled = %next.to_rfc3339(),
                "tick skipped: the previous tick of `{}` is still running", process.name
            );
            continue;
        };
        let pool = pool.clone();
        let schedule = process.name.clone();
        tokio::spawn(async move {
            let instance = lease.instance();
            let tick = Tick {
                schedule,
                scheduled_at_ms,
            };
            tracing::info!(instance = %instance, scheduled = %next.to_rfc3339(), "tick");
            match pool.run_tick(&mut lease, &tick).await {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    tracing::warn!(instance = %instance, "tick returned an error: {message}")
                }
                Err(failure) => tracing::warn!(
                    instance = %instance,
                    reason = failure.reason(),
                    "tick failed ({}); instance discarded",
                    failure.reason()
                ),
            }
        });
    }
}
