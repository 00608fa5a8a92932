//! Many clients and a steady publisher, for fault tests: a [`Fleet`] of users that each hold one
//! connection, ack everything they receive and reconnect as proto/README.md tells clients to
//! (jittered exponential backoff, at once after 1012), counting duplicates, reconnects, close
//! codes and anything received past its expiry; a [`Publisher`] that streams jobs at a set rate
//! and retries each until JetStream has it; and a [`Tally`] that holds both against the receipts
//! in the store and says what was lost.
//!
//! Owns the client tasks and the publisher task (both end on drop). What to break, and when, is
//! left to the tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::TryStreamExt;
use herald_dispatcher::store::ReceiptDoc;
use herald_proto::client::ServerFrame;
use herald_shared::naming::collections;
use mongodb::bson::doc;
use rand::Rng;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Frame, TestClient};
use crate::cluster::{ws_url, JWT_SECRET};
use crate::tokens;

/// The protocol's reconnect schedule (proto/README.md, "Reconnecting").
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Ids per ack frame: the README's browser client batches 100.
const ACK_BATCH: usize = 100;
/// Close code recorded when a connection ends without a close frame.
pub const ABNORMAL: u16 = 1006;

/// What one user's client saw, over all its connections.
#[derive(Debug, Default, Clone)]
pub struct UserLog {
    /// Message id → times received (more than once is a duplicate).
    pub received: HashMap<String, u32>,
    /// Connections that got as far as `hello`.
    pub connections: u32,
    /// Close codes of the connections that ended, in order ([`ABNORMAL`] without a close frame).
    pub closes: Vec<u16>,
    /// Upgrades refused, by HTTP status (0: no HTTP answer, e.g. connection refused).
    pub refusals: Vec<u16>,
    /// Notifications that arrived after their `expires_at_ms`.
    pub late: Vec<String>,
    /// The gateway holding the current connection, if any.
    pub gateway_id: Option<String>,
}

struct Shared {
    /// Where clients connect, tried in turn like a load balancer would.
    gateways: RwLock<Vec<SocketAddr>>,
    logs: Mutex<BTreeMap<String, UserLog>>,
    /// Notifications received, all users: for "is it still flowing" checks.
    notifications: AtomicUsize,
}

/// A set of users, one client each. Add users with [`Fleet::connect`]; every client runs until
/// the fleet is dropped or [`Fleet::disconnect`] removes it.
pub struct Fleet {
    shared: Arc<Shared>,
    /// Per user: the token that stops its client task.
    stops: Mutex<HashMap<String, CancellationToken>>,
    /// Owns every client task; aborted on drop.
    tasks: Mutex<JoinSet<()>>,
}

impl Fleet {
    pub fn new(gateways: Vec<SocketAddr>) -> Self {
        Self {
            shared: Arc::new(Shared {
                gateways: RwLock::new(gateways),
                logs: Mutex::default(),
                notifications: AtomicUsize::new(0),
            }),
            stops: Mutex::default(),
            tasks: Mutex::new(JoinSet::new()),
        }
    }

    /// Replaces the gateways clients connect to from now on (a load balancer's view).
    pub fn set_gateways(&self, gateways: Vec<SocketAddr>) {
        *self.shared.gateways.write().unwrap() = gateways;
    }

    /// Starts a client for each user (the first gateway tried varies by user, so a fleet spreads
    /// evenly), and waits until all have received `hello` or `within` has passed.
    pub async fn connect(&self, users: &[String], within: Duration) -> anyhow::Result<()> {
        let offset = self.stops.lock().unwrap().len();
        for (i, user) in users.iter().enumerate() {
            let stop = CancellationToken::new();
            self.stops.lock().unwrap().insert(user.clone(), stop.clone());
            self.shared.logs.lock().unwrap().entry(user.clone()).or_default();
            let client = UserClient { user: user.clone(), shared: Arc::clone(&self.shared), next: offset + i, stop };
            self.tasks.lock().unwrap().spawn(client.run());
        }
        crate::eventually(within, Duration::from_millis(50), || async {
            let logs = self.shared.logs.lock().unwrap();
            let waiting: Vec<&String> =
                users.iter().filter(|u| logs.get(*u).is_none_or(|l| l.connections == 0)).collect();
            if waiting.is_empty() {
                Ok(())
            } else {
                Err(format!("{} users not connected yet, e.g. {:?}", waiting.len(), &waiting[..waiting.len().min(5)]))
            }
        })
        .await
    }

