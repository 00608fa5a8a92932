//! One generator process: a set of connection slots, each one user holding one connection that it
//! re-opens like a real client (jittered exponential backoff; after a random delay of up to 1 s
//! after 1012), answering pings, acking what it receives in batches, and remembering every
//! message it has seen across reconnects so duplicates are counted and losses can be found.
//!
//! Single-threaded on purpose: the generator shares two cores with the system it measures, and one
//! thread per process needs no locks. Controlled by lines on stdin (`active N`, `route W...`,
//! `away FIRST COUNT MS`, `report`, `reset`, `quit`), it answers `report` with one JSON line on
//! stdout. The orchestrator owns the process.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::metrics;
use super::protocol::{self, Flavor, Inbound};
use super::report::{self, WorkerReport};

/// How long a connection may take from TCP connect to its ready frame.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Acks wait this long to be batched (as the protocol's example client does).
const ACK_DELAY: Duration = Duration::from_millis(100);
/// Ids per ack frame: 100 ids stay within the default max_frame_bytes.
const IDS_PER_ACK: usize = 100;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// After a 1012 (the gateway is draining), a client reconnects after a random delay of up to
/// this, without backoff (proto/README.md, "Reconnecting").
const RESTART_DELAY_MAX: Duration = Duration::from_secs(1);

/// What a worker is asked to do; passed as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    pub(crate) worker: usize,
    pub(crate) flavor: Flavor,
    /// A slot connects to `urls[0]` first and to the next URL on each new attempt, as a load
    /// balancer would send it elsewhere when its server is gone; once the orchestrator has sent
    /// `route` weights, each new attempt picks a URL at random by them instead.
    pub(crate) urls: Vec<String>,
    /// Users are `<user_prefix><first_user + slot>`.
    pub(crate) user_prefix: String,
    pub(crate) first_user: usize,
    pub(crate) slots: usize,
    /// Local addresses to connect from, round robin over slots (each gives ~28k ports).
    pub(crate) source_ips: Vec<Ipv4Addr>,
    /// HS256 secret to mint tokens with (Herald); None sends no token (peer, bare server).
    pub(crate) jwt_secret: Option<String>,
    pub(crate) ack: bool,
    /// Connections being set up at once.
    pub(crate) connect_concurrency: usize,
    /// Herald only: subscribe every connection to this topic (the token allows it) once it is up.
    #[serde(default)]
    pub(crate) topic: Option<String>,
}

type Ws = WebSocketStream<TcpStream>;

#[derive(Default)]
struct Stats {
    connected: u64,
    connects: u64,
    connect_failures: u64,
    refused: BTreeMap<u16, u64>,
    closes: BTreeMap<u16, u64>,
    received: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    acked_ids: u64,
    other_frames: u64,
    /// Connections the worker closed itself, told to by `away`.
    aways: u64,
    first_rx_us: u64,
    last_rx_us: u64,
    last_connect_us: u64,
    publish_to_rx: Option<Histogram<u64>>,
    send_to_rx: Option<Histogram<u64>>,
}

impl Stats {
    fn new() -> Self {
        Self { publish_to_rx: Some(report::histogram()), send_to_rx: Some(report::histogram()), ..Self::default() }
    }

    fn reset_window(&mut self) {
        self.first_rx_us = 0;
        self.last_rx_us = 0;
        self.last_connect_us = 0;
        for h in [self.publish_to_rx.as_mut(), self.send_to_rx.as_mut()].into_iter().flatten() {
            h.reset();
        }
    }

    fn report(&self, worker: usize) -> WorkerReport {
        WorkerReport {
            worker,
            connected: self.connected,
            connects: self.connects,
            connect_failures: self.connect_failures,
            refused: self.refused.clone(),
            closes: self.closes.clone(),
            received: self.received,
            unique: self.unique,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            acked_ids: self.acked_ids,
            other_frames: self.other_frames,
            aways: self.aways,
            first_rx_us: self.first_rx_us,
            last_rx_us: self.last_rx_us,
            last_connect_us: self.last_connect_us,
            publish_to_rx: self.publish_to_rx.as_ref().map(report::to_pairs).unwrap_or_default(),
            send_to_rx: self.send_to_rx.as_ref().map(report::to_pairs).unwrap_or_default(),
            rss_kib: metrics::rss_kib(std::process::id()).unwrap_or(0),
            cpu_secs: metrics::cpu_secs(std::process::id()).unwrap_or(0.0),
        }
    }
}

/// Runs a worker until `quit` or the end of stdin.
pub(crate) fn main(spec: WorkerSpec) -> anyhow::Result<()> {
    anyhow::ensure!(!spec.urls.is_empty() && !spec.source_ips.is_empty(), "worker needs urls and source_ips");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, control(spec))
}

