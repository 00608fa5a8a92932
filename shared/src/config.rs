//! Typed configuration, parsed once at start-up from `HERALD_*` environment variables.
//!
//! Every variable has a default that works with `make run`, except the secrets. A bad value does
//! not stop the parse: every problem is collected and reported together. Tests build the structs
//! directly instead of going through the environment.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::streams::{Limits, StreamLimits};
use crate::tls::{CertKey, ClientTls, TlsVars};

/// Shortest admin token accepted: 128 bits of a random hex or base64 string.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Everything wrong with the environment, one line per variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {}", .0.join("; "))]
pub struct ConfigError(pub Vec<String>);

/// Settings both services share.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// Prefixes every Redis key, NATS subject and stream, so several deployments (or test runs)
    /// can share one Redis and one NATS.
    pub prefix: String,
    pub redis_url: String,
    /// One URL or a comma-separated seed list; a user and password (or a token) in it are used.
    pub nats_url: String,
    /// How Herald authenticates to NATS, besides credentials in `nats_url` (never both).
    pub nats_auth: NatsAuth,
    /// TLS to Redis (`rediss://`): whom to trust and the client certificate, if any.
    pub redis_tls: ClientTls,
    /// TLS to NATS (`tls://`, or required by the server): set, TLS is required.
    pub nats_tls: ClientTls,
    /// Replicas of Herald's JetStream streams when a process creates them (3 in production;
    /// 1 for a single NATS server). Existing streams keep their own.
    pub jetstream_replicas: usize,
    /// Limits of the jobs and events streams, applied when a process ensures them (existing
    /// streams too).
    pub stream_limits: StreamLimits,
    /// Retention of the topics stream, which is what a subscriber can recover.
    pub topics: TopicRetention,
    /// Limits of the service's HTTP listener.
    pub http: HttpConfig,
    /// The wall clock. Not read from the environment: always the system clock, except in tests
    /// that play a host whose clock is off.
    pub clock: crate::Clock,
}

/// How much of each topic's past the topics stream keeps (`HERALD_TOPICS_MAX_AGE_SECS`,
/// `HERALD_TOPICS_MAX_MSGS`): a client that subscribes again with `since` recovers what it missed
/// within these, and is told `recovered: false` beyond them. Applied to an existing stream too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicRetention {
    pub max_age: Duration,
    /// Messages of all topics together.
    pub max_msgs: i64,
}

impl Default for TopicRetention {
    fn default() -> Self {
        Self { max_age: Duration::from_secs(3600), max_msgs: 100_000 }
    }
}

/// A gateway's limits on topic subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayTopics {
    /// Subscriptions one connection may hold (`HERALD_MAX_TOPICS_PER_CONNECTION`).
    pub max_per_connection: usize,
    /// Most messages one `subscribe` with `since` recovers (`HERALD_TOPIC_RECOVERY_MAX_MSGS`);
    /// past it the answer says `recovered: false`.
    pub recovery_max_msgs: usize,
    /// Most payload bytes one recovery brings (`HERALD_TOPIC_RECOVERY_MAX_BYTES`).
    pub recovery_max_bytes: usize,
}

impl Default for GatewayTopics {
    fn default() -> Self {
        Self { max_per_connection: 64, recovery_max_msgs: 256, recovery_max_bytes: 1024 * 1024 }
    }
}

/// A file that authenticates Herald to NATS. Only paths: the secrets stay in their files, which
/// are read (and checked) when the configuration is loaded and again at connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No file: no credentials, or those in `HERALD_NATS_URL`.
    #[default]
    None,
    /// `HERALD_NATS_CREDS_FILE`: a `.creds` file (user JWT and nkey seed), as `nsc` writes for a
    /// server in operator (decentralised JWT) mode.
    CredsFile(PathBuf),
    /// `HERALD_NATS_NKEY_FILE`: a file holding a user's nkey seed (`SU…`), for a server whose
    /// users are listed by public nkey (`authorization { users = [ { nkey: "U…" } ] }`).
    NkeyFile(PathBuf),
}

/// Limits on HTTP connections that are not (or not yet) a WebSocket session: connect requests
/// before their upgrade, probes, metrics scrapes and the query API. They are open to anyone who
/// can reach the port, before any token is checked; these bound what such a client can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// A connection must send a complete request head within this of connecting, or of its
    /// previous response: it bounds an idle connection, keep-alive or not, and a drip-fed head.
    pub header_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed, whatever it is doing
    /// (a client that does not read its response, a stalled body).
    pub idle_timeout: Duration,
    /// Most such connections at once. When they are all taken, a new one takes the place of the
    /// oldest that is waiting on its client, or is closed at once if none is.
    pub max_connections: usize,
    /// New connections per second from one source address (an IPv6 /64), with a burst of twice
    /// as many; over it, connections are closed at once. 0: no limit.
    pub connects_per_sec_per_ip: u32,
    /// Connections the kernel completes for a listener before it accepts them. A reconnect
    /// storm (a rollout, a network blip) arrives faster than one accept loop takes it; past the
    /// queue the kernel drops SYNs and clients wait a second for their retry. The kernel caps it
    /// at `net.core.somaxconn` (4096 on current kernels).
    pub listen_backlog: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
            connects_per_sec_per_ip: 20,
            listen_backlog: 4096,
        }
    }
}

/// How the gateway checks client tokens. At least one source of keys: an HS256 secret, PEM public
/// keys, or an identity provider's JWKS.
#[derive(Clone)]
pub struct JwtConfig {
    /// HS256 shared secret, the one issuers sign with now; empty: none.
    pub secret: String,
    /// One more HS256 secret accepted while a rotation is under way (the old one). A separate
    /// variable rather than a list, so that any byte, a comma too, can be part of a secret.
    pub previous_secret: Option<String>,
    /// Files of PEM public keys (RSA, EC P-256 or P-384, Ed25519), one key per file. A key
    /// verifies only tokens whose `alg` is its own (RS256, ES256 or ES384, EdDSA).
    pub public_key_files: Vec<PathBuf>,
    /// The identity provider's JWKS, fetched at start and cached.
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again; sooner when its `Cache-Control: max-age` says so.
    pub jwks_refresh: Duration,
    /// At least this long between two JWKS fetches: tokens naming a `kid` the cache does not
    /// know cause at most one fetch per interval, however many there are.
    pub jwks_min_refetch: Duration,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, a token's `aud` must contain it.
    pub audience: Option<String>,
}

/// Shortest HS256 secret accepted: 128 bits.
pub const MIN_JWT_SECRET_BYTES: usize = 16;

