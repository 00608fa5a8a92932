//! The decisions of one session, without its socket: what a client frame means, which queued
//! frames are written, when to ping, when to ask for the next replay page, and which ending (close
//! code) ends it. Events go in (a frame, a tick, a kick, a queued item, a written frame) with the
//! time passed in; actions come out (ping, publish an ack, ask for a page, close). Its deadlines
//! are data ([`Deadlines`]). The socket, the timers and the queues are the I/O loop's ([`super`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use herald_proto::client::MAX_IDS_PER_FRAME;
use herald_proto::{
    close, AckKind, AckRecord, ClientFrame, ConnectionId, ErrorCode, GatewayId, MessageId, More, TopicName,
    TopicPattern, UserId,
};
use herald_shared::metrics::seconds_since;
use herald_shared::Clock;

use super::limiter::RateLimiter;
use super::topics::{TopicAction, Topics};
use crate::auth::{AuthError, Identity};
use crate::metrics::GatewayMetrics;
use crate::registry::{Outbound, Sent};
use crate::replay::ReplayCursor;
use crate::sent::{Acked, Read, SentSet, SENT_REMEMBERED};

/// A notification is written only with this much of its life left: one written at its expiry
/// would reach the client after it (the chaos run saw one arrive late that way).
const EXPIRY_GUARD_MS: u64 = 1_000;

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
pub(crate) const HEARTBEAT: Ending = Ending::new(close::HEARTBEAT_TIMEOUT, None, "no pong", "heartbeat_timeout");
pub(crate) const SHUTTING_DOWN: Ending =
    Ending::new(close::SERVICE_RESTART, Some(ErrorCode::ShuttingDown), "reconnect", "shutdown");
pub(crate) const SLOW: Ending =
    Ending::new(close::SLOW_CONSUMER, Some(ErrorCode::SlowConsumer), "slow consumer", "slow_consumer");
const KICKED: Ending = Ending::new(close::KICKED, Some(ErrorCode::Kicked), "closed by an operator", "kicked");
const TOKEN_REFUSED: Ending =
    Ending::new(close::TOKEN_EXPIRED, Some(ErrorCode::TokenRefused), "refresh token refused", "token_refused");
/// Every ending the machine decides: their labels are the close reasons the metrics count.
pub(crate) const ENDINGS: [Ending; 10] =
    [BAD_FRAME, BINARY, TOO_BIG, RATE_LIMITED, TOKEN_EXPIRED, TOKEN_REFUSED, HEARTBEAT, SHUTTING_DOWN, SLOW, KICKED];

/// How a session closed from outside ends, by the code its closer gave.
fn kicked(code: u16) -> Ending {
    match code {
        close::SLOW_CONSUMER => SLOW,
        close::KICKED => KICKED,
        _ => SHUTTING_DOWN,
    }
}

/// Something that happened to the session, as the I/O loop tells it.
#[derive(Debug)]
pub(crate) enum Event {
    /// A message from the client.
    Frame(Message),
    /// The client's stream ended, or broke (`too_big`: on a frame over the read limit).
    Gone { too_big: bool },
    /// The heartbeat interval came round.
    Tick,
    /// Closed from outside (a full queue, an operator, a drain, the gateway's shutdown), with
    /// the closer's code.
    Kick(u16),
    /// The token's deadline ([`Deadlines::token`]) passed.
    TokenExpired,
    /// How the token of a `refresh` frame (see [`Action::Verify`]) checked out.
    Refresh(Result<Identity, AuthError>),
}

/// What the machine asks the I/O loop to do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Ping the client (a heartbeat).
    Ping,
    /// A `heartbeat` text frame after the ping, for a client that asked for them.
    Beat,
    /// Pass what an ack or read frame said on to the dispatchers.
    Publish(AckRecord),
    /// Ask the dispatchers for the next page of this connection's replay (`retry`: again, the
    /// page asked for has not come).
    RequestPage { more: More, retry: bool },
    /// Check the token of a `refresh` frame and tell the machine ([`Event::Refresh`]).
    Verify(String),
    /// Tell the client its refresh was accepted; the token deadline has moved.
    Refreshed { token_expires_at_ms: u64 },
    /// Do what a `subscribe` or `unsubscribe` asked, or answer it (see [`super::topics`]).
    Topic(TopicAction),
    /// Count these first acks of topic messages for their aggregate receipts.
    TopicAcks(Vec<(MessageId, TopicName)>),
    /// End the session. None: the client closed or went away, so there is nobody to tell.
    Close(Option<Ending>),
}

/// Who the session is, as what it tells the dispatchers names it.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) user: UserId,
    pub(crate) connection_id: ConnectionId,
    /// The topics its token allows (the `topics` claim).
    pub(crate) topics: Arc<[TopicPattern]>,
}

/// The limits a session runs by (see [`super::SessionContext`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) heartbeat_interval: Duration,
    pub(crate) max_frame_bytes: usize,
    pub(crate) frames_per_sec: u32,
    /// Sustained message ids per second a connection may ack or read, with a burst of twice as
    /// many: what one client can make the dispatchers write.
    pub(crate) ack_ids_per_sec: u32,
    /// Topic subscriptions the connection may hold.
    pub(crate) max_topics: usize,
}

