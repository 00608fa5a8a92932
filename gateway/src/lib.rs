//! Herald's gateway: holds clients' WebSocket connections, keeps their presence in Redis, hands
//! them what dispatchers route here, and forwards their acks to the events stream.
//!
//! It is stateless: it touches only Redis and NATS, and a killed gateway loses nothing because
//! every message it held is still pending in the dispatchers' store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream;
use fred::prelude::ClientLike;
use herald_proto::{close, GatewayId};
use herald_shared::config::GatewayConfig;
use herald_shared::naming::Names;
use herald_shared::{connect, fdlimit, readiness, serve, shutdown, streams};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod acks;
pub mod auth;
mod deliveries;
mod drain;
mod http;
mod metrics;
mod outbox;
mod presence;
mod registry;
mod replay;
mod sent;
mod session;
mod topics;
mod websocket;

use auth::Authenticator;
use presence::PresenceTask;
use registry::Registry;
use session::SessionContext;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    #[error(transparent)]
    Streams(#[from] streams::StreamError),
    #[error("subscribing to deliveries: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error(transparent)]
    FdLimit(#[from] fdlimit::FdLimitError),
    #[error("a critical task failed; see the log")]
    TaskFailed,
    #[error("configuration: {0}")]
    Config(herald_proto::InvalidId),
    #[error("metrics: {0}")]
    Metrics(#[from] herald_shared::metrics::MetricsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthSetupError),
    #[error("TLS (HERALD_TLS_CERT_FILE, HERALD_TLS_KEY_FILE): {0}")]
    Tls(#[from] serve::certs::CertError),
}

/// Open files kept for everything but client connections: Redis and NATS (and their reconnects),
/// the listener, the runtime, stdio, trace export, the metrics' reads of /proc. Generous: running
/// out of these takes presence and deliveries down for every client at once.
const FD_RESERVE: usize = 64;

/// State shared by the HTTP handlers.
pub(crate) struct Gateway {
    config: GatewayConfig,
    auth: Authenticator,
    sessions: Arc<SessionContext>,
    /// Owns every session task; drained on shutdown.
    session_tasks: TaskTracker,
    /// Cancelled when the drain has closed the sessions (`Registry::close_all`, 1012): stops
    /// the tasks that feed them, and says the gateway is draining.
    close_sessions: CancellationToken,
    draining: AtomicBool,
    redis: fred::clients::Client,
    js: jetstream::Context,
    /// The last round of dependency checks, shared by `/readyz` requests.
    checks: readiness::Checks,
}

impl Gateway {
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.close_sessions.is_cancelled()
    }

    /// Whether this gateway should get new clients: it is not draining, and Redis and NATS
    /// answer within the readiness deadline.
    async fn readiness(&self) -> readiness::Report {
        let dependencies = self
            .checks
            .report(|| async {
                let (redis, nats) = tokio::join!(readiness::redis(&self.redis), readiness::nats(&self.js));
                readiness::Report::new([("redis", redis), ("nats", nats)])
            })
            .await;
        // Until then every token would be refused: see Authenticator::has_keys.
        dependencies.with("accepting", !self.is_draining()).with("keys", self.auth.has_keys())
    }
}

/// Runs a gateway on `listeners` (clients on the public one, probes and metrics on the internal
/// one) until `shutdown` is cancelled, then drains: stops accepting,
/// closes every session with 1012 (reconnect elsewhere), removes its presence, flushes acks,
/// and returns within the configured grace period. Fails at once, before connecting to anything,
/// when its connection limits do not fit the process's open-file limit.
pub async fn run(
    config: GatewayConfig,
    listeners: serve::Listeners,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let sessions = session_budget(&config)?;
    // A bad key file or JWKS URL stops the start before anything is connected.
    let (auth, jwks_refresher) = Authenticator::new(&config.jwt)?;
    // Likewise unreadable or mismatched TLS files.
    let certs = config.tls.as_ref().map(serve::certs::Certs::load).transpose()?;
    let tls = certs.as_ref().map(serve::certs::Certs::acceptor).transpose()?;
    let names = Names::new(&config.common.prefix);
    let gateway_id = GatewayId::new(config.gateway_id.as_str()).map_err(GatewayError::Config)?;
    // Start-up waits for the dependencies, but a shutdown request must not wait for start-up.
    let start = async {
        let name = format!("herald-gateway {gateway_id}");
        let (redis, nats) = tokio::try_join!(
            connect::redis_with_tls(&config.common.redis_url, &config.common.redis_tls),
            connect::nats_with_tls(&config.common.nats_url, &config.common.nats_auth, &config.common.nats_tls, &name)
        )?;
        let js = jetstream::new(nats.clone());
        streams::ensure_at_startup(&js, &names, config.common.jetstream_replicas, &config.common.stream_limits).await?;
        streams::ensure_topics_at_startup(&js, &names, config.common.jetstream_replicas, &config.common.topics).await?;
        Ok::<_, GatewayError>((redis, nats, js))
    };
    let (redis, nats, js) = tokio::select! {
        started = start => started?,
        _ = shutdown.cancelled() => return Ok(()),
    };

    // Fleet time before anything reads the clock (herald_shared::clock); retried by the task.
    if !herald_shared::clock::anchor(&config.common.clock, &redis).await {
        tracing::warn!("Redis did not answer TIME; the clock runs on the host's until it does");
    }
    let metrics = Arc::new(metrics::GatewayMetrics::new()?);
    let registry = Registry::new(sessions, config.max_connections_per_user);
    // Subscribe before becoming routable, so nothing routed here falls on the floor.
    let deliveries = nats.subscribe(names.gateway_subject(gateway_id.as_str())).await?;
    let (mut presence_task, presence) = PresenceTask::new(
        redis.clone(),
        js.clone(),
        names.clone(),
        gateway_id.clone(),
        Arc::clone(&registry),
        config.presence_ttl,
        config.common.clock.clone(),
        Arc::clone(&metrics),
    );
    if let Err(e) = presence_task.heartbeat().await {
        tracing::warn!(error = %e, "first presence heartbeat failed; retrying in the background");
    }
    let topic_index = Arc::new(topics::TopicIndex::default());
    let (ack_publisher, acks) =
        acks::AckPublisher::new(js.clone(), &names, &gateway_id, config.ack_linger, Arc::clone(&metrics));

    let sessions = Arc::new(SessionContext {
        shared: Arc::new(session::Shared {
            settings: session::Settings {
                heartbeat_interval: config.heartbeat_interval,
                max_frame_bytes: config.max_frame_bytes,
                frames_per_sec: config.client_frames_per_sec,
                ack_ids_per_sec: config.client_ack_ids_per_sec,
                max_topics: config.topics.max_per_connection,
            },
            gateway_id: gateway_id.clone(),
            metrics: Arc::clone(&metrics),
            clock: config.common.clock.clone(),
        }),
        registry: Arc::clone(&registry),
        presence,
        acks,
        outbound_queue: config.outbound_queue,
        auth: auth.clone(),
        topics: Arc::clone(&topic_index),
        recovery: Some(session::TopicRecovery {
            js: js.clone(),
            names: names.clone(),
            limits: topics::RecoveryLimits {
                max_msgs: config.topics.recovery_max_msgs,
                max_bytes: config.topics.recovery_max_bytes,
            },
        }),
    });

    // Fires once the drain starts closing sessions; deliveries go on until then.
    let close_sessions = CancellationToken::new();
    // Background tasks. Deliveries and presence are critical: if one dies, the process stops.
    let tasks = TaskTracker::new();
    let failed = Arc::new(AtomicBool::new(false));
    let stop_presence = CancellationToken::new();
    let stop_acks = CancellationToken::new();
    // Each ends as planned only after `shutdown` (the drain stops them in order after it).
    let critical =
        shutdown::Critical { stopping: shutdown.clone(), process: shutdown.clone(), failed: Arc::clone(&failed) };
    shutdown::spawn_critical(
        &tasks,
        "deliveries",
        critical.clone(),
        deliveries::run(
            deliveries,
            Arc::clone(&registry),
            Arc::clone(&metrics),
            config.common.clock.clone(),
            close_sessions.clone(),
        ),
    );
    // Topic messages reach this gateway's subscribers through this one reader (topics.rs); it
    // retries a broken consumer itself and ends only with the drain's close of sessions.
    shutdown::spawn_critical(
        &tasks,
        "topics",
        critical.clone(),
        topics::Reader {
            js: js.clone(),
            names: names.clone(),
            index: Arc::clone(&topic_index),
            metrics: Arc::clone(&metrics),
            clock: config.common.clock.clone(),
        }
        .run(close_sessions.clone()),
    );
    shutdown::spawn_critical(&tasks, "presence", critical.clone(), presence_task.run(stop_presence.clone()));
    // Every expiry decision reads Redis's clock, not this host's (herald_shared::clock).
    let clock = herald_shared::clock::follow_redis(config.common.clock.clone(), redis.clone(), stop_presence.clone());
    shutdown::spawn_critical(&tasks, "clock", critical.clone(), clock);
    shutdown::spawn_critical(
        &tasks,
        "acks",
        critical.clone(),
        ack_publisher.run(stop_acks.clone(), config.drain_grace),
    );
    // Fetches the identity provider's keys; its errors are logged and retried, never fatal.
    // Stopped with presence, after the sessions are gone.
    if let Some(refresher) = jwks_refresher {
        let fetches = metrics.jwks_fetches.clone();
        shutdown::spawn_critical(&tasks, "jwks", critical.clone(), refresher.run(stop_presence.clone(), fetches));
    }
    // Reloads the TLS certificate when its files change; a bad change is logged and counted,
    // never fatal. Stopped with presence, after the public listener.
    if let Some(certs) = certs {
        let reloads = metrics.tls_reloads.clone();
        shutdown::spawn_critical(&tasks, "tls", critical, certs.watch(reloads, stop_presence.clone()));
    }

    let (drain_grace, drain_spread, shutdown_delay) = (config.drain_grace, config.drain_spread, config.shutdown_delay);
    let gateway = Arc::new(Gateway {
        auth,
        config,
        sessions,
        session_tasks: TaskTracker::new(),
        close_sessions: close_sessions.clone(),
        draining: AtomicBool::new(false),
        redis: redis.clone(),
        js: js.clone(),
        checks: readiness::Checks::default(),
    });
    let serve::Listeners { public, internal } = listeners;
    tracing::info!(
        gateway = %gateway_id,
        addr = ?public.local_addr().ok(),
        internal = ?internal.local_addr().ok(),
        "gateway listening"
    );
    // The public listener keeps serving through the drain, so late connects get a clear 503
    // instead of a refused connection; it stops once the sessions are gone. The internal one
    // outlives it, so that probes see "not ready" for the whole drain, and stops last.
    let stop_http = CancellationToken::new();
    let stop_internal = CancellationToken::new();
    let public_http = &gateway.config.common.http;
    let serve_public = serve::serve_tls(
        public,
        http::public_router(Arc::clone(&gateway)),
        public_http,
        metrics.http.clone(),
        stop_http.clone(),
        tls,
    );
    let serve = async {
        serve_public.await;
        stop_internal.cancel();
    };
    let internal_http = serve::internal_config(public_http);
    let serve_internal = serve::serve(
        internal,
        http::internal_router(Arc::clone(&gateway)),
        &internal_http,
        metrics.internal_http.clone(),
        stop_internal.clone(),
    );
    // Drain, in order: not ready and no new sessions; after the shutdown delay (time for load
    // balancers to notice), sessions close with 1012, spread over the drain spread (drain.rs);
    // their removals reach Redis and the gateway leaves the routing set; queued acks go out.
    let drain = async {
        shutdown.cancelled().await;
        gateway.draining.store(true, Ordering::SeqCst);
        tokio::time::sleep(shutdown_delay).await;
        let deadline = tokio::time::Instant::now() + drain_grace;
        drain::close_spread(&registry, drain_spread).await;
        // Sessions that opened during the spread too; each session hears of it by its kick.
        registry.close_all(close::SERVICE_RESTART);
        close_sessions.cancel();
        gateway.session_tasks.close();
        if tokio::time::timeout_at(deadline, gateway.session_tasks.wait()).await.is_err() {
            tracing::warn!("sessions still open at the end of the drain grace period");
        }
        stop_http.cancel();
        deadline
    };
    let ((), (), deadline) = tokio::join!(serve, serve_internal, drain);
    stop_presence.cancel();
    stop_acks.cancel();
    tasks.close();
    if tokio::time::timeout_at(deadline + std::time::Duration::from_secs(1), tasks.wait()).await.is_err() {
        tracing::warn!("background tasks still running at the end of the drain grace period");
    }
    let _ = nats.flush().await;
    let _ = redis.quit().await;
    tracing::info!(gateway = %gateway_id, "gateway stopped");
    if failed.load(Ordering::SeqCst) {
        return Err(GatewayError::TaskFailed);
    }
    Ok(())
}

/// How many sessions this gateway may hold within its open-file limit (raised to the hard limit
/// first), with the HTTP listener's budget and [`FD_RESERVE`] set aside. A configured
/// `max_connections` that does not fit stops the start; the default is lowered to fit, loudly.
fn session_budget(config: &GatewayConfig) -> Result<usize, fdlimit::FdLimitError> {
    let limit = fdlimit::raise_to_hard();
    let http = serve::open_files(&config.common.http);
    let budget = fdlimit::plan_sessions(config.max_connections, http, FD_RESERVE, limit)?;
    if let Some(default) = budget.lowered_from {
        tracing::warn!(
            open_file_limit = %fdlimit::describe(limit),
            sessions = budget.sessions,
            "HERALD_MAX_CONNECTIONS is unset and the open-file limit leaves room for fewer sessions than the \
             default {default}: raise the limit (ulimit -n) to hold more"
        );
    }
    tracing::info!(
        open_file_limit = %fdlimit::describe(limit),
        sessions = budget.sessions,
        http,
        reserve = FD_RESERVE,
        "connection limits"
    );
    Ok(budget.sessions)
}
