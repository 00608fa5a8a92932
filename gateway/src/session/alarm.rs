//! The session's one timer. A session waits for two instants, its next heartbeat and its
//! token's expiry; each tokio timer is ~100 bytes held by every idle connection (an `Interval`
//! boxes its own), so one timer is armed for whichever comes first, and this decides what its
//! firing means.

use std::time::{Duration, Instant};

use super::machine::Event;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Alarm {
    next_beat: Instant,
    interval: Duration,
}

impl Alarm {
    /// The first heartbeat one `interval` after `now`.
    pub(crate) fn new(now: Instant, interval: Duration) -> Self {
        Self { next_beat: now + interval, interval }
    }

    /// When the timer is to fire: the next heartbeat, or `token` (the token's expiry) if sooner.
    pub(crate) fn deadline(&self, token: Instant) -> Instant {
        self.next_beat.min(token)
    }

    /// What the timer's firing means: the token ran out (which wins over a heartbeat due at the
    /// same time), or a heartbeat is due, the next one an interval from now (a late heartbeat
    /// delays the ones after it rather than bunching them). The caller re-arms the timer at
    /// [`Self::deadline`] after every event, so a firing always means that deadline has passed,
    /// even when `now` reads a little earlier (tokio's clock and `Instant::now` may disagree by
    /// its millisecond rounding): taking the later of the two, a firing never goes unanswered,
    /// which would leave the timer elapsed and the loop spinning on it.
    pub(crate) fn fired(&mut self, now: Instant, token: Instant) -> Event {
        let now = now.max(self.deadline(token));
        if now >= token {
            Event::TokenExpired
        } else {
            self.next_beat = now + self.interval;
            Event::Tick
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEAT: Duration = Duration::from_secs(30);

    #[test]
    fn heartbeats_come_an_interval_apart_and_a_late_one_delays_the_rest() {
        let t = Instant::now();
        let token = t + Duration::from_secs(3600);
        let mut alarm = Alarm::new(t, BEAT);
        assert_eq!(alarm.deadline(token), t + BEAT);
        assert!(matches!(alarm.fired(t + BEAT, token), Event::Tick));
        assert_eq!(alarm.deadline(token), t + 2 * BEAT);
        let late = t + 2 * BEAT + Duration::from_secs(5);
        assert!(matches!(alarm.fired(late, token), Event::Tick));
        assert_eq!(alarm.deadline(token), late + BEAT);
    }

    #[test]
    fn the_token_wins_when_it_is_sooner_or_due_at_once() {
        let t = Instant::now();
        let mut alarm = Alarm::new(t, BEAT);
        let token = t + Duration::from_secs(10);
        assert_eq!(alarm.deadline(token), token);
        assert!(matches!(alarm.fired(token, token), Event::TokenExpired));
        // Due together: the token's expiry ends the session, no heartbeat first.
        assert!(matches!(alarm.fired(t + BEAT, t + BEAT), Event::TokenExpired));
    }

    #[test]
    fn a_firing_is_answered_even_if_the_clock_reads_early() {
        let t = Instant::now();
        let token = t + Duration::from_secs(3600);
        let mut alarm = Alarm::new(t, BEAT);
        let early = t + BEAT - Duration::from_millis(1);
        assert!(matches!(alarm.fired(early, token), Event::Tick));
        assert_eq!(alarm.deadline(token), t + 2 * BEAT, "re-armed from the deadline that passed");
        let mut alarm = Alarm::new(t, BEAT);
        let soon = t + Duration::from_secs(10);
        assert!(matches!(alarm.fired(soon - Duration::from_millis(1), soon), Event::TokenExpired));
    }
}
