//! Crash-loop detection for one process type.
//!
//! A failed unit discards its instance and the slot creates a fresh one for
//! its next unit. When a type's units fail again and again with no success
//! between (a guest that traps at start, a missing backing service), fresh
//! instances would be created as fast as units arrive. After
//! [`CRASH_LOOP_THRESHOLD`] failures in a row the type is *crash-looping*:
//! every new instance first waits a backoff that doubles from
//! [`CRASH_LOOP_BACKOFF_MIN`] to [`CRASH_LOOP_BACKOFF_MAX`]; the log says so
//! once per step, and the first success ends it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Failed units in a row after which a type counts as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 5;
/// First backoff of a crash-looping type.
pub const CRASH_LOOP_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest backoff of a crash-looping type.
pub const CRASH_LOOP_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Counts failures in a row to detect a crash loop.
#[derive(Default)]
pub(crate) struct Supervisor {
    failures_in_a_row: AtomicU32,
}

impl Supervisor {
    /// The backoff after `failures` failures in a row, if it is a crash loop.
    fn backoff(failures: u32) -> Option<Duration> {
        let over = failures.checked_sub(CRASH_LOOP_THRESHOLD)?;
        let backoff = CRASH_LOOP_BACKOFF_MIN.saturating_mul(1u32 << over.min(16));
        Some(backoff.min(CRASH_LOOP_BACKOFF_MAX))
    }

    /// A unit of `process` failed.
    pub(crate) fn failed(&self, process: &str) {
        let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(backoff) = Self::backoff(n)
            && (Self::backoff(n - 1) != Some(backoff))
        {
            tracing::warn!(
                process,
                failures = n,
                "process type `{process}` is crash-looping ({n} failed units in a row): new instances start after a {} backoff",
                humantime::format_duration(backoff)
            );
        }
    }

    /// A unit of `process` succeeded.
    pub(crate) fn succeeded(&self, process: &str) {
        // Read first: a write on every unit would bounce this cache line
        // between the cores running units.
        if self.failures_in_a_row.load(Ordering::Relaxed) == 0 {
            return;
        }
        let n = self.failures_in_a_row.swap(0, Ordering::Relaxed);
        if n >= CRASH_LOOP_THRESHOLD {
            tracing::info!(
                process,
                "process type `{process}` recovered after {n} failed units in a row"
            );
        }
    }

    /// How long a new instance must wait now, if the type is crash-looping.
    pub(crate) fn current_backoff(&self) -> Option<Duration> {
        Self::backoff(self.failures_in_a_row.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_the_threshold_and_is_capped() {
        assert_eq!(Supervisor::backoff(CRASH_LOOP_THRESHOLD - 1), None);
        assert_eq!(
            Supervisor::backoff(CRASH_LOOP_THRESHOLD),
            Some(CRASH_LOOP_BACKOFF_MIN)
        );
        assert_eq!(
            Supervisor::backoff(CRASH_LOOP_THRESHOLD + 1),
            Some(CRASH_LOOP_BACKOFF_MIN * 2)
        );
        assert_eq!(Supervisor::backoff(u32::MAX), Some(CRASH_LOOP_BACKOFF_MAX));
    }

    #[test]
    fn a_success_ends_the_crash_loop() {
        let supervisor = Supervisor::default();
        for _ in 0..CRASH_LOOP_THRESHOLD {
            supervisor.failed("web");
        }
        assert_eq!(supervisor.current_backoff(), Some(CRASH_LOOP_BACKOFF_MIN));
        supervisor.succeeded("web");
        assert_eq!(supervisor.current_backoff(), None);
    }
}
