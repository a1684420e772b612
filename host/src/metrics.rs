//! `GET /metrics`: the Prometheus text format, from the
//! [`prometheus_client`] registry built here. Every pool's metrics carry a
//! `process` label; names start with `wasmproc_`.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::engine::CompileCache;
use crate::pool::ProcessPool;

/// Registers the metrics of every pool and of the compile cache.
pub fn registry(pools: &BTreeMap<String, Arc<dyn ProcessPool>>, cache: &CompileCache) -> Registry {
    let mut registry = Registry::with_prefix("wasmproc");
    registry.register(
        "compile_cache_hits",
        "Components loaded from the compile cache",
        cache.hits.clone(),
    );
    registry.register(
        "compile_cache_misses",
        "Components compiled",
        cache.misses.clone(),
    );
    for (name, pool) in pools {
        let sub = registry.sub_registry_with_label(("process".into(), name.clone().into()));
        let s = pool.stats();
        sub.register(
            "instances",
            "Instances (slots) of the process type",
            s.scale.clone(),
        );
        sub.register(
            "instances_busy",
            "Instances running a unit of work",
            s.busy.clone(),
        );
        sub.register(
            "instances_idle",
            "Instances idle (sampled every second)",
            s.idle.clone(),
        );
        sub.register(
            "units_started",
            "Units of work that took a slot",
            s.started.clone(),
        );
        sub.register(
            "units_succeeded",
            "Units of work that completed",
            s.succeeded.clone(),
        );
        sub.register(
            "units_failed",
            "Units of work that failed, by reason",
            s.failed.clone(),
        );
        sub.register(
            "unit_duration_seconds",
            "Duration of units of work",
            s.latency.clone(),
        );
        sub.register(
            "backlog",
            "Requests admitted: running or waiting for an instance",
            s.admitted.clone(),
        );
        sub.register(
            "requests_rejected",
            "Requests refused with 503: pool and backlog full",
            s.rejected.clone(),
        );
        sub.register(
            "instantiations",
            "Instances created",
            s.instantiated.clone(),
        );
        sub.register(
            "instantiation_seconds",
            "Time to create an instance",
            s.instantiate_seconds.clone(),
        );
        sub.register(
            "queue_depth",
            "Messages waiting or in flight in the worker's queue",
            s.queue_depth.clone(),
        );
        sub.register(
            "queue_bytes",
            "Bytes of messages waiting, delayed or in flight in the worker's queue",
            s.queue_bytes.clone(),
        );
        sub.register(
            "queue_oldest_age_seconds",
            "Age of the oldest deliverable message in the worker's queue",
            s.queue_age_seconds.clone(),
        );
        sub.register(
            "dead_letters",
            "Messages moved to the dead-letter queue",
            s.dead_lettered.clone(),
        );
        sub.register(
            "cpu_throttled_seconds",
            "Seconds the type's guests slept to stay within limits.cpu",
            s.cpu_throttled_seconds.clone(),
        );
    }
    registry
}

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}
