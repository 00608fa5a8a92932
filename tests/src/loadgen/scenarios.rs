//! The benchmark scenarios. Each starts the system it measures, drives it through the generator's
//! workers, samples the servers and returns its figures; every wait has a deadline, so every run
//! ends by itself.

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::cost::{self, CostOptions};
use super::metrics;
use super::orchestrator::{user_names, Plan, Workers};
use super::protocol::{self, Flavor};
use super::report::{self, Latency, Totals};
use super::rollout;
use super::soak;
use super::stages;
use super::storm::{self as storm_probe, SynCounters};
use super::systems::{self, Herald, HeraldOptions, Limit, Peer, Server, WsPeer};

/// Which system a scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum System {
    Herald,
    /// Socket.IO 4 with the Redis adapter.
    Peer,
    /// A plain Node `ws` server (`tests/peer/ws-server.js`).
    Ws,
    /// The bare fan-out server.
    Limit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Scenario {
    Idle,
    Gateway,
    Direct,
    Fanout,
    Storm,
    Loss,
    /// One user with a long backlog connects (10,000 pending; 2,000 in the short run).
    Backlog,
    /// 1,000 users with 100 pending each connect at once (500 in the short run).
    BacklogStorm,
    /// Resend capacity: notifications resent per second after the ack timeout by one dispatcher
    /// and by two, to 1,000 online users that never ack, 60 pending each (200 x 100 short).
    Resend,
    /// A rolling restart of 3 gateways holding 10,000 connections each (1,000 short), with the
    /// drain's spread and then without it.
    Rollout,
    /// A few hundred connections through the whole path, checking only that nothing is lost.
    Smoke,
    /// What a durable message costs (CPU, allocations, store round trips) at 1, 10 and 1,000
    /// recipients per message, each at a steady rate (`--cost-*`).
    Cost,
    /// One topic message to 10,000 subscribers on 2 gateways (2,000 short), then one job to the
    /// same audience through `to`: time until all received, each way.
    Topic,
    /// Steady one-recipient jobs to 1,200 users for `--soak-minutes` (2 short) while some flap
    /// and a group goes away and comes back: memory and latency over time, nothing lost.
    Soak,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub(crate) struct RunConfig {
    /// The short version of each scenario (what `make bench` runs).
    pub(crate) short: bool,
    pub(crate) logs: PathBuf,
    /// Idle connections per server process.
    pub(crate) idle_per_server: usize,
    pub(crate) repeats: usize,
    /// Length of the full soak, minutes.
    pub(crate) soak_minutes: u64,
    /// One-recipient jobs per second in the soak.
    pub(crate) soak_rate: f64,
    pub(crate) cost: CostOptions,
}

/// What one scenario measured on one system.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    pub(crate) scenario: Scenario,
    pub(crate) system: System,
    /// Figures by name; the summary table prints them in this order.
    pub(crate) figures: Vec<(String, Value)>,
    /// Anything that went wrong or qualifies the figures.
    pub(crate) notes: Vec<String>,
    /// Figures that must hold for the run to count as correct (e.g. `lost == 0`).
    pub(crate) ok: bool,
}

impl Outcome {
    pub(super) fn new(scenario: Scenario, system: System) -> Self {
        Self { scenario, system, figures: Vec::new(), notes: Vec::new(), ok: true }
    }

    pub(super) fn set(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.push((name.to_owned(), value.into()));
    }

    fn latency(&mut self, prefix: &str, lat: Latency) {
        self.set(&format!("{prefix}_p50_ms"), round(lat.p50_ms, 2));
        self.set(&format!("{prefix}_p99_ms"), round(lat.p99_ms, 2));
        self.set(&format!("{prefix}_p999_ms"), round(lat.p999_ms, 2));
        self.set(&format!("{prefix}_max_ms"), round(lat.max_ms, 2));
    }

    pub(super) fn fail(&mut self, note: impl Into<String>) {
        self.ok = false;
        self.notes.push(note.into());
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The mean of a latency histogram (µs), in milliseconds; 0 when empty.
pub(super) fn mean_ms(h: Option<&hdrhistogram::Histogram<u64>>) -> f64 {
    h.filter(|h| !h.is_empty()).map_or(0.0, |h| h.mean() / 1000.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        0.0
    } else {
        xs[xs.len() / 2]
    }
}

/// Each of `herald_heap_bytes`' kinds, per server where they are published.
async fn heap_kinds(
    servers: &Sampled<'_>,
    http: &reqwest::Client,
    published: bool,
) -> Vec<(&'static str, Option<Vec<u64>>)> {
    let mut out = Vec::new();
    if !published {
        return out;
    }
    for kind in ["allocated", "active", "resident"] {
        out.push((kind, servers.heap_bytes(http, kind).await));
    }
    out
}

/// Each process's growth from `base` to `full`, per connection, in KiB; `unit` is how many of
/// the readings' units make a KiB (1 for RSS in KiB, 1024 for bytes).
fn kib_per_connection(full: &[u64], base: &[u64], unit: f64, per_server: usize) -> Vec<f64> {
    full.iter().zip(base).map(|(f, b)| f.saturating_sub(*b) as f64 / unit / per_server as f64).collect()
}

/// Per-process figures as the report writes them: two decimals.
fn rounded(xs: &[f64]) -> Value {
    json!(xs.iter().map(|x| round(*x, 2)).collect::<Vec<_>>())
}

/// The servers whose memory and CPU a scenario reports, with the name of their role.
struct Sampled<'a> {
    servers: Vec<&'a Server>,
}

impl Sampled<'_> {
    fn rss_kib(&self) -> Vec<u64> {
        self.servers.iter().map(|s| s.rss_kib()).collect()
    }