/// What every session of a gateway shares: its limits, its id and its handles. One for the
/// gateway rather than a copy in each machine, which every idle connection holds.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) gateway_id: GatewayId,
    pub(crate) metrics: Arc<GatewayMetrics>,
    /// Fleet time (herald_shared::clock): what a notification's expiry is judged by.
    pub(crate) clock: Clock,
}

/// When the session ends unless the client is heard from: plain data, so that the I/O loop can
/// hold a copy while a write has the rest of the machine (no frame is read meanwhile, so the
/// copy stays true). The machine keeps the two instants and makes the copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// When the client was last heard from: any frame, a pong included.
    last_heard: Instant,
    /// Two heartbeat intervals without a byte from the client: it is gone.
    silence_limit: Duration,
    /// When the token runs out.
    pub(crate) token: Instant,
}

impl Deadlines {
    /// What `event` means while a write is blocked: only the endings. A tick checks the
    /// client's silence and pings nobody (the socket is busy). A peer that has read nothing for
    /// two intervals is gone, and must not keep its user's slot and presence until TCP gives up.
    pub(crate) fn while_writing(&self, event: &Event, now: Instant) -> Option<Ending> {
        match event {
            Event::Kick(code) => Some(kicked(*code)),
            Event::TokenExpired => Some(TOKEN_EXPIRED),
            Event::Tick => self.silent(now),
            // Not read during a write.
            Event::Frame(_) | Event::Gone { .. } | Event::Refresh(_) => None,
        }
    }

    fn silent(&self, now: Instant) -> Option<Ending> {
        (now.saturating_duration_since(self.last_heard) > self.silence_limit).then_some(HEARTBEAT)
    }
}

/// A frame of the queue to write, and the notification it carries.
#[derive(Debug)]
pub(crate) struct Write {
    pub(crate) frame: Utf8Bytes,
    pub(crate) sent: Option<Arc<Sent>>,
}

/// One write batch: the clock read once for all its frames, and its tally for the metrics.
#[derive(Debug)]
pub(crate) struct Batch {
    at_ms: u64,
    /// Frames handed to the socket.
    pub(crate) frames: usize,
    delivered: u64,
    replayed: u64,
    /// Queued notifications not written because they expired while queued.
    expired: u64,
    /// Queued notifications not written because this connection was sent them already.
    repeats: u64,
}

/// One session's state: its limits, what it sent, its replay and its deadlines.
pub(crate) struct Machine {
    peer: Peer,
    shared: Arc<Shared>,
    /// Send a `heartbeat` text frame with each ping (the client asked: `heartbeat=frame`).
    frame_heartbeats: bool,
    /// Frames per second (see [`Settings::frames_per_sec`]).
    frames: RateLimiter,
    /// Ids acked or read per second (see [`Settings::ack_ids_per_sec`]).
    ack_ids: RateLimiter,
    /// What this connection was sent: only acks of these count (see [`crate::sent`]).
    sent: SentSet,
    /// How far this connection's replay has got, and when to ask for its next page.
    replay: ReplayCursor,
    /// Its subscriptions, and the topic messages it was sent: boxed, and only from its first
    /// topic frame on. Most connections never send one, and every idle connection would carry
    /// it (~190 bytes).
    topics: Option<Box<TopicSide>>,
    /// When the client was last heard from (see [`Deadlines`]).
    last_heard: Instant,
    /// When the token runs out.
    token: Instant,
}

/// What a connection that uses topics holds beside its subscriptions.
#[derive(Debug)]
struct TopicSide {
    topics: Topics,
    /// Recoveries (`subscribe` with `since`): each costs a fetch from the topics stream, so a
    /// client gets as many a minute as it may hold subscriptions (all at once on a reconnect);
    /// past that, a `subscribe` goes live unrecovered.
    recoveries: RateLimiter,
}

impl Machine {
    /// A session opening at `now`, whose token runs out at `token`.
    pub(crate) fn new(peer: Peer, shared: Arc<Shared>, frame_heartbeats: bool, token: Instant, now: Instant) -> Self {
        Self {
            topics: None,
            peer,
            frames: RateLimiter::new(shared.settings.frames_per_sec),
            ack_ids: RateLimiter::new(shared.settings.ack_ids_per_sec),
            sent: SentSet::default(),
            replay: ReplayCursor::new(now),
            last_heard: now,
            token,
            shared,
            frame_heartbeats,
        }
    }

    /// The connection's topic side, made on first use.
    fn topic_side(&mut self) -> &mut TopicSide {
        self.topics.get_or_insert_with(|| {
            Box::new(TopicSide {
                topics: Topics::new(Arc::clone(&self.peer.topics), self.shared.settings.max_topics),
                recoveries: RateLimiter::per_minute(self.shared.settings.max_topics),
            })
        })
    }

    /// The hello went out: the client's silence counts from `now`.
    pub(crate) fn on_open(&mut self, now: Instant) {
        self.last_heard = now;
    }

    pub(crate) fn deadlines(&self) -> Deadlines {
        Deadlines {
            last_heard: self.last_heard,
            silence_limit: self.shared.settings.heartbeat_interval * 2,
            token: self.token,
        }
    }

