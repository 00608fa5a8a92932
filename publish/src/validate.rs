//! Validation of publish jobs: from the bytes on the stream to a job the store can take, or a
//! rejection with a reason the publisher can read. Pure: no I/O.

use std::collections::HashSet;
use std::time::Duration;

use herald_proto::ids::MAX_MESSAGE_ID_BYTES;
use herald_proto::{MessageId, PublishJob, RejectCode, TopicName, UserId};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// Limits from the dispatcher's configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_recipients: usize,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

/// Where a job sat in the stream, from its JetStream metadata.
#[derive(Debug, Clone, Copy)]
pub struct JobMeta<'a> {
    pub stream_seq: u64,
    pub published_at_ms: u64,
    /// The stream's timestamp of the job in nanoseconds. With the sequence it names the job
    /// uniquely even across a re-created stream, whose sequences start at 1 again.
    pub published_at_ns: u128,
    pub subject: &'a str,
    /// The `Nats-Msg-Id` header, if the publisher set one.
    pub msg_id: Option<&'a str>,
}

/// A job that passed validation.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub message_id: MessageId,
    pub seq: u64,
    /// Distinct recipients, in the order first named; empty for a topic job.
    pub recipients: Vec<UserId>,
    /// The topic of a topic job (`topic` in place of `to`); None for a job to users. A topic
    /// job is published once to the topics stream and never stored per recipient.
    pub topic: Option<TopicName>,
    pub payload: Box<RawValue>,
    pub published_at_ms: u64,
    pub expires_at_ms: u64,
    /// What makes two jobs with one id the same job: [`digest`] of its content.
    pub digest: String,
}

/// Why a job was refused, with what could be read of its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub job_id: Option<String>,
    pub code: RejectCode,
    pub reason: String,
}

/// Ids the dispatcher makes for jobs without one; publishers may not use the form.
const DERIVED_ID_PREFIX: &str = "seq-";
/// Deepest nesting of arrays and objects a payload may have. Generous for any notification,
/// and well inside what every JSON parser on the path (serde_json's 128, browsers') accepts.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// A message id a publisher may choose: any [`MessageId`] not of the form Herald assigns.
pub fn publisher_id(id: &str) -> Option<MessageId> {
    if id.starts_with(DERIVED_ID_PREFIX) {
        return None;
    }
    MessageId::new(id).ok()
}

/// The id of a job published without one: `seq-<stream sequence>-<stream timestamp, ns>`. The
/// same for every redelivery of the job, and never that of another job, even once the stream
/// has been re-created and its sequences restart at 1.
pub fn derived_id(stream_seq: u64, published_at_ns: u128) -> MessageId {
    // Digits only after a fixed prefix: always a valid message id (at most 4 + 20 + 1 + 39 bytes).
    MessageId::new(format!("{DERIVED_ID_PREFIX}{stream_seq}-{published_at_ns}"))
        .unwrap_or_else(|_| unreachable!("a derived id is a valid message id"))
}

/// What identifies a job's content, independent of when and where it sat in the stream: the
/// payload's exact bytes, the TTL as asked for, and the set of recipients. A redelivered or
/// re-published job has the same digest; a different job reusing the id does not.
pub fn digest(payload: &str, ttl_secs: Option<u64>, recipients: &[UserId]) -> String {
    digest_of(payload, ttl_secs, recipients, None)
}

