//! The systems under test, started for one run and stopped when dropped: Herald (its
//! dependencies through the test harness, then gateway and dispatcher processes built in the same
//! profile as the generator), the Socket.IO peer (Node processes sharing a Redis), the plain `ws`
//! peer (Node processes sharing nothing) and the bare fan-out server (the limit).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use herald_tests::services::{Redis, Stack};

use super::metrics;
use super::mongo_proxy::CountingProxy;

pub(crate) const JWT_SECRET: &str = "herald-bench-secret-0123456789";
const ADMIN_TOKEN: &str = "herald-bench-admin-token";

/// One server process, killed (SIGKILL) and reaped when dropped.
pub(crate) struct Server {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    /// Where its probes and metrics are: Herald's internal listener, or `addr` for a process
    /// with one port.
    pub(crate) internal: SocketAddr,
    child: Child,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        metrics::rss_kib(self.pid()).unwrap_or(0)
    }

    pub(crate) fn cpu_secs(&self) -> f64 {
        metrics::cpu_secs(self.pid()).unwrap_or(0.0)
    }

    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, as Kubernetes stops a pod: the process drains and exits by itself. (std sends
    /// only SIGKILL, and `unsafe` (libc) is forbidden in this workspace.)
    pub(crate) fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} ({}) failed: {status}", self.pid(), self.name);
        Ok(())
    }

    /// Whether `GET http://internal/path` answers 2xx now.
    pub(crate) async fn answers(&self, http: &reqwest::Client, path: &str) -> bool {
        let url = format!("http://{}{path}", self.internal);
        matches!(http.get(&url).send().await, Ok(response) if response.status().is_success())
    }

    /// `kill -9`, as a crash.
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn(name: &str, program: &Path, args: &[&str], env: &[(String, String)], logs: &Path) -> anyhow::Result<Server> {
    let addr: SocketAddr = env
        .iter()
        .find(|(k, _)| (k.ends_with("LISTEN") && !k.ends_with("INTERNAL_LISTEN")) || k == "PORT_ADDR")
        .map(|(_, v)| v.parse())
        .transpose()?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let internal: SocketAddr =
        env.iter().find(|(k, _)| k.ends_with("INTERNAL_LISTEN")).map(|(_, v)| v.parse()).transpose()?.unwrap_or(addr);
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawning {name} ({})", program.display()))?;
    Ok(Server { name: name.to_owned(), addr, internal, child })
}

/// A port nothing listens on now.
pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits until `GET http://addr/path` answers 2xx, failing early if the process died.
async fn wait_http(server: &mut Server, path: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(server.is_running(), "{} exited during start-up; see its log", server.name);
        if server.answers(&http, path).await {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} not ready at http://{}{path} within 60 s",
            server.name,
            server.internal
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Herald's binaries next to the running generator (`target/<profile>/`).
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("generator has no directory")?.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build Herald in the generator's profile (cargo build --release --bins)",
        path.display()
    );
    Ok(path)
}

/// Gateway settings a scenario may change.
#[derive(Debug, Clone)]
pub(crate) struct HeraldOptions {
    pub(crate) gateways: usize,
    pub(crate) dispatchers: usize,
    /// `HERALD_MAX_CONNECTIONS`; `None`: the gateway's default, as many as its open-file limit
    /// allows (at most 50,000), so that a run is not refused on a machine with a lower limit.
    pub(crate) max_connections: Option<usize>,
    pub(crate) presence_ttl_ms: u64,
    pub(crate) ack_timeout_ms: u64,
    /// `HERALD_SWEEP_INTERVAL_MS` of the dispatchers; `None`: their default.
    pub(crate) sweep_interval_ms: Option<u64>,
    /// More settings for every gateway (e.g. the drain's), before `HERALD_BENCH_GATEWAY_ENV`.
    pub(crate) gateway_env: Vec<(&'static str, String)>,
}

impl Default for HeraldOptions {
    fn default() -> Self {
        Self {
            gateways: 2,
            dispatchers: 1,
            max_connections: None,
            presence_ttl_ms: 10_000,
            ack_timeout_ms: 30_000,
            sweep_interval_ms: None,
            gateway_env: Vec::new(),
        }
    }
}

/// Herald on its own Redis, NATS and store, with the store behind a counting proxy.
pub(crate) struct Herald {
    pub(crate) stack: Stack,
    pub(crate) store_proxy: CountingProxy,
    pub(crate) gateways: Vec<Server>,
    pub(crate) gateway_ids: Vec<String>,
    /// Starts the gateways, and their replacements in a rolling restart.
    pub(crate) launcher: GatewayLauncher,
    pub(crate) dispatchers: Vec<Server>,
    pub(crate) nats: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) db: mongodb::Database,
}

