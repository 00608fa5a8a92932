//! One client connection from upgrade to close: the hello, outbound frames from the registry
//! queue, inbound acks, keep-alive, limits, the pace of its replay (when to ask for the next
//! page), and the close code that explains every ending.
//!
//! A session is one task that both reads and writes its socket, so an idle connection costs one
//! task, one bounded queue and the socket's small buffers. What the client acks goes to the ack
//! publisher; what it was sent but did not ack stays pending in the store, whatever the ending.

mod limiter;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{FutureExt, SinkExt, StreamExt};
use herald_proto::client::MAX_IDS_PER_FRAME;
use herald_proto::{
    close, AckKind, AckRecord, ClientFrame, ConnectionId, ErrorCode, GatewayId, Hello, MessageId, More, ServerFrame,
};
use herald_shared::metrics::seconds_since;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::acks::Outgoing;
use crate::auth::Identity;
use crate::metrics::GatewayMetrics;
use crate::presence::PresenceHandle;
use crate::registry::{Admission, Connection, Outbound, Registry, Sent};
use crate::replay::ReplayCursor;
use crate::sent::{Acked, Read, SentSet, SENT_REMEMBERED};
use limiter::RateLimiter;

/// Frames written to the socket before a flush, when many are queued.
const WRITE_BATCH: usize = 64;
/// A notification is written only with this much of its life left: one written at its expiry
/// would reach the client after it (the chaos run saw one arrive late that way).
const EXPIRY_GUARD_MS: u64 = 1_000;
/// `ServerFrame::Heartbeat` as sent: the same bytes every time.
const HEARTBEAT_FRAME: &str = r#"{"type":"heartbeat"}"#;
/// How long each step of a closing handshake (our frames out, the client's close in) may take
/// before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Frames of one write batch, for the metrics.
struct Written {
    /// When the batch was written: one clock read for all its frames.
    at_ms: u64,
    frames: usize,
    delivered: u64,
    replayed: u64,
    /// Queued notifications not written because they expired while queued.
    expired: u64,
    /// Queued notifications not written because this connection was sent them already.
    repeats: u64,
}

impl Written {
    fn now(clock: &herald_shared::Clock) -> Self {
        Self { at_ms: clock.now_ms(), frames: 0, delivered: 0, replayed: 0, expired: 0, repeats: 0 }
    }
}

/// What every session of this gateway shares.
pub(crate) struct SessionContext {
    pub(crate) gateway_id: GatewayId,
    pub(crate) registry: Arc<Registry>,
    pub(crate) presence: PresenceHandle,
    /// Acks and replay page requests, to the publisher task (see [`crate::acks`]).
    pub(crate) acks: mpsc::Sender<Outgoing>,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) outbound_queue: usize,
    pub(crate) max_frame_bytes: usize,
    pub(crate) frames_per_sec: u32,
    /// Sustained message ids per second a connection may ack or read, with a burst of twice as
    /// many: what one client can make the dispatchers write.
    pub(crate) ack_ids_per_sec: u32,
    pub(crate) metrics: Arc<GatewayMetrics>,
    /// Fleet time (herald_shared::clock): what a notification's expiry is judged by.
    pub(crate) clock: herald_shared::Clock,
}

/// Why a session ended: the close code sent (if any) and the error frame before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ending {
    pub(crate) code: u16,
    pub(crate) error: Option<ErrorCode>,
    pub(crate) reason: &'static str,
    /// The `reason` label of `herald_gateway_connections_closed_total`.
    pub(crate) label: &'static str,
}

impl Ending {
    const fn new(code: u16, error: Option<ErrorCode>, reason: &'static str, label: &'static str) -> Self {
        Self { code, error, reason, label }
    }
}

const BAD_FRAME: Ending = Ending::new(close::BAD_FRAME, Some(ErrorCode::BadFrame), "bad frame", "bad_frame");
const BINARY: Ending =
    Ending::new(close::UNSUPPORTED_DATA, Some(ErrorCode::UnsupportedData), "text frames only", "unsupported_data");
