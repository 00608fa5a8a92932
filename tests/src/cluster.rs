//! Herald itself on top of a [`Stack`]: gateways and dispatchers started in-process (through the
//! same `run` functions the binaries call) or as child processes (for `kill -9`), plus what a
//! test does to them: publish jobs, mint tokens, query the API and read receipts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::TryStreamExt;
use herald_dispatcher::store::ReceiptDoc;
use herald_shared::config::{DispatcherConfig, GatewayConfig, JwtConfig};
use herald_shared::naming::collections;
use mongodb::bson::doc;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{ConnectError, TestClient};
use crate::services::Stack;
use crate::{bin_path, tokens};

pub const JWT_SECRET: &str = "herald-test-secret-0123456789";
pub const ADMIN_TOKEN: &str = "herald-test-admin-token";
pub const PUBLISH_TOKEN: &str = "herald-test-publish-token";
pub const READ_TOKEN: &str = "herald-test-read-token";

/// Settings a test may change before starting Herald.
#[derive(Debug, Clone)]
pub struct Options {
    /// Long by default, so a test passes only through the mechanism it checks and not because
    /// the ack-timeout resend covered for a bug.
    pub ack_timeout: Duration,
    pub sweep_interval: Duration,
    pub heartbeat_interval: Duration,
    pub presence_ttl: Duration,
    pub outbound_queue: usize,
    pub drain_grace: Duration,
    /// Over how long a draining gateway spreads its 1012 closes (`HERALD_DRAIN_SPREAD_MS`).
    pub drain_spread: Duration,
    pub shutdown_delay: Duration,
    /// JetStream ack wait of the dispatchers' consumers (how long a dead dispatcher's jobs wait).
    pub ack_wait: Duration,
    /// Most pending messages per replay page (`HERALD_REPLAY_PAGE`).
    pub replay_page: usize,
    /// Where process-mode gateways and dispatchers export traces (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
    /// Gateways' topic limits (`HERALD_MAX_TOPICS_PER_CONNECTION`, recovery caps).
    pub topics: herald_shared::config::GatewayTopics,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_secs(5),
            presence_ttl: Duration::from_millis(1500),
            outbound_queue: 1024,
            drain_grace: Duration::from_secs(3),
            drain_spread: Duration::from_secs(1),
            shutdown_delay: Duration::ZERO,
            ack_wait: Duration::from_secs(30),
            replay_page: 256,
            otlp_endpoint: None,
            topics: Default::default(),
        }
    }
}

