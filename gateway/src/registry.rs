//! The gateway's local table of open connections: who is connected here, and the queue that
//! feeds each socket. Deliveries look users up here; sessions add and remove themselves.
//!
//! Each connection's outbound queue is bounded. When a delivery finds it full, the client is
//! reading too slowly: it is closed with [`close::SLOW_CONSUMER`] and whatever it did not ack
//! stays pending in the store for its next connection. Nothing waits on a slow client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use herald_proto::{close, ConnectionId, UserId};

use crate::outbox::{Outbox, PushError};
use crate::replay::PageEnd;

/// What a connection's queue holds.
#[derive(Debug, Clone)]
pub(crate) enum Outbound {
    /// A frame for the socket. Notifications carry what the session needs to measure
    /// publish→deliver and publish→ack latency; the frame text itself is shared by every
    /// connection it goes to.
    Frame {
        frame: Utf8Bytes,
        /// Shared by every connection the notification goes to; small, because every queue slot
        /// of every connection holds one.
        sent: Option<Arc<Sent>>,
    },
    /// The end of a replay page, queued behind its frames: once the session takes it, the
    /// whole page has left the queue (see [`crate::replay`]). Nothing is written for it.
    PageEnd(PageEnd),
}

/// Which notification a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    /// The notification's [`herald_proto::MessageId`], shared rather than copied per connection.
    pub(crate) id: Arc<str>,
    pub(crate) published_at_ms: u64,
    /// A frame still queued at this instant is not written: nothing goes out past its expiry.
    pub(crate) expires_at_ms: u64,
    pub(crate) replay: bool,
    /// Sent again by the ack-timeout sweep: written even to a connection that was sent it.
    pub(crate) resend: bool,
    /// The delivery span's trace context, when traces are exported.
    pub(crate) traceparent: Option<Arc<str>>,
    /// A topic message's topic: its ack is counted for the topic message's aggregate receipt,
    /// and it never counts among the direct notifications awaiting an ack.
    pub(crate) topic: Option<herald_proto::TopicName>,
}

#[cfg(test)]
impl Sent {
    /// A direct notification's record as tests need it: not a replay, resend or topic message.
    pub(crate) fn direct(id: &str, expires_at_ms: u64) -> Self {
        Self {
            id: id.into(),
            published_at_ms: 0,
            expires_at_ms,
            replay: false,
            resend: false,
            traceparent: None,
            topic: None,
        }
    }
}

#[cfg(test)]
impl Outbound {
    pub(crate) fn control(frame: Utf8Bytes) -> Self {
        Self::Frame { frame, sent: None }
    }

    /// The frame's text; None for a page end.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Self::Frame { frame, .. } => Some(frame.as_str()),
            Self::PageEnd(_) => None,
        }
    }
}

/// One open WebSocket, as the rest of the gateway sees it.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) id: ConnectionId,
    pub(crate) user: UserId,
    /// Pre-serialized frames for the socket, drained by the session task, which closes it when
    /// the socket ends.
    pub(crate) outbox: Outbox<Outbound>,
    /// The close code the session is asked to close with from outside (slow consumer, drain,
    /// kick); 0 until then. The session learns of it through the outbox's wake-up, so a
    /// connection carries no cancellation token of its own.
    kick: AtomicU16,
    /// Set by the presence task once Redis has this connection; until then its registration
    /// is still queued, and the heartbeat's check for lost presence leaves it alone.
    registered: AtomicBool,
    /// The connection's place in the gateway's limits, freed with the connection. Kept here
    /// rather than in the session's future: every idle connection holds that future, and the
    /// pointer fits this allocation's size class as it is.
    _admission: Option<Admission>,
}

impl Connection {
    pub(crate) fn new(id: ConnectionId, user: UserId, queue: usize) -> Self {
        Self {
            id,
            user,
            outbox: Outbox::new(queue),
            kick: AtomicU16::new(NOT_KICKED),
            registered: AtomicBool::new(false),
            _admission: None,
        }
    }

