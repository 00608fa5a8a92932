//! The budget of plain HTTP connections (everything not yet handed to a WebSocket session), and
//! which one gives way when it is full.
//!
//! A connection is *waiting* once it has read everything its client sent and wants more while
//! no request of its is being served: an idle socket, a keep-alive connection between requests,
//! a drip-fed request head. When the budget is full, a newcomer takes the place of the oldest
//! waiting connection, which is closed. So idle sockets cannot lock out a health probe or a real
//! client: they only shorten each other's lives. A connection not yet polled (its request may
//! already be in the socket, as in a reconnect storm), one being served and one upgrading never
//! give way; when every place is taken by those, the newcomer is refused instead.
//!
//! This module keeps the book; the listener (`serve.rs`) reports each connection's phase and
//! closes the connection whose token fires.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where a connection is in its life, as far as giving way goes.
const FRESH: u8 = 0;
const WAITING: u8 = 1;
const BUSY: u8 = 2;
const UPGRADING: u8 = 3;
const EVICTED: u8 = 4;

/// One connection's phase and activity, shared by its socket wrapper, its service and the set.
#[derive(Debug)]
pub(crate) struct Activity {
    phase: AtomicU8,
    /// When the connection was accepted; `last_progress_ms` counts from it.
    born: Instant,
    last_progress_ms: AtomicU64,
    /// Cancelled when the connection must give way; its task closes it.
    evict: CancellationToken,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            phase: AtomicU8::new(FRESH),
            born: now,
            last_progress_ms: AtomicU64::new(0),
            evict: CancellationToken::new(),
        }
    }

    /// The socket moved a byte.
    pub(crate) fn progressed(&self) {
        self.last_progress_ms.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A read found nothing more to read. Only a connection between requests becomes waiting.
    pub(crate) fn read_would_block(&self) {
        let _ = self.phase.compare_exchange(FRESH, WAITING, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// A request is being served: the connection does not give way until its response is done.
    /// False when it has already been told to give way.
    pub(crate) fn request_started(&self) -> bool {
        self.phase.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| (p <= WAITING).then_some(BUSY)).is_ok()
    }

    /// The response is done; the connection may wait for the next request.
    pub(crate) fn request_ended(&self) {
        let _ = self.phase.compare_exchange(BUSY, FRESH, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The response switches protocols: the socket is about to leave for a WebSocket session.
    pub(crate) fn upgrading(&self) {
        let _ = self.phase.compare_exchange(BUSY, UPGRADING, Ordering::AcqRel, Ordering::Relaxed);
    }

    pub(crate) fn is_upgrading(&self) -> bool {
        self.phase.load(Ordering::Acquire) == UPGRADING
    }

    /// When the connection will have been without progress for `idle`.
    pub(crate) fn idle_deadline(&self, idle: std::time::Duration) -> Instant {
        self.born + std::time::Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed)) + idle
    }

    /// Resolves when the connection must give way.
    pub(crate) async fn evicted(&self) {
        self.evict.cancelled().await;
    }

    /// Marks a waiting connection as giving way; false if it is no longer waiting.
    fn try_evict(&self) -> bool {
        let evicted = self.phase.compare_exchange(WAITING, EVICTED, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if evicted {
            self.evict.cancel();
        }
        evicted
    }

    fn is_evicted(&self) -> bool {
        self.phase.load(Ordering::Acquire) == EVICTED
    }
}

/// The connections holding a place, oldest first.
#[derive(Debug)]
pub(crate) struct PendingSet {
    cap: usize,
    /// Connections told to give way that have not closed yet: each still holds its descriptor,
    /// so at most this many are allowed at once on top of `cap`.
    slack: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By accept order; includes the evicted ones until they close.
    slots: BTreeMap<u64, Arc<Activity>>,
    next_id: u64,
    evicting: usize,
}

/// What became of a newcomer.
#[derive(Debug)]
pub(crate) enum Admission {
    /// It has a place.
    Placed(Place),
    /// It has the place of the oldest waiting connection, which is being closed.
    Displaced(Place),
    /// Every place is taken by connections that may not give way: close the newcomer.
    Full,
}

/// A connection's place in the set, given back on drop.
#[derive(Debug)]
pub(crate) struct Place {
    set: Arc<PendingSet>,
    id: u64,
    activity: Arc<Activity>,
}

impl Place {
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.set.lock();
        inner.slots.remove(&self.id);
        if self.activity.is_evicted() {
            inner.evicting -= 1;
        }
    }
}

impl PendingSet {
    /// At most `cap` connections, plus up to `slack` closing after giving way.
    pub(crate) fn new(cap: usize, slack: usize) -> Arc<Self> {
        Arc::new(Self { cap, slack, inner: Mutex::default() })
    }

    /// Finds a place for a connection accepted at `now`.
    pub(crate) fn admit(self: &Arc<Self>, now: Instant) -> Admission {
        let mut inner = self.lock();
        let live = inner.slots.len() - inner.evicting;
        let displaced = if live < self.cap {
            false
        } else if inner.evicting < self.slack && inner.slots.values().any(|a| a.try_evict()) {
            // `any` stops at the first (oldest) connection that gives way.
            inner.evicting += 1;
            true
        } else {
            return Admission::Full;
        };
        let id = inner.next_id;
        inner.next_id += 1;
        let activity = Arc::new(Activity::new(now));
        inner.slots.insert(id, Arc::clone(&activity));
        let place = Place { set: Arc::clone(self), id, activity };
        if displaced {
            Admission::Displaced(place)
        } else {
            Admission::Placed(place)
        }
    }

    /// Places taken, the closing ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().slots.len()
    }

    // Every critical section is a few map operations that cannot panic halfway.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(admission: Admission) -> Place {
        match admission {
            Admission::Placed(place) | Admission::Displaced(place) => place,
            Admission::Full => panic!("no place"),
        }
    }

    #[test]
    fn fills_up_to_the_cap_then_refuses_connections_that_may_not_give_way() {
        let set = PendingSet::new(3, 8);
        let now = Instant::now();
        let a = place(set.admit(now));
        let b = place(set.admit(now));
        let _c = place(set.admit(now));
        // Not polled yet (a reconnect storm's requests may already be in their sockets), being
        // served, upgrading: none of these gives way.
        assert!(b.activity().request_started());
        assert!(a.activity().request_started());
        a.activity().upgrading();
        assert!(matches!(set.admit(now), Admission::Full));
        assert_eq!(set.len(), 3);
        drop(b);
        assert!(matches!(set.admit(now), Admission::Placed(_)), "a closed connection frees its place");
    }

    #[test]
    fn the_oldest_waiting_connection_gives_way_to_a_newcomer() {
        let set = PendingSet::new(3, 8);
        let now = Instant::now();
        let busy = place(set.admit(now));
        let old = place(set.admit(now));
        let young = place(set.admit(now));
        assert!(busy.activity().request_started());
        old.activity().read_would_block();
        young.activity().read_would_block();
        let newcomer = match set.admit(now) {
            Admission::Displaced(place) => place,
            other => panic!("{other:?}"),
        };
        assert!(old.activity().evict.is_cancelled(), "the oldest waiting one gives way");
        assert!(!young.activity().evict.is_cancelled() && !busy.activity().evict.is_cancelled());
        // Told to give way, it cannot start a request any more.
        assert!(!old.activity().request_started());
        assert_eq!(set.len(), 4, "the evicted one holds its place until it closes");
        drop(old);
        assert_eq!(set.len(), 3);
        // Between requests, a served connection waits again and may give way.
        busy.activity().request_ended();
        busy.activity().read_would_block();
        assert!(matches!(set.admit(now), Admission::Displaced(_)));
        assert!(busy.activity().evict.is_cancelled());
        drop(newcomer);
    }

    #[test]
    fn connections_still_closing_are_bounded_by_the_slack() {
        let set = PendingSet::new(2, 1);
        let now = Instant::now();
        let places: Vec<Place> = (0..2).map(|_| place(set.admit(now))).collect();
        for p in &places {
            p.activity().read_would_block();
        }
        let third = set.admit(now);
        assert!(matches!(third, Admission::Displaced(_)));
        // The first is still closing: no second eviction until it has.
        assert!(matches!(set.admit(now), Admission::Full));
        assert_eq!(set.len(), 3, "never more than cap + slack descriptors");
        let mut places = places.into_iter();
        drop(places.next());
        assert!(matches!(set.admit(now), Admission::Displaced(_)), "the second waiting one gives way now");
    }
}
