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
use herald_proto::{MessageId, Notification, UserId};
use herald_shared::naming::collections;

use crate::pace::StorePace;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};
use serde::Serialize;
use serde_json::value::RawValue;

use herald_shared::metrics::DependencyMetrics;

use crate::acks::AckUpdate;
use crate::receipt::ReceiptState;
use herald_publish::validate::ValidJob;

mod documents;
mod encode;
mod query;
mod topics;
pub use documents::{ClaimDoc, DeadLetterDoc, DeliveredBy, InlineMessage, MessageDoc, PendingSample, ReceiptDoc};
use encode::{ack_command, insert_command, NewClaim, NewInboxDoc, NewInline, NewReceipt, ReceiptKey};
pub use topics::{TopicClaim, TopicMessageDoc};

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
/// Bytes of update statements per command: far below MongoDB's 16 MiB document and 48 MB
/// message limits, so that no amount of acks in one batch makes a command the server refuses.
const UPDATE_BATCH_BYTES: usize = 2 * 1024 * 1024;

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
    /// A command the server answered, with a write error in its reply.
    #[error("store ({class:?}) refused a write: code {code}: {message}")]
    WriteRefused { class: ErrorClass, code: i32, message: String },
    /// A document this process built could not be encoded: a bug, never retried.
    #[error("store: encoding a document: {0}")]
    Encode(#[from] mongodb::bson::ser::Error),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Mongo { class, .. } => *class == ErrorClass::Transient,
            StoreError::Timeout { .. } => true,
            StoreError::WriteRefused { class, .. } => *class == ErrorClass::Transient,
            StoreError::Encode(_) => false,
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
/// Bytes of documents per insert command, by [`approx_doc_bytes`]: half MongoDB's 16 MiB limit
/// on a command, so that a batch of 64 KiB payloads is written in a few commands, not refused.
const INSERT_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// An upper bound on a claim's size besides its id.
const CLAIM_BYTES: usize = 128;
/// Write concern errors no retry cures: a `w` the replica set does not have.
const UNSATISFIABLE_CONCERN_CODES: &[i32] = &[79, 100];

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

/// What an insert did with one job of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Stored (now or before): these recipients' receipts were created by this call.
    New(Vec<UserId>),
    /// Its id is held by a message with other content: nothing of this job was kept.
    Conflict,
    /// The store refused it for good, with the server's reason.
    Failed(String),
}

/// A pending receipt with the notification to send for it.
#[derive(Debug)]
pub struct Sendable {
    pub receipt_id: String,
    pub user: UserId,
    pub notification: Notification,
}

#[derive(Clone)]
pub struct Store {
    messages: Collection<MessageDoc>,
    receipts: Collection<ReceiptDoc>,
    /// The receipts collection, untyped: for the projections of `pending_keys`.
    inbox: Collection<Document>,
    claims: Collection<ClaimDoc>,
    dead_letters: Collection<DeadLetterDoc>,
    db: Database,
    metrics: DependencyMetrics,
    /// Whether round trips keep up (see [`crate::pace`]).
    pace: StorePace,
    /// How long documents are kept past their expiry (`HERALD_RETENTION_DAYS`).
    retention: Duration,
}

/// Partitions of the resend sweep. Each dispatcher sweeps the partitions whose lock it takes, so
/// resending spreads over every dispatcher, and each scan is bounded to one partition's due
/// receipts.
pub const PARTITIONS: u16 = 16;
/// The sweep "partition" of receipts that have no `part` (written by an older version).
pub const LEGACY: u16 = PARTITIONS;

/// Which resend partition a user's receipts are in: a stable hash of the user id, the same in
/// every process and version (the first two bytes of its SHA-256).
pub fn partition_of(user: &UserId) -> u16 {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(user.as_str().as_bytes());
    u16::from_be_bytes([hash[0], hash[1]]) % PARTITIONS
}

/// The `_id` of `user`'s receipt of `message_id`: the pair, as one string. Injective because
/// a [`MessageId`] cannot hold `/` (the type's grammar, checked wherever one is built, an ack
/// frame included): the first `/` always ends the message id, whatever the user id holds.
///
/// (MongoDB's natural form is a subdocument `_id: {m, u}`. The nx-27017 test server cannot
/// match a subdocument `_id`, and scans the table for dotted paths; see docs/NOTES.md.)
pub fn receipt_key(message_id: &MessageId, user: &UserId) -> String {
    format!("{message_id}/{user}")
}