    /// This connection, holding its place in the gateway's limits until it is dropped.
    pub(crate) fn admitted(self, admission: Admission) -> Self {
        Self { _admission: Some(admission), ..self }
    }

    pub(crate) fn mark_registered(&self) {
        self.registered.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Queues a frame without waiting. Returns false (and closes the connection as a slow
    /// consumer) when the queue is full; false also when the session has already ended.
    pub(crate) fn offer(&self, frame: Outbound) -> bool {
        match self.outbox.push(frame) {
            Ok(()) => true,
            Err(PushError::Full) => {
                self.close_with(close::SLOW_CONSUMER);
                false
            }
            Err(PushError::Closed) => false,
        }
    }

    /// Queues the end of a replay page behind its frames. It goes in even when the page filled
    /// the queue to the brim: it is one small item per page, and a connection asks for its next
    /// page only after taking this one, so there is at most one (or one per page sent twice).
    pub(crate) fn end_page(&self, end: PageEnd) {
        // Closed: the session has ended, and its replay with it.
        let _ = self.outbox.push_past_capacity(Outbound::PageEnd(end));
    }

    /// Asks the session to close with `code`; the first reason given wins.
    pub(crate) fn close_with(&self, code: u16) {
        debug_assert_ne!(code, NOT_KICKED, "a close code is never 0");
        if self.kick.compare_exchange(NOT_KICKED, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.outbox.wake();
        }
    }

    /// The close code the session was asked to close with, if it was.
    pub(crate) fn kicked(&self) -> Option<u16> {
        Some(self.kick.load(Ordering::Acquire)).filter(|&code| code != NOT_KICKED)
    }

    /// What the session does next: close, if it was asked to, or write what is queued; waits
    /// for either. Cancel-safe: an item is taken only in the poll that returns it.
    pub(crate) async fn next(&self) -> Next {
        loop {
            if let Some(code) = self.kicked() {
                return Next::Kick(code);
            }
            if let Some(item) = self.outbox.try_pop() {
                return Next::Write(item);
            }
            self.outbox.changed().await;
        }
    }

    /// Waits until the session is asked to close; for a session busy writing, which does not
    /// take from the queue meanwhile. Written out rather than shared with [`Self::next`]
    /// through a generic helper: that one's closure made every connection's future larger.
    pub(crate) async fn until_kicked(&self) -> u16 {
        loop {
            if let Some(code) = self.kicked() {
                return code;
            }
            self.outbox.changed().await;
        }
    }
}

/// [`Connection::kick`] before anyone asked the session to close.
const NOT_KICKED: u16 = 0;

/// What a session's queue has for it.
#[derive(Debug)]
pub(crate) enum Next {
    /// Close with this code.
    Kick(u16),
    Write(Outbound),
}

/// Why a new connection cannot be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdmitError {
    #[error("this gateway holds its maximum number of connections")]
    GatewayFull,
    #[error("this user holds its maximum number of connections")]
    UserLimit,
}

/// Connections by user. Hashed with foldhash rather than SipHash: a fan-out looks up thousands of
/// users per command, and SipHash was 7 % of the gateway's CPU in the delivery benchmark. Its
/// weaker DoS resistance is enough here: every key is a user name signed into a token by the
/// backend, not a string a client picks.
type ByUser = HashMap<UserId, Vec<Arc<Connection>>, foldhash::fast::RandomState>;

#[derive(Debug)]
pub(crate) struct Registry {
    by_user: RwLock<ByUser>,
    /// Connections admitted, including those still completing their upgrade.
    admitted: AtomicUsize,
    max_total: usize,
    max_per_user: usize,
    /// The close code every connection is asked to close with, once the gateway closes them all
    /// ([`Self::close_all`]); [`NOT_KICKED`] until then. Read and set under the map's write lock,
    /// so that no connection inserted meanwhile is missed.
    closing: AtomicU16,
}

/// A place held for a connection between the HTTP check and the end of its session. Dropping it
/// frees the place.
#[derive(Debug)]
pub(crate) struct Admission {
    registry: Arc<Registry>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.registry.admitted.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    pub(crate) fn new(max_total: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            by_user: RwLock::default(),
            admitted: AtomicUsize::new(0),
            max_total,
            max_per_user,
            closing: AtomicU16::new(NOT_KICKED),
        })
    }

    /// Holds a place for a new connection of `user`, or says why there is none. The per-user
    /// check counts open connections, so a burst of simultaneous upgrades may pass it together.
    pub(crate) fn admit(self: &Arc<Self>, user: &UserId) -> Result<Admission, AdmitError> {
        if self.admitted.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.admitted.fetch_sub(1, Ordering::Relaxed);
            return Err(AdmitError::GatewayFull);
        }
        let admission = Admission { registry: Arc::clone(self) };
        if self.read().get(user).is_some_and(|conns| conns.len() >= self.max_per_user) {
            return Err(AdmitError::UserLimit);
        }
        Ok(admission)
    }

    /// Adds a connection; one inserted after [`Self::close_all`] is asked to close at once.
    pub(crate) fn insert(&self, conn: Arc<Connection>) {
        let mut map = self.write();
        let closing = self.closing.load(Ordering::Relaxed);
        if closing != NOT_KICKED {
            conn.close_with(closing);
        }
        map.entry(conn.user.clone()).or_default().push(conn);
    }

    /// Asks every connection to close with `code`, and every one inserted from now on: the end
    /// of a drain, for the sessions still open and for any upgrade still completing. This is how
    /// a session learns of the shutdown (through its kick, which it waits on anyway), so that no
    /// idle connection holds a wait of its own for it.
    pub(crate) fn close_all(&self, code: u16) {
        let map = self.write();
        self.closing.store(code, Ordering::Relaxed);
        for conn in map.values().flatten() {
            conn.close_with(code);
        }
    }

    pub(crate) fn remove(&self, conn: &Connection) {
        let mut map = self.write();
        if let Some(conns) = map.get_mut(&conn.user) {
            conns.retain(|c| c.id != conn.id);
            if conns.is_empty() {
                map.remove(&conn.user);
            }
        }
    }

    /// Offers `frame` to every local connection of each of `users`; returns how many took it.
    /// One read lock for the whole list: a fan-out names thousands of users per gateway.
    pub(crate) fn deliver_to_users(&self, users: &[UserId], frame: &Outbound) -> usize {
        let map = self.read();
        users.iter().filter_map(|user| map.get(user)).flatten().filter(|conn| conn.offer(frame.clone())).count()
    }

    /// Asks every local connection of `user` to close with `code`; returns how many there were.
    pub(crate) fn close_user(&self, user: &UserId, code: u16) -> usize {
        let map = self.read();
        let conns = map.get(user).map(Vec::as_slice).unwrap_or_default();
        for conn in conns {
            conn.close_with(code);
        }
        conns.len()
    }

    pub(crate) fn connection(&self, user: &UserId, connection_id: &ConnectionId) -> Option<Arc<Connection>> {
        self.read().get(user)?.iter().find(|c| c.id == *connection_id).cloned()
    }

    /// Every open connection, for presence resync and drain.
    pub(crate) fn all(&self) -> Vec<Arc<Connection>> {
        self.read().values().flatten().cloned().collect()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.read().values().map(Vec::len).sum()
    }

    // A poisoned lock means a panic while holding it; the map itself is still consistent
    // because every critical section above is a single, panic-free map operation.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, ByUser> {
        self.by_user.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ByUser> {
        self.by_user.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str, user: &str, cap: usize) -> (Arc<Connection>, ()) {
        (Arc::new(Connection::new(ConnectionId::new(id).unwrap(), UserId::new(user).unwrap(), cap)), ())
    }

    #[test]
    fn delivers_to_every_device_of_a_user_only() {
        let reg = Registry::new(10, 10);
        let (a1, ()) = conn("a1", "alice", 4);
        let (a2, ()) = conn("a2", "alice", 4);
        let (b1, ()) = conn("b1", "bob", 4);
        reg.insert(Arc::clone(&a1));
        reg.insert(Arc::clone(&a2));
        reg.insert(Arc::clone(&b1));
        assert_eq!(
            reg.deliver_to_users(&[UserId::new("alice").unwrap()], &Outbound::control(Utf8Bytes::from_static("x"))),
            2
        );
        assert!(a1.outbox.try_pop().is_some() && a2.outbox.try_pop().is_some());
        assert!(b1.outbox.try_pop().is_none());
        assert_eq!(
            reg.deliver_to_users(&[UserId::new("carol").unwrap()], &Outbound::control(Utf8Bytes::from_static("x"))),
            0
        );
    }

    /// A kick reaches a session waiting on its queue: there is no other wake-up to give it.
    #[tokio::test]
    async fn a_kick_wakes_the_waiting_session() {
        let (a, ()) = conn("a1", "alice", 4);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { matches!(a.next().await, Next::Kick(close::KICKED)) }
        });
        tokio::task::yield_now().await;
        a.close_with(close::KICKED);
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert!(woken.expect("the kick woke the session").unwrap());
    }

    /// A kick comes before what is still queued, and the first reason given stays.
    #[tokio::test]
    async fn a_kick_goes_ahead_of_the_queue_and_keeps_its_first_reason() {
        let (a, ()) = conn("a1", "alice", 4);
        assert!(a.offer(Outbound::control(Utf8Bytes::from_static("x"))));
        a.close_with(close::KICKED);
        a.close_with(close::SERVICE_RESTART);
        assert!(matches!(a.next().await, Next::Kick(close::KICKED)));
        assert_eq!(a.kicked(), Some(close::KICKED));
    }

    #[test]
    fn a_full_queue_closes_the_slow_consumer_without_blocking() {
        let reg = Registry::new(10, 10);
        let (a, ()) = conn("a", "alice", 1);
        reg.insert(Arc::clone(&a));
        assert_eq!(
            reg.deliver_to_users(&[UserId::new("alice").unwrap()], &Outbound::control(Utf8Bytes::from_static("1"))),
            1
        );
        assert_eq!(
            reg.deliver_to_users(&[UserId::new("alice").unwrap()], &Outbound::control(Utf8Bytes::from_static("2"))),
            0
        );
        assert_eq!(a.kicked(), Some(close::SLOW_CONSUMER));
    }

    /// The end of a drain reaches every session, the ones whose upgrade completes after it
    /// included: a session no longer waits on a shutdown signal of its own.
    #[test]
    fn closing_all_reaches_open_connections_and_later_ones() {
        let reg = Registry::new(10, 10);
        let (a, ()) = conn("a", "alice", 1);
        let (b, ()) = conn("b", "bob", 1);
        reg.insert(Arc::clone(&a));
        assert_eq!(b.kicked(), None);
        reg.close_all(close::SERVICE_RESTART);
        assert_eq!(a.kicked(), Some(close::SERVICE_RESTART));
        reg.insert(Arc::clone(&b));
        assert_eq!(b.kicked(), Some(close::SERVICE_RESTART), "inserted after the close");
    }

    #[test]
    fn admission_enforces_both_limits_and_frees_places() {
        let reg = Registry::new(2, 1);
        let first = reg.admit(&UserId::new("alice").unwrap()).unwrap();
        let (a, ()) = conn("a", "alice", 1);
        reg.insert(Arc::clone(&a));
        assert_eq!(reg.admit(&UserId::new("alice").unwrap()).unwrap_err(), AdmitError::UserLimit);
        let second = reg.admit(&UserId::new("bob").unwrap()).unwrap();
        assert_eq!(reg.admit(&UserId::new("carol").unwrap()).unwrap_err(), AdmitError::GatewayFull);
        drop(second);
        assert!(reg.admit(&UserId::new("carol").unwrap()).is_ok());
        reg.remove(&a);
        drop(first);
        assert_eq!(reg.len(), 0);
    }
}