    /// RSS, after a full garbage collection in each server first when `collect` (a Node peer's
    /// `POST /gc`, tests/peer/control.js) and a second for the pages to go.
    async fn settled_rss_kib(&self, http: &reqwest::Client, collect: bool) -> anyhow::Result<Vec<u64>> {
        if collect {
            for server in &self.servers {
                let url = format!("http://{}/gc", server.internal);
                http.post(url)
                    .send()
                    .await?
                    .error_for_status()
                    .with_context(|| format!("{}: POST /gc", server.name))?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(self.rss_kib())
    }

    fn cpu_secs(&self) -> Vec<f64> {
        self.servers.iter().map(|s| s.cpu_secs()).collect()
    }

    /// What each server's allocator says of its heap (`herald_heap_bytes{kind}`, bytes): None
    /// for a server that does not publish it (the peers, a counting build).
    async fn heap_bytes(&self, http: &reqwest::Client, kind: &str) -> Option<Vec<u64>> {
        let name = format!("herald_heap_bytes{{kind=\"{kind}\"}}");
        let mut out = Vec::new();
        for server in &self.servers {
            let page = metrics::prometheus_page(http, server.internal).await.ok()?;
            out.push(metrics::counter_value(&page, &name)?);
        }
        Some(out)
    }
}

/// One system under test, whichever it is.
pub(super) enum Sut {
    Herald(Box<Herald>),
    Peer(Peer),
    Ws(WsPeer),
    Limit(Limit),
}

impl Sut {
    pub(super) async fn start(
        system: System,
        servers: usize,
        options: HeraldOptions,
        config: &RunConfig,
    ) -> anyhow::Result<Self> {
        Ok(match system {
            System::Herald => Sut::Herald(Box::new(
                Herald::start(&HeraldOptions { gateways: servers, ..options }, &config.logs).await?,
            )),
            System::Peer => Sut::Peer(Peer::start(servers, &config.logs).await?),
            System::Ws => Sut::Ws(WsPeer::start(servers, &config.logs).await?),
            System::Limit => Sut::Limit(Limit::start(servers, &config.logs).await?),
        })
    }

    fn flavor(&self) -> Flavor {
        match self {
            Sut::Peer(_) => Flavor::EngineIo,
            Sut::Ws(_) => Flavor::Plain,
            Sut::Herald(_) | Sut::Limit(_) => Flavor::Herald,
        }
    }

    fn jwt_secret(&self) -> Option<String> {
        matches!(self, Sut::Herald(_)).then(|| systems::JWT_SECRET.to_owned())
    }

    pub(super) fn urls(&self) -> Vec<String> {
        match self {
            Sut::Herald(h) => h.urls(),
            Sut::Peer(p) => p.urls(),
            Sut::Ws(w) => w.urls(),
            Sut::Limit(l) => l.urls(),
        }
    }

    /// The processes that hold connections (gateways, Node processes, bare servers).
    fn front(&self) -> Sampled<'_> {
        Sampled {
            servers: match self {
                Sut::Herald(h) => h.gateways.iter().collect(),
                Sut::Peer(p) => p.nodes.iter().collect(),
                Sut::Ws(w) => w.nodes.iter().collect(),
                Sut::Limit(l) => l.servers.iter().collect(),
            },
        }
    }

    fn redis_port(&self) -> Option<u16> {
        match self {
            Sut::Herald(h) => Some(h.redis_port()),
            Sut::Peer(p) => Some(p.redis.port()),
            Sut::Ws(_) | Sut::Limit(_) => None,
        }
    }

    /// One plan group per front server, `per_server` users each.
    pub(super) fn plan(&self, per_server: usize, ack: bool, concurrency: usize) -> Plan {
        Plan {
            flavor: self.flavor(),
            groups: self.urls().into_iter().map(|u| (vec![u], per_server)).collect(),
            jwt_secret: self.jwt_secret(),
            ack,
            user_prefix: "u".into(),
            connect_concurrency: concurrency,
            topic: None,
        }
    }

    /// As [`Self::plan`], but group i starts on server i and goes round the others on each
    /// reconnect (what a load balancer does when a server is gone).
    pub(super) fn plan_round_the_servers(&self, per_server: usize, ack: bool, concurrency: usize) -> Plan {
        let urls = self.urls();
        let n = urls.len();
        Plan {
            groups: (0..n).map(|i| ((0..n).map(|j| urls[(i + j) % n].clone()).collect(), per_server)).collect(),
            ..self.plan(per_server, ack, concurrency)
        }
    }
}

async fn redis_rate(port: Option<u16>, window: Duration) -> anyhow::Result<Option<f64>> {
    let Some(port) = port else {
        tokio::time::sleep(window).await;
        return Ok(None);
    };
    let before = metrics::redis_commands(port).await?;
    tokio::time::sleep(window).await;
    let after = metrics::redis_commands(port).await?;
    Ok(Some((after - before) as f64 / window.as_secs_f64()))
}

/// Opens `fraction` of the plan's connections and waits for all of them; returns seconds taken.
pub(super) async fn connect(workers: &mut Workers, fraction: f64, timeout: Duration) -> anyhow::Result<(f64, Totals)> {
    let want = workers.slots_at(fraction);
    let start = Instant::now();
    workers.activate(fraction).await?;
    let (totals, done) = workers.wait_for(timeout, Duration::from_millis(250), |t| t.connected >= want).await?;
    anyhow::ensure!(
        done,
        "only {} of {want} connections after {timeout:?} (failures {}, refused {:?}, closes {:?})",
        totals.connected,
        totals.connect_failures,
        totals.refused,
        totals.closes
    );
    Ok((start.elapsed().as_secs_f64(), totals))
}

// --- 1. idle capacity --------------------------------------------------------------------------

pub(crate) async fn idle(system: System, config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Idle, system);
    let servers = 2;
    let per_server = config.idle_per_server;
    let window = Duration::from_secs(if config.short { 15 } else { 30 });
    let sut = Sut::start(system, servers, HeraldOptions::default(), config).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    // A Node peer's RSS is read right after a full collection: otherwise it is the garbage its
    // collector has not reached yet, and a `ws` process read 3.5 or 6.1 KiB per connection by
    // the collector's timing alone.
    let collected = matches!(system, System::Peer | System::Ws);
    let rss_base = sut.front().settled_rss_kib(&http, collected).await?;
    // Only Herald's processes publish their heap; the peers are measured by RSS alone.
    let heap_of = matches!(system, System::Herald);
    let heap_base = heap_kinds(&sut.front(), &http, heap_of).await;
    let mut workers = Workers::spawn(&sut.plan(per_server, false, 256))?;

    let (t_half, _) = connect(&mut workers, 0.5, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let redis_half = redis_rate(sut.redis_port(), window).await?;
    let (t_rest, totals) = connect(&mut workers, 1.0, Duration::from_secs(300)).await?;
    let connections = totals.connected;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = sut.front().cpu_secs();
    let redis_full = redis_rate(sut.redis_port(), window).await?;
    let cpu_after = sut.front().cpu_secs();
    let rss_uncollected = sut.front().rss_kib();
    let rss_full = sut.front().settled_rss_kib(&http, collected).await?;
    let heap_full = heap_kinds(&sut.front(), &http, heap_of).await;
    let totals = workers.totals().await?;

    // Where RSS goes, by the allocator's own account: what the connections allocated, and
    // what it holds for them besides (page slack, freed pages not returned).
    for ((kind, base), (_, full)) in heap_base.iter().zip(&heap_full) {
        if let (Some(base), Some(full)) = (base, full) {
            let per_conn = kib_per_connection(full, base, 1024.0, per_server);
            out.set(&format!("heap_{kind}_per_connection_kib"), round(median(per_conn.clone()), 2));
            out.set(&format!("heap_{kind}_per_connection_kib_each"), rounded(&per_conn));
        }
    }
    let per_conn = kib_per_connection(&rss_full, &rss_base, 1.0, per_server);
    let cpu_pct_per_10k: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| (a - b) / window.as_secs_f64() * 100.0 / (per_server as f64 / 10_000.0))
        .collect();
    out.set("server_processes", servers as u64);
    out.set("connections", connections);
    out.set("connections_per_process", per_server as u64);
    out.set("connect_rate_per_s", round(connections as f64 / (t_half + t_rest), 0));
    out.set("rss_per_connection_kib", round(median(per_conn.clone()), 2));
    if collected {
        let before = kib_per_connection(&rss_uncollected, &rss_base, 1.0, per_server);
        out.set("rss_per_connection_kib_before_collection_each", rounded(&before));
    }
    out.set("rss_per_connection_kib_each", rounded(&per_conn));
    out.set("rss_base_mib_each", json!(rss_base.iter().map(|k| round(*k as f64 / 1024.0, 1)).collect::<Vec<_>>()));
    out.set("rss_loaded_mib_each", json!(rss_full.iter().map(|k| round(*k as f64 / 1024.0, 1)).collect::<Vec<_>>()));
    out.set("cpu_pct_per_10k_idle", round(median(cpu_pct_per_10k), 3));
    if let (Some(half), Some(full)) = (redis_half, redis_full) {
        out.set("redis_cmds_per_s_at_half", round(half, 1));
        out.set("redis_cmds_per_s_at_full", round(full, 1));
    }
    out.set("window_s", window.as_secs());
    out.set("connect_failures", totals.connect_failures);
    out.set("closes", json!(totals.closes));
    out.set("generator_rss_mib", round(totals.generator_rss_kib as f64 / 1024.0, 1));
    if totals.connected < connections {
        out.fail(format!("{} connections dropped during the window", connections - totals.connected));
    }
    workers.quit().await;
    Ok(out)
}

// --- 2. delivery stage -------------------------------------------------------------------------

