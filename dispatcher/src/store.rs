//! The receipt store in MongoDB: messages (payload once per message), receipts (one per
//! message and recipient, the durable inbox), and dead letters. The only module that talks to
//! MongoDB. Every operation that touches many documents is one round trip.
//!
//! A message with one recipient (the common case: a notification to one user) has no message
//! document: its receipt carries it ([`ReceiptDoc::inline`]), so storing it is one insert
//! rather than two. A message to several recipients is stored once, in `messages`.
//!
//! Errors are classified once, here: a transient error (the store is unreachable, failing over)
//! means "retry later, lose nothing"; a permanent one means this input will never be stored.

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use herald_proto::{AckKind, AckRecord, Notification};
use herald_shared::naming::collections;
use mongodb::bson::{doc, DateTime};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use herald_shared::metrics::DependencyMetrics;

use crate::job::ValidJob;
use crate::receipt::ReceiptState;

/// How long messages and receipts are kept after they expire, for the query API and audits.
pub const RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Duplicate key: the message or receipt exists already, which is what idempotency wants.
const DUPLICATE_KEY: i32 = 11000;
/// Server error codes that mean "try again" (not primary, shutting down, interrupted, ...).
const TRANSIENT_CODES: &[i32] = &[6, 7, 50, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436];
/// `next_retry_at_ms` of a receipt parked until its user connects: later than any sweep, and
/// matched by equality. (Not null: nx-27017 does not match `{field: null}` against a stored
/// null, and an explicit value keeps the `state, next_retry_at_ms` index useful.)
pub const PARKED_MS: i64 = i64::MAX;
/// Update statements per command (the server's batch limit is far higher; this bounds size).
const UPDATE_BATCH: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The store could not be reached or is failing over: retry, lose nothing.
    Transient,
    /// This write will never succeed as it is.
    Permanent,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store ({class:?}): {source}")]
    Mongo {
        class: ErrorClass,
        #[source]
        source: mongodb::error::Error,
    },
    /// The driver has no socket timeout: a partitioned server would hold a call for as long as
    /// TCP does. Every call is bounded by [`OP_TIMEOUT`] instead, and a timeout is transient.
    #[error("store: {op} took longer than {OP_TIMEOUT:?}")]
    Timeout { op: &'static str },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Mongo { class, .. } => *class == ErrorClass::Transient,
            StoreError::Timeout { .. } => true,
        }
    }
}

impl From<mongodb::error::Error> for StoreError {
    fn from(source: mongodb::error::Error) -> Self {
        Self::Mongo { class: classify(&source), source }
    }
}

/// Longest a single store call may take before it counts as an outage. Queries also send it as
/// `maxTimeMS`, so the server stops what the dispatcher gave up on instead of piling up
/// abandoned scans while the retry runs.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Receipts written per insert call: a 10,000-recipient fan-out is two calls. Keeps each call
/// well inside [`OP_TIMEOUT`] (about 0.7 s for 5,000 on nx-27017, the slowest store tested).
pub const RECEIPTS_PER_INSERT: usize = 5_000;

fn classify(e: &mongodb::error::Error) -> ErrorClass {
    let transient = match e.kind.as_ref() {
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. } => true,
        ErrorKind::Command(c) => TRANSIENT_CODES.contains(&c.code),
        _ => false,
    };
    if transient || e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError") {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// One message, stored once whatever the number of recipients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub seq: i64,
    /// The publisher's JSON as text, so clients get it byte for byte.
    pub payload: String,
    pub published_at: DateTime,
    pub expires_at: DateTime,
    pub recipients: i64,
    pub purge_at: DateTime,
}

/// Who acknowledged a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredBy {
    pub connection_id: String,
    pub gateway_id: String,
}