/// What every slot of a worker shares.
struct Shared {
    spec: WorkerSpec,
    stats: RefCell<Stats>,
    /// Connection set-ups at once.
    permits: Semaphore,
    /// Weights over `spec.urls` for new attempts, set by `route`; empty: go round the URLs.
    route: RefCell<Vec<f64>>,
    /// Per slot: stay disconnected until then (set by `away`, cleared by the slot when it has
    /// waited it out).
    away_until: Vec<Cell<Option<Instant>>>,
    /// Wakes every serving slot after an `away`, so that those it names close at once.
    away_kick: Notify,
}

impl Shared {
    fn away_until(&self, index: usize) -> Option<Instant> {
        self.away_until.get(index).and_then(Cell::get)
    }
}

async fn control(spec: WorkerSpec) -> anyhow::Result<()> {
    let permits = Semaphore::new(spec.connect_concurrency.max(1));
    let away_until = (0..spec.slots).map(|_| Cell::new(None)).collect();
    let shared = Rc::new(Shared {
        spec,
        stats: RefCell::new(Stats::new()),
        permits,
        route: RefCell::default(),
        away_until,
        away_kick: Notify::new(),
    });
    let (spec, stats) = (&shared.spec, &shared.stats);
    // Owns every slot task; they end when this worker exits.
    let mut slots = JoinSet::new();
    let mut active = 0usize;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("active"), Some(n)) => {
                let target = n.parse::<usize>()?.min(spec.slots);
                for index in active..target {
                    slots.spawn_local(slot(Rc::clone(&shared), index));
                }
                active = active.max(target);
            }
            (Some("route"), first) => {
                let weights = first.into_iter().chain(words).map(str::parse).collect::<Result<Vec<f64>, _>>()?;
                anyhow::ensure!(
                    weights.is_empty() || weights.len() == spec.urls.len(),
                    "route: {} weights for {} urls",
                    weights.len(),
                    spec.urls.len()
                );
                *shared.route.borrow_mut() = weights;
            }
            (Some("away"), Some(first)) => {
                let (first, count, ms) = away_args(first, words.next(), words.next())?;
                let until = Instant::now() + Duration::from_millis(ms);
                for cell in shared.away_until.iter().skip(first).take(count) {
                    cell.set(Some(until));
                }
                shared.away_kick.notify_waiters();
            }
            (Some("report"), _) => {
                let report = stats.borrow().report(spec.worker);
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
                out.flush()?;
            }
            (Some("reset"), _) => stats.borrow_mut().reset_window(),
            (Some("quit"), _) => break,
            _ => eprintln!("worker {}: unknown command {line:?}", spec.worker),
        }
    }
    slots.abort_all();
    Ok(())
}

/// `away FIRST COUNT MS`: slots `FIRST..FIRST + COUNT` close their connections and stay away
/// for `MS` milliseconds, then connect again (a client going offline and coming back).
fn away_args(first: &str, count: Option<&str>, ms: Option<&str>) -> anyhow::Result<(usize, usize, u64)> {
    let (Some(count), Some(ms)) = (count, ms) else { anyhow::bail!("away needs FIRST COUNT MS") };
    Ok((first.parse()?, count.parse()?, ms.parse()?))
}

/// Why a connection attempt did not reach its ready frame.
enum Failure {
    Refused(u16),
    Other,
}

