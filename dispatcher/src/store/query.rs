//! What the query API and operators ask of the store beyond the delivery path: a message and
//! its receipts as they stand, the backlog for the gauges, and the operator's cancel and forget.

use std::collections::HashMap;

use futures::TryStreamExt;
use herald_proto::{MessageId, UserId};
use mongodb::bson::{doc, Document};

use super::{MessageDoc, PendingSample, ReceiptDoc, Store, StoreError, OP_TIMEOUT};
use crate::receipt::ReceiptState;

impl Store {
    /// How many receipts are pending, and when the oldest of them was created: two index
    /// reads, for the gauges (`crate::pending`). Not counted in the store's pace: a count that
    /// takes long says how many there are, not that the store is slow.
    pub async fn pending_sample(&self) -> Result<PendingSample, StoreError> {
        let pending = doc! { "state": ReceiptState::Pending.as_str() };
        let sample = async {
            let count = self.receipts.count_documents(pending.clone()).max_time(OP_TIMEOUT).await?;
            let oldest = self
                .receipts
                .clone_with_type::<Document>()
                .find_one(pending)
                .sort(doc! { "created_at": 1 })
                .projection(doc! { "created_at": 1 })
                .max_time(OP_TIMEOUT)
                .await?;
            let oldest_created_ms =
                oldest.and_then(|d| d.get_datetime("created_at").ok().map(|t| t.timestamp_millis()));
            Ok(PendingSample { count, oldest_created_ms })
        };
        let bounded = async {
            tokio::time::timeout(OP_TIMEOUT, sample).await.unwrap_or(Err(StoreError::Timeout { op: "pending_sample" }))
        };
        self.metrics.time("mongodb", "pending_sample", bounded).await
    }

    /// A message by id, whether stored on its own or carried by its only receipt.
    pub async fn message(&self, id: &MessageId) -> Result<Option<MessageDoc>, StoreError> {
        let id = id.as_str();
        let find = async { Ok(self.messages.find_one(doc! { "_id": id }).max_time(OP_TIMEOUT).await?) };
        let found = self.call("find_message", find).await?;
        if found.is_some() {
            return Ok(found);
        }
        let carrier = async { Ok(self.receipts.find_one(doc! { "message_id": id }).max_time(OP_TIMEOUT).await?) };
        Ok(self.call("find_message", carrier).await?.and_then(|mut r| r.take_inline_message()))
    }

    /// Receipts of one message, by user, at most `limit`.
    pub async fn receipts_of(&self, message_id: &MessageId, limit: usize) -> Result<Vec<ReceiptDoc>, StoreError> {
        let message_id = message_id.as_str();
        let find = async {
            let cursor = self
                .receipts
                .find(doc! { "message_id": message_id })
                .sort(doc! { "user": 1 })
                .limit(limit as i64)
                .max_time(OP_TIMEOUT)
                .await?;
            Ok(cursor.try_collect().await?)
        };
        self.call("receipts_of", find).await
    }

    /// How many receipts of one message are in each state.
    pub async fn receipt_counts(&self, message_id: &MessageId) -> Result<HashMap<String, u64>, StoreError> {
        let message_id = message_id.as_str();
        let aggregate = async {
            let cursor = self
                .receipts
                .aggregate([
                    doc! { "$match": { "message_id": message_id } },
                    doc! { "$group": { "_id": "$state", "n": { "$sum": 1 } } },
                ])
                .max_time(OP_TIMEOUT)
                .await?;
            Ok(cursor.try_collect::<Vec<_>>().await?)
        };
        let mut counts = HashMap::new();
        for row in self.call("receipt_counts", aggregate).await? {
            let state = row.get_str("_id").unwrap_or("unknown").to_owned();
            counts.insert(state, super::count(&row, "n"));
        }
        Ok(counts)
    }

    /// An operator's cancel: every pending receipt of the message becomes `cancelled`, after
    /// which no sweep, replay or route reads it (they read pending receipts only). Returns how
    /// many were cancelled.
    pub async fn cancel(&self, message_id: &MessageId, now_ms: u64) -> Result<u64, StoreError> {
        let id = message_id.as_str();
        let from = ReceiptState::Cancelled.reachable_from();
        let update = async {
            Ok(self
                .receipts
                .update_many(
                    doc! { "message_id": id, "state": { "$in": from } },
                    doc! { "$set": {
                        "state": ReceiptState::Cancelled.as_str(),
                        "cancelled_at_ms": now_ms as i64,
                        "next_retry_at_ms": null,
                    } },
                )
                .await?)
        };
        Ok(self.call("cancel", update).await?.modified_count)
    }

    /// A data-protection request: deletes every receipt of `user`, and with them the messages
    /// they carry (those sent to this user alone). Messages to several users stay for the others.
    /// Returns (receipts deleted, of which carried their message).
    pub async fn forget(&self, user: &UserId) -> Result<(u64, u64), StoreError> {
        let user = user.as_str();
        let carriers = async {
            Ok(self.receipts.delete_many(doc! { "user": user, "inline": { "$exists": true } }).await?.deleted_count)
        };
        let messages = self.call("forget", carriers).await?;
        let rest = async { Ok(self.receipts.delete_many(doc! { "user": user }).await?.deleted_count) };
        let receipts = self.call("forget", rest).await?;
        Ok((messages + receipts, messages))
    }
}