    /// Stops these users' clients (their connections just vanish, as a closed laptop's would).
    pub fn disconnect(&self, users: &[String]) {
        let stops = self.stops.lock().unwrap();
        for user in users {
            if let Some(stop) = stops.get(user) {
                stop.cancel();
            }
        }
    }

    /// A copy of every user's log.
    pub fn logs(&self) -> BTreeMap<String, UserLog> {
        self.shared.logs.lock().unwrap().clone()
    }

    /// Notifications received so far, by all users, duplicates included.
    pub fn notifications(&self) -> usize {
        self.shared.notifications.load(Ordering::SeqCst)
    }

    /// Connections made after each user's first: reconnects.
    pub fn reconnects(&self) -> u32 {
        self.shared.logs.lock().unwrap().values().map(|l| l.connections.saturating_sub(1)).sum()
    }

    /// How many connections ended with each close code.
    pub fn close_codes(&self) -> BTreeMap<u16, usize> {
        let mut codes = BTreeMap::new();
        for log in self.shared.logs.lock().unwrap().values() {
            for code in &log.closes {
                *codes.entry(*code).or_default() += 1;
            }
        }
        codes
    }

    /// Users whose current connection is on `gateway_id`.
    pub fn users_on(&self, gateway_id: &str) -> Vec<String> {
        let logs = self.shared.logs.lock().unwrap();
        logs.iter().filter(|(_, l)| l.gateway_id.as_deref() == Some(gateway_id)).map(|(u, _)| u.clone()).collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            tasks.abort_all();
        }
    }
}

/// One user's client: connect, read, ack, reconnect, until stopped.
struct UserClient {
    user: String,
    shared: Arc<Shared>,
    /// Index of the next gateway to try.
    next: usize,
    stop: CancellationToken,
}

/// How a connection ended, for the reconnect decision.
enum Ended {
    Stopped,
    Closed(u16),
}