const TOO_BIG: Ending =
    Ending::new(close::MESSAGE_TOO_BIG, Some(ErrorCode::FrameTooLarge), "frame too large", "frame_too_large");
const RATE_LIMITED: Ending =
    Ending::new(close::RATE_LIMITED, Some(ErrorCode::RateLimited), "too many frames", "rate_limited");
const TOKEN_EXPIRED: Ending =
    Ending::new(close::TOKEN_EXPIRED, Some(ErrorCode::TokenExpired), "token expired", "token_expired");
const HEARTBEAT: Ending = Ending::new(close::HEARTBEAT_TIMEOUT, None, "no pong", "heartbeat_timeout");
const SHUTTING_DOWN: Ending =
    Ending::new(close::SERVICE_RESTART, Some(ErrorCode::ShuttingDown), "reconnect", "shutdown");
const SLOW: Ending = Ending::new(close::SLOW_CONSUMER, Some(ErrorCode::SlowConsumer), "slow consumer", "slow_consumer");
const KICKED: Ending = Ending::new(close::KICKED, Some(ErrorCode::Kicked), "closed by an operator", "kicked");

/// How a session closed from outside ends, by the code its closer gave.
fn kicked_ending(code: u16) -> Ending {
    match code {
        close::SLOW_CONSUMER => SLOW,
        close::KICKED => KICKED,
        _ => SHUTTING_DOWN,
    }
}

/// Runs one connection to its end. `admission` holds the connection's place until then.
pub(crate) async fn run(
    socket: WebSocket,
    identity: Identity,
    admission: Admission,
    frame_heartbeats: bool,
    ctx: Arc<SessionContext>,
    shutdown: CancellationToken,
) {
    let _admission = admission;
    let conn = Arc::new(Connection::new(new_connection_id(), identity.user.clone(), ctx.outbound_queue));
    // Local registration first (deliveries can find the socket), then Redis and the online
    // announcement: the order that makes replay race-free (see presence.rs).
    ctx.registry.insert(Arc::clone(&conn));
    ctx.metrics.connections_opened.inc();
    ctx.metrics.connections_open.inc();
    ctx.presence.register(Arc::clone(&conn)).await;
    tracing::debug!(user = %conn.user, connection = %conn.id, "session open");

    let session = Session {
        ctx: &ctx,
        conn: &conn,
        identity: &identity,
        sent: SentSet::default(),
        ack_ids: RateLimiter::new(ctx.ack_ids_per_sec),
        replay: ReplayCursor::new(Instant::now()),
        frame_heartbeats,
    };
    // However the session ends, a panic included, the connection leaves the registry and
    // presence below: a session that died must not hold its user's slot or attract routing.
    let (ending, label) = match AssertUnwindSafe(session.serve(socket, &shutdown)).catch_unwind().await {
        Ok(ending) => (ending, ending.map_or("client_gone", |e| e.label)),
        Err(_) => {
            tracing::error!(user = %conn.user, connection = %conn.id, "session panicked; closing it");
            (None, "panic")
        }
    };
    conn.outbox.close();

    ctx.registry.remove(&conn);
    ctx.metrics.connections_open.dec();
    ctx.metrics.connections_closed.with_label_values(&[label]).inc();
    if ending == Some(SLOW) {
        ctx.metrics.queue_overflows.inc();
    }
    ctx.presence.unregister(&conn).await;
    tracing::debug!(user = %conn.user, connection = %conn.id, ending = ?ending, "session closed");
}

/// A fresh connection id: a UUID v4 in its simple form (32 hex digits).
fn new_connection_id() -> ConnectionId {
    ConnectionId::new(uuid::Uuid::new_v4().simple().to_string())
        .unwrap_or_else(|_| unreachable!("32 hex digits are a valid connection id"))
}

