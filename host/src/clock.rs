//! The scheduler of a clock process type: one tick per cron firing.
//!
//! Invariants:
//! - the next firing is always computed from *now*, so after a pause (a
//!   suspended laptop, a stopped process) missed firings are not burst;
//! - a tick takes a slot of the pool; when none is free (with the default
//!   `scale = 1`: while the previous tick still runs) the tick is skipped
//!   and the log says so;
//! - a tick's failure (trap, timeout, …) or error result is logged; the
//!   next tick comes as scheduled;
//! - hosts that share a queue backend (Redis) run each firing once between
//!   them: a host with a free slot claims the firing in the backend
//!   ([`Backend::claim_tick`]) and only the one that gets it runs the tick.
//!   When the claim cannot be made (the backend is down), the tick is
//!   skipped with a warning: a clock that must run once would rather miss a
//!   firing than run it on every host.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::watch;

use crate::bindings::clock::exports::wasmproc::host::scheduled::Tick;
use crate::bindings::clock::{Clock, ClockPre};
use crate::formation::ClockRole;
use crate::pool::{Failure, Lease, Pool};
use crate::queue::Backend;

/// The world clock components target: `wasmproc:host/clock`.
pub struct ClockWorld;

crate::pool::world!(ClockWorld, role: ClockRole, pre: ClockPre, exports: Clock,
    requires: "`wasmproc:host/scheduled`: a clock must target the `wasmproc:host/clock` world");

/// How a tick ended.
enum Ticked {
    /// The handler returned `ok`.
    Done,
    /// The handler returned an error; its instance is fine.
    Errored(String),
    /// The unit failed; its instance is discarded.
    Failed(Failure),
}

/// Runs one tick in the lease's instance.
async fn run_tick(lease: &mut Lease<ClockWorld>, tick: &Tick) -> Ticked {
    let outcome = lease
        .run(async |clock, store| {
            clock
                .wasmproc_host_scheduled()
                .call_on_tick(store, tick)
                .await
        })
        .await;
    match outcome {
        Ok(Ok(())) => Ticked::Done,
        Ok(Err(message)) => Ticked::Errored(message),
        Err(failure) => Ticked::Failed(failure),
    }
}

/// Runs the pool's schedule until `shutdown` turns true; with `shared`,
/// only the firings this host claims there.
pub async fn schedule(
    pool: Arc<Pool<ClockWorld>>,
    shared: Option<Arc<dyn Backend>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let process = pool.process().clone();
    let clock = pool.role().clone();
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
        if let Some(backend) = &shared {
            match backend.claim_tick(&process.name, scheduled_at_ms).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(process = %process.name, scheduled = %next.to_rfc3339(), "tick runs on another host");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        process = %process.name,
                        scheduled = %next.to_rfc3339(),
                        "tick skipped: cannot claim it in the queue backend: {e}"
                    );
                    continue;
                }
            }
        }
        let schedule = process.name.clone();
        tokio::spawn(async move {
            let instance = lease.instance().clone();
            let tick = Tick {
                schedule,
                scheduled_at_ms,
            };
            tracing::info!(instance = %instance, scheduled = %next.to_rfc3339(), "tick");
            match run_tick(&mut lease, &tick).await {
                Ticked::Done => {}
                Ticked::Errored(message) => {
                    tracing::warn!(instance = %instance, "tick returned an error: {message}")
                }
                Ticked::Failed(failure) => tracing::warn!(
                    instance = %instance,
                    reason = failure.reason(),
                    "tick failed ({}); instance discarded",
                    failure.reason()
                ),
            }
        });
    }
}