/// One user: connects, serves the connection, reconnects, for as long as the worker runs.
async fn slot(shared: Rc<Shared>, index: usize) {
    let (spec, stats) = (&shared.spec, &shared.stats);
    let user = format!("{}{}", spec.user_prefix, spec.first_user + index);
    let source = spec.source_ips[index % spec.source_ips.len()];
    let mut seen = HashSet::new();
    let mut backoff = BACKOFF_START;
    let mut attempt = 0usize;
    loop {
        if let Some(until) = shared.away_until(index) {
            tokio::time::sleep_until(until).await;
            shared.away_until[index].set(None);
            backoff = BACKOFF_START;
        }
        let routed = weighted_pick(&shared.route.borrow(), rand::random::<f64>());
        let url = &spec.urls[routed.unwrap_or(attempt % spec.urls.len())];
        attempt += 1;
        let opened = {
            let Ok(_permit) = shared.permits.acquire().await else { return };
            open(spec, url, &user, source).await
        };
        let ws = match opened {
            Ok(ws) => ws,
            Err(failure) => {
                match failure {
                    Failure::Refused(status) => *stats.borrow_mut().refused.entry(status).or_default() += 1,
                    Failure::Other => stats.borrow_mut().connect_failures += 1,
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        {
            let mut st = stats.borrow_mut();
            st.connected += 1;
            st.connects += 1;
            st.last_connect_us = protocol::now_us();
        }
        backoff = BACKOFF_START;
        let ended = serve(&shared, index, ws, &mut seen).await;
        let closed = {
            let mut st = stats.borrow_mut();
            st.connected -= 1;
            match ended {
                Ended::Away => {
                    st.aways += 1;
                    None
                }
                Ended::Closed(code) => {
                    *st.closes.entry(code).or_default() += 1;
                    Some(code)
                }
            }
        };
        // Told to go away: the loop's top waits it out.
        let Some(code) = closed else { continue };
        if code == 1012 {
            tokio::time::sleep(RESTART_DELAY_MAX.mul_f64(rand::random::<f64>())).await;
        } else {
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// The index `r` (uniform in 0..1) falls on when each index takes its weight's share of 0..1;
/// None when no weight is positive (the caller then goes round the URLs).
fn weighted_pick(weights: &[f64], r: f64) -> Option<usize> {
    let total: f64 = weights.iter().filter(|w| **w > 0.0).sum();
    if total <= 0.0 {
        return None;
    }
    let mut point = r * total;
    let mut last = None;
    for (i, w) in weights.iter().enumerate().filter(|(_, w)| **w > 0.0) {
        if point < *w {
            return Some(i);
        }
        point -= w;
        last = Some(i);
    }
    // Rounding at the top end.
    last
}

/// Half to one and a half times `step`, as the protocol document asks of clients.
fn jitter(step: Duration) -> Duration {
    step.mul_f64(0.5 + rand::random::<f64>())
}

/// TCP from `source`, the WebSocket upgrade, then the frames up to the ready one.
async fn open(spec: &WorkerSpec, url: &str, user: &str, source: Ipv4Addr) -> Result<Ws, Failure> {
    // Herald's frames without a token: the bare server, which knows a connection's user only
    // by the `user` its URL names (for the cost scenario's unicast).
    let url = match (&spec.jwt_secret, spec.flavor) {
        (None, Flavor::Herald) => format!("{url}?user={user}"),
        _ => url.to_owned(),
    };
    let mut request = url.into_client_request().map_err(|_| Failure::Other)?;
    if let Some(secret) = &spec.jwt_secret {
        let mut claims = herald_tests::tokens::Claims::new(user, Duration::from_secs(6 * 3600));
        if let Some(topic) = &spec.topic {
            claims = claims.topics(&[topic.as_str()]);
        }
        let token = claims.sign(secret);
        let value = format!("Bearer {token}").parse().map_err(|_| Failure::Other)?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
    let port = request.uri().port_u16().unwrap_or(80);
    let addr: SocketAddr = format!("{host}:{port}").parse().map_err(|_| Failure::Other)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let connect = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        socket.connect(addr).await
    };
    let stream = match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(stream)) => stream,
        _ => return Err(Failure::Other),
    };
    let _ = stream.set_nodelay(true);
    // Small buffers: a client holds one connection, the generator holds thousands.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
    let mut ws = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tungstenite::Error::Http(response))) => return Err(Failure::Refused(response.status().as_u16())),
        _ => return Err(Failure::Other),
    };
    if spec.flavor.ready_on_upgrade() {
        return Ok(ws);
    }
    loop {
        let message = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(message))) => message,
            _ => return Err(Failure::Other),
        };
        let Message::Text(text) = message else { continue };
        match protocol::classify(spec.flavor, text.as_str()) {
            Inbound::Ready => {
                // Its `subscribed` answer comes as an `Other` frame, counted and let be.
                if let Some(topic) = &spec.topic {
                    let subscribe = serde_json::json!({ "type": "subscribe", "topic": topic }).to_string();
                    ws.send(Message::text(subscribe)).await.map_err(|_| Failure::Other)?;
                }
                return Ok(ws);
            }
            Inbound::EioOpen => ws.send(Message::text(protocol::SIO_CONNECT)).await.map_err(|_| Failure::Other)?,
            Inbound::EioPing => ws.send(Message::text(protocol::EIO_PONG)).await.map_err(|_| Failure::Other)?,
            _ => {}
        }
    }
}

/// How a connection ended.
enum Ended {
    /// The server closed it with this code (1006 when there was no close frame).
    Closed(u16),
    /// The worker closed it, told to by `away`.
    Away,
}

