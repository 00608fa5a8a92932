//! The dispatcher's Prometheus metrics. Labels carry outcomes and codes, never user or message ids.

use herald_shared::metrics::{self as m, DependencyMetrics, MetricsError, BATCH_BUCKETS, LATENCY_BUCKETS};
use herald_shared::serve::ServeMetrics;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

pub struct DispatcherMetrics {
    pub registry: Registry,
    /// Jobs taken from the stream, by outcome (`stored`, `rejected`, `retried`, `dead_lettered`).
    pub jobs: IntCounterVec,
    /// Rejected jobs by reject code.
    pub jobs_rejected: IntCounterVec,
    pub job_batch_size: Histogram,
    /// Where each job's time in this dispatcher goes (`herald_dispatcher_job_stage_seconds`).
    pub job_stages: JobStages,
    /// Recipients routed, by outcome (`online`, `offline`, `presence_unavailable`).
    pub routing: IntCounterVec,
    /// Gateway commands that NATS did not take.
    pub route_failures: IntCounter,
    pub replayed: IntCounter,
    pub resent: IntCounter,
    pub expired: IntCounter,
    /// Ack updates the store refused for good, each dropped alone.
    pub acks_refused: IntCounter,
    /// Sweeps that resent nothing because acks were behind in the events stream.
    pub resends_deferred: IntCounter,
    /// How long each sweep took; a long one delays the next (`crate::duty`).
    pub sweep_seconds: Histogram,
    /// Receipt documents written, by operation (`insert`, `ack`).
    pub receipt_writes: IntCounterVec,
    /// Items per store round trip, by operation.
    pub store_batch_size: HistogramVec,
    /// Events applied, by kind (`acks`, `online`, `more`, `invalid`).
    pub events: IntCounterVec,
    /// Jobs waiting in the stream for a dispatcher (the consumer's lag).
    pub pending_jobs: IntGauge,
    /// Gateway events (acks, online, page requests) waiting for a dispatcher.
    pub pending_events: IntGauge,
    /// Receipts pending (not yet acked, expired or cancelled), sampled (`crate::pending`).
    pub pending_receipts: IntGauge,
    /// How long the oldest pending receipt has waited, sampled.
    pub oldest_pending_seconds: IntGauge,
    /// 1 while the store is slower than the load (see `crate::pace`), set at each scrape.
    pub store_slow: IntGauge,
    /// Publish requests refused while the jobs backlog was over its limit (`crate::admission`).
    pub publish_overloaded: IntCounter,
    pub dependencies: DependencyMetrics,
    /// The public HTTP listener's (`herald_http_*{listener="public"}`).
    pub http: ServeMetrics,
    /// The internal listener's (`herald_http_*{listener="internal"}`).
    pub internal_http: ServeMetrics,
}

/// How long each job spent in each stage of the job path in this dispatcher, measured on its
/// monotonic clock: what part of publish → receive is Herald's own (linger, route) and what
/// part the store's. A job waits for a free worker in the stream, not here: jobs are pulled
/// only for a free worker (`crate::pull`).
pub struct JobStages {
    /// Held in its batch (`HERALD_JOB_LINGER_MS`), from reaching this dispatcher until the batch
    /// went to a worker.
    pub linger: Histogram,
    /// Its batch's store write, retries included.
    pub store: Histogram,
    /// Its batch's presence lookup and commands to the gateways.
    pub route: Histogram,
}

/// Seconds, finer than [`LATENCY_BUCKETS`] around the milliseconds of a linger and a store
/// write, so that the benchmarks can read a p50 and a p99 of each stage from them.
const STAGE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025,
    0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl JobStages {
    fn new(r: &Registry) -> Result<Self, MetricsError> {
        let stages = m::histogram_vec(
            r,
            "herald_dispatcher_job_stage_seconds",
            "Time each job spent in each stage of the job path in this dispatcher",
            &["stage"],
            STAGE_BUCKETS,
        )?;
        let stage = |name: &str| stages.with_label_values(&[name]);
        Ok(Self { linger: stage("linger"), store: stage("store"), route: stage("route") })
    }

    /// Records the waits of a batch's jobs before their worker.
    pub fn waited(&self, waits: &crate::pull::Waits) {
        for held in waits.iter() {
            self.linger.observe(held.as_secs_f64());
        }
    }
}

/// Records `took` once for each of a batch's `jobs`: a batch's stage is each of its jobs' stage.
pub fn observe_each(stage: &Histogram, took: std::time::Duration, jobs: usize) {
    let secs = took.as_secs_f64();
    for _ in 0..jobs {
        stage.observe(secs);
    }
}

/// Every reject code, each counted from zero (`herald_dispatcher_jobs_rejected_total`).
const REJECT_CODES: [herald_proto::RejectCode; 10] = {
    use herald_proto::RejectCode as C;
    [
        C::Malformed,
        C::PayloadTooLarge,
        C::NoRecipients,
        C::TooManyRecipients,
        C::InvalidId,
        C::InvalidRecipient,
        C::InvalidTtl,
        C::InvalidTopic,
        C::IdConflict,
        C::DeadLetter,
    ]
};

