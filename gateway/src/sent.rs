//! What one connection was sent: the notifications written to its socket, and whether the
//! client has acked or read each. It is what makes a receipt's `delivered` true: only an ack of
//! a notification this connection was sent is passed on (proto/README.md, "Acks"), and each
//! only once, so no frame a client makes up can move a receipt, and no flood of repeats reaches
//! the store. Owned by the session task; no locks.
//!
//! It also keeps a connection from being written the same notification twice: a second copy
//! (the message routed live and found by the connection's replay as well) is left out, unless
//! the ack-timeout sweep sent it again ([`SentSet::repeats`]).
//!
//! Bounded: past [`SENT_REMEMBERED`] the oldest entry is forgotten. An ack of a forgotten
//! notification is ignored, so its receipt stays pending and it is sent again after the ack
//! timeout: forgetting costs a resend (or a duplicate), never a false receipt.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::registry::Sent;

/// Notifications remembered per connection.
pub(crate) const SENT_REMEMBERED: usize = 1024;

/// Where one notification stands on this connection. What was sent is kept only until the ack
/// (it is what the first ack reports); after that the id alone answers, so a busy connection
/// holds a few dozen bytes per notification it remembers rather than the whole record.
#[derive(Debug)]
enum Entry {
    Unacked(Arc<Sent>),
    Acked { read: bool },
}

/// What an ack of one id means on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Acked {
    /// Sent here and not acked before: pass it on. Carries what was sent, for the latency
    /// metrics and the trace.
    First(Arc<Sent>),
    /// Acked before: nothing more to say.
    Again,
    /// Never sent here (or forgotten): it cannot count.
    NotSent,
}

/// What a read of one id means on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// Sent here and not read before: may take the receipt to `delivered` and `read`.
    First { first_ack: Option<Arc<Sent>> },
    /// Read before.
    Again,
    /// Not sent here: it may only mark read what another connection delivered.
    NotSent,
}

#[derive(Debug, Default)]
pub(crate) struct SentSet {
    entries: HashMap<Arc<str>, Entry, foldhash::fast::RandomState>,
    /// Ids in the order first sent; always the same ids as `entries`.
    order: VecDeque<Arc<str>>,
    /// Entries not acked yet.
    unacked: usize,
}

