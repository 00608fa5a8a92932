//! Real Redis, NATS (JetStream) and Mongo-compatible servers, one set per test, on free ports.
//!
//! Owns the server processes: their start, readiness, stop and restart on the same port, and
//! their removal on drop. Herald's own processes are left to the cluster module, which reads
//! every address it needs from [`Stack`].
//!
//! Binaries: `HERALD_TEST_REDIS_SERVER`, `HERALD_TEST_NATS_SERVER`, `HERALD_TEST_MONGO_SERVER`
//! (set by the Makefile), else the repository's `.venv/bin` (from `scripts/deps.sh`), else `PATH`.
//! With `MONGODB_URI` set, tests use that server instead of starting one.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use herald_shared::config::{CommonConfig, HttpConfig, NatsAuth};
use herald_shared::naming::Names;
use herald_shared::streams::StreamLimits;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::TcpProxy;
use crate::test_ca::CertFiles;
use crate::unique_name;

/// How long a server may take to become ready. Generous: parallel tests share two cores.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts on fresh ports after losing a port race with another test.
const START_ATTEMPTS: u32 = 5;

/// What a test needs around Herald: the three servers, and names no other test uses.
///
/// Herald processes should reach Mongo through [`Stack::mongo_uri`], which goes through
/// `mongo_proxy`, so any test can cut Mongo off; assertions should read through
/// `stack.mongo.uri()`, which still works during a cut. Every URL stays the same across
/// `stop`/`restart` of a server, so Herald can be configured once.
pub struct Stack {
    pub redis: Redis,
    pub nats: Nats,
    pub mongo: Mongo,
    pub mongo_proxy: TcpProxy,
    /// Herald prefix for keys, subjects and streams (see `herald_shared::naming`).
    pub prefix: String,
    /// Mongo database for this test.
    pub database: String,
    /// Set by [`Stack::start_on_redis_cluster`]: Herald uses this cluster, and `redis` is idle.
    pub redis_cluster: Option<RedisCluster>,
    /// Set by [`Stack::start_behind_sentinel`]: Herald finds `redis` through this Sentinel.
    pub redis_sentinel: Option<RedisSentinel>,
}

impl Stack {
    /// Starts the three servers concurrently and waits until each answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_nats_nodes(1).await
    }

    /// As [`Stack::start`], with a NATS cluster of `nodes` (1: a single server) and Herald's
    /// streams replicated on up to three of them.
    pub async fn start_with_nats_nodes(nodes: usize) -> anyhow::Result<Self> {
        let nats = async {
            if nodes > 1 {
                Nats::start_cluster(nodes).await
            } else {
                Nats::start().await
            }
        };
        let (redis, nats, mongo) = tokio::try_join!(Redis::start(), nats, Mongo::start())?;
        Self::of(redis, nats, mongo).await
    }

    /// A stack of servers started already (TLS ones, say): Mongo gets its proxy, and the test
    /// its own prefix and database.
    pub async fn of(redis: Redis, nats: Nats, mongo: Mongo) -> anyhow::Result<Self> {
        let mongo_proxy = TcpProxy::start(mongo.host_port()?).await?;
        let name = unique_name("t");
        Ok(Self {
            redis,
            nats,
            mongo,
            mongo_proxy,
            prefix: name.clone(),
            database: name,
            redis_cluster: None,
            redis_sentinel: None,
        })
    }

    /// As [`Stack::start`], with Herald on a Redis Cluster of three masters.
    pub async fn start_on_redis_cluster() -> anyhow::Result<Self> {
        let (mut stack, cluster) = tokio::try_join!(Self::start(), RedisCluster::start(3))?;
        stack.redis_cluster = Some(cluster);
        Ok(stack)
    }

    /// As [`Stack::start`], with Herald given a `redis-sentinel://` URL: a Sentinel monitoring
    /// `redis` tells it where the master is.
    pub async fn start_behind_sentinel() -> anyhow::Result<Self> {
        let mut stack = Self::start().await?;
        stack.redis_sentinel = Some(RedisSentinel::start(stack.redis.port()).await?);
        Ok(stack)
    }

    /// The `HERALD_REDIS_URL` of this stack: the cluster's or the Sentinel's, else `redis`'s.
    pub fn redis_url(&self) -> String {
        match (&self.redis_cluster, &self.redis_sentinel) {
            (Some(cluster), _) => cluster.url(),
            (None, Some(sentinel)) => sentinel.url(),
            (None, None) => self.redis.url(),
        }
    }

    /// The Mongo URI Herald processes should use: through `mongo_proxy`.
    pub fn mongo_uri(&self) -> String {
        self.mongo.uri_via(self.mongo_proxy.addr())
    }

    /// Settings shared by gateways and dispatchers of this stack.
    pub fn common_config(&self) -> CommonConfig {
        CommonConfig {
            prefix: self.prefix.clone(),
            redis_url: self.redis_url(),
            nats_url: self.nats.url(),
            nats_auth: NatsAuth::None,
            redis_tls: Default::default(),
            nats_tls: Default::default(),
            jetstream_replicas: self.nats.nodes().min(3),
            stream_limits: StreamLimits::default(),
            topics: Default::default(),
            // Tests connect their clients from one address, quickly: no per-address connect rate
            // unless a test sets one.
            http: HttpConfig { connects_per_sec_per_ip: 0, ..HttpConfig::default() },
            clock: herald_shared::Clock::system(),
        }
    }

    pub fn names(&self) -> Names {
        Names::new(&self.prefix)
    }
}

