//! Properties of job validation: whatever bytes arrive on the jobs stream, `validate` answers
//! (never panics); every well-formed job within the limits is accepted with its id, distinct
//! recipients, exact payload and expiry; and each kind of bad job is refused with its own code.

use std::time::Duration;

use herald_proto::ids::{MAX_MESSAGE_ID_BYTES as MAX_ID_BYTES, MAX_USER_ID_BYTES as MAX_USER_BYTES};
use herald_proto::RejectCode;
use herald_publish::validate::{validate, JobMeta, Limits};
use proptest::prelude::*;
use serde_json::{json, Value};

const PUBLISHED_AT_MS: u64 = 1_764_169_629_123;
const PUBLISHED_AT_NS: u128 = 1_764_169_629_123_456_789;

fn limits() -> Limits {
    Limits {
        max_payload_bytes: 1024,
        max_recipients: 20,
        default_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(3600),
    }
}

fn meta(stream_seq: u64, msg_id: Option<&str>) -> JobMeta<'_> {
    JobMeta {
        stream_seq,
        published_at_ms: PUBLISHED_AT_MS,
        published_at_ns: PUBLISHED_AT_NS,
        subject: "herald.publish.props",
        msg_id,
    }
}

// --- Generators ---------------------------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A payload's JSON text, compact or pretty: clients must get exactly these bytes.
fn payload_text() -> impl Strategy<Value = String> {
    (json_value(), any::<bool>()).prop_map(|(v, pretty)| {
        if pretty {
            serde_json::to_string_pretty(&v).unwrap_or_default()
        } else {
            serde_json::to_string(&v).unwrap_or_default()
        }
    })
}

/// A valid job id: 1-128 of `A-Z a-z 0-9 . _ : -`, not of the reserved form `seq-…`.
fn valid_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,128}".prop_filter("seq- is reserved", |id| !id.starts_with("seq-"))
}

/// A valid recipient: 1-20 characters, none of them a control character (at most 80 bytes).
fn recipient() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,20}"
}

/// A valid job as JSON text, and what validation must make of it.
#[derive(Debug, Clone)]
struct GoodJob {
    id: Option<String>,
    to: Vec<String>,
    payload: String,
    ttl_secs: Option<u64>,
}

impl GoodJob {
    fn body(&self) -> String {
        let mut fields = vec![format!("\"to\":{}", json!(self.to)), format!("\"payload\":{}", self.payload)];
        if let Some(id) = &self.id {
            fields.push(format!("\"id\":{}", json!(id)));
        }
        if let Some(ttl) = self.ttl_secs {
            fields.push(format!("\"ttl_secs\":{ttl}"));
        }
        format!("{{{}}}", fields.join(","))
    }
}

fn good_job() -> impl Strategy<Value = GoodJob> {
    (
        prop::option::of(valid_id()),
        prop::collection::vec(recipient(), 1..=20),
        payload_text().prop_filter("within the payload limit", |p| p.len() <= 1024),
        prop::option::of(1u64..=3600),
    )
        .prop_map(|(id, to, payload, ttl_secs)| GoodJob { id, to, payload, ttl_secs })
}