pub fn gateway_config(stack: &Stack, options: &Options) -> GatewayConfig {
    GatewayConfig {
        common: stack.common_config(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        internal_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls: None,
        gateway_id: herald_shared::config::process_id("gw"),
        jwt: JwtConfig { secret: JWT_SECRET.into(), ..JwtConfig::default() },
        heartbeat_interval: options.heartbeat_interval,
        presence_ttl: options.presence_ttl,
        outbound_queue: options.outbound_queue,
        max_frame_bytes: 16 * 1024,
        max_connections: Some(10_000),
        max_connections_per_user: 16,
        client_frames_per_sec: 1000,
        client_ack_ids_per_sec: 100_000,
        read_buffer_bytes: 4096,
        write_buffer_bytes: 4096,
        // The deployed default: receipts in these tests read `delivered` as late as in production.
        ack_linger: Duration::from_millis(herald_shared::config::DEFAULT_ACK_LINGER_MS),
        drain_grace: options.drain_grace,
        drain_spread: options.drain_spread,
        shutdown_delay: options.shutdown_delay,
        allowed_origins: Vec::new(),
        // As the gateway's own configuration does when it is left to its default: a recovery
        // fits in the outbound queue of a test that makes it small.
        topics: herald_shared::config::GatewayTopics {
            recovery_max_msgs: options.topics.recovery_max_msgs.min(options.outbound_queue / 2).max(1),
            ..options.topics
        },
    }
}

pub fn dispatcher_config(stack: &Stack, options: &Options) -> DispatcherConfig {
    DispatcherConfig {
        common: stack.common_config(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        internal_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        dispatcher_id: herald_shared::config::process_id("dsp"),
        mongodb_uri: stack.mongo_uri(),
        mongodb_database: stack.database.clone(),
        api: herald_shared::config::ApiConfig {
            admin_token: ADMIN_TOKEN.into(),
            publish_token: Some(PUBLISH_TOKEN.into()),
            read_token: Some(READ_TOKEN.into()),
            max_body_bytes: 256 * 1024,
            max_batch: 20,
            cors_origins: vec!["http://127.0.0.1:8080".into()],
            max_backlog: herald_shared::config::DEFAULT_MAX_BACKLOG,
        },
        max_payload_bytes: 64 * 1024,
        max_recipients: 10_000,
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86_400),
        ack_timeout: options.ack_timeout,
        replay_page: options.replay_page,
        ack_wait: options.ack_wait,
        sweep_interval: options.sweep_interval,
        pending_sample: Duration::from_secs(1),
        retention: Duration::from_secs(30 * 86_400),
        job_batch: 256,
        job_linger: Duration::from_millis(20),
        event_linger: Duration::from_millis(50),
        job_workers: 2,
        // Read only by the binary, to build its runtime; in-process dispatchers run on the test's.
        worker_threads: 1,
        max_attempts: 5,
    }
}

/// Where a Herald process's output goes.
enum Output<'a> {
    /// Shown with the test's.
    Inherit,
    /// Piped to the caller.
    Capture,
    /// Written to this file.
    File(&'a Path),
}

/// A gateway or dispatcher running in this test process.
pub struct InProcess {
    /// The public listener: clients' WebSockets, the publish and query API.
    pub addr: SocketAddr,
    /// The internal listener: probes, metrics and the operator's API.
    pub internal: SocketAddr,
    pub id: String,
    token: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Whether `run` is still going (it has not returned, with an error or otherwise).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|task| !task.is_finished())
    }

    /// Asks it to shut down as on SIGTERM, without waiting: to watch the shutdown under way.
    pub fn begin_stop(&self) {
        self.token.cancel();
    }

    /// Asks it to shut down as on SIGTERM and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.token.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A gateway or dispatcher running as a child process, so it can be killed for real.
pub struct Process {
    /// The public listener, as [`InProcess::addr`].
    pub addr: SocketAddr,
    /// The internal listener, as [`InProcess::internal`].
    pub internal: SocketAddr,
    child: Child,
}

impl Process {
    /// `kill -9`: no drain, no cleanup, exactly like a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited (by itself, or killed).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits (up to `within`) for it to exit; returns its exit success.
    pub async fn sigterm(&mut self, within: Duration) -> anyhow::Result<bool> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "process did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Herald on one stack.
pub struct Cluster {
    pub stack: Stack,
    pub options: Options,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub db: mongodb::Database,
    http: reqwest::Client,
}

impl Cluster {
    pub async fn new(stack: Stack, options: Options) -> anyhow::Result<Self> {
        crate::init_test_logging();
        // Reconnects to any node while the nemesis of a chaos run kills others.
        let nats = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(herald_shared::connect::nats_seeds(&stack.nats.url())?)
            .await?;
        Self::with_nats(stack, options, nats).await
    }

    /// As [`Cluster::new`], with the test's own NATS client for publishing and inspecting
    /// streams: one that speaks TLS to a TLS-only server, say.
    pub async fn with_nats(stack: Stack, options: Options, nats: async_nats::Client) -> anyhow::Result<Self> {
        crate::init_test_logging();
        let js = jetstream::new(nats.clone());
        let common = stack.common_config();
        herald_shared::streams::ensure(&js, &stack.names(), common.jetstream_replicas, &common.stream_limits).await?;
        herald_shared::streams::ensure_topics(&js, &stack.names(), common.jetstream_replicas, &common.topics).await?;
        // Assertions read Mongo directly, not through the proxy a test may cut.
        let db = mongodb::Client::with_uri_str(stack.mongo.uri()).await?.database(&stack.database);
        Ok(Self { stack, options, nats, js, db, http: reqwest::Client::new() })
    }