impl Drop for Stack {
    /// On a shared MongoDB (`MONGODB_URI`), removes this test's database, unless the test failed
    /// (its data may explain why). nx-27017 goes away with its process instead.
    fn drop(&mut self) {
        if !self.mongo.is_external() || std::thread::panicking() {
            return;
        }
        let (uri, database) = (self.mongo.uri.clone(), self.database.clone());
        // Drop may run outside a runtime, or inside one that must not block: use a thread with
        // its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let drop_db = async { mongodb::Client::with_uri_str(&uri).await?.database(&database).drop().await };
                tokio::time::timeout(Duration::from_secs(5), drop_db).await??;
                anyhow::Ok(())
            })
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("could not drop test database {}: {e:#}", self.database);
        }
    }
}

/// A `redis-server` without persistence: a restart brings it back empty.
pub struct Redis {
    process: Process,
}

impl Redis {
    pub async fn start() -> anyhow::Result<Self> {
        let program = find_binary("HERALD_TEST_REDIS_SERVER", None, "redis-server")?;
        let process = Process::start("redis", program, REDIS_READY_LINE, redis_args, redis_ready).await?;
        Ok(Self { process })
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.process.port)
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// The server's process id while it runs (the benchmarks read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.process.child.as_ref().map(Child::id)
    }

    /// Shuts the server down (SIGTERM) and waits for it to exit.
    pub async fn stop(&mut self) {
        self.process.stop().await;
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub async fn stop_hard(&mut self) {
        self.process.stop_hard().await;
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as with a
    /// server stalled on a slow disk or a paused VM, until [`Self::resume`].
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.process.signal("CONT");
    }

    /// Starts the server again on the same port, empty (stopping it first if it runs).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart(redis_ready).await
    }
}

/// `nats-server -js`, one node or a cluster of several, each with its JetStream store in its
/// temporary directory, so streams and messages survive a restart (even one after
/// [`Nats::stop_hard`]). Whole-server operations act on every node; `*_node` on one.
pub struct Nats {
    nodes: Vec<Process>,
}

/// Name of a cluster's node `i`, as JetStream reports a stream's leader.
fn nats_node_name(i: usize) -> String {
    format!("n{i}")
}

impl Nats {
    pub async fn start() -> anyhow::Result<Self> {
        let program = find_binary("HERALD_TEST_NATS_SERVER", Some("nats-server"), "nats-server")?;
        let process = Process::start("nats", program, NATS_READY_LINE, nats_args, nats_ready).await?;
        Ok(Self { nodes: vec![process] })
    }

    /// A single `nats-server -js` that also reads `config`, the text of a server configuration
    /// file (an `authorization` block, say). Ready once it greets a client with its INFO: the
    /// other starts' probes connect without credentials, which such a server may refuse.
    pub async fn start_with_config(config: &str) -> anyhow::Result<Self> {
        let program = find_binary("HERALD_TEST_NATS_SERVER", Some("nats-server"), "nats-server")?;
        let mut node = Process::new("nats", program, NATS_READY_LINE)?;
        let file = node.dir_path().join("nats.conf");
        std::fs::write(&file, config).with_context(|| format!("writing {}", file.display()))?;
        node.port = free_port()?;
        let mut args = nats_args(node.port, node.dir_path());
        args.extend(self::args(&["-c", &file.display().to_string()]));
        node.args = args;
        node.spawn_and_wait(&nats_greets).await.map_err(SpawnError::into_error)?;
        Ok(Self { nodes: vec![node] })
    }

