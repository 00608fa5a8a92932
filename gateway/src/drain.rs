//! Closing a draining gateway's sessions a few at a time. Closed all at once, a pod's clients
//! would all reconnect to the surviving gateways in the same second, each with a replay query
//! at the store: every rollout a storm. So the closes (1012) are spread evenly over
//! `HERALD_DRAIN_SPREAD_MS`, as EMQX's eviction rate spreads its own; clients add a random
//! delay of their own before reconnecting (proto/README.md, "Reconnecting").

use std::sync::Arc;
use std::time::Duration;

use herald_proto::close;

use crate::registry::Registry;

/// How often the drain closes the sessions due since the last step.
const STEP: Duration = Duration::from_millis(20);

/// How many of `total` sessions should be closed `elapsed` into a drain spread over `spread`:
/// evenly, the first at once and the last when the spread ends.
pub(crate) fn closes_due(total: usize, elapsed: Duration, spread: Duration) -> usize {
    if total == 0 || elapsed >= spread {
        return total;
    }
    let share = elapsed.as_secs_f64() / spread.as_secs_f64();
    // At least one at the start; never more than all.
    (1 + (share * (total - 1) as f64) as usize).min(total)
}

/// Closes every session in the registry with 1012, spread over `spread`. Sessions that open
/// meanwhile (none should: a draining gateway refuses upgrades) are left to the caller's final
/// close.
pub(crate) async fn close_spread(registry: &Registry, spread: Duration) {
    let sessions: Vec<Arc<crate::registry::Connection>> = registry.all();
    let start = tokio::time::Instant::now();
    let mut closed = 0;
    while closed < sessions.len() {
        let due = closes_due(sessions.len(), start.elapsed(), spread);
        for conn in &sessions[closed..due] {
            conn.close_with(close::SERVICE_RESTART);
        }
        closed = due;
        if closed < sessions.len() {
            tokio::time::sleep(STEP).await;
        }
    }
    tracing::info!(sessions = sessions.len(), spread = ?spread, "drain: every session told to reconnect");
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPREAD: Duration = Duration::from_secs(8);

    #[test]
    fn closes_are_spread_evenly_over_the_drain() {
        assert_eq!(closes_due(1000, Duration::ZERO, SPREAD), 1, "one at once");
        assert_eq!(closes_due(1000, Duration::from_secs(2), SPREAD), 250);
        assert_eq!(closes_due(1000, Duration::from_secs(4), SPREAD), 500);
        assert_eq!(closes_due(1000, SPREAD - Duration::from_millis(1), SPREAD), 999, "the last at the end");
        assert_eq!(closes_due(1000, SPREAD, SPREAD), 1000, "all by the end");
        assert_eq!(closes_due(1000, SPREAD * 2, SPREAD), 1000, "never more than all");
    }

    #[test]
    fn nothing_to_spread_or_no_spread_closes_everything_at_once() {
        assert_eq!(closes_due(0, Duration::ZERO, SPREAD), 0);
        assert_eq!(closes_due(500, Duration::ZERO, Duration::ZERO), 500);
        assert_eq!(closes_due(1, Duration::ZERO, SPREAD), 1);
    }

    #[test]
    fn the_close_rate_is_the_sessions_over_the_spread() {
        // 20,000 sessions over 8 s: 2,500 closes a second, whatever the moment.
        let at = |ms| closes_due(20_000, Duration::from_millis(ms), SPREAD);
        assert!((2_490..=2_510).contains(&(at(3_000) - at(2_000))), "{}", at(3_000) - at(2_000));
        assert!((2_490..=2_510).contains(&(at(7_000) - at(6_000))));
    }
}
