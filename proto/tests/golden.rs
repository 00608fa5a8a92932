//! The golden examples under `proto/golden/` against the types, and the protocol document
//! (`proto/README.md`) against the golden examples: a change to a type, an example or the document
//! that the other two do not follow fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use herald_proto::{
    close, ClientFrame, ErrorCode, Event, GatewayCommand, PublishJob, RejectCode, Rejection, ServerFrame,
    TopicPublication, TopicRefusal,
};
use serde_json::Value;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn golden_path(name: &str) -> PathBuf {
    crate_dir().join("golden").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn value(name: &str, text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"))
}

/// Decodes a golden text as its type, checks it is the expected variant, and encodes it again.
type RoundTrip = fn(&str) -> Value;

fn server_frame(text: &str) -> ServerFrame {
    ServerFrame::decode(text).unwrap_or_else(|e| panic!("ServerFrame::decode: {e}"))
}

fn encode<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or_else(|e| panic!("encode: {e}"))
}

fn decode<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("decode {}: {e}", std::any::type_name::<T>()))
}

/// Every golden file and the type it is an example of.
const GOLDEN: &[(&str, RoundTrip)] = &[
    ("server_hello.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::Hello(_)), "{f:?}");
        encode(&f)
    }),
    ("server_notification.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::Notification(_)), "{f:?}");
        encode(&f)
    }),
    ("server_error.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::Error { .. }), "{f:?}");
        encode(&f)
    }),
    ("client_ack.json", |t| {
        let f: ClientFrame = decode(t);
        assert!(matches!(f, ClientFrame::Ack { .. }), "{f:?}");
        encode(&f)
    }),
    ("client_read.json", |t| {
        let f: ClientFrame = decode(t);
        assert!(matches!(f, ClientFrame::Read { .. }), "{f:?}");
        encode(&f)
    }),
    ("client_refresh.json", |t| {
        let f: ClientFrame = decode(t);
        assert!(matches!(f, ClientFrame::Refresh { .. }), "{f:?}");
        encode(&f)
    }),
    ("server_refreshed.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::Refreshed { .. }), "{f:?}");
        encode(&f)
    }),
    ("client_subscribe.json", |t| {
        let f: ClientFrame = decode(t);
        assert!(matches!(f, ClientFrame::Subscribe { since: Some(_), .. }), "{f:?}");
        encode(&f)
    }),
    ("client_unsubscribe.json", |t| {
        let f: ClientFrame = decode(t);
        assert!(matches!(f, ClientFrame::Unsubscribe { .. }), "{f:?}");
        encode(&f)
    }),
    ("server_subscribed.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::Subscribed { recovered: Some(_), .. }), "{f:?}");
        encode(&f)
    }),
    ("server_unsubscribed.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::Unsubscribed { .. }), "{f:?}");
        encode(&f)
    }),
    ("server_topic_refused.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::TopicRefused { .. }), "{f:?}");
        encode(&f)
    }),
    ("server_topic_message.json", |t| {
        let f = server_frame(t);
        assert!(matches!(f, ServerFrame::TopicMessage(_)), "{f:?}");
        encode(&f)
    }),
    ("publish_job_topic.json", |t| {
        let j: PublishJob = decode(t);
        assert!(j.topic.is_some() && j.to.is_none(), "a topic job names a topic in place of `to`");
        encode(&j)
    }),
    ("topic_publication.json", |t| {
        let p: TopicPublication = decode(t);
        encode(&p)
    }),
    ("event_topic_acks.json", |t| {
        let e: Event = decode(t);
        assert!(matches!(e, Event::TopicAcks(_)), "{e:?}");
        encode(&e)
    }),
    ("publish_job.json", |t| {
        let j: PublishJob = decode(t);
        assert!(j.id.is_some() && j.ttl_secs.is_some(), "the full example sets every field");
        encode(&j)
    }),
    ("publish_job_minimal.json", |t| {
        let j: PublishJob = decode(t);
        assert!(j.id.is_none() && j.ttl_secs.is_none(), "the minimal example leaves out the options");
        encode(&j)
    }),
    ("rejection.json", |t| {
        let r: Rejection = decode(t);
        assert_ne!(r.code, RejectCode::DeadLetter);
        encode(&r)
    }),
    ("rejection_malformed.json", |t| {
        let r: Rejection = decode(t);
        assert_eq!((r.code, r.job_id.as_deref()), (RejectCode::Malformed, None));
        encode(&r)
    }),
    ("dead_letter.json", |t| {
        let r: Rejection = decode(t);
        assert_eq!(r.code, RejectCode::DeadLetter);
        encode(&r)
    }),
    ("gateway_deliver.json", |t| {
        let c: GatewayCommand = decode(t);
        assert!(matches!(&c, GatewayCommand::Deliver(items) if !items.iter().any(|r| r.resend)), "{c:?}");
        encode(&c)
    }),
    ("gateway_resend.json", |t| {
        let c: GatewayCommand = decode(t);
        assert!(matches!(&c, GatewayCommand::Deliver(items) if items.iter().all(|r| r.resend)), "{c:?}");
        encode(&c)
    }),
    ("gateway_replay.json", |t| {
        let c: GatewayCommand = decode(t);
        assert!(matches!(&c, GatewayCommand::Replay(r) if r.more_after_seq.is_some()), "{c:?}");
        encode(&c)
    }),
    ("gateway_kick.json", |t| {
        let c: GatewayCommand = decode(t);
        assert!(matches!(c, GatewayCommand::Kick(_)), "{c:?}");
        encode(&c)
    }),
    ("event_acks.json", |t| {
        let e: Event = decode(t);
        assert!(matches!(e, Event::Acks(_)), "{e:?}");
        encode(&e)
    }),
    ("event_online.json", |t| {
        let e: Event = decode(t);
        assert!(matches!(e, Event::Online(_)), "{e:?}");
        encode(&e)
    }),
    ("event_more.json", |t| {
        let e: Event = decode(t);
        assert!(matches!(e, Event::More(_)), "{e:?}");
        encode(&e)
    }),
];

