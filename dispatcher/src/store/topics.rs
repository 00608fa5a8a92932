//! Topic messages in the store: one document per message (`topic_messages`), which claims the
//! message id for its content, records the offset the topics stream gave it, and holds its
//! aggregate receipt (acked connections and users, counted). No per-recipient document: a
//! topic's audience is not known to the dispatcher, only counted as it acks.

use herald_proto::{MessageId, TopicAckCount, TopicName};
use herald_publish::validate::ValidJob;
use mongodb::bson::{doc, DateTime, Document};
use serde::{Deserialize, Serialize};

use super::{date, Store, StoreError, OP_TIMEOUT};
use herald_shared::naming::collections;

/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11000;

/// A topic message and its aggregate receipt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMessageDoc {
    #[serde(rename = "_id")]
    pub id: MessageId,
    pub topic: TopicName,
    /// The digest of the job's content ([`herald_publish::validate::digest`]): a job that reuses
    /// the id with other content is an `id_conflict`.
    pub digest: String,
    pub payload: String,
    pub published_at: DateTime,
    pub expires_at: DateTime,
    /// The message's sequence in the topics stream, once it is published there. Set: a
    /// redelivered job is not published again.
    #[serde(default)]
    pub offset: Option<i64>,
    /// Connections that acked it, summed over the gateways' reports.
    #[serde(default)]
    pub acked_connections: i64,
    /// Users that acked it, summed over the gateways' reports (each counts the distinct users of
    /// one report): an upper bound of the distinct users.
    #[serde(default)]
    pub acked_users: i64,
    /// Removed by the store's TTL index then, as messages are.
    pub purge_at: DateTime,
}

/// What claiming a topic message's id found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicClaim {
    /// The id is this job's (new, or the same job again); `offset` is set once it was published.
    Ours { offset: Option<u64> },
    /// The id holds a topic message with other content.
    Conflict,
}

impl Store {
    fn topic_messages(&self) -> mongodb::Collection<TopicMessageDoc> {
        self.db.collection(collections::TOPIC_MESSAGES)
    }

    /// Claims `job`'s id for it (a topic job: `job.topic` is set), or finds the claim a previous
    /// delivery of the same job made. Idempotent.
    pub async fn claim_topic_message(&self, job: &ValidJob, topic: &TopicName) -> Result<TopicClaim, StoreError> {
        let purge_at = self.purge_at(job.expires_at_ms);
        let doc = TopicMessageDoc {
            id: job.message_id.clone(),
            topic: topic.clone(),
            digest: job.digest.clone(),
            payload: job.payload.get().to_owned(),
            published_at: date(job.published_at_ms),
            expires_at: date(job.expires_at_ms),
            offset: None,
            acked_connections: 0,
            acked_users: 0,
            purge_at,
        };
        let coll = self.topic_messages();
        let insert = async {
            match coll.insert_one(&doc).await {
                Ok(_) => Ok(None),
                Err(e) if duplicate_key(&e) => {
                    Ok(coll.find_one(doc! { "_id": doc.id.as_str() }).max_time(OP_TIMEOUT).await?)
                }
                Err(e) => Err(StoreError::from(e)),
            }
        };
        Ok(match self.call("claim_topic_message", insert).await? {
            None => TopicClaim::Ours { offset: None },
            Some(existing) if existing.digest == doc.digest => {
                TopicClaim::Ours { offset: existing.offset.and_then(|o| u64::try_from(o).ok()) }
            }
            Some(_) => TopicClaim::Conflict,
        })
    }

    /// Records the offset the topics stream gave a message.
    pub async fn set_topic_offset(&self, id: &MessageId, offset: u64) -> Result<(), StoreError> {
        let coll = self.topic_messages();
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let update = async {
            coll.update_one(doc! { "_id": id.as_str() }, doc! { "$set": { "offset": offset } }).await?;
            Ok(())
        };
        self.call("set_topic_offset", update).await
    }

    /// Adds the gateways' ack counts to the aggregate receipts, in one round trip. A count for
    /// a message the store does not have (purged) changes nothing. Not idempotent: an event
    /// applied twice (a dispatcher that died after the write, before its JetStream ack) counts
    /// twice, which the protocol document says.
    pub async fn apply_topic_acks(&self, counts: &[TopicAckCount]) -> Result<u64, StoreError> {
        if counts.is_empty() {
            return Ok(0);
        }
        let updates: Vec<Document> = counts
            .iter()
            .map(|c| {
                let connections = i64::try_from(c.connections).unwrap_or(i64::MAX);
                let users = i64::try_from(c.users).unwrap_or(i64::MAX);
                doc! {
                    "q": { "_id": c.id.as_str() },
                    "u": { "$inc": { "acked_connections": connections, "acked_users": users } },
                }
            })
            .collect();
        let mut command = doc! { "update": collections::TOPIC_MESSAGES, "updates": updates, "ordered": false };
        // The driver gives a command run as such no write concern of its own (see `ack_command`).
        if let Some(concern) = self.db.write_concern() {
            command.insert("writeConcern", mongodb::bson::to_bson(concern)?);
        }
        let run = async { Ok(self.db.run_command(command).await?) };
        let reply = self.call("apply_topic_acks", run).await?;
        Ok(super::count(&reply, "nModified"))
    }

    /// A topic message by id, with its aggregate receipt.
    pub async fn topic_message(&self, id: &MessageId) -> Result<Option<TopicMessageDoc>, StoreError> {
        let coll = self.topic_messages();
        let find = async { Ok(coll.find_one(doc! { "_id": id.as_str() }).max_time(OP_TIMEOUT).await?) };
        self.call("find_topic_message", find).await
    }
}

fn duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}
