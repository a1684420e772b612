//! The metrics of one pool: what `ps`, the autoscaler and `/metrics` read
//! (where [`crate::metrics`] registers them with a `process` label).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use super::Failure;

/// The metrics of a pool.
#[derive(Clone)]
pub struct Stats {
    /// Units that started (took a slot).
    pub started: Counter,
    /// Units that ran to completion.
    pub succeeded: Counter,
    /// Units that failed, by `reason` (see [`Failure::REASONS`]).
    pub failed: Family<Vec<(String, String)>, Counter>,
    /// Requests refused with 503 because the pool and its backlog were full.
    pub rejected: Counter,
    /// Units running now.
    pub busy: Gauge,
    /// Requests admitted (running or waiting for a slot).
    pub admitted: Gauge,
    /// The number of slots.
    pub scale: Gauge,
    /// Instances created.
    pub instantiated: Counter,
    /// Time to create an instance, in seconds.
    pub instantiate_seconds: Histogram,
    /// Unit durations, in seconds.
    pub latency: Histogram,
    /// Messages waiting or in flight in a worker's queue (set by the sampler).
    pub queue_depth: Gauge,
    /// Bytes of messages waiting, delayed or in flight in a worker's queue
    /// (set by the sampler), as counted against `[queue] max_bytes`.
    pub queue_bytes: Gauge,
    /// Seconds the oldest ready message of a worker's queue has waited.
    pub queue_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: Counter,
    /// Idle instances (set by the sampler).
    pub idle: Gauge,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Counter::default(),
            succeeded: Counter::default(),
            failed: Family::default(),
            rejected: Counter::default(),
            busy: Gauge::default(),
            admitted: Gauge::default(),
            scale: Gauge::default(),
            instantiated: Counter::default(),
            // 1µs to ~0.5s.
            instantiate_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 20)),
            // 100µs to ~13s.
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            queue_depth: Gauge::default(),
            queue_bytes: Gauge::default(),
            queue_age_seconds: Gauge::default(),
            dead_lettered: Counter::default(),
            idle: Gauge::default(),
        }
    }
}

impl Stats {
    /// Counts a failed unit under its reason.
    pub(crate) fn record_failure(&self, failure: &Failure) {
        self.failed
            .get_or_create(&vec![("reason".to_string(), failure.reason().to_string())])
            .inc();
    }

    /// Failed units, all reasons.
    pub fn failures(&self) -> u64 {
        Failure::REASONS
            .iter()
            .map(|r| {
                self.failed
                    .get_or_create(&vec![("reason".to_string(), (*r).to_string())])
                    .get()
            })
            .sum()
    }

    /// Units that ended, either way.
    pub fn ended(&self) -> u64 {
        self.succeeded.get() + self.failures()
    }
}