/// [`digest`] of a job to users, or of a topic job (whose topic is its only "recipient", and
/// distinct from any user list by a separator no user id holds).
fn digest_of(payload: &str, ttl_secs: Option<u64>, recipients: &[UserId], topic: Option<&TopicName>) -> String {
    let mut sorted: Vec<&str> = recipients.iter().map(UserId::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut hash = Sha256::new();
    hash.update(b"herald-job-v1\0");
    hash.update(payload.as_bytes());
    hash.update(format!("\0{ttl_secs:?}\0").as_bytes());
    // User ids hold no control characters, so NUL separates them unambiguously.
    for user in sorted {
        hash.update(user.as_bytes());
        hash.update(b"\0");
    }
    if let Some(topic) = topic {
        hash.update(b"\x01topic\0");
        hash.update(topic.as_str().as_bytes());
    }
    hex::encode(hash.finalize())
}

/// How deeply arrays and objects nest in a JSON text (which must be valid JSON).
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

pub fn validate(body: &[u8], meta: &JobMeta<'_>, limits: &Limits) -> Result<ValidJob, Invalid> {
    // serde reads a struct from a JSON array too, field by field (`[null, ["bob"], {}]`); the
    // protocol's job is an object, and nothing else is taken for one.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Invalid {
            job_id: None,
            code: RejectCode::Malformed,
            reason: "not a publish job: expected a JSON object".into(),
        });
    }
    let job: PublishJob = serde_json::from_slice(body).map_err(|e| Invalid {
        job_id: salvage_id(body),
        code: RejectCode::Malformed,
        reason: format!("not a publish job: {e}"),
    })?;
    let reject = |code, reason: String| Invalid { job_id: job.id.clone(), code, reason };

    let message_id = match (&job.id, meta.msg_id) {
        (Some(id), _) => publisher_id(id).ok_or_else(|| {
            reject(
                RejectCode::InvalidId,
                format!("id must be {}, not starting with {DERIVED_ID_PREFIX:?}", MessageId::RULE),
            )
        })?,
        (None, Some(header)) => {
            publisher_id(header).unwrap_or_else(|| derived_id(meta.stream_seq, meta.published_at_ns))
        }
        (None, None) => derived_id(meta.stream_seq, meta.published_at_ns),
    };
    if job.payload.get().len() > limits.max_payload_bytes {
        return Err(reject(
            RejectCode::PayloadTooLarge,
            format!("payload is {} bytes; the limit is {}", job.payload.get().len(), limits.max_payload_bytes),
        ));
    }
    let depth = json_depth(job.payload.get());
    if depth > MAX_PAYLOAD_DEPTH {
        return Err(reject(
            RejectCode::Malformed,
            format!("payload nests {depth} levels deep; the limit is {MAX_PAYLOAD_DEPTH}"),
        ));
    }
    let (recipients, topic) = match (&job.to, &job.topic) {
        (_, Some(topic)) => match TopicName::new(topic.as_str()) {
            Ok(topic) => (Vec::new(), Some(topic)),
            Err(_) => {
                return Err(reject(RejectCode::InvalidTopic, format!("topic {topic:?} must be {}", TopicName::RULE)))
            }
        },
        (Some(to), None) => (recipients(to, limits).map_err(|(code, reason)| reject(code, reason))?, None),
        // The decoder refuses a job without either.
        (None, None) => return Err(reject(RejectCode::Malformed, "a job has `to` or `topic`".into())),
    };
    let ttl = match job.ttl_secs {
        None => limits.default_ttl,
        Some(0) => return Err(reject(RejectCode::InvalidTtl, "ttl_secs must be at least 1".into())),
        Some(secs) if Duration::from_secs(secs) > limits.max_ttl => {
            return Err(reject(
                RejectCode::InvalidTtl,
                format!("ttl_secs {secs} exceeds the limit of {}", limits.max_ttl.as_secs()),
            ))
        }
        Some(secs) => Duration::from_secs(secs),
    };
    let digest = digest_of(job.payload.get(), job.ttl_secs, &recipients, topic.as_ref());
    Ok(ValidJob {
        message_id,
        seq: meta.stream_seq,
        recipients,
        topic,
        payload: job.payload,
        published_at_ms: meta.published_at_ms,
        expires_at_ms: meta.published_at_ms.saturating_add(ttl.as_millis() as u64),
        digest,
    })
}

/// The distinct recipients of a job to users, or why they are not acceptable.
fn recipients(to: &[String], limits: &Limits) -> Result<Vec<UserId>, (RejectCode, String)> {
    if to.is_empty() {
        return Err((RejectCode::NoRecipients, "`to` names no recipient".into()));
    }
    if to.len() > limits.max_recipients {
        return Err((
            RejectCode::TooManyRecipients,
            format!("{} recipients; the limit is {}", to.len(), limits.max_recipients),
        ));
    }
    let mut recipients = Vec::with_capacity(to.len());
    let mut seen = HashSet::with_capacity(to.len());
    for user in to {
        let Ok(user) = UserId::new(user.as_str()) else {
            return Err((RejectCode::InvalidRecipient, format!("recipient {user:?} must be {}", UserId::RULE)));
        };
        if seen.insert(user.clone()) {
            recipients.push(user);
        }
    }
    Ok(recipients)
}