    /// A stack with default options.
    pub async fn start() -> anyhow::Result<Self> {
        Self::new(Stack::start().await?, Options::default()).await
    }

    /// A stack with default options, Herald on a Redis Cluster of three masters.
    pub async fn start_on_redis_cluster() -> anyhow::Result<Self> {
        Self::new(Stack::start_on_redis_cluster().await?, Options::default()).await
    }

    pub async fn gateway(&self) -> anyhow::Result<InProcess> {
        self.gateway_with(gateway_config(&self.stack, &self.options)).await
    }

    pub async fn gateway_with(&self, config: GatewayConfig) -> anyhow::Result<InProcess> {
        let node = self.start_gateway_with(config).await?;
        self.wait_ready(node.internal).await?;
        Ok(node)
    }

    /// Starts a gateway without waiting for it to be ready (it may be waiting for Redis or NATS).
    pub async fn start_gateway_with(&self, mut config: GatewayConfig) -> anyhow::Result<InProcess> {
        let listeners = bind(&mut config.listen, &mut config.internal_listen).await?;
        let (addr, internal) = (config.listen, config.internal_listen);
        let id = config.gateway_id.clone();
        let token = CancellationToken::new();
        let run = herald_gateway::run(config, listeners, token.clone());
        let task = tokio::spawn(async move { run.await.map_err(anyhow::Error::from) });
        Ok(InProcess { addr, internal, id, token, task: Some(task) })
    }

    pub async fn dispatcher(&self) -> anyhow::Result<InProcess> {
        self.dispatcher_with(dispatcher_config(&self.stack, &self.options)).await
    }

    pub async fn dispatcher_with(&self, config: DispatcherConfig) -> anyhow::Result<InProcess> {
        let node = self.start_dispatcher_with(config).await?;
        self.wait_ready(node.internal).await?;
        Ok(node)
    }

    /// Starts a dispatcher without waiting for it to be ready.
    pub async fn start_dispatcher_with(&self, mut config: DispatcherConfig) -> anyhow::Result<InProcess> {
        let listeners = bind(&mut config.listen, &mut config.internal_listen).await?;
        let (addr, internal) = (config.listen, config.internal_listen);
        let id = config.dispatcher_id.clone();
        let token = CancellationToken::new();
        let run = herald_dispatcher::run(config, listeners, token.clone());
        let task = tokio::spawn(async move { run.await.map_err(anyhow::Error::from) });
        Ok(InProcess { addr, internal, id, token, task: Some(task) })
    }

    /// A gateway as a child process (the `herald-gateway` binary).
    pub async fn gateway_process(&self) -> anyhow::Result<Process> {
        self.gateway_process_with(&[], None).await
    }

    /// A gateway process with `extra` variables over the usual ones (an empty value unsets one)
    /// and, with `nofile`, that open-file limit (soft and hard, as `ulimit -n` sets them).
    pub async fn gateway_process_with(&self, extra: &[(&str, &str)], nofile: Option<u64>) -> anyhow::Result<Process> {
        let (addr, internal) = (free_addr()?, free_addr()?);
        let env = self.gateway_env(addr, internal);
        let child = self.start_process("herald-gateway", env, extra, nofile, Output::Inherit)?;
        self.ready(child, addr, internal).await
    }

    /// A gateway or dispatcher process (`herald-gateway`, `herald-dispatcher`) started with
    /// `extra` variables, without waiting for it to be ready: a restart as an orchestrator does
    /// it, which does not hold anything else up while the process waits for its dependencies.
    pub fn spawn_process(&self, binary: &str, extra: &[(&str, &str)]) -> anyhow::Result<Process> {
        let (addr, internal) = (free_addr()?, free_addr()?);
        let env = match binary {
            "herald-gateway" => self.gateway_env(addr, internal),
            _ => self.dispatcher_env(addr, internal),
        };
        let child = self.start_process(binary, env, extra, None, Output::Inherit)?;
        Ok(Process { addr, internal, child })
    }

