//! A process type's CPU limit, `limits.cpu`: its instances together run
//! guest code on at most that many cores, so an untrusted or runaway type
//! cannot take every core from the others.
//!
//! # What is counted
//!
//! Time spent running wasm, measured with wasmtime's call hook: the clock
//! of an instance ([`CpuClock`]) runs from each entry into wasm (a call,
//! or a host call returning) to the next exit (a return, or a host call).
//! Time a guest spends waiting — on an outbound call, a timer, a slow
//! client, the executor — is not counted. Work the host does on a guest's
//! behalf (its HTTP, its keyvalue store, instantiation) is not counted
//! either: other limits bound it.
//!
//! # How it is enforced
//!
//! The type's instances share one schedule, a generic cell rate algorithm:
//! running `t` of wasm costs `t / cores` of real time, and the schedule is
//! *due* when all that real time has passed. The type may be up to one
//! tick of wasm ahead of it ([`CpuShare::credit`]); beyond, it waits:
//! - a guest that computes is stopped at every epoch tick anyway (for its
//!   deadline); there it is charged what it ran, and sleeps — off the
//!   executor, holding its slot but no thread — until the type is back
//!   within its credit;
//! - a unit is charged what it ran when it ends, and a new unit of a type
//!   that is behind waits before it starts, so many short units (which
//!   never see a tick) are bounded too.
//!
//! Invariants:
//! - a guest never sleeps past its unit's deadline; one that would be
//!   stopped at its next tick after it, as without a limit;
//! - the schedule is never more than the type's `limits.timeout` ahead of
//!   now, so a type over its share is back to normal at most that long
//!   after its load stops;
//! - a WASI 0.3 instance serving several requests at once sleeps as a
//!   whole: its store runs on one thread at a time.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::engine::EPOCH_TICK;

/// The wasm time one instance has run and not yet been charged for.
#[derive(Debug, Default, Clone)]
pub struct CpuClock {
    /// When the guest last entered wasm, while it runs.
    since: Option<Instant>,
    /// Wasm time before that, not yet charged.
    owed: Duration,
}

impl CpuClock {
    /// The guest enters wasm.
    pub fn resume(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// The guest leaves wasm.
    pub fn pause(&mut self, now: Instant) {
        if let Some(since) = self.since.take() {
            self.owed += now.saturating_duration_since(since);
        }
    }

    /// The wasm time run until `now`, which is then forgotten; a running
    /// guest's clock goes on from `now`.
    pub fn take(&mut self, now: Instant) -> Duration {
        let running = self.since.is_some();
        self.pause(now);
        if running {
            self.since = Some(now);
        }
        std::mem::take(&mut self.owed)
    }

    /// A running guest resumes at `at` (after a sleep) rather than now.
    pub fn resumes_at(&mut self, at: Instant) {
        if self.since.is_some() {
            self.since = Some(at);
        }
    }
}

/// Seconds slept to stay within a share (the pool's metric).
pub type Slept = Counter<f64, AtomicU64>;

/// The schedule all instances of one type share.
#[derive(Debug)]
pub struct CpuShare {
    /// Real time each unit of wasm time costs: `1 / cores`.
    per_core_second: f64,
    /// How far ahead of now the schedule may ever be.
    horizon: Duration,
    /// When the type will be back on schedule (its theoretical arrival time).
    due: Mutex<Instant>,
    /// What its guests and units slept.
    slept: Slept,
}

impl CpuShare {
    /// A share of `millicores` thousandths of a core, never scheduled more
    /// than `horizon` ahead, counting what it makes guests sleep in `slept`.
    pub fn new(millicores: u32, horizon: Duration, slept: Slept) -> Self {
        CpuShare {
            per_core_second: 1000.0 / f64::from(millicores.max(1)),
            horizon,
            due: Mutex::new(Instant::now()),
            slept,
        }
    }

    /// At an epoch tick of a computing guest: charges what its `clock` ran;
    /// how long it must sleep before it goes on (never past `deadline`).
    pub fn at_tick(&self, clock: &mut CpuClock, now: Instant, deadline: Instant) -> Duration {
        let wait = self
            .charge(now, clock.take(now))
            .min(deadline.saturating_duration_since(now));
        if !wait.is_zero() {
            clock.resumes_at(now + wait);
            self.slept.inc_by(wait.as_secs_f64());
        }
        wait
    }

    /// Before a unit starts: how long it must wait (never past `deadline`).
    pub fn before_unit(&self, now: Instant, deadline: Instant) -> Duration {
        let wait = self
            .behind(now)
            .min(deadline.saturating_duration_since(now));
        if !wait.is_zero() {
            self.slept.inc_by(wait.as_secs_f64());
        }
        wait
    }