/// The `id` of a job that failed to decode as a whole, when it can still be read: it lets the
/// publisher match the rejection to what it sent.
fn salvage_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    serde_json::from_slice::<IdOnly>(body).ok()?.id.filter(|id| id.len() <= MAX_MESSAGE_ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digests are stored with each message and compared when its id is published again, so
    /// their text must never change: these are the values every release has written.
    #[test]
    fn digests_are_the_stored_ones() {
        let users = [UserId::new("bob").unwrap(), UserId::new("alice").unwrap(), UserId::new("bob").unwrap()];
        assert_eq!(
            digest(r#"{"k":1}"#, Some(60), &users),
            "a10c082622c9fd9aba08cffd5feebf7f532a4d02d1614ae045aabec41258a582"
        );
        let topic = TopicName::new("news").unwrap();
        assert_eq!(
            digest_of(r#"{"k":1}"#, None, &[], Some(&topic)),
            "645a086ca173bd398aecb89817be598d5243753870ee0bfa4806798a633385c9"
        );
    }

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 32,
            max_recipients: 3,
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
        }
    }

    fn meta(msg_id: Option<&str>) -> JobMeta<'_> {
        JobMeta {
            stream_seq: 7,
            published_at_ms: 1_000,
            published_at_ns: 1_000_000_123,
            subject: "herald.publish.x",
            msg_id,
        }
    }

    fn check(body: &str) -> Result<ValidJob, Invalid> {
        validate(body.as_bytes(), &meta(None), &limits())
    }

    #[test]
    fn a_good_job_gets_its_id_ttl_and_distinct_recipients() {
        let job = check(r#"{"id":"order-1","to":["a","b","a"],"payload":{"x":1},"ttl_secs":10}"#).unwrap();
        assert_eq!(job.message_id, "order-1");
        assert_eq!(job.recipients, vec!["a", "b"]);
        assert_eq!(job.expires_at_ms, 11_000);
        assert_eq!(job.payload.get(), r#"{"x":1}"#);
        assert_eq!(job.seq, 7);
    }

    #[test]
    fn ids_come_from_the_job_then_the_header_then_the_sequence() {
        let body = br#"{"to":["a"],"payload":1}"#;
        assert_eq!(validate(body, &meta(Some("hdr-1")), &limits()).unwrap().message_id, "hdr-1");
        assert_eq!(validate(body, &meta(None), &limits()).unwrap().message_id, "seq-7-1000000123");
        assert_eq!(validate(body, &meta(Some("seq-9")), &limits()).unwrap().message_id, "seq-7-1000000123");
        let job = check(r#"{"to":["a"],"payload":1}"#).unwrap();
        assert_eq!(job.expires_at_ms, 61_000, "default ttl");
    }

    #[test]
    fn every_bad_job_gets_its_own_code() {
        let cases = [
            ("not json", RejectCode::Malformed),
            (r#"{"to":"a","payload":1}"#, RejectCode::Malformed),
            (r#"{"to":["a"]}"#, RejectCode::Malformed),
            (r#"[null, ["a"], {"k": 1}]"#, RejectCode::Malformed),
            (r#"[null, [], null]"#, RejectCode::Malformed),
            (r#"{"id":"bad id","to":["a"],"payload":1}"#, RejectCode::InvalidId),
            (r#"{"id":"seq-1","to":["a"],"payload":1}"#, RejectCode::InvalidId),
            (r#"{"to":["a"],"payload":"0123456789012345678901234567890123456789"}"#, RejectCode::PayloadTooLarge),
            (r#"{"to":[],"payload":1}"#, RejectCode::NoRecipients),
            (r#"{"to":["a","b","c","d"],"payload":1}"#, RejectCode::TooManyRecipients),
            (r#"{"to":[""],"payload":1}"#, RejectCode::InvalidRecipient),
            (r#"{"to":["a\u0000"],"payload":1}"#, RejectCode::InvalidRecipient),
            (r#"{"to":["a"],"payload":1,"ttl_secs":0}"#, RejectCode::InvalidTtl),
            (r#"{"to":["a"],"payload":1,"ttl_secs":3601}"#, RejectCode::InvalidTtl),
            (r#"{"to":["a"],"payload":1,"ttl_secs":-1}"#, RejectCode::Malformed),
        ];
        for (body, code) in cases {
            assert_eq!(check(body).unwrap_err().code, code, "{body}");
        }
    }

    #[test]
    fn a_malformed_job_still_names_its_id_when_readable() {
        let err = check(r#"{"id":"j-9","to":"a","payload":1}"#).unwrap_err();
        assert_eq!(err.job_id.as_deref(), Some("j-9"));
    }
}