struct Session<'a> {
    ctx: &'a SessionContext,
    conn: &'a Connection,
    identity: &'a Identity,
    /// What this connection was sent: only acks of these count (see [`crate::sent`]).
    sent: SentSet,
    /// Ids acked or read per second (see [`SessionContext::ack_ids_per_sec`]).
    ack_ids: RateLimiter,
    /// How far this connection's replay has got, and when to ask for its next page.
    replay: ReplayCursor,
    /// Send a `heartbeat` text frame with each ping (the client asked: `heartbeat=frame`).
    frame_heartbeats: bool,
}

impl Session<'_> {
    /// The session loop. Returns how it ended (None: the client went away).
    async fn serve(mut self, mut socket: WebSocket, shutdown: &CancellationToken) -> Option<Ending> {
        // Written straight to the socket, before the loop reads the queue: it precedes every
        // notification, and an idle connection never allocates its queue's buffer.
        let hello = ServerFrame::Hello(Hello {
            connection_id: self.conn.id.clone(),
            gateway_id: self.ctx.gateway_id.clone(),
            heartbeat_interval_ms: self.ctx.heartbeat_interval.as_millis() as u64,
            max_frame_bytes: self.ctx.max_frame_bytes,
        });
        let Ok(hello) = serde_json::to_string(&hello) else { return None };
        match tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Text(hello.into()))).await {
            Ok(Ok(())) => self.ctx.metrics.frames_out.inc(),
            _ => return None,
        }
        let conn = self.conn;
        let mut limiter = RateLimiter::new(self.ctx.frames_per_sec);
        let mut last_heard = Instant::now();
        let mut heartbeat = tokio::time::interval(self.ctx.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        let token_expiry = tokio::time::sleep_until(expiry_instant(self.identity.expires_at));
        tokio::pin!(token_expiry);

        // Two heartbeat intervals without a byte from the client: it is gone.
        let silence_limit = self.ctx.heartbeat_interval * 2;
        let ending = loop {
            tokio::select! {
                biased;
                _ = conn.kicked().cancelled() => {
                    break Some(kicked_ending(conn.kick_code()));
                }
                _ = shutdown.cancelled() => break Some(SHUTTING_DOWN),
                _ = &mut token_expiry => break Some(TOKEN_EXPIRED),
                first = conn.outbox.pop() => {
                    // Everything queued, up to a batch, goes out with one flush.
                    let write = async {
                        let mut next = Some(first);
                        let mut tally = Written::now(&self.ctx.clock);
                        while let Some(outbound) = next.take() {
                            let (frame, sent) = match outbound {
                                Outbound::Frame { frame, sent } => (frame, sent),
                                // The page has left the queue; the next may be asked for below.
                                Outbound::PageEnd(end) => {
                                    self.replay.page_end(end);
                                    next = conn.outbox.try_pop();
                                    continue;
                                }
                            };
                            match sent.as_deref() {
                                // Never past the expiry: what a client is sent, it got in time.
                                Some(s) if s.expires_at_ms <= tally.at_ms.saturating_add(EXPIRY_GUARD_MS) => {
                                    tally.expired += 1
                                }
                                // Sent here already (live and in the replay): once is enough.
                                Some(s) if self.sent.repeats(s) => tally.repeats += 1,
                                _ => {
                                    socket.feed(Message::Text(frame)).await?;
                                    self.written(sent, &mut tally);
                                }
                            }
                            if tally.frames < WRITE_BATCH {
                                next = conn.outbox.try_pop();
                            }
                        }
                        self.count(&tally);
                        socket.flush().await
                    };
                    // A client that stops reading blocks the write. Every deadline still holds
                    // meanwhile: a kick (its queue filled up), shutdown, the token's expiry, and
                    // the heartbeat: a peer that has read nothing for two intervals is gone, and
                    // must not keep its user's slot and presence until TCP gives up. The goodbye
                    // (error frame, close code) then follows what is already buffered, for a
                    // client that reads again within the closing handshake.
                    let blocked = {
                    tokio::pin!(write);
                    loop {
                        tokio::select! {
                            result = &mut write => break result.err().map(|_| None),
                            _ = conn.kicked().cancelled() => {
                                break Some(Some(kicked_ending(conn.kick_code())));
                            }
                            _ = shutdown.cancelled() => break Some(Some(SHUTTING_DOWN)),
                            _ = &mut token_expiry => break Some(Some(TOKEN_EXPIRED)),
                            _ = heartbeat.tick() => {
                                if last_heard.elapsed() > silence_limit {
                                    break Some(Some(HEARTBEAT));
                                }
                            }
                        }
                    }
                    };
                    if let Some(ending) = blocked {
                        break ending;
                    }
                    if let Err(ending) = self.ask_for_more().await {
                        break ending;
                    }
                }
                message = socket.next() => {
                    last_heard = Instant::now();
                    match message {
                        None => break None,
                        Some(Err(e)) => break read_error(e),
                        Some(Ok(message)) => {
                            if !limiter.allow(Instant::now()) {
                                break Some(RATE_LIMITED);
                            }
                            if let Err(ending) = self.on_message(message).await {
                                break ending;
                            }
                            // An ack may have made room for the next page.
                            if let Err(ending) = self.ask_for_more().await {
                                break ending;
                            }
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        break Some(HEARTBEAT);
                    }
                    conn.outbox.shrink_if_empty();
                    // A ping into a full send buffer waits too; it may wait one interval at most.
                    match tokio::time::timeout(self.ctx.heartbeat_interval, socket.send(Message::Ping(bytes::Bytes::new()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break None,
                        Err(_) => break Some(HEARTBEAT),
                    }
                    if self.frame_heartbeats {
                        let beat = Message::Text(HEARTBEAT_FRAME.into());
                        match tokio::time::timeout(self.ctx.heartbeat_interval, socket.send(beat)).await {
                            Ok(Ok(())) => self.ctx.metrics.frames_out.inc(),
                            Ok(Err(_)) => break None,
                            Err(_) => break Some(HEARTBEAT),
                        }
                    }
                    // A page asked for a heartbeat ago and not come was lost: ask again.
                    if let Some(after_seq) = self.replay.retry(Instant::now(), self.ctx.heartbeat_interval) {
                        self.ctx.metrics.replay_requests.with_label_values(&["retry"]).inc();
                        if let Err(ending) = self.request_page(after_seq).await {
                            break ending;
                        }
                    }
                }
            }
        };
        goodbye(&mut socket, ending).await;
        ending
    }

    /// Records a frame handed to the socket: the notification now awaits an ack. Counted in
    /// `tally`, which [`Self::count`] adds to the shared counters once per batch (per frame,
    /// they are contended atomics and label lookups on the hottest path of the gateway).
    fn written(&mut self, sent: Option<Arc<Sent>>, tally: &mut Written) {
        tally.frames += 1;
        let Some(sent) = sent else { return };
        if sent.replay {
            tally.replayed += 1;
        } else {
            tally.delivered += 1;
        }
        let age_ms = tally.at_ms.saturating_sub(sent.published_at_ms);
        self.ctx.metrics.publish_to_deliver.observe(age_ms as f64 / 1000.0);
        self.sent.record(sent);
    }

    fn count(&self, tally: &Written) {
        let metrics = &self.ctx.metrics;
        metrics.frames_out.inc_by(tally.frames as u64);
        metrics.notifications_expired.inc_by(tally.expired);
        metrics.notifications_repeated.inc_by(tally.repeats);
        for (path, n) in [("deliver", tally.delivered), ("replay", tally.replayed)] {
            if n > 0 {
                metrics.notifications_sent.with_label_values(&[path]).inc_by(n);
            }
        }
    }

    /// Handles one inbound message; `Err` ends the session (None: the client closed).
    async fn on_message(&mut self, message: Message) -> Result<(), Option<Ending>> {
        let metrics = &self.ctx.metrics;
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                metrics.frames_in.with_label_values(&["invalid"]).inc();
                return Err(Some(BINARY));
            }
            Message::Ping(_) | Message::Pong(_) => {
                metrics.frames_in.with_label_values(&["control"]).inc();
                return Ok(());
            }
            Message::Close(_) => return Err(None),
        };
        if text.len() > self.ctx.max_frame_bytes {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return Err(Some(TOO_BIG));
        }
        let Ok(frame) = ClientFrame::decode(text.as_str()) else {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return Err(Some(BAD_FRAME));
        };
        let (kind, ids) = frame.into_parts();
        if ids.len() > MAX_IDS_PER_FRAME {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return Err(Some(BAD_FRAME));
        }
        if !self.ack_ids.allow_n(Instant::now(), ids.len()) {
            return Err(Some(RATE_LIMITED));
        }
        let kind_label = match kind {
            AckKind::Delivered => "delivered",
            AckKind::Read => "read",
        };
        metrics.frames_in.with_label_values(&[if kind == AckKind::Read { "read" } else { "ack" }]).inc();
        metrics.acks_received.with_label_values(&[kind_label]).inc_by(ids.len() as u64);
        let Some(record) = self.record(kind, ids) else { return Ok(()) };
        self.tell_dispatchers(Outgoing::Ack(record)).await
    }

    /// Asks for the next page of this connection's replay when [`ReplayCursor`] says it is
    /// time: the last page has left the queue, and the unacked notifications leave room.
    async fn ask_for_more(&mut self) -> Result<(), Option<Ending>> {
        let Some(after_seq) = self.replay.next(self.sent.awaiting_ack(), SENT_REMEMBERED, Instant::now()) else {
            return Ok(());
        };
        self.ctx.metrics.replay_requests.with_label_values(&["next"]).inc();
        self.request_page(after_seq).await
    }

    async fn request_page(&self, after_seq: u64) -> Result<(), Option<Ending>> {
        let more = More {
            user: self.conn.user.clone(),
            connection_id: self.conn.id.clone(),
            gateway_id: self.ctx.gateway_id.clone(),
            after_seq,
            at_ms: self.ctx.clock.now_ms(),
        };
        self.tell_dispatchers(Outgoing::More(more)).await
    }

    /// Queues an ack or a page request for the dispatchers. The queue is large; waiting when it
    /// is full slows this client rather than losing what it said.
    async fn tell_dispatchers(&self, item: Outgoing) -> Result<(), Option<Ending>> {
        match self.ctx.acks.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.ctx.acks.send(item).await.map_err(|_| Some(SHUTTING_DOWN))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Some(SHUTTING_DOWN)),
        }
    }

    /// What an ack or read frame tells the dispatchers, by the rule of [`crate::sent`]: ids
    /// this connection was sent count once each; a read of anything else can only mark read
    /// what another connection of the user delivered; the rest is ignored (and counted).
    /// None when nothing is left to say.
    fn record(&mut self, kind: AckKind, ids: Vec<MessageId>) -> Option<AckRecord> {
        let mut sent_ids = Vec::new();
        let mut read_unsent = Vec::new();
        let mut first_acks = Vec::new();
        let mut ignored = 0u64;
        for id in ids {
            match kind {
                AckKind::Delivered => match self.sent.ack(id.as_str()) {
                    Acked::First(sent) => {
                        first_acks.push(sent);
                        sent_ids.push(id);
                    }
                    Acked::Again | Acked::NotSent => ignored += 1,
                },
                AckKind::Read => match self.sent.read(id.as_str()) {
                    Read::First { first_ack } => {
                        first_acks.extend(first_ack);
                        sent_ids.push(id);
                    }
                    Read::NotSent if !read_unsent.contains(&id) => read_unsent.push(id),
                    Read::NotSent | Read::Again => ignored += 1,
                },
            }
        }
        self.ctx.metrics.acks_ignored.inc_by(ignored);
        if sent_ids.is_empty() && read_unsent.is_empty() {
            return None;
        }
        let traceparent = self.observe_acked(&first_acks);
        Some(AckRecord {
            user: self.conn.user.clone(),
            connection_id: self.conn.id.clone(),
            gateway_id: self.ctx.gateway_id.clone(),
            kind,
            ids: sent_ids,
            read_unsent,
            at_ms: self.ctx.clock.now_ms(),
            traceparent,
        })
    }

    /// Publish→ack latency for notifications acked for the first time. Returns the context of
    /// an ack span continuing the first traced one, for the dispatcher's receipt span.
    fn observe_acked(&self, acked: &[Arc<Sent>]) -> Option<String> {
        let mut traceparent = None;
        for sent in acked {
            self.ctx.metrics.publish_to_ack.observe(seconds_since(sent.published_at_ms));
            if traceparent.is_none() && sent.traceparent.is_some() {
                let span = tracing::info_span!("herald.ack", message_id = %sent.id);
                herald_shared::telemetry::continue_from(&span, sent.traceparent.as_deref());
                traceparent = herald_shared::telemetry::traceparent(&span);
            }
        }
        traceparent
    }
}

