//! Fleet time: the wall-clock reading every expiry and timestamp decision uses.
//!
//! A host's wall clock can be wrong, or be stepped (NTP, a VM resumed), and Herald may not
//! compare one host's reading with another's. So a [`Clock`] reads the system clock once, when
//! it is made, and from then on advances on the monotonic clock, which no step moves; and
//! [`follow_redis`] anchors it to Redis's `TIME` every few seconds, so that every gateway and
//! dispatcher reads one clock, the Redis server's, whatever their own say. Expiry stamped by one
//! dispatcher and judged by another, or by a gateway, is then judged on the same clock.
//!
//! What this leaves: the reading is as good as Redis's clock, give or take half a round trip;
//! a Redis failover to a host whose clock differs moves every process's reading together, at
//! their next anchoring.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

/// How often a process anchors its clock to Redis's.
pub const ANCHOR_INTERVAL: Duration = Duration::from_secs(5);
/// A `TIME` round trip longer than this says too little about when Redis read its clock.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(500);
/// A correction larger than this is logged: a host clock or Redis's was stepped.
const NOTABLE_CORRECTION_MS: i64 = 1_000;

/// Fleet time in Unix milliseconds (see the module docs). Clones share one anchor.
#[derive(Debug, Clone)]
pub struct Clock {
    anchor: Arc<Anchor>,
}

#[derive(Debug)]
struct Anchor {
    /// A moment on the monotonic clock...
    epoch: Instant,
    /// ...and the fleet time then, in Unix milliseconds.
    at_epoch_ms: AtomicI64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl PartialEq for Clock {
    /// The same clock: clones of one another.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.anchor, &other.anchor)
    }
}

impl Clock {
    /// Starts from the system clock as it reads now.
    pub fn system() -> Self {
        Self::skewed(0)
    }

    /// Starts `offset_ms` off the system clock (ahead; negative: behind): a host whose clock is
    /// wrong, in tests. [`follow_redis`] corrects it like any other.
    pub fn skewed(offset_ms: i64) -> Self {
        let at_epoch_ms = (crate::now_ms() as i64).saturating_add(offset_ms);
        Self { anchor: Arc::new(Anchor { epoch: Instant::now(), at_epoch_ms: AtomicI64::new(at_epoch_ms) }) }
    }

    pub fn now_ms(&self) -> u64 {
        self.at(Instant::now())
    }

    fn at(&self, moment: Instant) -> u64 {
        let elapsed = moment.saturating_duration_since(self.anchor.epoch).as_millis() as i64;
        self.anchor.at_epoch_ms.load(Ordering::Relaxed).saturating_add(elapsed).max(0) as u64
    }

    /// Sets the clock so that it read `reference_ms` at `moment`; returns the correction.
    fn anchor_to(&self, reference_ms: u64, moment: Instant) -> i64 {
        let correction = reference_ms as i64 - self.at(moment) as i64;
        self.anchor.at_epoch_ms.fetch_add(correction, Ordering::Relaxed);
        correction
    }
}

/// The moment Redis most likely read its clock, and that reading, from a `TIME` sent at `sent`
/// and answered at `answered`; None when the round trip was too slow to tell.
fn reading(sent: Instant, answered: Instant, time: &[String]) -> Option<(Instant, u64)> {
    let round_trip = answered.checked_duration_since(sent)?;
    if round_trip > MAX_ROUND_TRIP {
        return None;
    }
    let [secs, micros] = time else { return None };
    let ms = secs.parse::<u64>().ok()?.checked_mul(1000)? + micros.parse::<u64>().ok()? / 1000;
    Some((sent + round_trip / 2, ms))
}

/// Anchors `clock` to Redis's `TIME` once; false if Redis did not answer in time. Start-up
/// calls it before anything reads the clock, so that no decision runs on the host's clock.
pub async fn anchor(clock: &Clock, redis: &fred::clients::Client) -> bool {
    let sent = Instant::now();
    // On a Redis Cluster a command without keys goes to any node: pinned to the owner of slot 0,
    // every Herald process reads the same node's clock, never one node's against another's.
    let command = fred::cmd!("TIME", hash: fred::types::ClusterHash::Custom(0));
    let time = tokio::time::timeout(MAX_ROUND_TRIP, redis.custom::<Vec<String>, String>(command, vec![])).await;
    let answered = Instant::now();
    let Ok(Ok(time)) = time else { return false };
    let Some((moment, ms)) = reading(sent, answered, &time) else { return false };
    let correction = clock.anchor_to(ms, moment);
    if correction.abs() >= NOTABLE_CORRECTION_MS {
        tracing::warn!(correction_ms = correction, "clock anchored to Redis TIME moved by over a second");
    }
    true
}

/// Anchors `clock` to Redis's `TIME` every [`ANCHOR_INTERVAL`] until `stop`. While Redis does
/// not answer, the clock runs on from its last anchor.
pub async fn follow_redis(clock: Clock, redis: fred::clients::Client, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ANCHOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once, and start-up has just anchored.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        anchor(&clock, &redis).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_starts_off_the_system_clock() {
        let (before, ahead, behind, after) =
            (crate::now_ms(), Clock::skewed(60_000).now_ms(), Clock::skewed(-60_000).now_ms(), crate::now_ms());
        assert!(ahead >= before + 60_000 && ahead <= after + 60_000);
        assert!(behind + 60_000 >= before && behind + 60_000 <= after);
        assert_eq!(Clock::skewed(-i64::MAX).now_ms(), 0, "saturates instead of wrapping");
    }

    #[test]
    fn anchoring_moves_every_clone_to_the_reference() {
        let clock = Clock::skewed(-60_000);
        let copy = clock.clone();
        let now = Instant::now();
        let reference = crate::now_ms();
        let correction = clock.anchor_to(reference, now);
        assert!((59_000..=61_000).contains(&correction), "{correction}");
        assert_eq!(copy.at(now), reference, "clones share the anchor");
        assert_eq!(copy.at(now + Duration::from_millis(1500)), reference + 1500, "runs on the monotonic clock");
    }

    #[test]
    fn a_reading_is_placed_in_the_middle_of_its_round_trip() {
        let sent = Instant::now();
        let time = ["1700000000".to_owned(), "123456".to_owned()];
        let (moment, ms) = reading(sent, sent + Duration::from_millis(40), &time).unwrap();
        assert_eq!(ms, 1_700_000_000_123);
        assert_eq!(moment, sent + Duration::from_millis(20));
        assert!(reading(sent, sent + Duration::from_secs(1), &time).is_none(), "too slow to tell");
        assert!(reading(sent, sent, &["x".to_owned(), "1".to_owned()]).is_none());
        assert!(reading(sent, sent, &["1".to_owned()]).is_none());
    }
}