    /// A cluster of `size` nodes on free ports, routed to each other, once JetStream has a meta
    /// leader (streams can then be created with up to `size` replicas).
    pub async fn start_cluster(size: usize) -> anyhow::Result<Self> {
        let program = find_binary("HERALD_TEST_NATS_SERVER", Some("nats-server"), "nats-server")?;
        let cluster_ports = (0..size).map(|_| free_port()).collect::<anyhow::Result<Vec<u16>>>()?;
        let routes = cluster_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::with_capacity(size);
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let mut node = Process::new("nats", program.clone(), NATS_READY_LINE)?;
            // A port just freed may come back: never one of the cluster's route ports.
            node.port = loop {
                let port = free_port()?;
                if !cluster_ports.contains(&port) {
                    break port;
                }
            };
            let mut args = nats_args(node.port, node.dir_path());
            let name = nats_node_name(i);
            let listen = format!("nats://127.0.0.1:{cluster_port}");
            args.extend(self::args(&[
                "-n",
                &name,
                "--cluster_name",
                "herald",
                "--cluster",
                &listen,
                "--routes",
                &routes,
            ]));
            node.args = args;
            // A node serves clients before the cluster has formed; JetStream is asked below.
            node.spawn_and_wait(&nats_listening).await.map_err(SpawnError::into_error)?;
            nodes.push(node);
        }
        let nats = Self { nodes };
        nats.wait_jetstream().await?;
        Ok(nats)
    }

    /// `nats://127.0.0.1:<port>`, or the seed list of every node for a cluster.
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The first node's client port.
    pub fn port(&self) -> u16 {
        self.nodes[0].port
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Shuts the server down cleanly (SIGTERM: JetStream flushes) and waits for it to exit.
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop().await;
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub async fn stop_hard(&mut self) {
        for node in &mut self.nodes {
            node.stop_hard().await;
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as with a
    /// server stalled on a slow disk or a paused VM, until [`Self::resume`].
    pub fn pause(&self) {
        for node in &self.nodes {
            node.signal("STOP");
        }
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        for node in &self.nodes {
            node.signal("CONT");
        }
    }

    /// Starts the server again on the same port with the same JetStream store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.nodes.len() == 1 {
            return self.nodes[0].restart(nats_ready).await;
        }
        self.stop().await;
        for i in 0..self.nodes.len() {
            self.nodes[i].restart(nats_listening).await?;
        }
        self.wait_jetstream().await
    }

    /// Kills one node (SIGKILL); the others carry on.
    pub async fn kill_node(&mut self, i: usize) {
        self.nodes[i].stop_hard().await;
    }

    /// Starts a killed node again, with its store; it catches up with the others by itself.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].restart(nats_listening).await
    }

    /// Which node leads `stream` (its index), if any does right now.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(herald_shared::connect::nats_seeds(&self.url()).ok()?)
            .await
            .ok()?;
        let mut stream = async_nats::jetstream::new(client).get_stream(stream).await.ok()?;
        let info = tokio::time::timeout(Duration::from_secs(3), stream.info()).await.ok()?.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        (0..self.nodes.len()).find(|i| nats_node_name(*i) == leader)
    }

    /// Until JetStream answers through the cluster (it has a meta leader).
    async fn wait_jetstream(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
            let mut last = None;
            for port in ports {
                match tokio::time::timeout(Duration::from_secs(3), nats_ready(port)).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(anyhow::anyhow!("JetStream did not answer within 3 s")),
                }
            }
            if Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| anyhow::anyhow!("no nodes")))
                    .context("nats cluster: no JetStream meta leader");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `nx-27017` (a MongoDB wire-protocol server over SQLite) with an in-memory database, or, when
/// `MONGODB_URI` is set, that server and no process.
///
/// A restart brings nx-27017 back empty. Each test should use its own database
/// ([`Stack::database`]), which is what keeps tests apart on a shared real MongoDB.
pub struct Mongo {
    /// `None` when `MONGODB_URI` names an external server.
    process: Option<Process>,
    uri: String,
}

impl Mongo {
    pub async fn start() -> anyhow::Result<Self> {
        if let Some(uri) = std::env::var("MONGODB_URI").ok().filter(|u| !u.is_empty()) {
            mongo_ready(&uri).await.with_context(|| format!("MONGODB_URI={uri}"))?;
            return Ok(Self { process: None, uri });
        }
        let program = find_binary("HERALD_TEST_MONGO_SERVER", Some("nx-27017"), "nx-27017")?;
        let process = Process::start("mongo", program, MONGO_READY_LINE, mongo_args, mongo_ready_on).await?;
        let uri = format!("mongodb://127.0.0.1:{}", process.port);
        Ok(Self { process: Some(process), uri })
    }