pub(crate) async fn gateway_stage(system: System, config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Gateway, system);
    let servers = 2;
    let connections = 10_000;
    let per_server = connections / servers;
    let messages = 100u64;
    let sut = Sut::start(system, servers, HeraldOptions::default(), config).await?;
    let mut workers = Workers::spawn(&sut.plan(per_server, false, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    // Node closes idle keep-alive connections after 5 s; a round can be longer than that.
    let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(1)).build()?;

    let (mut rates, mut p50s, mut p99s, mut maxes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut lost_total = 0;
    let mut duplicates = 0;
    let mut unique_before = 0;
    let cpu_before = sut.front().cpu_secs();
    let generator_cpu_before = workers.totals().await?.generator_cpu_secs;
    for round_no in 0..config.repeats as u64 {
        workers.reset().await?;
        let expected = messages * connections as u64;
        let start_us = protocol::now_us();
        let ks = (round_no * messages)..((round_no + 1) * messages);
        match &sut {
            Sut::Herald(h) => publish_deliveries(h, per_server, ks).await?,
            Sut::Peer(p) => publish_http(&http, &[&p.nodes[0]], ks).await?,
            Sut::Ws(w) => publish_http(&http, &w.nodes.iter().collect::<Vec<_>>(), ks).await?,
            Sut::Limit(l) => publish_http(&http, &l.servers.iter().collect::<Vec<_>>(), ks).await?,
        }
        let (totals, done) = workers
            .wait_for(Duration::from_secs(120), Duration::from_millis(100), |t| t.unique >= unique_before + expected)
            .await?;
        let got = totals.unique - unique_before;
        unique_before = totals.unique;
        duplicates = totals.duplicates;
        if !done {
            lost_total += expected.saturating_sub(got);
        }
        let secs = (totals.last_rx_us.saturating_sub(start_us)) as f64 / 1e6;
        let lat = Latency::of(totals.send_to_rx.as_ref());
        rates.push(got as f64 / secs.max(1e-6));
        p50s.push(lat.p50_ms);
        p99s.push(lat.p99_ms);
        maxes.push(lat.max_ms);
    }
    let cpu_after = sut.front().cpu_secs();
    let totals = workers.totals().await?;
    out.set("connections", connections as u64);
    out.set("server_processes", servers as u64);
    out.set("messages_per_round", messages);
    out.set("rounds", config.repeats as u64);
    out.set("delivered_per_s_median", round(median(rates.clone()), 0));
    out.set("delivered_per_s_each", json!(rates.iter().map(|r| round(*r, 0)).collect::<Vec<_>>()));
    out.set("send_to_rx_p50_ms_median", round(median(p50s), 2));
    out.set("send_to_rx_p99_ms_median", round(median(p99s), 2));
    out.set("send_to_rx_max_ms_median", round(median(maxes), 2));
    let cpu: f64 = cpu_after.iter().sum::<f64>() - cpu_before.iter().sum::<f64>();
    let millions = (unique_before as f64 / 1e6).max(1e-9);
    out.set("server_cpu_s_per_million", round(cpu / millions, 2));
    // The generator parses and times every frame: when it uses more than the servers, it is
    // what bounds the rate.
    out.set("generator_cpu_s_per_million", round((totals.generator_cpu_secs - generator_cpu_before) / millions, 2));
    out.set(
        "server_rss_mib_each",
        json!(sut.front().rss_kib().iter().map(|k| round(*k as f64 / 1024.0, 1)).collect::<Vec<_>>()),
    );
    out.set("lost", lost_total);
    out.set("duplicates", duplicates);
    out.set("closes", json!(totals.closes));
    if lost_total > 0 {
        out.fail(format!("{lost_total} deliveries missing after 120 s"));
    }
    workers.quit().await;
    Ok(out)
}

/// Deliveries straight onto each gateway's subject: one NATS message per gateway per message,
/// carrying every recipient on that gateway (users are numbered gateway by gateway).
async fn publish_deliveries(h: &Herald, per_gateway: usize, ks: std::ops::Range<u64>) -> anyhow::Result<()> {
    let names = h.stack.names();
    let users: Vec<Vec<String>> =
        (0..h.gateways.len()).map(|g| user_names("u", g * per_gateway, per_gateway)).collect();
    for k in ks {
        for (g, id) in h.gateway_ids.iter().enumerate() {
            let now_us = protocol::now_us();
            let now_ms = now_us / 1000;
            // The wire form of `GatewayCommand::Deliver` (proto/src/internal.rs, externally tagged), written
            // out so that fields added to the Rust types later do not change what is measured.
            let command = json!({ "deliver": [{
                "users": users[g],
                "notification": {
                    "id": format!("g-{k}"),
                    "seq": k + 1,
                    "payload": { "lg_k": k, "lg_t": now_us },
                    "published_at_ms": now_ms,
                    "expires_at_ms": now_ms + 3_600_000,
                },
            }]});
            h.nats.publish(names.gateway_subject(id), serde_json::to_vec(&command)?.into()).await?;
        }
    }
    h.nats.flush().await?;
    Ok(())
}

/// Broadcasts through the peer's or the bare server's `POST /publish`.
async fn publish_http(http: &reqwest::Client, targets: &[&Server], ks: std::ops::Range<u64>) -> anyhow::Result<()> {
    let mut sends = FuturesUnordered::new();
    for k in ks {
        for server in targets {
            let body = protocol::notification(&format!("g-{k}"), k, protocol::now_us());
            sends.push(http.post(format!("http://{}/publish", server.addr)).body(body).send());
            // A few in flight, in order enough: the peer emits in arrival order.
            if sends.len() >= 4 {
                if let Some(r) = sends.next().await {
                    r?.error_for_status()?;
                }
            }
        }
    }
    while let Some(r) = sends.next().await {
        r?.error_for_status()?;
    }
    Ok(())
}

// --- 3. direct durable messages ------------------------------------------------------------------

/// Publishes `count` one-recipient jobs at `rate` per second starting at index `first_k`,
/// recipients round robin over `users`. Returns the seconds it took (behind schedule if the
/// publish path could not keep up).
async fn publish_jobs(h: &Herald, users: &[String], first_k: u64, count: u64, rate: f64) -> anyhow::Result<f64> {
    let subject = h.stack.names().publish_subject("bench");
    let to = Recipients::one_each(users);
    let (_, secs) =
        publish_paced(&h.js, &subject, to, first_k, count, Pace::steady(rate), &CancellationToken::new()).await?;
    Ok(secs)
}

/// Whom a run's jobs go to: `per_job` users each, in turn from `users` (job k's list starts at
/// user k × `per_job`, round robin).
#[derive(Debug, Clone, Copy)]
pub(super) struct Recipients<'a> {
    pub(super) users: &'a [String],
    pub(super) per_job: usize,
}

impl<'a> Recipients<'a> {
    pub(super) fn one_each(users: &'a [String]) -> Self {
        Self { users, per_job: 1 }
    }

    /// The recipients of job `k`.
    pub(super) fn of(&self, k: u64) -> impl Iterator<Item = &'a String> + use<'a> {
        let users = self.users;
        let n = users.len().max(1);
        let first = (k % n as u64) as usize * self.per_job;
        (first..first + self.per_job.min(n)).filter_map(move |i| users.get(i % n))
    }

    /// The `to` list of job `k`, as JSON array items (`"u1","u2"`).
    fn json_list(&self, k: u64) -> String {
        self.of(k).map(|name| format!("\"{name}\"")).collect::<Vec<_>>().join(",")
    }
}

/// How a generator spaces its jobs: `rate` per second on average, and those due within `burst`
/// of now sent at once (a sleep only for longer waits). The burst sets how jobs reach
/// JetStream, and so how many times a dispatcher wakes to take them (docs/BENCHMARKS.md §10).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    pub(crate) rate: f64,
    pub(crate) burst: Duration,
}

impl Pace {
    /// The bursts every scenario uses unless told otherwise: a few jobs at once from ~500/s.
    pub(crate) const BURST: Duration = Duration::from_millis(2);

    pub(crate) fn steady(rate: f64) -> Self {
        Self { rate, burst: Self::BURST }
    }

    /// Whether to sleep until a job due in `wait`: only past the burst; closer ones go at once.
    fn sleeps_for(&self, wait: Duration) -> bool {
        wait > self.burst
    }
}

