//! Readiness: whether each dependency answers within a deadline, as `/readyz` reports it.
//!
//! A connection's state is not enough: a frozen server (SIGSTOP, a stalled VM or disk) keeps its
//! TCP connections open and answers nothing, so each check makes a real round trip. Checks run
//! concurrently and at most once per [`REUSE_FOR`], whoever asks: probes (and anyone calling the
//! unauthenticated endpoint in a loop) cost each dependency at most one call per second.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use fred::interfaces::ClientLike;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long a dependency may take to answer a check: under the probes' timeout (2 s in
/// `k8s/base`), so a slow answer reads as "not ready" rather than as a failed probe.
pub const DEADLINE: Duration = Duration::from_secs(1);
/// How long one round of checks answers for.
pub const REUSE_FOR: Duration = Duration::from_secs(1);

/// Named checks and their outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: BTreeMap<&'static str, bool>,
}

impl Report {
    pub fn new(checks: impl IntoIterator<Item = (&'static str, bool)>) -> Self {
        Self { checks: checks.into_iter().collect() }
    }

    pub fn ready(&self) -> bool {
        self.checks.values().all(|ok| *ok)
    }

    /// The checks that failed, by name (`redis`, `nats`, ...).
    pub fn failing(&self) -> Vec<&'static str> {
        self.checks.iter().filter(|(_, ok)| !**ok).map(|(name, _)| *name).collect()
    }

    /// This report with one more check (e.g. a local one that is never reused).
    pub fn with(mut self, name: &'static str, ok: bool) -> Self {
        self.checks.insert(name, ok);
        self
    }
}

/// Whether `call` succeeds within [`DEADLINE`].
pub async fn answers<T, E>(call: impl Future<Output = Result<T, E>>) -> bool {
    answers_within(DEADLINE, call).await
}

async fn answers_within<T, E>(deadline: Duration, call: impl Future<Output = Result<T, E>>) -> bool {
    matches!(tokio::time::timeout(deadline, call).await, Ok(Ok(_)))
}

/// Redis answers a PING.
pub async fn redis(client: &fred::clients::Client) -> bool {
    answers(client.ping::<String>(None)).await
}

/// NATS answers a JetStream API request (what both services publish and consume through).
pub async fn nats(js: &async_nats::jetstream::Context) -> bool {
    answers(js.query_account()).await
}

/// The last round of checks, shared by every `/readyz` request of one process.
#[derive(Debug)]
pub struct Checks {
    reuse_for: Duration,
    last: Mutex<Option<(Instant, Report)>>,
}

impl Default for Checks {
    fn default() -> Self {
        Self::reused_for(REUSE_FOR)
    }
}

impl Checks {
    fn reused_for(reuse_for: Duration) -> Self {
        Self { reuse_for, last: Mutex::new(None) }
    }

    /// The last report if it is younger than [`REUSE_FOR`], else a new one from `check`. One
    /// round runs at a time: requests arriving meanwhile wait for it instead of adding load.
    pub async fn report<F: Future<Output = Report>>(&self, check: impl FnOnce() -> F) -> Report {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref() {
            if at.elapsed() < self.reuse_for {
                return report.clone();
            }
        }
        let report = check().await;
        *last = Some((Instant::now(), report.clone()));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_what_failed() {
        let report = Report::new([("redis", false), ("nats", true)]).with("accepting", true);
        assert!(!report.ready());
        assert_eq!(report.failing(), vec!["redis"]);
        assert!(Report::new([("mongodb", true)]).ready());
    }

    #[tokio::test]
    async fn a_round_of_checks_is_reused_while_it_is_young() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = AtomicUsize::new(0);
        let check = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Report::new([("redis", true)])
        };
        let reused = Checks::reused_for(Duration::from_secs(3600));
        reused.report(check).await;
        reused.report(check).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let fresh = Checks::reused_for(Duration::ZERO);
        fresh.report(check).await;
        fresh.report(check).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_dependency_that_does_not_answer_fails_at_the_deadline() {
        let deadline = Duration::from_millis(10);
        assert!(!answers_within(deadline, std::future::pending::<Result<(), ()>>()).await);
        assert!(answers_within(deadline, async { Ok::<_, ()>(()) }).await);
        assert!(!answers_within(deadline, async { Err::<(), _>(()) }).await);
    }
}
