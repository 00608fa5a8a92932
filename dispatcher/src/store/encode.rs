//! What the store writes, serialized straight to BSON from borrowed data: a batch's claims and
//! receipts, the `insert` commands that carry them, and the `update` command of a batch of
//! acks. Built as `Document`s first, a receipt cost ~40 allocations and an ack statement ~80
//! (an `IndexMap` and a `String` per key, then the copy into raw BSON); each type here writes
//! exactly what that did, held to it by the tests.

use herald_proto::{ConnectionId, GatewayId, MessageId, UserId};
use herald_shared::naming::collections;
use mongodb::bson::DateTime;
use mongodb::options::WriteConcern;
use serde::Serialize;

use super::{receipt_key, StoreError};
use crate::acks::AckUpdate;
use crate::receipt::ReceiptState;

/// A document of the receipts collection as the insert of a batch writes it: a job's claim or
/// one of its receipts, borrowed from the job.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum NewInboxDoc<'a> {
    Claim(NewClaim<'a>),
    Receipt(NewReceipt<'a>),
}

/// A [`ClaimDoc`] as inserted: the same fields, in the same order.
#[derive(Debug, Serialize)]
pub(super) struct NewClaim<'a> {
    #[serde(rename = "_id")]
    pub(super) id: &'a MessageId,
    pub(super) digest: &'a str,
    pub(super) purge_at: DateTime,
}

/// A new pending [`ReceiptDoc`] as inserted: the same fields, in the same order, those a new
/// receipt does not have left out (as `ReceiptDoc` skips them when None). A unit test holds
/// the two to the same bytes.
#[derive(Debug, Serialize)]
pub(super) struct NewReceipt<'a> {
    #[serde(rename = "_id")]
    pub(super) id: ReceiptKey<'a>,
    pub(super) message_id: &'a MessageId,
    pub(super) user: &'a UserId,
    pub(super) part: i32,
    pub(super) seq: i64,
    pub(super) state: ReceiptState,
    pub(super) created_at: DateTime,
    pub(super) expires_at: DateTime,
    pub(super) next_retry_at_ms: i64,
    pub(super) purge_at: DateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) inline: Option<NewInline<'a>>,
}

/// An [`InlineMessage`] as inserted.
#[derive(Debug, Serialize)]
pub(super) struct NewInline<'a> {
    pub(super) payload: &'a str,
    pub(super) published_at: DateTime,
}

/// [`receipt_key`] of the pair, written as the string it makes.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReceiptKey<'a>(pub(super) &'a MessageId, pub(super) &'a UserId);

impl Serialize for ReceiptKey<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&receipt_key(self.0, self.1))
    }
}

/// The unordered `insert` command of `documents` into `collection`, with `write_concern` (see
/// [`ack_command`]), serialized straight to BSON in one buffer. Through `insert_many`, the
/// driver also gave each document a buffer of its own and kept its `_id` in a map of inserted
/// ids that nothing read.
pub(super) fn insert_command<T: Serialize>(
    collection: &str,
    documents: &[(T, usize)],
    write_concern: Option<&WriteConcern>,
) -> Result<mongodb::bson::RawDocumentBuf, StoreError> {
    let command = InsertCommand { insert: collection, documents: Items(documents), ordered: false, write_concern };
    Ok(mongodb::bson::to_raw_document_buf(&command)?)
}

#[derive(Serialize)]
struct InsertCommand<'a, T: Serialize> {
    insert: &'a str,
    documents: Items<'a, T>,
    ordered: bool,
    #[serde(rename = "writeConcern", skip_serializing_if = "Option::is_none")]
    write_concern: Option<&'a WriteConcern>,
}

/// Items paired with their approximate size (as `store::pack` takes them), written as the items.
struct Items<'a, T>(&'a [(T, usize)]);

impl<T: Serialize> Serialize for Items<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(item, _)| item))
    }
}

/// The `update` command for these [`AckUpdate`]s, one statement each, in order (ordered, so a
/// read's "delivered" statement lands before its "read" one), serialized straight to BSON:
/// built as `Document`s, a statement cost ~80 allocations. It carries `write_concern`, the
/// database's: a command run as such gets none from the driver, and would be acknowledged at the
/// server's default instead of what the URI or Herald's default (`majority`) asks.
pub(super) fn ack_command(
    statements: &[(&AckUpdate, usize)],
    write_concern: Option<&WriteConcern>,
) -> Result<mongodb::bson::RawDocumentBuf, StoreError> {
    let command =
        AckCommand { update: collections::RECEIPTS, updates: AckStatements(statements), ordered: true, write_concern };
    Ok(mongodb::bson::to_raw_document_buf(&command)?)
}

#[derive(Serialize)]
struct AckCommand<'a> {
    update: &'a str,
    updates: AckStatements<'a>,
    ordered: bool,
    #[serde(rename = "writeConcern", skip_serializing_if = "Option::is_none")]
    write_concern: Option<&'a WriteConcern>,
}

