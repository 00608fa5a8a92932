//! The per-source connect rate limit: a token bucket per source address, in bounded memory.
//!
//! A source is an IPv4 address or an IPv6 /64 (what one subscriber usually gets; counting single
//! IPv6 addresses would give every attacker 2^64 buckets). Buckets live in two generations: a
//! lookup moves a bucket into the current one, and when the current one is full or older than
//! the window, it becomes the previous one and the old previous one is forgotten. The window is
//! at least the time an empty bucket takes to fill, so a bucket forgotten for lack of use was
//! full anyway and forgetting it changes nothing. Only more distinct sources within a window than
//! [`TRACKED_SOURCES`] forget buckets early, and against that many addresses it is the budget of
//! connections (`pending.rs`), not this limit, that holds the line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Sources remembered per generation (two generations: at most twice as many, ~2 MiB).
pub(crate) const TRACKED_SOURCES: usize = 16 * 1024;

/// A connect rate limit per source address; owned by the accept loop, so no lock.
#[derive(Debug)]
pub(crate) struct ConnectRate {
    per_sec: f64,
    burst: f64,
    window: Duration,
    capacity: usize,
    current: HashMap<IpAddr, Bucket>,
    previous: HashMap<IpAddr, Bucket>,
    rotated_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Takes one token for a connect at `now` from `bucket` (a source not seen yet has a full one).
/// Returns the bucket as it is afterwards, and whether the connect may proceed.
fn take(bucket: Option<Bucket>, now: Instant, per_sec: f64, burst: f64) -> (Bucket, bool) {
    let tokens = match bucket {
        None => burst,
        Some(b) => (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec).min(burst),
    };
    if tokens >= 1.0 {
        (Bucket { tokens: tokens - 1.0, at: now }, true)
    } else {
        (Bucket { tokens, at: now }, false)
    }
}

/// The address a bucket is kept for.
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

impl ConnectRate {
    /// `per_sec` connects per second per source, bursts of twice as many; `None` when 0 (no limit).
    pub(crate) fn new(per_sec: u32, now: Instant) -> Option<Self> {
        Self::with_capacity(per_sec, TRACKED_SOURCES, now)
    }

    fn with_capacity(per_sec: u32, capacity: usize, now: Instant) -> Option<Self> {
        if per_sec == 0 {
            return None;
        }
        let per_sec = f64::from(per_sec);
        let burst = 2.0 * per_sec;
        Some(Self {
            per_sec,
            burst,
            window: Duration::from_secs_f64(burst / per_sec).max(Duration::from_secs(1)),
            capacity,
            current: HashMap::new(),
            previous: HashMap::new(),
            rotated_at: now,
        })
    }

    /// Whether a connect from `ip` at `now` is within its source's rate; counts it either way.
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source(ip);
        if self.current.len() >= self.capacity || now.saturating_duration_since(self.rotated_at) >= self.window {
            self.previous = std::mem::take(&mut self.current);
            self.rotated_at = now;
        }
        let bucket = self.current.get(&key).copied().or_else(|| self.previous.remove(&key));
        let (bucket, allowed) = take(bucket, now, self.per_sec, self.burst);
        self.current.insert(key, bucket);
        allowed
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_of_twice_the_rate_then_the_rate() {
        let now = Instant::now();
        let mut rate = ConnectRate::new(5, now).unwrap();
        let allowed = (0..30).filter(|_| rate.allow(ip("127.0.0.1"), now)).count();
        assert_eq!(allowed, 10, "the burst");
        assert!(!rate.allow(ip("127.0.0.1"), now + Duration::from_millis(100)), "half a token");
        assert!(rate.allow(ip("127.0.0.1"), now + Duration::from_millis(300)), "a token every 1/5 s");
        let later = now + Duration::from_secs(60);
        assert_eq!(
            (0..30).filter(|_| rate.allow(ip("127.0.0.1"), later)).count(),
            10,
            "refilled to the burst, no more"
        );
    }

    #[test]
    fn each_source_has_its_own_bucket() {
        let now = Instant::now();
        let mut rate = ConnectRate::new(1, now).unwrap();
        assert!(rate.allow(ip("127.0.0.1"), now) && rate.allow(ip("127.0.0.1"), now));
        assert!(!rate.allow(ip("127.0.0.1"), now));
        assert!(rate.allow(ip("127.0.0.2"), now), "another address is not limited by the first");
        // An IPv4 client seen through a dual-stack socket is the same source.
        assert!(!rate.allow(ip("::ffff:127.0.0.1"), now));
        // One IPv6 /64 is one source; the next /64 is another.
        assert!(rate.allow(ip("2001:db8:1:2::1"), now) && rate.allow(ip("2001:db8:1:2:ffff::9"), now));
        assert!(!rate.allow(ip("2001:db8:1:2:abcd::1"), now));
        assert!(rate.allow(ip("2001:db8:1:3::1"), now));
    }

    #[test]
    fn memory_is_bounded_and_a_busy_source_is_not_forgotten_by_rotation() {
        let now = Instant::now();
        let mut rate = ConnectRate::with_capacity(1, 100, now).unwrap();
        assert!(rate.allow(ip("10.0.0.1"), now) && rate.allow(ip("10.0.0.1"), now));
        for i in 0..10_000u32 {
            let other = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            rate.allow(other, now);
            assert!(rate.tracked() <= 200, "{} sources tracked", rate.tracked());
            // The busy source keeps its (empty) bucket through every rotation as long as it
            // keeps connecting within a generation.
            if i % 50 == 0 {
                assert!(!rate.allow(ip("10.0.0.1"), now), "forgotten after {i} other sources");
            }
        }
        // Rotation by time forgets only buckets that have had time to fill.
        let mut rate = ConnectRate::new(1, now).unwrap();
        assert!(rate.allow(ip("10.0.0.1"), now) && rate.allow(ip("10.0.0.1"), now));
        let late = now + Duration::from_secs(5);
        rate.allow(ip("10.0.0.2"), late);
        rate.allow(ip("10.0.0.2"), late + Duration::from_secs(5));
        assert_eq!(rate.tracked(), 1, "10.0.0.1 forgotten after two windows");
    }
}
