//! Many clients and a steady publisher, for fault tests: a [`Fleet`] of users that each hold one
//! connection, ack everything they receive and reconnect as proto/README.md tells clients to
//! (jittered exponential backoff; within a second, at random, after 1012), counting duplicates, reconnects, close
//! codes and anything received past its expiry; a [`Publisher`] that streams jobs at a set rate
//! and retries each until JetStream has it; and a [`Tally`] that holds both against the receipts
//! in the store and says what was lost.
//!
//! Owns the client tasks and the publisher task (both end on drop). What to break, and when, is
//! left to the tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
/// How far from a message's expiry the checker looks for a moment its user had no connection,
/// to allow an `expired` receipt: the expiry sweep's interval and a heartbeat, either side.
/// (Clock steps need none: expiry is judged on Redis's clock, see herald_shared::clock.)
const EXPIRY_SLACK: Duration = Duration::from_secs(10);
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
    /// Message ids this client sent an ack for (the frame was written).
    pub acked: HashSet<String>,
    /// Message id → the payload first received with it (raw JSON).
    pub payloads: HashMap<String, String>,
    /// Message ids that came again with another payload than the first time.
    pub changed: Vec<String>,
    /// When each connection had its `hello`, and when it ended (None: still open).
    pub connected: Vec<(Instant, Option<Instant>)>,
    /// When each message first arrived, in order: what a replay had reached by a given moment.
    pub arrivals: Vec<Instant>,
}

impl UserLog {
    /// Whether no connection of this user was open at some moment within `from..=to`.
    pub fn disconnected_within(&self, from: Instant, to: Instant) -> bool {
        let mut spans: Vec<(Instant, Option<Instant>)> =
            self.connected.iter().copied().filter(|(s, e)| *s <= to && e.is_none_or(|e| e >= from)).collect();
        spans.sort_by_key(|(s, _)| *s);
        // Covered from `from` to `to` without a gap?
        let mut covered_to = from;
        for (start, end) in spans {
            if start > covered_to {
                return true;
            }
            match end {
                None => return false,
                Some(end) => covered_to = covered_to.max(end),
            }
        }
        covered_to < to
    }
}

struct Shared {
    /// Where clients connect, tried in turn like a load balancer would.
    gateways: RwLock<Vec<SocketAddr>>,
    logs: Mutex<BTreeMap<String, UserLog>>,
    /// Notifications received, all users: for "is it still flowing" checks.
    notifications: AtomicUsize,
    /// Users whose client neither reads nor writes until then: a stalled network.
    stalls: Mutex<HashMap<String, Instant>>,
}

