//! The JetStream streams Herald relies on. Every process ensures they exist at start-up, so no
//! process has to be started first, and applies the configured limits of the jobs and events
//! streams to them (to an existing stream too). It never changes what a stream stores or how it
//! keeps it (subjects, retention, storage): a stream that differs there is an error to fix by hand.
//!
//! Invariant 1 (nothing published to a user is lost) decides how a full stream behaves: the jobs
//! and events streams refuse a new message (`DiscardPolicy::New`; the publisher gets an error and
//! retries) and never drop an old one to make room.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::naming::Names;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("jetstream stream {stream}: {source}")]
    Create {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("jetstream stream {stream}: applying the configured limits: {source}")]
    Update {
        stream: String,
        #[source]
        source: jetstream::context::UpdateStreamError,
    },
    /// Not retried: only an operator can fix it.
    #[error(
        "jetstream stream {stream} exists with settings Herald cannot use ({problem}); Herald never changes \
         them: fix the stream or remove it (its messages with it) and let Herald create it"
    )]
    Incompatible { stream: String, problem: String },
}

/// How long JetStream remembers a job id to drop a second publish with the same `Nats-Msg-Id`.
/// Beyond it, the receipt store's unique keys still keep one message per id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long rejections and dead letters stay readable.
pub const REJECTED_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// Shortest max age of the jobs and events streams: JetStream refuses one below the duplicate
/// window (two minutes, ours on jobs and the server's default on events).
pub const MIN_MAX_AGE: Duration = DUPLICATE_WINDOW;
/// Smallest max bytes of the jobs and events streams: NATS's default largest message (1 MiB),
/// so that a stream that is empty always takes the largest job or batch of acks.
pub const MIN_MAX_BYTES: u64 = 1024 * 1024;

/// Limits Herald sets on one of its work streams. `None`: Herald leaves that limit alone (a
/// stream it creates has none; an existing stream keeps its own, one an operator set say).
/// `Some(0)` (`Some(Duration::ZERO)`): no limit, removing one the stream has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Messages older than this are removed, consumed or not.
    pub max_age: Option<Duration>,
    /// Bytes the stream holds at most (per replica); when full it refuses new messages.
    pub max_bytes: Option<u64>,
}

/// The limits of the jobs and events streams (`HERALD_JOBS_*`, `HERALD_EVENTS_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamLimits {
    pub jobs: Limits,
    pub events: Limits,
}

/// [`ensure`] at start-up, retried with backoff for up to [`crate::connect::STARTUP_TIMEOUT`]:
/// right after a NATS cluster restarts, a stream has no leader for seconds and requests about
/// it time out. A process starting then waits for the leader; exiting on the first timeout
/// (chaos finding 10) left the fleet without dispatchers until the orchestrator's next restart.
/// An incompatible stream is reported at once: waiting does not fix it.
pub async fn ensure_at_startup(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
    limits: &StreamLimits,
) -> Result<(), StreamError> {
    retried_at_startup("nats: jetstream streams", names.jobs_stream(), || ensure(js, names, replicas, limits)).await
}

/// Runs `ensure` until it succeeds, retrying for up to [`crate::connect::STARTUP_TIMEOUT`]
/// everything but an incompatible stream; a timeout is reported against `stream`.
async fn retried_at_startup<F, Fut>(dependency: &'static str, stream: String, ensure: F) -> Result<(), StreamError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), StreamError>>,
{
    use crate::connect::{wait_for, Waited};
    let attempt = || async {
        match ensure().await {
            Err(e @ StreamError::Incompatible { .. }) => Ok(Err(e)),
            other => other.map(Ok),
        }
    };
    wait_for(dependency, attempt).await.map_err(|waited| match waited {
        Waited::Failed(e) => e,
        Waited::TimedOut => StreamError::Create {
            stream,
            source: jetstream::context::CreateStreamError::new(jetstream::context::CreateStreamErrorKind::TimedOut),
        },
    })?
}

/// Creates the jobs, events and rejected streams when missing, then brings the limits of an
/// existing jobs or events stream to `limits` (see [`plan`]). File storage: jobs and acks
/// survive a NATS restart.
pub async fn ensure(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
    limits: &StreamLimits,
) -> Result<(), StreamError> {
    for (wanted, managed) in configs(names, replicas, limits) {
        let name = wanted.name.clone();
        let stream = js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|source| StreamError::Create { stream: name.clone(), source })?;
        match plan(&stream.cached_info().config, &wanted, &managed) {
            Plan::Keep => {}
            Plan::Update { config, changes } => {
                js.update_stream(&*config)
                    .await
                    .map_err(|source| StreamError::Update { stream: name.clone(), source })?;
                tracing::info!(stream = %name, changes = %changes.join(", "), "stream limits applied");
            }
            Plan::Incompatible(problem) => return Err(StreamError::Incompatible { stream: name, problem }),
        }
    }
    Ok(())
}