impl Default for JwtConfig {
    /// No key at all (a gateway refuses to start so); set at least one source.
    fn default() -> Self {
        Self {
            secret: String::new(),
            previous_secret: None,
            public_key_files: Vec::new(),
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(10),
            issuer: None,
            audience: None,
        }
    }
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &"<redacted>")
            .field("previous_secret", &self.previous_secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_files", &self.public_key_files)
            .field("jwks_url", &self.jwks_url)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("jwks_min_refetch", &self.jwks_min_refetch)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtConfig {
    pub fn from_env(env: &mut Env) -> Self {
        let default = Self::default();
        let config = Self {
            secret: env.string("HERALD_JWT_SECRET", ""),
            previous_secret: env.optional("HERALD_JWT_SECRET_PREVIOUS"),
            public_key_files: env
                .string("HERALD_JWT_PUBLIC_KEYS", "")
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
            jwks_url: env.optional("HERALD_JWKS_URL"),
            jwks_refresh: env.secs("HERALD_JWKS_REFRESH_SECS", default.jwks_refresh.as_secs()),
            jwks_min_refetch: env.secs("HERALD_JWKS_MIN_REFETCH_SECS", default.jwks_min_refetch.as_secs()),
            issuer: env.optional("HERALD_JWT_ISSUER"),
            audience: env.optional("HERALD_JWT_AUDIENCE"),
        };
        if config.secret.is_empty() && config.public_key_files.is_empty() && config.jwks_url.is_none() {
            env.invalid(
                "HERALD_JWT_SECRET: required, not set (or give HERALD_JWT_PUBLIC_KEYS or HERALD_JWKS_URL instead)",
            );
        }
        for (name, secret) in [
            ("HERALD_JWT_SECRET", Some(&config.secret)),
            ("HERALD_JWT_SECRET_PREVIOUS", config.previous_secret.as_ref()),
        ] {
            if secret.is_some_and(|s| !s.is_empty() && s.len() < MIN_JWT_SECRET_BYTES) {
                env.invalid(format!("{name}: must be at least {MIN_JWT_SECRET_BYTES} bytes"));
            }
        }
        if config.previous_secret.is_some() && config.secret.is_empty() {
            env.invalid("HERALD_JWT_SECRET_PREVIOUS: set only with HERALD_JWT_SECRET (the new secret)");
        }
        if let Some(url) = &config.jwks_url {
            if let Err(problem) = check_jwks_url(url) {
                env.invalid(format!("HERALD_JWKS_URL: {url:?} {problem}"));
            }
        }
        if !(10..=86_400).contains(&config.jwks_refresh.as_secs()) {
            env.invalid("HERALD_JWKS_REFRESH_SECS: must be 10 to 86400");
        }
        if config.jwks_min_refetch.is_zero() || config.jwks_min_refetch > config.jwks_refresh {
            env.invalid("HERALD_JWKS_MIN_REFETCH_SECS: must be at least 1 and at most HERALD_JWKS_REFRESH_SECS");
        }
        config
    }
}

/// A JWKS URL must be https, except to this host (loopback): keys fetched over plain HTTP could
/// be replaced by anyone on the path, and then sign any token.
fn check_jwks_url(url: &str) -> Result<(), &'static str> {
    let (https, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://").ok_or("must start with https://")?),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        return Err("has no host");
    }
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err("must be https:// (plain http only to a loopback address)");
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub common: CommonConfig,
    pub listen: SocketAddr,
    /// Probes and metrics (`HERALD_GATEWAY_INTERNAL_LISTEN`): a port apart from `listen`, which only
    /// the cluster reaches.
    pub internal_listen: SocketAddr,
    /// A certificate and key for the public listener to speak TLS itself (wss://), for
    /// deployments without an ingress in front. None: plain HTTP (TLS ends at the ingress).
    pub tls: Option<ServerTls>,
    /// Unique per process; a restarted gateway takes a new one so stale presence never matches.
    pub gateway_id: String,
    pub jwt: JwtConfig,
    /// How often the gateway pings each client; two silent intervals and the client is dropped.
    pub heartbeat_interval: Duration,
    /// How long a gateway stays routable after its last presence heartbeat.
    pub presence_ttl: Duration,
    /// Frames queued for one client before it counts as a slow consumer and is closed.
    pub outbound_queue: usize,
    /// Largest frame accepted from a client.
    pub max_frame_bytes: usize,
    /// Most WebSocket sessions at once. `Some(n)`: exactly n, and the gateway refuses to start if
    /// its open-file limit cannot hold them. `None` (`HERALD_MAX_CONNECTIONS` unset): as many as
    /// the limit leaves room for, at most [`DEFAULT_MAX_CONNECTIONS`]. See `fdlimit`.
    pub max_connections: Option<usize>,
    pub max_connections_per_user: usize,
    /// Sustained client frames per second per connection, with a burst of twice as many.
    pub client_frames_per_sec: u32,
    /// Sustained message ids per second one connection may ack or read, with a burst of twice
    /// as many; past it the connection is closed with 4429.
    pub client_ack_ids_per_sec: u32,
    /// The most one read takes from a client's socket, through a buffer on the stack: no
    /// connection holds it (at most [`MAX_READ_BUFFER_BYTES`]).
    pub read_buffer_bytes: usize,
    /// Bytes written to a socket before a flush is forced.
    pub write_buffer_bytes: usize,
    /// How long a client's ack waits for others to share its message on the events stream.
    /// It delays the receipt's `delivered`, never a notification.
    pub ack_linger: Duration,
    /// How long a SIGTERM'd gateway waits for its clients to go before it exits anyway.
    pub drain_grace: Duration,
    /// Over how long a draining gateway spreads the closes (1012) of its sessions, so that its
    /// clients do not all reconnect to the others at once. Shorter than `drain_grace`.
    pub drain_spread: Duration,
    /// How long a SIGTERM'd gateway keeps its sessions open while reporting not ready, so load
    /// balancers stop sending it clients before they are told to reconnect.
    pub shutdown_delay: Duration,
    /// Origins whose pages may open a WebSocket here (`https://app.example.com`). Empty: any.
    /// A connect that names another `Origin` gets 403; one with none (not a browser) is let
    /// through, since only browsers send it and a non-browser client can send any.
    pub allowed_origins: Vec<String>,
    pub topics: GatewayTopics,
}

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub common: CommonConfig,
    /// The publish and query API.
    pub listen: SocketAddr,
    /// Probes, metrics and the operator's API (`HERALD_DISPATCHER_INTERNAL_LISTEN`), which only the
    /// cluster reaches.
    pub internal_listen: SocketAddr,
    pub dispatcher_id: String,
    pub mongodb_uri: String,
    pub mongodb_database: String,
    /// The HTTP API: its tokens and limits.
    pub api: ApiConfig,
    pub max_payload_bytes: usize,
    pub max_recipients: usize,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// A message sent to a connected client and not acked within this is sent again.
    pub ack_timeout: Duration,
    /// Most pending messages in one page of a connection's replay (also bounded to one gateway
    /// command, 768 KiB). The next page follows once the connection has taken this one, so
    /// keep it well below the gateways' `HERALD_OUTBOUND_QUEUE`: live messages share the queue.
    pub replay_page: usize,
    /// JetStream ack wait of the dispatchers' consumers: how long jobs and events pulled by a
    /// dispatcher that died wait before another dispatcher gets them. Applies when the durable
    /// consumer is created.
    pub ack_wait: Duration,
    /// How often pending messages are checked for ack timeouts and expiry. A sixth of the
    /// default ack timeout: a resend is at most this late, and nothing reads the `expired` mark
    /// (replays and the API judge expiry by `expires_at`), so sweeping more often buys little.
    pub sweep_interval: Duration,
    /// How often each dispatcher samples the pending receipts for its gauges (two index reads).
    pub pending_sample: Duration,
    /// Most jobs pulled and stored per batch.
    pub job_batch: usize,
    /// How long a batch of jobs waits for more after its first: under a steady load, batches
    /// of many jobs instead of one store round trip per job, at the price of this much latency.
    pub job_linger: Duration,
    /// The same for gateway events (acks, connects): acks of many messages per receipt update.
    /// Only the receipt's `delivered` and a reconnect's replay wait for it, not delivery.
    pub event_linger: Duration,
    /// Job batches handled at once per dispatcher (one gathers while another is stored).
    pub job_workers: usize,
    /// Threads the dispatcher's async runtime runs its tasks on (`HERALD_DISPATCHER_WORKER_THREADS`).
    /// One by default: a dispatcher waits on its stores far more than it computes, and with
    /// more threads each job's hand-offs between tasks became wake-ups across threads (~20 %
    /// of its CPU per message, docs/BENCHMARKS.md §10). Dispatchers scale out by replicas.
    pub worker_threads: usize,
    /// Deliveries of a job that keeps failing (not counting store outages) before it is
    /// dead-lettered.
    pub max_attempts: u64,
    /// How long messages, receipts and the claims on message ids are kept after they expire
    /// (`HERALD_RETENTION_DAYS`), for the query API and audits. Also how long after its expiry
    /// a message id still deduplicates a re-published job.
    pub retention: Duration,
}

/// The dispatcher's HTTP API (publish, query, operate).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Bearer token of every scope: publish, read and the operator's actions.
    pub admin_token: String,
    /// Bearer token that may only publish (`/v1/publish…`), when set.
    pub publish_token: Option<String>,
    /// Bearer token that may only read (messages, pending, presence, rejections, status), when set.
    pub read_token: Option<String>,
    /// Largest request body accepted; a larger one gets 413.
    pub max_body_bytes: usize,
    /// Most jobs in one `POST /v1/publish/batch`.
    pub max_batch: usize,
    /// Origins a browser may call the API from (CORS). Empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Jobs waiting in the stream for a dispatcher above which `POST /v1/publish…` answers 503
    /// `overloaded` (with `Retry-After`); 0: no limit. Publishers on NATS are not affected.
    pub max_backlog: u64,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("ApiConfig")
            .field("admin_token", &"<redacted>")
            .field("publish_token", &redact(&self.publish_token))
            .field("read_token", &redact(&self.read_token))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch", &self.max_batch)
            .field("cors_origins", &self.cors_origins)
            .field("max_backlog", &self.max_backlog)
            .finish()
    }
}