    /// The server's URI, for direct access (assertions, set-up).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether this is a server named by `MONGODB_URI` (which cannot be stopped or restarted).
    pub fn is_external(&self) -> bool {
        self.process.is_none()
    }

    /// `host:port` of the (first) server, for a proxy to forward to.
    pub fn host_port(&self) -> anyhow::Result<String> {
        let (_, rest) = split_uri(&self.uri)?;
        let hosts = rest.split(['/', '?']).next().unwrap_or_default();
        let first = hosts.split(',').next().unwrap_or_default();
        anyhow::ensure!(!first.is_empty(), "no host in {}", self.uri);
        Ok(if first.contains(':') { first.to_owned() } else { format!("{first}:27017") })
    }

    /// This server's URI with its host replaced by `addr` (a proxy), connecting directly to that
    /// one address (a replica set's members would otherwise be reached around the proxy).
    pub fn uri_via(&self, addr: SocketAddr) -> String {
        // `uri` was validated by `host_port` when the proxy was made.
        let Ok((userinfo, rest)) = split_uri(&self.uri) else {
            return self.uri.clone();
        };
        let (path, query) = match rest.find(['/', '?']) {
            Some(i) => rest[i..].split_once('?').unwrap_or((&rest[i..], "")),
            None => ("", ""),
        };
        let path = if path.is_empty() { "/" } else { path };
        let query = query
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("directConnection=") && !kv.starts_with("replicaSet="))
            .chain(["directConnection=true"])
            .collect::<Vec<_>>()
            .join("&");
        format!("mongodb://{userinfo}{addr}{path}?{query}")
    }

    /// Shuts nx-27017 down and waits for it to exit. Fails for an external server.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.own_process()?.stop().await;
        Ok(())
    }

    /// Starts nx-27017 again on the same port, empty. Fails for an external server.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.own_process()?.restart(mongo_ready_on).await
    }

    fn own_process(&mut self) -> anyhow::Result<&mut Process> {
        self.process.as_mut().context("MONGODB_URI is external: use a TcpProxy to simulate an outage")
    }
}

/// Splits `mongodb://user:pw@hosts/db?opts` into (`user:pw@`, `hosts/db?opts`).
fn split_uri(uri: &str) -> anyhow::Result<(&str, &str)> {
    let Some(rest) = uri.strip_prefix("mongodb://") else {
        bail!("only mongodb:// URIs can be proxied, not {uri}");
    };
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    Ok(match rest[..host_end].rfind('@') {
        Some(at) => rest.split_at(at + 1),
        None => ("", rest),
    })
}

// --- TLS variants (tests/tests/tls.rs): servers that speak only TLS, with a test CA's files ----

impl Redis {
    /// A `redis-server` that serves only TLS (`--port 0 --tls-port`), with `server`'s
    /// certificate; with `require_client_certs`, only to clients that present a certificate
    /// `ca_file` signed. Reach it at [`Redis::tls_url`].
    pub async fn start_tls(server: &CertFiles, ca_file: &Path, require_client_certs: bool) -> anyhow::Result<Self> {
        let program = find_binary("HERALD_TEST_REDIS_SERVER", None, "redis-server")?;
        let mut process = Process::new("redis", program, REDIS_READY_LINE)?;
        process.port = free_port()?;
        let mut args = redis_args(process.port, process.dir_path());
        // A later `--port` wins: no plain port at all.
        args.extend(self::args(&[
            "--port",
            "0",
            "--tls-port",
            &process.port.to_string(),
            "--tls-cert-file",
            &server.cert.display().to_string(),
            "--tls-key-file",
            &server.key.display().to_string(),
            "--tls-ca-cert-file",
            &ca_file.display().to_string(),
            "--tls-auth-clients",
            if require_client_certs { "yes" } else { "no" },
        ]));
        process.args = args;
        // The log line proves this process bound the port; a probe would need the client's files.
        process.spawn_and_wait(&tcp_listening).await.map_err(SpawnError::into_error)?;
        Ok(Self { process })
    }

    /// `rediss://127.0.0.1:<port>`, for a server from [`Redis::start_tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.process.port)
    }
}

