//! Connections to Redis, NATS and MongoDB, set up the same way by every Herald process: start-up
//! waits for each dependency, they reconnect on their own after an outage, and they fail fast
//! instead of queueing forever.
//!
//! At start-up a dependency that is not up yet is the normal case (an orchestrator starts pods
//! in any order, and a fleet restarted with its Redis comes back together), so every failed
//! attempt (a refused connection, a server still loading) is retried with jittered backoff for
//! up to [`STARTUP_TIMEOUT`]. A shutdown request ends the wait: the services drop this future.
//! Credentials are not an outage: NATS's (`nats_auth`) are checked with the configuration, and a
//! refusal of them is reported at once. Neither is a certificate refused by either side of a TLS
//! handshake (`tls::is_certificate_refusal`): NATS's client says so in its error; Redis's (fred)
//! says so only in text, so after a failed attempt over TLS a handshake of our own asks the
//! server again and its typed error decides. MongoDB's driver retries within its server
//! selection timeout and says why in the error, which start-up reports when it gives up.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use fred::prelude::{ClientLike, Config as RedisConfig};
use fred::types::config::{ConnectionConfig, PerformanceConfig, ReconnectPolicy};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::NatsAuth;
use crate::nats_auth::{nats_credentials, with_credentials, without_credentials};
use crate::tls::{ClientTls, TlsError};