    /// The topics the connection is subscribed to (or asked for): what to leave at its end.
    pub(crate) fn subscribed(&self) -> impl Iterator<Item = &TopicName> {
        self.topics.iter().flat_map(|side| side.topics.subscribed())
    }

    /// What to do about `event`, at `now`.
    pub(crate) fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::Frame(message) => self.on_frame(message, now),
            Event::Gone { too_big } => vec![Action::Close(too_big.then_some(TOO_BIG))],
            Event::Tick => self.on_tick(now),
            Event::Kick(_) | Event::TokenExpired => {
                vec![Action::Close(self.deadlines().while_writing(&event, now))]
            }
            Event::Refresh(outcome) => self.on_refresh(outcome, now, herald_shared::now_ms()),
        }
    }

    /// A `refresh` frame's token checked out (or not): the session now lasts until its expiry,
    /// if it is this session's user's. Anything else ends the session: the client asked to
    /// stay on a token it could not show.
    fn on_refresh(&mut self, outcome: Result<Identity, AuthError>, now: Instant, now_ms: u64) -> Vec<Action> {
        match outcome {
            Ok(identity) if identity.user == self.peer.user => {
                self.token = expiry_instant(identity.expires_at, now, now_ms);
                vec![Action::Refreshed { token_expires_at_ms: identity.expires_at.saturating_mul(1000) }]
            }
            Ok(identity) => {
                tracing::debug!(user = %self.peer.user, other = %identity.user, "refresh with another user's token");
                vec![Action::Close(Some(TOKEN_REFUSED))]
            }
            Err(e) => {
                tracing::debug!(user = %self.peer.user, reason = %e, "refresh refused");
                vec![Action::Close(Some(TOKEN_REFUSED))]
            }
        }
    }

    fn on_frame(&mut self, message: Message, now: Instant) -> Vec<Action> {
        self.last_heard = now;
        if !self.frames.allow(now) {
            return vec![Action::Close(Some(RATE_LIMITED))];
        }
        let mut actions: Vec<Action> = match self.on_message(message, now) {
            Ok(actions) => actions,
            Err(ending) => return vec![Action::Close(ending)],
        };
        // An ack may have made room for the next page.
        actions.extend(self.ask_for_more(now));
        actions
    }

    /// What one client message says: an ack to publish, a token to check, a subscription, or
    /// nothing; `Err` ends the session (None: the client closed).
    fn on_message(&mut self, message: Message, now: Instant) -> Result<Vec<Action>, Option<Ending>> {
        let metrics = &self.shared.metrics;
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                metrics.frames_in.with_label_values(&["invalid"]).inc();
                return Err(Some(BINARY));
            }
            Message::Ping(_) | Message::Pong(_) => {
                metrics.frames_in.with_label_values(&["control"]).inc();
                return Ok(Vec::new());
            }
            Message::Close(_) => return Err(None),
        };
        if text.len() > self.shared.settings.max_frame_bytes {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return Err(Some(TOO_BIG));
        }
        let Ok(frame) = ClientFrame::decode(text.as_str()) else {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return Err(Some(BAD_FRAME));
        };
        let (kind, ids) = match frame {
            ClientFrame::Refresh { token } => {
                metrics.frames_in.with_label_values(&["refresh"]).inc();
                return Ok(vec![Action::Verify(token)]);
            }
            // Refused or done, the connection stays: a bad topic name is a refusal, not 4400.
            ClientFrame::Subscribe { topic, since } => {
                metrics.frames_in.with_label_values(&["subscribe"]).inc();
                let side = self.topic_side();
                let may_recover = since.is_none() || side.recoveries.allow(now);
                return Ok(vec![Action::Topic(side.topics.on_subscribe(topic, since, may_recover))]);
            }
            ClientFrame::Unsubscribe { topic } => {
                metrics.frames_in.with_label_values(&["unsubscribe"]).inc();
                return Ok(vec![Action::Topic(self.topic_side().topics.on_unsubscribe(topic))]);
            }
            frame => frame.into_parts().ok_or(Some(BAD_FRAME))?,
        };
        if ids.len() > MAX_IDS_PER_FRAME {
            metrics.frames_in.with_label_values(&["invalid"]).inc();
            return Err(Some(BAD_FRAME));
        }
        if !self.ack_ids.allow_n(now, ids.len()) {
            return Err(Some(RATE_LIMITED));
        }
        let kind_label = match kind {
            AckKind::Delivered => "delivered",
            AckKind::Read => "read",
        };
        metrics.frames_in.with_label_values(&[if kind == AckKind::Read { "read" } else { "ack" }]).inc();
        metrics.acks_received.with_label_values(&[kind_label]).inc_by(ids.len() as u64);
        let (record, topic_acks) = self.record(kind, ids);
        let mut actions: Vec<Action> = record.map(Action::Publish).into_iter().collect();
        if !topic_acks.is_empty() {
            actions.push(Action::TopicAcks(topic_acks));
        }
        Ok(actions)
    }

    /// A heartbeat: the end of a silent client, or a ping, and a page that did not come asked
    /// for again.
    fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        if let Some(ending) = self.deadlines().silent(now) {
            return vec![Action::Close(Some(ending))];
        }
        let mut actions = vec![Action::Ping];
        if self.frame_heartbeats {
            actions.push(Action::Beat);
        }
        // A page asked for a heartbeat ago and not come was lost: ask again.
        if let Some(after_seq) = self.replay.retry(now, self.shared.settings.heartbeat_interval) {
            actions.push(Action::RequestPage { more: self.more(after_seq), retry: true });
        }
        actions
    }

    /// A batch of writes begins: the clock is read once for all its frames.
    pub(crate) fn batch(&self) -> Batch {
        Batch { at_ms: self.shared.clock.now_ms(), frames: 0, delivered: 0, replayed: 0, expired: 0, repeats: 0 }
    }

    /// What to write of an item taken from the queue, if anything.
    pub(crate) fn on_queued(&mut self, item: Outbound, batch: &mut Batch) -> Option<Write> {
        let (frame, sent) = match item {
            Outbound::Frame { frame, sent } => (frame, sent),
            // The page has left the queue; the next may be asked for once the batch is out.
            Outbound::PageEnd(end) => {
                self.replay.page_end(end);
                return None;
            }
        };
        match sent.as_deref() {
            // Never past the expiry: what a client is sent, it got in time.
            Some(s) if s.expires_at_ms <= batch.at_ms.saturating_add(EXPIRY_GUARD_MS) => {
                batch.expired += 1;
                None
            }
            // Sent here already (live and in the replay): once is enough. (A topic message's
            // repeats are left out by offset, in the index.)
            Some(s) if s.topic.is_none() && self.sent.repeats(s) => {
                batch.repeats += 1;
                None
            }
            _ => Some(Write { frame, sent }),
        }
    }

    /// A frame was handed to the socket: the notification now awaits an ack. Counted in
    /// `batch`, which [`Self::on_batch_written`] adds to the shared counters once (per frame,
    /// they are contended atomics and label lookups on the hottest path of the gateway).
    pub(crate) fn on_written(&mut self, sent: Option<Arc<Sent>>, batch: &mut Batch) {
        batch.frames += 1;
        let Some(sent) = sent else { return };
        if sent.replay {
            batch.replayed += 1;
        } else {
            batch.delivered += 1;
        }
        let age_ms = batch.at_ms.saturating_sub(sent.published_at_ms);
        let latency = &self.shared.metrics.publish_to_deliver;
        let path = if sent.resend {
            &latency.resend
        } else if sent.replay {
            &latency.replay
        } else {
            &latency.live
        };
        path.observe(age_ms as f64 / 1000.0);
        // A topic message never awaits an ack for the replay's sake: it is not in `sent`.
        if sent.topic.is_some() {
            // Only a subscription brings a topic message, so the side is there already.
            self.topic_side().topics.on_written(&sent);
        } else {
            self.sent.record(sent);
        }
    }

    /// The whole batch was handed to the socket (its flush follows).
    pub(crate) fn on_batch_written(&self, batch: &Batch) {
        let metrics = &self.shared.metrics;
        metrics.frames_out.inc_by(batch.frames as u64);
        metrics.notifications_expired.inc_by(batch.expired);
        metrics.notifications_repeated.inc_by(batch.repeats);
        for (path, n) in [("deliver", batch.delivered), ("replay", batch.replayed)] {
            if n > 0 {
                metrics.notifications_sent.with_label_values(&[path]).inc_by(n);
            }
        }
    }

    /// The batch is flushed: a page that left the queue may let the next be asked for.
    pub(crate) fn on_flushed(&mut self, now: Instant) -> Vec<Action> {
        self.ask_for_more(now).into_iter().collect()
    }

    /// The next page of this connection's replay, when [`ReplayCursor`] says it is time: the
    /// last page has left the queue, and the unacked notifications leave room.
    fn ask_for_more(&mut self, now: Instant) -> Option<Action> {
        let after_seq = self.replay.next(self.sent.awaiting_ack(), SENT_REMEMBERED, now)?;
        Some(Action::RequestPage { more: self.more(after_seq), retry: false })
    }

    fn more(&self, after_seq: u64) -> More {
        More {
            user: self.peer.user.clone(),
            connection_id: self.peer.connection_id.clone(),
            gateway_id: self.shared.gateway_id.clone(),
            after_seq,
            at_ms: self.shared.clock.now_ms(),
        }
    }

    /// What an ack or read frame tells the dispatchers, by the rule of [`crate::sent`]: ids
    /// this connection was sent count once each; a read of anything else can only mark read
    /// what another connection of the user delivered; the rest is ignored (and counted).
    /// None when nothing is left to say. An ack or read of a topic message this connection was
    /// sent is counted for its aggregate receipt instead, the first time (the second value).
    fn record(&mut self, kind: AckKind, ids: Vec<MessageId>) -> (Option<AckRecord>, Vec<(MessageId, TopicName)>) {
        let mut sent_ids = Vec::new();
        let mut read_unsent = Vec::new();
        let mut first_acks = Vec::new();
        let mut topic_acks = Vec::new();
        let mut ignored = 0u64;
        for id in ids {
            if let Some(topic) = self.topics.as_mut().and_then(|side| side.topics.ack(&id)) {
                topic_acks.push((id, topic));
                continue;
            }
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
        self.shared.metrics.acks_ignored.inc_by(ignored);
        if sent_ids.is_empty() && read_unsent.is_empty() {
            return (None, topic_acks);
        }
        let traceparent = self.observe_acked(&first_acks);
        let record = AckRecord {
            user: self.peer.user.clone(),
            connection_id: self.peer.connection_id.clone(),
            gateway_id: self.shared.gateway_id.clone(),
            kind,
            ids: sent_ids,
            read_unsent,
            at_ms: self.shared.clock.now_ms(),
            traceparent,
        };
        (Some(record), topic_acks)
    }

    /// Publish→ack latency for notifications acked for the first time. Returns the context of
    /// an ack span continuing the first traced one, for the dispatcher's receipt span.
    fn observe_acked(&self, acked: &[Arc<Sent>]) -> Option<String> {
        let mut traceparent = None;
        for sent in acked {
            self.shared.metrics.publish_to_ack.observe(seconds_since(sent.published_at_ms));
            if traceparent.is_none() && sent.traceparent.is_some() {
                let span = tracing::info_span!("herald.ack", message_id = %sent.id);
                herald_shared::telemetry::continue_from(&span, sent.traceparent.as_deref());
                traceparent = herald_shared::telemetry::traceparent(&span);
            }
        }
        traceparent
    }
}