/// Jobs waiting for a dispatcher above which the HTTP publish API refuses more: at a thousand
/// jobs a second, under two minutes of work.
pub const DEFAULT_MAX_BACKLOG: u64 = 100_000;

/// Defaults of the limits a job is validated against (the dispatcher's, and `heraldctl`'s when
/// it validates before publishing).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_RECIPIENTS: usize = 10_000;
pub const DEFAULT_TTL_SECS: u64 = 86_400;
pub const DEFAULT_MAX_TTL_SECS: u64 = 30 * 86_400;

/// The job limits from the environment: (payload bytes, recipients, default TTL, largest TTL).
pub fn job_limits(env: &mut Env) -> (usize, usize, Duration, Duration) {
    let limits = (
        env.parse("HERALD_MAX_PAYLOAD_BYTES", DEFAULT_MAX_PAYLOAD_BYTES),
        env.parse("HERALD_MAX_RECIPIENTS", DEFAULT_MAX_RECIPIENTS),
        env.secs("HERALD_DEFAULT_TTL_SECS", DEFAULT_TTL_SECS),
        env.secs("HERALD_MAX_TTL_SECS", DEFAULT_MAX_TTL_SECS),
    );
    if limits.2 > limits.3 {
        env.invalid("HERALD_DEFAULT_TTL_SECS: must not exceed HERALD_MAX_TTL_SECS");
    }
    limits
}

/// A comma-separated list of origins, each without a trailing `/`, as browsers send them.
fn origins(list: &str) -> Vec<String> {
    list.split(',').map(|o| o.trim().trim_end_matches('/').to_owned()).filter(|o| !o.is_empty()).collect()
}

/// An origin as a browser sends it: `http` or `https`, a host, an optional port; no path.
fn is_origin(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) else { return false };
    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

impl ApiConfig {
    pub fn from_env(env: &mut Env) -> Self {
        let config = Self {
            admin_token: env.required("HERALD_ADMIN_TOKEN"),
            publish_token: env.optional("HERALD_PUBLISH_TOKEN"),
            read_token: env.optional("HERALD_READ_TOKEN"),
            max_body_bytes: env.parse("HERALD_API_MAX_BODY_BYTES", 1024 * 1024),
            max_batch: env.parse("HERALD_API_MAX_BATCH", 100),
            cors_origins: origins(&env.string("HERALD_API_CORS_ORIGINS", "")),
            max_backlog: env.parse("HERALD_API_MAX_BACKLOG", DEFAULT_MAX_BACKLOG),
        };
        // Like the JWT secret: a short token can be guessed.
        for (name, token) in [
            ("HERALD_ADMIN_TOKEN", Some(&config.admin_token)),
            ("HERALD_PUBLISH_TOKEN", config.publish_token.as_ref()),
            ("HERALD_READ_TOKEN", config.read_token.as_ref()),
        ] {
            if token.is_some_and(|t| !t.is_empty() && t.len() < MIN_ADMIN_TOKEN_BYTES) {
                env.invalid(format!("{name}: must be at least {MIN_ADMIN_TOKEN_BYTES} bytes"));
            }
        }
        if config.max_body_bytes < 1024 {
            env.invalid("HERALD_API_MAX_BODY_BYTES: must be at least 1024");
        }
        if !(1..=1000).contains(&config.max_batch) {
            env.invalid("HERALD_API_MAX_BATCH: must be 1 to 1000");
        }
        for origin in config.cors_origins.iter().filter(|o| !is_origin(o)) {
            env.invalid(format!("HERALD_API_CORS_ORIGINS: {origin:?} is not an origin like http://127.0.0.1:8080"));
        }
        config
    }
}

/// Sessions per gateway when `HERALD_MAX_CONNECTIONS` is unset and the open-file limit allows.
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// The most `HERALD_WS_READ_BUFFER_BYTES` may be: the gateway's read buffer is on the stack.
pub const MAX_READ_BUFFER_BYTES: usize = 16 * 1024;
/// `HERALD_ACK_LINGER_MS` when unset, in milliseconds: an events-stream message costs the same
/// whatever it carries, and an ack delays only its receipt (docs/BENCHMARKS.md §10).
pub const DEFAULT_ACK_LINGER_MS: u64 = 100;

/// Shortest HTTP timeout accepted: below it, ordinary clients on a slow network would be cut off.
const MIN_HTTP_TIMEOUT: Duration = Duration::from_millis(100);

/// Largest replay page: a gateway remembers the last 1024 notifications it wrote to a connection
/// and asks for a page only when the connection's unacked ones leave room for one.
pub const MAX_REPLAY_PAGE: usize = 1000;
/// Most runtime threads a dispatcher may be given: far past what its work can use.
pub const MAX_WORKER_THREADS: usize = 64;

/// Shortest retention: a message id must go on deduplicating retries of its job for at least
/// a day past its expiry.
const MIN_RETENTION: Duration = Duration::from_secs(86_400);
/// Longest retention, ten years: beyond it, a typo.
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

/// Longest batching linger: beyond it, latency is lost for no fewer round trips.
const MAX_LINGER: Duration = Duration::from_secs(1);

/// Reads variables and collects what is wrong with them.
pub struct Env {
    vars: HashMap<String, String>,
    errors: Vec<String>,
}

impl Env {
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars())
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self { vars: pairs.into_iter().collect(), errors: Vec::new() }
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn string(&mut self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    pub fn optional(&mut self, name: &str) -> Option<String> {
        self.raw(name).map(str::to_owned)
    }

    pub fn required(&mut self, name: &str) -> String {
        match self.raw(name) {
            Some(v) => v.to_owned(),
            None => {
                self.errors.push(format!("{name}: required, not set"));
                String::new()
            }
        }
    }

    pub fn parse<T>(&mut self, name: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.raw(name).map(str::parse::<T>) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                self.errors.push(format!("{name}: {e}"));
                default
            }
        }
    }

    /// Like [`Env::parse`], for a variable whose absence means something of its own.
    pub fn parse_optional<T>(&mut self, name: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.raw(name).map(str::parse::<T>)? {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push(format!("{name}: {e}"));
                None
            }
        }
    }

    pub fn millis(&mut self, name: &str, default_ms: u64) -> Duration {
        Duration::from_millis(self.parse(name, default_ms))
    }

    pub fn secs(&mut self, name: &str, default_secs: u64) -> Duration {
        Duration::from_secs(self.parse(name, default_secs))
    }

    pub fn days(&mut self, name: &str, default_days: u64) -> Duration {
        Duration::from_secs(self.parse::<u64>(name, default_days).saturating_mul(86_400))
    }

    /// Records a problem found by a check that spans several variables.
    pub fn invalid(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError(self.errors))
        }
    }
}

/// A random id for this process, readable in logs: `gw-3f2a9c1d04e5`.
pub fn process_id(kind: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{kind}-{}", &id[..12])
}

/// A value that can be one token of a NATS subject and part of a Redis key.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl CommonConfig {
    pub fn from_env(env: &mut Env) -> Self {
        let prefix = env.string("HERALD_PREFIX", "herald");
        if !is_token(&prefix) {
            env.invalid(format!("HERALD_PREFIX: {prefix:?} must be 1-64 of [A-Za-z0-9_-]"));
        }
        let nats_url = env.string("HERALD_NATS_URL", "nats://127.0.0.1:14222");
        let nats_auth = nats_auth(env);
        if let Err(e) = crate::connect::nats_seeds(&nats_url) {
            env.invalid(format!("HERALD_NATS_URL: {e}"));
        } else if let Err(e) = crate::nats_auth::check_nats_credentials(&nats_url, &nats_auth) {
            env.invalid(e.to_string());
        }
        // Read by telemetry::init before the configuration; checked here with everything else.
        let (log, format) = (env.optional("HERALD_LOG"), env.optional("HERALD_LOG_FORMAT"));
        for problem in crate::telemetry::LogSettings::read(log.as_deref(), format.as_deref()).1 {
            env.invalid(problem);
        }
        let otlp = crate::telemetry::OtlpSettings::read(|name| env.optional(name));
        for problem in otlp.1 {
            env.invalid(problem);
        }
        let nats_tls = nats_tls(env);
        let redis_url = env.string("HERALD_REDIS_URL", "redis://127.0.0.1:16379");
        let redis_tls = redis_tls(env, &redis_url);
        let jetstream_replicas = env.parse("HERALD_JETSTREAM_REPLICAS", 1);
        if !(1..=5).contains(&jetstream_replicas) {
            env.invalid("HERALD_JETSTREAM_REPLICAS: must be 1 to 5");
        }
        let stream_limits = stream_limits(env);
        let topics = topic_retention(env);
        Self {
            prefix,
            redis_url,
            nats_url,
            nats_auth,
            redis_tls,
            nats_tls,
            jetstream_replicas,
            stream_limits,
            topics,
            http: HttpConfig::from_env(env),
            clock: crate::Clock::system(),
        }
    }
}

