//! What one durable message costs (`--scenario cost`): 2 gateways, 1 dispatcher and online users
//! that ack. For 1, 10 and 1,000 recipients per message in turn, jobs go out at a steady rate for
//! a fixed window; then the run waits until every delivery has arrived and every receipt reads
//! `delivered`. Reported per message and per delivery, as differences across that whole span:
//! Herald's own CPU (gateways + dispatcher, from `/proc`), the store's, NATS's and Redis's; heap
//! allocations and bytes in the gateways and in the dispatcher (the benchmark build's counters,
//! `herald_allocations_total`); store round trips; and publish → receive p50 / p99 with the
//! dispatcher's job stages beside it (`stages`).
//!
//! On the limit (`--system limit`), the same users and windows with the frames sent straight to
//! the bare servers: the CPU a server that does nothing else spends per delivery and its ack,
//! beside which Herald's gateways are read (`ratios::add_cost_ratios`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::metrics;
use super::orchestrator::{user_names, Workers};
use super::protocol;
use super::report::Latency;
use super::scenarios::{
    connect, mean_ms, publish_paced, receipt_latency, round, Outcome, Pace, Recipients, RunConfig, Scenario, Sut,
    System,
};
use super::stages;
use super::systems::{Herald, HeraldOptions, Limit, Server};

/// Receipts moved to `delivered` by acks, counted by the dispatcher.
const ACKED: &str = r#"herald_dispatcher_receipt_writes_total{op="ack"}"#;
const ALLOCATIONS: &str = "herald_allocations_total";
const ALLOCATED_BYTES: &str = "herald_allocated_bytes_total";
/// How long a window's deliveries and acks may take to land after its last job.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// One window's load: jobs per second, each to `recipients` users.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) recipients: usize,
    pub(crate) jobs_per_s: f64,
}

/// The cost scenario's settings (`loadgen run --cost-*`).
#[derive(Debug, Clone)]
pub(crate) struct CostOptions {
    /// Run in this order, each for `window`.
    pub(crate) loads: Vec<Load>,
    /// How long jobs are published at each load; `None`: 20 s (6 s in the short run).
    pub(crate) window: Option<Duration>,
    /// Jobs due within this are sent at once ([`Pace::burst`]).
    pub(crate) burst: Duration,
}

/// What is read before and after a window: cumulative counters of every process involved.
struct Snapshot {
    at: Instant,
    gateways_cpu: f64,
    dispatcher_cpu: f64,
    store_cpu: f64,
    nats_cpu: f64,
    redis_cpu: f64,
    store_requests: u64,
    /// Summed over the gateways; `None` in a build without the allocation counters.
    gateway_allocs: Option<Allocations>,
    dispatcher_allocs: Option<Allocations>,
    acked: u64,
    /// The dispatcher's metrics page, for the job stages.
    dispatcher_page: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Allocations {
    count: u64,
    bytes: u64,
}

impl Allocations {
    fn of(page: &str) -> Option<Self> {
        Some(Self {
            count: metrics::counter_value(page, ALLOCATIONS)?,
            bytes: metrics::counter_value(page, ALLOCATED_BYTES)?,
        })
    }

    fn plus(self, other: Self) -> Self {
        Self { count: self.count + other.count, bytes: self.bytes + other.bytes }
    }

