//! The receipt state machine: which state an event may move a receipt to. Pure data; the store
//! turns these rules into update filters.
//!
//! States are ranked `pending < expired < delivered < read` and only ever move up, so a late or
//! duplicate event can never move a receipt backwards. `expired → delivered` is allowed on
//! purpose: a gateway never delivers past the TTL, so an ack for an expired receipt means the
//! client did get the message in time and the receipt must say so (invariant 2).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptState {
    Pending,
    Expired,
    Delivered,
    Read,
}

impl ReceiptState {
    pub const ALL: [ReceiptState; 4] = [Self::Pending, Self::Expired, Self::Delivered, Self::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Expired => "expired",
            Self::Delivered => "delivered",
            Self::Read => "read",
        }
    }

    /// The states a receipt may be in for an event to move it to `self`.
    pub fn reachable_from(self) -> Vec<&'static str> {
        Self::ALL.into_iter().filter(|s| *s < self).map(Self::as_str).collect()
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
        for from in ReceiptState::ALL {
            for to in ReceiptState::ALL {
                let allowed = to.reachable_from().contains(&from.as_str());
                assert_eq!(allowed, from < to, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn pending_past_expiry_reads_expired() {
        assert_eq!(ReceiptState::Pending.effective(10, 10), ReceiptState::Expired);
        assert_eq!(ReceiptState::Pending.effective(11, 10), ReceiptState::Pending);
        assert_eq!(ReceiptState::Delivered.effective(1, 10), ReceiptState::Delivered);
    }
}