/// Does not compile when a reject code is added and not listed above.
const _: fn(herald_proto::RejectCode) = |code| {
    use herald_proto::RejectCode as C;
    match code {
        C::Malformed
        | C::PayloadTooLarge
        | C::NoRecipients
        | C::TooManyRecipients
        | C::InvalidId
        | C::InvalidRecipient
        | C::InvalidTtl
        | C::InvalidTopic
        | C::IdConflict
        | C::DeadLetter => {}
    }
};

impl DispatcherMetrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = m::registry("herald-dispatcher");
        Ok(Self {
            jobs: m::counter_vec_at_zero(
                &r,
                "herald_dispatcher_jobs_total",
                "Jobs consumed, by outcome",
                "outcome",
                &["stored", "rejected", "retried", "dead_lettered"],
            )?,
            jobs_rejected: m::counter_vec_at_zero(
                &r,
                "herald_dispatcher_jobs_rejected_total",
                "Jobs rejected, by reject code",
                "code",
                &REJECT_CODES.map(herald_publish::code_str),
            )?,
            job_batch_size: m::histogram(
                &r,
                "herald_dispatcher_job_batch_size",
                "Jobs processed per batch",
                BATCH_BUCKETS,
            )?,
            job_stages: JobStages::new(&r)?,
            routing: m::counter_vec_at_zero(
                &r,
                "herald_dispatcher_routing_total",
                "Recipients routed, by outcome",
                "outcome",
                &["online", "offline", "presence_unavailable"],
            )?,
            route_failures: m::counter(
                &r,
                "herald_dispatcher_route_failures_total",
                "Gateway commands NATS did not accept (their receipts stay pending)",
            )?,
            replayed: m::counter(
                &r,
                "herald_dispatcher_replayed_total",
                "Pending notifications replayed to connections that came online",
            )?,
            resent: m::counter(&r, "herald_dispatcher_resent_total", "Notifications sent again after the ack timeout")?,
            expired: m::counter(&r, "herald_dispatcher_expired_total", "Receipts marked expired")?,
            resends_deferred: m::counter(
                &r,
                "herald_dispatcher_resends_deferred_total",
                "Sweeps that resent nothing because the events stream (acks) was behind",
            )?,
            sweep_seconds: m::histogram(
                &r,
                "herald_dispatcher_sweep_seconds",
                "How long each sweep took (a sweep longer than a quarter of the interval delays the next)",
                LATENCY_BUCKETS,
            )?,
            acks_refused: m::counter(
                &r,
                "herald_dispatcher_acks_refused_total",
                "Ack updates the store refused for good (each dropped alone; the others applied)",
            )?,
            receipt_writes: m::counter_vec_at_zero(
                &r,
                "herald_dispatcher_receipt_writes_total",
                "Receipt documents written, by operation",
                "op",
                &["insert", "ack", "topic_ack"],
            )?,
            store_batch_size: m::histogram_vec(
                &r,
                "herald_dispatcher_store_batch_size",
                "Items per store round trip, by operation",
                &["op"],
                BATCH_BUCKETS,
            )?,
            events: m::counter_vec_at_zero(
                &r,
                "herald_dispatcher_events_total",
                "Gateway events applied, by kind",
                "kind",
                &["acks", "online", "more", "topic_acks", "invalid"],
            )?,
            pending_jobs: m::gauge(
                &r,
                "herald_jetstream_pending_jobs",
                "Jobs in the stream not yet delivered to a dispatcher",
            )?,
            pending_events: m::gauge(
                &r,
                "herald_jetstream_pending_events",
                "Gateway events (acks, online, page requests) in the stream not yet delivered to a dispatcher",
            )?,
            pending_receipts: m::gauge(
                &r,
                "herald_dispatcher_pending_receipts",
                "Receipts not yet acked, expired or cancelled (sampled every HERALD_PENDING_SAMPLE_MS)",
            )?,
            oldest_pending_seconds: m::gauge(
                &r,
                "herald_dispatcher_oldest_pending_seconds",
                "How long the oldest pending receipt has waited, in seconds (sampled; 0 when none is)",
            )?,
            store_slow: m::gauge(
                &r,
                "herald_dispatcher_store_slow",
                "1 while store round trips average over 250 ms (until back under 125 ms)",
            )?,
            publish_overloaded: m::counter(
                &r,
                "herald_api_publish_overloaded_total",
                "Publish requests answered 503 overloaded: the jobs backlog was over HERALD_API_MAX_BACKLOG",
            )?,
            dependencies: DependencyMetrics::new(&r)?,
            http: ServeMetrics::new(&r, "public")?,
            internal_http: ServeMetrics::new(&r, "internal")?,
            registry: r,
        })
    }
}
