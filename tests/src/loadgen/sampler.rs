//! Counters of a running Herald read from outside every 250 ms while it is changed under them
//! (the rolling restart): connections opened on each gateway, the dispatcher's replay queries and
//! their time, and the store proxy's requests; and the rates read from them, as the peak over
//! windows of at least a second, through process restarts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::metrics;
use super::mongo_proxy::RequestCounter;

pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Rates are reported as their peak over windows of at least this.
const WINDOW: Duration = Duration::from_secs(1);

const OPENED: &str = "herald_gateway_connections_opened_total";
/// The replay's query (dispatcher/src/replay.rs, `Store::pending_receipts_after`); the query
/// API's `pending_for` uses the same op, but nothing calls it in the benchmarks.
const REPLAY_QUERIES: &str = r#"herald_dependency_seconds_count{dependency="mongodb",op="pending_receipts"}"#;
/// The time those queries took, summed (seconds).
const REPLAY_QUERY_SECONDS: &str = r#"herald_dependency_seconds_sum{dependency="mongodb",op="pending_receipts"}"#;

/// Reads the counters every [`SAMPLE_EVERY`] until stopped.
pub(crate) struct Sampler {
    pub(crate) http: reqwest::Client,
    /// The gateways' internal addresses, which their replacements take over.
    pub(crate) gateways: Vec<SocketAddr>,
    pub(crate) dispatcher: SocketAddr,
    pub(crate) store: RequestCounter,
}

/// Counter readings, one per tick; None where the process did not answer (a gateway between its
/// exit and its replacement's start).
#[derive(Debug, Default)]
pub(crate) struct Samples {
    /// Seconds from the first tick.
    at: Vec<f64>,
    /// Connections each gateway (by address: a replacement continues its predecessor's) opened.
    opened: Vec<Vec<Option<u64>>>,
    /// The dispatcher's replay queries.
    pub(crate) replay_queries: Vec<Option<u64>>,
    /// The time they took, summed, in microseconds.
    pub(crate) replay_query_us: Vec<Option<u64>>,
    /// Every request the store was sent.
    pub(crate) store: Vec<Option<u64>>,
}

impl Sampler {
    pub(crate) async fn run(self, stop: &CancellationToken) -> Samples {
        let mut samples = Samples { opened: vec![Vec::new(); self.gateways.len()], ..Samples::default() };
        let start = Instant::now();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            let at = start.elapsed().as_secs_f64();
            let store = self.store.get();
            let gateways = futures::future::join_all(self.gateways.iter().map(|g| self.page(*g)));
            let (gateways, dispatcher) = tokio::join!(gateways, self.page(self.dispatcher));
            samples.at.push(at);
            for (series, page) in samples.opened.iter_mut().zip(gateways) {
                series.push(page.map(|p| read(&p, OPENED)));
            }
            samples.replay_queries.push(dispatcher.as_deref().map(|p| read(p, REPLAY_QUERIES)));
            samples.replay_query_us.push(dispatcher.as_deref().map(|p| read_seconds_as_us(p, REPLAY_QUERY_SECONDS)));
            samples.store.push(Some(store));
        }
        samples
    }

    /// The page at `addr`, None if it did not come.
    async fn page(&self, addr: SocketAddr) -> Option<String> {
        metrics::prometheus_page(&self.http, addr).await.ok()
    }
}

/// `name` on a page that came: 0 when it is not there (a labelled series appears only once it
/// has been counted).
fn read(page: &str, name: &str) -> u64 {
    metrics::counter_value(page, name).unwrap_or(0)
}

fn read_seconds_as_us(page: &str, name: &str) -> u64 {
    (metrics::sample_value(page, name).unwrap_or(0.0) * 1e6) as u64
}