pub fn date(ms: u64) -> DateTime {
    DateTime::from_millis(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn millis(d: DateTime) -> u64 {
    u64::try_from(d.timestamp_millis()).unwrap_or(0)
}

impl Store {
    /// `retention`: how long what is stored is kept past its expiry (`purge_at`, which a TTL
    /// index enforces). Documents keep the `purge_at` they were written with.
    pub fn new(db: Database, metrics: DependencyMetrics, retention: Duration) -> Self {
        Self {
            retention,
            messages: db.collection(collections::MESSAGES),
            receipts: db.collection(collections::RECEIPTS),
            inbox: db.collection(collections::RECEIPTS),
            claims: db.collection(collections::RECEIPTS),
            dead_letters: db.collection(collections::DEAD_LETTERS),
            db,
            metrics,
            pace: StorePace::default(),
        }
    }

    /// When a message expiring at `expires_at_ms` and its receipts are deleted.
    fn purge_at(&self, expires_at_ms: u64) -> DateTime {
        let retention = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        date(expires_at_ms.saturating_add(retention))
    }

    /// Whether the store is slower than the load (see [`crate::pace`]).
    pub fn pace(&self) -> &StorePace {
        &self.pace
    }

    /// One round trip: bounded by [`OP_TIMEOUT`], timed in `herald_dependency_seconds`.
    async fn call<T, F>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let bounded = async { tokio::time::timeout(OP_TIMEOUT, call).await.unwrap_or(Err(StoreError::Timeout { op })) };
        let started = tokio::time::Instant::now();
        let result = self.metrics.time("mongodb", op, bounded).await;
        // Answers only: a store that fails is the readiness ping's to report.
        if result.is_ok() {
            self.pace.record(started.elapsed());
        }
        result
    }

    /// Creates the indexes every query here relies on; idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let ttl = || IndexOptions::builder().expire_after(Duration::ZERO).build();
        self.receipts
            .create_indexes([
                IndexModel::builder().keys(doc! { "user": 1, "state": 1, "seq": 1 }).build(),
                IndexModel::builder().keys(doc! { "message_id": 1 }).build(),
                IndexModel::builder().keys(doc! { "state": 1, "next_retry_at_ms": 1 }).build(),
                IndexModel::builder().keys(doc! { "state": 1, "part": 1, "next_retry_at_ms": 1 }).build(),
                IndexModel::builder().keys(doc! { "state": 1, "expires_at": 1 }).build(),
                // The oldest pending receipt, for its gauge (`pending_sample`).
                IndexModel::builder().keys(doc! { "state": 1, "created_at": 1 }).build(),
                IndexModel::builder().keys(doc! { "purge_at": 1 }).options(ttl()).build(),
            ])
            .await?;
        self.messages.create_index(IndexModel::builder().keys(doc! { "purge_at": 1 }).options(ttl()).build()).await?;
        self.db
            .collection::<Document>(collections::TOPIC_MESSAGES)
            .create_index(IndexModel::builder().keys(doc! { "purge_at": 1 }).options(ttl()).build())
            .await?;
        Ok(())
    }

    /// Stores a batch of jobs: the messages of those with several recipients, then, in one
    /// call, each job's claim on its id and one pending receipt per recipient (carrying the
    /// message when it is the only one). Two round trips per batch, one if every job has a
    /// single recipient (plus one per further [`RECEIPTS_PER_INSERT`] documents). Existing
    /// messages and receipts of the same job (a redelivered or re-published job) are left as
    /// they are, which makes the write idempotent; a job whose id is claimed by other content
    /// is a [`Stored::Conflict`] and what this call wrote of it is removed again.
    pub async fn insert(
        &self,
        jobs: &[&ValidJob],
        now_ms: u64,
        ack_timeout: Duration,
    ) -> Result<Vec<Stored>, StoreError> {
        let mut out = vec![Stored::New(Vec::new()); jobs.len()];
        if jobs.is_empty() {
            return Ok(out);
        }
        let purge_at = |job: &ValidJob| self.purge_at(job.expires_at_ms);
        let (shared, messages): (Vec<usize>, Vec<(MessageDoc, usize)>) = jobs
            .iter()
            .enumerate()
            .filter(|(_, job)| job.recipients.len() > 1)
            .map(|(index, job)| {
                let size = approx_doc_bytes(job, None);
                let message = MessageDoc {
                    id: job.message_id.clone(),
                    seq: job.seq as i64,
                    payload: job.payload.get().to_owned(),
                    published_at: date(job.published_at_ms),
                    expires_at: date(job.expires_at_ms),
                    recipients: job.recipients.len() as i64,
                    purge_at: purge_at(job),
                };
                (index, (message, size))
            })
            .unzip();
        // Which job wrote its message document in this call (to be removed on a conflict).
        let mut wrote_message = vec![false; jobs.len()];
        if !messages.is_empty() {
            let (inserted, failed) =
                self.insert_tolerating_duplicates("insert_messages", collections::MESSAGES, &messages).await?;
            for (i, was_inserted) in inserted.into_iter().enumerate() {
                wrote_message[shared[i]] = was_inserted;
            }
            for (i, reason) in failed {
                out[shared[i]] = Stored::Failed(reason);
            }
        }

        // Per job, in order: its claim, then its receipts. `owners[k]` is the job of document k.
        // Borrowed from the jobs and serialized straight to BSON by the driver (no `Document`
        // in between: that cost ~40 allocations a receipt).
        let mut owners = Vec::new();
        let mut documents = Vec::new();
        let mut users: Vec<Option<&UserId>> = Vec::new();
        let next_retry_at_ms = (now_ms + ack_timeout.as_millis() as u64) as i64;
        for (index, job) in jobs.iter().enumerate() {
            if matches!(out[index], Stored::Failed(_)) {
                continue;
            }
            let claim = NewClaim { id: &job.message_id, digest: &job.digest, purge_at: purge_at(job) };
            owners.push(index);
            users.push(None);
            documents.push((NewInboxDoc::Claim(claim), CLAIM_BYTES + job.message_id.as_str().len()));
            for user in &job.recipients {
                let receipt = NewReceipt {
                    id: ReceiptKey(&job.message_id, user),
                    message_id: &job.message_id,
                    user,
                    part: i32::from(partition_of(user)),
                    seq: job.seq as i64,
                    state: ReceiptState::Pending,
                    created_at: date(now_ms),
                    expires_at: date(job.expires_at_ms),
                    next_retry_at_ms,
                    purge_at: purge_at(job),
                    inline: (job.recipients.len() == 1)
                        .then(|| NewInline { payload: job.payload.get(), published_at: date(job.published_at_ms) }),
                };
                let size = approx_doc_bytes(job, Some(user));
                owners.push(index);
                users.push(Some(user));
                documents.push((NewInboxDoc::Receipt(receipt), size));
            }
        }
        let (inserted, failed) =
            self.insert_tolerating_duplicates("insert_receipts", collections::RECEIPTS, &documents).await?;
        for (k, reason) in failed {
            out[owners[k]] = Stored::Failed(reason);
        }
        // A claim that was there already: the same job again, or another job with this id.
        let mut reused: Vec<usize> = Vec::new();
        for (k, was_inserted) in inserted.iter().enumerate() {
            if users[k].is_none() && !was_inserted && !matches!(out[owners[k]], Stored::Failed(_)) {
                reused.push(owners[k]);
            }
        }
        let conflicts = self.conflicting(jobs, &reused).await?;
        // Receipts this call created for a conflicting job: the only ones to remove again.
        let mut undo = Vec::new();
        for (k, was_inserted) in inserted.into_iter().enumerate() {
            let (owner, Some(user)) = (owners[k], users[k]) else { continue };
            if !was_inserted {
                continue;
            }
            if conflicts.contains(&owner) {
                undo.push(receipt_key(&jobs[owner].message_id, user));
            } else if let Stored::New(users) = &mut out[owner] {
                users.push(user.clone());
            }
        }
        if !conflicts.is_empty() {
            self.undo_conflicting(jobs, &conflicts, &wrote_message, &undo).await?;
            for index in conflicts {
                out[index] = Stored::Conflict;
            }
        }
        Ok(out)
    }

    /// Of the jobs whose claim existed already, those whose stored claim has another digest.
    async fn conflicting(&self, jobs: &[&ValidJob], reused: &[usize]) -> Result<Vec<usize>, StoreError> {
        if reused.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = reused.iter().map(|i| jobs[*i].message_id.as_str()).collect();
        let find = async {
            let cursor = self.claims.find(doc! { "_id": { "$in": &ids } }).max_time(OP_TIMEOUT).await?;
            Ok(cursor.try_collect::<Vec<_>>().await?)
        };
        let stored: HashMap<MessageId, String> =
            self.call("find_claims", find).await?.into_iter().map(|c| (c.id, c.digest)).collect();
        Ok(reused
            .iter()
            .copied()
            .filter(|i| stored.get(&jobs[*i].message_id).is_some_and(|digest| *digest != jobs[*i].digest))
            .collect())
    }

    /// Removes what this call wrote for jobs that turned out to conflict: the receipts and
    /// message documents it created. What the stored message had is never touched. (Until
    /// this round trip ends, a replay could find such a receipt; docs/RELIABILITY.md.)
    async fn undo_conflicting(
        &self,
        jobs: &[&ValidJob],
        conflicts: &[usize],
        wrote_message: &[bool],
        receipts: &[String],
    ) -> Result<(), StoreError> {
        let messages: Vec<&str> =
            conflicts.iter().filter(|i| wrote_message[**i]).map(|i| jobs[*i].message_id.as_str()).collect();
        for id in conflicts.iter().map(|i| &jobs[*i].message_id) {
            tracing::warn!(message = %id, "a job reuses the id of a different message; rejected as id_conflict");
        }
        if !messages.is_empty() {
            let delete = async { Ok(self.messages.delete_many(doc! { "_id": { "$in": &messages } }).await?) };
            self.call("undo_conflict", delete).await?;
        }
        if !receipts.is_empty() {
            let delete = async { Ok(self.receipts.delete_many(doc! { "_id": { "$in": receipts } }).await?) };
            self.call("undo_conflict", delete).await?;
        }
        Ok(())
    }

    /// Inserts `docs` (each with its approximate size) unordered, in as few `insert` commands
    /// as their size allows: at most [`RECEIPTS_PER_INSERT`] documents and [`INSERT_BATCH_BYTES`]
    /// each, so that every call ends within [`OP_TIMEOUT`] and no batch of large payloads makes
    /// a command the server refuses for its size. Returns which were inserted, and the index and
    /// reason of each that failed for a reason other than "already there" (duplicates are what
    /// idempotency wants). A command the store refuses as a whole is split in two, down to one
    /// document, so a document that can never be stored fails alone.
    async fn insert_tolerating_duplicates<T: Serialize>(
        &self,
        op: &'static str,
        collection: &str,
        docs: &[(T, usize)],
    ) -> Result<(Vec<bool>, Vec<(usize, String)>), StoreError> {
        let mut inserted = vec![false; docs.len()];
        let mut failed = Vec::new();
        let mut start = 0;
        for command in pack(docs, RECEIPTS_PER_INSERT, INSERT_BATCH_BYTES) {
            // Each part with where it starts in `docs`.
            let mut parts = vec![(start, command)];
            start += command.len();
            while let Some((offset, part)) = parts.pop() {
                let command = insert_command(collection, part, self.db.write_concern())?;
                match self.call(op, async { Ok(self.db.run_raw_command(command).await?) }).await {
                    Ok(reply) => {
                        let outcome = insert_outcome(&reply, part.len())?;
                        for (i, was_inserted) in outcome.inserted.into_iter().enumerate() {
                            inserted[offset + i] = was_inserted;
                        }
                        failed.extend(outcome.failed.into_iter().map(|(i, reason)| (offset + i, reason)));
                    }
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) if part.len() == 1 => failed.push((offset, e.to_string())),
                    Err(_) => {
                        let (a, b) = part.split_at(part.len() / 2);
                        parts.push((offset + a.len(), b));
                        parts.push((offset, a));
                    }
                }
            }
        }
        Ok((inserted, failed))
    }

    /// Applies ack updates (see [`crate::acks::plan`]), as few commands as their size allows:
    /// at most [`UPDATE_BATCH`] statements and [`UPDATE_BATCH_BYTES`] each. A command the store
    /// refuses as a whole is split in two and each half tried alone, down to one statement, so a
    /// statement that can never be applied is dropped alone (logged, counted in the result)
    /// and takes no other user's acks with it. Each statement filters on the acking user as well
    /// as the key. Returns the receipts changed and the statements dropped.
    pub async fn apply_acks(&self, updates: &[AckUpdate]) -> Result<AckOutcome, StoreError> {
        let statements: Vec<(&AckUpdate, usize)> = updates.iter().map(|u| (u, u.approx_bytes())).collect();
        let mut outcome = AckOutcome::default();
        for command in pack(&statements, UPDATE_BATCH, UPDATE_BATCH_BYTES) {
            let mut parts = vec![command];
            while let Some(part) = parts.pop() {
                match self.update_command(part).await {
                    Ok(modified) => outcome.modified += modified,
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) if part.len() == 1 => {
                        tracing::error!(error = %e, "an ack update the store refuses for good; dropped alone");
                        outcome.dropped += 1;
                    }
                    Err(_) => {
                        let (a, b) = part.split_at(part.len() / 2);
                        parts.push(b);
                        parts.push(a);
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// One ordered `update` command. Write errors are classified like any store error: a
    /// transient one fails the command (retried whole: acks are idempotent), a permanent one
    /// fails it as refused (split by the caller).
    async fn update_command(&self, statements: &[(&AckUpdate, usize)]) -> Result<u64, StoreError> {
        let command = ack_command(statements, self.db.write_concern())?;
        let reply = self.call("apply_acks", async { Ok(self.db.run_raw_command(command).await?) }).await?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            if let Some(first) = errors.iter().find_map(|e| e.as_document()) {
                let code = code(first);
                let message = first.get_str("errmsg").unwrap_or("").to_owned();
                let class = if TRANSIENT_CODES.contains(&code) { ErrorClass::Transient } else { ErrorClass::Permanent };
                return Err(StoreError::WriteRefused { class, code, message });
            }
        }
        Ok(count(&reply, "nModified"))
    }

    /// The oldest pending, unexpired messages of each user, at most `per_user` each, oldest
    /// first, with their payloads (the query API).
    pub async fn pending_for(
        &self,
        users: &[&UserId],
        per_user: usize,
        now_ms: u64,
    ) -> Result<Vec<Sendable>, StoreError> {
        let receipts = self.pending_receipts_for(users, per_user, Some(now_ms)).await?;
        self.with_payloads(receipts).await
    }

    /// The oldest pending receipts of each user, at most `per_user` each, oldest first: the
    /// first page of a replay. With `unexpired_at`, only those unexpired then; without, expired
    /// ones that the sweeper has not marked yet are included, for the caller to judge (a replay
    /// does, from the notification: nx-27017 compares dates so slowly that the filter makes
    /// this query four times dearer, see docs/NOTES.md). Usually one round trip for any number
    /// of users; when one user's backlog fills the shared query, the users it crowded out get a
    /// query of their own.
    pub async fn pending_receipts_for(
        &self,
        users: &[&UserId],
        per_user: usize,
        unexpired_at: Option<u64>,
    ) -> Result<Vec<ReceiptDoc>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let limit = per_user * users.len();
        let mut receipts = self.pending_receipts(users, None, limit, unexpired_at).await?;
        let mut per = HashMap::<UserId, usize>::new();
        receipts.retain(|r| {
            let n = per.entry(r.user.clone()).or_default();
            *n += 1;
            *n <= per_user
        });
        if receipts.len() < limit && per.values().sum::<usize>() >= limit {
            for user in users.iter().filter(|u| per.get(**u).copied().unwrap_or(0) < per_user) {
                let have = per.get(*user).copied().unwrap_or(0);
                let mut more = self.pending_receipts(&[user], None, per_user, unexpired_at).await?;
                more.drain(..have.min(more.len()));
                receipts.extend(more);
            }
        }
        receipts.sort_by_key(|r| r.seq);
        Ok(receipts)
    }

    /// The oldest pending receipts of `users` after `after_seq` (None: from the oldest), at most
    /// `limit` in all, oldest first: one query for a round of replay pages (see
    /// `crate::replay::share`). Expired ones that the sweeper has not marked yet are included, as
    /// in [`Self::pending_receipts_for`].
    pub async fn pending_receipts_after(
        &self,
        users: &[&UserId],
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReceiptDoc>, StoreError> {
        self.pending_receipts(users, after_seq, limit, None).await
    }

    async fn pending_receipts(
        &self,
        users: &[&UserId],
        after_seq: Option<u64>,
        limit: usize,
        unexpired_at: Option<u64>,
    ) -> Result<Vec<ReceiptDoc>, StoreError> {
        // One user by equality: nx-27017 runs `$in` as a scan of a JSON array per document
        // (37 ms against 14 ms for one user's page at 10,000 receipts).
        let user = match users {
            [one] => mongodb::bson::Bson::from(one.as_str()),
            _ => mongodb::bson::Bson::from(doc! { "$in": users.iter().map(|u| u.as_str()).collect::<Vec<_>>() }),
        };
        let mut filter = doc! { "user": user, "state": ReceiptState::Pending.as_str() };
        if let Some(now_ms) = unexpired_at {
            filter.insert("expires_at", doc! { "$gt": date(now_ms) });
        }
        if let Some(after) = after_seq {
            filter.insert("seq", doc! { "$gt": i64::try_from(after).unwrap_or(i64::MAX) });
        }
        let find = async {
            let cursor =
                self.receipts.find(filter).sort(doc! { "seq": 1 }).limit(limit as i64).max_time(OP_TIMEOUT).await?;
            Ok(cursor.try_collect().await?)
        };
        self.call("pending_receipts", find).await
    }

    /// The partitions that have receipts due for a resend (one indexed `distinct`), so that a
    /// sweep scans only those. [`LEGACY`] is not among them: it is swept every interval.
    pub async fn due_partitions(&self, now_ms: u64) -> Result<Vec<u16>, StoreError> {
        let filter = doc! { "state": ReceiptState::Pending.as_str(), "next_retry_at_ms": { "$lte": now_ms as i64 } };
        let distinct = async { Ok(self.receipts.distinct("part", filter).max_time(OP_TIMEOUT).await?) };
        let values = self.call("due_partitions", distinct).await?;
        Ok(values
            .into_iter()
            .filter_map(|v| v.as_i32().or_else(|| v.as_i64().and_then(|n| i32::try_from(n).ok())))
            .filter_map(|n| u16::try_from(n).ok())
            .filter(|p| *p < PARTITIONS)
            .collect())
    }

    /// Pending receipts of one partition ([`LEGACY`]: those without one) whose ack timeout
    /// passed: sent to a connected client that did not ack. Oldest deadline first.
    pub async fn due_for_retry(
        &self,
        partition: u16,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<ReceiptDoc>, StoreError> {
        let part = if partition >= LEGACY {
            mongodb::bson::Bson::Document(doc! { "$exists": false })
        } else {
            mongodb::bson::Bson::Int32(i32::from(partition))
        };
        let filter = doc! {
            "state": ReceiptState::Pending.as_str(),
            "part": part,
            "next_retry_at_ms": { "$lte": now_ms as i64 },
        };
        let find = async {
            let cursor = self
                .receipts
                .find(filter)
                .sort(doc! { "next_retry_at_ms": 1 })
                .limit(limit as i64)
                .max_time(OP_TIMEOUT)
                .await?;
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
                    doc! { "_id": { "$in": receipt_ids }, "state": ReceiptState::Pending.as_str() },
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
                    doc! { "state": ReceiptState::Pending.as_str(), "expires_at": { "$lte": date(now_ms) } },
                    doc! { "$set": { "state": ReceiptState::Expired.as_str(), "expired_at_ms": now_ms as i64, "next_retry_at_ms": null } },
                )
                .await?)
        };
        Ok(self.call("expire", update).await?.modified_count)
    }

    /// Of these receipt keys, those whose receipt is still pending: whom a job seen before may be
    /// routed to again. One query per [`RECEIPTS_PER_INSERT`] keys.
    pub async fn pending_keys(&self, keys: &[String]) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut pending = std::collections::HashSet::new();
        for chunk in keys.chunks(RECEIPTS_PER_INSERT) {
            let filter = doc! { "_id": { "$in": chunk }, "state": ReceiptState::Pending.as_str() };
            let find = async {
                let cursor = self.inbox.find(filter).projection(doc! { "_id": 1 }).max_time(OP_TIMEOUT).await?;
                Ok(cursor.try_collect::<Vec<Document>>().await?)
            };
            for row in self.call("pending_keys", find).await? {
                if let Ok(id) = row.get_str("_id") {
                    pending.insert(id.to_owned());
                }
            }
        }
        Ok(pending)
    }

    /// The digest of the content a message id is claimed by, if any job has claimed it.
    pub async fn claim_digest(&self, id: &MessageId) -> Result<Option<String>, StoreError> {
        let id = id.as_str();
        let find = async { Ok(self.claims.find_one(doc! { "_id": id }).max_time(OP_TIMEOUT).await?) };
        Ok(self.call("find_claim", find).await?.map(|claim| claim.digest))
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

/// What applying a batch of ack updates did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AckOutcome {
    /// Receipts changed.
    pub modified: u64,
    /// Statements the store refused for good, each alone.
    pub dropped: u64,
}

/// What the reply to an unordered `insert` says of each of its `len` documents.
#[derive(Debug, PartialEq, Eq)]
struct InsertOutcome {
    inserted: Vec<bool>,
    /// Index and reason of each document refused for a reason other than "already there".
    failed: Vec<(usize, String)>,
}

/// Reads an `insert` reply: each entry of `writeErrors` names a document not inserted (a
/// duplicate key is one already there). A `writeConcernError` fails the whole call: the
/// documents may be on the primary only, and the call is retried (inserts are idempotent),
/// except for a concern the replica set can never satisfy, which is permanent.
fn insert_outcome(reply: &Document, len: usize) -> Result<InsertOutcome, StoreError> {
    if let Ok(concern) = reply.get_document("writeConcernError") {
        let code = code(concern);
        let class =
            if UNSATISFIABLE_CONCERN_CODES.contains(&code) { ErrorClass::Permanent } else { ErrorClass::Transient };
        let message = concern.get_str("errmsg").unwrap_or("").to_owned();
        return Err(StoreError::WriteRefused { class, code, message: format!("write concern: {message}") });
    }
    let mut outcome = InsertOutcome { inserted: vec![true; len], failed: Vec::new() };
    for error in reply.get_array("writeErrors").into_iter().flatten().filter_map(|e| e.as_document()) {
        let index = int(error, "index").and_then(|i| usize::try_from(i).ok()).filter(|i| *i < len);
        let Some(index) = index else { continue };
        outcome.inserted[index] = false;
        if code(error) != DUPLICATE_KEY {
            outcome.failed.push((index, error.get_str("errmsg").unwrap_or("refused").to_owned()));
        }
    }
    Ok(outcome)
}

/// An integer field of a reply, whichever width the server wrote it in.
fn int(doc: &Document, key: &str) -> Option<i64> {
    match doc.get(key)? {
        mongodb::bson::Bson::Int32(i) => Some(i64::from(*i)),
        mongodb::bson::Bson::Int64(i) => Some(*i),
        _ => None,
    }
}

/// A count in a reply (`n`, `nModified`), 0 if it has none that fits.
fn count(doc: &Document, key: &str) -> u64 {
    int(doc, key).and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

/// The `code` of an error in a reply (0 if it has none that fits).
fn code(error: &Document) -> i32 {
    int(error, "code").and_then(|c| i32::try_from(c).ok()).unwrap_or(0)
}

/// An upper bound on the BSON size of a job's receipt for `user`, or of its message document
/// (`None`): its payload (inline in a one-recipient receipt), its ids (a receipt key escapes
/// them, at most three bytes a byte) and the fixed fields. For packing commands only.
fn approx_doc_bytes(job: &ValidJob, user: Option<&UserId>) -> usize {
    let ids = job.message_id.as_str().len() + user.map_or(0, |u| u.as_str().len());
    job.payload.get().len() + 4 * ids + 256
}

/// Splits `items` (each with its size in bytes) into runs of at most `max_count` items and
/// `max_bytes` bytes, in order; an item larger than `max_bytes` goes alone.
pub fn pack<T>(items: &[(T, usize)], max_count: usize, max_bytes: usize) -> Vec<&[(T, usize)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, size)) in items.iter().enumerate() {
        if i > start && (i - start >= max_count || bytes + size > max_bytes) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Duplicates are documents already there, not failures; another write error fails its own
    /// document only; a write concern error fails the call, retried unless no retry can help.
    /// Servers write counts as int32 or int64; a topic ack's count read only int32.
    #[test]
    fn a_count_in_a_reply_reads_either_width() {
        let reply = doc! { "n": 3, "nModified": 5_i64, "bad": "x", "negative": -1 };
        assert_eq!((count(&reply, "n"), count(&reply, "nModified")), (3, 5));
        assert_eq!((count(&reply, "bad"), count(&reply, "negative"), count(&reply, "missing")), (0, 0, 0));
    }

    #[test]
    fn an_insert_reply_is_read_document_by_document() {
        let reply = doc! {
            "n": 2,
            "writeErrors": [
                { "index": 1, "code": DUPLICATE_KEY, "errmsg": "E11000 duplicate key" },
                { "index": 3, "code": 121, "errmsg": "Document failed validation" },
                { "index": 9, "code": 121, "errmsg": "an index past the command's documents" },
            ],
            "ok": 1,
        };
        let outcome = insert_outcome(&reply, 4).unwrap();
        assert_eq!(outcome.inserted, vec![true, false, true, false]);
        assert_eq!(outcome.failed, vec![(3, "Document failed validation".to_owned())]);
        assert_eq!(insert_outcome(&doc! { "n": 2, "ok": 1 }, 2).unwrap().inserted, vec![true, true]);
        // Fields written as int64 read the same.
        let wide = doc! { "writeErrors": [{ "index": 0_i64, "code": i64::from(DUPLICATE_KEY), "errmsg": "dup" }] };
        assert_eq!(insert_outcome(&wide, 1).unwrap(), InsertOutcome { inserted: vec![false], failed: Vec::new() });

        let concern = |code: i32| doc! { "n": 1, "writeConcernError": { "code": code, "errmsg": "waiting" }, "ok": 1 };
        let timed_out = insert_outcome(&concern(64), 1).unwrap_err();
        assert!(timed_out.is_transient(), "{timed_out}");
        let unsatisfiable = insert_outcome(&concern(100), 1).unwrap_err();
        assert!(!unsatisfiable.is_transient(), "{unsatisfiable}");
    }

    #[test]
    fn commands_are_packed_by_count_and_by_bytes_in_order() {
        let items: Vec<(u32, usize)> = (0..10).map(|i| (i, 100)).collect();
        let sizes = |runs: Vec<&[(u32, usize)]>| runs.iter().map(|r| r.len()).collect::<Vec<_>>();
        assert_eq!(sizes(pack(&items, 4, 10_000)), vec![4, 4, 2]);
        assert_eq!(sizes(pack(&items, 100, 250)), vec![2, 2, 2, 2, 2]);
        let huge = [(0, 10), (1, 5_000), (2, 10)];
        assert_eq!(sizes(pack(&huge, 100, 1_000)), vec![1, 1, 1], "an item over the budget goes alone");
        let flat: Vec<u32> = pack(&items, 3, 250).into_iter().flatten().map(|(i, _)| *i).collect();
        assert_eq!(flat, (0..10).collect::<Vec<_>>());
        assert!(pack::<u32>(&[], 3, 250).is_empty());
    }

    #[test]
    fn receipt_keys_are_injective_whatever_the_user_id_holds() {
        let key = |m: &str, u: &str| receipt_key(&MessageId::new(m).unwrap(), &UserId::new(u).unwrap());
        // The forgery of issue 10: ("m1", "org/alice") and ("m1/org", "alice") cannot both exist,
        // because "m1/org" is not a message id.
        assert!(MessageId::new("m1/org").is_err());
        let pairs = [("m1", "org/alice"), ("m1", "org"), ("m1", "alice"), ("m1.org", "alice"), ("m", "1/org/alice")];
        let keys: std::collections::HashSet<String> = pairs.iter().map(|(m, u)| key(m, u)).collect();
        assert_eq!(keys.len(), pairs.len());
        // A claim's key (the bare message id) never equals a receipt's.
        assert!(pairs.iter().all(|(m, u)| key(m, u) != *m));
    }
}
