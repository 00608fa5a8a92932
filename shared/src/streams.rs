//! The JetStream streams Herald relies on. Every process ensures they exist at start-up, so no
//! process has to be started first.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::naming::Names;

#[derive(Debug, thiserror::Error)]
#[error("jetstream stream {stream}: {source}")]
pub struct StreamError {
    pub stream: String,
    #[source]
    pub source: jetstream::context::CreateStreamError,
}

/// How long JetStream remembers a job id to drop a second publish with the same `Nats-Msg-Id`.
/// Beyond it, the receipt store's unique keys still keep one message per id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long rejections and dead letters stay readable.
pub const REJECTED_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

/// [`ensure`] at start-up, retried with backoff for up to [`crate::connect::STARTUP_TIMEOUT`]:
/// right after a NATS cluster restarts, a stream has no leader for seconds and requests about
/// it time out. A process starting then waits for the leader; exiting on the first timeout
/// (chaos finding 10) left the fleet without dispatchers until the orchestrator's next restart.
pub async fn ensure_at_startup(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<(), StreamError> {
    use crate::connect::{wait_for, Waited};
    wait_for("nats: jetstream streams", || ensure(js, names, replicas)).await.map_err(|waited| match waited {
        Waited::Failed(e) => e,
        Waited::TimedOut => StreamError {
            stream: names.jobs_stream(),
            source: jetstream::context::CreateStreamError::new(jetstream::context::CreateStreamErrorKind::TimedOut),
        },
    })
}

/// Creates the jobs, events and rejected streams when missing. File storage: jobs and acks
/// survive a NATS restart.
pub async fn ensure(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<(), StreamError> {
    let configs = [
        stream::Config {
            name: names.jobs_stream(),
            subjects: vec![names.jobs_subjects()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.events_stream(),
            subjects: vec![names.events_subjects()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.rejected_stream(),
            subjects: vec![names.rejected_subject(), names.dead_letter_subject()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: REJECTED_MAX_AGE,
            num_replicas: replicas,
            ..Default::default()
        },
    ];
    for config in configs {
        let name = config.name.clone();
        js.get_or_create_stream(config).await.map_err(|source| StreamError { stream: name, source })?;
    }
    Ok(())
}