/// One recipient's copy of a message: its inbox entry and its receipt.
///
/// Its `_id` is [`receipt_key`]: the (message, user) pair itself. That makes the insert of a
/// redelivered job idempotent without a second unique index, and lets an ack name exactly the
/// receipts it may change, each found by primary key.
///
/// Timestamps written once, at insert, are BSON dates (`purge_at` must be one for the TTL
/// index). Timestamps an update sets are integer milliseconds (`*_ms`), like everything on the
/// wire; that also sidesteps a defect of the nx-27017 test server, which stores a date given to
/// `$set` as a string (see docs/NOTES.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiptDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub message_id: String,
    pub user: String,
    pub seq: i64,
    pub state: ReceiptState,
    pub created_at: DateTime,
    pub expires_at: DateTime,
    /// When to send again if no ack came; [`PARKED_MS`] while the user is offline (replayed on
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
    fn take_inline_message(&mut self) -> Option<MessageDoc> {
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

/// What an insert of a batch of jobs did.
#[derive(Debug, Default)]
pub struct Inserted {
    /// Per job (same order as the input): the recipients whose receipt this call created.
    pub new_recipients: Vec<Vec<String>>,
    /// Jobs that failed for good, by index, with the server's reason.
    pub failed: HashMap<usize, String>,
}

/// A pending receipt with the notification to send for it.
#[derive(Debug)]
pub struct Sendable {
    pub receipt_id: String,
    pub user: String,
    pub notification: Notification,
}

#[derive(Clone)]
pub struct Store {
    messages: Collection<MessageDoc>,
    receipts: Collection<ReceiptDoc>,
    dead_letters: Collection<DeadLetterDoc>,
    db: Database,
    metrics: DependencyMetrics,
}

/// The `_id` of `user`'s receipt of `message_id`. Unambiguous because message ids cannot
/// contain `/` (see [`crate::job::is_valid_id`]); user names may.
pub fn receipt_key(message_id: &str, user: &str) -> String {
    format!("{message_id}/{user}")
}

pub fn date(ms: u64) -> DateTime {
    DateTime::from_millis(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn millis(d: DateTime) -> u64 {
    u64::try_from(d.timestamp_millis()).unwrap_or(0)
}

impl Store {
    pub fn new(db: Database, metrics: DependencyMetrics) -> Self {
        Self {
            messages: db.collection(collections::MESSAGES),
            receipts: db.collection(collections::RECEIPTS),
            dead_letters: db.collection(collections::DEAD_LETTERS),
            db,
            metrics,
        }
    }

    /// One round trip: bounded by [`OP_TIMEOUT`], timed in `herald_dependency_seconds`.
    async fn call<T, F>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let bounded = async { tokio::time::timeout(OP_TIMEOUT, call).await.unwrap_or(Err(StoreError::Timeout { op })) };
        self.metrics.time("mongodb", op, bounded).await
    }

    /// Creates the indexes every query here relies on; idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let ttl = || IndexOptions::builder().expire_after(Duration::ZERO).build();
        self.receipts
            .create_indexes([
                IndexModel::builder().keys(doc! { "user": 1, "state": 1, "seq": 1 }).build(),
                IndexModel::builder().keys(doc! { "message_id": 1 }).build(),
                IndexModel::builder().keys(doc! { "state": 1, "next_retry_at_ms": 1 }).build(),
                IndexModel::builder().keys(doc! { "state": 1, "expires_at": 1 }).build(),
                IndexModel::builder().keys(doc! { "purge_at": 1 }).options(ttl()).build(),
            ])
            .await?;
        self.messages.create_index(IndexModel::builder().keys(doc! { "purge_at": 1 }).options(ttl()).build()).await?;
        Ok(())
    }

    /// Stores a batch of jobs: the messages of those with several recipients, then one pending
    /// receipt per recipient (carrying the message when it is the only one). Two round trips
    /// per batch, one if every job has a single recipient (plus one per further
    /// [`RECEIPTS_PER_INSERT`] receipts). Existing messages and receipts (a
    /// redelivered or re-published job) are left as they are, which makes the write idempotent.
    pub async fn insert(&self, jobs: &[ValidJob], now_ms: u64, ack_timeout: Duration) -> Result<Inserted, StoreError> {
        let mut out = Inserted { new_recipients: vec![Vec::new(); jobs.len()], failed: HashMap::new() };
        if jobs.is_empty() {
            return Ok(out);
        }
        let purge_at = |job: &ValidJob| date(job.expires_at_ms + RETENTION.as_millis() as u64);
        let (shared, messages): (Vec<usize>, Vec<MessageDoc>) = jobs
            .iter()
            .enumerate()
            .filter(|(_, job)| job.recipients.len() > 1)
            .map(|(index, job)| {
                let message = MessageDoc {
                    id: job.message_id.clone(),
                    seq: job.seq as i64,
                    payload: job.payload.get().to_owned(),
                    published_at: date(job.published_at_ms),
                    expires_at: date(job.expires_at_ms),
                    recipients: job.recipients.len() as i64,
                    purge_at: purge_at(job),
                };
                (index, message)
            })
            .unzip();
        if !messages.is_empty() {
            let (_, failed) =
                self.call("insert_messages", insert_tolerating_duplicates(&self.messages, &messages)).await?;
            for (i, reason) in failed {
                out.failed.insert(shared[i], reason);
            }
        }

        let mut owners = Vec::new();
        let mut receipts = Vec::new();
        for (index, job) in jobs.iter().enumerate() {
            if out.failed.contains_key(&index) {
                continue;
            }
            for user in &job.recipients {
                owners.push(index);
                receipts.push(ReceiptDoc {
                    id: receipt_key(&job.message_id, user),
                    message_id: job.message_id.clone(),
                    user: user.clone(),
                    seq: job.seq as i64,
                    state: ReceiptState::Pending,
                    created_at: date(now_ms),
                    expires_at: date(job.expires_at_ms),
                    next_retry_at_ms: Some((now_ms + ack_timeout.as_millis() as u64) as i64),
                    delivered_at_ms: None,
                    delivered_by: None,
                    read_at_ms: None,
                    expired_at_ms: None,
                    purge_at: purge_at(job),
                    inline: (job.recipients.len() == 1).then(|| InlineMessage {
                        payload: job.payload.get().to_owned(),
                        published_at: date(job.published_at_ms),
                    }),
                });
            }
        }
        // One call per chunk, each within OP_TIMEOUT: a batch of large fan-outs is written piece
        // by piece instead of as one call that a slow store never finishes in time.
        let mut inserted = Vec::with_capacity(receipts.len());
        for (n, chunk) in receipts.chunks(RECEIPTS_PER_INSERT).enumerate() {
            let (chunk_inserted, failed) =
                self.call("insert_receipts", insert_tolerating_duplicates(&self.receipts, chunk)).await?;
            inserted.extend(chunk_inserted);
            for (i, reason) in failed {
                out.failed.insert(owners[n * RECEIPTS_PER_INSERT + i], reason);
            }
        }
        for ((receipt, inserted), owner) in receipts.into_iter().zip(inserted).zip(owners) {
            if inserted {
                out.new_recipients[owner].push(receipt.user);
            }
        }
        Ok(out)
    }

    /// Applies client acknowledgements in one command (one round trip per thousand records).
    /// Each statement names its receipts by key, and the key holds the acking user, so an id
    /// that is not this user's matches nothing; the state filter lets receipts only move
    /// forward. Returns the number of receipts changed.
    pub async fn apply_acks(&self, records: &[AckRecord]) -> Result<u64, StoreError> {
        let mut statements = Vec::with_capacity(records.len());
        for record in records {
            let at = record.at_ms as i64;
            let keys: Vec<String> = record.ids.iter().map(|id| receipt_key(id, &record.user)).collect();
            statements.push(doc! {
                "q": { "_id": { "$in": &keys }, "state": { "$in": ReceiptState::Delivered.reachable_from() } },
                "u": { "$set": {
                    "state": ReceiptState::Delivered.as_str(),
                    "delivered_at_ms": at,
                    "delivered_by": { "connection_id": &record.connection_id, "gateway_id": &record.gateway_id },
                    "next_retry_at_ms": null,
                } },
                "multi": true,
            });
            if record.kind == AckKind::Read {
                statements.push(doc! {
                    "q": { "_id": { "$in": &keys }, "state": { "$in": ReceiptState::Read.reachable_from() } },
                    "u": { "$set": { "state": ReceiptState::Read.as_str(), "read_at_ms": at } },
                    "multi": true,
                });
            }
        }
        let mut modified = 0;
        for chunk in statements.chunks(UPDATE_BATCH) {
            // Ordered, so a read's "delivered" statement lands before its "read" one.
            let command = doc! { "update": collections::RECEIPTS, "updates": chunk, "ordered": true };
            let reply = self.call("apply_acks", async { Ok(self.db.run_command(command).await?) }).await?;
            if let Ok(errors) = reply.get_array("writeErrors") {
                if !errors.is_empty() {
                    tracing::error!(errors = ?errors, "receipt updates refused by the store");
                }
            }
            modified +=
                reply.get_i32("nModified").map(i64::from).or_else(|_| reply.get_i64("nModified")).unwrap_or(0) as u64;
        }
        Ok(modified)
    }

    /// The oldest pending, unexpired messages of each user, at most `per_user` each: what a
    /// connection that just came online must get. Usually two round trips for any number of
    /// users; when one user's backlog fills the shared query, the users it crowded out get a
    /// query of their own.
    pub async fn pending_for(&self, users: &[&str], per_user: usize, now_ms: u64) -> Result<Vec<Sendable>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let limit = per_user * users.len();
        let mut receipts = self.pending_receipts(users, limit, now_ms).await?;
        let mut per = HashMap::<String, usize>::new();
        receipts.retain(|r| {
            let n = per.entry(r.user.clone()).or_default();
            *n += 1;
            *n <= per_user
        });
        if receipts.len() < limit && per.values().sum::<usize>() >= limit {
            for user in users.iter().filter(|u| per.get(**u).copied().unwrap_or(0) < per_user) {
                let have = per.get(*user).copied().unwrap_or(0);
                let mut more = self.pending_receipts(&[user], per_user, now_ms).await?;
                more.drain(..have.min(more.len()));
                receipts.extend(more);
            }
        }
        self.with_payloads(receipts).await
    }

    async fn pending_receipts(&self, users: &[&str], limit: usize, now_ms: u64) -> Result<Vec<ReceiptDoc>, StoreError> {
        let filter = doc! { "user": { "$in": users }, "state": "pending", "expires_at": { "$gt": date(now_ms) } };
        let find = async {
            let cursor =
                self.receipts.find(filter).sort(doc! { "seq": 1 }).limit(limit as i64).max_time(OP_TIMEOUT).await?;
            Ok(cursor.try_collect().await?)
        };
        self.call("pending_receipts", find).await
    }

    /// Makes every pending receipt of `users` that waits for a connection (no retry time) due
    /// after `next_retry_ms`: what a replay page did not carry follows through the ack-timeout
    /// sweep while the user is connected.
    pub async fn unpark(&self, users: &[&str], next_retry_ms: u64) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let update = async {
            self.receipts
                .update_many(
                    doc! { "user": { "$in": users }, "state": "pending", "next_retry_at_ms": PARKED_MS },
                    doc! { "$set": { "next_retry_at_ms": next_retry_ms as i64 } },
                )
                .await?;
            Ok(())
        };
        self.call("unpark", update).await
    }

    /// Pending receipts whose ack timeout passed: sent to a connected client that did not ack.
    pub async fn due_for_retry(&self, now_ms: u64, limit: usize) -> Result<Vec<ReceiptDoc>, StoreError> {
        let find = async {
            let filter = doc! { "state": "pending", "next_retry_at_ms": { "$lte": now_ms as i64 } };
            let cursor = self.receipts.find(filter).limit(limit as i64).max_time(OP_TIMEOUT).await?;
            Ok(cursor.try_collect().await?)
        };
        self.call("due_for_retry", find).await
    }

    /// Adds the payloads to receipts (one round trip for those that do not carry their message,
    /// none if all do), oldest first; receipts whose message is gone (purged) are skipped.
    pub async fn with_payloads(&self, receipts: Vec<ReceiptDoc>) -> Result<Vec<Sendable>, StoreError> {
        let mut ids: Vec<&str> =
            receipts.iter().filter(|r| r.inline.is_none()).map(|r| r.message_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut messages = HashMap::new();
        if !ids.is_empty() {
            let find = async {
                let cursor = self.messages.find(doc! { "_id": { "$in": ids } }).max_time(OP_TIMEOUT).await?;
                Ok(cursor.try_collect::<Vec<_>>().await?)
            };
            messages = self.call("load_messages", find).await?.into_iter().map(|m| (m.id.clone(), m)).collect();
        }
        let mut out: Vec<Sendable> = receipts
            .into_iter()
            .filter_map(|mut r| {
                let inline = r.take_inline_message();
                let message = inline.as_ref().or_else(|| messages.get(&r.message_id))?;
                let payload = RawValue::from_string(message.payload.clone()).ok()?;
                let notification = Notification {
                    id: message.id.clone(),
                    seq: message.seq as u64,
                    payload,
                    published_at_ms: millis(message.published_at),
                    expires_at_ms: millis(message.expires_at),
                };
                Some(Sendable { receipt_id: r.id, user: r.user, notification })
            })
            .collect();
        out.sort_by_key(|s| s.notification.seq);
        Ok(out)
    }

    /// Sets when still-pending receipts are next sent again (None: not until the user connects).
    pub async fn reschedule(&self, receipt_ids: &[String], next_retry_ms: Option<u64>) -> Result<(), StoreError> {
        if receipt_ids.is_empty() {
            return Ok(());
        }
        let next = next_retry_ms.map_or(PARKED_MS, |ms| ms as i64);
        let update = async {
            self.receipts
                .update_many(
                    doc! { "_id": { "$in": receipt_ids }, "state": "pending" },
                    doc! { "$set": { "next_retry_at_ms": next } },
                )
                .await?;
            Ok(())
        };
        self.call("reschedule", update).await
    }

    /// Marks every pending receipt past its expiry as expired; returns how many.
    pub async fn expire(&self, now_ms: u64) -> Result<u64, StoreError> {
        let update = async {
            Ok(self
                .receipts
                .update_many(
                    doc! { "state": "pending", "expires_at": { "$lte": date(now_ms) } },
                    doc! { "$set": { "state": "expired", "expired_at_ms": now_ms as i64, "next_retry_at_ms": null } },
                )
                .await?)
        };
        Ok(self.call("expire", update).await?.modified_count)
    }

    /// A message by id, whether stored on its own or carried by its only receipt.
    pub async fn message(&self, id: &str) -> Result<Option<MessageDoc>, StoreError> {
        let find = async { Ok(self.messages.find_one(doc! { "_id": id }).max_time(OP_TIMEOUT).await?) };
        let found = self.call("find_message", find).await?;
        if found.is_some() {
            return Ok(found);
        }
        let carrier = async { Ok(self.receipts.find_one(doc! { "message_id": id }).max_time(OP_TIMEOUT).await?) };
        Ok(self.call("find_message", carrier).await?.and_then(|mut r| r.take_inline_message()))
    }

    /// Receipts of one message, by user, at most `limit`.
    pub async fn receipts_of(&self, message_id: &str, limit: usize) -> Result<Vec<ReceiptDoc>, StoreError> {
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
    pub async fn receipt_counts(&self, message_id: &str) -> Result<HashMap<String, u64>, StoreError> {
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
            let n = row.get_i32("n").map(i64::from).or_else(|_| row.get_i64("n")).unwrap_or(0);
            counts.insert(state, n as u64);
        }
        Ok(counts)
    }

    pub async fn dead_letter(&self, letter: DeadLetterDoc) -> Result<(), StoreError> {
        self.call("dead_letter", async { Ok(self.dead_letters.insert_one(letter).await.map(|_| ())?) }).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call("ping", async { Ok(self.db.run_command(doc! { "ping": 1 }).await.map(|_| ())?) }).await?;
        Ok(())
    }

    /// Raw access for tests and the query API's filters.
    pub fn receipts(&self) -> &Collection<ReceiptDoc> {
        &self.receipts
    }
}

/// Inserts `docs` unordered in one round trip. Returns which were inserted, and the index and
/// reason of each that failed for a reason other than "already there".
async fn insert_tolerating_duplicates<T>(
    collection: &Collection<T>,
    docs: &[T],
) -> Result<(Vec<bool>, Vec<(usize, String)>), StoreError>
where
    T: Serialize + Send + Sync,
{
    let mut inserted = vec![true; docs.len()];
    let mut failed = Vec::new();
    if docs.is_empty() {
        return Ok((inserted, failed));
    }
    match collection.insert_many(docs).ordered(false).await {
        Ok(_) => {}
        Err(e) => match e.kind.as_ref() {
            ErrorKind::InsertMany(many) if many.write_concern_error.is_none() => {
                for write_error in many.write_errors.iter().flatten() {
                    if let Some(slot) = inserted.get_mut(write_error.index) {
                        *slot = false;
                    }
                    if write_error.code != DUPLICATE_KEY {
                        failed.push((write_error.index, write_error.message.clone()));
                    }
                }
            }
            _ => return Err(e.into()),
        },
    }
    Ok((inserted, failed))
}
