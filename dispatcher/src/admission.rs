//! Admission of new jobs over HTTP: while the jobs stream holds more work than the dispatchers
//! have taken (`HERALD_API_MAX_BACKLOG`), `POST /v1/publish…` answers 503 `overloaded` with a
//! `Retry-After`, so that a store slower than the offered load slows the publishers instead of
//! growing a backlog without bound. Everything already admitted is kept and worked through.
//!
//! The backlog is the jobs consumer's `num_pending` (published, not yet pulled by any
//! dispatcher), read from JetStream at most once per [`MAX_AGE`] however many requests ask. A
//! backlog that cannot be read admits: the publish itself then says whether NATS took it.

use std::time::Duration;

use async_nats::jetstream;
use herald_shared::naming::Names;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::pull;

/// How old a backlog reading may be before a request reads it again.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// What a publisher is told to wait before it tries again.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The rule: admit while the backlog is within the limit (0: no limit).
pub fn admits(backlog: u64, max_backlog: u64) -> bool {
    max_backlog == 0 || backlog <= max_backlog
}

/// The jobs backlog as last read, shared by the API's requests.
pub struct Backlog {
    js: jetstream::Context,
    names: Names,
    ack_wait: Duration,
    /// Jobs waiting above which publishing is refused; 0 admits everything.
    pub max_backlog: u64,
    /// The last reading and when it was taken. Held across the read, so that one request reads
    /// and those arriving meanwhile wait for its answer instead of asking JetStream too.
    last: Mutex<Option<(Instant, u64)>>,
}

impl Backlog {
    pub fn new(js: jetstream::Context, names: Names, ack_wait: Duration, max_backlog: u64) -> Self {
        Self { js, names, ack_wait, max_backlog, last: Mutex::new(None) }
    }

    /// Whether a new job may be admitted now; the backlog that says no, if not.
    pub async fn check(&self) -> Result<(), u64> {
        if self.max_backlog == 0 {
            return Ok(());
        }
        match self.pending().await {
            Some(backlog) if !admits(backlog, self.max_backlog) => Err(backlog),
            _ => Ok(()),
        }
    }

    /// Jobs in the stream that no dispatcher has taken yet, at most [`MAX_AGE`] old. None when
    /// JetStream does not answer.
    async fn pending(&self) -> Option<u64> {
        let mut last = self.last.lock().await;
        if let Some((at, backlog)) = *last {
            if at.elapsed() < MAX_AGE {
                return Some(backlog);
            }
        }
        let stream = self.names.jobs_stream();
        let read = pull::num_pending(&self.js, &stream, self.names.jobs_consumer(), self.ack_wait);
        let backlog = tokio::time::timeout(MAX_AGE, read).await.ok().flatten()?;
        *last = Some((Instant::now(), backlog));
        Some(backlog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_over_the_limit_is_refused_and_zero_means_no_limit() {
        assert!(admits(0, 10));
        assert!(admits(10, 10));
        assert!(!admits(11, 10));
        assert!(admits(u64::MAX, 0));
    }
}