struct AckStatements<'a>(&'a [(&'a AckUpdate, usize)]);

impl Serialize for AckStatements<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(update, _)| AckStatement::of(update)))
    }
}

/// The update statement for one [`AckUpdate`]: by key and by user, and only from the states
/// the receipt rules allow.
#[derive(Serialize)]
struct AckStatement<'a> {
    q: AckFilter<'a>,
    u: SetOp<'a>,
    multi: bool,
}

#[derive(Serialize)]
struct AckFilter<'a> {
    #[serde(rename = "_id")]
    id: In<Keys<'a>>,
    user: &'a UserId,
    state: In<&'a [ReceiptState]>,
}

#[derive(Serialize)]
struct In<T> {
    #[serde(rename = "$in")]
    any_of: T,
}

/// The receipt keys of one user's messages.
struct Keys<'a> {
    user: &'a UserId,
    ids: &'a [MessageId],
}

impl Serialize for Keys<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.ids.iter().map(|id| ReceiptKey(id, self.user)))
    }
}

#[derive(Serialize)]
struct SetOp<'a> {
    #[serde(rename = "$set")]
    set: AckSet<'a>,
}

/// What an ack sets; the fields of the other target state are left out.
#[derive(Serialize)]
struct AckSet<'a> {
    state: ReceiptState,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_at_ms: Option<i64>,
    /// `Some(None)`: set to null (no longer due for a resend).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_retry_at_ms: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_by: Option<DeliveredByRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_at_ms: Option<i64>,
}

/// A [`DeliveredBy`] as written.
#[derive(Serialize)]
struct DeliveredByRef<'a> {
    connection_id: &'a ConnectionId,
    gateway_id: &'a GatewayId,
}

