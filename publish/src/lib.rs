//! Publishing to Herald, for any Rust publisher and for Herald itself.
//!
//! * [`validate`]: the one validator of a publish job. The dispatcher's pipeline runs it on every
//!   job it pulls; its HTTP publish API and [`Publisher`] run it before anything is published, so
//!   a bad job is refused with the code the pipeline would have rejected it with.
//! * [`Publisher`]: puts a valid job on the jobs stream with the headers the protocol asks for
//!   (`Nats-Msg-Id`, `traceparent`), waits for JetStream's ack, and answers with the message id
//!   the dispatchers will give it. It never creates a stream: a deployment whose streams do not
//!   exist (a wrong prefix) is an error, not a new stream nothing consumes.
//! * [`rejections`]: reads back what the dispatchers refused or dead-lettered.
//!
//! Stream and subject names come from the caller (Herald names them in `herald-shared`), so this
//! crate needs only the wire contract and a NATS client.

use async_nats::jetstream::{self, context::GetStreamErrorKind, ErrorCode};
use async_nats::HeaderMap;
use herald_proto::{MessageId, RejectCode};

pub mod rejections;
pub mod validate;

use validate::{Invalid, JobMeta, Limits, ValidJob};

/// Where jobs go: the jobs stream and the subject (one of the stream's) to publish on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub stream: String,
    pub subject: String,
}

/// What JetStream answered for one job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    /// The message id clients will see and the query API knows the message by.
    pub id: MessageId,
    /// The job's sequence in the jobs stream (the notification's `seq`). For a duplicate, the
    /// sequence of the job it repeats.
    pub seq: u64,
    pub stream: String,
    /// JetStream dropped this publish: a job with the same `Nats-Msg-Id` was published within
    /// the duplicate window.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The job is not one the dispatchers would accept; nothing was published.
    #[error("rejected ({}): {}", code_str(.0.code), .0.reason)]
    Rejected(Invalid),
    /// The jobs stream does not exist: a wrong prefix, or Herald never started here.
    #[error("stream {stream} does not exist (is the prefix right? publishing never creates it)")]
    NoStream { stream: String },
    /// The subject belongs to another stream than the jobs stream.
    #[error("subject {subject} is stored by stream {got}, not {want}")]
    WrongStream { subject: String, want: String, got: String },
    #[error("looking up stream {stream}: {source}")]
    Lookup {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// NATS did not take the job, or JetStream did not ack it in time: whether it was stored is
    /// unknown. Publishing it again with the same id is safe.
    #[error("publishing on {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
}

/// The snake_case code of a rejection, as on the wire.
pub fn code_str(code: RejectCode) -> &'static str {
    match code {
        RejectCode::Malformed => "malformed",
        RejectCode::PayloadTooLarge => "payload_too_large",
        RejectCode::NoRecipients => "no_recipients",
        RejectCode::TooManyRecipients => "too_many_recipients",
        RejectCode::InvalidId => "invalid_id",
        RejectCode::InvalidRecipient => "invalid_recipient",
        RejectCode::InvalidTtl => "invalid_ttl",
        RejectCode::InvalidTopic => "invalid_topic",
        RejectCode::IdConflict => "id_conflict",
        RejectCode::DeadLetter => "dead_letter",
    }
}

/// Prefix of the ids [`prepare`] gives jobs that have neither an `id` nor an idempotency key.
pub const GENERATED_ID_PREFIX: &str = "auto-";

/// A job that passed validation, ready to publish: its bytes as given, the `Nats-Msg-Id` it
/// goes with, and what the pipeline will make of it.
#[derive(Debug, Clone)]
pub struct Prepared {
    body: bytes::Bytes,
    msg_id: MessageId,
    /// The job as the pipeline will read it. Its id is final; its sequence and times are not
    /// known before JetStream stores it (they read 0).
    pub job: ValidJob,
}

impl Prepared {
    /// The message id the job will have.
    pub fn id(&self) -> &MessageId {
        &self.job.message_id
    }
}

