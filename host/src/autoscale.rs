//! The sampler and the autoscaler: once a second, read every pool's load,
//! update the gauges `ps` and `/metrics` show, and move autoscaled types
//! (`scale = { min, max }`) toward the scale their load asks for.
//!
//! Rules (Cloudflare Queues and KEDA are the models):
//! - **web** follows in-flight requests (running plus waiting): it wants
//!   `⌈in-flight / (0.8 × concurrency)⌉` instances, so instances run at
//!   about 80% of their seats;
//! - **worker** follows its queue: `⌈depth / 4⌉` instances, and one more
//!   than now while the oldest deliverable message has waited over 5s;
//!   `min = 0` scales to zero, and the first message wakes it (within a
//!   sampling interval);
//! - the result is clamped to `min..=max`; scaling up happens at once,
//!   scaling down only after the load asked for less during the whole
//!   `cooldown`;
//! - every decision is a log line with the signal, the old and the new scale.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::control::{Control, Decision};
use crate::formation::Role;

/// How often load is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Instances a web type wants per in-flight request.
const WEB_TARGET_UTILIZATION: f64 = 0.8;
/// Queued messages per worker instance.
const MESSAGES_PER_INSTANCE: u64 = 4;
/// A worker queue whose oldest message waited longer than this gets one more instance.
const AGE_TARGET: Duration = Duration::from_secs(5);

/// Samples and autoscales until `shutdown` turns true.
pub async fn run(control: Arc<Control>, mut shutdown: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut low_since: HashMap<String, Instant> = HashMap::new();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        control.sample_rates(last.elapsed());
        last = Instant::now();
        for (name, pool) in control.pools() {
            let process = pool.process();
            let scale = pool.scale();
            let busy = pool.busy();
            let stats = pool.stats();
            stats
                .idle
                .set(i64::from(scale) - i64::try_from(busy).unwrap_or(0));
            let (mut depth, mut age) = (0, None);
            if let (Some(queue), Some(queues)) = (process.queue(), control.queues()) {
                depth = queues.backend().depth(queue).await.unwrap_or(0);
                age = queues.backend().oldest_age(queue).await.ok().flatten();
                stats
                    .queue_depth
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
                if let Ok(bytes) = queues.backend().bytes(queue).await {
                    stats
                        .queue_bytes
                        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                }
                stats
                    .queue_age_seconds
                    .set(age.map_or(0.0, |a| a.as_secs_f64()));
            }
            let Some(bounds) = process.autoscale else {
                continue;
            };
            let (signal, wanted) = match &process.role {
                Role::Web(web) => {
                    let load = u64::try_from(stats.admitted.get()).unwrap_or(0);
                    // Each instance serves `concurrency` requests at once.
                    let per_instance = WEB_TARGET_UTILIZATION * f64::from(web.concurrency.get());
                    (
                        format!("in-flight {load}"),
                        (load as f64 / per_instance).ceil() as u64,
                    )
                }
                Role::Worker(_) => {
                    let mut wanted = depth.div_ceil(MESSAGES_PER_INSTANCE);
                    if age.is_some_and(|a| a > AGE_TARGET) {
                        wanted = wanted.max(u64::from(scale) + 1);
                    }
                    let age = age.map_or_else(
                        || "none".to_string(),
                        |a| format!("{:.1}s", a.as_secs_f64()),
                    );
                    (format!("queue depth {depth}, oldest {age}"), wanted)
                }
                Role::Clock(_) => continue,
            };
            let target = u32::try_from(wanted)
                .unwrap_or(u32::MAX)
                .clamp(bounds.min, bounds.max);
            if target > scale {
                low_since.remove(name);
                decide(&control, name, scale, target, &signal, "up");
            } else if target < scale {
                let since = *low_since.entry(name.clone()).or_insert_with(Instant::now);
                if since.elapsed() >= bounds.cooldown {
                    low_since.remove(name);
                    decide(&control, name, scale, target, &signal, "down");
                }
            } else {
                low_since.remove(name);
            }
        }
    }
}

fn decide(control: &Control, name: &str, old: u32, new: u32, signal: &str, direction: &str) {
    let why = match control.scale(name, new) {
        Ok(_) => {
            tracing::info!(
                process = name,
                old,
                new,
                "autoscale `{name}` {direction} from {old} to {new} ({signal})"
            );
            signal.to_string()
        }
        Err(e) => {
            tracing::warn!(process = name, "autoscale `{name}` to {new} refused: {e}");
            format!("{signal}; refused: {e}")
        }
    };
    control.record_decision(Decision {
        at_ms: crate::queue::now_ms(),
        process: name.to_string(),
        from: old,
        to: new,
        why,
    });
}
