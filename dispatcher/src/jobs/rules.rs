//! The job pipeline's decisions, as plain functions of data: what to do with a job once the
//! store answered (route and ack, reject, retry with which delay, dead-letter), whom to route
//! it to, and which receipt states that needs. The I/O around them is `jobs`.

use std::collections::HashSet;
use std::time::Duration;

use herald_proto::UserId;
use herald_publish::validate::ValidJob;

use crate::store::{receipt_key, Stored};

/// What became of one job once the store answered, and what to tell JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stored: route to these recipients, then ack.
    Stored { route: Vec<UserId> },
    /// Its id belongs to another message: reject as `id_conflict`.
    Conflict,
    /// Refused by the store: hand back, to be tried again after `delay`.
    Retry { delay: Duration, reason: String },
    /// Refused on every attempt: move aside.
    DeadLetter { reason: String },
}

/// Which attempt at a job this was.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// JetStream's delivery count (1 the first time).
    pub delivered: u64,
    /// Whether an earlier store attempt of this batch failed midway.
    pub interrupted: bool,
}

impl Attempt {
    /// Whether an earlier attempt may have stored this job without routing it: it was delivered
    /// before, or an earlier store attempt of this batch was interrupted (and may have written
    /// receipts that this attempt then found, and so did not create).
    pub fn seen_before(self) -> bool {
        self.delivered > 1 || self.interrupted
    }
}

/// The rule for a job after its store attempt: route and ack what was stored, reject a
/// conflict, and retry a refusal with a delay growing by a second an attempt (at most 30 s)
/// until `max_attempts`, then dead-letter it.
pub fn verdict(
    job: &ValidJob,
    stored: Stored,
    attempt: Attempt,
    pending: Option<&HashSet<String>>,
    max_attempts: u64,
) -> Verdict {
    match stored {
        Stored::New(created) => Verdict::Stored { route: route_to(job, created, attempt, pending) },
        Stored::Conflict => Verdict::Conflict,
        Stored::Failed(reason) if attempt.delivered < max_attempts => {
            Verdict::Retry { delay: Duration::from_secs(attempt.delivered.min(30)), reason }
        }
        Stored::Failed(reason) => Verdict::DeadLetter { reason },
    }
}

/// Whom a stored job is routed to. The first time, the recipients whose receipt this attempt
/// `created`. A job seen before goes to every recipient whose receipt is still `pending` (an
/// earlier attempt may have stored it without routing; one delivered, expired or cancelled
/// since must not be sent again), and to nobody while that is unknown: the ack-timeout sweep
/// sends what is pending. Clients deduplicate.
pub fn route_to(
    job: &ValidJob,
    created: Vec<UserId>,
    attempt: Attempt,
    pending: Option<&HashSet<String>>,
) -> Vec<UserId> {
    if !attempt.seen_before() {
        return created;
    }
    let Some(pending) = pending else { return Vec::new() };
    job.recipients.iter().filter(|user| pending.contains(&receipt_key(&job.message_id, user))).cloned().collect()
}

/// The receipts whose state [`route_to`] needs for this job: every recipient's, if it was
/// stored and seen before; none otherwise.
pub fn receipts_to_check(job: &ValidJob, stored: &Stored, attempt: Attempt) -> Vec<String> {
    match stored {
        Stored::New(_) if attempt.seen_before() => {
            job.recipients.iter().map(|user| receipt_key(&job.message_id, user)).collect()
        }
        _ => Vec::new(),
    }
}