/// A `nats-server` configuration block that makes it speak only TLS with `server`'s certificate,
/// for [`Nats::start_with_config`]; with `verify`, only to clients presenting a certificate
/// `ca_file` signed. The server still greets in the clear (INFO) before the handshake, so the
/// readiness probe works; reach it at `tls://127.0.0.1:<port>`.
pub fn nats_tls_config(server: &CertFiles, ca_file: &Path, verify: bool) -> String {
    format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 5\n}}\n",
        server.cert.display().to_string(),
        server.key.display().to_string(),
        ca_file.display().to_string(),
    )
}

/// Something accepts connections on the port.
async fn tcp_listening(port: u16) -> anyhow::Result<()> {
    TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(())
}

// --- command lines, and how each server says it is listening ------------------------------------
//
// The log line proves that *this* process bound the port: a probe alone could be answered by
// another test's server that won the race for it.

const REDIS_READY_LINE: &str = "Ready to accept connections";
const NATS_READY_LINE: &str = "Server is ready";
const MONGO_READY_LINE: &str = "Listening on 127.0.0.1:";

fn redis_args(port: u16, dir: &Path) -> Vec<OsString> {
    let (port, dir) = (port.to_string(), dir.display().to_string());
    args(&["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", &dir])
}

fn nats_args(port: u16, dir: &Path) -> Vec<OsString> {
    let (port, store) = (port.to_string(), dir.join("jetstream").display().to_string());
    args(&["-js", "-sd", &store, "-a", "127.0.0.1", "-p", &port])
}

fn mongo_args(port: u16, dir: &Path) -> Vec<OsString> {
    let port = port.to_string();
    let log = dir.join("nx-27017.log").display().to_string();
    let pid = dir.join("nx-27017.pid").display().to_string();
    args(&["--db", "memory", "--host", "127.0.0.1", "-p", &port, "--log-file", &log, "--pid-file", &pid])
}

// --- readiness probes: each answers only once the server serves its protocol ---------------------

async fn redis_ready(port: u16) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).await?;
    anyhow::ensure!(&reply == b"+PONG\r\n", "PING answered {:?}", String::from_utf8_lossy(&reply));
    Ok(())
}

async fn nats_ready(port: u16) -> anyhow::Result<()> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(format!("nats://127.0.0.1:{port}"))
        .await?;
    // JetStream answers once it has recovered its store (after a restart).
    async_nats::jetstream::new(client).query_account().await?;
    Ok(())
}

/// The server sends its INFO to a new connection, before any credentials are asked for.
async fn nats_greets(port: u16) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut greeting = [0u8; 5];
    stream.read_exact(&mut greeting).await?;
    anyhow::ensure!(&greeting == b"INFO ", "the server said {:?}", String::from_utf8_lossy(&greeting));
    Ok(())
}

/// A cluster node accepts a client connection (JetStream may not have formed yet).
async fn nats_listening(port: u16) -> anyhow::Result<()> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(format!("nats://127.0.0.1:{port}"))
        .await?;
    Ok(())
}

async fn mongo_ready_on(port: u16) -> anyhow::Result<()> {
    mongo_ready(&format!("mongodb://127.0.0.1:{port}")).await
}

async fn mongo_ready(uri: &str) -> anyhow::Result<()> {
    let mut options = mongodb::options::ClientOptions::parse(uri).await?;
    options.server_selection_timeout.get_or_insert(Duration::from_secs(2));
    options.connect_timeout.get_or_insert(Duration::from_secs(2));
    let client = mongodb::Client::with_options(options)?;
    client.database("admin").run_command(mongodb::bson::doc! { "ping": 1 }).await?;
    Ok(())
}

// --- processes ------------------------------------------------------------------------------------

/// One server process, its port and its temporary directory (log, data).
///
/// The child is killed and reaped on drop; the directory is removed then, unless the thread
/// is panicking (a failing test), in which case the log's tail is printed and the directory kept.
struct Process {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    port: u16,
    /// Line the server logs once it listens; searched only in output written since the spawn.
    ready_line: &'static str,
    dir: Option<TempDir>,
    log: PathBuf,
    /// `None` while stopped.
    child: Option<Child>,
}

