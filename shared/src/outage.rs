//! Logging a dependency that fails again and again: one warning when it starts failing, one note
//! when it answers again (with how long it was gone), and debug lines in between. Without it a
//! NATS outage of a minute logged a warning per retry of every queued message (1,481 lines in
//! one chaos run), and an operator could not see when it began or ended.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one more outcome means, given when the outage began (None: no outage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The first failure: worth a warning.
    Began,
    /// One more failure of the same outage: debug only.
    Continues,
    /// The first success after an outage of this long: worth a note.
    Ended(Duration),
    /// A success, as before.
    Fine,
}

/// The rule: warn at the first failure, note the first success after.
pub fn change(since: Option<Instant>, failed: bool, now: Instant) -> Change {
    match (since, failed) {
        (None, true) => Change::Began,
        (Some(_), true) => Change::Continues,
        (Some(began), false) => Change::Ended(now.saturating_duration_since(began)),
        (None, false) => Change::Fine,
    }
}

/// One kind of failure of one dependency, such as "nats: events stream".
#[derive(Debug)]
pub struct Outage {
    what: &'static str,
    since: Mutex<Option<Instant>>,
}

impl Outage {
    pub const fn new(what: &'static str) -> Self {
        Self { what, since: Mutex::new(None) }
    }

    /// A failed attempt, to be retried.
    pub fn failed(&self, error: &dyn Display) {
        let now = Instant::now();
        let mut since = self.since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match change(*since, true, now) {
            Change::Began => {
                *since = Some(now);
                tracing::warn!(dependency = self.what, %error, "unavailable; retrying (logged again once it answers)");
            }
            _ => tracing::debug!(dependency = self.what, %error, "still unavailable; retrying"),
        }
    }

    /// A successful attempt.
    pub fn answered(&self) {
        let mut since = self.since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Change::Ended(down) = change(*since, false, Instant::now()) {
            *since = None;
            tracing::info!(dependency = self.what, down_for = ?down, "answers again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_logged_when_it_begins_and_when_it_ends_only() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(42);
        assert_eq!(change(None, false, t0), Change::Fine);
        assert_eq!(change(None, true, t0), Change::Began);
        assert_eq!(change(Some(t0), true, later), Change::Continues);
        assert_eq!(change(Some(t0), false, later), Change::Ended(Duration::from_secs(42)));
    }

    #[test]
    fn an_outage_tracks_its_own_state() {
        let outage = Outage::new("test");
        outage.answered();
        assert!(outage.since.lock().unwrap().is_none());
        outage.failed(&"refused");
        let began = *outage.since.lock().unwrap();
        outage.failed(&"refused again");
        assert_eq!(*outage.since.lock().unwrap(), began, "a second failure does not start a new outage");
        outage.answered();
        assert!(outage.since.lock().unwrap().is_none());
    }
}