#[test]
fn every_golden_file_has_a_round_trip() {
    let dir = crate_dir().join("golden");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = GOLDEN.iter().map(|(name, _)| name.to_string()).collect();
    assert_eq!(on_disk, listed, "proto/golden/ and the GOLDEN table differ");
}

#[test]
fn golden_files_round_trip() {
    for (name, round_trip) in GOLDEN {
        let text = read(&golden_path(name));
        let expected = value(name, &text);
        let again = round_trip(&text);
        assert_eq!(again, expected, "{name}: decode then encode changed it");
    }
}

// --- The document shows exactly the golden examples ----------------------------------------------

/// Drops the whitespace outside string literals, so that layout does not count but content does.
fn squeeze(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The bodies of the README's ```json blocks. Other examples use other fences.
fn readme_json_blocks() -> Vec<String> {
    let readme = read(&crate_dir().join("README.md"));
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```json") => current = Some(String::new()),
            (Some(body), "```") => {
                blocks.push(std::mem::take(body));
                current = None;
            }
            (Some(body), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "README.md: unterminated ```json block");
    blocks
}

#[test]
fn readme_examples_are_the_golden_files() {
    let blocks: Vec<String> = readme_json_blocks().iter().map(|b| squeeze(b)).collect();
    let golden: Vec<(&str, String)> =
        GOLDEN.iter().map(|(name, _)| (*name, squeeze(&read(&golden_path(name))))).collect();
    for (name, text) in &golden {
        assert!(blocks.contains(text), "README.md does not show golden/{name} (as a ```json block, whitespace aside)");
    }
    for block in &blocks {
        assert!(
            golden.iter().any(|(_, text)| text == block),
            "README.md has a ```json block that is no golden file: {block}"
        );
    }
}

fn readme() -> String {
    read(&crate_dir().join("README.md"))
}

fn as_str<T: serde::Serialize>(t: T) -> String {
    match serde_json::to_value(t) {
        Ok(Value::String(s)) => s,
        other => panic!("not a string: {other:?}"),
    }
}

