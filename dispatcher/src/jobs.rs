//! The publish-job pipeline: pull a batch from JetStream, validate, store the inbox records,
//! look up presence, route, and only then acknowledge the batch.
//!
//! Ordering is the whole point: receipts are durable (pending) **before** presence is read, and
//! a job is acked to JetStream only after its receipts are durable, so a crash anywhere means a
//! redelivery, never a loss. Store and presence outages are waited out (the batch is held, its
//! ack deadline extended); a job the store refuses for good is retried a bounded number of times
//! and then dead-lettered so the queue keeps moving.
//!
//! A batch is one `Vec<Job<S>>` from stage to stage, each job carrying what its last stage made
//! of it (`()` → [`Stored`] → [`Verdict`]); the rules (whom to route, retry or dead-letter) are
//! the pure functions in `jobs::rules` ([`verdict`], [`route_to`]); the I/O stays here.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, Message};
use herald_proto::{RejectCode, Rejection, UserId};
use herald_shared::naming::Names;
use herald_shared::Clock;
use tokio_util::sync::CancellationToken;

use crate::metrics::{observe_each, DispatcherMetrics};
use crate::presence::{Connections, PresenceReader};
use crate::pull;
use crate::routing::{self, Router};
use crate::store::{DeadLetterDoc, Store, Stored};
use herald_publish::validate::{self as job, Invalid, JobMeta, Limits, ValidJob};

mod rules;
mod topic;

use rules::pair;
pub use rules::{receipts_to_check, route_to, verdict, Attempt, Verdict};

/// The store refusing jobs, logged once per outage (every held batch retries).
static STORE_OUTAGE: herald_shared::outage::Outage = herald_shared::outage::Outage::new("mongodb: jobs");

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

/// A job as pulled from the stream: the message and what JetStream says of its delivery.
struct Pulled {
    message: Message,
    /// This job's span: a child of the publisher's trace when it sent `traceparent`.
    span: tracing::Span,
    delivered: u64,
    stream_seq: u64,
}

/// One valid job on its way through the pipeline, carrying what its last stage made of it:
/// nothing yet (`()`), then what the store did ([`Stored`]), then what to do ([`Verdict`]).
struct Job<S = ()> {
    pulled: Pulled,
    valid: ValidJob,
    stage: S,
}

/// What reading a pulled message found.
enum Read {
    Valid(Job),
    Invalid(Pulled, Invalid),
}

impl JobPipeline {
    /// Pulls and processes batches until `stop` fires; the batch in hand is finished first.
    pub async fn run(self, stop: CancellationToken) {
        let stream = self.names.jobs_stream();
        pull::run(
            &self.js,
            &stream,
            self.names.jobs_consumer(),
            self.ack_wait,
            self.batching,
            &stop,
            |batch, waits| {
                self.metrics.job_stages.waited(&waits);
                self.process(batch, &stop)
            },
        )
        .await;
    }

    /// One batch through its stages: read → reject the invalid → store → decide → route →
    /// settle with JetStream.
    async fn process(&self, messages: Vec<Message>, stop: &CancellationToken) {
        self.metrics.job_batch_size.observe(messages.len() as f64);
        let mut jobs = Vec::with_capacity(messages.len());
        let mut invalid = Vec::new();
        let mut topic_jobs = Vec::new();
        for message in messages {
            match self.read(message) {
                Read::Valid(job) => match job.valid.topic.clone() {
                    Some(topic) => topic_jobs.push((job, topic)),
                    None => jobs.push(job),
                },
                Read::Invalid(pulled, why) => invalid.push((pulled, why)),
            }
        }
        for (pulled, why) in invalid {
            self.reject(&pulled, why).await;
        }
        // Neither stored per recipient nor routed: each goes once to the topics stream.
        self.topic_jobs(topic_jobs).await;
        if jobs.is_empty() {
            return;
        }

        let storing = Instant::now();
        let (jobs, interrupted) = match self.insert_until_stored(jobs, stop).await {
            Ok(stored) => {
                observe_each(&self.metrics.job_stages.store, storing.elapsed(), stored.0.len());
                stored
            }
            Err(jobs) => {
                // Shutting down during a store outage: hand the jobs back for redelivery.
                ack_each(&jobs, AckKind::Nak(None)).await;
                return;
            }
        };
        let pending = self.pending_receipts(&jobs, interrupted).await;
        let jobs: Vec<Job<Verdict>> = jobs
            .into_iter()
            .map(|Job { pulled, valid, stage: stored }| {
                let attempt = Attempt { delivered: pulled.delivered, interrupted };
                let stage = verdict(&valid, stored, attempt, pending.as_ref(), self.max_attempts);
                Job { pulled, valid, stage }
            })
            .collect();

        let routing = Instant::now();
        if !self.route(&jobs, stop).await {
            // Shutting down while presence is unreadable. The receipts are stored, so acking
            // would lose nothing, but the messages would then wait for the ack-timeout sweep.
            // Handed back, the jobs go to a dispatcher that stays (or to this one restarted),
            // which routes every recipient of a redelivered job as soon as Redis answers.
            ack_each(&jobs, AckKind::Nak(None)).await;
            return;
        }
        observe_each(&self.metrics.job_stages.route, routing.elapsed(), jobs.len());
        for job in jobs {
            self.settle(job).await;
        }
    }

