//! Whether the store keeps up with the load: a moving average of its round trips, and the rule
//! that calls it slow and, later, recovered.
//!
//! A store slower than the offered load must be seen: one log line when it becomes slow and one
//! when it recovers (not one per call), the gauge `herald_dispatcher_store_slow`, and
//! `"store_slow": true` in `/readyz`, reported without failing it: every dispatcher shares the
//! store, and taking them all out of rotation at once would only add an outage. (A first
//! version failed readiness, with recovery under 50 ms; the chaos run, seed 2, left both
//! dispatchers not ready for good on a busy nx-27017 that never got that fast again.) The
//! pipelines need no brake: they wait on the store, and what they have not taken waits in
//! JetStream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Weight of the newest round trip in the average: about the last ten count.
const WEIGHT: f64 = 0.1;
/// Slow from an average round trip this long (a healthy store answers in milliseconds)...
pub const SLOW_MS: f64 = 250.0;
/// ...until it is back under half that (apart, so that it does not flap at the line, and near
/// enough that a busy but keeping-up store gets there).
pub const RECOVERED_MS: f64 = 125.0;

/// The moving average and what it says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pace {
    average_ms: f64,
    slow: bool,
}

/// A change of verdict, with the average that made it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    BecameSlow { average_ms: f64 },
    Recovered { average_ms: f64 },
}

impl Pace {
    /// Takes one round trip's time; returns a change of verdict, if this one made it.
    pub fn observe(&mut self, took: Duration) -> Option<Change> {
        // One very slow query (a big replay page) may move the average by a bounded step only.
        let ms = (took.as_secs_f64() * 1000.0).min(4.0 * SLOW_MS);
        self.average_ms = if self.average_ms == 0.0 { ms } else { self.average_ms + WEIGHT * (ms - self.average_ms) };
        let average_ms = self.average_ms;
        match (self.slow, average_ms) {
            (false, a) if a >= SLOW_MS => {
                self.slow = true;
                Some(Change::BecameSlow { average_ms })
            }
            (true, a) if a < RECOVERED_MS => {
                self.slow = false;
                Some(Change::Recovered { average_ms })
            }
            _ => None,
        }
    }
}

/// [`Pace`] shared by a store's clones, with its verdict readable without the lock.
#[derive(Debug, Clone, Default)]
pub struct StorePace {
    pace: Arc<Mutex<Pace>>,
    slow: Arc<AtomicBool>,
}

impl StorePace {
    /// Records a round trip; logs and returns a change of verdict.
    pub fn record(&self, took: Duration) -> Option<Change> {
        let change = match self.pace.lock() {
            Ok(mut pace) => pace.observe(took),
            Err(poisoned) => poisoned.into_inner().observe(took),
        };
        match change {
            Some(Change::BecameSlow { average_ms }) => {
                self.slow.store(true, Ordering::Relaxed);
                tracing::warn!(
                    average_ms = average_ms as u64,
                    "the store is slower than the load: round trips average over {SLOW_MS} ms"
                );
            }
            Some(Change::Recovered { average_ms }) => {
                self.slow.store(false, Ordering::Relaxed);
                tracing::info!(average_ms = average_ms as u64, "the store keeps up again");
            }
            None => {}
        }
        change
    }

    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_slow_call_is_not_a_slow_store() {
        let mut pace = Pace::default();
        for _ in 0..20 {
            assert_eq!(pace.observe(ms(5)), None);
        }
        assert_eq!(pace.observe(ms(4_000)), None, "one query past the line moves the average, not the verdict");
    }

    #[test]
    fn a_store_turns_slow_once_and_recovers_once() {
        let mut pace = Pace::default();
        let changes: Vec<Change> = (0..40).filter_map(|_| pace.observe(ms(800))).collect();
        assert!(matches!(changes.as_slice(), [Change::BecameSlow { .. }]), "{changes:?}");
        // Between the two lines: still slow, no new verdict.
        assert!((0..40).all(|_| pace.observe(ms(200)).is_none()));
        let changes: Vec<Change> = (0..60).filter_map(|_| pace.observe(ms(5))).collect();
        assert!(matches!(changes.as_slice(), [Change::Recovered { .. }]), "{changes:?}");
    }

    #[test]
    fn the_first_round_trip_sets_the_average() {
        let mut pace = Pace::default();
        assert!(matches!(pace.observe(ms(300)), Some(Change::BecameSlow { .. })));
    }
}
