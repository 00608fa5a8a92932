//! Validation of publish jobs: from the bytes on the stream to a job the store can take, or a
//! rejection with a reason the publisher can read. Pure: no I/O.

use std::collections::HashSet;
use std::time::Duration;

use herald_proto::{PublishJob, RejectCode};
use serde_json::value::RawValue;

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
    pub subject: &'a str,
    /// The `Nats-Msg-Id` header, if the publisher set one.
    pub msg_id: Option<&'a str>,
}

/// A job that passed validation.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub message_id: String,
    pub seq: u64,
    /// Distinct recipients, in the order first named.
    pub recipients: Vec<String>,
    pub payload: Box<RawValue>,
    pub published_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Why a job was refused, with what could be read of its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub job_id: Option<String>,
    pub code: RejectCode,
    pub reason: String,
}

pub const MAX_ID_BYTES: usize = 128;
pub const MAX_USER_BYTES: usize = 256;

/// Ids the dispatcher makes for jobs without one; publishers may not use the form.
const DERIVED_ID_PREFIX: &str = "seq-";

pub fn is_valid_id(id: &str) -> bool {
    !id.starts_with(DERIVED_ID_PREFIX)
        && !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
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
        (Some(id), _) if !is_valid_id(id) => {
            return Err(reject(
                RejectCode::InvalidId,
                format!("id must be 1-{MAX_ID_BYTES} of [A-Za-z0-9._:-], not starting with {DERIVED_ID_PREFIX:?}"),
            ))
        }
        (Some(id), _) => id.clone(),
        (None, Some(header)) if is_valid_id(header) => header.to_owned(),
        (None, _) => format!("{DERIVED_ID_PREFIX}{}", meta.stream_seq),
    };
    if job.payload.get().len() > limits.max_payload_bytes {
        return Err(reject(
            RejectCode::PayloadTooLarge,
            format!("payload is {} bytes; the limit is {}", job.payload.get().len(), limits.max_payload_bytes),
        ));
    }
    if job.to.is_empty() {
        return Err(reject(RejectCode::NoRecipients, "`to` names no recipient".into()));
    }
    if job.to.len() > limits.max_recipients {
        return Err(reject(
            RejectCode::TooManyRecipients,
            format!("{} recipients; the limit is {}", job.to.len(), limits.max_recipients),
        ));
    }
    if let Some(bad) =
        job.to.iter().find(|u| u.is_empty() || u.len() > MAX_USER_BYTES || u.chars().any(char::is_control))
    {
        return Err(reject(
            RejectCode::InvalidRecipient,
            format!("recipient {bad:?} must be 1-{MAX_USER_BYTES} bytes without control characters"),
        ));
    }
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
    let mut seen = HashSet::with_capacity(job.to.len());
    let recipients = job.to.into_iter().filter(|u| seen.insert(u.clone())).collect();
    Ok(ValidJob {
        message_id,
        seq: meta.stream_seq,
        recipients,
        payload: job.payload,
        published_at_ms: meta.published_at_ms,
        expires_at_ms: meta.published_at_ms.saturating_add(ttl.as_millis() as u64),
    })
}

/// The `id` of a job that failed to decode as a whole, when it can still be read: it lets the
/// publisher match the rejection to what it sent.
fn salvage_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    serde_json::from_slice::<IdOnly>(body).ok()?.id.filter(|id| id.len() <= MAX_ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 32,
            max_recipients: 3,
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
        }
    }

    fn meta(msg_id: Option<&str>) -> JobMeta<'_> {
        JobMeta { stream_seq: 7, published_at_ms: 1_000, subject: "herald.publish.x", msg_id }
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
        assert_eq!(validate(body, &meta(None), &limits()).unwrap().message_id, "seq-7");
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
