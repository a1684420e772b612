//! The metrics of one pool: what `ps`, the autoscaler and `/metrics` read
//! (where [`crate::metrics`] registers them with a `process` label).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

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
    /// Seconds guests slept to keep the type within `limits.cpu`.
    pub cpu_throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// The last failed units, newest last, for the dashboard.
    recent: Arc<Mutex<VecDeque<RecentFailure>>>,
}

/// Failed units a pool remembers.
const RECENT_FAILURES: usize = 32;
/// Bytes of a failure's detail kept (a guest writes it).
const DETAIL_BYTES: usize = 400;

/// A failed unit, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecentFailure {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The instance (`web.3`).
    pub instance: String,
    /// The failure's reason (see [`Failure::REASONS`]).
    pub reason: &'static str,
    /// What the guest or the host said, cut to a few hundred bytes.
    pub detail: String,
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
            cpu_throttled_seconds: Counter::default(),
            recent: Arc::default(),
        }
    }
}

impl Stats {
    /// Counts a failed unit of `instance` under its reason, and remembers it.
    pub(crate) fn record_failure(&self, instance: &str, failure: &Failure) {
        self.failed
            .get_or_create(&vec![("reason".to_string(), failure.reason().to_string())])
            .inc();
        let detail = failure.detail();
        let mut end = detail.len().min(DETAIL_BYTES);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        let entry = RecentFailure {
            at_ms: crate::queue::now_ms(),
            instance: instance.to_string(),
            reason: failure.reason(),
            detail: detail[..end].to_string(),
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_FAILURES {
            recent.pop_front();
        }
        recent.push_back(entry);
    }

    /// The last failed units, oldest first.
    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
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
