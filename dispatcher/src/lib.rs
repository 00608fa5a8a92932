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
use herald_shared::{connect, fdlimit, serve, shutdown, streams};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod acks;
pub mod admission;
pub mod api;
pub mod duty;
pub mod events;
pub mod fetch;
pub mod jobs;
pub mod metrics;
pub mod pace;
pub mod pending;
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
    #[error(transparent)]
    FdLimit(#[from] fdlimit::FdLimitError),
    #[error("a critical task failed; see the log")]
    TaskFailed,
    #[error("metrics: {0}")]
    Metrics(#[from] herald_shared::metrics::MetricsError),
    #[error(transparent)]
    Publisher(#[from] herald_publish::PublishError),
}

/// Most gateway events applied at once (one receipt-update round trip per batch).
const EVENT_BATCH: usize = 512;
/// Bytes of events or jobs one batch may hold (see `pull::Batching::max_bytes`): with the job
/// workers, what bounds a dispatcher's memory under any flood of events or jobs.
const FETCH_BYTES: usize = 8 * 1024 * 1024;

/// Open files kept for everything but HTTP connections: the MongoDB pool (10 per server and its
/// monitors, so ~36 for a three-member replica set), Redis, NATS, the listener, the runtime,
/// stdio, trace export.
const FD_RESERVE: usize = 128;

/// How long shutdown waits for in-flight batches to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs a dispatcher, with its publish and query API on the public listener and its operator's
/// API, probes and metrics on the internal one, until `shutdown` is cancelled. Then the public
/// listener stops (and `/readyz` says not ready), it stops pulling, finishes the batches in
/// flight (or hands them back to JetStream), stops the internal listener, and returns.
/// Fails at once when its HTTP connections do not fit the process's open-file limit.
pub async fn run(
    config: DispatcherConfig,
    listeners: serve::Listeners,
    shutdown: CancellationToken,
) -> Result<(), DispatcherError> {
    // The HTTP connections and the reserve must fit in the open-file limit, or the API, the probes
    // and the store connections would fail together under load.
    let limit = fdlimit::raise_to_hard();
    let http = serve::open_files(&config.common.http);
    fdlimit::plan_http(http, FD_RESERVE, limit)?;
    tracing::info!(open_file_limit = %fdlimit::describe(limit), http, reserve = FD_RESERVE, "connection limits");
    let names = Names::new(&config.common.prefix);
    let metrics = Arc::new(metrics::DispatcherMetrics::new()?);
    // Start-up waits for the dependencies, but a shutdown request must not wait for start-up.
    let start = async {
        let name = format!("herald-dispatcher {}", config.dispatcher_id);
        let (db, redis, nats) = tokio::try_join!(
            connect::mongo(&config.mongodb_uri, &config.mongodb_database),
            connect::redis_with_tls(&config.common.redis_url, &config.common.redis_tls),
            connect::nats_with_tls(&config.common.nats_url, &config.common.nats_auth, &config.common.nats_tls, &name),
        )?;
        let js = jetstream::new(nats.clone());
        streams::ensure_at_startup(&js, &names, config.common.jetstream_replicas, &config.common.stream_limits).await?;
        streams::ensure_topics_at_startup(&js, &names, config.common.jetstream_replicas, &config.common.topics).await?;
        let store = store::Store::new(db, metrics.dependencies.clone(), config.retention);
        store.ensure_indexes().await?;
        Ok::<_, DispatcherError>((redis, nats, js, store))
    };
    let (redis, nats, js, store) = tokio::select! {
        started = start => started?,
        _ = shutdown.cancelled() => return Ok(()),
    };

    // Fleet time before anything reads the clock (herald_shared::clock); retried by the task.
    if !herald_shared::clock::anchor(&config.common.clock, &redis).await {
        tracing::warn!("Redis did not answer TIME; the clock runs on the host's until it does");
    }
    let fetch_bytes = pull::fetch_bytes(FETCH_BYTES, nats.server_info().max_payload);
    let presence = presence::PresenceReader::new(redis.clone(), names.clone());
    let router = routing::Router::new(nats.clone(), names.clone());
    let api_router = router.clone();
    let limits = herald_publish::validate::Limits {
        max_payload_bytes: config.max_payload_bytes,
        max_recipients: config.max_recipients,
        default_ttl: config.default_ttl,
        max_ttl: config.max_ttl,
    };
    let jobs = jobs::JobPipeline {
        js: js.clone(),
        names: names.clone(),
        store: store.clone(),
        presence: presence.clone(),
        router: router.clone(),
        limits: limits.clone(),
        ack_timeout: config.ack_timeout,
        batching: pull::Batching {
            max: config.job_batch,
            linger: config.job_linger,
            concurrency: config.job_workers,
            max_bytes: fetch_bytes,
        },
        max_attempts: config.max_attempts,
        ack_wait: config.ack_wait,
        metrics: Arc::clone(&metrics),
        clock: config.common.clock.clone(),
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
            clock: config.common.clock.clone(),
        },
        // One batch at a time: a read receipt must not overtake the ack it follows.
        batching: pull::Batching {
            max: EVENT_BATCH,
            linger: config.event_linger,
            concurrency: 1,
            max_bytes: fetch_bytes,
        },
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
        events: sweeper::EventsLag { js: js.clone(), ack_wait: config.ack_wait },
        metrics: Arc::clone(&metrics),
        clock: config.common.clock.clone(),
    };

    // Pipelines stop pulling when `stop` fires; each ends only then, so an early end is a failure
    // that takes the process down (its jobs are redelivered to the other dispatchers).
    let tasks = TaskTracker::new();
    let failed = Arc::new(AtomicBool::new(false));
    let stop = shutdown.child_token();
    // A failed pipeline cancels `shutdown` itself, not just `stop`: the API stops answering and
    // `run` returns an error, so the process exits non-zero and is restarted.
    let critical =
        shutdown::Critical { stopping: stop.clone(), process: shutdown.clone(), failed: Arc::clone(&failed) };
    // Every expiry decision reads Redis's clock, not this host's (herald_shared::clock).
    let clock = herald_shared::clock::follow_redis(config.common.clock.clone(), redis.clone(), stop.clone());
    shutdown::spawn_critical(&tasks, "clock", critical.clone(), clock);
    shutdown::spawn_critical(&tasks, "jobs", critical.clone(), jobs.run(stop.clone()));
    shutdown::spawn_critical(&tasks, "events", critical.clone(), events.run(stop.clone()));
    shutdown::spawn_critical(&tasks, "sweeper", critical.clone(), sweeper.run(stop.clone()));
    shutdown::spawn_critical(
        &tasks,
        "pending",
        critical.clone(),
        pending::report(
            store.clone(),
            config.pending_sample,
            config.common.clock.clone(),
            Arc::clone(&metrics),
            stop.clone(),
        ),
    );
    shutdown::spawn_critical(
        &tasks,
        "lag",
        critical,
        jobs::report_lag(js.clone(), names.clone(), config.ack_wait, Arc::clone(&metrics), stop.clone()),
    );

    let (http_metrics, internal_metrics) = (metrics.http.clone(), metrics.internal_http.clone());
    // The streams exist (ensured above): this only looks the jobs stream up.
    let destination =
        herald_publish::Destination { stream: names.jobs_stream(), subject: names.publish_subject("http") };
    let publisher = herald_publish::Publisher::new(js.clone(), destination, limits).await?;
    let state = Arc::new(api::ApiState {
        metrics,
        tokens: api::auth::Tokens::new(&config.api),
        store,
        presence,
        redis: redis.clone(),
        js: js.clone(),
        publisher,
        router: api_router,
        names: names.clone(),
        max_batch: config.api.max_batch,
        max_body_bytes: config.api.max_body_bytes,
        backlog: admission::Backlog::new(js.clone(), names.clone(), config.ack_wait, config.api.max_backlog),
        checks: herald_shared::readiness::Checks::default(),
        clock: config.common.clock.clone(),
        stopping: shutdown.clone(),
    });
    let serve::Listeners { public, internal } = listeners;
    tracing::info!(
        dispatcher = %config.dispatcher_id,
        addr = ?public.local_addr().ok(),
        internal = ?internal.local_addr().ok(),
        "dispatcher running"
    );
    let (max_body, cors) = (config.api.max_body_bytes, &config.api.cors_origins);
    let public_app = api::router(Arc::clone(&state), api::Listener::Public, max_body, cors);
    let internal_app = api::router(state, api::Listener::Internal, max_body, &[]);
    // The internal listener outlives the public one and the batches in flight, so that probes
    // see "not ready" and metrics can be scraped until the end.
    let stop_internal = CancellationToken::new();
    let internal_http = serve::internal_config(&config.common.http);
    let serve_internal = serve::serve(internal, internal_app, &internal_http, internal_metrics, stop_internal.clone());
    let wind_down = async {
        serve::serve(public, public_app, &config.common.http, http_metrics, shutdown.clone()).await;
        stop.cancel();
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
            tracing::warn!("batches still in flight at the end of the grace period; JetStream will redeliver them");
        }
        stop_internal.cancel();
    };
    tokio::join!(wind_down, serve_internal);
    let _ = nats.flush().await;
    let _ = redis.quit().await;
    tracing::info!(dispatcher = %config.dispatcher_id, "dispatcher stopped");
    if failed.load(Ordering::SeqCst) {
        return Err(DispatcherError::TaskFailed);
    }
    Ok(())
}
