//! What workers report and how the orchestrator adds reports up: counters, close codes and
//! latency histograms (HdrHistogram, microseconds), sent between processes as (value, count)
//! pairs so no histogram serialization format is involved.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded: an hour, in microseconds. Larger values are clamped to it.
const MAX_US: u64 = 3_600_000_000;

pub(crate) fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)] // constant bounds, valid by construction
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

pub(crate) fn record(h: &mut Histogram<u64>, value_us: u64) {
    h.saturating_record(value_us.clamp(1, MAX_US));
}

/// A histogram as (value, count) pairs.
pub(crate) fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

pub(crate) fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        let _ = h.record_n(value.clamp(1, MAX_US), count);
    }
}

/// One worker's state, as printed on its stdout (one JSON line per `report` command).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerReport {
    pub(crate) worker: usize,
    /// Connections established now (hello received).
    pub(crate) connected: u64,
    /// Successful connects since start, reconnects included.
    pub(crate) connects: u64,
    pub(crate) connect_failures: u64,
    /// Upgrades refused with an HTTP status, by status.
    pub(crate) refused: BTreeMap<u16, u64>,
    /// Connections that ended, by close code (1006: no close frame).
    pub(crate) closes: BTreeMap<u16, u64>,
    /// Load messages received, duplicates included.
    pub(crate) received: u64,
    /// Distinct (user, message) pairs received since start.
    pub(crate) unique: u64,
    pub(crate) duplicates: u64,
    /// New messages that came with a lower `seq` than one before them on the same connection.
    #[serde(default)]
    pub(crate) out_of_order: u64,
    pub(crate) acked_ids: u64,
    /// Frames that were neither hello nor a load message (e.g. error frames).
    pub(crate) other_frames: u64,
    /// Connections the worker closed itself, told to by `away`.
    #[serde(default)]
    pub(crate) aways: u64,
    /// Receive time of the first and last load message since the last reset (µs since epoch).
    pub(crate) first_rx_us: u64,
    pub(crate) last_rx_us: u64,
    /// Connections established (µs since epoch) of the last connect since the last reset.
    pub(crate) last_connect_us: u64,
    /// Latency from the JetStream publish time (`published_at_ms`) to receipt, µs.
    pub(crate) publish_to_rx: Vec<(u64, u64)>,
    /// Latency from the generator's send time (`lg_t`) to receipt, µs.
    pub(crate) send_to_rx: Vec<(u64, u64)>,
    pub(crate) rss_kib: u64,
    /// CPU time the worker process has used, seconds.
    #[serde(default)]
    pub(crate) cpu_secs: f64,
}

/// Several workers' reports added up.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) connected: u64,
    pub(crate) connects: u64,
    pub(crate) connect_failures: u64,
    pub(crate) refused: BTreeMap<u16, u64>,
    pub(crate) closes: BTreeMap<u16, u64>,
    pub(crate) received: u64,
    pub(crate) unique: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) acked_ids: u64,
    pub(crate) other_frames: u64,
    pub(crate) aways: u64,
    pub(crate) first_rx_us: u64,
    pub(crate) last_rx_us: u64,
    pub(crate) last_connect_us: u64,
    pub(crate) publish_to_rx: Option<Histogram<u64>>,
    pub(crate) send_to_rx: Option<Histogram<u64>>,
    pub(crate) generator_rss_kib: u64,
    pub(crate) generator_cpu_secs: f64,
}

impl Totals {
    pub(crate) fn of(reports: &[WorkerReport]) -> Self {
        let mut t = Totals { publish_to_rx: Some(histogram()), send_to_rx: Some(histogram()), ..Self::default() };
        for r in reports {
            t.connected += r.connected;
            t.connects += r.connects;
            t.connect_failures += r.connect_failures;
            for (k, v) in &r.refused {
                *t.refused.entry(*k).or_default() += v;
            }
            for (k, v) in &r.closes {
                *t.closes.entry(*k).or_default() += v;
            }
            t.received += r.received;
            t.unique += r.unique;
            t.duplicates += r.duplicates;
            t.out_of_order += r.out_of_order;
            t.acked_ids += r.acked_ids;
            t.other_frames += r.other_frames;
            t.aways += r.aways;
            if r.first_rx_us > 0 && (t.first_rx_us == 0 || r.first_rx_us < t.first_rx_us) {
                t.first_rx_us = r.first_rx_us;
            }
            t.last_rx_us = t.last_rx_us.max(r.last_rx_us);
            t.last_connect_us = t.last_connect_us.max(r.last_connect_us);
            if let Some(h) = t.publish_to_rx.as_mut() {
                add_pairs(h, &r.publish_to_rx);
            }
            if let Some(h) = t.send_to_rx.as_mut() {
                add_pairs(h, &r.send_to_rx);
            }
            t.generator_rss_kib += r.rss_kib;
            t.generator_cpu_secs += r.cpu_secs;
        }
        t
    }
}

/// p50 / p99 / p99.9 / max of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    pub(crate) fn of(h: Option<&Histogram<u64>>) -> Self {
        let Some(h) = h.filter(|h| !h.is_empty()) else { return Self::default() };
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_totals_merge() {
        let mut h = histogram();
        for v in [1_000, 2_000, 3_000, 100_000] {
            record(&mut h, v);
        }
        let a =
            WorkerReport { unique: 3, first_rx_us: 10, last_rx_us: 20, send_to_rx: to_pairs(&h), ..Default::default() };
        let b =
            WorkerReport { unique: 4, first_rx_us: 5, last_rx_us: 15, send_to_rx: to_pairs(&h), ..Default::default() };
        let t = Totals::of(&[a, b]);
        assert_eq!((t.unique, t.first_rx_us, t.last_rx_us), (7, 5, 20));
        let lat = Latency::of(t.send_to_rx.as_ref());
        assert_eq!(lat.count, 8);
        assert!((lat.p50_ms - 2.0).abs() < 0.01, "{lat:?}");
        assert!((lat.max_ms - 100.0).abs() < 0.1, "{lat:?}");
        assert_eq!(Latency::of(t.publish_to_rx.as_ref()).count, 0);
    }
}