/// `HERALD_NATS_CREDS_FILE` or `HERALD_NATS_NKEY_FILE`: at most one, since a connection
/// authenticates as one user. (Names written out in each read: scripts/check-k8s.sh finds the
/// variables the code reads by them.)
pub fn nats_auth(env: &mut Env) -> NatsAuth {
    let creds = env.optional("HERALD_NATS_CREDS_FILE").map(PathBuf::from);
    let nkey = env.optional("HERALD_NATS_NKEY_FILE").map(PathBuf::from);
    match (creds, nkey) {
        (Some(_), Some(_)) => {
            env.invalid("HERALD_NATS_CREDS_FILE and HERALD_NATS_NKEY_FILE: set one, not both");
            NatsAuth::None
        }
        (Some(path), None) => NatsAuth::CredsFile(path),
        (None, Some(path)) => NatsAuth::NkeyFile(path),
        (None, None) => NatsAuth::None,
    }
}

/// One dependency's TLS files: a CA file, and a client certificate and key (both or neither),
/// each read and checked now so that a wrong file stops the start-up with its variable named.
pub fn client_tls(env: &mut Env, vars: &TlsVars) -> ClientTls {
    let ca_file = env.optional(vars.ca).map(PathBuf::from);
    let client = match (env.optional(vars.cert), env.optional(vars.key)) {
        (Some(cert), Some(key)) => Some(CertKey { cert: cert.into(), key: key.into() }),
        (None, None) => None,
        _ => {
            env.invalid(format!("{} and {}: set both or neither", vars.cert, vars.key));
            None
        }
    };
    let tls = ClientTls { ca_file, client };
    if let Err(e) = tls.check(vars) {
        env.invalid(e.to_string());
    }
    tls
}

/// `HERALD_REDIS_TLS_{CA,CERT,KEY}_FILE`, only with a TLS URL (`rediss://`): with a plain one
/// they would be ignored, and the operator believe the link encrypted.
fn redis_tls(env: &mut Env, url: &str) -> ClientTls {
    let tls = client_tls(env, &crate::tls::REDIS_TLS);
    if tls.is_set() && crate::connect::redis_uses_tls(url) == Some(false) {
        env.invalid("HERALD_REDIS_TLS_*: set, but HERALD_REDIS_URL is not a TLS URL (rediss://)");
    }
    tls
}

/// `HERALD_NATS_TLS_{CA,CERT,KEY}_FILE`. Any URL: with them set, `nats://` servers must
/// offer TLS too.
pub fn nats_tls(env: &mut Env) -> ClientTls {
    client_tls(env, &crate::tls::NATS_TLS)
}

/// `HERALD_{JOBS,EVENTS}_MAX_{AGE_SECS,BYTES}`. Unset: Herald leaves the limit alone; 0: no limit.
fn stream_limits(env: &mut Env) -> StreamLimits {
    // A job older than the largest TTL has expired: removing it loses nothing a user could still
    // get. Younger, it may be one no dispatcher has stored yet. HERALD_MAX_TTL_SECS is the
    // dispatcher's to parse and report; a gateway checks against its value (or the default) all
    // the same, since it applies the limits too.
    let max_ttl = env.raw("HERALD_MAX_TTL_SECS").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_TTL_SECS);
    let min_age = crate::streams::MIN_MAX_AGE.as_secs();
    let jobs = (env.parse_optional("HERALD_JOBS_MAX_AGE_SECS"), env.parse_optional("HERALD_JOBS_MAX_BYTES"));
    let events = (env.parse_optional("HERALD_EVENTS_MAX_AGE_SECS"), env.parse_optional("HERALD_EVENTS_MAX_BYTES"));
    let why = " (HERALD_MAX_TTL_SECS: a job younger than its TTL that no dispatcher took would be lost)";
    StreamLimits {
        jobs: checked_limits(env, "HERALD_JOBS", jobs, min_age.max(max_ttl), why),
        events: checked_limits(env, "HERALD_EVENTS", events, min_age, ""),
    }
}

/// `HERALD_TOPICS_MAX_AGE_SECS` and `HERALD_TOPICS_MAX_MSGS`, both positive: a topics stream
/// without limits would grow without end.
fn topic_retention(env: &mut Env) -> TopicRetention {
    let default = TopicRetention::default();
    let age: u64 = env.parse("HERALD_TOPICS_MAX_AGE_SECS", default.max_age.as_secs());
    let msgs: i64 = env.parse("HERALD_TOPICS_MAX_MSGS", default.max_msgs);
    if age == 0 {
        env.invalid("HERALD_TOPICS_MAX_AGE_SECS: must be positive");
    }
    if msgs <= 0 {
        env.invalid("HERALD_TOPICS_MAX_MSGS: must be positive");
    }
    TopicRetention { max_age: Duration::from_secs(age), max_msgs: msgs }
}

/// The gateway's topic limits. A recovery is queued at once, behind the `subscribe` answer, so
/// it must fit in the outbound queue (`queue`): one that could not would close every client that
/// recovers a full batch as a slow consumer. Set explicitly that large, it is an error; left to
/// its default, it is lowered to half the queue, so a small queue set before topics existed
/// still starts.
fn gateway_topics(env: &mut Env, queue: usize) -> GatewayTopics {
    let default = GatewayTopics::default();
    let recovery_max_msgs = env.parse_optional("HERALD_TOPIC_RECOVERY_MAX_MSGS");
    let topics = GatewayTopics {
        max_per_connection: env.parse("HERALD_MAX_TOPICS_PER_CONNECTION", default.max_per_connection),
        recovery_max_msgs: recovery_max_msgs.unwrap_or(default.recovery_max_msgs.min(queue / 2).max(1)),
        recovery_max_bytes: env.parse("HERALD_TOPIC_RECOVERY_MAX_BYTES", default.recovery_max_bytes),
    };
    if topics.recovery_max_msgs == 0 || topics.recovery_max_bytes == 0 {
        env.invalid("HERALD_TOPIC_RECOVERY_MAX_MSGS and HERALD_TOPIC_RECOVERY_MAX_BYTES: must be positive");
    }
    if recovery_max_msgs.is_some_and(|n| n >= queue) {
        env.invalid("HERALD_TOPIC_RECOVERY_MAX_MSGS: must be less than HERALD_OUTBOUND_QUEUE");
    }
    topics
}

/// One stream's `(max age, max bytes)`, each 0 or at least its floor.
fn checked_limits(
    env: &mut Env,
    stream: &str,
    (age, bytes): (Option<u64>, Option<u64>),
    min_age: u64,
    why: &str,
) -> Limits {
    use crate::streams::MIN_MAX_BYTES;
    if age.is_some_and(|age| age != 0 && age < min_age) {
        env.invalid(format!("{stream}_MAX_AGE_SECS: must be 0 (no limit) or at least {min_age}{why}"));
    }
    if bytes.is_some_and(|bytes| bytes != 0 && !(MIN_MAX_BYTES..=i64::MAX as u64).contains(&bytes)) {
        env.invalid(format!("{stream}_MAX_BYTES: must be 0 (no limit) or at least {MIN_MAX_BYTES}"));
    }
    Limits { max_age: age.map(Duration::from_secs), max_bytes: bytes }
}

impl HttpConfig {
    pub fn from_env(env: &mut Env) -> Self {
        let default = Self::default();
        let config = Self {
            header_timeout: env.millis("HERALD_HTTP_HEADER_TIMEOUT_MS", default.header_timeout.as_millis() as u64),
            idle_timeout: env.millis("HERALD_HTTP_IDLE_TIMEOUT_MS", default.idle_timeout.as_millis() as u64),
            max_connections: env.parse("HERALD_HTTP_MAX_CONNECTIONS", default.max_connections),
            connects_per_sec_per_ip: env.parse("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", default.connects_per_sec_per_ip),
            listen_backlog: env.parse("HERALD_LISTEN_BACKLOG", default.listen_backlog),
        };
        if config.header_timeout < MIN_HTTP_TIMEOUT || config.idle_timeout < MIN_HTTP_TIMEOUT {
            env.invalid("HERALD_HTTP_HEADER_TIMEOUT_MS and HERALD_HTTP_IDLE_TIMEOUT_MS: must be at least 100");
        }
        if config.max_connections == 0 {
            env.invalid("HERALD_HTTP_MAX_CONNECTIONS: must be positive");
        }
        if !(1..=65535).contains(&config.listen_backlog) {
            env.invalid("HERALD_LISTEN_BACKLOG: must be 1 to 65535");
        }
        config
    }
}