/// Ends the connection as `ending` says: the error frame and the close frame, then the rest of
/// the closing handshake, each step bounded by [`CLOSE_TIMEOUT`]. The handshake matters: a
/// socket closed while the client's frames still sit unread in its receive buffer is reset by
/// the kernel (which also drops whatever of our last frames it had not sent yet). The client's
/// next send then fails with a broken pipe, and a client library that gives up on that
/// (browsers do) reports 1006 without reading the error frame or the close code. So the gateway
/// reads on, discarding, until the client's close frame (or the end, or the bound) before it
/// drops the socket. With no ending of its own (the client closed, or went away), it only
/// flushes the reply to a client's close frame.
async fn goodbye(socket: &mut WebSocket, ending: Option<Ending>) {
    let Some(ending) = ending else {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.flush()).await;
        return;
    };
    let send = async {
        if let Some(code) = ending.error {
            let frame = ServerFrame::Error { code, message: ending.reason.to_owned() };
            if let Ok(text) = serde_json::to_string(&frame) {
                socket.feed(Message::Text(text.into())).await?;
            }
        }
        let frame = CloseFrame { code: ending.code, reason: Utf8Bytes::from_static(ending.reason) };
        socket.send(Message::Close(Some(frame))).await
    };
    if !matches!(tokio::time::timeout(CLOSE_TIMEOUT, send).await, Ok(Ok(()))) {
        return;
    }
    let drain = async {
        // After our close frame, tungstenite still hands over what the client sent before its
        // own; its close frame completes the handshake.
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

/// Maps a read error to an ending: oversized frames get 1009, anything else means the socket
/// is broken and there is nobody left to tell.
fn read_error(error: axum::Error) -> Option<Ending> {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) if matches!(*e, tungstenite::Error::Capacity(_)) => Some(TOO_BIG),
        _ => None,
    }
}

/// The instant a token with `exp` (seconds since the epoch) runs out. Saturating: `exp` is
/// whatever the token says, up to `u64::MAX`.
fn expiry_instant(exp_secs: u64) -> tokio::time::Instant {
    let now_ms = herald_shared::now_ms();
    let left = Duration::from_millis(exp_secs.saturating_mul(1000).saturating_sub(now_ms));
    // Far-future tokens: cap so the deadline arithmetic cannot overflow.
    tokio::time::Instant::now() + left.min(Duration::from_secs(10 * 365 * 86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_expiry_in_the_past_is_now() {
        assert!(expiry_instant(1) <= tokio::time::Instant::now());
    }

    #[test]
    fn any_token_expiry_is_a_deadline_without_overflow() {
        for exp in [18_500_000_000_000_000, u64::MAX / 1000 + 1, u64::MAX] {
            assert!(expiry_instant(exp) > tokio::time::Instant::now() + Duration::from_secs(86_400), "{exp}");
        }
    }
}