impl SentSet {
    /// Records a notification written to the socket. A notification sent again (a resend) keeps
    /// its place and its flags: it was sent, and an ack already given still holds.
    pub(crate) fn record(&mut self, sent: Arc<Sent>) {
        if self.entries.contains_key(&sent.id) {
            return;
        }
        if self.order.len() >= SENT_REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                if matches!(self.entries.remove(&oldest), Some(Entry::Unacked(_))) {
                    self.unacked -= 1;
                }
            }
        }
        self.order.push_back(Arc::clone(&sent.id));
        self.entries.insert(Arc::clone(&sent.id), Entry::Unacked(sent));
        self.unacked += 1;
    }

    /// Notifications written and not acked (of those remembered): what a replay waits for
    /// before it asks for more than the set can hold.
    pub(crate) fn awaiting_ack(&self) -> usize {
        self.unacked
    }

    /// Whether writing `sent` would repeat a notification this connection was sent already,
    /// with nobody asking for it again: a live copy and a replay copy of the same message, or
    /// two replays. Only a resend (the ack timeout passed) goes out twice; an ack given for the
    /// first copy holds for both, and one not yet given is what the resend is for.
    pub(crate) fn repeats(&self, sent: &Sent) -> bool {
        !sent.resend && self.entries.contains_key(&sent.id)
    }

    pub(crate) fn ack(&mut self, id: &str) -> Acked {
        let Some(entry) = self.entries.get_mut(id) else { return Acked::NotSent };
        match std::mem::replace(entry, Entry::Acked { read: false }) {
            Entry::Unacked(sent) => {
                self.unacked -= 1;
                Acked::First(sent)
            }
            acked @ Entry::Acked { .. } => {
                *entry = acked;
                Acked::Again
            }
        }
    }

    pub(crate) fn read(&mut self, id: &str) -> Read {
        let Some(entry) = self.entries.get_mut(id) else { return Read::NotSent };
        match std::mem::replace(entry, Entry::Acked { read: true }) {
            Entry::Unacked(sent) => {
                self.unacked -= 1;
                Read::First { first_ack: Some(sent) }
            }
            Entry::Acked { read: false } => Read::First { first_ack: None },
            Entry::Acked { read: true } => Read::Again,
        }
    }

    #[cfg(test)]
    fn awaits_ack(&self, id: &str) -> bool {
        matches!(self.entries.get(id), Some(Entry::Unacked(_)))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(id: &str) -> Arc<Sent> {
        Arc::new(Sent::direct(id, u64::MAX))
    }

    fn resent(id: &str) -> Arc<Sent> {
        Arc::new(Sent { resend: true, ..(*sent(id)).clone() })
    }

    #[test]
    fn a_second_copy_is_left_out_unless_it_is_a_resend() {
        let mut set = SentSet::default();
        assert!(!set.repeats(&sent("m1")), "never sent: goes out");
        set.record(sent("m1"));
        assert!(set.repeats(&sent("m1")), "sent, not acked: a live and a replay copy go out once");
        assert!(!set.repeats(&resent("m1")), "the ack timeout asked for it again");
        assert!(matches!(set.ack("m1"), Acked::First(_)));
        assert!(set.repeats(&sent("m1")), "acked here: no second copy either");
        assert!(!set.repeats(&sent("m2")));
    }

    #[test]
    fn a_forgotten_notification_may_go_out_again() {
        let mut set = SentSet::default();
        for i in 0..=SENT_REMEMBERED {
            set.record(sent(&format!("m{i}")));
        }
        assert!(!set.repeats(&sent("m0")), "forgotten: a duplicate, never a loss");
        assert!(set.repeats(&sent(&format!("m{SENT_REMEMBERED}"))));
    }

    #[test]
    fn only_what_was_sent_can_be_acked_and_only_once() {
        let mut set = SentSet::default();
        set.record(sent("m1"));
        assert!(set.awaits_ack("m1"));
        assert_eq!(set.ack("m2"), Acked::NotSent);
        assert!(matches!(set.ack("m1"), Acked::First(_)));
        assert_eq!(set.ack("m1"), Acked::Again);
        assert!(!set.awaits_ack("m1"));
        set.record(sent("m1"));
        assert_eq!(set.ack("m1"), Acked::Again, "a resend keeps the ack already given");
    }

    #[test]
    fn what_was_sent_is_let_go_once_acked_or_read() {
        let mut set = SentSet::default();
        let (acked, read) = (sent("m1"), sent("m2"));
        set.record(Arc::clone(&acked));
        set.record(Arc::clone(&read));
        assert_eq!(Arc::strong_count(&acked), 2, "held until the ack");
        let Acked::First(first) = set.ack("m1") else { panic!("a first ack") };
        drop(first);
        assert!(matches!(set.read("m2"), Read::First { first_ack: Some(_) }));
        assert_eq!((Arc::strong_count(&acked), Arc::strong_count(&read)), (1, 1), "only the ids are kept");
        assert!(set.repeats(&sent("m1")) && set.repeats(&sent("m2")), "still no second copy");
        assert_eq!(set.ack("m1"), Acked::Again);
        assert_eq!(set.read("m1"), Read::First { first_ack: None });
        assert_eq!(set.read("m1"), Read::Again);
    }

    #[test]
    fn a_read_of_an_unacked_notification_acks_it_too() {
        let mut set = SentSet::default();
        set.record(sent("m1"));
        set.record(sent("m2"));
        assert!(matches!(set.read("m1"), Read::First { first_ack: Some(_) }));
        assert_eq!(set.ack("m1"), Acked::Again);
        assert!(matches!(set.ack("m2"), Acked::First(_)));
        assert_eq!(set.read("m2"), Read::First { first_ack: None });
        assert_eq!(set.read("m2"), Read::Again);
        assert_eq!(set.read("elsewhere"), Read::NotSent);
    }

    #[test]
    fn what_awaits_an_ack_is_counted() {
        let mut set = SentSet::default();
        for i in 0..5 {
            set.record(sent(&format!("m{i}")));
        }
        set.record(sent("m0"));
        assert_eq!(set.awaiting_ack(), 5, "a resend is not counted twice");
        set.ack("m0");
        set.ack("m0");
        let _ = set.read("m1");
        let _ = set.read("elsewhere");
        assert_eq!(set.awaiting_ack(), 3);
        for i in 5..SENT_REMEMBERED + 3 {
            set.record(sent(&format!("m{i}")));
        }
        // m0 and m1 (acked) and m2 (not) were forgotten; all the others await an ack.
        assert_eq!(set.awaiting_ack(), SENT_REMEMBERED);
    }

    #[test]
    fn the_oldest_is_forgotten_past_the_bound() {
        let mut set = SentSet::default();
        for i in 0..SENT_REMEMBERED + 10 {
            set.record(sent(&format!("m{i}")));
        }
        assert_eq!(set.len(), SENT_REMEMBERED);
        assert_eq!(set.ack("m0"), Acked::NotSent);
        assert!(matches!(set.ack(&format!("m{}", SENT_REMEMBERED + 9)), Acked::First(_)));
    }
}