/// Reads the connection until it ends, or until the slot is told to go away.
async fn serve(shared: &Shared, index: usize, ws: Ws, seen: &mut HashSet<u64>) -> Ended {
    let (spec, stats) = (&shared.spec, &shared.stats);
    let (mut sink, mut stream) = ws.split();
    let mut acks: Vec<String> = Vec::new();
    // The highest `seq` of a new message on this connection: a replay must come in order.
    let mut highest_seq = 0;
    let ack_at = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(ack_at);
    // Enabled at once, so that an `away` sent while this slot awaits a write is not missed.
    let kicked = shared.away_kick.notified();
    tokio::pin!(kicked);
    kicked.as_mut().enable();
    loop {
        if shared.away_until(index).is_some() {
            // A client that goes offline on purpose sends what it owes first.
            let _ = send_acks(&mut sink, &mut acks, stats).await;
            let _ = sink.send(Message::Close(None)).await;
            return Ended::Away;
        }
        tokio::select! {
            () = kicked.as_mut() => {
                kicked.set(shared.away_kick.notified());
                kicked.as_mut().enable();
            }
            message = stream.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        return Ended::Closed(frame.map(|f| u16::from(f.code)).unwrap_or(1005))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Ended::Closed(1006),
                };
                let reply = match protocol::classify(spec.flavor, text.as_str()) {
                    Inbound::Message(m) => {
                        on_message(stats, seen, &m, &mut highest_seq);
                        if let (true, Some(id)) = (spec.ack, m.id) {
                            if acks.is_empty() {
                                ack_at.as_mut().reset(Instant::now() + ACK_DELAY);
                            }
                            acks.push(id.to_owned());
                        }
                        None
                    }
                    Inbound::EioPing => Some(protocol::EIO_PONG.to_owned()),
                    Inbound::EioOpen => Some(protocol::SIO_CONNECT.to_owned()),
                    Inbound::Ready => None,
                    Inbound::Other => {
                        stats.borrow_mut().other_frames += 1;
                        None
                    }
                };
                if let Some(reply) = reply {
                    if sink.send(Message::text(reply)).await.is_err() {
                        return Ended::Closed(1006);
                    }
                }
            }
            _ = &mut ack_at, if !acks.is_empty() => {
                if send_acks(&mut sink, &mut acks, stats).await.is_err() {
                    return Ended::Closed(1006);
                }
            }
        }
    }
}

/// Sends the batched acks, in frames of [`IDS_PER_ACK`] ids, and clears them.
async fn send_acks(
    sink: &mut futures::stream::SplitSink<Ws, Message>,
    acks: &mut Vec<String>,
    stats: &RefCell<Stats>,
) -> Result<(), tungstenite::Error> {
    for chunk in acks.chunks(IDS_PER_ACK) {
        sink.feed(Message::text(protocol::ack_frame(chunk))).await?;
    }
    sink.flush().await?;
    stats.borrow_mut().acked_ids += acks.len() as u64;
    acks.clear();
    Ok(())
}

fn on_message(stats: &RefCell<Stats>, seen: &mut HashSet<u64>, m: &protocol::Message<'_>, highest_seq: &mut u64) {
    let now = protocol::now_us();
    let mut st = stats.borrow_mut();
    st.received += 1;
    if st.first_rx_us == 0 {
        st.first_rx_us = now;
    }
    st.last_rx_us = now;
    if let (Some(published_ms), Some(h)) = (m.published_ms, st.publish_to_rx.as_mut()) {
        report::record(h, now.saturating_sub(published_ms * 1000));
    }
    if let (Some(sent_us), Some(h)) = (m.sent_us, st.send_to_rx.as_mut()) {
        report::record(h, now.saturating_sub(sent_us));
    }
    // Messages without an index (none the generator publishes) are all counted as new.
    if m.k.is_none_or(|k| seen.insert(k)) {
        st.unique += 1;
        if let Some(seq) = m.seq {
            if seq < *highest_seq {
                st.out_of_order += 1;
            }
            *highest_seq = (*highest_seq).max(seq);
        }
    } else {
        st.duplicates += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weighted_pick_gives_each_url_its_share() {
        let weights = [0.0, 0.25, 0.75];
        assert_eq!(weighted_pick(&weights, 0.0), Some(1));
        assert_eq!(weighted_pick(&weights, 0.2499), Some(1));
        assert_eq!(weighted_pick(&weights, 0.25), Some(2));
        assert_eq!(weighted_pick(&weights, 0.9999), Some(2));
        // Weights need not add up to 1: only their proportions count.
        assert_eq!(weighted_pick(&[3.0, 1.0], 0.74), Some(0));
        assert_eq!(weighted_pick(&[3.0, 1.0], 0.76), Some(1));
    }

    #[test]
    fn without_a_positive_weight_there_is_no_pick() {
        assert_eq!(weighted_pick(&[], 0.5), None);
        assert_eq!(weighted_pick(&[0.0, 0.0], 0.5), None);
        assert_eq!(weighted_pick(&[0.0, 2.0], 0.0), Some(1), "a zero weight is never picked");
        assert_eq!(weighted_pick(&[1.0, 0.0], 1.0), Some(0), "the top end falls on the last positive weight");
    }
}
