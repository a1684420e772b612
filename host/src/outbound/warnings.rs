//! The warnings one instance's outbound requests write to the log, rate
//! limited: a guest can call in a loop, and each denial must not become a
//! log line.
//!
//! At most [`WARNINGS_PER_SECOND`] lines per instance per second; the rest
//! are counted, and the count is written on the next line that gets
//! through, or when the instance goes away.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Outbound warnings one instance may log per second.
pub const WARNINGS_PER_SECOND: u32 = 5;

/// One instance's outbound warnings, shared by its in-flight requests.
pub(super) struct Warnings {
    instance: Arc<str>,
    state: Mutex<Window>,
}

/// The current one-second window.
#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl Window {
    /// Whether a warning at `now` may be written; if so, how many were
    /// suppressed since the last one written.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= Duration::from_secs(1));
        if fresh {
            self.started = Some(now);
            self.written = 0;
        }
        if self.written < WARNINGS_PER_SECOND {
            self.written += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl Warnings {
    /// No warnings yet, for `instance`.
    pub(super) fn new(instance: &Arc<str>) -> Warnings {
        Warnings {
            instance: instance.clone(),
            state: Mutex::new(Window::default()),
        }
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        // The window is a pair of counters: a panic elsewhere cannot leave
        // it inconsistent, so a poisoned lock is still good to use.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs `outbound request {outcome}: {why}` for `authority`, unless this
    /// instance has logged too many already this second.
    pub(super) fn warn(&self, outcome: &str, authority: &str, why: &dyn fmt::Display) {
        let Some(suppressed) = self.window().admit(Instant::now()) else {
            return;
        };
        if suppressed == 0 {
            tracing::warn!(
                instance = %self.instance,
                %authority,
                "outbound request {outcome}: {why}"
            );
        } else {
            tracing::warn!(
                instance = %self.instance,
                %authority,
                suppressed,
                "outbound request {outcome}: {why} ({suppressed} earlier outbound warnings of this instance were suppressed)"
            );
        }
    }
}

impl Drop for Warnings {
    fn drop(&mut self) {
        let suppressed = self.window().suppressed;
        if suppressed > 0 {
            tracing::warn!(
                instance = %self.instance,
                suppressed,
                "{suppressed} outbound warnings of this instance were suppressed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_rate_and_the_rest_counted() {
        let start = Instant::now();
        let mut window = Window::default();
        let admitted: Vec<_> = (0..100).map(|_| window.admit(start)).collect();
        assert_eq!(
            admitted.iter().filter(|a| a.is_some()).count(),
            WARNINGS_PER_SECOND as usize
        );
        assert!(admitted.iter().flatten().all(|s| *s == 0));
        let later = start + Duration::from_millis(999);
        assert_eq!(window.admit(later), None);
        let next = start + Duration::from_secs(1);
        assert_eq!(
            window.admit(next),
            Some(100 - u64::from(WARNINGS_PER_SECOND) + 1),
            "the first line of the next second carries the count"
        );
        assert_eq!(window.admit(next), Some(0));
    }
}