fn all_error_codes() -> Vec<ErrorCode> {
    use ErrorCode::*;
    let all = vec![
        BadFrame,
        UnsupportedData,
        FrameTooLarge,
        RateLimited,
        SlowConsumer,
        TokenExpired,
        TokenRefused,
        ShuttingDown,
        Kicked,
    ];
    // Without a wildcard arm, a new variant does not compile until it is listed above.
    for code in &all {
        match code {
            BadFrame | UnsupportedData | FrameTooLarge | RateLimited | SlowConsumer | TokenExpired | TokenRefused
            | ShuttingDown | Kicked => {}
        }
    }
    all
}

fn all_reject_codes() -> Vec<RejectCode> {
    use RejectCode::*;
    let all = vec![
        Malformed,
        PayloadTooLarge,
        NoRecipients,
        TooManyRecipients,
        InvalidId,
        InvalidRecipient,
        InvalidTtl,
        InvalidTopic,
        IdConflict,
        DeadLetter,
    ];
    for code in &all {
        match code {
            Malformed | PayloadTooLarge | NoRecipients | TooManyRecipients | InvalidId | InvalidRecipient
            | InvalidTtl | InvalidTopic | IdConflict | DeadLetter => {}
        }
    }
    all
}

/// Each close code, and the error code of the `error` frame that precedes it (none for a client
/// that stopped answering pings: it would not read the frame).
fn close_codes() -> Vec<(u16, Option<ErrorCode>)> {
    vec![
        (close::SERVICE_RESTART, Some(ErrorCode::ShuttingDown)),
        (close::UNSUPPORTED_DATA, Some(ErrorCode::UnsupportedData)),
        (close::MESSAGE_TOO_BIG, Some(ErrorCode::FrameTooLarge)),
        (close::BAD_FRAME, Some(ErrorCode::BadFrame)),
        (close::TOKEN_EXPIRED, Some(ErrorCode::TokenExpired)),
        (close::TOKEN_EXPIRED, Some(ErrorCode::TokenRefused)),
        (close::HEARTBEAT_TIMEOUT, None),
        (close::SLOW_CONSUMER, Some(ErrorCode::SlowConsumer)),
        (close::RATE_LIMITED, Some(ErrorCode::RateLimited)),
        (close::KICKED, Some(ErrorCode::Kicked)),
    ]
}

/// The close-code table: one row per code, naming the error code sent before it.
#[test]
fn readme_close_code_table_matches_the_constants() {
    let readme = readme();
    let pairs = close_codes();
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for (code, error) in pairs {
        let prefix = format!("| {code} ");
        let row = readme
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("README.md: no close-code row starting {prefix:?}"));
        let cell = match error {
            Some(e) => format!("`{}`", as_str(e)),
            None => "none".to_owned(),
        };
        assert!(row.contains(&cell), "README.md: close {code} row should name {cell}: {row}");
        if let Some(e) = error {
            covered.insert(as_str(e));
        }
    }
    let all: BTreeSet<String> = all_error_codes().into_iter().map(as_str).collect();
    assert_eq!(covered, all, "an error code has no close code in this test's table");
}

#[test]
fn readme_names_every_reject_code() {
    let readme = readme();
    for code in all_reject_codes() {
        let name = format!("`{}`", as_str(code));
        assert!(readme.contains(&name), "README.md does not describe reject code {name}");
    }
}

#[test]
fn readme_names_every_topic_refusal() {
    use TopicRefusal::*;
    let readme = readme();
    for reason in [InvalidTopic, NotAllowed, TooManySubscriptions, AlreadySubscribed, NotSubscribed] {
        // Without a wildcard arm, a new variant does not compile until it is listed above.
        match reason {
            InvalidTopic | NotAllowed | TooManySubscriptions | AlreadySubscribed | NotSubscribed => {}
        }
        let name = format!("`{}`", as_str(reason));
        assert!(readme.contains(&name), "README.md does not describe topic refusal {name}");
    }
}

// --- What must not decode --------------------------------------------------------------------------