/// The instant a token with `exp` (seconds since the epoch) runs out, given the time `now` and
/// the system clock's `now_ms`. Saturating: `exp` is whatever the token says, up to `u64::MAX`.
pub(crate) fn expiry_instant(exp_secs: u64, now: Instant, now_ms: u64) -> Instant {
    let left = Duration::from_millis(exp_secs.saturating_mul(1000).saturating_sub(now_ms));
    // Far-future tokens: cap so the deadline arithmetic cannot overflow.
    now + left.min(Duration::from_secs(10 * 365 * 86_400))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::PageEnd;

    const BEAT: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    fn settings() -> Settings {
        Settings {
            heartbeat_interval: BEAT,
            max_frame_bytes: 4096,
            frames_per_sec: 100,
            ack_ids_per_sec: 10_000,
            max_topics: 4,
        }
    }

    /// A session opened at `t` whose token runs out an hour later.
    fn machine_with(settings: Settings, t: Instant) -> Machine {
        machine_beating(settings, false, t)
    }

    /// As [`machine_with`], with `heartbeat=frame` or without.
    fn machine_beating(settings: Settings, frame_heartbeats: bool, t: Instant) -> Machine {
        let peer = Peer {
            user: UserId::new("u1").unwrap(),
            connection_id: ConnectionId::new("c1").unwrap(),
            topics: Arc::from([]),
        };
        let shared = Arc::new(Shared {
            settings,
            gateway_id: GatewayId::new("g1").unwrap(),
            metrics: Arc::new(GatewayMetrics::new().unwrap()),
            clock: Clock::system(),
        });
        let mut machine = Machine::new(peer, shared, frame_heartbeats, t + Duration::from_secs(3600), t);
        machine.on_open(t);
        machine
    }

    fn machine(t: Instant) -> Machine {
        machine_with(settings(), t)
    }

    fn sent(id: &str, expires_at_ms: u64) -> Arc<Sent> {
        Arc::new(Sent::direct(id, expires_at_ms))
    }

    fn notification(id: &str) -> Outbound {
        Outbound::Frame { frame: Utf8Bytes::from(format!(r#"{{"id":"{id}"}}"#)), sent: Some(sent(id, u64::MAX)) }
    }

    #[test]
    fn a_refresh_for_the_same_user_moves_the_token_deadline() {
        let t = Instant::now();
        let mut m = machine(t);
        let now_ms = 1_000_000_000;
        let verify = m.on(text(r#"{"type":"refresh","token":"a.b.c"}"#), t);
        assert!(matches!(verify.as_slice(), [Action::Verify(token)] if token == "a.b.c"), "{verify:?}");

        let identity = |user: &str, exp: u64| Identity {
            user: UserId::new(user).unwrap(),
            expires_at: exp,
            topics: Arc::from([]),
        };
        let actions = m.on_refresh(Ok(identity("u1", now_ms / 1000 + 7200)), t, now_ms);
        assert!(
            matches!(actions.as_slice(), [Action::Refreshed { token_expires_at_ms }] if *token_expires_at_ms == now_ms + 7_200_000)
        );
        assert_eq!(m.deadlines().token, t + Duration::from_secs(7200));

        // Another user's token, or a bad one: the session ends with 4401, the deadline unmoved.
        let mut m = machine(t);
        let before = m.deadlines().token;
        closes_with(&m.on_refresh(Ok(identity("u2", now_ms / 1000 + 7200)), t, now_ms), TOKEN_REFUSED);
        assert_eq!(m.deadlines().token, before);
        closes_with(&m.on_refresh(Err(AuthError::Expired), t, now_ms), TOKEN_REFUSED);
        assert_eq!(TOKEN_REFUSED.code, close::TOKEN_EXPIRED);
        // A refresh frame without its token is a bad frame.
        closes_with(&machine(t).on(text(r#"{"type":"refresh"}"#), t), BAD_FRAME);
    }

    fn text(text: &str) -> Event {
        Event::Frame(Message::Text(text.into()))
    }

    fn ack(ids: &[&str]) -> Event {
        let ids: Vec<String> = ids.iter().map(|id| format!("\"{id}\"")).collect();
        text(&format!(r#"{{"type":"ack","ids":[{}]}}"#, ids.join(",")))
    }

    /// The ending of a list of actions that ends the session.
    fn ending(actions: &[Action]) -> Option<Option<Ending>> {
        match actions.last() {
            Some(Action::Close(ending)) => Some(*ending),
            _ => None,
        }
    }

    fn closes_with(actions: &[Action], expected: Ending) {
        assert_eq!(ending(actions), Some(Some(expected)), "{actions:?}");
        assert_eq!(actions.len(), 1, "nothing before the close: {actions:?}");
    }

    /// Writes `items` as the I/O loop does (every frame handed to the socket) and returns the
    /// frames written, with the batch's tally.
    fn write(machine: &mut Machine, items: Vec<Outbound>) -> (Vec<String>, Batch) {
        let mut batch = machine.batch();
        let mut written = Vec::new();
        for item in items {
            if let Some(out) = machine.on_queued(item, &mut batch) {
                written.push(out.frame.as_str().to_owned());
                machine.on_written(out.sent, &mut batch);
            }
        }
        machine.on_batch_written(&batch);
        (written, batch)
    }

    fn page_requests(actions: &[Action]) -> Vec<(u64, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RequestPage { more, retry } => Some((more.after_seq, *retry)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_frame_that_is_not_a_client_frame_is_a_bad_frame() {
        let t = Instant::now();
        for bad in ["not json", "[1]", r#"{"type":"subscribe"}"#, r#"{"type":"ack","ids":[""]}"#] {
            closes_with(&machine(t).on(text(bad), t), BAD_FRAME);
        }
        assert_eq!(BAD_FRAME.code, close::BAD_FRAME);
    }

    #[test]
    fn a_binary_frame_is_unsupported_data() {
        let t = Instant::now();
        closes_with(&machine(t).on(Event::Frame(Message::Binary(vec![1, 2].into())), t), BINARY);
        assert_eq!(BINARY.code, close::UNSUPPORTED_DATA);
    }

    #[test]
    fn a_frame_over_the_limit_is_too_large() {
        let t = Instant::now();
        let mut m = machine_with(Settings { max_frame_bytes: 32, ..settings() }, t);
        let big = format!(r#"{{"type":"ack","ids":["{}"]}}"#, "m".repeat(32));
        closes_with(&m.on(text(&big), t), TOO_BIG);
        // One the socket refused to read whole ends the same way; any other read error, silently.
        closes_with(&machine(t).on(Event::Gone { too_big: true }, t), TOO_BIG);
        assert_eq!(ending(&machine(t).on(Event::Gone { too_big: false }, t)), Some(None));
        assert_eq!(TOO_BIG.code, close::MESSAGE_TOO_BIG);
    }

    #[test]
    fn too_many_frames_are_rate_limited() {
        let t = Instant::now();
        let mut m = machine_with(Settings { frames_per_sec: 10, ..settings() }, t);
        for _ in 0..20 {
            assert!(m.on(Event::Frame(Message::Pong(Default::default())), t).is_empty(), "the burst");
        }
        closes_with(&m.on(Event::Frame(Message::Pong(Default::default())), t), RATE_LIMITED);
        assert_eq!(RATE_LIMITED.code, close::RATE_LIMITED);
    }

    #[test]
    fn too_many_acked_ids_are_rate_limited() {
        let t = Instant::now();
        let mut m = machine_with(Settings { ack_ids_per_sec: 5, ..settings() }, t);
        let ten: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        assert_eq!(ending(&m.on(ack(&ten), t)), None, "a burst of twice the rate");
        closes_with(&m.on(ack(&["m10"]), t), RATE_LIMITED);
    }

    #[test]
    fn too_many_ids_in_one_frame_are_a_bad_frame() {
        let t = Instant::now();
        let ids: Vec<String> = (0..=MAX_IDS_PER_FRAME).map(|i| format!("m{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let roomy = Settings { max_frame_bytes: 1 << 20, ..settings() };
        closes_with(&machine_with(roomy, t).on(ack(&ids), t), BAD_FRAME);
        let most = ack(&ids[..MAX_IDS_PER_FRAME]);
        assert_eq!(ending(&machine_with(roomy, t).on(most, t)), None, "the most a frame may hold");
    }

    #[test]
    fn the_token_expires_also_while_a_write_is_blocked() {
        let t = Instant::now();
        let mut m = machine(t);
        assert_eq!(m.deadlines().token, t + Duration::from_secs(3600), "the deadline the loop sleeps until");
        assert_eq!(m.deadlines().while_writing(&Event::TokenExpired, t), Some(TOKEN_EXPIRED));
        closes_with(&m.on(Event::TokenExpired, t), TOKEN_EXPIRED);
        assert_eq!(TOKEN_EXPIRED.code, close::TOKEN_EXPIRED);
    }

    #[test]
    fn token_expiry_in_the_past_is_now() {
        let now = Instant::now();
        assert_eq!(expiry_instant(1, now, herald_shared::now_ms()), now);
        assert_eq!(expiry_instant(100, now, 99_000), now + Duration::from_secs(1));
    }

    #[test]
    fn any_token_expiry_is_a_deadline_without_overflow() {
        let now = Instant::now();
        for exp in [18_500_000_000_000_000, u64::MAX / 1000 + 1, u64::MAX] {
            assert!(expiry_instant(exp, now, herald_shared::now_ms()) > now + Duration::from_secs(86_400), "{exp}");
        }
    }

    #[test]
    fn two_silent_intervals_end_the_session_also_while_a_write_is_blocked() {
        let t = Instant::now();
        let mut m = machine(t);
        // (A page request may follow the ping: the first page has not come.)
        assert!(matches!(m.on(Event::Tick, t + BEAT)[..], [Action::Ping, ..]), "one silent interval: a ping");
        assert!(matches!(m.on(Event::Tick, t + BEAT * 2)[..], [Action::Ping, ..]), "two exactly: still in time");
        // Heard from (a pong): the silence starts again.
        assert!(m.on(Event::Frame(Message::Pong(Default::default())), t + BEAT * 2).is_empty());
        assert!(matches!(m.on(Event::Tick, t + BEAT * 4)[..], [Action::Ping, ..]));
        closes_with(&m.on(Event::Tick, t + BEAT * 4 + MS), HEARTBEAT);

        // While a write is blocked the socket is busy: a tick pings nobody, but silence still ends it.
        let deadlines = machine(t).deadlines();
        assert_eq!(deadlines.while_writing(&Event::Tick, t + BEAT * 2), None);
        assert_eq!(deadlines.while_writing(&Event::Tick, t + BEAT * 2 + MS), Some(HEARTBEAT));
        assert_eq!(HEARTBEAT.code, close::HEARTBEAT_TIMEOUT);
        assert_eq!(HEARTBEAT.error, None, "a client that does not read gets no error frame first");
    }

    #[test]
    fn a_client_that_asked_for_heartbeat_frames_gets_one_with_each_ping() {
        let t = Instant::now();
        let mut m = machine_beating(settings(), true, t);
        assert!(matches!(m.on(Event::Tick, t + MS)[..], [Action::Ping, Action::Beat]));
    }

    #[test]
    fn shutdown_asks_the_client_to_reconnect_also_while_a_write_is_blocked() {
        let t = Instant::now();
        let shutdown = || Event::Kick(close::SERVICE_RESTART);
        closes_with(&machine(t).on(shutdown(), t), SHUTTING_DOWN);
        assert_eq!(machine(t).deadlines().while_writing(&shutdown(), t), Some(SHUTTING_DOWN));
        assert_eq!(SHUTTING_DOWN.code, close::SERVICE_RESTART);
    }

    #[test]
    fn an_operator_kick_ends_with_its_code_also_while_a_write_is_blocked() {
        let t = Instant::now();
        closes_with(&machine(t).on(Event::Kick(close::KICKED), t), KICKED);
        assert_eq!(machine(t).deadlines().while_writing(&Event::Kick(close::KICKED), t), Some(KICKED));
        assert_eq!(KICKED.code, close::KICKED);
        // A drain kicks with the restart code.
        closes_with(&machine(t).on(Event::Kick(close::SERVICE_RESTART), t), SHUTTING_DOWN);
    }

    #[test]
    fn a_full_queue_ends_a_slow_consumer_also_while_a_write_is_blocked() {
        let t = Instant::now();
        closes_with(&machine(t).on(Event::Kick(close::SLOW_CONSUMER), t), SLOW);
        assert_eq!(machine(t).deadlines().while_writing(&Event::Kick(close::SLOW_CONSUMER), t), Some(SLOW));
        assert_eq!(SLOW.code, close::SLOW_CONSUMER);
    }

    #[test]
    fn a_client_close_frame_ends_without_a_close_code_of_ours() {
        let t = Instant::now();
        let actions = machine(t).on(Event::Frame(Message::Close(None)), t);
        assert!(matches!(actions[..], [Action::Close(None)]), "{actions:?}");
    }

    #[test]
    fn a_client_that_went_away_is_told_nothing() {
        let t = Instant::now();
        let actions = machine(t).on(Event::Gone { too_big: false }, t);
        assert!(matches!(actions[..], [Action::Close(None)]), "{actions:?}");
        // Nor is anything read while a write is blocked.
        assert_eq!(machine(t).deadlines().while_writing(&Event::Gone { too_big: false }, t), None);
    }

    #[test]
    fn only_an_ack_of_a_notification_sent_here_is_published_and_only_once() {
        let t = Instant::now();
        let mut m = machine(t);
        assert!(m.on(ack(&["m9"]), t).is_empty(), "never sent here: ignored");
        write(&mut m, vec![notification("m1")]);
        let actions = m.on(ack(&["m1", "m9"]), t);
        let [Action::Publish(record)] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(record.kind, AckKind::Delivered);
        assert_eq!(record.ids, vec![MessageId::new("m1").unwrap()]);
        assert_eq!((record.user.as_str(), record.connection_id.as_str()), ("u1", "c1"));
        assert!(m.on(ack(&["m1"]), t).is_empty(), "acked before");
    }

    #[test]
    fn a_topic_message_is_acked_for_its_count_and_never_holds_up_the_replay() {
        let t = Instant::now();
        let mut m = machine_with(settings(), t);
        let topic = TopicName::new("news").unwrap();
        let sent = Sent { topic: Some(topic.clone()), ..(*sent("t1", u64::MAX)).clone() };
        let item = Outbound::Frame { frame: r#"{"id":"t1"}"#.into(), sent: Some(Arc::new(sent)) };
        write(&mut m, vec![item.clone(), item]);
        assert_eq!(m.sent.awaiting_ack(), 0, "not among the notifications a replay waits for");
        let actions = m.on(ack(&["t1", "t1"]), t);
        let [Action::TopicAcks(acks)] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(acks, &vec![(MessageId::new("t1").unwrap(), topic)], "counted once, no ack record");
        assert!(m.on(text(r#"{"type":"read","ids":["t1"]}"#), t).iter().all(|a| !matches!(a, Action::TopicAcks(_))));
        // A subscribe outside the (empty) claim is refused, the session going on.
        let actions = m.on(text(r#"{"type":"subscribe","topic":"news","since":3}"#), t);
        assert!(matches!(&actions[..], [Action::Topic(super::super::topics::TopicAction::Answer(_))]), "{actions:?}");
        closes_with(&m.on(text(r#"{"type":"subscribe","since":3}"#), t), BAD_FRAME);
    }

    #[test]
    fn a_read_of_a_notification_sent_elsewhere_is_passed_on_as_read_unsent() {
        let t = Instant::now();
        let mut m = machine(t);
        let actions = m.on(text(r#"{"type":"read","ids":["m7","m7"]}"#), t);
        let [Action::Publish(record)] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(record.kind, AckKind::Read);
        assert!(record.ids.is_empty());
        assert_eq!(record.read_unsent, vec![MessageId::new("m7").unwrap()], "once");
    }

    #[test]
    fn a_repeat_notification_is_not_written_twice() {
        let t = Instant::now();
        let mut m = machine(t);
        let (written, batch) = write(&mut m, vec![notification("m1"), notification("m1"), notification("m2")]);
        assert_eq!(written, vec![r#"{"id":"m1"}"#, r#"{"id":"m2"}"#]);
        assert_eq!((batch.frames, batch.repeats, batch.delivered), (2, 1, 2));
        // The ack timeout's resend goes out again.
        let resend = Arc::new(Sent { resend: true, ..(*sent("m1", u64::MAX)).clone() });
        let (written, _) = write(&mut m, vec![Outbound::Frame { frame: "again".into(), sent: Some(resend) }]);
        assert_eq!(written, vec!["again"]);
    }

    #[test]
    fn a_notification_about_to_expire_is_not_written() {
        let t = Instant::now();
        let mut m = machine(t);
        let now_ms = Clock::system().now_ms();
        let expiring = Outbound::Frame { frame: "late".into(), sent: Some(sent("m1", now_ms + EXPIRY_GUARD_MS / 2)) };
        let in_time = Outbound::Frame { frame: "in time".into(), sent: Some(sent("m2", now_ms + 60_000)) };
        let control = Outbound::Frame { frame: "control".into(), sent: None };
        let (written, batch) = write(&mut m, vec![expiring, in_time, control]);
        assert_eq!(written, vec!["in time", "control"]);
        assert_eq!((batch.expired, batch.frames), (1, 2));
        assert!(m.on(ack(&["m1"]), t).is_empty(), "not written, so not sent: its ack cannot count");
    }

    #[test]
    fn the_next_page_is_asked_for_once_the_page_has_left_the_queue_and_there_is_room() {
        let t = Instant::now();
        let mut m = machine(t);
        let end = Outbound::PageEnd(PageEnd { more_after_seq: Some(42), len: 1 });
        let (written, _) = write(&mut m, vec![notification("m1"), end]);
        assert_eq!(written.len(), 1, "nothing is written for a page end");
        assert_eq!(page_requests(&m.on_flushed(t)), vec![(42, false)]);
        assert!(m.on_flushed(t).is_empty(), "asked once");

        // No room: as many unacked notifications as the gateway remembers. An ack makes room.
        let mut m = machine(t);
        let many: Vec<Outbound> = (0..SENT_REMEMBERED).map(|i| notification(&format!("m{i}"))).collect();
        write(&mut m, many);
        write(&mut m, vec![Outbound::PageEnd(PageEnd { more_after_seq: Some(7), len: 1 })]);
        assert!(m.on_flushed(t).is_empty(), "the acks of a replay still count: wait for room");
        let actions = m.on(ack(&["m0"]), t);
        assert!(matches!(actions[0], Action::Publish(_)), "{actions:?}");
        assert_eq!(page_requests(&actions), vec![(7, false)], "the ack first, then the page");
    }

    #[test]
    fn a_lost_page_is_asked_for_again_at_a_heartbeat() {
        let t = Instant::now();
        let mut m = machine(t);
        assert_eq!(page_requests(&m.on(Event::Tick, t + BEAT / 2)), vec![], "not yet");
        let actions = m.on(Event::Tick, t + BEAT);
        assert!(matches!(actions[0], Action::Ping), "the ping first: {actions:?}");
        assert_eq!(page_requests(&actions), vec![(0, true)], "the online event's first page never came");
        assert_eq!(page_requests(&m.on(Event::Tick, t + BEAT + MS)), vec![], "once per interval");
    }
}