    fn since(self, before: Self) -> Self {
        Self { count: self.count.saturating_sub(before.count), bytes: self.bytes.saturating_sub(before.bytes) }
    }
}

impl Snapshot {
    async fn take(h: &Herald, http: &reqwest::Client) -> anyhow::Result<Self> {
        let (store_cpu, nats_cpu) = h.deps_cpu_secs();
        let at = Instant::now();
        let gateways_cpu = h.gateways.iter().map(|g| g.cpu_secs()).sum();
        let dispatcher = &h.dispatchers[0];
        let dispatcher_cpu = dispatcher.cpu_secs();
        let redis_cpu = h.stack.redis.pid().and_then(metrics::cpu_secs).unwrap_or(0.0);
        let store_requests = h.store_proxy.requests();
        let dispatcher_page = metrics::prometheus_page(http, dispatcher.internal).await?;
        let mut gateway_allocs = Some(Allocations::default());
        for gateway in &h.gateways {
            let page = metrics::prometheus_page(http, gateway.internal).await?;
            gateway_allocs = gateway_allocs.zip(Allocations::of(&page)).map(|(sum, one)| sum.plus(one));
        }
        Ok(Self {
            at,
            gateways_cpu,
            dispatcher_cpu,
            store_cpu,
            nats_cpu,
            redis_cpu,
            store_requests,
            gateway_allocs,
            dispatcher_allocs: Allocations::of(&dispatcher_page),
            acked: metrics::counter_value(&dispatcher_page, ACKED).unwrap_or(0),
            dispatcher_page,
        })
    }

    fn herald_cpu(&self) -> f64 {
        self.gateways_cpu + self.dispatcher_cpu
    }
}

/// The run's size, the same on every system: server processes, users on each, how long each
/// load is sent, and how long the idle cost is measured before the first.
struct Shape {
    servers: usize,
    per_server: usize,
    window: Duration,
    idle: Duration,
}

impl Shape {
    fn of(config: &RunConfig) -> Self {
        let (per_server, window, idle) = if config.short { (1_000, 6, 3) } else { (2_500, 20, 10) };
        Self {
            servers: 2,
            per_server,
            window: config.cost.window.unwrap_or(Duration::from_secs(window)),
            idle: Duration::from_secs(idle),
        }
    }
}

pub(crate) async fn cost(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Cost, System::Herald);
    let Shape { servers, per_server, window, idle } = Shape::of(config);
    let sut = Sut::start(System::Herald, servers, HeraldOptions::default(), config).await?;
    let Sut::Herald(h) = &sut else { anyhow::bail!("not herald") };
    let mut workers = Workers::spawn(&sut.plan(per_server, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    let users = user_names("u", 0, per_server * servers);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    // Let the online announcements and replays of the connect settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let idle = idle_cpu_per_s(h, &http, idle).await?;
    out.set("users_online", users.len() as u64);
    out.set("window_s", window.as_secs_f64());
    out.set("publish_burst_ms", config.cost.burst.as_millis() as u64);
    out.set("idle_herald_cpu_ms_per_s", round(idle * 1000.0, 2));
    let mut k = 0u64;
    let mut deliveries = 0u64;
    let mut rows = Vec::new();
    for &load in &config.cost.loads {
        let to = Recipients { users: &users, per_job: load.recipients.min(users.len()) };
        let window = Window { to, load, burst: config.cost.burst, window, first_k: k, idle_cpu_per_s: idle };
        let row = window.measure(h, &mut workers, &http, &mut out).await?;
        if !row.contains_key("gateway_allocs_per_msg") && rows.is_empty() {
            out.notes.push(
                "no allocation figures: this build has no allocation counters (scripts/bench.sh builds with them)"
                    .into(),
            );
        }
        eprintln!("loadgen: cost window {}", Value::Object(row.clone()));
        summarise(&mut out, load.recipients, &row);
        k += window.jobs();
        deliveries += window.jobs() * to.per_job as u64;
        rows.push(Value::Object(row));
    }

    // Every delivery arrived (checked per window); every receipt must read `delivered`.
    let totals = workers.totals().await?;
    out.set("published_jobs", k);
    out.set("deliveries", deliveries);
    out.set("received_unique", totals.unique);
    out.set("lost", deliveries.saturating_sub(totals.unique));
    out.set("duplicates", totals.duplicates);
    let receipts = receipt_latency(h, deliveries, Duration::from_secs(90)).await?;
    out.set("receipts_delivered", receipts.delivered);
    if receipts.delivered < deliveries {
        out.fail(format!("{} receipts not delivered within 90 s", deliveries - receipts.delivered));
    }
    let sizes = stored_sizes(&h.db).await?;
    for (key, value) in sizes {
        out.set(key, value);
    }
    out.set("steps", Value::Array(rows));
    workers.quit().await;
    Ok(out)
}

/// What the store holds per delivery, for the capacity model: BSON bytes of a sample of
/// receipts (a one-recipient message travels inside its receipt, so those are the larger) and
/// of messages (those of several recipients), with the generator's ~40-byte payloads. Index
/// entries are not included: nx-27017 keeps none but `_id`.
async fn stored_sizes(db: &mongodb::Database) -> anyhow::Result<Vec<(&'static str, Value)>> {
    async fn sizes(db: &mongodb::Database, collection: &str) -> anyhow::Result<Vec<usize>> {
        let docs: Vec<mongodb::bson::Document> =
            db.collection(collection).find(mongodb::bson::doc! {}).limit(2_000).await?.try_collect().await?;
        let mut sizes = Vec::with_capacity(docs.len());
        for doc in docs {
            sizes.push(mongodb::bson::to_vec(&doc)?.len());
        }
        sizes.sort_unstable();
        Ok(sizes)
    }
    let receipts = sizes(db, herald_shared::naming::collections::RECEIPTS).await?;
    let messages = sizes(db, herald_shared::naming::collections::MESSAGES).await?;
    let mean = |v: &[usize]| if v.is_empty() { 0.0 } else { v.iter().sum::<usize>() as f64 / v.len() as f64 };
    Ok(vec![
        ("receipt_doc_bytes_min", Value::from(receipts.first().copied().unwrap_or(0))),
        ("receipt_doc_bytes_max", Value::from(receipts.last().copied().unwrap_or(0))),
        ("receipt_doc_bytes_mean", Value::from(round(mean(&receipts), 0))),
        ("message_doc_bytes_mean", Value::from(round(mean(&messages), 0))),
    ])
}

/// Herald's CPU seconds per second with every user connected and nothing sent (pings,
/// heartbeats, sweeps), to tell what a message costs from what the connections cost anyway.
async fn idle_cpu_per_s(h: &Herald, http: &reqwest::Client, span: Duration) -> anyhow::Result<f64> {
    let before = Snapshot::take(h, http).await?;
    tokio::time::sleep(span).await;
    let after = Snapshot::take(h, http).await?;
    Ok((after.herald_cpu() - before.herald_cpu()) / after.at.duration_since(before.at).as_secs_f64())
}

/// One load's window.
struct Window<'a> {
    to: Recipients<'a>,
    load: Load,
    /// How the window's jobs are spaced ([`Pace::burst`]).
    burst: Duration,
    window: Duration,
    first_k: u64,
    idle_cpu_per_s: f64,
}

impl Window<'_> {
    fn jobs(&self) -> u64 {
        (self.load.jobs_per_s * self.window.as_secs_f64()).round().max(1.0) as u64
    }

