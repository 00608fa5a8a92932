//! What a backend publishes to JetStream (subjects under `herald.publish.>`) and the rejections a
//! publisher can read back (subject `herald.rejected`).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::UnixMillis;

/// A request to notify one or many users (`to`), or every connection subscribed to a topic
/// (`topic`): exactly one of the two. A job with both, or neither, does not decode (it is
/// rejected as `malformed`), so that a `topic` set next to `to` as a label, which older
/// versions ignored, never turns a direct message into a broadcast.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "JobFields")]
pub struct PublishJob {
    /// Idempotency key and the message id clients see. Publishing the same id twice yields one
    /// message. When absent the dispatcher derives one from the job's stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Recipient user ids (the `sub` of their tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<String>>,
    /// The topic whose subscribers get the message. A string here: a bad name is rejected as
    /// `invalid_topic` by validation, with the job's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Any JSON value, delivered to clients byte for byte.
    pub payload: Box<RawValue>,
    /// Seconds the message may wait for an offline user; the dispatcher's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A job's fields as they decode, before the rule that names one address.
#[derive(Deserialize)]
struct JobFields {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    to: Option<Vec<String>>,
    #[serde(default)]
    topic: Option<String>,
    payload: Box<RawValue>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

impl TryFrom<JobFields> for PublishJob {
    type Error = &'static str;
    fn try_from(f: JobFields) -> Result<Self, Self::Error> {
        match (&f.to, &f.topic) {
            (Some(_), Some(_)) => Err("a job has `to` or `topic`, not both"),
            (None, None) => Err("missing field `to` (or `topic`)"),
            _ => Ok(PublishJob { id: f.id, to: f.to, topic: f.topic, payload: f.payload, ttl_secs: f.ttl_secs }),
        }
    }
}

/// Why a job was refused. A rejected job is acknowledged and never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Not JSON, or not a job (wrong types, missing fields).
    Malformed,
    PayloadTooLarge,
    NoRecipients,
    TooManyRecipients,
    InvalidId,
    InvalidRecipient,
    InvalidTtl,
    /// Has a `topic` that is not a topic name.
    InvalidTopic,
    /// The `id` names a message already stored with different content (payload, recipients or
    /// TTL). The stored message is left as it was; nothing of this job is delivered.
    IdConflict,
    /// Accepted but failed to be stored every time it was tried; moved aside so the queue moves.
    DeadLetter,
}

/// A job that will not be delivered, and why. Published on `herald.rejected` (for a bad job) or
/// `herald.dead` (for a dead letter), both kept in the `HERALD_REJECTED` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The job's `id` when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Where the job sat in the jobs stream: unique even for jobs without an id.
    pub stream_seq: u64,
    /// The subject the job was published on.
    pub subject: String,
    pub code: RejectCode,
    /// A sentence for a human.
    pub reason: String,
    pub rejected_at_ms: UnixMillis,
}