impl UserClient {
    async fn run(mut self) {
        let token = tokens::mint(JWT_SECRET, &self.user, Duration::from_secs(3600));
        let mut backoff = BACKOFF_START;
        while !self.stop.is_cancelled() {
            let addr = {
                let gateways = self.shared.gateways.read().unwrap();
                if gateways.is_empty() {
                    None
                } else {
                    Some(gateways[self.next % gateways.len()])
                }
            };
            self.next += 1;
            let connected = match addr {
                Some(addr) => {
                    let url = ws_url(addr);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        result = TestClient::connect(&url, &token) => result,
                    }
                }
                None => Err(crate::client::ConnectError::NoHello("no gateway to connect to".into())),
            };
            let delay = match connected {
                Ok(client) => {
                    backoff = BACKOFF_START;
                    match self.session(client).await {
                        Ended::Stopped => return,
                        // Draining gateway: reconnect at once, to another one.
                        Ended::Closed(1012) => Duration::ZERO,
                        Ended::Closed(_) => jitter(&mut backoff),
                    }
                }
                Err(e) => {
                    self.log(|l| l.refusals.push(e.status().unwrap_or(0)));
                    jitter(&mut backoff)
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&self, mut client: TestClient) -> Ended {
        let gateway_id = client.hello().gateway_id.to_string();
        self.log(|l| {
            l.connections += 1;
            l.gateway_id = Some(gateway_id);
        });
        let mut acks: Vec<String> = Vec::new();
        let ended = loop {
            // Take what is there without waiting, then ack it in one frame; wait only when idle.
            let wait = if acks.is_empty() { Duration::from_secs(3600) } else { Duration::ZERO };
            let frame = tokio::select! {
                _ = self.stop.cancelled() => break Ended::Stopped,
                frame = client.next_frame(wait) => frame,
            };
            match frame {
                Frame::Server(ServerFrame::Notification(n)) => {
                    let late = herald_shared::now_ms() > n.expires_at_ms;
                    self.shared.notifications.fetch_add(1, Ordering::SeqCst);
                    self.log(|l| {
                        *l.received.entry(n.id.to_string()).or_default() += 1;
                        if late {
                            l.late.push(n.id.to_string());
                        }
                    });
                    // Duplicates are acked too (the README: their ack is what stops them).
                    acks.push(n.id.into_string());
                    if acks.len() >= ACK_BATCH && !self.flush(&mut client, &mut acks).await {
                        break Ended::Closed(ABNORMAL);
                    }
                }
                Frame::Timeout => {
                    if !self.flush(&mut client, &mut acks).await {
                        break Ended::Closed(ABNORMAL);
                    }
                }
                Frame::Server(_) | Frame::Text(_) | Frame::Binary(_) => {}
                Frame::Close { code, .. } => break Ended::Closed(code),
                Frame::Error(_) | Frame::Closed => break Ended::Closed(ABNORMAL),
            }
        };
        if let Ended::Closed(code) = ended {
            self.log(|l| {
                l.closes.push(code);
                l.gateway_id = None;
            });
        }
        ended
    }

    /// Sends the batched acks; false if the connection is gone (they are re-earned on the next
    /// connection: unacked messages come again).
    async fn flush(&self, client: &mut TestClient, acks: &mut Vec<String>) -> bool {
        if acks.is_empty() {
            return true;
        }
        let ids = std::mem::take(acks);
        client.ack(ids).await.is_ok()
    }

    fn log(&self, f: impl FnOnce(&mut UserLog)) {
        f(self.shared.logs.lock().unwrap().entry(self.user.clone()).or_default());
    }
}

/// A random wait between half and one and a half times `backoff`, which then doubles (capped).
fn jitter(backoff: &mut Duration) -> Duration {
    let step = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    step.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// `count` user names, `<prefix>-000`, `<prefix>-001`, ...
pub fn users(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:03}")).collect()
}

// --- publishing ------------------------------------------------------------------------------------

/// One job the publisher got JetStream to store.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    pub to: Vec<String>,
    /// When JetStream acknowledged it.
    pub at: Instant,
}

/// Streams jobs `{"id": "<run>-<n>", "to": [...], "payload": {...}}` at a fixed rate from its own
/// NATS connection, retrying each (same id, same `Nats-Msg-Id`) until JetStream acknowledges it,
/// as a publisher that cares about its messages does. Stops after `count` jobs or on drop.
pub struct Publisher {
    log: Arc<Mutex<Vec<Published>>>,
    attempts_failed: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    stop: CancellationToken,
    /// The publishing task; aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct Stream {
    /// Prefix of job ids; also names the NATS client.
    pub run: String,
    /// Recipients, assigned round robin: job n goes to `recipients_per_job` consecutive users.
    pub users: Vec<String>,
    pub recipients_per_job: usize,
    pub count: usize,
    /// Jobs per second.
    pub rate: u32,
    /// Seconds to live, or the dispatcher's default.
    pub ttl_secs: Option<u64>,
}

impl Publisher {
    pub async fn start(nats_url: &str, subject: String, stream: Stream) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("publisher {}", stream.run))
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|_| Duration::from_millis(100))
            .connect(nats_url)
            .await?;
        let js = async_nats::jetstream::new(client);
        let log = Arc::new(Mutex::new(Vec::with_capacity(stream.count)));
        let attempts_failed = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let task = tokio::spawn(publish_all(
            js,
            subject,
            stream,
            Arc::clone(&log),
            Arc::clone(&attempts_failed),
            Arc::clone(&done),
            stop.clone(),
        ));
        Ok(Self { log, attempts_failed, done, stop, task })
    }

    /// Jobs stored so far.
    pub fn published(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Publish attempts that failed and were retried.
    pub fn failed_attempts(&self) -> usize {
        self.attempts_failed.load(Ordering::SeqCst)
    }

    pub fn log(&self) -> Vec<Published> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `n` jobs are stored.
    pub async fn wait_for(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        crate::eventually(within, Duration::from_millis(20), || async {
            let published = self.published();
            if published >= n {
                Ok(())
            } else {
                Err(format!("{published} of {n} published"))
            }
        })
        .await
    }

    /// Waits until every job is stored; returns the log.
    pub async fn finish(&self, within: Duration) -> anyhow::Result<Vec<Published>> {
        crate::eventually(within, Duration::from_millis(50), || async {
            if self.done.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(format!("{} published so far", self.published()))
            }
        })
        .await?;
        Ok(self.log())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

async fn publish_all(
    js: async_nats::jetstream::Context,
    subject: String,
    stream: Stream,
    log: Arc<Mutex<Vec<Published>>>,
    failed: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let start = Instant::now();
    let per_job = Duration::from_secs(1) / stream.rate.max(1);
    // Up to this many publishes in flight, so a slow ack does not slow the stream.
    let mut in_flight = JoinSet::new();
    for n in 0..stream.count {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(start + per_job * n as u32) => {}
        }
        let to: Vec<String> = (0..stream.recipients_per_job.min(stream.users.len()))
            .map(|k| stream.users[(n * stream.recipients_per_job + k) % stream.users.len()].clone())
            .collect();
        let id = format!("{}-{n:05}", stream.run);
        let mut job = json!({ "id": id, "to": to, "payload": { "n": n, "run": stream.run } });
        if let Some(ttl) = stream.ttl_secs {
            job["ttl_secs"] = json!(ttl);
        }
        let body = bytes::Bytes::from(serde_json::to_vec(&job).unwrap_or_default());
        let (js, subject, log, failed, stop) =
            (js.clone(), subject.clone(), Arc::clone(&log), Arc::clone(&failed), stop.clone());
        while in_flight.len() >= 64 {
            in_flight.join_next().await;
        }
        in_flight.spawn(async move {
            loop {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                let attempt = async {
                    let ack = js.publish_with_headers(subject.clone(), headers, body.clone()).await?;
                    tokio::time::timeout(Duration::from_secs(3), ack).await??;
                    anyhow::Ok(())
                };
                match attempt.await {
                    Ok(()) => break,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                }
            }
            log.lock().unwrap().push(Published { id, to, at: Instant::now() });
        });
    }
    while in_flight.join_next().await.is_some() {}
    done.store(true, Ordering::SeqCst);
}