/// How long start-up waits for a dependency before giving up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one Redis command may take, including waiting for a reconnect.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Each shows its URL with any user and password replaced by `***`: these lines reach the logs.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis at {}: {source}", redact_url(.url))]
    Redis { url: String, source: fred::error::Error },
    #[error("nats at {}: {source}", redact_url(.url))]
    Nats { url: String, source: NatsError },
    #[error("mongodb at {}: {source}", redact_url(.uri))]
    Mongo { uri: String, source: mongodb::error::Error },
    #[error("{dependency} at {}: no answer within {STARTUP_TIMEOUT:?}", redact_url(.url))]
    Timeout { dependency: &'static str, url: String },
    /// A TLS file that cannot be used (read again at connect: it may have changed since the
    /// configuration was checked).
    #[error("{dependency} at {}: {source}", redact_url(.url))]
    Tls { dependency: &'static str, url: String, source: TlsError },
    /// One side of the TLS handshake refused the other's certificate (or its absence).
    #[error("{dependency} at {}: TLS certificate refused: {source}", redact_url(.url))]
    CertificateRefused { dependency: &'static str, url: String, source: std::io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
    #[error("jetstream: {0}")]
    JetStream(#[from] async_nats::jetstream::context::AccountError),
    /// Shown with any user and password in it replaced by `***`.
    #[error("not a NATS server address: {}", redact_url(.0))]
    Address(String),
    /// The seeds of `HERALD_NATS_URL` carry different credentials: one connection has one user.
    #[error("HERALD_NATS_URL: its servers carry different credentials; give the same to each, or to none")]
    MixedCredentials,
    /// A connection authenticates as one user.
    #[error("HERALD_NATS_URL carries a user or token and {variable} is set too; give one of them")]
    TwoCredentials { variable: &'static str },
    #[error("{variable}: cannot read {}: {source}", .path.display())]
    CredentialsFile {
        variable: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but does not hold what the variable needs; `problem` never quotes it.
    #[error("{variable}: {} {problem}", .path.display())]
    BadCredentials { variable: &'static str, path: PathBuf, problem: &'static str },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The servers of `HERALD_NATS_URL`: one URL, or a comma-separated seed list of a cluster's
/// nodes. The client learns the rest of the cluster from any one of them, and reconnects to
/// another when the one it uses goes away.
pub fn nats_seeds(url: &str) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    let seeds: Vec<&str> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if seeds.is_empty() {
        return Err(NatsError::Address(url.to_owned()));
    }
    seeds.into_iter().map(|s| s.parse().map_err(|_| NatsError::Address(s.to_owned()))).collect()
}

/// `url` with the user and password of each server in it replaced by `***`, for errors and logs:
/// `nats://***@nats:4222`; a Sentinel URL's `sentinelPassword` too. Works on text that does not
/// parse as a URL too.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let Some((scheme, rest)) = part.split_once("://") else { return part.to_owned() };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let shown = match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***{}", &rest[at..]),
                None => part.to_owned(),
            };
            redact_query_secrets(&shown)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Query parameters that carry a secret: fred reads the Sentinel nodes' password from this one.
const SECRET_PARAMETERS: [&str; 1] = ["sentinelPassword"];

fn redact_query_secrets(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_owned() };
    let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if SECRET_PARAMETERS.iter().any(|s| s.eq_ignore_ascii_case(name)) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
    format!("{base}?{}{fragment}", query.join("&"))
}

/// How waiting for a dependency ended, when it did not answer.
pub(crate) enum Waited<E> {
    /// Its last attempt's error, once the time was up.
    Failed(E),
    /// An attempt was still running when the time was up.
    TimedOut,
}

/// Runs `attempt` until it succeeds, retrying failures with jittered backoff (100 ms doubling
/// to 2 s) for up to [`STARTUP_TIMEOUT`] from the first try.
pub(crate) async fn wait_for<T, E, F, Fut>(dependency: &'static str, mut attempt: F) -> Result<T, Waited<E>>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let error = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(_) => return Err(Waited::TimedOut),
        };
        let pause = backoff.next_pause();
        if Instant::now() + pause >= deadline {
            return Err(Waited::Failed(error));
        }
        // The URL is left out: it may hold a password.
        tracing::warn!(dependency, %error, retry_in = ?pause, "not reachable yet; waiting");
        tokio::time::sleep(pause).await;
    }
}

/// A Redis client that reconnects forever with a capped backoff. Commands issued while Redis is
/// away fail after [`REDIS_COMMAND_TIMEOUT`] rather than piling up.
pub async fn redis(url: &str) -> Result<fred::clients::Client, ConnectError> {
    redis_with_tls(url, &ClientTls::default()).await
}

/// Whether a Redis URL asks for TLS (`rediss://`, `valkeys://` and their cluster and sentinel
/// forms); `None` if it does not parse.
pub fn redis_uses_tls(url: &str) -> Option<bool> {
    RedisConfig::from_url(url).ok().map(|config| config.tls.is_some())
}

/// [`redis`], with `tls` for a TLS URL: its CA file (else the system's roots) and client
/// certificate, on rustls with ring.
pub async fn redis_with_tls(url: &str, tls: &ClientTls) -> Result<fred::clients::Client, ConnectError> {
    let err = |source| ConnectError::Redis { url: url.to_owned(), source };
    let mut config = RedisConfig::from_url(url).map_err(err)?;
    let mut probe = None;
    if let Some(current) = config.tls.take() {
        let rustls = tls.rustls_config(&crate::tls::REDIS_TLS).map_err(|source| ConnectError::Tls {
            dependency: "redis",
            url: url.to_owned(),
            source,
        })?;
        let rustls = std::sync::Arc::new(rustls);
        probe = Some(rustls.clone());
        let connector = fred::types::config::TlsConnector::Rustls(rustls.into());
        config.tls = Some(fred::types::config::TlsConfig { connector, hostnames: current.hostnames });
    }
    let attempt = || async {
        let client = fred::types::Builder::from_config(config.clone())
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
            .build()?;
        // The first connection's error comes back here (fred's `fail_fast`, the default) and
        // this loop retries it; once connected, the client's reconnect policy takes over. The
        // connection task is owned by the client: it ends when the client quits or is dropped.
        match client.init().await {
            Ok(_task) => Ok(Ok(client)),
            Err(e) => match &probe {
                Some(rustls) => match certificate_refusal(&config, rustls.clone()).await {
                    Some(refusal) => Ok(Err(refusal)),
                    None => Err(e),
                },
                None => Err(e),
            },
        }
    };
    wait_for("redis", attempt)
        .await
        .map_err(|waited| match waited {
            Waited::Failed(source) => err(source),
            Waited::TimedOut => ConnectError::Timeout { dependency: "redis", url: url.to_owned() },
        })?
        .map_err(|source| ConnectError::CertificateRefused { dependency: "redis", url: url.to_owned(), source })
}

/// After a failed connection over TLS: a handshake of our own with the first server of
/// `config`, and its error if that is a refused certificate (fred keeps only the text of its
/// own). Anything else (no answer, a reset) is left to the caller's retries.
async fn certificate_refusal(
    config: &RedisConfig,
    rustls: std::sync::Arc<rustls::ClientConfig>,
) -> Option<std::io::Error> {
    let server = config.server.hosts().into_iter().next()?;
    let name = server.tls_server_name.as_ref().unwrap_or(&server.host).to_string();
    let name = rustls::pki_types::ServerName::try_from(name).ok()?;
    let limit = Duration::from_secs(2);
    let tcp =
        tokio::time::timeout(limit, tokio::net::TcpStream::connect((&*server.host, server.port))).await.ok()?.ok()?;
    let mut stream =
        match tokio::time::timeout(limit, tokio_rustls::TlsConnector::from(rustls).connect(name, tcp)).await.ok()? {
            Ok(stream) => stream,
            Err(e) => return crate::tls::is_certificate_refusal(&e).then_some(e),
        };
    // TLS 1.3: a server refuses a client's certificate after the client's side of the handshake
    // is done, so the refusal arrives with the first read.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(b"PING\r\n").await.ok()?;
    let mut reply = [0u8; 16];
    match tokio::time::timeout(limit, stream.read(&mut reply)).await.ok()? {
        Err(e) if crate::tls::is_certificate_refusal(&e) => Some(e),
        _ => None,
    }
}

/// A NATS client that reconnects forever and resubscribes on its own, once JetStream answers.
/// It authenticates with the user and password (or token) in `url`, or with the file `auth`
/// names; both are read again here, so a file replaced since the configuration was checked is
/// the one used.
pub async fn nats(url: &str, auth: &NatsAuth, name: &str) -> Result<async_nats::Client, ConnectError> {
    nats_with_tls(url, auth, &ClientTls::default(), name).await
}

/// The servers of `url` and the options that authenticate to them (`auth`, or credentials in
/// `url`) and do TLS as `tls` says: what [`nats`] connects with, and `heraldctl` too. Reads the
/// files: a wrong one is reported here, not retried.
pub fn nats_options(
    url: &str,
    auth: &NatsAuth,
    tls: &ClientTls,
) -> Result<(Vec<async_nats::ServerAddr>, async_nats::ConnectOptions), NatsError> {
    let seeds = without_credentials(nats_seeds(url)?)?;
    let credentials = nats_credentials(url, auth)?;
    let mut options = with_credentials(async_nats::ConnectOptions::new(), credentials)?;
    if tls.is_set() {
        // Checked here so that a bad file names its variable; async-nats reads it again.
        tls.check(&crate::tls::NATS_TLS)?;
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some(client) = &tls.client {
            options = options.add_client_certificate(client.cert.clone(), client.key.clone());
        }
        // Files given mean TLS is wanted: a `nats://` server that does not offer it is refused
        // rather than spoken to in the clear.
        options = options.require_tls(true);
    }
    Ok((seeds, options))
}

/// [`nats`], with `tls`: a CA file to trust (else the system's roots) and a client certificate.
pub async fn nats_with_tls(
    url: &str,
    auth: &NatsAuth,
    tls: &ClientTls,
    name: &str,
) -> Result<async_nats::Client, ConnectError> {
    // The error names the servers, never the credentials.
    let shown = || redact_url(url);
    let err = |source| ConnectError::Nats { url: shown(), source };
    // A wrong file is not an outage: reported at once, not retried.
    let (seeds, options) = nats_options(url, auth, tls).map_err(err)?;
    let attempt = || async {
        let name_for_log = name.to_owned();
        let client = options
            .clone()
            .name(name)
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((50 * 2u64.pow(attempt.min(5) as u32)).min(1_000))
            })
            .event_callback(move |event| {
                let name = name_for_log.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!(client = %name, "nats connected"),
                        // This process closing its own connection, at shutdown.
                        async_nats::Event::Closed => tracing::info!(client = %name, "nats connection closed"),
                        other => tracing::warn!(client = %name, event = %other, "nats connection event"),
                    }
                }
            })
            .connect(seeds.clone())
            .await;
        let client = match client {
            Ok(client) => client,
            // NATS said no to the credentials, or one side of the TLS handshake to the other's
            // certificate: waiting does not change them, so say so now.
            Err(e) if credentials_refused(&e) || crate::tls::is_certificate_refusal(&e) => {
                return Ok(Err(NatsError::from(e)))
            }
            Err(e) => return Err(NatsError::from(e)),
        };
        // A server that has just started serves clients before JetStream has recovered its store.
        async_nats::jetstream::new(client.clone()).query_account().await?;
        Ok::<_, NatsError>(Ok(client))
    };
    wait_for("nats", attempt)
        .await
        .map_err(|waited| match waited {
            Waited::Failed(source) => err(source),
            Waited::TimedOut => ConnectError::Timeout { dependency: "nats", url: shown() },
        })?
        .map_err(err)
}