/// Creates the topics stream when missing, and brings an existing one's retention to
/// `retention`. Unlike the work streams, it drops its oldest messages when full (a topic message
/// is at most once, recoverable within the retention: what falls out of it is what a client
/// is told it did not recover) and it deduplicates by `Nats-Msg-Id`, the message id, so that a
/// dispatcher that publishes a topic job again (after a crash, before its ack) adds nothing.
pub async fn ensure_topics(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
    retention: &crate::config::TopicRetention,
) -> Result<(), StreamError> {
    let wanted = topics_config(names, replicas, retention);
    let name = wanted.name.clone();
    let stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|source| StreamError::Create { stream: name.clone(), source })?;
    let existing = &stream.cached_info().config;
    if existing.subjects != wanted.subjects || existing.retention != wanted.retention {
        return Err(StreamError::Incompatible {
            stream: name,
            problem: format!("subjects {:?} and retention {:?}", existing.subjects, existing.retention),
        });
    }
    if existing.max_age != wanted.max_age || existing.max_messages != wanted.max_messages {
        let mut config = existing.clone();
        (config.max_age, config.max_messages) = (wanted.max_age, wanted.max_messages);
        js.update_stream(&config).await.map_err(|source| StreamError::Update { stream: name.clone(), source })?;
        tracing::info!(stream = %name, max_age = ?wanted.max_age, max_msgs = wanted.max_messages, "topics retention applied");
    }
    Ok(())
}

/// [`ensure_topics`] at start-up, retried as [`ensure_at_startup`] retries.
pub async fn ensure_topics_at_startup(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
    retention: &crate::config::TopicRetention,
) -> Result<(), StreamError> {
    retried_at_startup("nats: topics stream", names.topics_stream(), || ensure_topics(js, names, replicas, retention))
        .await
}

