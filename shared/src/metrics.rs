//! Prometheus plumbing both services share: a registry per service instance (so several
//! in-process instances in a test keep apart), constructors that register as they create, the
//! text encoding for `/metrics`, and the dependency-call timer. Which metrics exist is each
//! service's own business (`gateway::metrics`, `dispatcher::metrics`).

use std::future::Future;
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub use prometheus::Error as MetricsError;

/// Seconds, from a millisecond to half a minute: wide enough for a socket write and for a
/// message that waited out a store outage.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// From publish to a socket: a live delivery takes milliseconds, a replay as long as its user was
/// away, so the buckets go on to a day.
pub const DELIVERY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 14400.0, 86400.0,
];
/// Items per batch, for the batch-size histograms.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0];

/// A registry with the process metrics and `herald_build_info{service, version}` (always 1),
/// which says which build each process runs, e.g. while a rollout is under way.
pub fn registry(service: &str) -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
    }
    let info = Opts::new("herald_build_info", "Always 1; the labels say which build this process runs")
        .const_label("service", service)
        .const_label("version", env!("CARGO_PKG_VERSION"));
    if let Ok(gauge) = IntGauge::with_opts(info) {
        gauge.set(1);
        let _ = registry.register(Box::new(gauge));
    }
    // Benchmark builds count allocations (`alloc_count`); production builds have no such series.
    #[cfg(feature = "alloc-count")]
    {
        let _ = crate::alloc_count::register(&registry);
    }
    // Production builds run on jemalloc and say what it holds (`heap`); the counting build
    // replaces jemalloc with the system allocator, so it has no such series.
    #[cfg(all(feature = "jemalloc", not(feature = "alloc-count")))]
    {
        let _ = crate::heap::register(&registry);
    }
    registry
}

/// The text exposition format of everything in `registry`.
pub fn encode(registry: &Registry) -> String {
    TextEncoder::new().encode_to_string(&registry.gather()).unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

pub fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let metric = IntCounter::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// A counter by one label, with each of `values` present at zero from the start: a rate or an
/// alert on a value that has not happened yet reads 0, not "no data".
pub fn counter_vec_at_zero(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let metric = counter_vec(registry, name, help, &[label])?;
    for value in values {
        metric.with_label_values(&[value]);
    }
    Ok(metric)
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let metric = IntGauge::new(name, help)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, MetricsError> {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, MetricsError> {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Latency and errors of calls to Redis, NATS and MongoDB, labelled by dependency and operation
/// (`herald_dependency_seconds`, `herald_dependency_errors_total`).
#[derive(Clone)]
pub struct DependencyMetrics {
    seconds: HistogramVec,
    errors: IntCounterVec,
}

impl DependencyMetrics {
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            seconds: histogram_vec(
                registry,
                "herald_dependency_seconds",
                "Latency of calls to Redis, NATS and MongoDB",
                &["dependency", "op"],
                LATENCY_BUCKETS,
            )?,
            errors: counter_vec(
                registry,
                "herald_dependency_errors_total",
                "Failed calls to Redis, NATS and MongoDB",
                &["dependency", "op"],
            )?,
        })
    }

    /// Runs `call`, recording how long it took and whether it failed.
    pub async fn time<T, E, F>(&self, dependency: &str, op: &str, call: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let result = call.await;
        self.seconds.with_label_values(&[dependency, op]).observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.errors.with_label_values(&[dependency, op]).inc();
        }
        result
    }
}

/// Seconds from `since_ms` (Unix milliseconds) to now, never negative.
pub fn seconds_since(since_ms: u64) -> f64 {
    crate::now_ms().saturating_sub(since_ms) as f64 / 1000.0
}