/// A counter's readings as the increase since the first: a reading lower than the one before is
/// a new process on the same address whose count started at 0 (as Prometheus's `rate` reads a
/// reset); a missing reading carries the last one forward.
fn cumulative(readings: &[Option<u64>]) -> Vec<u64> {
    let mut last: Option<u64> = None;
    let mut total = 0;
    readings
        .iter()
        .map(|reading| {
            if let Some(value) = *reading {
                total += match last {
                    None => 0,
                    Some(before) if value >= before => value - before,
                    Some(_) => value,
                };
                last = Some(value);
            }
            total
        })
        .collect()
}

/// The highest rate of a cumulative count over windows of at least `window`: at each reading,
/// the increase since the latest reading at least `window` before it, over the time between them.
/// None when the readings span less than one window.
fn peak_rate(at: &[f64], count: &[u64], window: f64) -> Option<f64> {
    let mut peak: Option<f64> = None;
    let mut from = 0;
    for i in 0..at.len().min(count.len()) {
        while from + 1 < i && at[i] - at[from + 1] >= window {
            from += 1;
        }
        let span = at[i] - at[from];
        if span >= window {
            let rate = count[i].saturating_sub(count[from]) as f64 / span;
            peak = Some(peak.map_or(rate, |p: f64| p.max(rate)));
        }
    }
    peak
}

impl Samples {
    fn window(&self) -> f64 {
        WINDOW.as_secs_f64()
    }

    /// Each gateway's highest connects per second.
    pub(crate) fn peak_each_gateway(&self) -> Vec<Option<f64>> {
        self.opened.iter().map(|series| peak_rate(&self.at, &cumulative(series), self.window())).collect()
    }

    /// The highest connects per second over all gateways together.
    pub(crate) fn peak_fleet(&self) -> Option<f64> {
        let each: Vec<Vec<u64>> = self.opened.iter().map(|series| cumulative(series)).collect();
        let fleet: Vec<u64> = (0..self.at.len()).map(|t| each.iter().map(|c| c[t]).sum()).collect();
        peak_rate(&self.at, &fleet, self.window())
    }

    /// The highest rate of one of the series.
    pub(crate) fn peak_of(&self, series: &[Option<u64>]) -> Option<f64> {
        peak_rate(&self.at, &cumulative(series), self.window())
    }

    /// How much one of the series grew over the sampling.
    pub(crate) fn total_of(series: &[Option<u64>]) -> u64 {
        cumulative(series).last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cumulative_count_reads_through_restarts_and_gaps() {
        // 100 at the first reading (before the window), +20, down (no answer), a new process
        // that has counted 5, then +10 on it.
        let readings = [Some(100), Some(120), None, None, Some(5), Some(15)];
        assert_eq!(cumulative(&readings), vec![0, 20, 20, 20, 25, 35]);
        assert_eq!(cumulative(&[None, Some(7), Some(9)]), vec![0, 0, 2], "the first reading is the base");
    }

    #[test]
    fn the_peak_rate_is_over_windows_of_at_least_one_second() {
        let at: Vec<f64> = (0..9).map(|i| f64::from(i) * 0.25).collect();
        // 400 connects between 0.75 s and 1.0 s, nothing else.
        let count = [0, 0, 0, 0, 400, 400, 400, 400, 400];
        // Each window spans exactly 1 s here: a quarter-second burst shows as 400/s.
        assert_eq!(peak_rate(&at, &count, 1.0), Some(400.0));
        // A steady 100 per tick is 400/s, whatever the window.
        let steady: Vec<u64> = (0..9).map(|i| i * 100).collect();
        assert_eq!(peak_rate(&at, &steady, 1.0), Some(400.0));
        assert_eq!(peak_rate(&at, &steady, 2.0), Some(400.0));
        assert_eq!(peak_rate(&at[..3], &steady[..3], 1.0), None, "shorter than a window");
    }

    #[test]
    fn uneven_ticks_widen_the_window_rather_than_shorten_it() {
        // A late tick (at 1.625 s): the window from 0.5 s spans 1.125 s, never less than 1 s.
        let at = [0.0, 0.25, 0.5, 0.75, 1.625];
        let count = [0, 0, 0, 0, 1_125];
        assert_eq!(peak_rate(&at, &count, 1.0), Some(1_000.0));
    }
}
