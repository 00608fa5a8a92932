//! Background work that must yield to the store: the sweep and the pending-receipts sample. Each
//! runs every interval, or less often when it is slow, so that on a slow store it never takes
//! more than its share of the time and the queries users wait for (a replay, a job's writes)
//! come first.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long after a run that took `took` started the next may start: `interval`, or `share`
/// times `took` if that is longer (the work then takes one `share`th of the time at most).
pub fn next_start_after(interval: Duration, took: Duration, share: u32) -> Duration {
    interval.max(took.saturating_mul(share))
}

/// Calls `work` until `stop` fires: first `first` from now, then each as [`next_start_after`]
/// says from the start of the one before. A run in progress when `stop` fires is dropped.
pub async fn paced<F, Fut>(first: Duration, interval: Duration, share: u32, stop: &CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut next = tokio::time::Instant::now() + first;
    loop {
        // Biased: once stopped, a run that is due does not start.
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = work() => {}
        }
        next = started + next_start_after(interval, started.elapsed(), share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    #[test]
    fn slow_work_waits_for_its_share_of_time_before_the_next() {
        let interval = Duration::from_millis(200);
        assert_eq!(next_start_after(interval, Duration::from_millis(20), 4), interval, "fast: every interval");
        assert_eq!(next_start_after(interval, Duration::from_millis(50), 4), interval);
        // 400 ms on a slow store: the next starts 1.6 s after this one started, not at once.
        assert_eq!(next_start_after(interval, Duration::from_millis(400), 4), Duration::from_millis(1600));
        assert_eq!(next_start_after(interval, Duration::from_millis(400), 20), Duration::from_secs(8));
        assert_eq!(next_start_after(interval, Duration::MAX, 4), Duration::MAX, "no overflow");
    }

    /// Chaos finding 8: on a slow store, sweeps every 200 ms ran back to back and the late users'
    /// replays waited behind them until their messages expired.
    #[tokio::test(start_paused = true)]
    async fn work_on_a_slow_store_takes_its_share_of_the_time_not_all_of_it() {
        let stop = CancellationToken::new();
        let busy = Arc::new(Mutex::new(Duration::ZERO));
        let runs = Arc::new(AtomicU32::new(0));
        let interval = Duration::from_millis(200);
        let run = paced(interval, interval, 4, &stop, || {
            let (busy, runs) = (busy.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(400)).await;
                *busy.lock().unwrap() += Duration::from_millis(400);
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        // Runs start at 0.2 s, then every 1.6 s: 0.2, 1.8, ... 9.8. Back to back they were 24.
        assert_eq!(runs.load(Ordering::Relaxed), 7);
        assert!(*busy.lock().unwrap() <= Duration::from_millis(2800), "at most a quarter of 10 s and one run");

        // A fast store: every interval, the first at once when asked.
        let runs = AtomicU32::new(0);
        let run = paced(Duration::ZERO, interval, 4, &stop, || {
            runs.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10))
        });
        let _ = tokio::time::timeout(Duration::from_millis(1050), run).await;
        assert_eq!(runs.load(Ordering::Relaxed), 6, "at 0, 0.2, ... 1.0 s");

        stop.cancel();
        let never = paced(Duration::ZERO, interval, 4, &stop, || async { panic!("stopped: no run") });
        never.await;
    }
}
