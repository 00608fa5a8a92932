//! A token bucket: how many frames, or acked ids, a connection may send a second. Pure; the
//! session's state machine holds one per limit and passes the time in.

use std::time::Instant;

/// A token bucket per connection: `rate` frames a second, bursts of twice that. The rate and
/// the burst are `f32`, which holds them exactly (they are settings, far below 2^24) in half
/// the room: every idle connection holds two of these.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f32,
    burst: f32,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(rate: u32) -> Self {
        let rate = rate.max(1) as f32;
        Self { rate, burst: rate * 2.0, tokens: f64::from(rate * 2.0), last: None }
    }

    /// `n` a minute, all of them at once if need be: for what a client does once per
    /// (re)connection for each of up to `n` things.
    pub(crate) fn per_minute(n: usize) -> Self {
        let burst = n.max(1) as f32;
        Self { rate: burst / 60.0, burst, tokens: f64::from(burst), last: None }
    }

    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        self.allow_n(now, 1)
    }

    /// Takes `n` tokens at once, if there are that many.
    pub(crate) fn allow_n(&mut self, now: Instant, n: usize) -> bool {
        if let Some(last) = self.last {
            let refill = now.duration_since(last).as_secs_f64() * f64::from(self.rate);
            self.tokens = (self.tokens + refill).min(f64::from(self.burst));
        }
        self.last = Some(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limiter_allows_a_burst_then_the_sustained_rate() {
        let mut limiter = RateLimiter::new(10);
        let start = Instant::now();
        assert!((0..20).all(|_| limiter.allow(start)));
        assert!(!limiter.allow(start));
        assert!(limiter.allow(start + Duration::from_millis(100)));
        assert!(!limiter.allow(start + Duration::from_millis(100)));
    }

    #[test]
    fn the_id_limiter_takes_a_frame_of_ids_at_once() {
        let mut limiter = RateLimiter::new(1000);
        let start = Instant::now();
        assert!(limiter.allow_n(start, 1000) && limiter.allow_n(start, 1000));
        assert!(!limiter.allow_n(start, 1), "the burst is twice the rate");
        assert!(limiter.allow_n(start + Duration::from_millis(500), 500));
    }
}
