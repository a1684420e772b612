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

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::bindings::clock::exports::wasmproc::host::scheduled::Tick;
use crate::bindings::clock::{Clock, ClockPre};
use crate::formation::ClockRole;
use crate::pool::{Failure, Lease, Pool};
use crate::queue::Backend;
use crate::telemetry;

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

/// The first firing of `clock` strictly after `after`, in real time. Daylight
/// saving is handled as the Open Cron Pattern Specification says: a fixed
/// time that falls in a spring-forward gap fires right after the gap, once;
/// a fixed time in a fall-back overlap fires once, at its first occurrence;
/// interval schedules (`*/N`) fire on each real occurrence.
fn next_firing(clock: &ClockRole, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
    clock.schedule.find_next_occurrence(after, false).ok()
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
    let mut last: Option<DateTime<Tz>> = None;
    loop {
        // From now, but never from before the last firing: a clock read a
        // hair early must not fire the same time twice.
        let now = Utc::now().with_timezone(&clock.timezone);
        let from = last.map_or(now, |last| last.max(now));
        let Some(next) = next_firing(&clock, &from) else {
            tracing::info!(process = %process.name, "schedule `{}` has no more firings", clock.expression);
            break;
        };
        last = Some(next);
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
        let span = if telemetry::enabled() {
            tracing::info_span!(
                "clock.tick",
                otel.name = format!("tick {}", process.name),
                process = %process.name,
                instance = %lease.instance(),
                wasmproc.scheduled = %next.to_rfc3339(),
                wasmproc.outcome = tracing::field::Empty,
                error.type = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        tokio::spawn(
            async move {
                let instance = lease.instance().clone();
                let tick = Tick {
                    schedule,
                    scheduled_at_ms,
                };
                tracing::info!(instance = %instance, scheduled = %next.to_rfc3339(), "tick");
                let ticked = run_tick(&mut lease, &tick).await;
                let span = tracing::Span::current();
                match &ticked {
                    Ticked::Done => {
                        span.record("wasmproc.outcome", "done");
                    }
                    Ticked::Errored(message) => {
                        span.record("wasmproc.outcome", "error");
                        span.record("otel.status_code", "ERROR");
                        tracing::warn!(instance = %instance, "tick returned an error: {message}")
                    }
                    Ticked::Failed(failure) => {
                        span.record("wasmproc.outcome", "failed");
                        span.record("error.type", failure.reason());
                        span.record("otel.status_code", "ERROR");
                        tracing::warn!(
                            instance = %instance,
                            reason = failure.reason(),
                            "tick failed ({}); instance discarded",
                            failure.reason()
                        )
                    }
                }
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn paris(expression: &str) -> ClockRole {
        let schedule = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .build()
            .parse(expression)
            .unwrap();
        ClockRole {
            expression: expression.into(),
            schedule: Box::new(schedule),
            timezone: chrono_tz::Europe::Paris,
        }
    }

    /// The firings of `clock` after `from`, as UTC times, `n` of them.
    fn firings(clock: &ClockRole, from: DateTime<Tz>, n: usize) -> Vec<String> {
        let mut at = from;
        (0..n)
            .map(|_| {
                at = next_firing(clock, &at).unwrap();
                at.with_timezone(&Utc).format("%m-%d %H:%M").to_string()
            })
            .collect()
    }

    #[test]
    fn a_fixed_time_in_the_spring_forward_gap_fires_once_right_after_it() {
        // Paris, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
        let clock = paris("0 30 2 * * *");
        let from = chrono_tz::Europe::Paris
            .with_ymd_and_hms(2026, 3, 28, 12, 0, 0)
            .unwrap();
        // 02:30 CET the day before the gap is 01:30 UTC; in the gap it fires
        // at 03:00 CEST (01:00 UTC); after it, 02:30 CEST is 00:30 UTC.
        let from = from - chrono::Duration::days(1);
        assert_eq!(
            firings(&clock, from, 3),
            ["03-28 01:30", "03-29 01:00", "03-30 00:30"]
        );
    }

    #[test]
    fn a_fixed_time_in_the_fall_back_overlap_fires_once() {
        // Paris, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:30
        // happens at 00:30 and at 01:30 UTC.
        let clock = paris("0 30 2 * * *");
        let from = chrono_tz::Europe::Paris
            .with_ymd_and_hms(2026, 10, 24, 12, 0, 0)
            .unwrap();
        assert_eq!(
            firings(&clock, from, 3),
            ["10-25 00:30", "10-26 01:30", "10-27 01:30"]
        );
    }

    #[test]
    fn an_interval_fires_on_each_real_occurrence_through_the_overlap() {
        let clock = paris("0 0,30 * * * *");
        let from = chrono_tz::Europe::Paris
            .with_ymd_and_hms(2026, 10, 25, 1, 45, 0)
            .unwrap();
        // 02:00 and 02:30 CEST, then 02:00 and 02:30 CET: every half hour of real time.
        assert_eq!(
            firings(&clock, from, 5),
            [
                "10-25 00:00",
                "10-25 00:30",
                "10-25 01:00",
                "10-25 01:30",
                "10-25 02:00"
            ]
        );
    }
}