/// Jobs to `to` at `pace` from index `first_k`, until `count` are published or `stop` is
/// cancelled, whichever comes first. Returns how many were published (each acked by JetStream)
/// and the seconds it took.
pub(super) async fn publish_paced(
    js: &async_nats::jetstream::Context,
    subject: &str,
    to: Recipients<'_>,
    first_k: u64,
    count: u64,
    pace: Pace,
    stop: &CancellationToken,
) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    let mut published = 0;
    for i in 0..count {
        if stop.is_cancelled() {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / pace.rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            if pace.sleeps_for(wait) {
                tokio::time::sleep(wait).await;
            }
        }
        let k = first_k + i;
        let id = format!("d-{k}");
        let body = format!(
            r#"{{"id":"{id}","to":[{}],"payload":{}}}"#,
            to.json_list(k),
            protocol::payload(k, protocol::now_us())
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(js.publish_with_headers(subject.to_owned(), headers, body.into()).await?.into_future());
        published += 1;
        while acks.len() > 4096 {
            if let Some(ack) = acks.next().await {
                ack?;
            }
        }
        // Collect finished acks without waiting.
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(acks.next()) {
            ack?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok((published, start.elapsed().as_secs_f64()))
}

/// The rate the direct ladder always reaches, for the latency split (issue: p50 and p99 at 100/s
/// and at 1,000/s).
const SPLIT_RATE: f64 = 1_000.0;

pub(crate) async fn direct(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Direct, System::Herald);
    let servers = 2;
    let per_server = if config.short { 1_000 } else { 2_500 };
    let step = Duration::from_secs(if config.short { 5 } else { 10 });
    let rates: &[f64] = &[
        50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 500.0, 600.0, 700.0, 800.0, 1_000.0, 1_200.0, 1_600.0,
        3_200.0, 6_400.0,
    ];
    let sut = Sut::start(System::Herald, servers, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let mut workers = Workers::spawn(&sut.plan(per_server, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    let users = user_names("u", 0, per_server * servers);
    let dispatcher = &h.dispatchers[0];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    // Let the online announcements and replays of the connect settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut k = 0u64;
    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    // The ladder ends at its first step over 100 ms; if that is below 1,000/s, one more step runs
    // at 1,000/s, so that every report has the latency split at 100/s and at 1,000/s.
    let mut ladder_ended = false;
    for &rate in rates {
        if ladder_ended && rate < SPLIT_RATE {
            continue;
        }
        workers.reset().await?;
        let before = workers.totals().await?.unique;
        let (rt_before, cpu_before) = (h.store_proxy.requests(), dispatcher.cpu_secs());
        let (store_cpu_before, nats_cpu_before) = h.deps_cpu_secs();
        let gateways_cpu_before: f64 = sut.front().cpu_secs().iter().sum();
        let stages_before = metrics::prometheus_page(&http, dispatcher.internal).await?;
        let count = (rate * step.as_secs_f64()) as u64;
        let took = publish_jobs(h, &users, k, count, rate).await?;
        k += count;
        // Deliveries still on their way at the end of the step get two seconds to land.
        let (totals, _) = workers
            .wait_for(Duration::from_secs(2), Duration::from_millis(100), |t| t.unique >= before + count)
            .await?;
        let (rt_after, cpu_after) = (h.store_proxy.requests(), dispatcher.cpu_secs());
        let (store_cpu_after, nats_cpu_after) = h.deps_cpu_secs();
        let gateways_cpu_after: f64 = sut.front().cpu_secs().iter().sum();
        let stages_after = metrics::prometheus_page(&http, dispatcher.internal).await?;
        let per_1k = |cpu: f64| round(cpu / (count as f64 / 1000.0), 3);
        let delivered = totals.unique - before;
        let lat = Latency::of(totals.publish_to_rx.as_ref());
        let sustained = delivered as f64 >= count as f64 * 0.99 && took <= step.as_secs_f64() * 1.1;
        let mut row = json!({
            "rate_per_s": rate,
            "published": count,
            "publish_took_s": round(took, 2),
            "delivered_in_step": delivered,
            "p50_ms": round(lat.p50_ms, 1),
            "p99_ms": round(lat.p99_ms, 1),
            "p999_ms": round(lat.p999_ms, 1),
            "max_ms": round(lat.max_ms, 1),
            "mean_ms": round(mean_ms(totals.publish_to_rx.as_ref()), 1),
            "store_round_trips_per_msg": round((rt_after - rt_before) as f64 / count as f64, 3),
            "dispatcher_cpu_s_per_1k": per_1k(cpu_after - cpu_before),
            "gateways_cpu_s_per_1k": per_1k(gateways_cpu_after - gateways_cpu_before),
            "store_server_cpu_s_per_1k": per_1k(store_cpu_after - store_cpu_before),
            "nats_cpu_s_per_1k": per_1k(nats_cpu_after - nats_cpu_before),
            "gateway_rss_mib": sut.front().rss_kib().iter().map(|k| round(*k as f64 / 1024.0, 1)).collect::<Vec<_>>(),
            "dispatcher_rss_mib": round(dispatcher.rss_kib() as f64 / 1024.0, 1),
            "sustained": sustained,
        });
        // Beside publish → receive: what of it the dispatcher's stages took (store or Herald's own).
        if let Value::Object(fields) = &mut row {
            fields.extend(stages::split(&stages_before, &stages_after));
        }
        eprintln!("loadgen: direct step {row}");
        if ladder_ended {
            row["after_the_ladder"] = json!(true);
            steps.push(row);
            break;
        }
        steps.push(row.clone());
        if lat.p99_ms < 100.0 && sustained {
            best = Some(row);
        } else if rate >= SPLIT_RATE {
            break;
        } else {
            ladder_ended = true;
        }
    }

    // Everything published must arrive, and every receipt must read `delivered`.
    let drain_start = Instant::now();
    let (totals, all_in) =
        workers.wait_for(Duration::from_secs(90), Duration::from_millis(250), |t| t.unique >= k).await?;
    out.set("users_online", users.len() as u64);
    out.set("step_s", step.as_secs());
    match &best {
        Some(b) => {
            out.set("highest_rate_with_p99_under_100ms", b["rate_per_s"].clone());
            let keys = [
                "p50_ms",
                "p99_ms",
                "p999_ms",
                "max_ms",
                "mean_ms",
                "herald_own_mean_ms",
                "store_mean_ms",
                "store_round_trips_per_msg",
                "dispatcher_cpu_s_per_1k",
            ];
            for key in keys {
                out.set(&format!("at_best_{key}"), b[key].clone());
            }
        }
        None => out.set("highest_rate_with_p99_under_100ms", 0),
    }
    out.set("published", k);
    out.set("received_unique", totals.unique);
    out.set("lost", k.saturating_sub(totals.unique));
    out.set("duplicates", totals.duplicates);
    out.set("drain_s", round(drain_start.elapsed().as_secs_f64(), 1));
    if !all_in {
        out.fail(format!("{} messages not received 90 s after the last step", k - totals.unique));
    }
    let receipts = receipt_latency(h, k, Duration::from_secs(90)).await?;
    out.set("receipts_delivered", receipts.delivered);
    out.latency("publish_to_receipt_delivered", receipts.latency);
    if receipts.delivered < k {
        out.fail(format!("{} receipts not delivered within 90 s of the drain", k - receipts.delivered));
    }
    out.set("steps", Value::Array(steps));
    workers.quit().await;
    Ok(out)
}

/// Receipts matching `filter`, with the plain `count` command. `count_documents` is an
/// aggregation, which nx-27017 runs in Python over every document: polled, it would load the
/// store it is meant to observe.
pub(super) async fn count_receipts(db: &mongodb::Database, filter: Document) -> anyhow::Result<u64> {
    let reply = db.run_command(doc! { "count": herald_shared::naming::collections::RECEIPTS, "query": filter }).await?;
    let n = match reply.get("n") {
        Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
        Some(mongodb::bson::Bson::Int64(n)) => *n,
        Some(mongodb::bson::Bson::Double(n)) => *n as i64,
        other => anyhow::bail!("count answered {other:?}"),
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(super) struct ReceiptFigures {
    pub(super) delivered: u64,
    pub(super) latency: Latency,
}

/// Waits until `expected` receipts read `delivered` (or the timeout), then reads the publish →
/// delivered latency from the store: the receipt's `delivered_at_ms` against the message's
/// `published_at` (its JetStream time).
pub(super) async fn receipt_latency(h: &Herald, expected: u64, timeout: Duration) -> anyhow::Result<ReceiptFigures> {
    let receipts = h.db.collection::<Document>(herald_shared::naming::collections::RECEIPTS);
    let deadline = Instant::now() + timeout;
    let mut delivered;
    loop {
        delivered = count_receipts(&h.db, doc! { "state": "delivered" }).await?;
        if delivered >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let messages = h.db.collection::<Document>(herald_shared::naming::collections::MESSAGES);
    let mut published: HashMap<String, i64> = HashMap::new();
    let mut cursor = messages.find(doc! {}).projection(doc! { "_id": 1, "published_at": 1 }).await?;
    while let Some(m) = cursor.try_next().await? {
        if let (Ok(id), Ok(at)) = (m.get_str("_id"), m.get_datetime("published_at")) {
            published.insert(id.to_owned(), at.timestamp_millis());
        }
    }
    let mut hist = report::histogram();
    // `inline` whole: nx-27017 answers a dotted projection (`inline.published_at`) with a flat
    // key of that name instead of the nested field.
    let projection = doc! { "message_id": 1, "delivered_at_ms": 1, "inline": 1 };
    let mut cursor = receipts.find(doc! { "state": "delivered" }).projection(projection).await?;
    while let Some(r) = cursor.try_next().await? {
        let at = r.get_i64("delivered_at_ms").ok();
        // A one-recipient message has no document of its own: its receipt carries it.
        let carried = r.get_document("inline").and_then(|m| m.get_datetime("published_at")).ok();
        let published_at = match carried {
            Some(p) => Some(p.timestamp_millis()),
            None => r.get_str("message_id").ok().and_then(|id| published.get(id)).copied(),
        };
        if let (Some(at), Some(p)) = (at, published_at) {
            report::record(&mut hist, (at - p).max(0) as u64 * 1000);
        }
    }
    Ok(ReceiptFigures { delivered, latency: Latency::of(Some(&hist)) })
}

// --- 4. fan-out job --------------------------------------------------------------------------------

pub(crate) async fn fanout(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Fanout, System::Herald);
    let servers = 2;
    // The short run keeps `make bench` to minutes: with nx-27017 the acks of 10,000 receipts
    // take the store minutes to apply.
    let recipients = if config.short { 2_000 } else { 10_000 };
    let sut = Sut::start(System::Herald, servers, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let mut workers = Workers::spawn(&sut.plan(recipients / servers, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    workers.reset().await?;
    let users = user_names("u", 0, recipients);
    let rt_before = h.store_proxy.requests();
    let start = Instant::now();
    let start_us = protocol::now_us();
    let job = json!({ "id": "fanout-0", "to": users, "payload": { "lg_k": 0, "lg_t": start_us } });
    h.js.publish(h.stack.names().publish_subject("bench"), serde_json::to_vec(&job)?.into()).await?.await?;
    let (totals, all_in) = workers
        .wait_for(Duration::from_secs(120), Duration::from_millis(100), |t| t.unique >= recipients as u64)
        .await?;
    let received_s = totals.last_rx_us.saturating_sub(start_us) as f64 / 1e6;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut delivered;
    loop {
        delivered = count_receipts(&h.db, doc! { "state": "delivered" }).await?;
        if delivered >= recipients as u64 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let receipts_s = start.elapsed().as_secs_f64();
    out.set("recipients", recipients as u64);
    out.set("all_received_s", round(received_s, 2));
    out.latency("publish_to_rx", Latency::of(totals.publish_to_rx.as_ref()));
    out.set("all_receipts_delivered_s", round(receipts_s, 2));
    out.set("store_round_trips", h.store_proxy.requests() - rt_before);
    out.set("received_unique", totals.unique);
    out.set("lost", (recipients as u64).saturating_sub(totals.unique));
    out.set("receipts_delivered", delivered);
    out.set(
        "dispatcher_peak_rss_mib",
        round(metrics::peak_rss_kib(h.dispatchers[0].pid()).unwrap_or(0) as f64 / 1024.0, 1),
    );
    if !all_in || delivered < recipients as u64 {
        out.fail(format!("received {} of {recipients}, receipts delivered {delivered}", totals.unique));
    }
    workers.quit().await;
    Ok(out)
}

// --- 4b. the same audience through a topic, then through `to` ------------------------------------

pub(crate) async fn topic(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Topic, System::Herald);
    let servers = 2;
    let recipients = if config.short { 2_000 } else { 10_000 };
    let sut = Sut::start(System::Herald, servers, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let plan = Plan { topic: Some("lg".into()), ..sut.plan(recipients / servers, true, 256) };
    let mut workers = Workers::spawn(&plan)?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    // Time for every `subscribe` to be taken (the workers do not wait for the answers).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let subject = h.stack.names().publish_subject("bench");
    // Each way in turn on the same connections: a topic job (k = 0), then a job to every user (k = 1).
    let users = user_names("u", 0, recipients);
    let jobs = [
        ("topic", json!({ "id": "topic-0", "topic": "lg", "payload": { "lg_k": 0, "lg_t": 0 } })),
        ("to", json!({ "id": "to-1", "to": users, "payload": { "lg_k": 1, "lg_t": 0 } })),
    ];
    for (i, (way, mut job)) in jobs.into_iter().enumerate() {
        workers.reset().await?;
        let start_us = protocol::now_us();
        job["payload"]["lg_t"] = json!(start_us);
        h.js.publish(subject.clone(), serde_json::to_vec(&job)?.into()).await?.await?;
        let want = (i as u64 + 1) * recipients as u64;
        let (totals, all_in) =
            workers.wait_for(Duration::from_secs(120), Duration::from_millis(50), |t| t.unique >= want).await?;
        let received = totals.unique.saturating_sub(i as u64 * recipients as u64);
        out.set(&format!("{way}_all_received_s"), round(totals.last_rx_us.saturating_sub(start_us) as f64 / 1e6, 3));
        out.latency(&format!("{way}_publish_to_rx"), Latency::of(totals.publish_to_rx.as_ref()));
        out.set(&format!("{way}_received"), received);
        if !all_in {
            out.fail(format!("{way}: received {received} of {recipients}"));
        }
        // Let the acks settle before the next way, so one does not slow the other.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    out.set("recipients", recipients as u64);
    out.set("gateways", servers as u64);
    workers.quit().await;
    Ok(out)
}

// --- 5. reconnect storm with replay ----------------------------------------------------------------

/// 5,000 users with 10 pending each connect at once (the issue's storm; 1,000 short).
pub(crate) async fn storm(config: &RunConfig) -> anyhow::Result<Outcome> {
    let users_n = if config.short { 1_000 } else { 5_000 };
    storm_with(Scenario::Storm, users_n, 10, config).await
}

/// `users_n` users with `pending` messages each (fan-out jobs to all of them, published while
/// they are offline) connect at once; every message must be received, and acked.
async fn storm_with(scenario: Scenario, users_n: usize, pending: u64, config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(scenario, System::Herald);
    let servers = 2;
    let sut = Sut::start(System::Herald, servers, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let users = user_names("u", 0, users_n);
    // `pending` fan-out jobs to every (offline) user: users × pending receipts.
    for k in 0..pending {
        let job = json!({ "id": format!("s-{k}"), "to": users, "payload": { "lg_k": k, "lg_t": protocol::now_us() } });
        h.js.publish(h.stack.names().publish_subject("bench"), serde_json::to_vec(&job)?.into()).await?.await?;
    }
    let want = users_n as u64 * pending;
    wait_stored(h, want, Duration::from_secs(180)).await?;
    let workers = Workers::spawn(&sut.plan(users_n / servers, true, 1024))?;
    let watched = watch_replay(&sut, h, workers, users_n as u64, want).await?;
    out.set("users", users_n as u64);
    out.set("pending_per_user", pending);
    watched.report(&mut out, want);
    Ok(out)
}

// --- 7. replay: one long backlog, and a storm of long backlogs -----------------------------------

/// One user with a long backlog (one-recipient jobs published while it is offline) connects:
/// page after page, everything must come, in `seq` order.
pub(crate) async fn backlog(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Backlog, System::Herald);
    let pending: u64 = if config.short { 2_000 } else { 10_000 };
    let sut = Sut::start(System::Herald, 1, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let users = user_names("u", 0, 1);
    publish_jobs(h, &users, 0, pending, 5_000.0).await?;
    wait_stored(h, pending, Duration::from_secs(180)).await?;
    let workers = Workers::spawn(&sut.plan(1, true, 1))?;
    let watched = watch_replay(&sut, h, workers, 1, pending).await?;
    out.set("users", 1u64);
    out.set("pending_per_user", pending);
    watched.report(&mut out, pending);
    Ok(out)
}

/// 1,000 users with 100 pending each (500 in the short run) connect at once.
pub(crate) async fn backlog_storm(config: &RunConfig) -> anyhow::Result<Outcome> {
    let users_n = if config.short { 500 } else { 1_000 };
    storm_with(Scenario::BacklogStorm, users_n, 100, config).await
}

/// Waits until the store holds `want` pending receipts.
async fn wait_stored(h: &Herald, want: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        // Receipts only: the claims that share their collection have no state.
        let stored = count_receipts(&h.db, doc! { "state": "pending" }).await?;
        if stored >= want {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {stored} of {want} receipts stored within {limit:?}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// What a replay run measured, from the moment every connection was asked to open.
struct Watched {
    connected_s: Option<f64>,
    received_s: Option<f64>,
    delivered_s: f64,
    totals: Totals,
    delivered: u64,
    peak_gw_kib: u64,
    peak_dsp_kib: u64,
    /// The kernel's SYN counters' increase from the first connect to the last (host-wide).
    syn_in_connect: Option<SynCounters>,
    /// CPU seconds each process used from the first connect until all was received.
    cpu_in_storm: Option<BTreeMap<String, f64>>,
}

/// Opens every connection of `workers` at once, then watches until `want` messages are
/// received (at most 180 s) and `want` receipts read `delivered` (at most 300 s).
async fn watch_replay(sut: &Sut, h: &Herald, mut workers: Workers, users: u64, want: u64) -> anyhow::Result<Watched> {
    let (syn_before, cpu_before) =
        (SynCounters::read()?, storm_probe::cpu_by_process(h, workers.totals().await?.generator_cpu_secs));
    let (mut syn_in_connect, mut cpu_in_storm) = (None, None);
    let start = Instant::now();
    let (mut peak_gw_kib, mut peak_dsp_kib) = (0u64, 0u64);
    workers.activate(1.0).await?;
    let (mut connected_s, mut received_s) = (None, None);
    let mut totals;
    loop {
        totals = workers.totals().await?;
        peak_gw_kib = peak_gw_kib.max(sut.front().rss_kib().iter().sum());
        peak_dsp_kib = peak_dsp_kib.max(h.dispatchers[0].rss_kib());
        if connected_s.is_none() && totals.connected >= users {
            connected_s = Some(start.elapsed().as_secs_f64());
            syn_in_connect = Some(SynCounters::read()?.since(&syn_before));
        }
        if received_s.is_none() && totals.unique >= want {
            received_s = Some(start.elapsed().as_secs_f64());
            let cpu_after = storm_probe::cpu_by_process(h, totals.generator_cpu_secs);
            cpu_in_storm = Some(storm_probe::cpu_used(&cpu_before, &cpu_after));
        }
        if received_s.is_some() || start.elapsed() > Duration::from_secs(180) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut delivered;
    loop {
        delivered = count_receipts(&h.db, doc! { "state": "delivered" }).await?;
        if delivered >= want || start.elapsed() > Duration::from_secs(300) {
            break;
        }
        peak_gw_kib = peak_gw_kib.max(sut.front().rss_kib().iter().sum());
        peak_dsp_kib = peak_dsp_kib.max(h.dispatchers[0].rss_kib());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let delivered_s = start.elapsed().as_secs_f64();
    // The duplicates and order figures as of the end, not of the last poll.
    let totals_end = workers.totals().await?;
    workers.quit().await;
    Ok(Watched {
        connected_s,
        received_s,
        delivered_s,
        totals: Totals { duplicates: totals_end.duplicates, out_of_order: totals_end.out_of_order, ..totals },
        delivered,
        peak_gw_kib,
        peak_dsp_kib,
        syn_in_connect,
        cpu_in_storm,
    })
}

impl Watched {
    fn report(&self, out: &mut Outcome, want: u64) {
        out.set("all_connected_s", self.connected_s.map(|s| round(s, 2)));
        out.set("all_received_s", self.received_s.map(|s| round(s, 2)));
        out.set("all_acked_delivered_s", round(self.delivered_s, 2));
        out.set("received_unique", self.totals.unique);
        out.set("lost", want.saturating_sub(self.totals.unique));
        out.set("duplicates", self.totals.duplicates);
        out.set("out_of_order", self.totals.out_of_order);
        out.set("receipts_delivered", self.delivered);
        out.set("gateways_peak_rss_mib_sum", round(self.peak_gw_kib as f64 / 1024.0, 1));
        out.set("dispatcher_peak_rss_mib", round(self.peak_dsp_kib as f64 / 1024.0, 1));
        if let Some(syn) = &self.syn_in_connect {
            syn.report(out, "connect");
            out.notes.push(
                "host_* figures are the whole machine's TcpExt counters (/proc/net/netstat) over the connect \
                 phase: anything else connecting on this host then is counted too"
                    .into(),
            );
        }
        if let (Some(cpu), Some(secs)) = (&self.cpu_in_storm, self.received_s) {
            storm_probe::report_cpu(out, cpu, secs);
        }
        if self.totals.unique < want || self.delivered < want {
            out.fail(format!("received {} of {want}; receipts delivered {}", self.totals.unique, self.delivered));
        }
    }
}

// --- 8. resend capacity ----------------------------------------------------------------------------

/// What the dispatcher counts for each notification it sends again.
const RESENT_METRIC: &str = "herald_dispatcher_resent_total";

/// Resend capacity per dispatcher: users online that receive but never ack, so every receipt
/// stays pending and is due again one ack timeout after each send. With `messages` receipts the
/// offered demand is `messages / ack_timeout` per second; it is set above what the store lets a
/// sweep do, so that the sweep is the bound. Measured with one dispatcher, then on a fresh system
/// with two: the ratio says whether resending grows with dispatchers.
pub(crate) async fn resend(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Resend, System::Herald);
    let users = if config.short { 200 } else { 1_000 };
    // Per user: well below the gateways' outbound queue (1,024 per connection), which a whole
    // resend wave for one user must fit in. The demand this gives (10,000/s short, 30,000/s
    // full) is several times what the sweep did against nx-27017 in a trial run (~3,400/s, with the store's
    // process at 80-90 % of a core).
    let per_user: u64 = if config.short { 100 } else { 60 };
    let load = ResendLoad {
        users,
        messages: users as u64 * per_user,
        ack_timeout: Duration::from_millis(2_000),
        sweep_interval: Duration::from_millis(500),
        window: Duration::from_secs(if config.short { 10 } else { 20 }),
    };
    out.set("users_online_not_acking", load.users as u64);
    out.set("pending_receipts", load.messages);
    out.set("pending_per_user", per_user);
    out.set("ack_timeout_ms", load.ack_timeout.as_millis() as u64);
    out.set("sweep_interval_ms", load.sweep_interval.as_millis() as u64);
    out.set("window_s", load.window.as_secs());
    out.set("resend_demand_per_s", round(load.demand_per_s(), 0));
    let mut rates = Vec::new();
    for dispatchers in [1, 2] {
        let run = resend_run(&load, dispatchers, config).await?;
        run.report(&mut out, &load);
        rates.push(run.resent_per_s());
    }
    if let [one, two] = rates[..] {
        out.set("resent_per_s_ratio_2_to_1", (one > 0.0).then(|| round(two / one, 2)));
    }
    Ok(out)
}

/// The load of one resend run.
struct ResendLoad {
    users: usize,
    /// One-recipient jobs, round robin over the users: one pending receipt each.
    messages: u64,
    ack_timeout: Duration,
    sweep_interval: Duration,
    window: Duration,
}

impl ResendLoad {
    /// Resends per second if every receipt were resent the moment its ack timeout passed.
    fn demand_per_s(&self) -> f64 {
        self.messages as f64 / self.ack_timeout.as_secs_f64()
    }
}

/// What one run (a fixed number of dispatchers) measured over its window.
struct ResendRun {
    dispatchers: usize,
    window_s: f64,
    /// Increase of each dispatcher's resent counter over the window.
    resent_each: Vec<u64>,
    /// Load messages the clients received over the window, resends all of them.
    received: u64,
    dispatcher_cpu_s: f64,
    store_cpu_s: f64,
    store_round_trips: u64,
    /// Receipts whose retry time had passed at the end of the window: the sweep's backlog.
    overdue_at_end: u64,
    connected_at_end: u64,
    closes: BTreeMap<u16, u64>,
}

/// Counter values of every dispatcher, in order.
async fn dispatcher_counters(http: &reqwest::Client, h: &Herald, name: &str) -> anyhow::Result<Vec<u64>> {
    let mut values = Vec::new();
    for d in &h.dispatchers {
        values.push(metrics::prometheus_counter(http, d.internal, name).await?);
    }
    Ok(values)
}

/// Starts Herald with `dispatchers`, connects the users (never acking), publishes the jobs,
/// waits until every receipt is stored and one ack timeout more (the resends have reached their
/// steady state), then measures one window.
async fn resend_run(load: &ResendLoad, dispatchers: usize, config: &RunConfig) -> anyhow::Result<ResendRun> {
    let servers = 2;
    let options = HeraldOptions {
        dispatchers,
        ack_timeout_ms: load.ack_timeout.as_millis() as u64,
        sweep_interval_ms: Some(load.sweep_interval.as_millis() as u64),
        ..HeraldOptions::default()
    };
    let sut = Sut::start(System::Herald, servers, options, config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let mut workers = Workers::spawn(&sut.plan(load.users / servers, false, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(60)).await?;
    let users = user_names("u", 0, load.users);
    publish_jobs(h, &users, 0, load.messages, 2_000.0).await?;
    wait_stored(h, load.messages, Duration::from_secs(240)).await?;
    tokio::time::sleep(load.ack_timeout + 2 * load.sweep_interval).await;

    let http = reqwest::Client::new();
    let cpu = |h: &Herald| h.dispatchers.iter().map(|d| d.cpu_secs()).sum::<f64>();
    let resent_before = dispatcher_counters(&http, h, RESENT_METRIC).await?;
    let received_before = workers.totals().await?.received;
    let (cpu_before, store_cpu_before, rt_before) = (cpu(h), h.deps_cpu_secs().0, h.store_proxy.requests());
    let start = Instant::now();
    tokio::time::sleep(load.window).await;
    let resent_after = dispatcher_counters(&http, h, RESENT_METRIC).await?;
    let window_s = start.elapsed().as_secs_f64();
    let (cpu_after, store_cpu_after, rt_after) = (cpu(h), h.deps_cpu_secs().0, h.store_proxy.requests());
    let totals = workers.totals().await?;
    let now_ms = protocol::now_us() / 1000;
    let overdue_at_end =
        count_receipts(&h.db, doc! { "state": "pending", "next_retry_at_ms": { "$lte": now_ms as i64 } }).await?;
    workers.quit().await;
    Ok(ResendRun {
        dispatchers,
        window_s,
        resent_each: resent_after.iter().zip(&resent_before).map(|(a, b)| a.saturating_sub(*b)).collect(),
        received: totals.received - received_before,
        dispatcher_cpu_s: cpu_after - cpu_before,
        store_cpu_s: store_cpu_after - store_cpu_before,
        store_round_trips: rt_after - rt_before,
        overdue_at_end,
        connected_at_end: totals.connected,
        closes: totals.closes,
    })
}

/// What bounded a resend run: the sweep if receipts waited past their retry time by more than
/// what one interval's wait explains at this demand, otherwise the demand itself (the figure is
/// then a floor of the capacity, not the capacity).
fn resend_bound(overdue_at_end: u64, demand_per_s: f64, sweep_interval: Duration) -> &'static str {
    // At the demand, one interval's worth of receipts comes due between two sweeps; twice that
    // leaves room for a sweep that is slow but keeping up.
    if overdue_at_end as f64 > 2.0 * demand_per_s * sweep_interval.as_secs_f64() {
        "sweep"
    } else {
        "demand"
    }
}

impl ResendRun {
    fn resent(&self) -> u64 {
        self.resent_each.iter().sum()
    }

    fn resent_per_s(&self) -> f64 {
        self.resent() as f64 / self.window_s
    }

    fn report(&self, out: &mut Outcome, load: &ResendLoad) {
        let p = format!("dispatchers_{}", self.dispatchers);
        let per_s = self.resent_per_s();
        let per_1k = |x: f64| (self.resent() > 0).then(|| round(x / (self.resent() as f64 / 1000.0), 3));
        out.set(&format!("{p}_resent_per_s"), round(per_s, 0));
        out.set(&format!("{p}_resent_per_s_per_dispatcher"), round(per_s / self.dispatchers as f64, 0));
        out.set(
            &format!("{p}_resent_per_s_each"),
            json!(self.resent_each.iter().map(|n| round(*n as f64 / self.window_s, 0)).collect::<Vec<_>>()),
        );
        out.set(&format!("{p}_client_received_per_s"), round(self.received as f64 / self.window_s, 0));
        out.set(&format!("{p}_dispatcher_cpu_s_per_1k"), per_1k(self.dispatcher_cpu_s));
        out.set(&format!("{p}_dispatcher_cpu_pct"), round(self.dispatcher_cpu_s / self.window_s * 100.0, 1));
        // What a dispatcher could resend on a whole core if nothing else bound it.
        out.set(
            &format!("{p}_resent_per_dispatcher_cpu_s"),
            (self.dispatcher_cpu_s > 0.0).then(|| round(self.resent() as f64 / self.dispatcher_cpu_s, 0)),
        );
        out.set(&format!("{p}_store_cpu_pct"), round(self.store_cpu_s / self.window_s * 100.0, 1));
        out.set(&format!("{p}_store_round_trips_per_1k"), per_1k(self.store_round_trips as f64));
        out.set(&format!("{p}_overdue_at_end"), self.overdue_at_end);
        let bound = resend_bound(self.overdue_at_end, load.demand_per_s(), load.sweep_interval);
        out.set(&format!("{p}_bound_by"), bound);
        out.set(&format!("{p}_closes"), json!(self.closes));
        if bound == "demand" {
            out.notes.push(format!(
                "{} dispatcher(s): the sweep kept up with the demand; {} resends/s is a floor of the capacity, \
                 not the capacity (raise the pending receipts)",
                self.dispatchers,
                round(per_s, 0)
            ));
        }
        let store_pct = self.store_cpu_s / self.window_s * 100.0;
        if store_pct >= 80.0 {
            out.notes.push(format!(
                "{} dispatcher(s): the store server used {}% of a core: the store, not the dispatchers, \
                 bounds resending here, and more dispatchers cannot raise it",
                self.dispatchers,
                round(store_pct, 0)
            ));
        }
        // Each receipt is due once per ack timeout: more resends than that resent some twice.
        if per_s > load.demand_per_s() * 1.05 {
            out.notes.push(format!(
                "{} dispatcher(s): {} resends/s is above the demand: some receipts were resent twice in one timeout",
                self.dispatchers,
                round(per_s, 0)
            ));
        }
        // Frames in flight at either end of the window make the two differ a little, no more.
        if (self.received as f64) < self.resent() as f64 * 0.9 {
            out.notes.push(format!(
                "{} dispatcher(s): clients received {} of {} resends in the window",
                self.dispatchers,
                self.received,
                self.resent()
            ));
        }
        if self.resent() == 0 {
            out.fail(format!("{} dispatcher(s): nothing resent in the window", self.dispatchers));
        }
        if self.connected_at_end < load.users as u64 {
            out.fail(format!(
                "{} dispatcher(s): {} of {} users connected at the end (closes {:?}); resends did not all reach a client",
                self.dispatchers, self.connected_at_end, load.users, self.closes
            ));
        }
    }
}

// --- 6. gateway loss ---------------------------------------------------------------------------------

pub(crate) async fn loss(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Loss, System::Herald);
    let servers = 3;
    let per_server = if config.short { 1_000 } else { 3_000 };
    let rate = 200.0;
    let options = HeraldOptions { presence_ttl_ms: 3_000, ..HeraldOptions::default() };
    let mut sut = Sut::start(System::Herald, servers, options, config).await?;
    let mut workers = Workers::spawn(&sut.plan_round_the_servers(per_server, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let Sut::Herald(h) = &mut sut else { anyhow::bail!("not herald") };
    let users = user_names("u", 0, per_server * servers);
    let total = users_total(&users);

    let before = publish_jobs(h, &users, 0, (rate * 3.0) as u64, rate).await?;
    let _ = before;
    let killed_at = Instant::now();
    h.gateways[0].kill9();
    let h = &*h;
    let publishing = publish_jobs(h, &users, (rate * 3.0) as u64, (rate * 10.0) as u64, rate);
    let watching = async {
        let mut back = None;
        while back.is_none() && killed_at.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if workers.totals().await?.connected >= total {
                back = Some(killed_at.elapsed().as_secs_f64());
            }
        }
        anyhow::Ok(back)
    };
    let (published, reconnected_s) = tokio::join!(publishing, watching);
    published?;
    let reconnected_s = reconnected_s?;
    let sent = (rate * 13.0) as u64;
    let (totals, all_in) =
        workers.wait_for(Duration::from_secs(120), Duration::from_millis(250), |t| t.unique >= sent).await?;
    out.set("gateways", servers as u64);
    out.set("connections", total);
    out.set("killed_gateway_connections", per_server as u64);
    out.set("reconnected_s", reconnected_s.map(|s| round(s, 2)));
    out.set("all_received_after_kill_s", round(killed_at.elapsed().as_secs_f64(), 2));
    out.set("published", sent);
    out.set("received_unique", totals.unique);
    out.set("lost", sent.saturating_sub(totals.unique));
    out.set("duplicates", totals.duplicates);
    out.set("closes", json!(totals.closes));
    if !all_in {
        out.fail(format!("{} messages not received within 120 s", sent - totals.unique));
    }
    workers.quit().await;
    Ok(out)
}

fn users_total(users: &[String]) -> u64 {
    users.len() as u64
}

// --- smoke: correctness only ---------------------------------------------------------------------------

/// A few hundred connections on two gateways, a few hundred direct messages and one fan-out
/// job through the whole path, and deliveries straight to a gateway: nothing may be lost.
pub(crate) async fn smoke(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Smoke, System::Herald);
    let per_server = 150;
    let sut = Sut::start(System::Herald, 2, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let mut workers = Workers::spawn(&sut.plan(per_server, true, 64))?;
    connect(&mut workers, 1.0, Duration::from_secs(60)).await?;
    let users = user_names("u", 0, per_server * 2);
    let direct = 300u64;
    publish_jobs(h, &users, 0, direct, 500.0).await?;
    let job = json!({ "id": "smoke-fanout", "to": users, "payload": { "lg_k": direct, "lg_t": protocol::now_us() } });
    h.js.publish(h.stack.names().publish_subject("bench"), serde_json::to_vec(&job)?.into()).await?.await?;
    let full_path = direct + users.len() as u64;
    publish_deliveries(h, per_server, (direct + 1)..(direct + 4)).await?;
    let expected = full_path + 3 * users.len() as u64;
    let (totals, _) =
        workers.wait_for(Duration::from_secs(60), Duration::from_millis(100), |t| t.unique >= expected).await?;
    let receipts = receipt_latency(h, full_path, Duration::from_secs(60)).await?;
    out.set("connections", totals.connected);
    out.set("expected", expected);
    out.set("received_unique", totals.unique);
    out.set("lost", expected.saturating_sub(totals.unique));
    out.set("duplicates", totals.duplicates);
    out.set("receipts_expected", full_path);
    out.set("receipts_delivered", receipts.delivered);
    if totals.unique < expected {
        out.fail(format!("{} messages lost", expected - totals.unique));
    }
    if receipts.delivered < full_path {
        out.fail(format!("{} receipts not delivered", full_path - receipts.delivered));
    }
    workers.quit().await;
    Ok(out)
}

/// Runs one scenario on one system, bounded by `limit`.
pub(crate) async fn run(scenario: Scenario, system: System, config: &RunConfig, limit: Duration) -> Outcome {
    let fut = async {
        match (scenario, system) {
            (Scenario::Idle, s) => idle(s, config).await,
            (Scenario::Gateway, s) => gateway_stage(s, config).await,
            (Scenario::Direct, System::Herald) => direct(config).await,
            (Scenario::Fanout, System::Herald) => fanout(config).await,
            (Scenario::Storm, System::Herald) => storm(config).await,
            (Scenario::Loss, System::Herald) => loss(config).await,
            (Scenario::Backlog, System::Herald) => backlog(config).await,
            (Scenario::BacklogStorm, System::Herald) => backlog_storm(config).await,
            (Scenario::Resend, System::Herald) => resend(config).await,
            (Scenario::Rollout, System::Herald) => rollout::rollout(config).await,
            (Scenario::Smoke, System::Herald) => smoke(config).await,
            (Scenario::Cost, System::Herald) => cost::cost(config).await,
            (Scenario::Cost, System::Limit) => cost::cost_on_the_limit(config).await,
            (Scenario::Topic, System::Herald) => topic(config).await,
            (Scenario::Soak, System::Herald) => soak::soak(config).await,
            (scenario, system) => anyhow::bail!("{scenario:?} is not measured on {system:?}"),
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => {
            let mut out = Outcome::new(scenario, system);
            out.fail(format!("error: {e:#}"));
            out
        }
        Err(_) => {
            let mut out = Outcome::new(scenario, system);
            out.fail(format!("did not finish within {limit:?}"));
            out
        }
    }
}

/// Figures by name, for the JSON file.
pub(crate) fn as_json(outcomes: &[Outcome]) -> Value {
    Value::Array(
        outcomes
            .iter()
            .map(|o| {
                let figures: serde_json::Map<String, Value> = o.figures.iter().cloned().collect();
                json!({ "scenario": o.scenario, "system": o.system, "ok": o.ok, "notes": o.notes, "figures": figures })
            })
            .collect(),
    )
}

/// Figures that are lists of rows (a ladder's steps, a soak's windows): printed one row a line
/// under the table, not in a column.
const ROW_FIGURES: [&str; 2] = ["steps", "windows"];

/// A plain-text table per scenario, systems side by side.
pub(crate) fn table(outcomes: &[Outcome]) -> String {
    let mut by_scenario: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
    for o in outcomes {
        by_scenario.entry(format!("{:?}", o.scenario).to_lowercase()).or_default().push(o);
    }
    let mut text = String::new();
    for (scenario, list) in by_scenario {
        let mut names: Vec<String> = Vec::new();
        for o in &list {
            for (name, _) in &o.figures {
                if !names.contains(name) && !ROW_FIGURES.contains(&name.as_str()) {
                    names.push(name.clone());
                }
            }
        }
        text.push_str(&format!("\n== {scenario} ==\n{:<40}", "figure"));
        for o in &list {
            text.push_str(&format!(
                " {:>22}",
                format!("{:?}{}", o.system, if o.ok { "" } else { " (FAILED)" }).to_lowercase()
            ));
        }
        text.push('\n');
        for name in names {
            text.push_str(&format!("{name:<40}"));
            for o in &list {
                let v = o
                    .figures
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_else(|| "-".into());
                text.push_str(&format!(" {v:>22}"));
            }
            text.push('\n');
        }
        for o in &list {
            for note in &o.notes {
                text.push_str(&format!("note ({:?}): {note}\n", o.system));
            }
            for (name, rows) in o.figures.iter().filter(|(n, _)| ROW_FIGURES.contains(&n.as_str())) {
                let label = name.trim_end_matches('s');
                for row in rows.as_array().into_iter().flatten() {
                    text.push_str(&format!("{label}: {row}\n"));
                }
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_sends_what_is_due_within_its_burst_at_once() {
        let ms = Duration::from_millis;
        // The default at 800/s: the next job (1.25 ms away) goes at once; one 3 ms away waits.
        assert!(!Pace::steady(800.0).sleeps_for(Duration::from_micros(1_250)));
        assert!(Pace::steady(800.0).sleeps_for(ms(3)));
        // Bursts of 0: every job waits for its own time. Bursts of 20 ms: a linger's worth goes.
        assert!(Pace { rate: 800.0, burst: Duration::ZERO }.sleeps_for(Duration::from_micros(1)));
        assert!(!Pace { rate: 800.0, burst: ms(20) }.sleeps_for(ms(19)));
        assert!(Pace { rate: 800.0, burst: ms(20) }.sleeps_for(ms(21)));
    }

    #[test]
    fn a_resend_run_is_sweep_bound_only_when_receipts_wait_past_their_time() {
        let interval = Duration::from_millis(500);
        // 4,000/s due: 2,000 due per interval; up to two intervals' worth is a sweep keeping up.
        assert_eq!(resend_bound(0, 4_000.0, interval), "demand");
        assert_eq!(resend_bound(4_000, 4_000.0, interval), "demand");
        assert_eq!(resend_bound(4_001, 4_000.0, interval), "sweep");
    }

    #[test]
    fn jobs_go_to_their_users_in_turn() {
        let users = user_names("u", 0, 5);
        assert_eq!(Recipients::one_each(&users).json_list(7), r#""u2""#);
        let three = Recipients { users: &users, per_job: 3 };
        assert_eq!(three.json_list(0), r#""u0","u1","u2""#);
        assert_eq!(three.json_list(1), r#""u3","u4","u0""#);
        let all = Recipients { users: &users, per_job: 9 };
        assert_eq!(all.json_list(0).matches('u').count(), 5);
    }
}
