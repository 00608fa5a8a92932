//! What a batch of client acks does to receipts, as data: which receipts (by user and message)
//! move to which state, from which states, and in what order. Pure; the store turns each
//! [`AckUpdate`] into one update statement, the event pipeline only decodes and applies.
//!
//! The rule (proto/README.md, "Acks"): an `ack` or `read` counts for the messages the gateway
//! sent that connection (`AckRecord::ids`): pending or expired receipts become `delivered` (a
//! gateway never sends past the expiry, so an expired receipt it sent was received in time),
//! and then `read` for a `read`. A `read` of a message the connection was not sent
//! (`read_unsent`) only turns an already `delivered` receipt into `read`. Every id is its own
//! user's: the user comes from the token, never from the frame.

use std::collections::HashSet;

use herald_proto::{AckKind, AckRecord, ConnectionId, GatewayId, MessageId, UserId};

use crate::receipt::ReceiptState;

/// Moves `user`'s receipts of `ids` to `to`, if they are in one of `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckUpdate {
    pub user: UserId,
    pub ids: Vec<MessageId>,
    pub to: ReceiptState,
    pub from: Vec<ReceiptState>,
    pub at_ms: i64,
    /// Who delivered it: set with `delivered`.
    pub by: Option<(ConnectionId, GatewayId)>,
}

impl AckUpdate {
    /// Roughly what this update weighs as a BSON statement, for packing commands by bytes.
    pub fn approx_bytes(&self) -> usize {
        200 + self.user.as_str().len() + self.ids.iter().map(|id| id.as_str().len() + 8).sum::<usize>()
    }
}

/// The updates for a batch of ack records, in the order they must be applied: every
/// `delivered` update before every `read` update, so a read of a message the same batch
/// delivers finds it delivered. An id appears at most once per user and target state (the
/// first record wins: the earliest ack names who delivered it), and records whose ids all
/// appeared already produce no update.
pub fn plan(records: &[AckRecord]) -> Vec<AckUpdate> {
    let mut delivered = Vec::new();
    let mut read = Vec::new();
    let mut seen: HashSet<(&UserId, &MessageId, ReceiptState)> = HashSet::new();
    for record in records {
        let by = Some((record.connection_id.clone(), record.gateway_id.clone()));
        let at_ms = i64::try_from(record.at_ms).unwrap_or(i64::MAX);
        let sent = dedup(&mut seen, &record.user, &record.ids, ReceiptState::Delivered);
        if !sent.is_empty() {
            delivered.push(AckUpdate {
                user: record.user.clone(),
                ids: sent,
                to: ReceiptState::Delivered,
                from: vec![ReceiptState::Pending, ReceiptState::Expired],
                at_ms,
                by,
            });
        }
        if record.kind == AckKind::Read {
            // A read of what this connection was sent may also take it from pending or expired
            // (the delivered update above runs first); a read of anything else needs it
            // delivered already, by another connection of the same user.
            let mut ids = dedup(&mut seen, &record.user, &record.ids, ReceiptState::Read);
            ids.extend(dedup(&mut seen, &record.user, &record.read_unsent, ReceiptState::Read));
            if !ids.is_empty() {
                read.push(AckUpdate {
                    user: record.user.clone(),
                    ids,
                    to: ReceiptState::Read,
                    from: vec![ReceiptState::Delivered],
                    at_ms,
                    by: None,
                });
            }
        }
    }
    delivered.extend(read);
    delivered
}

/// The ids of `ids` not seen before for `(user, to)`, each once.
fn dedup<'a>(
    seen: &mut HashSet<(&'a UserId, &'a MessageId, ReceiptState)>,
    user: &'a UserId,
    ids: &'a [MessageId],
    to: ReceiptState,
) -> Vec<MessageId> {
    ids.iter().filter(|id| seen.insert((user, id, to))).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MessageId {
        MessageId::new(s).unwrap()
    }

    fn record(user: &str, conn: &str, kind: AckKind, ids: &[&str], unsent: &[&str]) -> AckRecord {
        AckRecord {
            user: UserId::new(user).unwrap(),
            connection_id: ConnectionId::new(conn).unwrap(),
            gateway_id: GatewayId::new("gw").unwrap(),
            kind,
            ids: ids.iter().map(|s| id(s)).collect(),
            read_unsent: unsent.iter().map(|s| id(s)).collect(),
            at_ms: 5,
            traceparent: None,
        }
    }

    #[test]
    fn acks_deliver_and_reads_deliver_then_read() {
        let updates = plan(&[
            record("alice", "c1", AckKind::Delivered, &["m1", "m2"], &[]),
            record("alice", "c1", AckKind::Read, &["m3"], &[]),
        ]);
        assert_eq!(updates.len(), 3);
        assert_eq!((updates[0].to, updates[0].ids.clone()), (ReceiptState::Delivered, vec![id("m1"), id("m2")]));
        assert_eq!(updates[0].from, vec![ReceiptState::Pending, ReceiptState::Expired]);
        assert_eq!((updates[1].to, updates[1].ids.clone()), (ReceiptState::Delivered, vec![id("m3")]));
        assert_eq!((updates[2].to, updates[2].ids.clone()), (ReceiptState::Read, vec![id("m3")]));
        assert_eq!(updates[2].from, vec![ReceiptState::Delivered]);
        assert!(updates[2].by.is_none() && updates[0].by.is_some());
    }

    #[test]
    fn a_read_of_what_this_connection_was_not_sent_only_reads_what_is_delivered() {
        let updates = plan(&[record("alice", "c1", AckKind::Read, &[], &["m9"])]);
        assert_eq!(updates.len(), 1);
        assert_eq!((updates[0].to, updates[0].from.clone()), (ReceiptState::Read, vec![ReceiptState::Delivered]));
    }

    #[test]
    fn repeated_ids_collapse_per_user_and_the_first_ack_names_the_connection() {
        let flood: Vec<AckRecord> =
            (0..100).map(|n| record("alice", &format!("c{}", n % 5), AckKind::Delivered, &["m1", "m2"], &[])).collect();
        let mut records = flood;
        records.push(record("org/alice", "c9", AckKind::Delivered, &["m1"], &[]));
        let updates = plan(&records);
        assert_eq!(updates.len(), 2, "{updates:?}");
        assert_eq!(updates[0].by.as_ref().unwrap().0, "c0");
        assert_eq!(updates[1].user, "org/alice", "another user's ack of the same id is its own");
    }
}