impl Herald {
    pub(crate) async fn start(options: &HeraldOptions, logs: &Path) -> anyhow::Result<Self> {
        let stack = Stack::start().await?;
        let store_proxy = CountingProxy::start(stack.mongo.host_port()?).await?;
        let nats = async_nats::connect(stack.nats.url()).await?;
        let js = async_nats::jetstream::new(nats.clone());
        // The dispatchers create the streams (before any job is published: they start first).
        let db = mongodb::Client::with_uri_str(stack.mongo.uri()).await?.database(&stack.database);
        let common = stack.common_config();
        let base = [
            ("HERALD_PREFIX", common.prefix.clone()),
            ("HERALD_REDIS_URL", common.redis_url.clone()),
            ("HERALD_NATS_URL", common.nats_url.clone()),
            ("HERALD_LOG", std::env::var("HERALD_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
        ];
        let mut gateway_env = base.to_vec();
        gateway_env.extend([
            ("HERALD_JWT_SECRET", JWT_SECRET.into()),
            ("HERALD_PRESENCE_TTL_MS", options.presence_ttl_ms.to_string()),
            // The generator's users connect from a handful of loopback addresses, as fast as
            // a storm needs: a per-address rate limit would measure itself, not Herald.
            ("HERALD_HTTP_CONNECTS_PER_SEC_PER_IP", "0".into()),
        ]);
        gateway_env.extend(options.max_connections.map(|max| ("HERALD_MAX_CONNECTIONS", max.to_string())));
        gateway_env.extend(options.gateway_env.iter().cloned());
        let launcher =
            GatewayLauncher { program: sibling_binary("herald-gateway")?, env: gateway_env, logs: logs.to_owned() };
        let mut herald = Self {
            stack,
            store_proxy,
            gateways: Vec::new(),
            gateway_ids: Vec::new(),
            launcher,
            dispatchers: Vec::new(),
            nats,
            js,
            db,
        };
        let store_uri = format!("mongodb://{}/?directConnection=true", herald.store_proxy.addr);
        for i in 0..options.dispatchers {
            let mut env = base.to_vec();
            env.extend([
                ("HERALD_DISPATCHER_LISTEN", free_addr()?.to_string()),
                ("HERALD_DISPATCHER_INTERNAL_LISTEN", free_addr()?.to_string()),
                ("HERALD_MONGODB_URI", store_uri.clone()),
                ("HERALD_MONGODB_DATABASE", herald.stack.database.clone()),
                ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN.into()),
                ("HERALD_ACK_TIMEOUT_MS", options.ack_timeout_ms.to_string()),
            ]);
            env.extend(options.sweep_interval_ms.map(|ms| ("HERALD_SWEEP_INTERVAL_MS", ms.to_string())));
            let env = with_extra(&env, "HERALD_BENCH_DISPATCHER_ENV");
            let mut server = spawn(&format!("dispatcher-{i}"), &sibling_binary("herald-dispatcher")?, &[], &env, logs)?;
            wait_http(&mut server, "/readyz").await?;
            herald.dispatchers.push(server);
        }
        for i in 0..options.gateways {
            let id = format!("bench-gw-{i}");
            let mut server = herald.launcher.launch(&format!("gateway-{i}"), &id, free_addr()?, free_addr()?)?;
            wait_http(&mut server, "/readyz").await?;
            herald.gateways.push(server);
            herald.gateway_ids.push(id);
        }
        Ok(herald)
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.gateways.iter().map(|g| format!("ws://{}/v1/connect", g.addr)).collect()
    }

    /// Starts a replacement for gateway `i`, which must have exited, on the same address (as a
    /// pod behind the same Service) and with a new id (as a new pod); does not wait for it to be
    /// ready. `generation` numbers the replacements of one gateway, from 1.
    pub(crate) fn replace_gateway(&mut self, i: usize, generation: usize) -> anyhow::Result<()> {
        let old = &mut self.gateways[i];
        anyhow::ensure!(!old.is_running(), "{} is still running; it cannot be replaced", old.name);
        let id = format!("bench-gw-{i}-r{generation}");
        let (addr, internal) = (self.gateways[i].addr, self.gateways[i].internal);
        self.gateways[i] = self.launcher.launch(&format!("gateway-{i}-r{generation}"), &id, addr, internal)?;
        self.gateway_ids[i] = id;
        Ok(())
    }

    pub(crate) fn redis_port(&self) -> u16 {
        self.stack.redis.port()
    }

    /// CPU seconds used so far by the store server and by NATS (0 when not found, e.g. an
    /// external MongoDB).
    pub(crate) fn deps_cpu_secs(&self) -> (f64, f64) {
        let cpu = |needles: &[&str]| metrics::find_pid(needles).and_then(metrics::cpu_secs).unwrap_or(0.0);
        let store_port = self.stack.mongo.host_port().unwrap_or_default();
        let store_port = store_port.rsplit(':').next().unwrap_or_default().to_owned();
        let nats_port = self.stack.nats.port().to_string();
        (cpu(&["nx", &format!(" {store_port} ")]), cpu(&["nats-server", &format!(" {nats_port} ")]))
    }
}

/// What every gateway of one Herald is started with; each gets its own address and id.
pub(crate) struct GatewayLauncher {
    program: PathBuf,
    env: Vec<(&'static str, String)>,
    logs: PathBuf,
}

impl GatewayLauncher {
    /// Starts a gateway process listening on `addr` and `internal` (its log is `<name>.log`);
    /// does not wait.
    fn launch(&self, name: &str, id: &str, addr: SocketAddr, internal: SocketAddr) -> anyhow::Result<Server> {
        let mut env = self.env.clone();
        env.extend([
            ("HERALD_GATEWAY_LISTEN", addr.to_string()),
            ("HERALD_GATEWAY_INTERNAL_LISTEN", internal.to_string()),
            ("HERALD_GATEWAY_ID", id.to_owned()),
        ]);
        let env = with_extra(&env, "HERALD_BENCH_GATEWAY_ENV");
        spawn(name, &self.program, &[], &env, &self.logs)
    }
}

/// The Socket.IO peer: Node processes sharing one Redis through `@socket.io/redis-adapter`.
pub(crate) struct Peer {
    pub(crate) redis: Redis,
    pub(crate) nodes: Vec<Server>,
}

impl Peer {
    pub(crate) async fn start(processes: usize, logs: &Path) -> anyhow::Result<Self> {
        let redis = Redis::start().await?;
        let mut nodes = Vec::new();
        for i in 0..processes {
            let env = [("REDIS_URL", redis.url())];
            nodes.push(start_node(&format!("peer-{i}"), "server.js", &env, logs).await?);
        }
        Ok(Self { redis, nodes })
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("ws://{}/socket.io/?EIO=4&transport=websocket", n.addr)).collect()
    }
}

/// The plain `ws` peer: Node processes with a bare `WebSocketServer` each, sharing nothing.
pub(crate) struct WsPeer {
    pub(crate) nodes: Vec<Server>,
}

impl WsPeer {
    pub(crate) async fn start(processes: usize, logs: &Path) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for i in 0..processes {
            nodes.push(start_node(&format!("ws-{i}"), "ws-server.js", &[], logs).await?);
        }
        Ok(Self { nodes })
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("ws://{}/", n.addr)).collect()
    }
}

