//! Connections to Redis, NATS and MongoDB, set up the same way by every Herald process: they
//! reconnect on their own after an outage, and fail fast instead of queueing forever.

use std::time::Duration;

use fred::prelude::{ClientLike, Config as RedisConfig};
use fred::types::config::{ConnectionConfig, PerformanceConfig, ReconnectPolicy};

/// How long start-up waits for a dependency before giving up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one Redis command may take, including waiting for a reconnect.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis at {url}: {source}")]
    Redis { url: String, source: fred::error::Error },
    #[error("redis at {url}: not reachable within {STARTUP_TIMEOUT:?}")]
    RedisTimeout { url: String },
    #[error("nats at {url}: {source}")]
    Nats { url: String, source: async_nats::ConnectError },
    #[error("mongodb at {uri}: {source}")]
    Mongo { uri: String, source: mongodb::error::Error },
}

/// A Redis client that reconnects forever with a capped backoff. Commands issued while Redis is
/// away fail after [`REDIS_COMMAND_TIMEOUT`] rather than piling up.
pub async fn redis(url: &str) -> Result<fred::clients::Client, ConnectError> {
    let err = |source| ConnectError::Redis { url: url.to_owned(), source };
    let config = RedisConfig::from_url(url).map_err(err)?;
    let client = fred::types::Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .set_performance_config(PerformanceConfig {
            default_command_timeout: REDIS_COMMAND_TIMEOUT,
            ..PerformanceConfig::default()
        })
        .set_connection_config(ConnectionConfig {
            connection_timeout: Duration::from_secs(2),
            max_command_attempts: 2,
            ..ConnectionConfig::default()
        })
        .build()
        .map_err(err)?;
    // The connection task is owned by the client: it ends when the client quits or is dropped.
    let _task = client.connect();
    match tokio::time::timeout(STARTUP_TIMEOUT, client.wait_for_connect()).await {
        Ok(result) => result.map_err(err)?,
        Err(_) => return Err(ConnectError::RedisTimeout { url: url.to_owned() }),
    }
    Ok(client)
}

/// A NATS client that reconnects forever and resubscribes on its own.
pub async fn nats(url: &str, name: &str) -> Result<async_nats::Client, ConnectError> {
    let name_for_log = name.to_owned();
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| Duration::from_millis((50 * 2u64.pow(attempt.min(5) as u32)).min(1_000)))
        .event_callback(move |event| {
            let name = name_for_log.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(client = %name, "nats connected"),
                    other => tracing::warn!(client = %name, event = %other, "nats connection event"),
                }
            }
        })
        .connect(url)
        .await
        .map_err(|source| ConnectError::Nats { url: url.to_owned(), source })
}

/// A MongoDB database handle whose operations give up on an unreachable server within seconds,
/// so callers see an outage as an error they can retry instead of a hang.
pub async fn mongo(uri: &str, database: &str) -> Result<mongodb::Database, ConnectError> {
    let err = |source| ConnectError::Mongo { uri: uri.to_owned(), source };
    let mut options = mongodb::options::ClientOptions::parse(uri).await.map_err(err)?;
    options.server_selection_timeout.get_or_insert(Duration::from_secs(3));
    options.connect_timeout.get_or_insert(Duration::from_secs(2));
    // Notice a returning server within a second or so, not the driver's default ten.
    options.heartbeat_freq.get_or_insert(Duration::from_secs(1));
    options.app_name.get_or_insert_with(|| "herald".to_owned());
    let client = mongodb::Client::with_options(options).map_err(err)?;
    let db = client.database(database);
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        match db.run_command(mongodb::bson::doc! { "ping": 1 }).await {
            Ok(_) => return Ok(db),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(err(e)),
            Err(e) => {
                tracing::warn!(error = %e, "mongodb not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