    /// A gateway or dispatcher process, as [`Cluster::spawn_process`], that writes its output
    /// (stdout and stderr) to the file `log`, and is ready.
    pub async fn process_logging_to(
        &self,
        binary: &str,
        log: &Path,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        let (addr, internal) = (free_addr()?, free_addr()?);
        let env = match binary {
            "herald-gateway" => self.gateway_env(addr, internal),
            _ => self.dispatcher_env(addr, internal),
        };
        let child = self.start_process(binary, env, extra, None, Output::File(log))?;
        self.ready(child, addr, internal).await
    }

    /// A dispatcher as a child process (the `herald-dispatcher` binary).
    pub async fn dispatcher_process(&self) -> anyhow::Result<Process> {
        self.dispatcher_process_with(&[], None).await
    }

    /// A dispatcher process, with `extra` and `nofile` as for [`Cluster::gateway_process_with`].
    pub async fn dispatcher_process_with(
        &self,
        extra: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> anyhow::Result<Process> {
        let (addr, internal) = (free_addr()?, free_addr()?);
        let env = self.dispatcher_env(addr, internal);
        let child = self.start_process("herald-dispatcher", env, extra, nofile, Output::Inherit)?;
        self.ready(child, addr, internal).await
    }

    /// Starts a gateway process that is expected not to start, and waits up to `within` for it
    /// to exit. Returns its exit status (`None`: still running at the deadline, then killed) and
    /// everything it wrote.
    pub async fn gateway_process_exit(
        &self,
        extra: &[(&str, &str)],
        nofile: Option<u64>,
        within: Duration,
    ) -> anyhow::Result<(Option<std::process::ExitStatus>, String)> {
        use std::io::Read as _;
        let env = self.gateway_env(free_addr()?, free_addr()?);
        let mut child = self.start_process("herald-gateway", env, extra, nofile, Output::Capture)?;
        let exited = crate::eventually(within, Duration::from_millis(50), || {
            let status = child.try_wait();
            async move {
                match status {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => Err("still running".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        let status = match exited {
            Ok(status) => Some(status),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        };
        let mut output = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout.read_to_string(&mut output)?;
        }
        if let Some(mut stderr) = child.stderr.take() {
            stderr.read_to_string(&mut output)?;
        }
        Ok((status, output))
    }

    fn gateway_env(&self, addr: SocketAddr, internal: SocketAddr) -> Vec<(&'static str, String)> {
        let config = gateway_config(&self.stack, &self.options);
        vec![
            ("HERALD_GATEWAY_LISTEN", addr.to_string()),
            ("HERALD_GATEWAY_INTERNAL_LISTEN", internal.to_string()),
            ("HERALD_JWT_SECRET", config.jwt.secret.clone()),
            ("HERALD_HEARTBEAT_INTERVAL_MS", config.heartbeat_interval.as_millis().to_string()),
            ("HERALD_PRESENCE_TTL_MS", config.presence_ttl.as_millis().to_string()),
            ("HERALD_OUTBOUND_QUEUE", config.outbound_queue.to_string()),
            ("HERALD_CLIENT_FRAMES_PER_SEC", config.client_frames_per_sec.to_string()),
            ("HERALD_CLIENT_ACK_IDS_PER_SEC", config.client_ack_ids_per_sec.to_string()),
            ("HERALD_DRAIN_GRACE_MS", config.drain_grace.as_millis().to_string()),
            ("HERALD_DRAIN_SPREAD_MS", config.drain_spread.as_millis().to_string()),
            ("HERALD_SHUTDOWN_DELAY_MS", config.shutdown_delay.as_millis().to_string()),
            // As in `gateway_config`; set, so the gateway does not warn that it lowered its default.
            ("HERALD_MAX_CONNECTIONS", "10000".to_owned()),
            ("HERALD_MAX_TOPICS_PER_CONNECTION", config.topics.max_per_connection.to_string()),
            ("HERALD_TOPIC_RECOVERY_MAX_MSGS", config.topics.recovery_max_msgs.to_string()),
            ("HERALD_TOPIC_RECOVERY_MAX_BYTES", config.topics.recovery_max_bytes.to_string()),
        ]
    }

    fn dispatcher_env(&self, addr: SocketAddr, internal: SocketAddr) -> Vec<(&'static str, String)> {
        let config = dispatcher_config(&self.stack, &self.options);
        vec![
            ("HERALD_DISPATCHER_LISTEN", addr.to_string()),
            ("HERALD_DISPATCHER_INTERNAL_LISTEN", internal.to_string()),
            ("HERALD_MONGODB_URI", config.mongodb_uri.clone()),
            ("HERALD_MONGODB_DATABASE", config.mongodb_database.clone()),
            ("HERALD_ADMIN_TOKEN", config.api.admin_token.clone()),
            ("HERALD_ACK_TIMEOUT_MS", config.ack_timeout.as_millis().to_string()),
            ("HERALD_REPLAY_PAGE", config.replay_page.to_string()),
            ("HERALD_JETSTREAM_ACK_WAIT_MS", config.ack_wait.as_millis().to_string()),
            ("HERALD_SWEEP_INTERVAL_MS", config.sweep_interval.as_millis().to_string()),
            ("HERALD_DEFAULT_TTL_SECS", config.default_ttl.as_secs().to_string()),
            ("HERALD_MAX_TTL_SECS", config.max_ttl.as_secs().to_string()),
        ]
    }

    /// Starts `binary` with the stack's common variables, `env`, then `extra`, its output where
    /// `output` says.
    fn start_process(
        &self,
        binary: &str,
        env: Vec<(&str, String)>,
        extra: &[(&str, &str)],
        nofile: Option<u64>,
        output: Output<'_>,
    ) -> anyhow::Result<Child> {
        let common = self.stack.common_config();
        let log = std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let path = bin_path(binary)?;
        let mut command = match nofile {
            // `ulimit -n` in a shell that then becomes the binary: no unsafe pre_exec needed.
            Some(nofile) => {
                let mut sh = Command::new("/bin/sh");
                sh.args(["-c", "ulimit -n \"$1\" && exec \"$0\""]).arg(&path).arg(nofile.to_string());
                sh
            }
            None => Command::new(&path),
        };
        match output {
            Output::Inherit => {}
            Output::Capture => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            Output::File(path) => {
                let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
                command.stdout(file.try_clone()?).stderr(file);
            }
        }
        command
            .env_clear()
            .env("HERALD_PREFIX", &common.prefix)
            .env("HERALD_REDIS_URL", &common.redis_url)
            .env("HERALD_NATS_URL", &common.nats_url)
            .env("HERALD_JETSTREAM_REPLICAS", common.jetstream_replicas.to_string())
            .env("HERALD_LOG", log)
            // Tests connect their clients from one address, quickly: as in `Stack::common_config`,
            // no per-address connect rate unless a test sets one.
            .env("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", "0")
            .envs(env)
            .envs(extra.iter().copied())
            .envs(self.options.otlp_endpoint.iter().flat_map(|endpoint| {
                // Export every 100 ms rather than every 5 s, so tests see spans quickly.
                [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()), ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned())]
            }))
            .stdin(Stdio::null());
        command.spawn().with_context(|| format!("spawning {binary}"))
    }

    async fn ready(&self, child: Child, addr: SocketAddr, internal: SocketAddr) -> anyhow::Result<Process> {
        let process = Process { addr, internal, child };
        self.wait_ready(internal).await?;
        Ok(process)
    }

    /// Waits until `/readyz` on the internal listener at `internal` answers 200.
    pub async fn wait_ready(&self, internal: SocketAddr) -> anyhow::Result<()> {
        let addr = internal;
        let url = format!("http://{addr}/readyz");
        crate::eventually(Duration::from_secs(20), Duration::from_millis(50), || async {
            let response = self.http.get(&url).send().await.map_err(|e| e.to_string())?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("{url}: {}", response.status()))
            }
        })
        .await
    }

    pub fn token(&self, user: &str) -> String {
        tokens::mint(JWT_SECRET, user, Duration::from_secs(3600))
    }

    /// Connects `user` to the gateway at `addr`.
    pub async fn connect(&self, addr: SocketAddr, user: &str) -> Result<TestClient, ConnectError> {
        TestClient::connect(&ws_url(addr), &self.token(user)).await
    }

    /// Connects `user` with a token whose `topics` claim is `topics`.
    pub async fn connect_topics(
        &self,
        addr: SocketAddr,
        user: &str,
        topics: &[&str],
    ) -> Result<TestClient, ConnectError> {
        let token = tokens::Claims::new(user, Duration::from_secs(3600)).topics(topics).sign(JWT_SECRET);
        TestClient::connect(&ws_url(addr), &token).await
    }

    /// Publishes a job (any JSON) and waits for JetStream's acknowledgement. With `id`, sets
    /// `Nats-Msg-Id` as the protocol recommends. Returns the stream sequence.
    pub async fn publish(&self, job: &Value) -> anyhow::Result<u64> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = job.get("id").and_then(Value::as_str) {
            headers.insert("Nats-Msg-Id", id);
        }
        self.publish_raw(serde_json::to_vec(job)?, headers).await
    }