impl Process {
    /// Spawns the server on a free port and waits for `ready`; on another port if it loses a port
    /// race (the port was free when picked, but someone bound it before the server did).
    async fn start<F, Fut>(
        name: &'static str,
        program: PathBuf,
        ready_line: &'static str,
        make_args: fn(u16, &Path) -> Vec<OsString>,
        ready: F,
    ) -> anyhow::Result<Self>
    where
        F: Fn(u16) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut process = Self::new(name, program, ready_line)?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            process.port = free_port()?;
            process.args = make_args(process.port, process.dir_path());
            match process.spawn_and_wait(&ready).await {
                Ok(()) => return Ok(process),
                Err(SpawnError::Exited(e)) => last_error = Some(e),
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("{name}: no attempt made")))
            .with_context(|| format!("{name}: exited early on {START_ATTEMPTS} ports"))
    }

    /// Not started yet: a temporary directory and no port.
    fn new(name: &'static str, program: PathBuf, ready_line: &'static str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(&format!("herald-{name}-")).tempdir()?;
        let log = dir.path().join(format!("{name}.log"));
        Ok(Self { name, program, args: Vec::new(), port: 0, ready_line, dir: Some(dir), log, child: None })
    }

    /// The temporary directory (the log lives in it).
    fn dir_path(&self) -> &Path {
        self.log.parent().unwrap_or(Path::new("."))
    }

    /// Stops the server if it runs, then starts it again with the same arguments (same port).
    async fn restart<F, Fut>(&mut self, ready: F) -> anyhow::Result<()>
    where
        F: Fn(u16) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        self.stop().await;
        // The port may be held briefly by a socket of the old process; keep trying it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait(&ready).await {
                Ok(()) => return Ok(()),
                Err(SpawnError::Exited(e)) if Instant::now() < deadline => {
                    tracing::warn!(service = self.name, error = %e, "restart failed, retrying on the same port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(SpawnError::Exited(e) | SpawnError::Other(e)) => {
                    return Err(e.context(format!("{}: restart on port {}", self.name, self.port)))
                }
            }
        }
    }

    async fn spawn_and_wait<F, Fut>(&mut self, ready: &F) -> Result<(), SpawnError>
    where
        F: Fn(u16) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).map_err(other)?;
        let log_start = log.metadata().map_err(other)?.len();
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(other)?)
            .stderr(log)
            // Python buffers its output when it is not a terminal.
            .env("PYTHONUNBUFFERED", "1")
            .spawn()
            .with_context(|| format!("{}: spawn {}", self.name, self.program.display()))
            .map_err(SpawnError::Other)?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut probe_error = String::from("not listening yet");
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(SpawnError::Exited(anyhow::anyhow!(
                    "{} exited with {status} on port {}; log {}:\n{}",
                    self.name,
                    self.port,
                    self.log.display(),
                    tail(&self.log, 20)
                )));
            }
            if log_contains(&self.log, log_start, self.ready_line) {
                match tokio::time::timeout(Duration::from_secs(3), ready(self.port)).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => probe_error = format!("{e:#}"),
                    Err(_) => probe_error = "readiness probe timed out".to_owned(),
                }
            }
            if Instant::now() >= deadline {
                self.kill_and_reap();
                return Err(SpawnError::Other(anyhow::anyhow!(
                    "{} not ready on port {} within {READY_TIMEOUT:?}: {probe_error}; log {}:\n{}",
                    self.name,
                    self.port,
                    self.log.display(),
                    tail(&self.log, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL if the server has not exited within [`STOP_TIMEOUT`].
    async fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // std offers only SIGKILL, and `unsafe` (libc) is forbidden in this workspace.
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                self.child = None;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(service = self.name, "did not exit on SIGTERM, killing");
        self.kill_and_reap();
    }

    async fn stop_hard(&mut self) {
        self.kill_and_reap();
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running server; panics if it cannot, as a test
    /// that means to freeze a server has failed if it did not.
    fn signal(&self, signal: &str) {
        let Some(child) = self.child.as_ref() else { panic!("{}: not running", self.name) };
        let status = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "{}: kill -{signal} failed", self.name);
    }

    /// SIGKILL and wait: the process is gone when this returns (it takes milliseconds).
    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_and_reap();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
                eprintln!(
                    "--- {} on port {}: log {} (directory kept), last lines:\n{}",
                    self.name,
                    self.port,
                    self.log.display(),
                    tail(&self.log, 30)
                );
            }
        }
    }
}

enum SpawnError {
    /// The server exited before it was ready: usually a lost port race, worth another port.
    Exited(anyhow::Error),
    Other(anyhow::Error),
}

impl SpawnError {
    fn into_error(self) -> anyhow::Error {
        match self {
            SpawnError::Exited(e) | SpawnError::Other(e) => e,
        }
    }
}

fn other(e: std::io::Error) -> SpawnError {
    SpawnError::Other(e.into())
}