    fn deliveries(&self) -> u64 {
        self.jobs() * self.to.per_job as u64
    }

    /// Publishes the window's jobs, waits until they have all arrived and been acked, and
    /// returns the window's figures (a failure to settle is noted in `out`).
    async fn measure(
        &self,
        h: &Herald,
        workers: &mut Workers,
        http: &reqwest::Client,
        out: &mut Outcome,
    ) -> anyhow::Result<Map<String, Value>> {
        workers.reset().await?;
        let start_totals = workers.totals().await?;
        let before = Snapshot::take(h, http).await?;
        let subject = h.stack.names().publish_subject("bench");
        let stop = CancellationToken::new();
        let pace = Pace { rate: self.load.jobs_per_s, burst: self.burst };
        let (_, took) = publish_paced(&h.js, &subject, self.to, self.first_k, self.jobs(), pace, &stop).await?;
        let done = self.settle(h, workers, http, start_totals.unique, before.acked).await?;
        let settled = before.at.elapsed().as_secs_f64();
        let after = Snapshot::take(h, http).await?;
        let totals = workers.totals().await?;
        if !done {
            out.fail(format!(
                "{} recipients per job: {} of {} delivered and {} of them acked {SETTLE_LIMIT:?} after the window",
                self.to.per_job,
                totals.unique - start_totals.unique,
                self.deliveries(),
                after.acked - before.acked
            ));
        }
        let mut row = self.figures(&before, &after);
        let lat = Latency::of(totals.publish_to_rx.as_ref());
        row.insert("publish_took_s".into(), json!(round(took, 2)));
        row.insert("settled_s".into(), json!(round(settled, 2)));
        row.insert("received".into(), json!(totals.unique - start_totals.unique));
        row.insert("duplicates".into(), json!(totals.duplicates - start_totals.duplicates));
        row.insert("p50_ms".into(), json!(round(lat.p50_ms, 1)));
        row.insert("p99_ms".into(), json!(round(lat.p99_ms, 1)));
        row.insert("mean_ms".into(), json!(round(mean_ms(totals.publish_to_rx.as_ref()), 1)));
        row.extend(stages::split(&before.dispatcher_page, &after.dispatcher_page));
        Ok(row)
    }