/// Pairs each job with what the store did with it. [`Store::insert`](crate::store::Store::insert) answers one per job, in
/// order; any other count is a bug, and then every job counts as refused (retried, then
/// dead-lettered if it persists) rather than one being routed with another's receipts.
pub(super) fn pair<T>(jobs: Vec<T>, stored: Vec<Stored>) -> Vec<(T, Stored)> {
    if stored.len() != jobs.len() {
        let reason = format!("the store answered for {} of {} jobs", stored.len(), jobs.len());
        tracing::error!(%reason, "store answer does not match the batch");
        return jobs.into_iter().map(|job| (job, Stored::Failed(reason.clone()))).collect();
    }
    jobs.into_iter().zip(stored).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn job(recipients: &[&str]) -> ValidJob {
        ValidJob {
            message_id: herald_proto::MessageId::new("m1").unwrap(),
            seq: 1,
            recipients: recipients.iter().map(|u| UserId::new(*u).unwrap()).collect(),
            topic: None,
            payload: RawValue::from_string("1".into()).unwrap(),
            published_at_ms: 0,
            expires_at_ms: 1,
            digest: "d".into(),
        }
    }

    fn users(names: &[&str]) -> Vec<UserId> {
        names.iter().map(|u| UserId::new(*u).unwrap()).collect()
    }

    fn pending(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|k| format!("m1/{k}")).collect()
    }

    const FIRST: Attempt = Attempt { delivered: 1, interrupted: false };
    const REDELIVERED: Attempt = Attempt { delivered: 2, interrupted: false };
    const INTERRUPTED: Attempt = Attempt { delivered: 1, interrupted: true };

    #[test]
    fn a_first_attempt_routes_the_receipts_it_created_whatever_else_is_pending() {
        let j = job(&["a", "b"]);
        assert_eq!(route_to(&j, users(&["b"]), FIRST, None), users(&["b"]));
        assert_eq!(route_to(&j, users(&["b"]), FIRST, Some(&pending(&["a", "b"]))), users(&["b"]));
        assert_eq!(route_to(&j, vec![], FIRST, Some(&pending(&["a", "b"]))), users(&[]));
        assert!(receipts_to_check(&j, &Stored::New(users(&["b"])), FIRST).is_empty(), "nothing to ask the store");
    }

    #[test]
    fn a_job_seen_before_routes_only_its_recipients_still_pending() {
        let j = job(&["a", "b", "c"]);
        for attempt in [REDELIVERED, INTERRUPTED] {
            // Whatever this attempt created: an earlier one may have stored a and c unrouted,
            // and b was delivered since.
            let route = route_to(&j, vec![], attempt, Some(&pending(&["c", "a"])));
            assert_eq!(route, users(&["a", "c"]), "in recipient order, {attempt:?}");
            let route = route_to(&j, users(&["b"]), attempt, Some(&pending(&["a", "c"])));
            assert_eq!(route, users(&["a", "c"]), "pending decides, not what was created, {attempt:?}");
            let keys = receipts_to_check(&j, &Stored::New(vec![]), attempt);
            assert_eq!(keys, vec!["m1/a", "m1/b", "m1/c"], "every recipient is asked about, {attempt:?}");
        }
    }

    #[test]
    fn a_job_seen_before_routes_nobody_while_pending_is_unknown() {
        let j = job(&["a", "b"]);
        assert_eq!(route_to(&j, users(&["a"]), REDELIVERED, None), users(&[]));
        assert_eq!(route_to(&j, users(&["a"]), INTERRUPTED, None), users(&[]));
        let stored = verdict(&j, Stored::New(users(&["a"])), REDELIVERED, None, 5);
        assert_eq!(stored, Verdict::Stored { route: vec![] }, "still stored and acked: the sweep resends");
    }

    #[test]
    fn only_stored_jobs_seen_before_ask_for_receipt_states() {
        let j = job(&["a"]);
        assert!(receipts_to_check(&j, &Stored::Conflict, REDELIVERED).is_empty());
        assert!(receipts_to_check(&j, &Stored::Failed("x".into()), INTERRUPTED).is_empty());
    }

    #[test]
    fn a_stored_job_is_routed_by_the_same_rule() {
        let j = job(&["a", "b"]);
        let first = verdict(&j, Stored::New(users(&["b"])), FIRST, None, 5);
        assert_eq!(first, Verdict::Stored { route: users(&["b"]) });
        let again = verdict(&j, Stored::New(vec![]), REDELIVERED, Some(&pending(&["a"])), 5);
        assert_eq!(again, Verdict::Stored { route: users(&["a"]) });
    }

    #[test]
    fn refusals_retry_with_a_growing_delay_then_dead_letter_and_conflicts_are_rejected() {
        let j = job(&["a"]);
        let attempt = |delivered| Attempt { delivered, interrupted: false };
        let failed = || Stored::Failed("x".into());
        let retry = |delay| Verdict::Retry { delay: Duration::from_secs(delay), reason: "x".into() };
        assert_eq!(verdict(&j, failed(), attempt(1), None, 5), retry(1));
        assert_eq!(verdict(&j, failed(), attempt(3), None, 5), retry(3));
        assert_eq!(verdict(&j, failed(), attempt(4), None, 5), retry(4));
        assert_eq!(verdict(&j, failed(), attempt(5), None, 5), Verdict::DeadLetter { reason: "x".into() });
        assert_eq!(verdict(&j, failed(), attempt(45), None, 50), retry(30), "the delay is capped at 30 s");
        let interrupted = Attempt { delivered: 5, interrupted: true };
        assert_eq!(verdict(&j, failed(), interrupted, None, 5), Verdict::DeadLetter { reason: "x".into() });
        assert_eq!(verdict(&j, Stored::Conflict, attempt(1), None, 5), Verdict::Conflict);
        assert_eq!(verdict(&j, Stored::Conflict, attempt(9), None, 5), Verdict::Conflict, "never dead-lettered");
    }

    #[test]
    fn the_store_answer_is_paired_with_the_jobs_in_order() {
        let paired = pair(vec!["j1", "j2"], vec![Stored::Conflict, Stored::New(users(&["a"]))]);
        assert_eq!(paired, vec![("j1", Stored::Conflict), ("j2", Stored::New(users(&["a"])))]);
    }

    #[test]
    fn a_store_answer_of_the_wrong_length_stores_no_job() {
        let short = pair(vec!["j1", "j2"], vec![Stored::New(users(&["a"]))]);
        assert_eq!(short.len(), 2);
        assert!(short.iter().all(|(_, s)| matches!(s, Stored::Failed(_))), "{short:?}");
        let long = pair(vec!["j1"], vec![Stored::Conflict, Stored::Conflict]);
        assert!(matches!(long.as_slice(), [("j1", Stored::Failed(_))]), "{long:?}");
    }
}