    pub async fn publish_raw(&self, body: Vec<u8>, headers: async_nats::HeaderMap) -> anyhow::Result<u64> {
        let subject = self.stack.names().publish_subject("test");
        let ack = self.js.publish_with_headers(subject, headers, body.into()).await?.await?;
        Ok(ack.sequence)
    }

    /// A simple job: `{"id": id, "to": to, "payload": {"n": id}}`.
    pub async fn send(&self, id: &str, to: &[&str]) -> anyhow::Result<u64> {
        self.publish(&serde_json::json!({ "id": id, "to": to, "payload": { "n": id } })).await
    }

    /// GET on a dispatcher's API, with or without the admin token; returns status and body.
    pub async fn api(&self, dispatcher: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.get(format!("http://{dispatcher}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Any request to a dispatcher's API: method, path, bearer token, extra headers and a body.
    /// Returns status, the response headers and the body as JSON (Null when it is not JSON).
    pub async fn request(
        &self,
        method: reqwest::Method,
        dispatcher: SocketAddr,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
        let mut request = self.http.request(method, format!("http://{dispatcher}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, headers, body))
    }

    /// POST of a JSON body to a dispatcher's API; returns status and body.
    pub async fn post(
        &self,
        dispatcher: SocketAddr,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let (status, _, body) =
            self.request(reqwest::Method::POST, dispatcher, path, token, &[], Some(serde_json::to_vec(body)?)).await?;
        Ok((status, body))
    }

    /// The jobs stream's last sequence: what has ever been published to it (consumed or not).
    pub async fn jobs_last_seq(&self) -> anyhow::Result<u64> {
        let mut stream = self.js.get_stream(self.stack.names().jobs_stream()).await?;
        Ok(stream.info().await?.state.last_sequence)
    }

    /// Receipt states of one message, by user, read straight from the store.
    pub async fn receipts(&self, message_id: &str) -> anyhow::Result<BTreeMap<String, ReceiptDoc>> {
        let receipts: Vec<ReceiptDoc> = self
            .db
            .collection::<ReceiptDoc>(collections::RECEIPTS)
            .find(doc! { "message_id": message_id })
            .await?
            .try_collect()
            .await?;
        Ok(receipts.into_iter().map(|r| (r.user.to_string(), r)).collect())
    }

    /// All receipts in one state, as (message id, user) pairs.
    pub async fn receipts_in(&self, state: &str) -> anyhow::Result<Vec<(String, String)>> {
        let receipts: Vec<ReceiptDoc> = self
            .db
            .collection::<ReceiptDoc>(collections::RECEIPTS)
            .find(doc! { "state": state })
            .await?
            .try_collect()
            .await?;
        Ok(receipts.into_iter().map(|r| (r.message_id.into_string(), r.user.into_string())).collect())
    }

    /// Waits until the receipt of (`message_id`, `user`) is in `state`.
    pub async fn wait_receipt(&self, message_id: &str, user: &str, state: &str) -> anyhow::Result<ReceiptDoc> {
        crate::eventually(Duration::from_secs(15), Duration::from_millis(50), || async {
            let receipts = self.receipts(message_id).await.map_err(|e| e.to_string())?;
            match receipts.get(user) {
                Some(r) if r.state.as_str() == state => Ok(r.clone()),
                Some(r) => Err(format!("{message_id}/{user} is {:?}, waiting for {state}", r.state)),
                None => Err(format!("no receipt for {message_id}/{user}")),
            }
        })
        .await
    }

    /// Waits until a gateway's presence shows `user` connected (`online`) or not.
    pub async fn wait_presence(&self, dispatcher: SocketAddr, user: &str, online: bool) -> anyhow::Result<()> {
        crate::eventually(Duration::from_secs(10), Duration::from_millis(25), || async {
            let (_, body) = self
                .api(dispatcher, &format!("/v1/users/{user}/presence"), Some(ADMIN_TOKEN))
                .await
                .map_err(|e| e.to_string())?;
            if body["online"] == online {
                Ok(())
            } else {
                Err(format!("presence of {user}: {body}"))
            }
        })
        .await
    }
}

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/v1/connect")
}

/// Binds both listeners of a service at `public` and `internal` (port 0: any free one) and
/// writes the addresses they got back, for the test to use.
async fn bind(public: &mut SocketAddr, internal: &mut SocketAddr) -> anyhow::Result<herald_shared::serve::Listeners> {
    let backlog = herald_shared::config::HttpConfig::default().listen_backlog;
    let listeners = herald_shared::serve::Listeners::bind(*public, *internal, backlog)?;
    *public = listeners.public.local_addr()?;
    *internal = listeners.internal.local_addr()?;
    Ok(listeners)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

// --- for fault tests ------------------------------------------------------------------------------

impl Process {
    /// The child's process id, to signal it (SIGSTOP, SIGTERM) or read its memory.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the child in KiB, from /proc (Linux only).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
        let kib = line.split_whitespace().nth(1).context("no VmRSS value")?;
        Ok(kib.parse()?)
    }
}

impl Cluster {
    /// A Redis client on the Redis Herald uses (a cluster's, or the master behind a Sentinel),
    /// for tests that inspect presence.
    pub async fn redis(&self) -> anyhow::Result<fred::clients::Client> {
        use fred::prelude::ClientLike as _;
        let config = fred::prelude::Config::from_url(&self.stack.redis_url())?;
        let client = fred::types::Builder::from_config(config).build()?;
        client.init().await?;
        Ok(client)
    }

    /// Waits until every job published so far has been handled: stored, routed and acked (the
    /// dispatcher acks a job only after handing its deliveries to NATS).
    pub async fn wait_jobs_handled(&self) -> anyhow::Result<()> {
        crate::eventually(Duration::from_secs(15), Duration::from_millis(20), || async {
            let info = self.jobs_consumer_info().await.map_err(|e| e.to_string())?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                Ok(())
            } else {
                Err(format!("{} jobs waiting, {} unacked", info.num_pending, info.num_ack_pending))
            }
        })
        .await
    }

    /// The jobs stream's durable consumer, as JetStream reports it.
    pub async fn jobs_consumer_info(&self) -> anyhow::Result<jetstream::consumer::Info> {
        let names = self.stack.names();
        let stream = self.js.get_stream(names.jobs_stream()).await?;
        let mut consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> =
            stream.get_consumer(names.jobs_consumer()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(consumer.info().await?.clone())
    }
}