    /// Waits until every delivery of the window has arrived and every receipt has been acked
    /// (the dispatcher's count, read from its page: polling the store would load what is
    /// measured). Returns whether both happened within [`SETTLE_LIMIT`].
    async fn settle(
        &self,
        h: &Herald,
        workers: &mut Workers,
        http: &reqwest::Client,
        unique_before: u64,
        acked_before: u64,
    ) -> anyhow::Result<bool> {
        let want = self.deliveries();
        let deadline = Instant::now() + SETTLE_LIMIT;
        let (_, received) =
            workers.wait_for(SETTLE_LIMIT, Duration::from_millis(100), |t| t.unique >= unique_before + want).await?;
        let dispatcher = h.dispatchers[0].internal;
        loop {
            let acked = metrics::prometheus_counter(http, dispatcher, ACKED).await?;
            if acked >= acked_before + want {
                return Ok(received);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Costs per message and per delivery, from two snapshots.
    fn figures(&self, before: &Snapshot, after: &Snapshot) -> Map<String, Value> {
        let (jobs, deliveries) = (self.jobs() as f64, self.deliveries() as f64);
        let span = after.at.duration_since(before.at).as_secs_f64();
        let mut row = Map::new();
        row.insert("recipients".into(), json!(self.to.per_job));
        row.insert("jobs_per_s".into(), json!(self.load.jobs_per_s));
        row.insert("jobs".into(), json!(self.jobs()));
        row.insert("deliveries".into(), json!(self.deliveries()));
        row.insert("span_s".into(), json!(round(span, 2)));
        let mut per = |name: &str, total: f64| {
            row.insert(format!("{name}_per_msg"), json!(round(total / jobs, 2)));
            row.insert(format!("{name}_per_delivery"), json!(round(total / deliveries, 3)));
        };
        let us = |secs: f64| secs * 1e6;
        let herald = after.herald_cpu() - before.herald_cpu();
        per("herald_cpu_us", us(herald));
        per("herald_cpu_us_above_idle", us(herald - self.idle_cpu_per_s * span).max(0.0));
        per("gateways_cpu_us", us(after.gateways_cpu - before.gateways_cpu));
        per("dispatcher_cpu_us", us(after.dispatcher_cpu - before.dispatcher_cpu));
        per("store_cpu_us", us(after.store_cpu - before.store_cpu));
        per("nats_cpu_us", us(after.nats_cpu - before.nats_cpu));
        per("redis_cpu_us", us(after.redis_cpu - before.redis_cpu));
        per("store_round_trips", after.store_requests.saturating_sub(before.store_requests) as f64);
        for (name, b, a) in [
            ("gateway", before.gateway_allocs, after.gateway_allocs),
            ("dispatcher", before.dispatcher_allocs, after.dispatcher_allocs),
        ] {
            if let Some(d) = b.zip(a).map(|(b, a)| a.since(b)) {
                per(&format!("{name}_allocs"), d.count as f64);
                per(&format!("{name}_alloc_bytes"), d.bytes as f64);
            }
        }
        row
    }
}

/// The headline figures of one window, flat for the table: `r<recipients>_<figure>`.
fn summarise(out: &mut Outcome, recipients: usize, row: &Map<String, Value>) {
    let keys = [
        "jobs_per_s",
        "herald_cpu_us_per_msg",
        "herald_cpu_us_per_delivery",
        "herald_cpu_us_above_idle_per_msg",
        "gateways_cpu_us_per_delivery",
        "store_cpu_us_per_msg",
        "gateway_allocs_per_msg",
        "dispatcher_allocs_per_msg",
        "store_round_trips_per_msg",
        "p50_ms",
        "p99_ms",
    ];
    for key in keys {
        if let Some(value) = row.get(key) {
            out.set(&format!("r{recipients}_{key}"), value.clone());
        }
    }
}

// --- the same windows on the limit ----------------------------------------------------------------

/// How the limit is sent its frames: one `POST /send` per server for each such span of jobs, as
/// a dispatcher routes a group of jobs (its default linger) to each gateway in one message.
const LIMIT_GROUP: Duration = Duration::from_millis(20);
/// How long the limit's count of frames read from its clients must stay still after the last
/// delivery before the window ends: longer than a client's ack batch (100 ms).
const LIMIT_QUIET: Duration = Duration::from_millis(400);

/// The cost scenario's windows on the bare server (`--system limit`): what a server that does
/// nothing but hold the sockets spends to write each frame to its one connection and read the
/// client's ack, with the same users, generator and rates as Herald's gateways. It bounds the
/// gateways' half of Herald's cost from below; there is no such bound for a dispatcher's.
pub(crate) async fn cost_on_the_limit(config: &RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(Scenario::Cost, System::Limit);
    let Shape { servers, per_server, window, idle: idle_span } = Shape::of(config);
    let sut = Sut::start(System::Limit, servers, HeraldOptions::default(), config).await?;
    let Sut::Limit(limit) = &sut else { anyhow::bail!("not the limit") };
    let mut workers = Workers::spawn(&sut.plan(per_server, true, 256))?;
    connect(&mut workers, 1.0, Duration::from_secs(120)).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let users = user_names("u", 0, per_server * servers);
    let home = homes(&http, &limit.servers, &users).await?;
    let cpu = || limit.servers.iter().map(|s| s.cpu_secs()).sum::<f64>();

    let (idle_before, idle_at) = (cpu(), Instant::now());
    tokio::time::sleep(idle_span).await;
    let idle = (cpu() - idle_before) / idle_at.elapsed().as_secs_f64();
    out.set("users_online", users.len() as u64);
    out.set("window_s", window.as_secs_f64());
    out.set("send_group_ms", LIMIT_GROUP.as_millis() as u64);
    out.set("idle_limit_cpu_ms_per_s", round(idle * 1000.0, 2));
    let mut k = 0u64;
    let mut rows = Vec::new();
    for &load in &config.cost.loads {
        let to = Recipients { users: &users, per_job: load.recipients.min(users.len()) };
        let jobs = (load.jobs_per_s * window.as_secs_f64()).round().max(1.0) as u64;
        let deliveries = jobs * to.per_job as u64;
        workers.reset().await?;
        let start = workers.totals().await?;
        let (before, at) = (cpu(), Instant::now());
        let sent = send_paced(&http, limit, &home, to, k, jobs, load.jobs_per_s).await?;
        let (_, received) = workers
            .wait_for(SETTLE_LIMIT, Duration::from_millis(100), |t| t.unique >= start.unique + deliveries)
            .await?;
        read_quiet(&http, limit).await?;
        let span = at.elapsed().as_secs_f64();
        let used = cpu() - before;
        let totals = workers.totals().await?;
        if sent < deliveries || !received {
            out.fail(format!(
                "{} recipients per job: {sent} of {deliveries} frames queued, {} received",
                to.per_job,
                totals.unique - start.unique
            ));
        }
        let lat = Latency::of(totals.publish_to_rx.as_ref());
        let row = json!({
            "recipients": to.per_job,
            "jobs_per_s": load.jobs_per_s,
            "jobs": jobs,
            "deliveries": deliveries,
            "span_s": round(span, 2),
            "limit_cpu_us_per_msg": round(used * 1e6 / jobs as f64, 2),
            "limit_cpu_us_per_delivery": round(used * 1e6 / deliveries as f64, 3),
            "limit_cpu_us_above_idle_per_delivery": round(((used - idle * span) * 1e6 / deliveries as f64).max(0.0), 3),
            "received": totals.unique - start.unique,
            "duplicates": totals.duplicates - start.duplicates,
            "p50_ms": round(lat.p50_ms, 1),
            "p99_ms": round(lat.p99_ms, 1),
        });
        eprintln!("loadgen: cost window on the limit {row}");
        for key in ["jobs_per_s", "limit_cpu_us_per_msg", "limit_cpu_us_per_delivery", "p50_ms", "p99_ms"] {
            out.set(&format!("r{}_{key}", load.recipients), row[key].clone());
        }
        k += jobs;
        rows.push(row);
    }
    out.set("steps", Value::Array(rows));
    workers.quit().await;
    Ok(out)
}

/// Which server each user is connected to (index into `servers`), from their `GET /users`.
async fn homes(http: &reqwest::Client, servers: &[Server], users: &[String]) -> anyhow::Result<HashMap<String, usize>> {
    let mut home = HashMap::new();
    for (i, server) in servers.iter().enumerate() {
        let list = http.get(format!("http://{}/users", server.addr)).send().await?.error_for_status()?.text().await?;
        home.extend(list.lines().map(|user| (user.to_owned(), i)));
    }
    let missing = users.iter().filter(|u| !home.contains_key(*u)).count();
    anyhow::ensure!(missing == 0, "{missing} users are connected to no bare server");
    Ok(home)
}

/// Sends `count` jobs from `first_k` at `rate` per second, the frames of each [`LIMIT_GROUP`]
/// in one `POST /send` per server. Returns how many frames the servers queued.
async fn send_paced(
    http: &reqwest::Client,
    limit: &Limit,
    home: &HashMap<String, usize>,
    to: Recipients<'_>,
    first_k: u64,
    count: u64,
    rate: f64,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let (mut next, mut queued, mut groups) = (0, 0, 0);
    while next < count {
        groups += 1;
        // Every job due by now, in one group.
        let due = ((start.elapsed().as_secs_f64() * rate).floor() as u64 + 1).min(count);
        let mut bodies = vec![String::new(); limit.servers.len()];
        for k in (first_k + next)..(first_k + due) {
            let frame = protocol::notification(&format!("d-{k}"), k, protocol::now_us());
            for user in to.of(k) {
                let body = &mut bodies[home.get(user).copied().unwrap_or(0)];
                body.push_str(user);
                body.push('\t');
                body.push_str(&frame);
                body.push('\n');
            }
        }
        next = due;
        let posts = limit.servers.iter().zip(bodies).filter(|(_, body)| !body.is_empty()).map(|(server, body)| {
            let request = http.post(format!("http://{}/send", server.addr)).body(body);
            async move { anyhow::Ok(request.send().await?.error_for_status()?.text().await?.trim().parse::<u64>()?) }
        });
        queued += futures::future::try_join_all(posts).await?.iter().sum::<u64>();
        tokio::time::sleep_until((start + LIMIT_GROUP * groups).into()).await;
    }
    Ok(queued)
}

/// Waits until the servers' count of frames read from clients (the acks) stops moving.
async fn read_quiet(http: &reqwest::Client, limit: &Limit) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut last = (u64::MAX, Instant::now());
    while Instant::now() < deadline {
        let mut read = 0;
        for server in &limit.servers {
            let text =
                http.get(format!("http://{}/stats", server.addr)).send().await?.error_for_status()?.text().await?;
            read += text.trim().parse::<u64>()?;
        }
        if read != last.0 {
            last = (read, Instant::now());
        } else if last.1.elapsed() >= LIMIT_QUIET {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the bare servers were still reading acks {SETTLE_LIMIT:?} after the window")
}