impl GatewayConfig {
    pub fn from_env(env: &mut Env) -> Self {
        let common = CommonConfig::from_env(env);
        let gateway_id = env.optional("HERALD_GATEWAY_ID").unwrap_or_else(|| process_id("gw"));
        if !is_token(&gateway_id) {
            env.invalid(format!("HERALD_GATEWAY_ID: {gateway_id:?} must be 1-64 of [A-Za-z0-9_-]"));
        }
        let mut config = Self {
            common,
            listen: env.parse("HERALD_GATEWAY_LISTEN", SocketAddr::from(([0, 0, 0, 0], 8080))),
            internal_listen: env.parse("HERALD_GATEWAY_INTERNAL_LISTEN", SocketAddr::from(([0, 0, 0, 0], 8180))),
            tls: server_tls(env),
            gateway_id,
            jwt: JwtConfig::from_env(env),
            heartbeat_interval: env.millis("HERALD_HEARTBEAT_INTERVAL_MS", 15_000),
            presence_ttl: env.millis("HERALD_PRESENCE_TTL_MS", 10_000),
            outbound_queue: env.parse("HERALD_OUTBOUND_QUEUE", 1024),
            max_frame_bytes: env.parse("HERALD_MAX_FRAME_BYTES", 16 * 1024),
            max_connections: env.parse_optional("HERALD_MAX_CONNECTIONS"),
            max_connections_per_user: env.parse("HERALD_MAX_CONNECTIONS_PER_USER", 16),
            client_frames_per_sec: env.parse("HERALD_CLIENT_FRAMES_PER_SEC", 50),
            client_ack_ids_per_sec: env.parse("HERALD_CLIENT_ACK_IDS_PER_SEC", 2000),
            read_buffer_bytes: env.parse("HERALD_WS_READ_BUFFER_BYTES", 4096),
            write_buffer_bytes: env.parse("HERALD_WS_WRITE_BUFFER_BYTES", 4096),
            ack_linger: env.millis("HERALD_ACK_LINGER_MS", DEFAULT_ACK_LINGER_MS),
            drain_grace: env.millis("HERALD_DRAIN_GRACE_MS", 10_000),
            // Set below from the grace when not given.
            drain_spread: Duration::ZERO,
            shutdown_delay: env.millis("HERALD_SHUTDOWN_DELAY_MS", 0),
            allowed_origins: origins(&env.string("HERALD_ALLOWED_ORIGINS", "")),
            // Set below, once the outbound queue is known.
            topics: GatewayTopics::default(),
        };
        for origin in config.allowed_origins.iter().filter(|o| !is_origin(o)) {
            env.invalid(format!("HERALD_ALLOWED_ORIGINS: {origin:?} is not an origin like https://app.example.com"));
        }
        check_internal_listen(env, "HERALD_GATEWAY", config.listen, config.internal_listen);
        // Default: most of the grace, leaving the rest for the last closes to complete.
        config.drain_spread = env
            .parse_optional::<u64>("HERALD_DRAIN_SPREAD_MS")
            .map_or(config.drain_grace * 4 / 5, Duration::from_millis);
        if config.drain_spread >= config.drain_grace && !config.drain_grace.is_zero() {
            env.invalid("HERALD_DRAIN_SPREAD_MS: must be shorter than HERALD_DRAIN_GRACE_MS");
        }
        if config.ack_linger > MAX_LINGER {
            env.invalid("HERALD_ACK_LINGER_MS: must be at most 1000");
        }
        if !(1..=MAX_READ_BUFFER_BYTES).contains(&config.read_buffer_bytes) {
            env.invalid("HERALD_WS_READ_BUFFER_BYTES: must be 1 to 16384");
        }
        if config.outbound_queue == 0 || config.max_frame_bytes == 0 {
            env.invalid("HERALD_OUTBOUND_QUEUE and HERALD_MAX_FRAME_BYTES must be positive");
        }
        config.topics = gateway_topics(env, config.outbound_queue);
        if config.presence_ttl < Duration::from_millis(300) {
            env.invalid("HERALD_PRESENCE_TTL_MS: must be at least 300");
        }
        if config.heartbeat_interval.is_zero()
            || config.client_frames_per_sec == 0
            || config.client_ack_ids_per_sec == 0
        {
            env.invalid(
                "HERALD_HEARTBEAT_INTERVAL_MS, HERALD_CLIENT_FRAMES_PER_SEC and HERALD_CLIENT_ACK_IDS_PER_SEC must be positive",
            );
        }
        config
    }

    /// Loads the gateway's configuration from the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let mut env = Env::from_process();
        let config = Self::from_env(&mut env);
        env.finish(config)
    }
}

impl DispatcherConfig {
    pub fn from_env(env: &mut Env) -> Self {
        let common = CommonConfig::from_env(env);
        let (max_payload_bytes, max_recipients, default_ttl, max_ttl) = job_limits(env);
        let config = Self {
            common,
            listen: env.parse("HERALD_DISPATCHER_LISTEN", SocketAddr::from(([0, 0, 0, 0], 8090))),
            internal_listen: env.parse("HERALD_DISPATCHER_INTERNAL_LISTEN", SocketAddr::from(([0, 0, 0, 0], 8190))),
            dispatcher_id: env.optional("HERALD_DISPATCHER_ID").unwrap_or_else(|| process_id("dsp")),
            mongodb_uri: env.string("HERALD_MONGODB_URI", "mongodb://127.0.0.1:27117"),
            mongodb_database: env.string("HERALD_MONGODB_DATABASE", "herald"),
            api: ApiConfig::from_env(env),
            max_payload_bytes,
            max_recipients,
            default_ttl,
            max_ttl,
            ack_timeout: env.millis("HERALD_ACK_TIMEOUT_MS", 30_000),
            replay_page: env.parse("HERALD_REPLAY_PAGE", 256),
            ack_wait: env.millis("HERALD_JETSTREAM_ACK_WAIT_MS", 30_000),
            sweep_interval: env.millis("HERALD_SWEEP_INTERVAL_MS", 5_000),
            pending_sample: env.millis("HERALD_PENDING_SAMPLE_MS", 15_000),
            job_batch: env.parse("HERALD_JOB_BATCH", 256),
            job_linger: env.millis("HERALD_JOB_LINGER_MS", 20),
            event_linger: env.millis("HERALD_EVENT_LINGER_MS", 50),
            job_workers: env.parse("HERALD_JOB_WORKERS", 2),
            worker_threads: env.parse("HERALD_DISPATCHER_WORKER_THREADS", 1),
            max_attempts: env.parse("HERALD_MAX_ATTEMPTS", 5),
            retention: env.days("HERALD_RETENTION_DAYS", 30),
        };
        if !(MIN_RETENTION..=MAX_RETENTION).contains(&config.retention) {
            env.invalid("HERALD_RETENTION_DAYS: must be 1 to 3650");
        }
        if config.job_batch == 0 || config.job_workers == 0 || config.max_attempts == 0 {
            env.invalid("HERALD_JOB_BATCH, HERALD_JOB_WORKERS and HERALD_MAX_ATTEMPTS must be positive");
        }
        if !(1..=MAX_WORKER_THREADS).contains(&config.worker_threads) {
            env.invalid(format!("HERALD_DISPATCHER_WORKER_THREADS: must be 1 to {MAX_WORKER_THREADS}"));
        }
        if config.job_linger > MAX_LINGER || config.event_linger > MAX_LINGER {
            env.invalid("HERALD_JOB_LINGER_MS and HERALD_EVENT_LINGER_MS: must be at most 1000");
        }
        if config.sweep_interval.is_zero() || config.ack_timeout.is_zero() {
            env.invalid("HERALD_SWEEP_INTERVAL_MS and HERALD_ACK_TIMEOUT_MS must be positive");
        }
        if !(1..=MAX_REPLAY_PAGE).contains(&config.replay_page) {
            env.invalid(format!("HERALD_REPLAY_PAGE: must be 1 to {MAX_REPLAY_PAGE}"));
        }
        if config.ack_wait < Duration::from_secs(1) {
            env.invalid("HERALD_JETSTREAM_ACK_WAIT_MS: must be at least 1000");
        }
        if config.pending_sample < Duration::from_millis(100) {
            env.invalid("HERALD_PENDING_SAMPLE_MS: must be at least 100");
        }
        check_internal_listen(env, "HERALD_DISPATCHER", config.listen, config.internal_listen);
        config
    }

