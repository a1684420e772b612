//! A token bucket for what guests can make the host do over and over:
//! log lines, and warnings about their denied requests. A guest in a loop
//! must not be able to fill the disk or drown other instances' lines.

use std::time::Instant;

/// Allows `rate` events a second on average, with bursts of up to ten
/// seconds' worth, and counts what it refused since it last allowed one.
#[derive(Debug, Clone)]
pub struct Throttle {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    refused: u64,
}

impl Throttle {
    /// Ten seconds' worth of burst at `rate` events a second.
    pub fn per_second(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Throttle {
            rate,
            burst: rate * 10.0,
            tokens: rate * 10.0,
            refilled: Instant::now(),
            refused: 0,
        }
    }

    /// Whether one more event may happen now; `Some(n)` if so, where `n`
    /// is how many were refused since the last one allowed (to report).
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// How many were refused since the last one allowed, forgetting them.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens < 1.0 {
            self.refused += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_and_a_count_of_the_refused() {
        let t0 = Instant::now();
        let mut throttle = Throttle::per_second(2);
        for _ in 0..20 {
            assert_eq!(throttle.allow_at(t0), Some(0));
        }
        assert_eq!(throttle.allow_at(t0), None);
        assert_eq!(throttle.allow_at(t0), None);
        // Half a second brings one more, and says two were refused.
        assert_eq!(throttle.allow_at(t0 + Duration::from_millis(500)), Some(2));
        assert_eq!(throttle.allow_at(t0 + Duration::from_millis(500)), None);
    }
}