/// A set of users, one client each. Add users with [`Fleet::connect`]; every client runs until
/// the fleet is dropped or [`Fleet::disconnect`] removes it.
pub struct Fleet {
    shared: Arc<Shared>,
    /// Per user: the tokens that stop its clients' tasks (one per device).
    stops: Mutex<HashMap<String, Vec<CancellationToken>>>,
    /// Clients started, for spreading them over the gateways.
    started: AtomicUsize,
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
                stalls: Mutex::default(),
            }),
            stops: Mutex::default(),
            started: AtomicUsize::new(0),
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
        self.connect_as(users, Behaviour::default(), within).await
    }

    /// As [`Fleet::connect`], with clients that behave as `behaviour` says. Connecting a user
    /// again adds a device: another client of the same user (on the next gateway), sharing its
    /// log.
    pub async fn connect_as(&self, users: &[String], behaviour: Behaviour, within: Duration) -> anyhow::Result<()> {
        for user in users {
            let stop = CancellationToken::new();
            self.stops.lock().unwrap().entry(user.clone()).or_default().push(stop.clone());
            self.shared.logs.lock().unwrap().entry(user.clone()).or_default();
            let next = self.started.fetch_add(1, Ordering::SeqCst);
            let client = UserClient { user: user.clone(), shared: Arc::clone(&self.shared), next, stop, behaviour };
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
            for stop in stops.get(user).into_iter().flatten() {
                stop.cancel();
            }
        }
    }

    /// Stalls these users' networks for `lasting`: their clients neither read nor write (nor
    /// answer pings), and their connections stay open, until it passes.
    pub fn stall(&self, users: &[String], lasting: Duration) {
        let until = Instant::now() + lasting;
        let mut stalls = self.shared.stalls.lock().unwrap();
        for user in users {
            stalls.insert(user.clone(), until);
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

/// How a client departs from the plain one (which reads at once and stays connected).
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Time taken over each notification: a slow reader, whose queue and socket fill up.
    pub read_delay: Option<Duration>,
    /// Closes its connection itself after a random time up to this, then reconnects: flapping.
    pub flap_within: Option<Duration>,
}

/// One user's client: connect, read, ack, reconnect, until stopped.
struct UserClient {
    user: String,
    shared: Arc<Shared>,
    /// Index of the next gateway to try.
    next: usize,
    stop: CancellationToken,
    behaviour: Behaviour,
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
                        // Draining gateway: reconnect to another one within a second, at random
                        // (proto/README.md, "Reconnecting").
                        Ended::Closed(1012) => Duration::from_secs(1).mul_f64(rand::rng().random_range(0.0..1.0)),
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
            l.connected.push((Instant::now(), None));
        });
        let mut acks: Vec<String> = Vec::new();
        // A flapping client hangs up by itself at a random moment.
        let hang_up = self
            .behaviour
            .flap_within
            .map_or(Duration::from_secs(86_400), |within| within.mul_f64(rand::rng().random_range(0.2..1.0)));
        let hang_up_at = Instant::now() + hang_up;
        // A stalled network: the socket is not read either, so pings go unanswered and the
        // gateway's writes back up, as they would behind a dead link.
        let mut paused = false;
        let ended = loop {
            let stalled = self.shared.stalls.lock().unwrap().get(&self.user).copied();
            if stalled.is_some_and(|until| until > Instant::now()) {
                if !paused {
                    client.pause_reading();
                    paused = true;
                }
                // Looks again every 100 ms: the stall may be lifted before its time.
                tokio::select! {
                    _ = self.stop.cancelled() => break Ended::Stopped,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
            if paused {
                client.resume_reading();
                paused = false;
            }
            // Not while stalled: a stalled network sends nothing, a close included.
            if Instant::now() >= hang_up_at {
                let _ = self.flush(&mut client, &mut acks).await;
                let _ = client.close().await;
                break Ended::Closed(1000);
            }
            // Take what is there without waiting, then ack it in one frame; wait only when idle.
            let wait =
                if acks.is_empty() { hang_up_at.saturating_duration_since(Instant::now()) } else { Duration::ZERO };
            let frame = tokio::select! {
                _ = self.stop.cancelled() => break Ended::Stopped,
                frame = client.next_frame(wait) => frame,
            };
            match frame {
                Frame::Server(ServerFrame::Notification(n)) => {
                    let late_ms = herald_shared::now_ms().saturating_sub(n.expires_at_ms);
                    self.shared.notifications.fetch_add(1, Ordering::SeqCst);
                    self.log(|l| {
                        *l.received.entry(n.id.to_string()).or_default() += 1;
                        if late_ms > 0 {
                            l.late.push(format!("{} ({late_ms} ms after its expiry)", n.id));
                        }
                        let payload = n.payload.get();
                        match l.payloads.get(n.id.as_str()) {
                            Some(first) if first != payload => l.changed.push(n.id.to_string()),
                            Some(_) => {}
                            None => {
                                l.payloads.insert(n.id.to_string(), payload.to_owned());
                                l.arrivals.push(Instant::now());
                            }
                        }
                    });
                    if let Some(delay) = self.behaviour.read_delay {
                        tokio::time::sleep(delay).await;
                    }
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
        self.log(|l| {
            if let Some((_, end)) = l.connected.last_mut() {
                *end = Some(Instant::now());
            }
            if let Ended::Closed(code) = ended {
                l.closes.push(code);
                l.gateway_id = None;
            }
        });
        ended
    }

    /// Sends the batched acks; false if the connection is gone (they are re-earned on the next
    /// connection: unacked messages come again).
    async fn flush(&self, client: &mut TestClient, acks: &mut Vec<String>) -> bool {
        if acks.is_empty() {
            return true;
        }
        let ids = std::mem::take(acks);
        let written = ids.clone();
        let ok = client.ack(ids).await.is_ok();
        if ok {
            self.log(|l| l.acked.extend(written));
        }
        ok
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
    /// The message id: the job's own, or (for a job published without one) the id the store
    /// holds for its `key`, once [`assigned_ids`] has looked it up; until then, empty.
    pub id: String,
    /// Unique per job, in its payload and its `Nats-Msg-Id`.
    pub key: String,
    pub to: Vec<String>,
    /// Exactly what was published as the job's payload (null: not recorded, not checked).
    pub payload: serde_json::Value,
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
    /// Whether jobs carry an `id`; without one the dispatcher assigns it, and the publisher's
    /// retries are deduplicated by `Nats-Msg-Id` alone.
    pub with_ids: bool,
}

impl Publisher {
    pub async fn start(nats_url: &str, subject: String, stream: Stream) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("publisher {}", stream.run))
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|_| Duration::from_millis(100))
            .connect(herald_shared::connect::nats_seeds(nats_url)?)
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
        let key = format!("{}-{n:05}", stream.run);
        let payload = json!({ "n": n, "run": stream.run, "key": key });
        let mut job = json!({ "to": to, "payload": payload });
        let id = if stream.with_ids {
            job["id"] = json!(key);
            key.clone()
        } else {
            String::new()
        };
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
                headers.insert("Nats-Msg-Id", key.as_str());
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
            log.lock().unwrap().push(Published { id, key, to, payload, at: Instant::now() });
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

/// Fills in the ids the dispatchers assigned to jobs published without one, from the messages
/// the store holds (by the `key` in their payloads). A job the store does not hold keeps an
/// empty id, and [`Tally::take`] counts its receipts lost.
pub async fn assigned_ids(db: &mongodb::Database, jobs: &mut [Published]) -> anyhow::Result<()> {
    if jobs.iter().all(|j| !j.id.is_empty()) {
        return Ok(());
    }
    let messages = messages(db).await?;
    let by_key: HashMap<String, String> =
        messages.into_iter().filter_map(|(id, m)| Some((m.payload.get("key")?.as_str()?.to_owned(), id))).collect();
    for job in jobs.iter_mut().filter(|j| j.id.is_empty()) {
        if let Some(id) = by_key.get(&job.key) {
            job.id = id.clone();
        }
    }
    Ok(())
}

/// What the store says of a message.
pub struct StoredMessage {
    pub payload: serde_json::Value,
    /// Its expiry, as a moment on this process's monotonic clock.
    pub expires: Instant,
}

/// Every message in the store, by id: those with a document of their own (several recipients)
/// and those their only receipt carries.
pub async fn messages(db: &mongodb::Database) -> anyhow::Result<HashMap<String, StoredMessage>> {
    let docs: Vec<herald_dispatcher::store::MessageDoc> =
        db.collection(collections::MESSAGES).find(doc! {}).await?.try_collect().await?;
    let inline: Vec<ReceiptDoc> =
        db.collection(collections::RECEIPTS).find(doc! { "inline": { "$exists": true } }).await?.try_collect().await?;
    let (now, now_ms) = (Instant::now(), herald_shared::now_ms() as i64);
    let inline = inline.into_iter().filter_map(|r| {
        let message = r.inline?;
        Some((r.message_id, message.payload, r.expires_at))
    });
    Ok(docs
        .into_iter()
        .map(|m| (m.id, m.payload, m.expires_at))
        .chain(inline)
        .map(|(id, payload, expires_at)| {
            let ahead_ms = expires_at.timestamp_millis().saturating_sub(now_ms);
            let expires = if ahead_ms >= 0 {
                now + Duration::from_millis(ahead_ms as u64)
            } else {
                now.checked_sub(Duration::from_millis(ahead_ms.unsigned_abs())).unwrap_or(now)
            };
            let payload = serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null);
            (id.into_string(), StoredMessage { payload, expires })
        })
        .collect())
}

/// As [`wait_delivered`], for jobs some of which were published without an id: their ids are
/// looked up first, as the store comes to hold them.
pub async fn wait_delivered_or_expired(
    db: &mongodb::Database,
    jobs: &mut [Published],
    offline: &BTreeSet<String>,
    since: Instant,
    within: Duration,
) -> anyhow::Result<Duration> {
    // Half the time to find the ids; what the store still lacks then is reported by key.
    let deadline = Instant::now() + within;
    let resolved_by = Instant::now() + within / 2;
    loop {
        assigned_ids(db, jobs).await?;
        if jobs.iter().all(|j| !j.id.is_empty()) || Instant::now() >= resolved_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_delivered(db, jobs, offline, since, deadline.saturating_duration_since(Instant::now())).await
}

/// Waits until every (message, recipient) of `jobs` whose recipient is not in `offline` has a
/// final receipt: `delivered`, `read` or `expired` (whether it may be expired is
/// [`Tally::take`]'s to judge); returns the time from `since` until then. Fails after `within`.
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
                    // Expired is final; whether it may be is the tally's to judge.
                    Some("delivered" | "read" | "expired") => {}
                    other => {
                        let id = if job.id.is_empty() { format!("(no id, key {})", job.key) } else { job.id.clone() };
                        waiting.push(format!("{id}/{user}: {}", other.unwrap_or("no receipt")))
                    }
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

/// When each (message, user) receipt was delivered, as a moment on this process's monotonic
/// clock (receipts stamp Herald's clock, which follows Redis's: this host's here).
pub async fn delivered_at(db: &mongodb::Database) -> anyhow::Result<HashMap<(String, String), Instant>> {
    let receipts: Vec<ReceiptDoc> = db
        .collection::<ReceiptDoc>(collections::RECEIPTS)
        .find(doc! { "delivered_at_ms": { "$exists": true } })
        .await?
        .try_collect()
        .await?;
    let (now, now_ms) = (Instant::now(), herald_shared::now_ms() as i64);
    Ok(receipts
        .into_iter()
        .filter_map(|r| {
            let ago = Duration::from_millis(now_ms.saturating_sub(r.delivered_at_ms?).max(0) as u64);
            Some(((r.message_id.into_string(), r.user.into_string()), now.checked_sub(ago)?))
        })
        .collect())
}

/// A fault's time to heal: from its heal until the last message JetStream had taken by then,
/// to a user not in `offline`, was delivered (zero if all were delivered before it).
pub fn time_to_heal(
    jobs: &[Published],
    delivered_at: &HashMap<(String, String), Instant>,
    offline: &BTreeSet<String>,
    healed: Instant,
) -> Duration {
    jobs.iter()
        .filter(|job| job.at <= healed)
        .flat_map(|job| job.to.iter().filter(|u| !offline.contains(*u)).map(move |u| (job.id.clone(), u.clone())))
        .filter_map(|pair| delivered_at.get(&pair))
        .map(|at| at.saturating_duration_since(healed))
        .max()
        .unwrap_or_default()
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
    /// Receipts `delivered` or `read` that no client of their user acked.
    pub unacked: usize,
    /// Receipts `expired` while a client of their user was connected all along their expiry.
    pub expired: usize,
    /// Expired receipts whose user had no connection around the expiry: allowed.
    pub expired_offline: usize,
    /// Notifications whose payload was not what was published.
    pub corrupt: usize,
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
        let stored = messages(db).await?;
        let slack = EXPIRY_SLACK;
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
                let log = logs.get(user);
                let received = log.is_some_and(|l| l.received.contains_key(&job.id));
                let acked = log.is_some_and(|l| l.acked.contains(&job.id));
                let published = Some(&job.payload).filter(|p| !p.is_null());
                if let (Some(got), Some(_)) = (log.and_then(|l| l.payloads.get(&job.id)), published) {
                    let same = serde_json::from_str::<serde_json::Value>(got).is_ok_and(|got| got == job.payload);
                    if !same {
                        tally.corrupt += 1;
                        tally.example(format!("{}/{user}: payload {got}, published {}", job.id, job.payload));
                    }
                }
                match state {
                    Some("delivered" | "read") if received && acked => tally.delivered += 1,
                    Some("delivered" | "read") if received => {
                        tally.unacked += 1;
                        tally.example(format!(
                            "{}/{user}: {} but its client never acked it",
                            job.id,
                            state.unwrap_or("")
                        ));
                    }
                    Some("pending") if offline.contains(user) && !received => tally.pending += 1,
                    // Allowed only where the TTL passed while no client of the user was connected:
                    // judged around the expiry, `slack` either side (clock steps, sweep interval).
                    Some("expired") if !received => {
                        let expires = stored.get(&job.id).map(|m| m.expires);
                        let offline_then = expires.is_some_and(|at| {
                            log.is_none_or(|l| l.disconnected_within(at.checked_sub(slack).unwrap_or(at), at + slack))
                        });
                        if offline_then {
                            tally.expired_offline += 1;
                        } else {
                            tally.expired += 1;
                            let now = Instant::now();
                            let ago = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
                            let spans: Vec<String> = log
                                .map(|l| {
                                    l.connected
                                        .iter()
                                        .map(|(s, e)| format!("{:.1}..{:?}", ago(*s), e.map(ago)))
                                        .collect()
                                })
                                .unwrap_or_default();
                            // How far the user's client had got by then: its arrivals since its
                            // last connection opened, as (count, seconds after the open) at the
                            // first, every hundredth and the last.
                            let progress: Vec<String> = match log.and_then(|l| l.connected.last().map(|c| (l, c.0))) {
                                Some((l, opened)) => {
                                    let since: Vec<f64> = l
                                        .arrivals
                                        .iter()
                                        .filter(|t| **t >= opened)
                                        .map(|t| t.saturating_duration_since(opened).as_secs_f64())
                                        .collect();
                                    since
                                        .iter()
                                        .enumerate()
                                        .filter(|(i, _)| i % 100 == 0 || *i + 1 == since.len())
                                        .map(|(i, s)| format!("#{}@{s:.2}s", i + 1))
                                        .collect()
                                }
                                None => Vec::new(),
                            };
                            tally.example(format!(
                                "{}/{user}: expired {:?} s ago while its user was connected (connections, s ago: {spans:?}; {} messages stored; arrivals since the last connect: {progress:?})",
                                job.id,
                                expires.map(ago),
                                stored.len()
                            ));
                        }
                    }
                    other => {
                        tally.lost += 1;
                        let id = if job.id.is_empty() { format!("(no id, key {})", job.key) } else { job.id.clone() };
                        tally.example(format!(
                            "{id}/{user}: receipt {}, received by the client: {received}",
                            other.unwrap_or("missing")
                        ));
                    }
                }
            }
        }
        for (user, log) in &logs {
            tally.duplicates += log.received.values().map(|n| (*n as usize).saturating_sub(1)).sum::<usize>();
            tally.late += log.late.len();
            for late in &log.late {
                tally.example(format!("{user} received {late}"));
            }
            tally.corrupt += log.changed.len();
            let mine = expected.get(user);
            let strays = log.received.keys().filter(|id| !mine.is_some_and(|m| m.contains(id.as_str()))).count();
            tally.misrouted += strays;
        }
        Ok(tally)
    }

    /// Every broken promise: lost, late, misrouted, delivered without an ack, expired under a
    /// connected user, or changed on the way.
    pub fn violations(&self) -> usize {
        self.lost + self.late + self.misrouted + self.unacked + self.expired + self.corrupt
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }

    /// Fails with the figures and examples unless no promise was broken.
    pub fn assert_nothing_lost(&self) {
        assert!(self.violations() == 0, "{self}\nexamples: {:#?}", self.examples);
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
            "[{}] jobs {} receipts {} delivered {} pending {} expired (offline) {} lost {} duplicates {} late {} \
             misrouted {} delivered-unacked {} expired-online {} corrupt {} reconnects {} recovery {:.1}s",
            self.fault,
            self.jobs,
            self.receipts,
            self.delivered,
            self.pending,
            self.expired_offline,
            self.lost,
            self.duplicates,
            self.late,
            self.misrouted,
            self.unacked,
            self.expired,
            self.corrupt,
            self.reconnects,
            self.recovery.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_between_connections_or_at_either_end_counts_as_disconnected() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let log = |spans: &[(u64, Option<u64>)]| UserLog {
            connected: spans.iter().map(|(s, e)| (at(*s), e.map(at))).collect(),
            ..UserLog::default()
        };
        // Covered all along, by one span or by two that overlap.
        assert!(!log(&[(0, None)]).disconnected_within(at(5), at(10)));
        assert!(!log(&[(0, Some(7)), (6, None)]).disconnected_within(at(5), at(10)));
        // A gap inside, before the first span, after the last, or no span at all.
        assert!(log(&[(0, Some(6)), (8, None)]).disconnected_within(at(5), at(10)));
        assert!(log(&[(7, None)]).disconnected_within(at(5), at(10)));
        assert!(log(&[(0, Some(9))]).disconnected_within(at(5), at(10)));
        assert!(log(&[]).disconnected_within(at(5), at(10)));
    }
}