/// The topics stream as Herald creates it.
pub fn topics_config(names: &Names, replicas: usize, retention: &crate::config::TopicRetention) -> stream::Config {
    stream::Config {
        name: names.topics_stream(),
        subjects: vec![names.topics_subjects()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: retention.max_age,
        max_messages: retention.max_msgs,
        duplicate_window: DUPLICATE_WINDOW.min(retention.max_age),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The three streams as Herald creates them, each with the limits it manages on them (none on
/// the rejected stream, whose retention is fixed).
pub fn configs(names: &Names, replicas: usize, limits: &StreamLimits) -> [(stream::Config, Limits); 3] {
    let work = |name, subject, limits: &Limits, duplicate_window| stream::Config {
        name,
        subjects: vec![subject],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // A full stream refuses what comes: the publisher learns and retries. Old would drop
        // jobs and acks that were accepted.
        discard: stream::DiscardPolicy::New,
        max_age: limits.max_age.unwrap_or(Duration::ZERO),
        max_bytes: limits.max_bytes.map_or(0, bytes_limit),
        duplicate_window,
        num_replicas: replicas,
        ..Default::default()
    };
    [
        (work(names.jobs_stream(), names.jobs_subjects(), &limits.jobs, DUPLICATE_WINDOW), limits.jobs),
        // Zero: the server's default window.
        (work(names.events_stream(), names.events_subjects(), &limits.events, Duration::ZERO), limits.events),
        (
            stream::Config {
                name: names.rejected_stream(),
                subjects: vec![names.rejected_subject(), names.dead_letter_subject()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: REJECTED_MAX_AGE,
                num_replicas: replicas,
                ..Default::default()
            },
            Limits::default(),
        ),
    ]
}

/// JetStream's `max_bytes`: -1 for no limit.
fn bytes_limit(bytes: u64) -> i64 {
    if bytes == 0 {
        -1
    } else {
        i64::try_from(bytes).unwrap_or(i64::MAX)
    }
}

/// What [`ensure`] does with a stream that exists.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// It is as it should be.
    Keep,
    /// Update it to `config`: its own settings with the managed limits (and the discard policy
    /// they need) changed. `changes` says what changes, for the log.
    Update { config: Box<stream::Config>, changes: Vec<String> },
    /// It stores other subjects, or keeps its messages otherwise, than Herald needs.
    Incompatible(String),
}

/// Decides what to do with the `existing` stream, given the stream Herald would create
/// (`wanted`) and the limits it manages on it. Only those limits change, and the discard policy
/// when Herald wants `New` and the stream has a limit it applies to (bytes or messages, set by
/// anyone): a full work stream must refuse, not drop. Replicas and the rest stay as they are.
pub fn plan(existing: &stream::Config, wanted: &stream::Config, managed: &Limits) -> Plan {
    let sorted = |subjects: &[String]| {
        let mut subjects = subjects.to_vec();
        subjects.sort();
        subjects
    };
    let mut problems = Vec::new();
    if sorted(&existing.subjects) != sorted(&wanted.subjects) {
        problems.push(format!("subjects {:?}, Herald needs {:?}", existing.subjects, wanted.subjects));
    }
    if existing.retention != wanted.retention {
        problems.push(format!("retention {:?}, Herald needs {:?}", existing.retention, wanted.retention));
    }
    if existing.storage != wanted.storage {
        problems.push(format!("storage {:?}, Herald needs {:?}", existing.storage, wanted.storage));
    }
    if !problems.is_empty() {
        return Plan::Incompatible(problems.join("; "));
    }

    let mut config = existing.clone();
    let mut changes = Vec::new();
    if let Some(age) = managed.max_age.filter(|age| *age != existing.max_age) {
        changes.push(format!("max_age {:?} -> {age:?}", existing.max_age));
        config.max_age = age;
    }
    // An existing stream reports no limit as -1; one created without a value sent 0.
    let no_limit = |bytes: i64| bytes <= 0;
    if let Some(bytes) = managed.max_bytes.map(bytes_limit) {
        if bytes != existing.max_bytes && !(no_limit(bytes) && no_limit(existing.max_bytes)) {
            changes.push(format!("max_bytes {} -> {bytes}", existing.max_bytes));
            config.max_bytes = bytes;
        }
    }
    let limited = config.max_bytes > 0 || config.max_messages > 0 || config.max_messages_per_subject > 0;
    if wanted.discard == stream::DiscardPolicy::New && limited && config.discard != stream::DiscardPolicy::New {
        changes.push(format!("discard {:?} -> New", config.discard));
        config.discard = stream::DiscardPolicy::New;
    }
    if changes.is_empty() {
        Plan::Keep
    } else {
        Plan::Update { config: Box::new(config), changes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(limits: Limits) -> (stream::Config, Limits) {
        let names = Names::new("t");
        let [jobs, ..] = configs(&names, 1, &StreamLimits { jobs: limits, events: Limits::default() });
        jobs
    }

    /// A jobs stream as an older Herald created it and the server reports it: no limits, the
    /// default discard policy.
    fn old_jobs_stream() -> stream::Config {
        let (mut config, _) = wanted(Limits::default());
        config.discard = stream::DiscardPolicy::Old;
        config.max_bytes = -1;
        config.max_messages = -1;
        config.max_messages_per_subject = -1;
        config.num_replicas = 3;
        config
    }

    #[test]
    fn new_work_streams_refuse_when_full_and_carry_only_the_limits_set() {
        let limits = Limits { max_age: Some(Duration::from_secs(3600)), max_bytes: Some(MIN_MAX_BYTES) };
        let (jobs, managed) = wanted(limits);
        assert_eq!(managed, limits);
        assert_eq!(jobs.discard, stream::DiscardPolicy::New);
        assert_eq!((jobs.max_age, jobs.max_bytes), (Duration::from_secs(3600), MIN_MAX_BYTES as i64));
        assert_eq!(jobs.duplicate_window, DUPLICATE_WINDOW);
        let (jobs, _) = wanted(Limits::default());
        assert_eq!((jobs.max_age, jobs.max_bytes), (Duration::ZERO, 0), "unset: as before, no limit");
        let [_, _, (rejected, managed)] = configs(&Names::new("t"), 1, &StreamLimits::default());
        assert_eq!((rejected.max_age, managed), (REJECTED_MAX_AGE, Limits::default()));
        assert_eq!(rejected.discard, stream::DiscardPolicy::Old);
    }

    #[test]
    fn an_old_stream_is_left_alone_when_no_limit_is_configured() {
        let (want, managed) = wanted(Limits::default());
        assert_eq!(plan(&old_jobs_stream(), &want, &managed), Plan::Keep);
        // Nor is one whose limits an operator set by hand, with the right discard policy.
        let mut by_hand = old_jobs_stream();
        (by_hand.max_bytes, by_hand.discard, by_hand.max_age) =
            (1 << 30, stream::DiscardPolicy::New, Duration::from_secs(86_400));
        assert_eq!(plan(&by_hand, &want, &managed), Plan::Keep);
    }

    #[test]
    fn configured_limits_are_applied_to_an_old_stream_and_it_refuses_when_full() {
        let limits = Limits { max_age: Some(Duration::from_secs(7200)), max_bytes: Some(8 << 20) };
        let (want, managed) = wanted(limits);
        let Plan::Update { config, changes } = plan(&old_jobs_stream(), &want, &managed) else {
            panic!("expected an update")
        };
        assert_eq!((config.max_age, config.max_bytes), (Duration::from_secs(7200), 8 << 20));
        assert_eq!(config.discard, stream::DiscardPolicy::New);
        assert_eq!(config.num_replicas, 3, "replicas stay the stream's own");
        assert_eq!(config.duplicate_window, DUPLICATE_WINDOW);
        assert_eq!(changes.len(), 3, "{changes:?}");
        // Applied, nothing more to do.
        assert_eq!(plan(&config, &want, &managed), Plan::Keep);
    }

    #[test]
    fn zero_removes_a_limit_and_matches_a_stream_without_one() {
        let (want, managed) = wanted(Limits { max_age: Some(Duration::ZERO), max_bytes: Some(0) });
        assert_eq!(plan(&old_jobs_stream(), &want, &managed), Plan::Keep);
        let mut limited = old_jobs_stream();
        (limited.max_bytes, limited.max_age) = (1 << 30, Duration::from_secs(60));
        let Plan::Update { config, .. } = plan(&limited, &want, &managed) else { panic!("expected an update") };
        assert_eq!((config.max_bytes, config.max_age), (-1, Duration::ZERO));
    }

    #[test]
    fn a_work_stream_that_would_drop_old_messages_is_made_to_refuse_new_ones() {
        // An operator capped the stream with the default discard policy: accepted jobs would go.
        let mut capped = old_jobs_stream();
        capped.max_messages = 1_000_000;
        let (want, managed) = wanted(Limits::default());
        let Plan::Update { config, changes } = plan(&capped, &want, &managed) else { panic!("expected an update") };
        assert_eq!((config.discard, config.max_messages), (stream::DiscardPolicy::New, 1_000_000));
        assert_eq!(changes, ["discard Old -> New"]);
        // The rejected stream is a log, not work: dropping its oldest entries is how it is kept.
        let [_, _, (rejected, managed)] = configs(&Names::new("t"), 1, &StreamLimits::default());
        let mut capped = rejected.clone();
        capped.max_bytes = 1 << 30;
        assert_eq!(plan(&capped, &rejected, &managed), Plan::Keep);
    }

    #[test]
    fn other_subjects_retention_or_storage_are_an_error_not_a_change() {
        let (want, managed) = wanted(Limits { max_age: None, max_bytes: Some(MIN_MAX_BYTES) });
        let mut limits_retention = old_jobs_stream();
        limits_retention.retention = stream::RetentionPolicy::Limits;
        let Plan::Incompatible(problem) = plan(&limits_retention, &want, &managed) else { panic!("expected an error") };
        assert!(problem.contains("retention Limits, Herald needs WorkQueue"), "{problem}");
        let mut other = old_jobs_stream();
        other.subjects = vec!["elsewhere.>".into()];
        other.storage = stream::StorageType::Memory;
        let Plan::Incompatible(problem) = plan(&other, &want, &managed) else { panic!("expected an error") };
        assert!(problem.contains("subjects") && problem.contains("storage Memory"), "{problem}");
        // The same subjects in another order are the same stream.
        let [_, _, (rejected, managed)] = configs(&Names::new("t"), 1, &StreamLimits::default());
        let mut reordered = rejected.clone();
        reordered.subjects.reverse();
        assert_eq!(plan(&reordered, &rejected, &managed), Plan::Keep);
    }
}
