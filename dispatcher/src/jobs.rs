//! The publish-job pipeline: pull a batch from JetStream, validate, store the inbox records,
//! look up presence, route, and only then acknowledge the batch.
//!
//! Ordering is the whole point: receipts are durable (pending) **before** presence is read, and
//! a job is acked to JetStream only after its receipts are durable, so a crash anywhere means a
//! redelivery, never a loss. Store and presence outages are waited out (the batch is held, its
//! ack deadline extended); a job the store refuses for good is retried a bounded number of times
//! and then dead-lettered so the queue keeps moving.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, Message};
use herald_proto::{RejectCode, Rejection, UserId};
use herald_shared::naming::Names;
use herald_shared::Clock;
use tokio_util::sync::CancellationToken;

use crate::metrics::DispatcherMetrics;
use crate::presence::{Connections, PresenceReader};
use crate::pull;
use crate::routing::{self, Router};
use crate::store::{DeadLetterDoc, Store, Stored};
use herald_publish::validate::{self as job, Invalid, JobMeta, Limits, ValidJob};

/// Everything one job worker needs.
#[derive(Clone)]
pub struct JobPipeline {
    pub js: jetstream::Context,
    pub names: Names,
    pub store: Store,
    pub presence: PresenceReader,
    pub router: Router,
    pub limits: Limits,
    pub ack_timeout: Duration,
    pub batching: pull::Batching,
    pub max_attempts: u64,
    /// How long a pulled job may stay unacknowledged before JetStream gives it to another
    /// dispatcher (what a crashed dispatcher costs in delay). Long store waits keep it alive
    /// with progress acks.
    pub ack_wait: Duration,
    pub metrics: std::sync::Arc<DispatcherMetrics>,
    /// This host's wall clock: receipt times, rejection times.
    pub clock: Clock,
}

/// A job as pulled from the stream, with what was read of it.
struct Pulled {
    message: Message,
    /// This job's span: a child of the publisher's trace when it sent `traceparent`.
    span: tracing::Span,
    delivered: u64,
    outcome: Result<ValidJob, Invalid>,
    stream_seq: u64,
}

impl JobPipeline {
    /// Pulls and processes batches until `stop` fires; the batch in hand is finished first.
    pub async fn run(self, stop: CancellationToken) {
        let stream = self.names.jobs_stream();
        pull::run(&self.js, &stream, self.names.jobs_consumer(), self.ack_wait, self.batching, &stop, |batch| {
            self.process(batch, &stop)
        })
        .await;
    }