    fn read(&self, message: Message) -> Read {
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
        let pulled = Pulled { message, delivered, stream_seq, span };
        match outcome {
            Ok(valid) => Read::Valid(Job { pulled, valid, stage: () }),
            Err(invalid) => Read::Invalid(pulled, invalid),
        }
    }

    /// Stores the batch, waiting out transient store errors with capped backoff while keeping
    /// the jobs' ack deadlines alive. Each job comes back with what the store did with it, and
    /// whether an earlier attempt was interrupted (and may have written part of the batch); or,
    /// if `stop` fires first, the batch as it was.
    async fn insert_until_stored(
        &self,
        jobs: Vec<Job>,
        stop: &CancellationToken,
    ) -> Result<(Vec<Job<Stored>>, bool), Vec<Job>> {
        // One span per job, open for as long as its batch is being stored.
        let _spans: Vec<tracing::Span> =
            jobs.iter().map(|j| tracing::info_span!(parent: &j.pulled.span, "herald.store")).collect();
        // The store takes the jobs as one slice; what it answers is paired back by `pair`.
        let valid: Vec<&ValidJob> = jobs.iter().map(|j| &j.valid).collect();
        let mut backoff = Duration::from_millis(100);
        let mut interrupted = false;
        loop {
            match self.store.insert(&valid, self.clock.now_ms(), self.ack_timeout).await {
                Ok(stored) => {
                    STORE_OUTAGE.answered();
                    let written: usize =
                        stored.iter().map(|s| if let Stored::New(users) = s { users.len() } else { 0 }).sum();
                    self.metrics.receipt_writes.with_label_values(&["insert"]).inc_by(written as u64);
                    self.metrics.store_batch_size.with_label_values(&["insert"]).observe(valid.len() as f64);
                    let jobs = pair(jobs, stored).into_iter().map(|(job, stored)| job.then(stored)).collect();
                    return Ok((jobs, interrupted));
                }
                Err(e) if e.is_transient() => {
                    interrupted = true;
                    self.metrics.jobs.with_label_values(&["retried"]).inc_by(valid.len() as u64);
                    STORE_OUTAGE.failed(&format_args!("{e} (holding {} jobs)", valid.len()));
                }
                Err(e) => {
                    // A whole-batch permanent error (not per document): nothing was stored.
                    // Treat every job as failed once; `verdict` bounds the retries.
                    tracing::error!(error = %e, "store refused the batch");
                    let failed = jobs.into_iter().map(|j| j.then(Stored::Failed(e.to_string()))).collect();
                    return Ok((failed, interrupted));
                }
            }
            ack_each(&jobs, AckKind::Progress).await;
            if !pull::sleep_or_stop(&mut backoff, stop).await {
                return Err(jobs);
            }
        }
    }

    /// Which receipts of the batch's jobs seen before are still pending, as [`route_to`] needs
    /// them: asked in one query for the batch. None if the store does not answer.
    async fn pending_receipts(&self, jobs: &[Job<Stored>], interrupted: bool) -> Option<HashSet<String>> {
        let keys: Vec<String> = jobs
            .iter()
            .flat_map(|j| {
                let attempt = Attempt { delivered: j.pulled.delivered, interrupted };
                receipts_to_check(&j.valid, &j.stage, attempt)
            })
            .collect();
        if keys.is_empty() {
            return Some(HashSet::new());
        }
        match self.store.pending_keys(&keys).await {
            Ok(pending) => Some(pending),
            Err(e) => {
                tracing::warn!(error = %e, "receipt states unknown; the sweep resends what is pending");
                None
            }
        }
    }