    /// Loads the dispatcher's configuration from the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let mut env = Env::from_process();
        let config = Self::from_env(&mut env);
        env.finish(config)
    }
}

/// The gateway's own TLS: a PEM certificate chain and its private key, read at start (a bad
/// file stops it) and again whenever they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `HERALD_TLS_CERT_FILE` and `HERALD_TLS_KEY_FILE`: both or neither.
fn server_tls(env: &mut Env) -> Option<ServerTls> {
    let cert = env.optional("HERALD_TLS_CERT_FILE").map(PathBuf::from);
    let key = env.optional("HERALD_TLS_KEY_FILE").map(PathBuf::from);
    match (cert, key) {
        (Some(cert_file), Some(key_file)) => Some(ServerTls { cert_file, key_file }),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            env.invalid("HERALD_TLS_CERT_FILE and HERALD_TLS_KEY_FILE: set both (TLS on the public port) or neither");
            None
        }
    }
}

/// The internal listener must be a port of its own: sharing the public one would serve metrics
/// and the operator's API to whoever reaches it.
/// `service`: `HERALD_GATEWAY` or `HERALD_DISPATCHER`, the prefix of both variables.
fn check_internal_listen(env: &mut Env, service: &str, public: SocketAddr, internal: SocketAddr) {
    if internal.port() != 0 && internal.port() == public.port() {
        env.invalid(format!(
            "{service}_INTERNAL_LISTEN: {internal} must be another port than {service}_LISTEN ({public})"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_need_only_the_secrets() {
        let mut e = env(&[("HERALD_JWT_SECRET", "0123456789abcdef")]);
        let c = GatewayConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!(c.common.prefix, "herald");
        assert_eq!(c.read_buffer_bytes, 4096);
        assert!(c.gateway_id.starts_with("gw-"));
        assert_eq!(c.max_connections, None, "unset: as many as the open-file limit allows");
        assert_eq!(c.common.http, HttpConfig::default());
    }

    #[test]
    fn http_limits_are_read_and_checked() {
        let mut e = env(&[
            ("HERALD_JWT_SECRET", "0123456789abcdef"),
            ("HERALD_MAX_CONNECTIONS", "500"),
            ("HERALD_HTTP_HEADER_TIMEOUT_MS", "2500"),
            ("HERALD_HTTP_IDLE_TIMEOUT_MS", "7000"),
            ("HERALD_HTTP_MAX_CONNECTIONS", "64"),
            ("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", "0"),
            ("HERALD_LISTEN_BACKLOG", "8192"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!(c.max_connections, Some(500));
        let want = HttpConfig {
            header_timeout: Duration::from_millis(2500),
            idle_timeout: Duration::from_secs(7),
            max_connections: 64,
            connects_per_sec_per_ip: 0,
            listen_backlog: 8192,
        };
        assert_eq!(c.common.http, want);

        // Every bad one at once, in the dispatcher too (the limits are common to both).
        let mut e = env(&[
            ("HERALD_ADMIN_TOKEN", "t"),
            ("HERALD_HTTP_HEADER_TIMEOUT_MS", "0"),
            ("HERALD_HTTP_MAX_CONNECTIONS", "0"),
            ("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", "-1"),
            ("HERALD_LISTEN_BACKLOG", "0"),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        for var in [
            "HERALD_HTTP_HEADER_TIMEOUT_MS",
            "HERALD_HTTP_MAX_CONNECTIONS",
            "HERALD_HTTP_CONNECTS_PER_SEC_PER_IP",
            "HERALD_LISTEN_BACKLOG",
        ] {
            assert!(text.contains(var), "{var} missing from {text}");
        }
        let mut e = env(&[("HERALD_JWT_SECRET", "0123456789abcdef"), ("HERALD_MAX_CONNECTIONS", "lots")]);
        let c = GatewayConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_MAX_CONNECTIONS"));
    }

    #[test]
    fn topic_settings_default_and_are_checked() {
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");
        let mut e = env(&[secret]);
        let c = GatewayConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!((c.topics, c.common.topics), (GatewayTopics::default(), TopicRetention::default()));
        // A queue set small before topics existed lowers the default recovery, not the start.
        let mut e = env(&[secret, ("HERALD_OUTBOUND_QUEUE", "16")]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().topics.recovery_max_msgs, 8);
        let mut e = env(&[
            secret,
            ("HERALD_TOPICS_MAX_AGE_SECS", "0"),
            ("HERALD_TOPICS_MAX_MSGS", "-5"),
            ("HERALD_OUTBOUND_QUEUE", "100"),
            ("HERALD_TOPIC_RECOVERY_MAX_MSGS", "100"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        for var in ["HERALD_TOPICS_MAX_AGE_SECS", "HERALD_TOPICS_MAX_MSGS", "HERALD_TOPIC_RECOVERY_MAX_MSGS"] {
            assert!(text.contains(var), "{var} missing from {text}");
        }
    }

    #[test]
    fn every_bad_variable_is_reported_at_once() {
        let mut e =
            env(&[("HERALD_PREFIX", "no.dots"), ("HERALD_GATEWAY_LISTEN", "nowhere"), ("HERALD_OUTBOUND_QUEUE", "-1")]);
        let c = GatewayConfig::from_env(&mut e);
        let err = e.finish(c).unwrap_err();
        let text = err.to_string();
        for var in ["HERALD_PREFIX", "HERALD_GATEWAY_LISTEN", "HERALD_OUTBOUND_QUEUE", "HERALD_JWT_SECRET"] {
            assert!(text.contains(var), "{var} missing from {text}");
        }
    }

    #[test]
    fn jwt_key_sources_are_read_and_checked() {
        let mut e = env(&[
            ("HERALD_JWT_SECRET", "0123456789abcdef,with a comma"),
            ("HERALD_JWT_SECRET_PREVIOUS", "the-old-secret-0123"),
            ("HERALD_JWT_PUBLIC_KEYS", "/keys/a.pem, /keys/b.pem,"),
            ("HERALD_JWKS_URL", "https://idp.example.com/.well-known/jwks.json"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let jwt = e.finish(c).unwrap().jwt;
        assert_eq!(jwt.secret, "0123456789abcdef,with a comma", "a comma is part of the secret");
        assert_eq!(jwt.previous_secret.as_deref(), Some("the-old-secret-0123"));
        assert_eq!(jwt.public_key_files, [PathBuf::from("/keys/a.pem"), PathBuf::from("/keys/b.pem")]);
        assert_eq!((jwt.jwks_refresh, jwt.jwks_min_refetch), (Duration::from_secs(300), Duration::from_secs(10)));
        assert!(!format!("{jwt:?}").contains("old-secret"), "secrets are redacted");

        // Public keys or a JWKS alone will do: the secret is no longer required then.
        let mut e = env(&[("HERALD_JWKS_URL", "http://127.0.0.1:9000/jwks")]);
        let c = GatewayConfig::from_env(&mut e);
        assert!(e.finish(c).is_ok());

        let mut e = env(&[
            ("HERALD_JWT_SECRET_PREVIOUS", "short"),
            ("HERALD_JWKS_URL", "http://idp.example.com/jwks"),
            ("HERALD_JWKS_REFRESH_SECS", "5"),
            ("HERALD_JWKS_MIN_REFETCH_SECS", "0"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        for want in [
            "HERALD_JWT_SECRET_PREVIOUS: must be at least 16",
            "HERALD_JWT_SECRET_PREVIOUS: set only with",
            "HERALD_JWKS_URL: \"http://idp.example.com/jwks\" must be https://",
            "HERALD_JWKS_REFRESH_SECS",
            "HERALD_JWKS_MIN_REFETCH_SECS",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
    }

    #[test]
    fn allowed_origins_are_read_and_checked() {
        let mut e = env(&[("HERALD_JWT_SECRET", "0123456789abcdef")]);
        let c = GatewayConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap().allowed_origins.is_empty(), "unset: any origin");
        let mut e = env(&[
            ("HERALD_JWT_SECRET", "0123456789abcdef"),
            ("HERALD_ALLOWED_ORIGINS", " https://App.example.com/, http://127.0.0.1:8080 ,"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().allowed_origins, ["https://App.example.com", "http://127.0.0.1:8080"]);
        let mut e = env(&[("HERALD_JWT_SECRET", "0123456789abcdef"), ("HERALD_ALLOWED_ORIGINS", "*,app.example.com")]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        assert!(text.contains("\"*\"") && text.contains("\"app.example.com\""), "{text}");
    }

    #[test]
    fn a_jwks_url_is_https_or_loopback() {
        for good in ["https://idp.example.com/jwks", "http://localhost:8080/k", "http://[::1]:1/k", "http://127.0.0.2/"]
        {
            assert_eq!(check_jwks_url(good), Ok(()), "{good}");
        }
        for bad in
            ["ftp://x/", "idp.example.com/jwks", "https:///jwks", "http://10.0.0.1/k", "http://127.0.0.1.evil.com/k"]
        {
            assert!(check_jwks_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dispatcher_lingers_default_to_milliseconds_and_are_bounded() {
        let mut e = env(&[("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!")]);
        let c = DispatcherConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!((c.job_linger, c.event_linger), (Duration::from_millis(20), Duration::from_millis(50)));
        assert_eq!(c.replay_page, 256);
        let mut e =
            env(&[("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"), ("HERALD_EVENT_LINGER_MS", "5000")]);
        let c = DispatcherConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_EVENT_LINGER_MS"));
    }

    #[test]
    fn the_dispatcher_runs_on_one_thread_unless_told_otherwise() {
        let token = ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!");
        let mut e = env(&[token]);
        let c = DispatcherConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().worker_threads, 1);
        for bad in ["0", "65", "two"] {
            let mut e = env(&[token, ("HERALD_DISPATCHER_WORKER_THREADS", bad)]);
            let c = DispatcherConfig::from_env(&mut e);
            assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_DISPATCHER_WORKER_THREADS"), "{bad}");
        }
        let mut e = env(&[token, ("HERALD_DISPATCHER_WORKER_THREADS", "4")]);
        let c = DispatcherConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().worker_threads, 4);
    }

    #[test]
    fn the_read_buffer_is_bounded_by_the_stack_buffer() {
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");
        for bad in ["0", "16385"] {
            let mut e = env(&[secret, ("HERALD_WS_READ_BUFFER_BYTES", bad)]);
            let c = GatewayConfig::from_env(&mut e);
            assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_WS_READ_BUFFER_BYTES: must be 1 to 16384"));
        }
        let mut e = env(&[secret, ("HERALD_WS_READ_BUFFER_BYTES", "16384")]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().read_buffer_bytes, MAX_READ_BUFFER_BYTES);
    }

    #[test]
    fn the_gateways_ack_linger_defaults_to_milliseconds_and_is_bounded() {
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");
        let mut e = env(&[secret]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().ack_linger, Duration::from_millis(100));
        let mut e = env(&[secret, ("HERALD_ACK_LINGER_MS", "0")]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().ack_linger, Duration::ZERO, "0: no linger");
        let mut e = env(&[secret, ("HERALD_ACK_LINGER_MS", "1001")]);
        let c = GatewayConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_ACK_LINGER_MS: must be at most 1000"));
    }

    #[test]
    fn retention_is_in_days_and_bounded() {
        let token = ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!");
        let mut e = env(&[token]);
        let c = DispatcherConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().retention, Duration::from_secs(30 * 86_400));
        let mut e = env(&[token, ("HERALD_RETENTION_DAYS", "7")]);
        let c = DispatcherConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().retention, Duration::from_secs(7 * 86_400));
        for bad in ["0", "3651", "-1", "a week"] {
            let mut e = env(&[token, ("HERALD_RETENTION_DAYS", bad)]);
            let c = DispatcherConfig::from_env(&mut e);
            assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_RETENTION_DAYS"), "{bad}");
        }
    }

    #[test]
    fn a_short_admin_token_is_refused() {
        let mut e = env(&[("HERALD_ADMIN_TOKEN", "short")]);
        let c = DispatcherConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_ADMIN_TOKEN: must be at least 16 bytes"));
    }

    #[test]
    fn a_replay_page_is_bounded() {
        for bad in ["0", "1001"] {
            let mut e = env(&[("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"), ("HERALD_REPLAY_PAGE", bad)]);
            let c = DispatcherConfig::from_env(&mut e);
            assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_REPLAY_PAGE"), "{bad}");
        }
    }

    #[test]
    fn api_tokens_limits_and_origins_are_read_and_checked() {
        let mut e = env(&[
            ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"),
            ("HERALD_PUBLISH_TOKEN", "a-publish-token-0123"),
            ("HERALD_API_CORS_ORIGINS", "http://127.0.0.1:8080, https://app.example.com/"),
            ("HERALD_API_MAX_BATCH", "10"),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!(c.api.publish_token.as_deref(), Some("a-publish-token-0123"));
        assert_eq!(c.api.read_token, None);
        assert_eq!(c.api.cors_origins, ["http://127.0.0.1:8080", "https://app.example.com"]);
        assert_eq!((c.api.max_batch, c.api.max_body_bytes), (10, 1024 * 1024));
        assert!(!format!("{:?}", c.api).contains("publish-token"), "tokens are redacted");

        let mut e = env(&[
            ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"),
            ("HERALD_READ_TOKEN", "short"),
            ("HERALD_API_CORS_ORIGINS", "127.0.0.1:8080,*"),
            ("HERALD_API_MAX_BATCH", "0"),
            ("HERALD_API_MAX_BODY_BYTES", "10"),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        let err = e.finish(c).unwrap_err().to_string();
        for name in
            ["HERALD_READ_TOKEN", "\"127.0.0.1:8080\"", "\"*\"", "HERALD_API_MAX_BATCH", "HERALD_API_MAX_BODY_BYTES"]
        {
            assert!(err.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn nats_auth_is_one_readable_file_or_the_url() {
        let dir = std::env::temp_dir();
        let seed_file = dir.join(format!("herald-config-{}.nk", uuid::Uuid::new_v4().simple()));
        std::fs::write(&seed_file, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        let seed_path = seed_file.to_str().unwrap();
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");

        let mut e = env(&[secret]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().common.nats_auth, NatsAuth::None);
        let mut e = env(&[secret, ("HERALD_NATS_NKEY_FILE", seed_path)]);
        let c = GatewayConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!(c.common.nats_auth, NatsAuth::NkeyFile(seed_file.clone()));
        assert!(!format!("{c:?}").contains("SU"), "the seed is not in the config");

        // Both files; a file that is not there; a file and credentials in the URL: each named.
        let missing = dir.join("herald-config-missing.creds");
        let mut e = env(&[secret, ("HERALD_NATS_NKEY_FILE", seed_path), ("HERALD_NATS_CREDS_FILE", seed_path)]);
        let c = GatewayConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_NATS_CREDS_FILE and HERALD_NATS_NKEY_FILE"));
        let mut e = env(&[
            ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"),
            ("HERALD_NATS_CREDS_FILE", missing.to_str().unwrap()),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        assert!(
            text.contains("HERALD_NATS_CREDS_FILE: cannot read") && text.contains("herald-config-missing.creds"),
            "{text}"
        );
        let mut e = env(&[
            secret,
            ("HERALD_NATS_NKEY_FILE", seed_path),
            ("HERALD_NATS_URL", "nats://herald:hunter2@nats:4222"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        assert!(text.contains("HERALD_NATS_URL") && text.contains("HERALD_NATS_NKEY_FILE"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let _ = std::fs::remove_file(seed_file);
    }

    /// A self-signed certificate and its key, as PEM files in a fresh directory.
    fn cert_and_key() -> (tempfile_dir::Dir, PathBuf, PathBuf) {
        let dir = tempfile_dir::Dir::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (dir, cert_path, key_path)
    }

    /// A directory removed on drop (shared has no tempfile dependency).
    mod tempfile_dir {
        pub(super) struct Dir(pub(super) std::path::PathBuf);
        impl Dir {
            pub(super) fn new() -> Self {
                let path = std::env::temp_dir().join(format!("herald-config-{}", uuid::Uuid::new_v4().simple()));
                std::fs::create_dir(&path).unwrap();
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn redis_and_nats_tls_files_are_read_and_checked() {
        let (_dir, cert, key) = cert_and_key();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");

        let mut e = env(&[secret]);
        let c = GatewayConfig::from_env(&mut e);
        let common = e.finish(c).unwrap().common;
        assert_eq!((common.redis_tls, common.nats_tls), (ClientTls::default(), ClientTls::default()));

        let mut e = env(&[
            secret,
            ("HERALD_REDIS_URL", "rediss://redis.internal:6380"),
            ("HERALD_REDIS_TLS_CA_FILE", cert),
            ("HERALD_REDIS_TLS_CERT_FILE", cert),
            ("HERALD_REDIS_TLS_KEY_FILE", key),
            ("HERALD_NATS_URL", "tls://n1:4222,tls://n2:4222"),
            ("HERALD_NATS_TLS_CA_FILE", cert),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let common = e.finish(c).unwrap().common;
        let pair = CertKey { cert: cert.into(), key: key.into() };
        assert_eq!(common.redis_tls, ClientTls { ca_file: Some(cert.into()), client: Some(pair) });
        assert_eq!(common.nats_tls, ClientTls { ca_file: Some(cert.into()), client: None });

        // A client certificate without its key, files that are not there or not PEM, and TLS
        // files for a plain redis:// URL: every one named at once, no key material quoted.
        let key_text = std::fs::read_to_string(key).unwrap();
        let mut e = env(&[
            ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"),
            ("HERALD_REDIS_URL", "redis://127.0.0.1:6379"),
            ("HERALD_REDIS_TLS_CA_FILE", "/nonexistent/herald-ca.pem"),
            ("HERALD_NATS_TLS_CERT_FILE", cert),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", key),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        for want in [
            "HERALD_REDIS_TLS_CA_FILE: cannot read /nonexistent/herald-ca.pem",
            "HERALD_REDIS_TLS_*: set, but HERALD_REDIS_URL is not a TLS URL",
            "HERALD_NATS_TLS_CERT_FILE and HERALD_NATS_TLS_KEY_FILE: set both or neither",
            "OTEL_EXPORTER_OTLP_CERTIFICATE: ",
            "OTEL_EXPORTER_OTLP_PROTOCOL: `http/json`",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        let key_body = key_text.lines().nth(1).unwrap();
        assert!(!text.contains(key_body), "{text}");

        // A key that is not the certificate's: refused at start-up, naming the key's variable.
        let (_other, _, other_key) = cert_and_key();
        let mut e = env(&[
            secret,
            ("HERALD_NATS_TLS_CERT_FILE", cert),
            ("HERALD_NATS_TLS_KEY_FILE", other_key.to_str().unwrap()),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        assert!(text.contains("HERALD_NATS_TLS_KEY_FILE: "), "{text}");
    }

    #[test]
    fn otlp_protocol_and_files_are_read() {
        use crate::telemetry::{OtlpProtocol, OtlpSettings};
        let (_dir, cert, key) = cert_and_key();
        let vars = HashMap::from([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", cert.to_str().unwrap()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.to_str().unwrap()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.to_str().unwrap()),
        ]);
        let (settings, problems) = OtlpSettings::read(|name| vars.get(name).map(|v| v.to_string()));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(settings.protocol, OtlpProtocol::Grpc);
        assert_eq!(settings.endpoint.as_deref(), Some("https://collector:4317"));
        assert_eq!(settings.tls.client, Some(CertKey { cert: cert.clone(), key }));
        let (default, problems) = OtlpSettings::read(|_| None);
        assert_eq!((default, problems.len()), (OtlpSettings::default(), 0));
    }

    #[test]
    fn stream_limits_are_unmanaged_unless_set_and_bounded() {
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");
        let mut e = env(&[secret]);
        let c = GatewayConfig::from_env(&mut e);
        assert_eq!(e.finish(c).unwrap().common.stream_limits, StreamLimits::default());

        let mut e = env(&[
            secret,
            ("HERALD_JOBS_MAX_AGE_SECS", "2592000"),
            ("HERALD_JOBS_MAX_BYTES", "0"),
            ("HERALD_EVENTS_MAX_AGE_SECS", "3600"),
            ("HERALD_EVENTS_MAX_BYTES", "1073741824"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let limits = e.finish(c).unwrap().common.stream_limits;
        assert_eq!(limits.jobs, Limits { max_age: Some(Duration::from_secs(2_592_000)), max_bytes: Some(0) });
        assert_eq!(limits.events, Limits { max_age: Some(Duration::from_secs(3600)), max_bytes: Some(1 << 30) });

        // A jobs max age below the largest TTL would drop jobs a user could still get; a lower
        // HERALD_MAX_TTL_SECS lowers the floor with it.
        let admin = ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!");
        let mut e = env(&[admin, ("HERALD_JOBS_MAX_AGE_SECS", "86400"), ("HERALD_DEFAULT_TTL_SECS", "3600")]);
        let c = DispatcherConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        assert!(text.contains("HERALD_JOBS_MAX_AGE_SECS: must be 0 (no limit) or at least 2592000"), "{text}");
        let mut e = env(&[
            admin,
            ("HERALD_JOBS_MAX_AGE_SECS", "86400"),
            ("HERALD_DEFAULT_TTL_SECS", "3600"),
            ("HERALD_MAX_TTL_SECS", "86400"),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        assert!(e.finish(c).is_ok());

        let mut e = env(&[
            secret,
            ("HERALD_EVENTS_MAX_AGE_SECS", "60"),
            ("HERALD_EVENTS_MAX_BYTES", "1000"),
            ("HERALD_JOBS_MAX_BYTES", "-1"),
            ("HERALD_JOBS_MAX_AGE_SECS", "lots"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        for want in [
            "HERALD_EVENTS_MAX_AGE_SECS: must be 0 (no limit) or at least 120",
            "HERALD_EVENTS_MAX_BYTES: must be 0 (no limit) or at least 1048576",
            "HERALD_JOBS_MAX_BYTES: invalid digit",
            "HERALD_JOBS_MAX_AGE_SECS: invalid digit",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
    }

    #[test]
    fn dispatcher_checks_ttl_bounds() {
        let mut e = env(&[
            ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!"),
            ("HERALD_DEFAULT_TTL_SECS", "100"),
            ("HERALD_MAX_TTL_SECS", "10"),
        ]);
        let c = DispatcherConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_DEFAULT_TTL_SECS"));
    }

    #[test]
    fn the_internal_listener_has_a_port_of_its_own_and_tls_needs_both_files() {
        let secret = ("HERALD_JWT_SECRET", "0123456789abcdef");
        let mut e = env(&[secret]);
        let c = GatewayConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!((c.listen.port(), c.internal_listen.port(), c.tls), (8080, 8180, None));
        let admin = ("HERALD_ADMIN_TOKEN", "an-admin-token-of-32-characters!");
        let mut e = env(&[admin]);
        let c = DispatcherConfig::from_env(&mut e);
        let c = e.finish(c).unwrap();
        assert_eq!((c.listen.port(), c.internal_listen.port()), (8090, 8190));

        let mut e = env(&[
            secret,
            ("HERALD_GATEWAY_LISTEN", "0.0.0.0:9000"),
            ("HERALD_GATEWAY_INTERNAL_LISTEN", "127.0.0.1:9000"),
            ("HERALD_TLS_CERT_FILE", "/tls/tls.crt"),
        ]);
        let c = GatewayConfig::from_env(&mut e);
        let text = e.finish(c).unwrap_err().to_string();
        assert!(text.contains("HERALD_GATEWAY_INTERNAL_LISTEN: 127.0.0.1:9000 must be another port"), "{text}");
        assert!(text.contains("HERALD_TLS_CERT_FILE and HERALD_TLS_KEY_FILE: set both"), "{text}");
        let mut e = env(&[admin, ("HERALD_DISPATCHER_INTERNAL_LISTEN", "0.0.0.0:8090")]);
        let c = DispatcherConfig::from_env(&mut e);
        assert!(e.finish(c).unwrap_err().to_string().contains("HERALD_DISPATCHER_INTERNAL_LISTEN"));

        let mut e = env(&[secret, ("HERALD_TLS_CERT_FILE", "/tls/tls.crt"), ("HERALD_TLS_KEY_FILE", "/tls/tls.key")]);
        let c = GatewayConfig::from_env(&mut e);
        let tls = e.finish(c).unwrap().tls.unwrap();
        assert_eq!((tls.cert_file.to_str(), tls.key_file.to_str()), (Some("/tls/tls.crt"), Some("/tls/tls.key")));
    }
}
