//! The backlog of receipts waiting for delivery, sampled for its gauges: how many are pending
//! and how long the oldest has waited. A count that only grows, or an oldest older than the
//! longest TTL publishers use, is the sign of messages that are not getting out.
//!
//! The sample is two index reads on MongoDB, but a store without those indexes (or with a huge
//! backlog) makes it a scan: it is then taken less often ([`crate::duty`]), so the gauges never
//! cost the store more than a small share of its time.

use std::sync::Arc;
use std::time::Duration;

use herald_shared::outage::Outage;
use herald_shared::Clock;
use tokio_util::sync::CancellationToken;

use crate::duty;
use crate::metrics::DispatcherMetrics;
use crate::store::{PendingSample, Store};

/// A sample's share of the time at most (one in this many): a sample that took 5 s (its
/// timeout) is followed by the next 100 s later, not 15.
pub const SAMPLE_SHARE: u32 = 20;

/// Samples the store at once, then every `interval` or less often when sampling is slow
/// ([`duty::paced`]), until `stop` fires. A failed sample (a timed-out one too) leaves the
/// gauges as they were and is logged once per outage.
pub async fn report(
    store: Store,
    interval: Duration,
    clock: Clock,
    metrics: Arc<DispatcherMetrics>,
    stop: CancellationToken,
) {
    let outage = Outage::new("pending receipts sample (mongodb)");
    let (store, outage, clock, metrics) = (&store, &outage, &clock, &metrics);
    duty::paced(Duration::ZERO, interval, SAMPLE_SHARE, &stop, move || async move {
        match store.pending_sample().await {
            Ok(sample) => {
                outage.answered();
                let (count, oldest) = gauges(sample, clock.now_ms());
                metrics.pending_receipts.set(count);
                metrics.oldest_pending_seconds.set(oldest);
            }
            Err(e) => outage.failed(&e),
        }
    })
    .await;
}

/// The two gauges' values: the count, and the oldest's age in whole seconds at `now_ms` (0 when
/// nothing is pending; never negative, whatever clock stamped it).
pub fn gauges(sample: PendingSample, now_ms: u64) -> (i64, i64) {
    let count = i64::try_from(sample.count).unwrap_or(i64::MAX);
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let age_ms = sample.oldest_created_ms.map_or(0, |created| now.saturating_sub(created).max(0));
    (count, age_ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_age_is_from_now_and_never_negative() {
        let sample = |count, oldest_created_ms| PendingSample { count, oldest_created_ms };
        assert_eq!(gauges(sample(0, None), 10_000), (0, 0), "nothing pending");
        assert_eq!(gauges(sample(3, Some(3_500)), 10_000), (3, 6));
        assert_eq!(gauges(sample(1, Some(12_000)), 10_000), (1, 0), "stamped ahead of this clock");
        assert_eq!(gauges(sample(u64::MAX, Some(0)), 1_500).0, i64::MAX);
    }
}