// --- Properties ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any bytes at all: an answer, never a panic; a refusal of bytes that are not JSON says
    /// `malformed`.
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), seq in any::<u64>(),
                                   msg_id in prop::option::of(".{0,140}")) {
        let outcome = validate(&body, &meta(seq, msg_id.as_deref()), &limits());
        if serde_json::from_slice::<Value>(&body).is_err() {
            prop_assert_eq!(outcome.map(|_| ()).map_err(|e| e.code), Err(RejectCode::Malformed));
        }
    }

    /// Text that is almost a job (a valid job with one byte changed, cut short or extended) never
    /// panics the validator either, and anything it accepts is within the limits.
    #[test]
    fn near_misses_never_panic(job in good_job(), at in any::<prop::sample::Index>(), byte in any::<u8>(),
                               cut in any::<bool>()) {
        let mut body = job.body().into_bytes();
        let i = at.index(body.len());
        if cut { body.truncate(i) } else { body[i] = byte }
        if let Ok(valid) = validate(&body, &meta(9, None), &limits()) {
            prop_assert!(!valid.recipients.is_empty() && valid.recipients.len() <= 20);
            prop_assert!(valid.payload.get().len() <= 1024);
            prop_assert!(valid.expires_at_ms > PUBLISHED_AT_MS);
            prop_assert!(valid.expires_at_ms <= PUBLISHED_AT_MS + 3_600_000);
        }
    }

    /// JSON values of any shape where a job is expected: refused as `malformed` unless they are
    /// objects with the right fields.
    #[test]
    fn json_that_is_not_a_job_is_malformed(value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap_or_default();
        if !value.is_object() {
            let code = validate(&body, &meta(1, None), &limits()).err().map(|e| e.code);
            prop_assert_eq!(code, Some(RejectCode::Malformed));
        }
    }

    /// A job within every limit is accepted: its id, its recipients once each in the order first
    /// named, its payload byte for byte, its expiry from the publish time and TTL.
    #[test]
    fn valid_jobs_validate(job in good_job(), seq in 1u64..u64::MAX / 2, header in prop::option::of(valid_id())) {
        let body = job.body();
        let valid = validate(body.as_bytes(), &meta(seq, header.as_deref()), &limits())
            .map_err(|e| TestCaseError::fail(format!("{body} refused: {e:?}")))?;
        let expected_id = job.id.clone().or(header).unwrap_or_else(|| format!("seq-{seq}-{PUBLISHED_AT_NS}"));
        prop_assert_eq!(valid.message_id.as_str(), expected_id.as_str());
        prop_assert_eq!(valid.seq, seq);
        let mut distinct: Vec<String> = Vec::new();
        for user in &job.to {
            if !distinct.contains(user) {
                distinct.push(user.clone());
            }
        }
        let recipients: Vec<String> = valid.recipients.iter().map(ToString::to_string).collect();
        prop_assert_eq!(&recipients, &distinct);
        prop_assert_eq!(valid.payload.get(), job.payload.as_str());
        prop_assert_eq!(valid.published_at_ms, PUBLISHED_AT_MS);
        let ttl_ms = job.ttl_secs.unwrap_or(60) * 1000;
        prop_assert_eq!(valid.expires_at_ms, PUBLISHED_AT_MS + ttl_ms);
    }

    /// Field order and whitespace do not matter: the same job pretty-printed validates the same.
    #[test]
    fn layout_does_not_matter(job in good_job()) {
        let compact = job.body();
        let value: Value = serde_json::from_str(&compact).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let pretty = serde_json::to_string_pretty(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let a = validate(compact.as_bytes(), &meta(3, None), &limits());
        let b = validate(pretty.as_bytes(), &meta(3, None), &limits());
        prop_assert!(a.is_ok() && b.is_ok(), "{compact} / {pretty}");
        let (a, b) = (a.unwrap_or_else(|_| unreachable!()), b.unwrap_or_else(|_| unreachable!()));
        prop_assert_eq!(a.message_id, b.message_id);
        prop_assert_eq!(a.recipients, b.recipients);
        prop_assert_eq!(a.expires_at_ms, b.expires_at_ms);
        // Pretty-printing changes the payload's text (that is the publisher's choice, kept byte
        // for byte), not whether it is a valid payload.
        prop_assert!(serde_json::from_str::<Value>(b.payload.get()).is_ok());
    }

    /// One limit broken, everything else fine: refused with that limit's code, and the job's id
    /// in the rejection when it had a readable one.
    #[test]
    fn each_broken_limit_has_its_own_code(job in good_job(), breakage in 0usize..7, extra in 1usize..50,
                                          bad_id in "[ !-,/;-@\\[-^`{-~]{1,3}", control in "\\p{Cc}") {
        let mut job = job;
        let code = match breakage {
            0 => { job.to.clear(); RejectCode::NoRecipients }
            1 => { job.to = (0..20 + extra).map(|i| format!("u{i}")).collect(); RejectCode::TooManyRecipients }
            2 => { job.payload = json!("p".repeat(1024 + extra)).to_string(); RejectCode::PayloadTooLarge }
            3 => { job.to.push(format!("x{control}y")); RejectCode::InvalidRecipient }
            4 => { job.to.push("r".repeat(MAX_USER_BYTES + extra)); RejectCode::InvalidRecipient }
            5 => { job.ttl_secs = Some(if extra % 2 == 0 { 0 } else { 3600 + extra as u64 }); RejectCode::InvalidTtl }
            _ => {
                job.id = Some(if extra % 2 == 0 { format!("ok{bad_id}") } else { "i".repeat(MAX_ID_BYTES + extra) });
                RejectCode::InvalidId
            }
        };
        // Keep the recipient count within bounds for the breakages that are not about it.
        if breakage == 3 || breakage == 4 {
            job.to.truncate(19);
            job.to.push(if breakage == 3 { format!("x{control}y") } else { "r".repeat(MAX_USER_BYTES + extra) });
        }
        let body = job.body();
        let err = validate(body.as_bytes(), &meta(5, None), &limits())
            .err()
            .ok_or_else(|| TestCaseError::fail(format!("{body} accepted")))?;
        prop_assert_eq!(err.code, code, "{}: {}", body, err.reason);
        prop_assert!(!err.reason.is_empty());
        prop_assert_eq!(err.job_id, job.id);
    }
}

/// Nesting is no way to crash the validator (serde_json reads raw values without recursion),
/// and past [`MAX_PAYLOAD_DEPTH`] a payload is refused, however it nests.
#[test]
fn deeply_nested_payloads_are_answered() {
    use herald_publish::validate::MAX_PAYLOAD_DEPTH;
    for depth in [1, 63, 64, 65, 128, 129, 10_000, 100_000] {
        let payload = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(r#"{{"to":["a"],"payload":{payload}}}"#);
        let big = Limits { max_payload_bytes: 1 << 20, ..limits() };
        let valid = validate(body.as_bytes(), &meta(1, None), &big);
        if depth <= MAX_PAYLOAD_DEPTH {
            assert!(valid.is_ok(), "depth {depth}: {:?}", valid.err());
        } else {
            assert_eq!(valid.err().map(|e| e.code), Some(RejectCode::Malformed), "depth {depth}");
        }
        // Brackets inside a string (and an escaped quote) do not count.
        let objects = [r#"{"k":"#.repeat(depth), r#""[{\"]""#.to_owned(), "}".repeat(depth)].concat();
        let body = format!(r#"{{"to":["a"],"payload":{objects}}}"#);
        let valid = validate(body.as_bytes(), &meta(1, None), &big);
        assert_eq!(valid.is_ok(), depth <= MAX_PAYLOAD_DEPTH, "objects, depth {depth}, brackets in a string ignored");
        let unterminated = format!(r#"{{"to":["a"],"payload":{}"#, "[".repeat(depth));
        assert_eq!(
            validate(unterminated.as_bytes(), &meta(1, None), &big).err().map(|e| e.code),
            Some(RejectCode::Malformed)
        );
    }
}