/// Whether NATS refused the credentials (none given where some are required, or wrong ones).
fn credentials_refused(error: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind::{Authentication, AuthorizationViolation};
    matches!(error.kind(), AuthorizationViolation | Authentication)
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
    durable_defaults(&mut options);
    let client = mongodb::Client::with_options(options).map_err(err)?;
    let db = client.database(database);
    let ping = || async { db.run_command(mongodb::bson::doc! { "ping": 1 }).await };
    wait_for("mongodb", ping).await.map_err(|waited| match waited {
        Waited::Failed(source) => err(source),
        Waited::TimedOut => ConnectError::Timeout { dependency: "mongodb", url: uri.to_owned() },
    })?;
    Ok(db)
}

/// Write concern `majority` and reads from the primary, unless the URI sets them (`w=`,
/// `readPreference=`). On a replica set, a write only the primary has is rolled back if the
/// primary fails before a secondary copies it: a stored job that was then acked in JetStream,
/// or a `delivered` receipt, would be gone (invariants 1 and 2). Replays, sweeps and the API
/// read what the dispatchers just wrote, which only the primary is sure to have. On a single
/// server both are what it does anyway.
fn durable_defaults(options: &mut mongodb::options::ClientOptions) {
    use mongodb::options::{Acknowledgment, ReadPreference, SelectionCriteria};
    if options.write_concern.as_ref().is_none_or(|w| w.w.is_none()) {
        let mut concern = options.write_concern.take().unwrap_or_default();
        concern.w = Some(Acknowledgment::Majority);
        options.write_concern = Some(concern);
    }
    options.selection_criteria.get_or_insert(SelectionCriteria::ReadPreference(ReadPreference::Primary));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_list_names_every_node_and_nothing_else_passes() {
        let seeds = nats_seeds("nats://127.0.0.1:4222, nats://10.0.0.2:4222,").unwrap();
        assert_eq!(seeds.len(), 2);
        assert_eq!(nats_seeds("nats://h:1").unwrap().len(), 1);
        assert!(matches!(nats_seeds(" , "), Err(NatsError::Address(_))));
        assert!(matches!(nats_seeds("nats://h:1,http://[::1"), Err(NatsError::Address(a)) if a == "http://[::1"));
    }

    #[test]
    fn a_redis_url_says_whether_it_wants_tls() {
        assert_eq!(redis_uses_tls("rediss://:pw@r:6380/0"), Some(true));
        assert_eq!(redis_uses_tls("valkeys://r:6380"), Some(true));
        assert_eq!(redis_uses_tls("redis://r:6379"), Some(false));
    }

    #[test]
    fn urls_are_shown_without_their_credentials() {
        assert_eq!(redact_url("nats://u:p%40ss@h:4222,nats://h2:4222"), "nats://***@h:4222,nats://h2:4222");
        assert_eq!(redact_url("tls://token@h/x@y"), "tls://***@h/x@y");
        assert_eq!(redact_url("nats://u:pw@[bad"), "nats://***@[bad");
        assert_eq!(redact_url("h:4222"), "h:4222");
        assert_eq!(
            redact_url("redis-cluster://:pw@r1:7000?node=r2:7001&node=r3:7002"),
            "redis-cluster://***@r1:7000?node=r2:7001&node=r3:7002"
        );
        assert_eq!(
            redact_url(
                "redis-sentinel://u:pw@s1:26379/0?sentinelServiceName=herald&sentinelPassword=pw2&node=s2:26379"
            ),
            "redis-sentinel://***@s1:26379/0?sentinelServiceName=herald&sentinelPassword=***&node=s2:26379"
        );
        let e = nats_seeds("nats://u:secret@h:1,http://u:secret@[::1").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    /// A wrong file is reported at once (not retried as an outage would be), and the error shows
    /// the URL without its password.
    #[tokio::test]
    async fn a_bad_credentials_file_fails_the_connect_at_once() {
        let auth = NatsAuth::NkeyFile(std::env::temp_dir().join("herald-no-such-file"));
        let e = tokio::time::timeout(Duration::from_secs(1), nats("nats://u:hunter2@127.0.0.1:1", &auth, "t"))
            .await
            .expect("not retried")
            .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("nats://***@127.0.0.1:1") && shown.contains("HERALD_NATS_NKEY_FILE"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[tokio::test]
    async fn the_store_is_written_by_majority_and_read_from_the_primary_unless_the_uri_says() {
        use mongodb::options::{Acknowledgment, ClientOptions, ReadPreference, SelectionCriteria};
        let mut plain = ClientOptions::parse("mongodb://127.0.0.1:1/?replicaSet=rs0").await.unwrap();
        durable_defaults(&mut plain);
        assert_eq!(plain.write_concern.and_then(|w| w.w), Some(Acknowledgment::Majority));
        assert!(matches!(plain.selection_criteria, Some(SelectionCriteria::ReadPreference(ReadPreference::Primary))));

        let mut chosen =
            ClientOptions::parse("mongodb://127.0.0.1:1/?w=1&journal=true&readPreference=primaryPreferred")
                .await
                .unwrap();
        durable_defaults(&mut chosen);
        let concern = chosen.write_concern.unwrap();
        assert_eq!((concern.w, concern.journal), (Some(Acknowledgment::Nodes(1)), Some(true)));
        assert!(matches!(
            chosen.selection_criteria,
            Some(SelectionCriteria::ReadPreference(ReadPreference::PrimaryPreferred { .. }))
        ));
    }

    /// A Redis or MongoDB password in a connection error would reach the logs.
    #[test]
    fn connection_errors_show_no_password() {
        let source = fred::error::Error::new(fred::error::ErrorKind::IO, "refused");
        let redis = ConnectError::Redis { url: "redis://:hunter2@r:6379".into(), source };
        assert_eq!(redis.to_string(), "redis at redis://***@r:6379: IO Error: refused");
        let mongo =
            ConnectError::Timeout { dependency: "mongodb", url: "mongodb://herald:hunter2@m1,m2/herald".into() };
        assert_eq!(mongo.to_string(), "mongodb at mongodb://***@m1,m2/herald: no answer within 20s");
    }

    /// The forms docs/CONFIGURATION.md gives for `HERALD_REDIS_URL`.
    #[test]
    fn cluster_and_sentinel_urls_name_their_deployment() {
        use fred::types::config::ServerConfig;
        let cluster = RedisConfig::from_url("redis-cluster://:pw@r1:7000?node=r2:7001&node=r3:7002").unwrap();
        assert!(matches!(&cluster.server, ServerConfig::Clustered { hosts, .. } if hosts.len() == 3));
        assert_eq!(cluster.password.as_deref(), Some("pw"));
        let sentinel =
            RedisConfig::from_url("redis-sentinel://s1:26379/2?sentinelServiceName=herald&node=s2:26380").unwrap();
        assert!(
            matches!(&sentinel.server, ServerConfig::Sentinel { hosts, service_name, .. } if hosts.len() == 2 && service_name == "herald")
        );
        assert_eq!(sentinel.database, Some(2));
        assert!(RedisConfig::from_url("redis-sentinel://s1:26379").is_err(), "the service name is required");
    }

    /// Start-up against a port nothing listens on: refused at once, and retried rather than
    /// reported (the end-to-end tests start a gateway before its Redis and NATS).
    #[tokio::test]
    async fn a_refused_connection_is_retried_not_fatal() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("redis://127.0.0.1:{port}");
        let waited = tokio::time::timeout(Duration::from_secs(1), redis(&url)).await;
        assert!(waited.is_err(), "still waiting after a second, not failed at once: {waited:?}");
    }
}