    async fn process(&self, messages: Vec<Message>, stop: &CancellationToken) {
        self.metrics.job_batch_size.observe(messages.len() as f64);
        let pulled: Vec<Pulled> = messages.into_iter().map(|m| self.read(m)).collect();
        let (valid, invalid): (Vec<Pulled>, Vec<Pulled>) = pulled.into_iter().partition(|p| p.outcome.is_ok());

        for job in invalid {
            if let Err(invalid) = &job.outcome {
                self.reject(&job, invalid.clone()).await;
            }
        }
        if valid.is_empty() {
            return;
        }
        let jobs: Vec<ValidJob> = valid.iter().filter_map(|p| p.outcome.as_ref().ok().cloned()).collect();
        let Some((stored, interrupted)) = self.insert_until_stored(&jobs, &valid, stop).await else {
            // Shutting down during a store outage: hand the jobs back for redelivery.
            for job in &valid {
                let _ = job.message.ack_with(AckKind::Nak(None)).await;
            }
            return;
        };
        let verdicts: Vec<Verdict> = jobs
            .iter()
            .zip(&valid)
            .zip(stored)
            .map(|((job, pulled), stored)| {
                verdict(job, stored, Attempt { delivered: pulled.delivered, interrupted }, self.max_attempts)
            })
            .collect();
        let verdicts = self.only_pending(&jobs, &valid, interrupted, verdicts).await;

        let routes: Vec<(usize, &[UserId])> = verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Verdict::Stored { route } if !route.is_empty() => Some((i, route.as_slice())),
                _ => None,
            })
            .collect();
        if !self.route(&jobs, &valid, &routes, stop).await {
            // Shutting down while presence is unreadable. The receipts are stored, so acking
            // would lose nothing, but the messages would then wait for the ack-timeout sweep.
            // Handed back, the jobs go to a dispatcher that stays (or to this one restarted),
            // which routes every recipient of a redelivered job as soon as Redis answers.
            for job in &valid {
                let _ = job.message.ack_with(AckKind::Nak(None)).await;
            }
            return;
        }

        for ((pulled, job), verdict) in valid.iter().zip(&jobs).zip(verdicts) {
            match verdict {
                Verdict::Stored { .. } => {
                    self.metrics.jobs.with_label_values(&["stored"]).inc();
                    if let Err(e) = pulled.message.ack().await {
                        tracing::warn!(error = %e, seq = pulled.stream_seq, "job ack failed; it will be redelivered");
                    }
                }
                Verdict::Conflict => {
                    let reason = format!(
                        "id {:?} is taken by a message with other content (payload, recipients or ttl_secs)",
                        job.message_id.as_str()
                    );
                    let invalid =
                        Invalid { job_id: Some(job.message_id.to_string()), code: RejectCode::IdConflict, reason };
                    self.reject(pulled, invalid).await;
                }
                Verdict::Retry { delay, reason } => {
                    tracing::warn!(seq = pulled.stream_seq, attempt = pulled.delivered, %reason, "job not stored; will retry");
                    self.metrics.jobs.with_label_values(&["retried"]).inc();
                    let _ = pulled.message.ack_with(AckKind::Nak(Some(delay))).await;
                }
                Verdict::DeadLetter { reason } => self.dead_letter(pulled, job, &reason).await,
            }
        }
    }

    fn read(&self, message: Message) -> Pulled {
        let (stream_seq, delivered, published_at_ms, published_at_ns) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                info.delivered.max(1) as u64,
                unix_ms(SystemTime::from(info.published)),
                u128::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
            ),
            Err(_) => (0, 1, self.clock.now_ms(), 0),
        };
        let msg_id = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_owned());
        let meta = JobMeta {
            stream_seq,
            published_at_ms,
            published_at_ns,
            subject: message.subject.as_str(),
            msg_id: msg_id.as_deref(),
        };
        let outcome = job::validate(&message.payload, &meta, &self.limits);
        let span = tracing::info_span!("herald.job", seq = stream_seq, attempt = delivered);
        herald_shared::telemetry::continue_from_headers(&span, message.headers.as_ref());
        Pulled { message, delivered, outcome, stream_seq, span }
    }

    /// Stores the batch, waiting out transient store errors with capped backoff while keeping
    /// the jobs' ack deadlines alive. None if `stop` fires first; otherwise what became of each
    /// job, and whether an earlier attempt was interrupted (and may have written part of it).
    async fn insert_until_stored(
        &self,
        jobs: &[ValidJob],
        pulled: &[Pulled],
        stop: &CancellationToken,
    ) -> Option<(Vec<Stored>, bool)> {
        // One span per job, open for as long as its batch is being stored.
        let _spans: Vec<tracing::Span> =
            pulled.iter().map(|p| tracing::info_span!(parent: &p.span, "herald.store")).collect();
        let mut backoff = Duration::from_millis(100);
        let mut interrupted = false;
        loop {
            match self.store.insert(jobs, self.clock.now_ms(), self.ack_timeout).await {
                Ok(stored) => {
                    let written: usize =
                        stored.iter().map(|s| if let Stored::New(users) = s { users.len() } else { 0 }).sum();
                    self.metrics.receipt_writes.with_label_values(&["insert"]).inc_by(written as u64);
                    self.metrics.store_batch_size.with_label_values(&["insert"]).observe(jobs.len() as f64);
                    return Some((stored, interrupted));
                }
                Err(e) if e.is_transient() => {
                    interrupted = true;
                    self.metrics.jobs.with_label_values(&["retried"]).inc_by(jobs.len() as u64);
                    tracing::warn!(error = %e, jobs = jobs.len(), "store unavailable; holding jobs and retrying");
                }
                Err(e) => {
                    // A whole-batch permanent error (not per document): nothing was stored.
                    // Treat every job as failed once; `verdict` bounds the retries.
                    tracing::error!(error = %e, "store refused the batch");
                    return Some((jobs.iter().map(|_| Stored::Failed(e.to_string())).collect(), interrupted));
                }
            }
            for job in pulled {
                let _ = job.message.ack_with(AckKind::Progress).await;
            }
            if !pull::sleep_or_stop(&mut backoff, stop).await {
                return None;
            }
        }
    }

    /// A job seen before (redelivered, or its batch's store attempt interrupted) is routed to
    /// every recipient, because an earlier attempt may have stored it without routing. Only to
    /// those whose receipt is still pending, though: one delivered, expired or cancelled since
    /// must not be sent again. Asked in one query for the batch; if the store does not answer,
    /// such a job is routed to nobody now, and the ack-timeout sweep sends what is pending.
    async fn only_pending(
        &self,
        jobs: &[ValidJob],
        pulled: &[Pulled],
        interrupted: bool,
        mut verdicts: Vec<Verdict>,
    ) -> Vec<Verdict> {
        let again: Vec<usize> = (0..jobs.len())
            .filter(|i| pulled[*i].delivered > 1 || interrupted)
            .filter(|i| matches!(&verdicts[*i], Verdict::Stored { route } if !route.is_empty()))
            .collect();
        if again.is_empty() {
            return verdicts;
        }
        let mut keys = Vec::new();
        for i in &again {
            if let Verdict::Stored { route } = &verdicts[*i] {
                keys.extend(route.iter().map(|user| crate::store::receipt_key(&jobs[*i].message_id, user)));
            }
        }
        let pending = match self.store.pending_keys(&keys).await {
            Ok(pending) => Some(pending),
            Err(e) => {
                tracing::warn!(error = %e, "receipt states unknown; the sweep resends what is pending");
                None
            }
        };
        for i in again {
            if let Verdict::Stored { route } = &mut verdicts[i] {
                let id = &jobs[i].message_id;
                route.retain(|user| pending.as_ref().is_some_and(|p| p.contains(&crate::store::receipt_key(id, user))));
            }
        }
        verdicts
    }

    /// Routes the stored jobs to the gateways holding their recipients. Returns false if `stop`
    /// fired while presence could not be read (nothing was routed then).
    async fn route(
        &self,
        jobs: &[ValidJob],
        pulled: &[Pulled],
        routes: &[(usize, &[UserId])],
        stop: &CancellationToken,
    ) -> bool {
        if routes.is_empty() {
            return true;
        }
        let lookup_spans: Vec<tracing::Span> =
            routes.iter().map(|(i, _)| tracing::info_span!(parent: &pulled[*i].span, "herald.presence")).collect();
        let notifications: Vec<_> = routes
            .iter()
            .map(|(i, _)| {
                let job = &jobs[*i];
                herald_proto::Notification {
                    id: job.message_id.clone(),
                    seq: job.seq,
                    payload: job.payload.clone(),
                    published_at_ms: job.published_at_ms,
                    expires_at_ms: job.expires_at_ms,
                }
            })
            .collect();
        let mut users: Vec<&UserId> = routes.iter().flat_map(|(_, u)| u.iter()).collect();
        users.sort_unstable();
        users.dedup();
        let Some(presence) = self.read_presence_until_answered(&users, pulled, stop).await else {
            return false;
        };
        drop(lookup_spans);
        let route_spans: Vec<tracing::Span> =
            routes.iter().map(|(i, _)| tracing::info_span!(parent: &pulled[*i].span, "herald.route")).collect();
        let traceparents: Vec<Option<String>> = route_spans.iter().map(herald_shared::telemetry::traceparent).collect();
        let items = notifications
            .iter()
            .zip(routes)
            .zip(&traceparents)
            .map(|((notification, (_, users)), tp)| routing::Item { notification, users, traceparent: tp.as_deref() });
        let plan = routing::plan(items, &presence);
        tracing::debug!(online = plan.online, offline = plan.offline.len(), "routed");
        self.metrics.routing.with_label_values(&["online"]).inc_by(plan.online as u64);
        self.metrics.routing.with_label_values(&["offline"]).inc_by(plan.offline.len() as u64);
        let failed = self.router.send(plan).await;
        self.metrics.route_failures.inc_by(failed as u64);
        true
    }

    /// Reads presence, holding the batch while Redis does not answer: the lookup is retried
    /// with capped backoff and the jobs' ack deadlines are extended, as for a store outage, so
    /// the batch is routed as soon as Redis answers again (not after the ack timeout, by the
    /// sweep). None if `stop` fires first.
    async fn read_presence_until_answered(
        &self,
        users: &[&UserId],
        pulled: &[Pulled],
        stop: &CancellationToken,
    ) -> Option<HashMap<UserId, Connections>> {
        let mut backoff = Duration::from_millis(100);
        let mut held_since: Option<tokio::time::Instant> = None;
        loop {
            let lookup = self.presence.lookup(users);
            match self.metrics.dependencies.time("redis", "presence_lookup", lookup).await {
                Ok(presence) => {
                    if let Some(since) = held_since {
                        tracing::info!(jobs = pulled.len(), held = ?since.elapsed(), "presence answers again; routing");
                    }
                    return Some(presence);
                }
                Err(e) if held_since.is_none() => {
                    held_since = Some(tokio::time::Instant::now());
                    self.metrics.routing.with_label_values(&["presence_unavailable"]).inc_by(users.len() as u64);
                    tracing::warn!(error = %e, jobs = pulled.len(), "presence unavailable; holding the jobs and retrying");
                }
                Err(e) => tracing::debug!(error = %e, "presence still unavailable"),
            }
            for job in pulled {
                let _ = job.message.ack_with(AckKind::Progress).await;
            }
            if !pull::sleep_or_stop(&mut backoff, stop).await {
                return None;
            }
        }
    }

    async fn reject(&self, job: &Pulled, invalid: Invalid) {
        let rejection = Rejection {
            job_id: invalid.job_id,
            stream_seq: job.stream_seq,
            subject: job.message.subject.to_string(),
            code: invalid.code,
            reason: invalid.reason,
            rejected_at_ms: self.clock.now_ms(),
        };
        tracing::info!(seq = job.stream_seq, code = ?rejection.code, reason = %rejection.reason, "job rejected");
        self.metrics.jobs.with_label_values(&["rejected"]).inc();
        let code = serde_json::to_value(rejection.code).ok().and_then(|v| v.as_str().map(str::to_owned));
        self.metrics.jobs_rejected.with_label_values(&[code.as_deref().unwrap_or("unknown")]).inc();
        if self.publish_rejection(&self.names.rejected_subject(), &rejection).await {
            let _ = job.message.ack_with(AckKind::Term).await;
        }
        // Otherwise leave it unacked: redelivered, rejected again, and reported then.
    }

    /// A job the store refused on every attempt: kept in the store and reported on the
    /// dead-letter subject.
    async fn dead_letter(&self, pulled: &Pulled, job: &ValidJob, reason: &str) {
        let letter = DeadLetterDoc {
            stream_seq: pulled.stream_seq as i64,
            subject: pulled.message.subject.to_string(),
            job_id: Some(job.message_id.to_string()),
            reason: reason.to_owned(),
            attempts: pulled.delivered as i64,
            body: String::from_utf8_lossy(&pulled.message.payload).into_owned(),
            dead_at: crate::store::date(self.clock.now_ms()),
        };
        if let Err(e) = self.store.dead_letter(letter).await {
            tracing::warn!(error = %e, "dead letter not stored; reported on the subject only");
        }
        let rejection = Rejection {
            job_id: Some(job.message_id.to_string()),
            stream_seq: pulled.stream_seq,
            subject: pulled.message.subject.to_string(),
            code: RejectCode::DeadLetter,
            reason: format!("not stored after {} attempts: {reason}", pulled.delivered),
            rejected_at_ms: self.clock.now_ms(),
        };
        tracing::error!(seq = pulled.stream_seq, reason, "job dead-lettered");
        self.metrics.jobs.with_label_values(&["dead_lettered"]).inc();
        if self.publish_rejection(&self.names.dead_letter_subject(), &rejection).await {
            let _ = pulled.message.ack_with(AckKind::Term).await;
        }
    }

    async fn publish_rejection(&self, subject: &str, rejection: &Rejection) -> bool {
        let Ok(body) = serde_json::to_vec(rejection) else { return false };
        match self.js.publish(subject.to_owned(), body.into()).await {
            Ok(ack) => match ack.await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "rejection not stored; job kept for redelivery");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "rejection not published; job kept for redelivery");
                false
            }
        }
    }
}