impl<'a> AckStatement<'a> {
    fn of(update: &'a AckUpdate) -> Self {
        let delivered = update.to == ReceiptState::Delivered;
        let set = AckSet {
            state: update.to,
            delivered_at_ms: delivered.then_some(update.at_ms),
            next_retry_at_ms: delivered.then_some(None),
            delivered_by: update
                .by
                .as_ref()
                .filter(|_| delivered)
                .map(|(connection_id, gateway_id)| DeliveredByRef { connection_id, gateway_id }),
            read_at_ms: (update.to == ReceiptState::Read).then_some(update.at_ms),
        };
        AckStatement {
            q: AckFilter {
                id: In { any_of: Keys { user: &update.user, ids: &update.ids } },
                user: &update.user,
                state: In { any_of: &update.from },
            },
            u: SetOp { set },
            multi: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{date, partition_of, ClaimDoc, InlineMessage, ReceiptDoc};
    use mongodb::bson::{doc, Document};

    /// The statement as it was first written, with `doc!`: what the serialized one must equal.
    fn ack_statement_as_a_document(update: &AckUpdate) -> Document {
        let keys: Vec<String> = update.ids.iter().map(|id| receipt_key(id, &update.user)).collect();
        let from: Vec<&str> = update.from.iter().map(|s| s.as_str()).collect();
        let mut set = doc! { "state": update.to.as_str() };
        match update.to {
            ReceiptState::Delivered => {
                set.insert("delivered_at_ms", update.at_ms);
                set.insert("next_retry_at_ms", mongodb::bson::Bson::Null);
                if let Some((connection, gateway)) = &update.by {
                    set.insert(
                        "delivered_by",
                        doc! { "connection_id": connection.as_str(), "gateway_id": gateway.as_str() },
                    );
                }
            }
            ReceiptState::Read => {
                set.insert("read_at_ms", update.at_ms);
            }
            ReceiptState::Pending | ReceiptState::Expired | ReceiptState::Cancelled => {}
        }
        doc! {
            "q": { "_id": { "$in": keys }, "user": update.user.as_str(), "state": { "$in": from } },
            "u": { "$set": set },
            "multi": true,
        }
    }

    #[test]
    fn ack_commands_say_what_the_receipt_rules_say() {
        use herald_proto::{AckKind, AckRecord};
        let record = |user: &str, kind: AckKind, ids: &[&str], unsent: &[&str]| AckRecord {
            user: UserId::new(user).unwrap(),
            connection_id: ConnectionId::new("c1").unwrap(),
            gateway_id: GatewayId::new("g1").unwrap(),
            kind,
            ids: ids.iter().map(|i| MessageId::new(*i).unwrap()).collect(),
            read_unsent: unsent.iter().map(|i| MessageId::new(*i).unwrap()).collect(),
            at_ms: 42,
            traceparent: None,
        };
        let updates = crate::acks::plan(&[
            record("org/alice", AckKind::Delivered, &["m1", "m2"], &[]),
            record("bob", AckKind::Read, &["m3"], &["m4"]),
        ]);
        assert_eq!(updates.len(), 3, "two delivered, one read");
        let statements: Vec<(&AckUpdate, usize)> = updates.iter().map(|u| (u, u.approx_bytes())).collect();
        let command = ack_command(&statements, None).unwrap();
        let expected: Vec<Document> = updates.iter().map(ack_statement_as_a_document).collect();
        let expected = doc! { "update": collections::RECEIPTS, "updates": expected, "ordered": true };
        assert_eq!(command.to_document().unwrap(), expected);
        // Key order and types too: the same bytes as the command built from documents.
        assert_eq!(command.into_bytes(), mongodb::bson::RawDocumentBuf::from_document(&expected).unwrap().into_bytes());
    }

    /// The driver adds no write concern to a command run as such: without its own, an ack
    /// update was acknowledged at the server's default (`w: 1` on a replica set with an
    /// arbiter), not at the `majority` Herald asks of every write, and could be rolled back.
    #[test]
    fn an_ack_command_asks_the_databases_write_concern() {
        use mongodb::options::Acknowledgment;
        let updates = crate::acks::plan(&[herald_proto::AckRecord {
            user: UserId::new("alice").unwrap(),
            connection_id: ConnectionId::new("c1").unwrap(),
            gateway_id: GatewayId::new("g1").unwrap(),
            kind: herald_proto::AckKind::Delivered,
            ids: vec![MessageId::new("m1").unwrap()],
            read_unsent: Vec::new(),
            at_ms: 42,
            traceparent: None,
        }]);
        let statements: Vec<(&AckUpdate, usize)> = updates.iter().map(|u| (u, u.approx_bytes())).collect();
        let majority = WriteConcern::builder()
            .w(Acknowledgment::Majority)
            .w_timeout(std::time::Duration::from_secs(5))
            .journal(true)
            .build();
        let command = ack_command(&statements, Some(&majority)).unwrap().to_document().unwrap();
        assert_eq!(
            command.get_document("writeConcern").unwrap(),
            &doc! { "w": "majority", "wtimeout": 5000, "j": true },
            "{command}"
        );
    }

    #[test]
    fn an_insert_command_is_unordered_and_carries_each_document_as_it_serializes() {
        let (m, d) = (MessageId::new("m1").unwrap(), "d1");
        let docs = [(NewInboxDoc::Claim(NewClaim { id: &m, digest: d, purge_at: date(9) }), 100)];
        let command = insert_command(collections::RECEIPTS, &docs, None).unwrap().to_document().unwrap();
        let claim = mongodb::bson::to_document(&docs[0].0).unwrap();
        assert_eq!(command, doc! { "insert": collections::RECEIPTS, "documents": [claim], "ordered": false });
        let majority = WriteConcern::builder().w(mongodb::options::Acknowledgment::Majority).build();
        let command = insert_command(collections::RECEIPTS, &docs, Some(&majority)).unwrap().to_document().unwrap();
        assert_eq!(command.get_document("writeConcern").unwrap(), &doc! { "w": "majority" });
    }

    #[test]
    fn what_an_insert_writes_is_byte_for_byte_a_claim_and_a_receipt_document() {
        let (m, u) = (MessageId::new("m1").unwrap(), UserId::new("org/alice").unwrap());
        let claim = ClaimDoc { id: m.clone(), digest: "d1".into(), purge_at: date(9) };
        let new_claim = NewInboxDoc::Claim(NewClaim { id: &m, digest: "d1", purge_at: date(9) });
        assert_eq!(mongodb::bson::to_vec(&new_claim).unwrap(), mongodb::bson::to_vec(&claim).unwrap());
        for inline in [false, true] {
            let receipt = ReceiptDoc {
                id: receipt_key(&m, &u),
                message_id: m.clone(),
                user: u.clone(),
                part: Some(i32::from(partition_of(&u))),
                seq: 7,
                state: ReceiptState::Pending,
                created_at: date(1),
                expires_at: date(2),
                next_retry_at_ms: Some(3),
                delivered_at_ms: None,
                delivered_by: None,
                read_at_ms: None,
                expired_at_ms: None,
                cancelled_at_ms: None,
                purge_at: date(4),
                inline: inline.then(|| InlineMessage { payload: r#"{"k":1}"#.into(), published_at: date(5) }),
            };
            let new_receipt = NewInboxDoc::Receipt(NewReceipt {
                id: ReceiptKey(&m, &u),
                message_id: &m,
                user: &u,
                part: i32::from(partition_of(&u)),
                seq: 7,
                state: ReceiptState::Pending,
                created_at: date(1),
                expires_at: date(2),
                next_retry_at_ms: 3,
                purge_at: date(4),
                inline: inline.then(|| NewInline { payload: r#"{"k":1}"#, published_at: date(5) }),
            });
            assert_eq!(mongodb::bson::to_vec(&new_receipt).unwrap(), mongodb::bson::to_vec(&receipt).unwrap());
            let read: ReceiptDoc = mongodb::bson::from_slice(&mongodb::bson::to_vec(&new_receipt).unwrap()).unwrap();
            assert_eq!((read.id, read.inline.is_some()), (receipt_key(&m, &u), inline));
        }
    }
}