/// Validates `body` (a job as JSON) as the dispatchers will, and decides its `Nats-Msg-Id`: the
/// idempotency `key` when given, else the job's `id`, else a generated one.
///
/// A job without `id` gets its message id from the header (proto/README.md, "Ids"), so the id is
/// known before JetStream answers, and the answer can name it. (The other form, `seq-<seq>-<ns>`,
/// depends on the time JetStream stored the job, which its ack does not carry.) The key must be a
/// message id a publisher may choose; anything else is refused as `invalid_id`, because the
/// pipeline would silently fall back to a derived id for it.
pub fn prepare(body: &[u8], key: Option<&str>, subject: &str, limits: &Limits) -> Result<Prepared, Invalid> {
    let key = match key {
        Some(key) => Some(validate::publisher_id(key).ok_or_else(|| Invalid {
            job_id: None,
            code: RejectCode::InvalidId,
            reason: format!("the idempotency key must be {}, not starting with \"seq-\"", MessageId::RULE),
        })?),
        None => None,
    };
    let generated = generated_id();
    let header = key.as_ref().unwrap_or(&generated);
    let meta =
        JobMeta { stream_seq: 0, published_at_ms: 0, published_at_ns: 0, subject, msg_id: Some(header.as_str()) };
    let job = validate::validate(body, &meta, limits)?;
    // With a key, JetStream deduplicates by the key; without one, by the job's own id.
    let msg_id = key.unwrap_or_else(|| job.message_id.clone());
    Ok(Prepared { body: bytes::Bytes::copy_from_slice(body), msg_id, job })
}

fn generated_id() -> MessageId {
    let id = format!("{GENERATED_ID_PREFIX}{}", uuid::Uuid::new_v4().simple());
    // 5 + 32 characters of [a-z0-9-]: always a valid message id.
    MessageId::new(id).unwrap_or_else(|_| unreachable!("a generated id is a valid message id"))
}

/// Publishes jobs to one deployment's jobs stream.
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    destination: Destination,
    limits: Limits,
}

