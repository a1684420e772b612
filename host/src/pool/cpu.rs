//! A process type's CPU limit, `limits.cpu`: its instances together
//! compute on at most that many cores, so an untrusted or runaway type
//! cannot take every core from the others.
//!
//! # How
//!
//! Computing guests already stop at every epoch tick
//! ([`crate::engine::EPOCH_TICK`]) for the deadline check; that is where
//! the limit acts. Each stop charges the type for the time the guest ran
//! since its unit began or it last resumed (at most one tick) against a
//! shared schedule — a
//! generic cell rate algorithm: one core's worth of time passes per
//! `1 / cores` of real time — and when the type is ahead of its share, the
//! guest sleeps (off the executor, taking no thread) until it is back on
//! schedule. A type may run up to one tick ahead, so a lone short burst
//! never waits.
//!
//! Invariants:
//! - a guest never sleeps past its unit's deadline: it is interrupted at
//!   its next tick after it, as without a limit;
//! - only a guest running when a tick comes is charged: a request that
//!   answers between two ticks (most do) is neither charged nor slowed;
//! - sleeping guests hold their slot (as a guest waiting on I/O does), not
//!   a thread.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::engine::EPOCH_TICK;

/// The schedule all instances of one type share.
#[derive(Debug)]
pub struct CpuShare {
    /// Real time per unit of computing time: `1 / cores`.
    per_core_second: f64,
    /// When the type will be back on schedule (its theoretical arrival time).
    due: Mutex<Instant>,
}

impl CpuShare {
    /// A share of `millicores` thousandths of a core.
    pub fn new(millicores: u32) -> Self {
        CpuShare {
            per_core_second: 1000.0 / f64::from(millicores.max(1)),
            due: Mutex::new(Instant::now()),
        }
    }

    /// Charges `ran` of computing at `now`; how long the guest must wait
    /// before it computes again (zero while the type is within its share).
    pub fn charge(&self, now: Instant, ran: Duration) -> Duration {
        let cost = ran.min(EPOCH_TICK).mul_f64(self.per_core_second);
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        *due = (*due).max(now) + cost;
        due.saturating_duration_since(now + EPOCH_TICK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_tick_never_waits() {
        let share = CpuShare::new(500);
        let now = Instant::now() + Duration::from_secs(1);
        assert_eq!(share.charge(now, EPOCH_TICK / 2), Duration::ZERO);
    }

    #[test]
    fn a_type_past_its_share_waits_in_proportion() {
        // Half a core: each tick computed costs two ticks of real time.
        let share = CpuShare::new(500);
        let now = Instant::now() + Duration::from_secs(1);
        assert_eq!(share.charge(now, EPOCH_TICK), EPOCH_TICK);
        // A second instance computing at the same moment waits longer.
        assert_eq!(share.charge(now, EPOCH_TICK), EPOCH_TICK * 3);
        // Long after, the type is back within its share.
        let later = now + Duration::from_secs(1);
        assert_eq!(share.charge(later, EPOCH_TICK / 2), Duration::ZERO);
    }

    #[test]
    fn a_charge_is_at_most_one_tick() {
        let share = CpuShare::new(1000);
        let now = Instant::now() + Duration::from_secs(1);
        assert_eq!(share.charge(now, Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(share.charge(now, Duration::from_secs(5)), EPOCH_TICK);
    }

    #[test]
    fn several_cores_let_several_instances_compute_at_once() {
        // Two cores: a tick computed costs half a tick of real time.
        let share = CpuShare::new(2000);
        let now = Instant::now() + Duration::from_secs(1);
        for _ in 0..2 {
            assert_eq!(share.charge(now, EPOCH_TICK), Duration::ZERO);
        }
        assert_eq!(share.charge(now, EPOCH_TICK), EPOCH_TICK / 2);
        // A tick later, two more are within the share again.
        let next = now + EPOCH_TICK * 2;
        for _ in 0..2 {
            assert_eq!(share.charge(next, EPOCH_TICK), Duration::ZERO);
        }
    }
}