    /// After a unit (or a request of a shared instance): charges what its
    /// instance's `clock` ran and was not yet charged for.
    pub fn after_unit(&self, clock: &mut CpuClock) {
        let now = Instant::now();
        self.charge(now, clock.take(now));
    }

    /// How far ahead of the schedule the type may run: one tick of wasm,
    /// in real time (at least a tick).
    fn credit(&self) -> Duration {
        EPOCH_TICK.mul_f64(self.per_core_second.max(1.0))
    }

    /// Charges `ran` of wasm time at `now`; how long the type must wait
    /// before it runs more (zero while it is within its credit).
    fn charge(&self, now: Instant, ran: Duration) -> Duration {
        let cost = ran.mul_f64(self.per_core_second);
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        *due = ((*due).max(now) + cost).min(now + self.horizon);
        due.saturating_duration_since(now + self.credit())
    }

    /// How long a unit starting at `now` must wait (zero while the type is
    /// within its credit).
    fn behind(&self, now: Instant) -> Duration {
        let due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        due.saturating_duration_since(now + self.credit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(1)
    }

    #[test]
    fn a_lone_tick_never_waits_whatever_the_share() {
        for millicores in [10, 100, 500, 1000, 4000] {
            let share = CpuShare::new(millicores, LONG, Slept::default());
            assert_eq!(share.charge(later(), EPOCH_TICK), Duration::ZERO);
        }
    }

    #[test]
    fn a_type_past_its_share_waits_in_proportion() {
        // Half a core: each tick of wasm costs two ticks of real time; the
        // credit is one tick of wasm (two of real time).
        let share = CpuShare::new(500, LONG, Slept::default());
        let now = later();
        assert_eq!(share.charge(now, EPOCH_TICK), Duration::ZERO);
        assert_eq!(share.charge(now, EPOCH_TICK), EPOCH_TICK * 2);
        assert_eq!(share.behind(now), EPOCH_TICK * 2);
        // Long after, the type is back within its share.
        let after = now + Duration::from_secs(1);
        assert_eq!(share.behind(after), Duration::ZERO);
        assert_eq!(share.charge(after, EPOCH_TICK / 2), Duration::ZERO);
    }

    #[test]
    fn many_short_units_add_up() {
        // A tenth of a core: a thousand units of 20 µs are 20 ms of wasm,
        // 200 ms of real time.
        let share = CpuShare::new(100, LONG, Slept::default());
        let now = later();
        for _ in 0..1000 {
            share.charge(now, Duration::from_micros(20));
        }
        let credit = EPOCH_TICK * 10;
        let expected = Duration::from_millis(200) - credit;
        let behind = share.behind(now);
        // Each charge is rounded to the nanosecond.
        assert!(
            behind.abs_diff(expected) < Duration::from_micros(1),
            "{behind:?}"
        );
    }

    #[test]
    fn the_schedule_never_runs_past_its_horizon() {
        let share = CpuShare::new(10, Duration::from_secs(1), Slept::default());
        let now = later();
        for _ in 0..1000 {
            share.charge(now, EPOCH_TICK);
        }
        // A hundredth of a core: a tick of wasm is 200 ms, the credit.
        assert_eq!(share.behind(now), Duration::from_secs(1) - EPOCH_TICK * 100);
        assert_eq!(share.behind(now + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn several_cores_let_several_instances_compute_at_once() {
        // Two cores: a tick of wasm costs half a tick of real time.
        let share = CpuShare::new(2000, LONG, Slept::default());
        let now = later();
        for _ in 0..2 {
            assert_eq!(share.charge(now, EPOCH_TICK), Duration::ZERO);
        }
        assert_eq!(share.charge(now, EPOCH_TICK), EPOCH_TICK / 2);
    }

    #[test]
    fn a_clock_counts_only_time_in_wasm() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut clock = CpuClock::default();
        clock.resume(ms(0));
        clock.pause(ms(3)); // a host call: waits 100 ms
        clock.resume(ms(103));
        assert_eq!(clock.take(ms(104)), Duration::from_millis(4));
        // Still running: counts on from the take.
        clock.pause(ms(105));
        assert_eq!(clock.take(ms(200)), Duration::from_millis(1));
        // A sleep at a tick: it resumes after.
        clock.resume(ms(200));
        assert_eq!(clock.take(ms(202)), Duration::from_millis(2));
        clock.resumes_at(ms(210));
        assert_eq!(clock.take(ms(211)), Duration::from_millis(1));
    }
}
