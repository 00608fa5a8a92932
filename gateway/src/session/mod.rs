//! One client connection from upgrade to close, as I/O: the hello, the socket's reads and
//! batched writes, the heartbeat timer, the token's deadline, the closing handshake, and the
//! connection's place in the registry and presence. What each event means (an inbound frame, a
//! tick, a kick, a queued frame) and which close code explains an ending is decided by the
//! state machine in [`machine`], which runs without a socket; this loop waits, asks it, and does
//! what it says.
//!
//! A session is one task that both reads and writes its socket, so an idle connection costs one
//! task, one bounded queue and the socket, which holds no buffer while idle ([`crate::websocket`]). What the client acks goes to the ack
//! publisher; what it was sent but did not ack stays pending in the store, whatever the ending.

mod alarm;
mod limiter;
mod machine;
mod topics;

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use herald_proto::{ConnectionId, Hello, ServerFrame, TopicName, TopicPattern};
use tokio::sync::mpsc;

use crate::acks::Outgoing;
use crate::auth::{Authenticator, Identity};
use crate::presence::PresenceHandle;
use crate::registry::{Admission, Connection, Next, Outbound, Registry};
use crate::topics::{RecoveryLimits, TopicIndex};
use crate::websocket::{SocketError, WebSocket};
use alarm::Alarm;
use machine::{expiry_instant, Action, Ending, Event, Machine, Peer, HEARTBEAT, SHUTTING_DOWN, SLOW};
pub(crate) use machine::{Settings, Shared};
use topics::{Since, TopicAction};

/// Frames written to the socket before a flush, when many are queued.
const WRITE_BATCH: usize = 64;
/// `ServerFrame::Heartbeat` as sent: the same bytes every time.
const HEARTBEAT_FRAME: &str = r#"{"type":"heartbeat"}"#;
/// How long each step of a closing handshake (our frames out, the client's close in) may take
/// before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What every session of this gateway shares.
pub(crate) struct SessionContext {
    /// The limits, id and handles every session's state machine reads.
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) presence: PresenceHandle,
    /// Acks and replay page requests, to the publisher task (see [`crate::acks`]).
    pub(crate) acks: mpsc::Sender<Outgoing>,
    pub(crate) outbound_queue: usize,
    /// Checks the tokens of `refresh` frames, with the keys a connect's token is checked with.
    pub(crate) auth: Authenticator,
    /// Which local connections subscribe to which topic; fed by [`crate::topics::Reader`].
    pub(crate) topics: Arc<TopicIndex>,
    /// Where a `subscribe` with `since` recovers from; None (tests without NATS): nothing is
    /// recovered, and the answer says `recovered: false`.
    pub(crate) recovery: Option<TopicRecovery>,
}

/// The topics stream, for recoveries.
pub(crate) struct TopicRecovery {
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) names: herald_shared::naming::Names,
    pub(crate) limits: RecoveryLimits,
}

/// Every `reason` a session's end is counted under: the machine's endings, the client going
/// away, and a panic.
pub(crate) fn close_reasons() -> Vec<&'static str> {
    machine::ENDINGS.iter().map(|e| e.label).chain([CLIENT_GONE, PANIC]).collect()
}

const CLIENT_GONE: &str = "client_gone";
const PANIC: &str = "panic";

/// What a connection brings to its session besides the socket. Boxed: the session's future keeps
/// what `run` was called with for the connection's whole life, so it is one pointer there.
pub(crate) struct Opening {
    pub(crate) identity: Identity,
    /// Holds the connection's place; the connection keeps it.
    pub(crate) admission: Admission,
    pub(crate) frame_heartbeats: bool,
    pub(crate) ctx: Arc<SessionContext>,
}

impl Opening {
    /// The opening, its box freed now: moved out of with `*`, the box would be freed only when
    /// the session ends.
    #[allow(clippy::boxed_local, reason = "taking the box is the point: it is freed on return")]
    fn unbox(self: Box<Self>) -> Self {
        *self
    }
}

