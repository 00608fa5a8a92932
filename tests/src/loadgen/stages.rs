//! Where a job's latency goes inside the dispatcher, over one window of a scenario: p50, p99 and
//! mean of each stage of `herald_dispatcher_job_stage_seconds` (linger, store, route) from
//! two scrapes of its `/metrics`, to set beside the publish → receive latency the workers
//! measured. The stages are timed on the dispatcher's own monotonic clock; nothing here compares
//! two clocks.

use serde_json::{json, Map, Value};

use super::metrics;
use super::scenarios::round;

const METRIC: &str = "herald_dispatcher_job_stage_seconds";
/// Herald's own waits and work (linger, route) and the store's write.
const STAGES: [&str; 3] = ["linger", "store", "route"];

/// Each stage's `<stage>_p50_ms`, `<stage>_p99_ms` and `<stage>_mean_ms` between two scrapes of
/// a dispatcher's metrics page (null where no job passed), and `herald_own_mean_ms`: the means of
/// linger and route summed, beside `store_mean_ms` (means add up where quantiles do not).
pub(crate) fn split(before: &str, after: &str) -> Map<String, Value> {
    let mut figures = Map::new();
    let mut own_mean_ms = 0.0;
    for stage in STAGES {
        let labels = format!("stage=\"{stage}\"");
        let (b, a) =
            (metrics::histogram_buckets(before, METRIC, &labels), metrics::histogram_buckets(after, METRIC, &labels));
        let ms = |q: f64| metrics::quantile_between(&b, &a, q).map(|s| round(s * 1000.0, 2));
        figures.insert(format!("{stage}_p50_ms"), json!(ms(0.5)));
        figures.insert(format!("{stage}_p99_ms"), json!(ms(0.99)));
        let mean_ms = mean_between(before, after, &labels).map(|s| s * 1000.0);
        figures.insert(format!("{stage}_mean_ms"), json!(mean_ms.map(|m| round(m, 2))));
        if stage != "store" {
            own_mean_ms += mean_ms.unwrap_or(0.0);
        }
    }
    figures.insert("herald_own_mean_ms".into(), json!(round(own_mean_ms, 2)));
    figures
}

/// The mean of what the series observed between the scrapes, from its `_sum` and `_count`.
fn mean_between(before: &str, after: &str, labels: &str) -> Option<f64> {
    let read = |page: &str, part: &str| metrics::sample_value(page, &format!("{METRIC}_{part}{{{labels}}}"));
    let count = read(after, "count")? - read(before, "count").unwrap_or(0.0);
    let sum = read(after, "sum")? - read(before, "sum").unwrap_or(0.0);
    (count > 0.0).then(|| sum / count)
}