#[test]
fn bad_client_frames_do_not_decode() {
    let bad = [
        // not a frame
        "",
        "null",
        "[]",
        "\"ack\"",
        "{",
        // unknown or missing type
        r#"{"type":"ping","ids":["a"]}"#,
        r#"{"type":"ACK","ids":["a"]}"#,
        r#"{"type":"hello","ids":["a"]}"#,
        r#"{"ids":["a"]}"#,
        r#"{"type":null,"ids":["a"]}"#,
        r#"{"type":1,"ids":["a"]}"#,
        // missing fields
        r#"{"type":"ack"}"#,
        r#"{"type":"read"}"#,
        r#"{"type":"subscribe"}"#,
        r#"{"type":"unsubscribe","since":3}"#,
        // wrong types
        r#"{"type":"subscribe","topic":7}"#,
        r#"{"type":"subscribe","topic":"news","since":-1}"#,
        r#"{"type":"subscribe","topic":"news","since":"3"}"#,
        // wrong types
        r#"{"type":"ack","ids":"a"}"#,
        r#"{"type":"ack","ids":[1]}"#,
        r#"{"type":"ack","ids":null}"#,
        r#"{"type":"read","ids":{"a":true}}"#,
        r#"{"type":"read","ids":[["a"]]}"#,
        // the array form serde would read an enum from
        r#"["ack",["a"]]"#,
    ];
    for text in bad {
        let got = ClientFrame::decode(text);
        assert!(got.is_err(), "{text:?} decoded as {got:?}");
    }
}

#[test]
fn bad_publish_jobs_do_not_decode() {
    let bad = [
        "",
        "null",
        "[]",
        r#""job""#,
        // missing fields
        r#"{"payload":{}}"#,
        r#"{"to":["alice"]}"#,
        r#"{}"#,
        r#"{"topic":"news"}"#,
        // both addresses, or a topic of the wrong type
        r#"{"to":["alice"],"topic":"news","payload":{}}"#,
        r#"{"topic":["news"],"payload":{}}"#,
        r#"{"topic":null,"payload":{}}"#,
        // wrong types
        r#"{"to":"alice","payload":{}}"#,
        r#"{"to":[7],"payload":{}}"#,
        r#"{"to":null,"payload":{}}"#,
        r#"{"id":42,"to":["alice"],"payload":{}}"#,
        r#"{"to":["alice"],"payload":{},"ttl_secs":-1}"#,
        r#"{"to":["alice"],"payload":{},"ttl_secs":1.5}"#,
        r#"{"to":["alice"],"payload":{},"ttl_secs":"60"}"#,
        r#"{"to":["alice"],"payload":{},"ttl_secs":18446744073709551616}"#,
        // the payload must itself be JSON
        r#"{"to":["alice"],"payload":}"#,
        r#"{"to":["alice"],"payload":{"a":}}"#,
    ];
    for text in bad {
        let got = serde_json::from_str::<PublishJob>(text);
        assert!(got.is_err(), "{text:?} decoded as {got:?}");
    }
}

#[test]
fn bad_server_frames_do_not_decode() {
    let bad = [
        "",
        "[]",
        r#"{"type":"welcome"}"#,
        r#"{"connection_id":"c","gateway_id":"g","heartbeat_interval_ms":1,"max_frame_bytes":1}"#,
        r#"{"type":"hello","connection_id":"c","gateway_id":"g","heartbeat_interval_ms":1}"#,
        r#"{"type":"hello","connection_id":"c","gateway_id":"g","heartbeat_interval_ms":"1","max_frame_bytes":1}"#,
        r#"{"type":"notification","id":"a","seq":1,"published_at_ms":1,"expires_at_ms":2}"#,
        r#"{"type":"notification","id":"a","seq":-1,"payload":1,"published_at_ms":1,"expires_at_ms":2}"#,
        r#"{"type":"error","code":"teapot","message":"no"}"#,
        r#"{"type":"error","code":"bad_frame"}"#,
    ];
    for text in bad {
        let got = ServerFrame::decode(text);
        assert!(got.is_err(), "{text:?} decoded as {got:?}");
    }
}