/// Runs one connection to its end.
///
/// An async block rather than an async fn: an async fn's future keeps its arguments and the
/// body's own copies of them side by side for its whole life (rust-lang/rust#62958), which was
/// 440 bytes of every connection here (the socket twice).
#[allow(clippy::manual_async_fn, reason = "an async fn would hold the socket twice")]
pub(crate) fn run(mut socket: WebSocket, opening: Box<Opening>) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // Destructured to the last field and never borrowed: a local that is borrowed keeps its
        // place in the future for the connection's whole life.
        let Opening { identity: Identity { user, expires_at, topics }, admission, frame_heartbeats, ctx } =
            opening.unbox();
        let conn = Arc::new(Connection::new(new_connection_id(), user, ctx.outbound_queue).admitted(admission));
        let mut session = Session::new(&ctx, &conn, expires_at, topics, frame_heartbeats);
        // Local registration first (deliveries can find the socket), then Redis and the online
        // announcement: the order that makes replay race-free (see presence.rs).
        ctx.registry.insert(Arc::clone(&conn));
        ctx.shared.metrics.connections_opened.inc();
        ctx.shared.metrics.connections_open.inc();
        ctx.presence.register(Arc::clone(&conn)).await;
        tracing::debug!(user = %conn.user, connection = %conn.id, "session open");

        // However the session ends, a panic included, the connection leaves the registry and
        // presence below: a session that died must not hold its user's slot or attract routing.
        let (ending, label) = match AssertUnwindSafe(session.serve(&mut socket)).catch_unwind().await {
            Ok(ending) => (ending, ending.map_or(CLIENT_GONE, |e| e.label)),
            Err(_) => {
                tracing::error!(user = %conn.user, connection = %conn.id, "session panicked; closing it");
                (None, PANIC)
            }
        };
        // Closed now, as when the session owned it, not after the bookkeeping below.
        drop(socket);
        conn.outbox.close();
        for topic in session.machine.subscribed() {
            ctx.topics.unsubscribe(&conn.id, topic);
        }
        drop(session);

        ctx.registry.remove(&conn);
        ctx.shared.metrics.connections_open.dec();
        ctx.shared.metrics.connections_closed.with_label_values(&[label]).inc();
        if ending == Some(SLOW) {
            ctx.shared.metrics.queue_overflows.inc();
        }
        ctx.presence.unregister(&conn).await;
        tracing::debug!(user = %conn.user, connection = %conn.id, ending = ?ending, "session closed");
    }
}

/// A fresh connection id: a UUID v4 in its simple form (32 hex digits).
fn new_connection_id() -> ConnectionId {
    ConnectionId::new(uuid::Uuid::new_v4().simple().to_string())
        .unwrap_or_else(|_| unreachable!("32 hex digits are a valid connection id"))
}

struct Session<'a> {
    ctx: &'a SessionContext,
    conn: &'a Arc<Connection>,
    /// The `exp` of the token the connection opened with, in ms, for the hello.
    token_expires_at_ms: u64,
    /// Every decision: the loop below only reads, writes and waits.
    machine: Machine,
}

impl<'a> Session<'a> {
    /// The session of `conn`, opened with a token that expires at `token_exp` (seconds since
    /// the epoch) and allows `topics`.
    fn new(
        ctx: &'a SessionContext,
        conn: &'a Arc<Connection>,
        token_exp: u64,
        topics: Arc<[TopicPattern]>,
        frame_heartbeats: bool,
    ) -> Self {
        let peer = Peer { user: conn.user.clone(), connection_id: conn.id.clone(), topics };
        let now = Instant::now();
        let token = expiry_instant(token_exp, now, herald_shared::now_ms());
        let machine = Machine::new(peer, Arc::clone(&ctx.shared), frame_heartbeats, token, now);
        Self { ctx, conn, token_expires_at_ms: token_exp.saturating_mul(1000), machine }
    }

