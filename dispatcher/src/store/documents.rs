//! The documents the store keeps, as MongoDB holds them: messages, the claims on their ids,
//! receipts (each recipient's inbox entry) and dead letters. What the delivery path writes is
//! encoded without them (`encode`); these are what is read back.

use herald_proto::{ConnectionId, GatewayId, MessageId, UserId};
use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};

use crate::receipt::ReceiptState;

/// One message, stored once whatever the number of recipients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageDoc {
    #[serde(rename = "_id")]
    pub id: MessageId,
    pub seq: i64,
    /// The publisher's JSON as text, so clients get it byte for byte.
    pub payload: String,
    pub published_at: DateTime,
    pub expires_at: DateTime,
    pub recipients: i64,
    pub purge_at: DateTime,
}

/// The claim a message id holds on its content, one per message in the receipts collection
/// (where the insert that writes receipts writes it too, in the same round trip). A later job
/// with the same id and another digest is a different job: an `id_conflict`, never a merge.
/// Its `_id` is the bare message id, which holds no `/` and so never equals a receipt's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimDoc {
    #[serde(rename = "_id")]
    pub id: MessageId,
    pub digest: String,
    pub purge_at: DateTime,
}

/// Who acknowledged a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredBy {
    pub connection_id: ConnectionId,
    pub gateway_id: GatewayId,
}

/// Receipts waiting for delivery, as `Store::pending_sample` found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingSample {
    pub count: u64,
    /// When the oldest pending receipt was created (ms since the epoch); None when none is.
    pub oldest_created_ms: Option<i64>,
}

/// One recipient's copy of a message: its inbox entry and its receipt.
///
/// Its `_id` is [`receipt_key`](super::receipt_key): the (message, user) pair itself. That makes the insert of a
/// redelivered job idempotent without a second unique index, and lets an ack name exactly the
/// receipts it may change, each found by primary key (and filtered on `user` as well).
///
/// Timestamps written once, at insert, are BSON dates (`purge_at` must be one for the TTL
/// index). Timestamps an update sets are integer milliseconds (`*_ms`), like everything on the
/// wire; that also sidesteps a defect of the nx-27017 test server, which stores a date given to
/// `$set` as a string (see docs/NOTES.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiptDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub message_id: MessageId,
    pub user: UserId,
    /// The resend partition of `user` ([`partition_of`](super::partition_of)): dispatchers divide the resend sweep
    /// by it. Absent on receipts written before partitions existed (swept as [`LEGACY`](super::LEGACY)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<i32>,
    pub seq: i64,
    pub state: ReceiptState,
    pub created_at: DateTime,
    pub expires_at: DateTime,
    /// When to send again if no ack came; [`PARKED_MS`](super::PARKED_MS) while the user is offline (replayed on
    /// connect); null once the receipt is no longer pending.
    #[serde(default)]
    pub next_retry_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_by: Option<DeliveredBy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at_ms: Option<i64>,
    /// When an operator cancelled it (state `cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at_ms: Option<i64>,
    pub purge_at: DateTime,
    /// The message itself when this is its only receipt (it then has no [`MessageDoc`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineMessage>,
}

/// What a receipt carries of a message that has no document of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InlineMessage {
    /// The publisher's JSON as text, as in [`MessageDoc::payload`].
    pub payload: String,
    pub published_at: DateTime,
}

impl ReceiptDoc {
    /// The message document this receipt stands for, when it carries its message (moved out
    /// of the receipt: a payload may be 64 KiB).
    pub(super) fn take_inline_message(&mut self) -> Option<MessageDoc> {
        let inline = self.inline.take()?;
        Some(MessageDoc {
            id: self.message_id.clone(),
            seq: self.seq,
            payload: inline.payload,
            published_at: inline.published_at,
            expires_at: self.expires_at,
            recipients: 1,
            purge_at: self.purge_at,
        })
    }
}

/// A job that could not be stored, kept for an operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterDoc {
    pub stream_seq: i64,
    pub subject: String,
    pub job_id: Option<String>,
    pub reason: String,
    pub attempts: i64,
    pub body: String,
    pub dead_at: DateTime,
}