impl Publisher {
    /// A publisher for `destination`, once the jobs stream is known to exist. It is looked up,
    /// never created.
    pub async fn new(js: jetstream::Context, destination: Destination, limits: Limits) -> Result<Self, PublishError> {
        match js.get_stream(&destination.stream).await {
            Ok(_) => Ok(Self { js, destination, limits }),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(inner) if inner.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                    Err(PublishError::NoStream { stream: destination.stream })
                }
                _ => Err(PublishError::Lookup { stream: destination.stream, source: e }),
            },
        }
    }

    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Validates a job; see [`prepare`].
    pub fn prepare(&self, body: &[u8], key: Option<&str>) -> Result<Prepared, Invalid> {
        prepare(body, key, &self.destination.subject, &self.limits)
    }

    /// Validates and publishes one job, and waits for JetStream's ack.
    pub async fn publish(&self, body: &[u8], key: Option<&str>) -> Result<Published, PublishError> {
        let prepared = self.prepare(body, key).map_err(PublishError::Rejected)?;
        self.send(&prepared, None).await
    }

    /// Publishes a prepared job with its headers (and `traceparent`, to continue a trace), and
    /// waits for JetStream's ack.
    pub async fn send(&self, prepared: &Prepared, traceparent: Option<&str>) -> Result<Published, PublishError> {
        let ack = self.start(prepared, traceparent).await?;
        self.finish(prepared, ack.await)
    }

    /// Publishes several prepared jobs, all sent before any ack is awaited; one outcome per job,
    /// in order.
    pub async fn send_all(&self, prepared: &[Prepared]) -> Vec<Result<Published, PublishError>> {
        let mut pending = Vec::with_capacity(prepared.len());
        for job in prepared {
            pending.push(self.start(job, None).await);
        }
        let acks = futures::future::join_all(pending.into_iter().map(|started| async move {
            match started {
                Ok(ack) => Ok(ack.await),
                Err(e) => Err(e),
            }
        }))
        .await;
        prepared.iter().zip(acks).map(|(job, ack)| ack.and_then(|ack| self.finish(job, ack))).collect()
    }

    async fn start(
        &self,
        prepared: &Prepared,
        traceparent: Option<&str>,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, prepared.msg_id.as_str());
        if let Some(traceparent) = traceparent {
            headers.insert("traceparent", traceparent);
        }
        let subject = self.destination.subject.clone();
        self.js
            .publish_with_headers(subject.clone(), headers, prepared.body.clone())
            .await
            .map_err(|source| PublishError::Publish { subject, source })
    }

    fn finish(
        &self,
        prepared: &Prepared,
        ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) -> Result<Published, PublishError> {
        let ack = ack.map_err(|source| PublishError::Publish { subject: self.destination.subject.clone(), source })?;
        if ack.stream != self.destination.stream {
            return Err(PublishError::WrongStream {
                subject: self.destination.subject.clone(),
                want: self.destination.stream.clone(),
                got: ack.stream,
            });
        }
        Ok(Published { id: prepared.id().clone(), seq: ack.sequence, stream: ack.stream, duplicate: ack.duplicate })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 64,
            max_recipients: 3,
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
        }
    }

    fn prep(body: &str, key: Option<&str>) -> Result<Prepared, Invalid> {
        prepare(body.as_bytes(), key, "herald.publish.t", &limits())
    }

    #[test]
    fn the_message_id_is_the_jobs_then_the_keys_then_a_generated_one() {
        let with_id = prep(r#"{"id":"order-1","to":["a"],"payload":1}"#, None).unwrap();
        assert_eq!((with_id.id().as_str(), with_id.msg_id.as_str()), ("order-1", "order-1"));

        let keyed = prep(r#"{"to":["a"],"payload":1}"#, Some("key-1")).unwrap();
        assert_eq!((keyed.id().as_str(), keyed.msg_id.as_str()), ("key-1", "key-1"));

        // Both: the job's id is the message id (as in the pipeline), the key deduplicates.
        let both = prep(r#"{"id":"order-2","to":["a"],"payload":1}"#, Some("key-2")).unwrap();
        assert_eq!((both.id().as_str(), both.msg_id.as_str()), ("order-2", "key-2"));

        let bare = prep(r#"{"to":["a"],"payload":1}"#, None).unwrap();
        assert!(bare.id().as_str().starts_with(GENERATED_ID_PREFIX), "{}", bare.id());
        assert_eq!(bare.id(), &bare.msg_id);
        let other = prep(r#"{"to":["a"],"payload":1}"#, None).unwrap();
        assert_ne!(bare.id(), other.id(), "every generated id is new");
    }

    #[test]
    fn the_pipeline_gives_a_prepared_job_the_id_the_answer_names() {
        // What a dispatcher reads back: the same body with the header `prepare` chose.
        for (body, key) in [
            (r#"{"to":["a"],"payload":1}"#, None),
            (r#"{"to":["a"],"payload":1}"#, Some("k-9")),
            (r#"{"id":"x.1","to":["a"],"payload":1}"#, Some("k-9")),
        ] {
            let prepared = prep(body, key).unwrap();
            let meta = JobMeta {
                stream_seq: 41,
                published_at_ms: 5,
                published_at_ns: 5_000_000,
                subject: "herald.publish.t",
                msg_id: Some(prepared.msg_id.as_str()),
            };
            let pulled = validate::validate(&prepared.body, &meta, &limits()).unwrap();
            assert_eq!(&pulled.message_id, prepared.id(), "{body} {key:?}");
            assert_eq!(pulled.digest, prepared.job.digest);
        }
    }

    #[test]
    fn bad_jobs_and_bad_keys_are_refused_with_the_pipelines_codes() {
        assert_eq!(prep(r#"{"to":["a"],"payload":1,"ttl_secs":0}"#, None).unwrap_err().code, RejectCode::InvalidTtl);
        assert_eq!(prep(r#"{"id":"bad id!","to":["a"],"payload":1}"#, None).unwrap_err().code, RejectCode::InvalidId);
        assert_eq!(prep("{not json", None).unwrap_err().code, RejectCode::Malformed);
        for key in ["seq-1-2", "has space", ""] {
            assert_eq!(
                prep(r#"{"to":["a"],"payload":1}"#, Some(key)).unwrap_err().code,
                RejectCode::InvalidId,
                "{key:?}"
            );
        }
        assert_eq!(code_str(RejectCode::IdConflict), "id_conflict");
        for code in [RejectCode::Malformed, RejectCode::DeadLetter, RejectCode::PayloadTooLarge] {
            assert_eq!(serde_json::to_value(code).unwrap(), code_str(code));
        }
    }
}