// --- checking the invariant -----------------------------------------------------------------------

/// Receipt states in the store, by (message id, user).
pub async fn receipt_states(db: &mongodb::Database) -> anyhow::Result<HashMap<(String, String), String>> {
    let receipts: Vec<ReceiptDoc> =
        // Receipts only, not the claims that share their collection.
        db.collection::<ReceiptDoc>(collections::RECEIPTS)
            .find(doc! { "message_id": { "$exists": true } })
            .await?
            .try_collect()
            .await?;
    Ok(receipts
        .into_iter()
        .map(|r| ((r.message_id.into_string(), r.user.into_string()), r.state.as_str().to_owned()))
        .collect())
}

/// Waits until every (message, recipient) of `jobs` whose recipient is not in `offline` has a
/// `delivered` (or `read`) receipt; returns the time from `since` until then. Fails after
/// `within`.
pub async fn wait_delivered(
    db: &mongodb::Database,
    jobs: &[Published],
    offline: &BTreeSet<String>,
    since: Instant,
    within: Duration,
) -> anyhow::Result<Duration> {
    crate::eventually(within, Duration::from_millis(250), || async {
        let states = receipt_states(db).await.map_err(|e| format!("{e:#}"))?;
        let mut waiting = Vec::new();
        for job in jobs {
            for user in job.to.iter().filter(|u| !offline.contains(*u)) {
                match states.get(&(job.id.clone(), user.clone())).map(String::as_str) {
                    Some("delivered" | "read") => {}
                    other => waiting.push(format!("{}/{user}: {}", job.id, other.unwrap_or("no receipt"))),
                }
            }
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!("{} not delivered, e.g. {:?}", waiting.len(), &waiting[..waiting.len().min(5)]))
        }
    })
    .await?;
    Ok(since.elapsed())
}

