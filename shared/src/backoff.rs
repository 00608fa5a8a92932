//! A capped doubling backoff: the delay after each consecutive failure of something retried in
//! a loop, starting small and doubling up to a ceiling, back to the start after a success.
//! It decides delays only; sleeping (and being woken by a shutdown) is the caller's business.
//! [`Backoff::next_pause`] adds jitter, for retries that many processes make at once.

use std::time::Duration;

/// Delay after `failures` consecutive failures (1 for the first): `start`, doubling, at most `max`.
/// No failures, no delay.
pub fn delay(start: Duration, max: Duration, failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        // 2^31 already overflows any useful delay; checked_mul keeps a huge count from panicking.
        n => start.checked_mul(1u32 << (n - 1).min(31)).map_or(max, |d| d.min(max)),
    }
}

/// Counts consecutive failures and says how long to wait after each.
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Self {
        Self { start, max, failures: 0 }
    }

    /// Records a failure and returns the delay before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        delay(self.start, self.max, self.failures)
    }

    /// Records a success: the next failure waits `start` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and returns a pause drawn between half and all of [`Backoff::failed`]'s
    /// delay, so that processes started together (a deploy, a fleet restarted with its Redis)
    /// do not retry in lockstep.
    pub fn next_pause(&mut self) -> Duration {
        self.failed().mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jittered_pauses_grow_to_the_cap_and_stay_within_half_and_all_of_each_step() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        for step in [100, 200, 350, 350] {
            let pause = backoff.next_pause();
            let step = Duration::from_millis(step);
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for a step of {step:?}");
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_start_to_the_ceiling_and_stays_there() {
        let got: Vec<Duration> = (0..10).map(|n| delay(10 * MS, 1000 * MS, n)).collect();
        let want: Vec<Duration> = [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000].iter().map(|&ms| ms * MS).collect();
        assert_eq!(got, want);
        assert_eq!(delay(10 * MS, 1000 * MS, u32::MAX), 1000 * MS, "no overflow, no panic");
    }

    #[test]
    fn a_success_starts_over() {
        let mut backoff = Backoff::new(10 * MS, 1000 * MS);
        assert_eq!([backoff.failed(), backoff.failed(), backoff.failed()], [10 * MS, 20 * MS, 40 * MS]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), 10 * MS);
        assert_eq!(backoff.failures(), 1);
    }
}
