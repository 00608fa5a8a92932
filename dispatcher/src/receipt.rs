//! The receipt state machine: which state an event may move a receipt to. Pure data; the store
//! turns these rules into update filters.
//!
//! States are ranked `pending < expired < delivered < read` and only ever move up, so a late or
//! duplicate event can never move a receipt backwards. `expired → delivered` is allowed on
//! purpose: a gateway never delivers past the TTL, so an ack for an expired receipt means the
//! client did get the message in time and the receipt must say so (invariant 2).
//!
//! `cancelled` stands outside that order: an operator's cancel moves a `pending` receipt there,
//! and nothing moves it anywhere else. The sweep, the replay and routing read only `pending`
//! receipts, so a cancelled one is never sent again, and an ack (which moves only `pending`,
//! `expired` and `delivered` receipts) never makes it `delivered`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptState {
    Pending,
    Expired,
    Delivered,
    Read,
    /// Cancelled by an operator while pending: never delivered afterwards. Terminal.
    Cancelled,
}

impl ReceiptState {
    pub const ALL: [ReceiptState; 5] = [Self::Pending, Self::Expired, Self::Delivered, Self::Read, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Expired => "expired",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Cancelled => "cancelled",
        }
    }

    /// The states a receipt may be in for an event to move it to `self`: the ranked states
    /// below it, and only `pending` for `cancelled`. Nothing leaves `cancelled`.
    pub fn reachable_from(self) -> Vec<&'static str> {
        match self {
            Self::Cancelled => vec![Self::Pending.as_str()],
            to => Self::ALL.into_iter().filter(|s| *s != Self::Cancelled && *s < to).map(Self::as_str).collect(),
        }
    }

    /// What an observer should be told: a pending receipt past its expiry is expired even
    /// before the sweeper has written so.
    pub fn effective(self, expires_at_ms: u64, now_ms: u64) -> Self {
        if self == Self::Pending && expires_at_ms <= now_ms {
            Self::Expired
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_only_move_forward() {
        assert_eq!(ReceiptState::Pending.reachable_from(), Vec::<&str>::new());
        assert_eq!(ReceiptState::Expired.reachable_from(), vec!["pending"]);
        assert_eq!(ReceiptState::Delivered.reachable_from(), vec!["pending", "expired"]);
        assert_eq!(ReceiptState::Read.reachable_from(), vec!["pending", "expired", "delivered"]);
        let ranked = &ReceiptState::ALL[..4];
        for from in ranked {
            for to in ranked {
                let allowed = to.reachable_from().contains(&from.as_str());
                assert_eq!(allowed, from < to, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn only_a_pending_receipt_is_cancelled_and_a_cancelled_one_stays() {
        assert_eq!(ReceiptState::Cancelled.reachable_from(), vec!["pending"]);
        for to in ReceiptState::ALL {
            assert!(!to.reachable_from().contains(&"cancelled"), "cancelled -> {to:?}");
        }
        // The ack rules name their source states; cancelled is never one of them.
        for update in crate::acks::plan(&[herald_proto::AckRecord {
            user: herald_proto::UserId::new("u").unwrap(),
            connection_id: herald_proto::ConnectionId::new("c").unwrap(),
            gateway_id: herald_proto::GatewayId::new("g").unwrap(),
            kind: herald_proto::AckKind::Read,
            ids: vec![herald_proto::MessageId::new("m").unwrap()],
            read_unsent: vec![],
            at_ms: 1,
            traceparent: None,
        }]) {
            assert!(!update.from.contains(&ReceiptState::Cancelled), "{update:?}");
        }
        assert_eq!(ReceiptState::Cancelled.effective(1, 10), ReceiptState::Cancelled);
    }

    #[test]
    fn pending_past_expiry_reads_expired() {
        assert_eq!(ReceiptState::Pending.effective(10, 10), ReceiptState::Expired);
        assert_eq!(ReceiptState::Pending.effective(11, 10), ReceiptState::Pending);
        assert_eq!(ReceiptState::Delivered.effective(1, 10), ReceiptState::Delivered);
    }
}