/// The figures a fault test records (docs/RELIABILITY.md).
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub fault: String,
    /// Jobs JetStream stored, and the (message, recipient) pairs they make.
    pub jobs: usize,
    pub receipts: usize,
    pub delivered: usize,
    /// Still pending at the end (for users never connected; must be 0 otherwise).
    pub pending: usize,
    /// Pairs with no `delivered` receipt at the end, or delivered to a client that never got it.
    pub lost: usize,
    /// Notifications received more than once, summed over users.
    pub duplicates: usize,
    /// Notifications received past their expiry.
    pub late: usize,
    /// Notifications a user got that were not addressed to them.
    pub misrouted: usize,
    pub reconnects: u32,
    pub recovery: Duration,
    /// Examples of what went wrong, for the failure message.
    pub examples: Vec<String>,
}

impl Tally {
    /// Holds what was published against the store and the fleet's logs. `offline` users are
    /// expected to still have their messages pending (they never connected).
    pub async fn take(
        fault: &str,
        db: &mongodb::Database,
        jobs: &[Published],
        fleet: &Fleet,
        offline: &BTreeSet<String>,
        recovery: Duration,
    ) -> anyhow::Result<Self> {
        let states = receipt_states(db).await?;
        let logs = fleet.logs();
        let mut tally = Tally {
            fault: fault.to_owned(),
            jobs: jobs.len(),
            reconnects: fleet.reconnects(),
            recovery,
            ..Tally::default()
        };
        let mut expected: HashMap<String, BTreeSet<&str>> = HashMap::new();
        for job in jobs {
            for user in &job.to {
                tally.receipts += 1;
                expected.entry(user.clone()).or_default().insert(job.id.as_str());
                let state = states.get(&(job.id.clone(), user.clone())).map(String::as_str);
                let received = logs.get(user).is_some_and(|l| l.received.contains_key(&job.id));
                match state {
                    Some("delivered" | "read") if received => tally.delivered += 1,
                    Some("pending") if offline.contains(user) && !received => tally.pending += 1,
                    other => {
                        tally.lost += 1;
                        if tally.examples.len() < 10 {
                            tally.examples.push(format!(
                                "{}/{user}: receipt {}, received by the client: {received}",
                                job.id,
                                other.unwrap_or("missing")
                            ));
                        }
                    }
                }
            }
        }
        for (user, log) in &logs {
            tally.duplicates += log.received.values().map(|n| (*n as usize).saturating_sub(1)).sum::<usize>();
            tally.late += log.late.len();
            let mine = expected.get(user);
            let strays = log.received.keys().filter(|id| !mine.is_some_and(|m| m.contains(id.as_str()))).count();
            tally.misrouted += strays;
        }
        Ok(tally)
    }

    /// Fails with the figures and examples unless nothing was lost, late or misrouted.
    pub fn assert_nothing_lost(&self) {
        assert!(self.lost == 0 && self.late == 0 && self.misrouted == 0, "{self}\nexamples: {:#?}", self.examples);
    }

    /// One row of the table in docs/RELIABILITY.md.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.fault,
            self.jobs,
            self.receipts,
            self.delivered,
            self.pending,
            self.lost,
            self.duplicates,
            self.reconnects,
            self.recovery.as_secs_f64()
        )
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] jobs {} receipts {} delivered {} pending {} lost {} duplicates {} late {} misrouted {} \
             reconnects {} recovery {:.1}s",
            self.fault,
            self.jobs,
            self.receipts,
            self.delivered,
            self.pending,
            self.lost,
            self.duplicates,
            self.late,
            self.misrouted,
            self.reconnects,
            self.recovery.as_secs_f64()
        )
    }
}
