//! Plumbing shared by the gateway and the dispatcher; no business logic lives here.

#[cfg(feature = "alloc-count")]
pub mod alloc_count;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod connect;
pub mod fdlimit;
#[cfg(feature = "jemalloc")]
pub mod heap;
pub mod log_json;
pub mod metrics;
pub mod naming;
pub mod nats_auth;
pub mod outage;
pub mod readiness;
pub mod redis_batch;
pub mod serve;
pub mod shutdown;
pub mod slots;
pub mod streams;
pub mod telemetry;
pub mod tls;

/// Milliseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub use clock::Clock;