    /// The session loop: wait for an event, let the machine decide, do what it says. Returns how
    /// it ended (None: the client went away).
    ///
    /// The socket is borrowed, not moved in, and the body is an async block rather than an async
    /// fn: an async fn's future keeps its arguments and the body's copies of them side by side
    /// for the whole call (rust-lang/rust#62958), and every idle connection holds this future.
    #[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
    fn serve<'s, S>(
        &'s mut self,
        socket: &'s mut S,
    ) -> impl std::future::Future<Output = Option<Ending>> + use<'s, 'a, S>
    where
        S: Sink<Message, Error = axum::Error> + Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        async move {
            // Written straight to the socket, before the loop reads the queue: it precedes every
            // notification, and an idle connection never allocates its queue's buffer.
            let Ok(hello) = serde_json::to_string(&ServerFrame::Hello(Hello {
                connection_id: self.conn.id.clone(),
                gateway_id: self.ctx.shared.gateway_id.clone(),
                heartbeat_interval_ms: self.ctx.shared.settings.heartbeat_interval.as_millis() as u64,
                max_frame_bytes: self.ctx.shared.settings.max_frame_bytes,
                token_expires_at_ms: self.token_expires_at_ms,
            })) else {
                return None;
            };
            match Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Text(hello.into())))).await {
                Ok(Ok(())) => self.ctx.shared.metrics.frames_out.inc(),
                _ => return None,
            }
            let now = Instant::now();
            self.machine.on_open(now);
            let conn = self.conn;
            // One timer for the heartbeat and the token's expiry (see [`alarm`]).
            let mut alarm = Alarm::new(now, self.ctx.shared.settings.heartbeat_interval);
            let timer = tokio::time::sleep_until(alarm.deadline(self.machine.deadlines().token).into());
            tokio::pin!(timer);

            let ending = 'session: loop {
                let actions = tokio::select! {
                    biased;
                    _ = &mut timer => {
                        let now = Instant::now();
                        let event = alarm.fired(now, self.machine.deadlines().token);
                        self.machine.on(event, now)
                    }
                    next = conn.next() => match next {
                        Next::Kick(code) => self.machine.on(Event::Kick(code), Instant::now()),
                        // Boxed, as are the other rare or large steps below: a future is as large as
                        // its largest state, and every idle connection would carry that size.
                        Next::Write(first) => Box::pin(self.write(first, socket, &mut alarm, timer.as_mut())).await,
                    },
                    message = socket.next() => self.machine.on(read_event(message), Instant::now()),
                };
                if !actions.is_empty() {
                    if let Err(ending) = Box::pin(self.carry_out(actions, socket)).await {
                        break 'session ending;
                    }
                }
                // A heartbeat or a refresh moves the timer (a write re-arms it itself).
                let deadline = alarm.deadline(self.machine.deadlines().token).into();
                if deadline != timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            };
            Box::pin(goodbye(socket, ending)).await;
            ending
        }
    }

    /// Does what the machine said, in order; `Err` ends the session (see [`Self::act`]).
    async fn carry_out<S>(&mut self, actions: Vec<Action>, socket: &mut S) -> Result<(), Option<Ending>>
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        let mut actions = VecDeque::from(actions);
        while let Some(action) = actions.pop_front() {
            // A refresh's token is checked here, with the keys at hand (no fetch, no wait),
            // and the machine decides what its outcome means.
            if let Action::Verify(token) = action {
                let outcome = self.ctx.auth.verify_cached(&token);
                actions.extend(self.machine.on(Event::Refresh(outcome), Instant::now()));
                continue;
            }
            self.act(action, socket).await?;
        }
        Ok(())
    }

    /// Writes what is queued, up to a batch, with one flush, and returns what follows (a page
    /// may have left the queue).
    async fn write<S>(
        &mut self,
        first: Outbound,
        socket: &mut S,
        alarm: &mut Alarm,
        mut timer: Pin<&mut tokio::time::Sleep>,
    ) -> Vec<Action>
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        let conn = self.conn;
        // A client that stops reading blocks the write. Every deadline still holds meanwhile:
        // a kick (its queue filled up, an operator, the shutdown), the token's expiry, and the
        // heartbeat. The
        // write holds the machine, so the deadlines are consulted from a copy; nothing is read
        // during the write, so the copy stays true. The goodbye (error frame, close code) then
        // follows what is already buffered, for a client that reads again within the closing
        // handshake.
        let deadlines = self.machine.deadlines();
        let machine = &mut self.machine;
        let write = async {
            let mut batch = machine.batch();
            let mut next = Some(first);
            while let Some(item) = next.take() {
                if let Some(out) = machine.on_queued(item, &mut batch) {
                    socket.feed(Message::Text(out.frame)).await?;
                    machine.on_written(out.sent, &mut batch);
                }
                if batch.frames < WRITE_BATCH {
                    next = conn.outbox.try_pop();
                }
            }
            machine.on_batch_written(&batch);
            socket.flush().await
        };
        let blocked = {
            tokio::pin!(write);
            loop {
                let event = tokio::select! {
                    result = &mut write => break result.err().map(|_| None),
                    code = conn.until_kicked() => Event::Kick(code),
                    _ = &mut timer => {
                        let event = alarm.fired(Instant::now(), deadlines.token);
                        timer.as_mut().reset(alarm.deadline(deadlines.token).into());
                        event
                    }
                };
                if let Some(ending) = deadlines.while_writing(&event, Instant::now()) {
                    break Some(Some(ending));
                }
            }
        };
        match blocked {
            Some(ending) => vec![Action::Close(ending)],
            None => self.machine.on_flushed(Instant::now()),
        }
    }

    /// Does what the machine said; `Err` ends the session (None: nobody left to tell).
    async fn act<S>(&self, action: Action, socket: &mut S) -> Result<(), Option<Ending>>
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        match action {
            Action::Ping => {
                self.conn.outbox.shrink_if_empty();
                self.send_within_interval(socket, Message::Ping(bytes::Bytes::new())).await
            }
            Action::Beat => {
                self.send_within_interval(socket, Message::Text(HEARTBEAT_FRAME.into())).await?;
                self.ctx.shared.metrics.frames_out.inc();
                Ok(())
            }
            Action::Publish(record) => self.tell_dispatchers(Outgoing::Ack(record)).await,
            Action::Refreshed { token_expires_at_ms } => {
                let Ok(text) = serde_json::to_string(&ServerFrame::Refreshed { token_expires_at_ms }) else {
                    return Ok(());
                };
                self.send_within_interval(socket, Message::Text(text.into())).await?;
                self.ctx.shared.metrics.frames_out.inc();
                Ok(())
            }
            // Done by the loop before it gets here.
            Action::Verify(_) => Ok(()),
            Action::RequestPage { more, retry } => {
                let kind = if retry { "retry" } else { "next" };
                self.ctx.shared.metrics.replay_requests.with_label_values(&[kind]).inc();
                self.tell_dispatchers(Outgoing::More(more)).await
            }
            Action::Topic(action) => {
                Box::pin(self.topic(action)).await;
                Ok(())
            }
            Action::TopicAcks(acks) => {
                let user = self.conn.user.clone();
                self.tell_dispatchers(Outgoing::TopicAcks { user, acks }).await
            }
            Action::Close(ending) => Err(ending),
        }
    }

    /// Does what a topic frame asked, answering through the connection's queue, so that the
    /// answer keeps its place among the topic's messages: `subscribed` before the first,
    /// `unsubscribed` after the last. A subscription with `since` recovers first (one bounded
    /// fetch from the topics stream, at most a few seconds, during which this loop waits and
    /// the topic's live messages are held for it).
    async fn topic(&self, action: TopicAction) {
        let ctx = self.ctx;
        let queue = |frame: ServerFrame| {
            if let Some(out) = crate::topics::answer(&frame) {
                self.conn.offer(out);
            }
        };
        match action {
            TopicAction::Answer(frame) => {
                ctx.shared.metrics.topic_subscribes.with_label_values(&["refused"]).inc();
                queue(frame);
            }
            TopicAction::Unsubscribe(topic) => {
                ctx.topics.unsubscribe(&self.conn.id, &topic);
                queue(ServerFrame::Unsubscribed { topic });
            }
            TopicAction::Subscribe { topic, since: since @ (Since::Now | Since::Throttled) } => {
                let (outcome, recovered) =
                    if since == Since::Now { ("subscribed", None) } else { ("not_recovered", Some(false)) };
                ctx.shared.metrics.topic_subscribes.with_label_values(&[outcome]).inc();
                queue(ServerFrame::Subscribed { topic: topic.clone(), recovered });
                ctx.topics.subscribe(self.conn, &topic, false);
            }
            TopicAction::Subscribe { topic, since: Since::Offset(since) } => {
                let sub = ctx.topics.subscribe(self.conn, &topic, true);
                let (complete, frames) = self.recover(&topic, since).await;
                let outcome = if complete { "recovered" } else { "not_recovered" };
                ctx.shared.metrics.topic_subscribes.with_label_values(&[outcome]).inc();
                let answer = ServerFrame::Subscribed { topic, recovered: Some(complete) };
                if let Some(answer) = crate::topics::answer(&answer) {
                    sub.finish_recovery(answer, frames);
                }
            }
        }
    }

    /// The topic's messages after `since` as frames, and whether they are all of them.
    async fn recover(&self, topic: &TopicName, since: u64) -> (bool, Vec<(u64, Outbound)>) {
        let Some(source) = &self.ctx.recovery else { return (false, Vec::new()) };
        match crate::topics::recover(&source.js, &source.names, topic, since, source.limits).await {
            Ok(found) => {
                let now_ms = self.ctx.shared.clock.now_ms();
                let frames = found
                    .messages
                    .into_iter()
                    .filter_map(|(offset, p)| crate::topics::frame(p, offset, now_ms).map(|f| (offset, f)))
                    .collect();
                (found.complete, frames)
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = %topic, "topic recovery failed; subscribed without it");
                (false, Vec::new())
            }
        }
    }

    /// A ping (or heartbeat frame) into a full send buffer waits too; it may wait one interval
    /// at most.
    async fn send_within_interval<S>(&self, socket: &mut S, message: Message) -> Result<(), Option<Ending>>
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        match tokio::time::timeout(self.ctx.shared.settings.heartbeat_interval, socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(None),
            Err(_) => Err(Some(HEARTBEAT)),
        }
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
async fn goodbye<S>(socket: &mut S, ending: Option<Ending>)
where
    S: Sink<Message, Error = axum::Error> + Stream<Item = Result<Message, axum::Error>> + Unpin,
{
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
        // After our close frame, the socket still hands over what the client sent before its
        // own; its close frame completes the handshake.
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

/// What the client's stream said, as an event: oversized frames get 1009, any other read error
/// means the socket is broken and there is nobody left to tell.
fn read_event(message: Option<Result<Message, axum::Error>>) -> Event {
    match message {
        Some(Ok(message)) => Event::Frame(message),
        None => Event::Gone { too_big: false },
        Some(Err(error)) => {
            Event::Gone { too_big: error.into_inner().downcast::<SocketError>().is_ok_and(|e| e.is_too_big()) }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The loop itself, driven over an in-memory socket (as axum's testing-websockets example
    //! does): what the machine's unit tests cannot show is that the loop waits, asks and acts.

    use std::task::{Context, Poll};

    use futures::channel::mpsc as pipe;
    use herald_proto::{close, GatewayId, UserId};

    use super::*;
    use crate::metrics::GatewayMetrics;
    use crate::registry::Sent;

    /// The gateway's end of an in-memory WebSocket. What it writes waits in a bounded channel
    /// until the client takes it: a client that stops reading blocks the session's writes.
    struct Pipe {
        to_client: pipe::Sender<Message>,
        from_client: pipe::UnboundedReceiver<Message>,
    }

    /// The client's end.
    struct Client {
        rx: pipe::Receiver<Message>,
        tx: pipe::UnboundedSender<Message>,
    }

    impl Client {
        async fn read(&mut self) -> Message {
            tokio::time::timeout(Duration::from_secs(5), self.rx.next()).await.expect("in time").expect("open")
        }

        /// The next text frame, skipping pings.
        async fn text(&mut self) -> String {
            loop {
                match self.read().await {
                    Message::Ping(_) => {}
                    Message::Text(text) => return text.as_str().to_owned(),
                    other => panic!("{other:?}"),
                }
            }
        }

        fn send(&self, text: &str) {
            self.tx.unbounded_send(Message::Text(text.into())).expect("session reads");
        }
    }

    fn pipe(buffer: usize) -> (Pipe, Client) {
        let (to_client, rx) = pipe::channel(buffer);
        let (tx, from_client) = pipe::unbounded();
        (Pipe { to_client, from_client }, Client { rx, tx })
    }

    impl Stream for Pipe {
        type Item = Result<Message, axum::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.from_client.poll_next_unpin(cx).map(|m| m.map(Ok))
        }
    }

    impl Sink<Message> for Pipe {
        type Error = axum::Error;

        fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.to_client.poll_ready(cx).map_err(axum::Error::new)
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.to_client.start_send(item).map_err(axum::Error::new)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.to_client).poll_flush(cx).map_err(axum::Error::new)
        }

        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.to_client).poll_close(cx).map_err(axum::Error::new)
        }
    }

    const SECRET: &str = "0123456789abcdef0123";

    fn test_auth() -> Authenticator {
        let config = herald_shared::config::JwtConfig { secret: SECRET.into(), ..Default::default() };
        Authenticator::new(&config).unwrap().0
    }

    fn context(heartbeat_interval: Duration) -> (SessionContext, mpsc::Receiver<Outgoing>) {
        let (acks, acks_rx) = mpsc::channel(16);
        let settings = Settings {
            heartbeat_interval,
            max_frame_bytes: 4096,
            frames_per_sec: 100,
            ack_ids_per_sec: 1000,
            max_topics: 4,
        };
        let ctx = SessionContext {
            shared: Arc::new(Shared {
                settings,
                gateway_id: GatewayId::new("g1").unwrap(),
                metrics: Arc::new(GatewayMetrics::new().unwrap()),
                clock: herald_shared::Clock::system(),
            }),
            registry: Registry::new(10, 10),
            presence: PresenceHandle::detached(),
            acks,
            outbound_queue: 1000,
            auth: test_auth(),
            topics: Arc::default(),
            recovery: None,
        };
        (ctx, acks_rx)
    }

    fn connection() -> Arc<Connection> {
        Arc::new(Connection::new(new_connection_id(), UserId::new("u1").unwrap(), 1000))
    }

    fn notification(id: &str) -> Outbound {
        let sent = Sent::direct(id, u64::MAX);
        Outbound::Frame { frame: format!(r#"{{"id":"{id}"}}"#).into(), sent: Some(Arc::new(sent)) }
    }

    #[tokio::test]
    async fn the_loop_writes_passes_acks_on_and_says_goodbye_at_shutdown() {
        let (ctx, mut acks) = context(Duration::from_secs(30));
        let conn = connection();
        let (mut socket, mut client) = pipe(8);
        let mut session = Session::new(&ctx, &conn, u64::MAX, Arc::from([]), false);
        let client_side = async {
            assert!(client.text().await.contains(r#""type":"hello""#));
            conn.outbox.push(notification("m1")).unwrap();
            conn.outbox.push(notification("m1")).unwrap();
            conn.outbox.push(notification("m2")).unwrap();
            assert_eq!(client.text().await, r#"{"id":"m1"}"#);
            assert_eq!(client.text().await, r#"{"id":"m2"}"#, "the repeat was left out");
            client.send(r#"{"type":"ack","ids":["m2","m9"]}"#);
            let Some(Outgoing::Ack(record)) = acks.recv().await else { panic!("an ack record") };
            assert_eq!(record.ids, vec![herald_proto::MessageId::new("m2").unwrap()]);
            conn.close_with(close::SERVICE_RESTART);
            assert!(client.text().await.contains("shutting_down"), "the error frame first");
            let Message::Close(Some(frame)) = client.read().await else { panic!("a close frame") };
            assert_eq!(frame.code, close::SERVICE_RESTART);
            client.tx.unbounded_send(Message::Close(None)).unwrap();
        };
        let (ending, ()) = tokio::join!(session.serve(&mut socket), client_side);
        assert_eq!(ending.map(|e| e.code), Some(close::SERVICE_RESTART));
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_still_times_out_on_the_heartbeat() {
        let (ctx, _acks) = context(Duration::from_millis(50));
        let conn = connection();
        // Room for the hello and one more frame: every write after them blocks until the client
        // reads (a sender parks once the channel holds more than its buffer).
        let (mut socket, mut client) = pipe(1);
        let mut session = Session::new(&ctx, &conn, u64::MAX, Arc::from([]), false);
        for i in 0..10 {
            conn.outbox.push(notification(&format!("m{i}"))).unwrap();
        }
        // Two intervals and a tick, then the goodbye, bounded by CLOSE_TIMEOUT.
        let ending = tokio::time::timeout(Duration::from_secs(3), session.serve(&mut socket)).await;
        drop(socket);
        assert_eq!(ending.expect("the deadline held").map(|e| e.code), Some(close::HEARTBEAT_TIMEOUT));
        assert!(client.text().await.contains(r#""type":"hello""#));
        assert_eq!(client.text().await, r#"{"id":"m0"}"#);
        assert!(client.rx.next().await.is_none(), "no ping while the write was blocked, and no room for a goodbye");
    }

    /// Every idle connection holds its session's future, which is as large as its largest
    /// state: the rare and large steps (writes, topic recovery, the goodbye) are boxed so that
    /// they cost memory only while they run. A topic recovery held inline once took the whole
    /// connection task to 9.7 KB.
    #[test]
    fn the_session_loop_holds_only_what_waiting_needs() {
        let (ctx, _acks) = context(Duration::from_secs(30));
        let conn = connection();
        let (mut socket, _client) = pipe(1);
        let mut session = Session::new(&ctx, &conn, u64::MAX, Arc::from([]), false);
        let serve = session.serve(&mut socket);
        let size = std::mem::size_of_val(&serve);
        assert!(size <= 400, "the session loop's future is {size} bytes");
    }

    /// The whole connection's future, the loop's and everything the session keeps beside it
    /// (the socket, the state machine, the connection's handles): what tokio's task for an idle
    /// connection holds. tokio wraps it (tracked, 8 bytes more) in a 128-byte aligned cell with
    /// 136 bytes of its own, so at 880 bytes the cell is 1,024, a jemalloc size class; 8 bytes
    /// more and it is 1,152, in the 1,280 class: 256 bytes more per connection.
    #[test]
    fn a_connection_holds_its_socket_and_state_once() {
        fn returned<F, R>(_: &F) -> usize
        where
            F: Fn(WebSocket, Box<Opening>) -> R,
        {
            std::mem::size_of::<R>()
        }
        let size = returned(&run);
        assert!(size <= 880, "a connection's future is {size} bytes");
    }

    #[tokio::test]
    async fn a_client_that_closes_ends_the_session_without_a_code_of_ours() {
        let (ctx, _acks) = context(Duration::from_secs(30));
        let conn = connection();
        let (mut socket, mut client) = pipe(8);
        let mut session = Session::new(&ctx, &conn, u64::MAX, Arc::from([]), false);
        client.tx.unbounded_send(Message::Close(None)).unwrap();
        assert_eq!(session.serve(&mut socket).await, None);
        drop(socket);
        assert!(client.text().await.contains(r#""type":"hello""#));
        assert!(client.rx.next().await.is_none(), "nothing after the hello: the socket is dropped");
    }
}