/// A port nothing listens on right now, below the range the kernel draws outgoing connections'
/// ports from (`ip_local_port_range`). Someone may take it before the server binds it, which
/// [`Process::start`] handles by trying another. A server restarted on its port must find it
/// free, and a port in that range can be taken meanwhile by any client's connection, even by a
/// client retrying that very server: a loopback connect to a port nobody listens on may draw
/// that port as its own and connect to itself, holding it (Redis could not come back in
/// `services_started_before_redis_and_nats_wait_for_them_and_then_serve`, its gateway
/// reconnecting every few milliseconds).
pub fn free_port() -> anyhow::Result<u16> {
    let below = outgoing_ports_start().unwrap_or(32768);
    let range = 10_000..below.max(10_001);
    for _ in 0..100 {
        let port = rand::random_range(range.clone());
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok(listener.local_addr()?.port());
        }
    }
    // A crowded range: any free port, as the kernel picks it.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The first port of the kernel's range for outgoing connections, if it says.
fn outgoing_ports_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

fn log_contains(path: &Path, from: u64, needle: &str) -> bool {
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_string(&mut text)
    });
    read.is_ok() && text.contains(needle)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `env_var` if set, else `<repo>/.venv/bin/<venv_name>`, else `path_name` on `PATH`.
fn find_binary(env_var: &str, venv_name: Option<&str>, path_name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    if let Some(candidate) = venv_name.map(|n| repo.join(".venv/bin").join(n)).filter(|p| p.is_file()) {
        return Ok(candidate);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(path_name)).find(|p| p.is_file()))
        .with_context(|| format!("{path_name} not found: set {env_var}, or run scripts/deps.sh"))
}

// --- Redis Cluster and Sentinel ------------------------------------------------------------------