    /// Routes the stored jobs to the gateways holding their recipients. Returns false if `stop`
    /// fired while presence could not be read (nothing was routed then).
    async fn route(&self, jobs: &[Job<Verdict>], stop: &CancellationToken) -> bool {
        let routed: Vec<(&Job<Verdict>, &[UserId])> = jobs
            .iter()
            .filter_map(|j| match &j.stage {
                Verdict::Stored { route } if !route.is_empty() => Some((j, route.as_slice())),
                _ => None,
            })
            .collect();
        if routed.is_empty() {
            return true;
        }
        let lookup_spans: Vec<tracing::Span> =
            routed.iter().map(|(j, _)| tracing::info_span!(parent: &j.pulled.span, "herald.presence")).collect();
        let mut users: Vec<&UserId> = routed.iter().flat_map(|(_, u)| u.iter()).collect();
        users.sort_unstable();
        users.dedup();
        let Some(presence) = self.read_presence_until_answered(&users, jobs, stop).await else {
            return false;
        };
        drop(lookup_spans);
        // Held to the end: each job's route span stays open until its commands are sent.
        let outgoing: Vec<Outgoing<'_>> = routed.iter().map(|(j, users)| Outgoing::new(j, users)).collect();
        let plan = routing::plan(outgoing.iter().map(Outgoing::item), &presence);
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
        jobs: &[Job<Verdict>],
        stop: &CancellationToken,
    ) -> Option<HashMap<UserId, Connections>> {
        let mut backoff = Duration::from_millis(100);
        let mut held_since: Option<tokio::time::Instant> = None;
        loop {
            let lookup = self.presence.lookup(users);
            match self.metrics.dependencies.time("redis", "presence_lookup", lookup).await {
                Ok(presence) => {
                    if let Some(since) = held_since {
                        tracing::info!(jobs = jobs.len(), held = ?since.elapsed(), "presence answers again; routing");
                    }
                    return Some(presence);
                }
                Err(e) if held_since.is_none() => {
                    held_since = Some(tokio::time::Instant::now());
                    self.metrics.routing.with_label_values(&["presence_unavailable"]).inc_by(users.len() as u64);
                    tracing::warn!(error = %e, jobs = jobs.len(), "presence unavailable; holding the jobs and retrying");
                }
                Err(e) => tracing::debug!(error = %e, "presence still unavailable"),
            }
            ack_each(jobs, AckKind::Progress).await;
            if !pull::sleep_or_stop(&mut backoff, stop).await {
                return None;
            }
        }
    }

    /// Tells JetStream what became of a job: acked once stored and routed, rejected, handed back
    /// with a delay, or dead-lettered.
    async fn settle(&self, job: Job<Verdict>) {
        let Job { pulled, valid, stage } = job;
        match stage {
            Verdict::Stored { .. } => {
                self.metrics.jobs.with_label_values(&["stored"]).inc();
                if let Err(e) = pulled.message.ack().await {
                    tracing::warn!(error = %e, seq = pulled.stream_seq, "job ack failed; it will be redelivered");
                }
            }
            Verdict::Conflict => {
                let reason = format!(
                    "id {:?} is taken by a message with other content (payload, recipients or ttl_secs)",
                    valid.message_id.as_str()
                );
                let invalid =
                    Invalid { job_id: Some(valid.message_id.to_string()), code: RejectCode::IdConflict, reason };
                self.reject(&pulled, invalid).await;
            }
            Verdict::Retry { delay, reason } => {
                tracing::warn!(seq = pulled.stream_seq, attempt = pulled.delivered, %reason, "job not stored; will retry");
                self.metrics.jobs.with_label_values(&["retried"]).inc();
                let _ = pulled.message.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Verdict::DeadLetter { reason } => self.dead_letter(&pulled, &valid, &reason).await,
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

/// Keeps `herald_jetstream_pending_jobs` and `herald_jetstream_pending_events` current: the jobs
/// and the gateways' events no dispatcher has taken yet. A failed poll leaves the last value; the
/// loop ends only when `stop` fires.
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
        if let Some(pending) = pull::num_pending(&js, &names.jobs_stream(), names.jobs_consumer(), ack_wait).await {
            metrics.pending_jobs.set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        if let Some(pending) = pull::num_pending(&js, &names.events_stream(), names.events_consumer(), ack_wait).await {
            metrics.pending_events.set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
    }
}

impl<S> Job<S> {
    /// The same job, on to its next stage.
    fn then<T>(self, stage: T) -> Job<T> {
        Job { pulled: self.pulled, valid: self.valid, stage }
    }
}

/// Acknowledges each job of a batch the same way, in order: progress while the batch is held,
/// or a Nak to hand it back. A failed ack is left to the ack wait.
async fn ack_each<S>(jobs: &[Job<S>], kind: AckKind) {
    for job in jobs {
        let _ = job.pulled.message.ack_with(kind).await;
    }
}

/// One job's notification on its way to the gateways, under its route span.
struct Outgoing<'a> {
    notification: herald_proto::Notification,
    users: &'a [UserId],
    traceparent: Option<String>,
    /// Open until the batch's commands are sent (the owner drops it at the end of `route`).
    _span: tracing::Span,
}

impl<'a> Outgoing<'a> {
    fn new(job: &Job<Verdict>, users: &'a [UserId]) -> Self {
        let span = tracing::info_span!(parent: &job.pulled.span, "herald.route");
        let valid = &job.valid;
        Outgoing {
            notification: herald_proto::Notification {
                id: valid.message_id.clone(),
                seq: valid.seq,
                payload: valid.payload.clone(),
                published_at_ms: valid.published_at_ms,
                expires_at_ms: valid.expires_at_ms,
            },
            users,
            traceparent: herald_shared::telemetry::traceparent(&span),
            _span: span,
        }
    }

    fn item(&self) -> routing::Item<'_> {
        routing::Item { notification: &self.notification, users: self.users, traceparent: self.traceparent.as_deref() }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