/// Starts `tests/peer/<script>` under Node on a free port, with `env` besides the port, and waits
/// for its `/healthz`.
async fn start_node(name: &str, script: &str, env: &[(&str, String)], logs: &Path) -> anyhow::Result<Server> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peer");
    anyhow::ensure!(
        dir.join("node_modules").is_dir(),
        "{}/node_modules missing: run `npm ci` there (scripts/bench.sh does)",
        dir.display()
    );
    let node = which("node").context("node not on PATH (the peers are Node programs)")?;
    let addr = free_addr()?;
    let mut env = env.to_vec();
    env.extend([
        ("PORT_ADDR", addr.to_string()),
        ("PORT", addr.port().to_string()),
        ("NODE_ENV", "production".to_owned()),
    ]);
    let script = dir.join(script);
    let script = script.to_string_lossy();
    let env = with_extra(&env, "");
    let mut server = spawn(name, &node, &["--max-old-space-size=4096", "--expose-gc", &script], &env, logs)?;
    wait_http(&mut server, "/healthz").await?;
    Ok(server)
}

/// The bare fan-out server: the limit of what one process can push over WebSockets here.
pub(crate) struct Limit {
    pub(crate) servers: Vec<Server>,
}

impl Limit {
    pub(crate) async fn start(processes: usize, logs: &Path) -> anyhow::Result<Self> {
        let program = sibling_binary("bare-fanout")?;
        let mut servers = Vec::new();
        for i in 0..processes {
            let env = [("BARE_FANOUT_LISTEN", free_addr()?.to_string())];
            let env = with_extra(&env, "");
            let mut server = spawn(&format!("limit-{i}"), &program, &[], &env, logs)?;
            wait_http(&mut server, "/healthz").await?;
            servers.push(server);
        }
        Ok(Self { servers })
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| format!("ws://{}/ws", s.addr)).collect()
    }
}

/// `env` plus the `K=V` pairs (space separated) of the variable `extra`, which come last and so
/// win: settings to try on Herald's processes without changing the generator, e.g.
/// `HERALD_BENCH_GATEWAY_ENV="HERALD_WS_READ_BUFFER_BYTES=1024"`.
fn with_extra(env: &[(&str, String)], extra: &str) -> Vec<(String, String)> {
    let extra = if extra.is_empty() { String::new() } else { std::env::var(extra).unwrap_or_default() };
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .chain(extra.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}
