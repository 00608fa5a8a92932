//! Herald's dispatcher: consumes publish jobs and gateway events from JetStream, keeps the
//! durable inbox and receipts in MongoDB, routes notifications to the gateways holding their
//! recipients, and answers operators' questions through the query API.
//!
//! Any number of dispatchers may run; none is special. All state lives in JetStream (jobs and
//! events not yet applied), MongoDB (receipts) and Redis (presence, read-only here).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use fred::prelude::ClientLike;
use herald_shared::config::DispatcherConfig;
use herald_shared::naming::Names;
use herald_shared::{connect, shutdown, streams};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod acks;
pub mod api;
pub mod events;
pub mod job;
pub mod jobs;
pub mod metrics;
pub mod presence;
pub mod pull;
pub mod receipt;
pub mod replay;
pub mod routing;
pub mod store;
pub mod sweeper;

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    #[error(transparent)]
    Streams(#[from] streams::StreamError),
    #[error("creating indexes: {0}")]
    Indexes(#[from] store::StoreError),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
    #[error("a critical task failed; see the log")]
    TaskFailed,
    #[error("metrics: {0}")]
    Metrics(#[from] herald_shared::metrics::MetricsError),
}

/// Most gateway events applied at once (one receipt-update round trip per batch).
const EVENT_BATCH: usize = 512;

/// How long shutdown waits for in-flight batches to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs a dispatcher, with its query API on `listener`, until `shutdown` is cancelled. Then it
/// stops pulling, finishes the batches in flight (or hands them back to JetStream), and returns.
pub async fn run(
    config: DispatcherConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), DispatcherError> {
    let names = Names::new(&config.common.prefix);
    let metrics = Arc::new(metrics::DispatcherMetrics::new()?);
    // Start-up waits for the dependencies, but a shutdown request must not wait for start-up.
    let start = async {
        let db = connect::mongo(&config.mongodb_uri, &config.mongodb_database).await?;
        let redis = connect::redis(&config.common.redis_url).await?;
        let nats =
            connect::nats(&config.common.nats_url, &format!("herald-dispatcher {}", config.dispatcher_id)).await?;
        let js = jetstream::new(nats.clone());
        streams::ensure(&js, &names, config.common.jetstream_replicas).await?;
        let store = store::Store::new(db, metrics.dependencies.clone());
        store.ensure_indexes().await?;
        Ok::<_, DispatcherError>((redis, nats, js, store))
    };
    let (redis, nats, js, store) = tokio::select! {
        started = start => started?,
        _ = shutdown.cancelled() => return Ok(()),
    };

    let presence = presence::PresenceReader::new(redis.clone(), names.clone());
    let router = routing::Router::new(nats.clone(), names.clone());
    let jobs = jobs::JobPipeline {
        js: js.clone(),
        names: names.clone(),
        store: store.clone(),
        presence: presence.clone(),
        router: router.clone(),
        limits: job::Limits {
            max_payload_bytes: config.max_payload_bytes,
            max_recipients: config.max_recipients,
            default_ttl: config.default_ttl,
            max_ttl: config.max_ttl,
        },
        ack_timeout: config.ack_timeout,
        batching: pull::Batching { max: config.job_batch, linger: config.job_linger, concurrency: config.job_workers },
        max_attempts: config.max_attempts,
        ack_wait: config.ack_wait,
        metrics: Arc::clone(&metrics),
    };
    let events = events::EventPipeline {
        js: js.clone(),
        names: names.clone(),
        store: store.clone(),
        replayer: replay::Replayer {
            store: store.clone(),
            router: router.clone(),
            ack_timeout: config.ack_timeout,
            page: config.replay_page,
            metrics: Arc::clone(&metrics),
        },
        // One batch at a time: a read receipt must not overtake the ack it follows.
        batching: pull::Batching { max: EVENT_BATCH, linger: config.event_linger, concurrency: 1 },
        ack_wait: config.ack_wait,
        metrics: Arc::clone(&metrics),
    };
    let sweeper = sweeper::Sweeper {
        store: store.clone(),
        presence: presence.clone(),
        router,
        redis: redis.clone(),
        names: names.clone(),
        dispatcher_id: config.dispatcher_id.clone(),
        interval: config.sweep_interval,
        ack_timeout: config.ack_timeout,
        metrics: Arc::clone(&metrics),
    };

    // Pipelines stop pulling when `stop` fires; each ends only then, so an early end is a failure
    // that takes the process down (its jobs are redelivered to the other dispatchers).
    let tasks = TaskTracker::new();
    let failed = Arc::new(AtomicBool::new(false));
    let stop = shutdown.child_token();
    shutdown::spawn_critical(&tasks, "jobs", stop.clone(), Arc::clone(&failed), jobs.run(stop.clone()));
    shutdown::spawn_critical(&tasks, "events", stop.clone(), Arc::clone(&failed), events.run(stop.clone()));
    shutdown::spawn_critical(&tasks, "sweeper", stop.clone(), Arc::clone(&failed), sweeper.run(stop.clone()));
    shutdown::spawn_critical(
        &tasks,
        "lag",
        stop.clone(),
        Arc::clone(&failed),
        jobs::report_lag(js.clone(), names.clone(), config.ack_wait, Arc::clone(&metrics), stop.clone()),
    );

    let state = Arc::new(api::ApiState {
        metrics,
        admin_token: config.admin_token.clone(),
        store,
        presence,
        redis: redis.clone(),
        nats: nats.clone(),
    });
    tracing::info!(dispatcher = %config.dispatcher_id, addr = ?listener.local_addr().ok(), "dispatcher running");
    let served =
        axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown.clone().cancelled_owned()).await;

    stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        tracing::warn!("batches still in flight at the end of the grace period; JetStream will redeliver them");
    }
    let _ = nats.flush().await;
    let _ = redis.quit().await;
    tracing::info!(dispatcher = %config.dispatcher_id, "dispatcher stopped");
    served?;
    if failed.load(Ordering::SeqCst) {
        return Err(DispatcherError::TaskFailed);
    }
    Ok(())
}