/// A Redis Cluster of `redis-server --cluster-enabled yes` masters without replicas, the slots
/// split evenly, ready when every node says `cluster_state:ok`.
pub struct RedisCluster {
    nodes: Vec<Process>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(masters > 0, "a cluster needs a master");
        let program = find_binary("HERALD_TEST_REDIS_SERVER", None, "redis-server")?;
        let starts = (0..masters).map(|_| {
            Process::start("redis-cluster", program.clone(), REDIS_READY_LINE, redis_cluster_args, redis_ready)
        });
        let cluster = Self { nodes: futures::future::try_join_all(starts).await? };
        cluster.form().await?;
        Ok(cluster)
    }

    /// `redis-cluster://127.0.0.1:<port>?node=127.0.0.1:<port>...`, every node named.
    pub fn url(&self) -> String {
        let others: Vec<String> = self.nodes[1..].iter().map(|n| format!("node=127.0.0.1:{}", n.port)).collect();
        let query = if others.is_empty() { String::new() } else { format!("?{}", others.join("&")) };
        format!("redis-cluster://127.0.0.1:{}{query}", self.nodes[0].port)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// What `redis-cli --cluster create --cluster-replicas 0` does, without its one-second
    /// pauses: each node takes its share of the slots, the first meets the others, and gossip
    /// does the rest.
    async fn form(&self) -> anyhow::Result<()> {
        use fred::prelude::ClientLike as _;
        let mut clients = Vec::new();
        for node in &self.nodes {
            clients.push(centralized_client(node.port).await?);
        }
        let share = 16384 / self.nodes.len();
        for (i, client) in clients.iter().enumerate() {
            let first = i * share;
            let last = if i + 1 == self.nodes.len() { 16383 } else { first + share - 1 };
            let args = vec!["ADDSLOTSRANGE".to_owned(), first.to_string(), last.to_string()];
            let _: String = client.custom(fred::cmd!("CLUSTER"), args).await.context("CLUSTER ADDSLOTSRANGE")?;
        }
        for node in &self.nodes[1..] {
            let bus = cluster_bus_port(&node.args).context("no --cluster-port")?;
            let args = vec!["MEET".to_owned(), "127.0.0.1".to_owned(), node.port.to_string(), bus];
            let _: String = clients[0].custom(fred::cmd!("CLUSTER"), args).await.context("CLUSTER MEET")?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        for (client, node) in clients.iter().zip(&self.nodes) {
            loop {
                let info: String = client.custom(fred::cmd!("CLUSTER"), vec!["INFO"]).await?;
                if info.contains("cluster_state:ok") && info.contains(&known) {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("redis cluster node {} not ok within {READY_TIMEOUT:?}:\n{info}", node.port);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for client in clients {
            let _ = client.quit().await;
        }
        Ok(())
    }
}

/// A Redis Sentinel (`redis-server <config> --sentinel`) monitoring one master as
/// [`SENTINEL_SERVICE`], with a quorum of one.
pub struct RedisSentinel {
    process: Process,
}

/// The service name the Sentinel knows the master by.
pub const SENTINEL_SERVICE: &str = "herald";

impl RedisSentinel {
    pub async fn start(master_port: u16) -> anyhow::Result<Self> {
        let program = find_binary("HERALD_TEST_REDIS_SERVER", None, "redis-server")?;
        let mut process = Process::new("redis-sentinel", program, SENTINEL_READY_LINE)?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            process.port = free_port()?;
            // Sentinel rewrites its configuration file: one per attempt, in its directory.
            let config = process.dir_path().join("sentinel.conf");
            let text = format!(
                "port {}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 5000\n",
                process.port,
                process.dir_path().display()
            );
            std::fs::write(&config, text)?;
            process.args = vec![config.into_os_string(), OsString::from("--sentinel")];
            match process.spawn_and_wait(&redis_ready).await {
                Ok(()) => return Ok(Self { process }),
                Err(SpawnError::Exited(e)) => last_error = Some(e),
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-sentinel: no attempt made")))
            .context(format!("redis-sentinel: exited early on {START_ATTEMPTS} ports"))
    }

    /// `redis-sentinel://127.0.0.1:<port>/0?sentinelServiceName=herald`
    pub fn url(&self) -> String {
        format!("redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SENTINEL_SERVICE}", self.process.port)
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }
}

/// Sentinel logs this once it watches the master from its configuration.
const SENTINEL_READY_LINE: &str = "+monitor master";

fn redis_cluster_args(port: u16, dir: &Path) -> Vec<OsString> {
    let mut all = redis_args(port, dir);
    // The bus port defaults to port + 10,000, which may be taken or past 65,535: pick a free one.
    // Lost to someone else, the node exits and `Process::start` tries other ports.
    let bus = free_port().map(|p| p.to_string()).unwrap_or_else(|_| "0".to_owned());
    let config = dir.join("nodes.conf").display().to_string();
    all.extend(args(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &config,
        "--cluster-port",
        &bus,
        "--cluster-node-timeout",
        "5000",
    ]));
    all
}

fn cluster_bus_port(args: &[OsString]) -> Option<String> {
    let at = args.iter().position(|a| a == "--cluster-port")?;
    args.get(at + 1).and_then(|p| p.to_str()).map(str::to_owned)
}

/// A plain client on one node, for the harness's own commands.
async fn centralized_client(port: u16) -> anyhow::Result<fred::clients::Client> {
    use fred::prelude::ClientLike as _;
    let config = fred::prelude::Config::from_url(&format!("redis://127.0.0.1:{port}"))?;
    let client = fred::types::Builder::from_config(config).build()?;
    client.init().await?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn external(uri: &str) -> Mongo {
        Mongo { process: None, uri: uri.to_owned() }
    }

    #[test]
    fn uri_via_replaces_the_hosts_and_keeps_the_rest() {
        let proxy: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let plain = external("mongodb://127.0.0.1:27017");
        assert_eq!(plain.host_port().unwrap(), "127.0.0.1:27017");
        assert_eq!(plain.uri_via(proxy), "mongodb://127.0.0.1:9/?directConnection=true");

        let full = external("mongodb://u:p@a:1,b:2/db?replicaSet=rs&w=1");
        assert_eq!(full.host_port().unwrap(), "a:1");
        assert_eq!(full.uri_via(proxy), "mongodb://u:p@127.0.0.1:9/db?w=1&directConnection=true");

        assert_eq!(external("mongodb://h?w=1").host_port().unwrap(), "h:27017");
        assert_eq!(external("mongodb://h?w=1").uri_via(proxy), "mongodb://127.0.0.1:9/?w=1&directConnection=true");
        assert!(external("mongodb+srv://cluster.example").host_port().is_err());
    }

    /// The race `Process::start` retries on: the port is taken by a server of the same kind,
    /// which would answer the readiness probe. The log line tells them apart.
    #[tokio::test]
    async fn a_server_that_loses_its_port_is_not_taken_for_ready() {
        let winner = Redis::start().await.unwrap();
        let program = find_binary("HERALD_TEST_REDIS_SERVER", None, "redis-server").unwrap();
        let mut loser = Process::new("redis", program, REDIS_READY_LINE).unwrap();
        loser.port = winner.port();
        loser.args = redis_args(loser.port, loser.dir_path());
        let outcome = loser.spawn_and_wait(&redis_ready).await;
        assert!(matches!(outcome, Err(SpawnError::Exited(_))), "the loser was taken for ready");
    }
}