/// Keeps `herald_jetstream_pending_jobs` current: the jobs no dispatcher has taken yet. A
/// failed poll leaves the last value; the loop ends only when `stop` fires.
pub async fn report_lag(
    js: jetstream::Context,
    names: Names,
    ack_wait: Duration,
    metrics: std::sync::Arc<DispatcherMetrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(mut consumer) = pull::consumer(&js, &names.jobs_stream(), names.jobs_consumer(), ack_wait).await {
            if let Ok(info) = consumer.info().await {
                metrics.pending_jobs.set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
            }
        }
    }
}

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

/// The rule for a job after its store attempt. Whom to route: the recipients whose receipt
/// this attempt created; every recipient if the job was delivered before (an earlier attempt
/// may have stored without routing) or an earlier attempt of this batch was interrupted (it
/// may have written receipts that this attempt then found). Clients deduplicate.
pub fn verdict(job: &ValidJob, stored: Stored, attempt: Attempt, max_attempts: u64) -> Verdict {
    match stored {
        Stored::New(_) if attempt.delivered > 1 || attempt.interrupted => {
            Verdict::Stored { route: job.recipients.clone() }
        }
        Stored::New(new) => Verdict::Stored { route: new },
        Stored::Conflict => Verdict::Conflict,
        Stored::Failed(reason) if attempt.delivered < max_attempts => {
            Verdict::Retry { delay: Duration::from_secs(attempt.delivered.min(30)), reason }
        }
        Stored::Failed(reason) => Verdict::DeadLetter { reason },
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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
            payload: RawValue::from_string("1".into()).unwrap(),
            published_at_ms: 0,
            expires_at_ms: 1,
            digest: "d".into(),
        }
    }

    fn users(names: &[&str]) -> Vec<UserId> {
        names.iter().map(|u| UserId::new(*u).unwrap()).collect()
    }

    #[test]
    fn a_first_attempt_routes_what_it_created_and_a_redelivery_routes_everyone() {
        let j = job(&["a", "b"]);
        let first = Attempt { delivered: 1, interrupted: false };
        assert_eq!(verdict(&j, Stored::New(users(&["b"])), first, 5), Verdict::Stored { route: users(&["b"]) });
        let again = Attempt { delivered: 2, interrupted: false };
        assert_eq!(verdict(&j, Stored::New(vec![]), again, 5), Verdict::Stored { route: users(&["a", "b"]) });
        let interrupted = Attempt { delivered: 1, interrupted: true };
        assert_eq!(verdict(&j, Stored::New(vec![]), interrupted, 5), Verdict::Stored { route: users(&["a", "b"]) });
    }

    #[test]
    fn refusals_retry_with_a_growing_delay_then_dead_letter_and_conflicts_are_rejected() {
        let j = job(&["a"]);
        let attempt = |delivered| Attempt { delivered, interrupted: false };
        let retry = verdict(&j, Stored::Failed("x".into()), attempt(3), 5);
        assert_eq!(retry, Verdict::Retry { delay: Duration::from_secs(3), reason: "x".into() });
        assert_eq!(verdict(&j, Stored::Failed("x".into()), attempt(5), 5), Verdict::DeadLetter { reason: "x".into() });
        assert_eq!(verdict(&j, Stored::Conflict, attempt(1), 5), Verdict::Conflict);
    }
}