#[test]
fn unknown_internal_messages_do_not_decode() {
    assert!(serde_json::from_str::<GatewayCommand>(r#"{"drop":[]}"#).is_err());
    assert!(serde_json::from_str::<GatewayCommand>(r#"{"deliver":{}}"#).is_err());
    assert!(serde_json::from_str::<Event>(r#"{"offline":{}}"#).is_err());
    assert!(serde_json::from_str::<Event>(r#"{"acks":[{"user":"a"}]}"#).is_err());
}

/// Optional job fields may also be sent as `null`; that means the same as leaving them out.
#[test]
fn null_optional_job_fields_mean_absent() {
    let job: PublishJob = decode(r#"{"id":null,"to":["alice"],"payload":{"x":1},"ttl_secs":null}"#);
    assert_eq!((job.id, job.ttl_secs), (None, None));
}

// --- The payload passes through untouched ------------------------------------------------------------

const RAW: &str = r#"{"b":1,"a":[1.50,2]}"#;

fn contains_raw(encoded: &str) {
    assert!(encoded.contains(RAW), "payload changed: {encoded}");
}

#[test]
fn job_payload_is_kept_byte_for_byte() {
    let job: PublishJob = decode(&format!(r#"{{"to":["alice"],"payload":{RAW}}}"#));
    assert_eq!(job.payload.get(), RAW);
    contains_raw(&serde_json::to_string(&job).unwrap());
}

#[test]
fn payload_whitespace_inside_the_value_is_kept() {
    let raw = "{ \"b\" : 1,\n  \"a\": [1.50, 2e0] }";
    let job: PublishJob = decode(&format!("{{\"to\":[\"alice\"],\"payload\":  {raw}  }}"));
    assert_eq!(job.payload.get(), raw);
}

#[test]
fn notification_payload_is_kept_byte_for_byte() {
    let text =
        format!(r#"{{"type":"notification","id":"m","seq":7,"payload":{RAW},"published_at_ms":1,"expires_at_ms":2}}"#);
    let frame = server_frame(&text);
    match &frame {
        ServerFrame::Notification(n) => assert_eq!(n.payload.get(), RAW),
        other => panic!("{other:?}"),
    }
    let again = serde_json::to_string(&frame).unwrap();
    contains_raw(&again);
    // The gateway's encoding decodes back to the same bytes.
    match server_frame(&again) {
        ServerFrame::Notification(n) => assert_eq!(n.payload.get(), RAW),
        other => panic!("{other:?}"),
    }
}

#[test]
fn routed_payload_is_kept_byte_for_byte() {
    let text = format!(
        r#"{{"deliver":[{{"users":["alice"],"notification":{{"id":"m","seq":7,"payload":{RAW},"published_at_ms":1,"expires_at_ms":2}}}}]}}"#
    );
    let command: GatewayCommand = decode(&text);
    contains_raw(&serde_json::to_string(&command).unwrap());
    match command {
        GatewayCommand::Deliver(routed) => {
            // What the gateway sends on is the same bytes again.
            let frame = ServerFrame::Notification(routed[0].notification.clone());
            contains_raw(&serde_json::to_string(&frame).unwrap());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_frame_and_ack_kind_agree() {
    use herald_proto::AckKind;
    let ids = vec![herald_proto::MessageId::new("a").unwrap()];
    assert_eq!(ClientFrame::Ack { ids: ids.clone() }.into_parts(), Some((AckKind::Delivered, ids.clone())));
    assert_eq!(ClientFrame::Read { ids: ids.clone() }.into_parts(), Some((AckKind::Read, ids)));
    assert_eq!(ClientFrame::Refresh { token: "t".into() }.into_parts(), None);
}

#[test]
fn an_ack_frame_carries_only_well_formed_message_ids() {
    // The forgery of issue 10: an id that names another user's receipt through a separator.
    for frame in
        [r#"{"type":"ack","ids":["m1/org"]}"#, r#"{"type":"read","ids":[""]}"#, r#"{"type":"ack","ids":["a b"]}"#]
    {
        assert!(ClientFrame::decode(frame).is_err(), "{frame}");
    }
    assert!(ClientFrame::decode(r#"{"type":"ack","ids":["order-1:a.b_c"]}"#).is_ok());
}
