//! Properties of decoding: no input makes a decoder panic (bad input is normal input on a socket
//! or a subject), and every valid message survives encode then decode unchanged.
#![allow(clippy::unwrap_used)]

use herald_proto::{
    AckKind, AckRecord, ClientFrame, ConnectionId, ErrorCode, Event, GatewayCommand, GatewayId, Hello, MessageId, More,
    Notification, Online, PublishJob, RejectCode, Rejection, Replay, Routed, ServerFrame, UserId,
};
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::Value;

// --- Generators ---------------------------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A payload as a publisher might write it: compact or pretty, so whitespace inside must survive.
fn payload() -> impl Strategy<Value = Box<RawValue>> {
    (json_value(), any::<bool>()).prop_map(|(v, pretty)| {
        let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) };
        text.and_then(RawValue::from_string).unwrap_or_else(|e| panic!("a generated JSON value encodes: {e}"))
    })
}

fn ids() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(".{0,20}", 0..8)
}

fn message_id() -> impl Strategy<Value = MessageId> {
    "[A-Za-z0-9._:-]{1,20}".prop_map(|s| MessageId::new(s).unwrap())
}

fn message_ids() -> impl Strategy<Value = Vec<MessageId>> {
    prop::collection::vec(message_id(), 0..8)
}

/// User ids as permissive as the grammar: separators, `@`, non-ASCII letters.
fn user_id() -> impl Strategy<Value = UserId> {
    "[A-Za-z0-9/@.:é ]{1,20}".prop_map(|s| UserId::new(s).unwrap())
}

fn connection_id() -> impl Strategy<Value = ConnectionId> {
    "[A-Za-z0-9_-]{1,20}".prop_map(|s| ConnectionId::new(s).unwrap())
}

fn gateway_id() -> impl Strategy<Value = GatewayId> {
    "[A-Za-z0-9_-]{1,20}".prop_map(|s| GatewayId::new(s).unwrap())
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        message_ids().prop_map(|ids| ClientFrame::Ack { ids }),
        message_ids().prop_map(|ids| ClientFrame::Read { ids }),
        ".{0,200}".prop_map(|token| ClientFrame::Refresh { token }),
    ]
}

fn publish_job() -> impl Strategy<Value = PublishJob> {
    (prop::option::of(".{0,20}"), ids(), payload(), prop::option::of(any::<u64>()))
        .prop_map(|(id, to, payload, ttl_secs)| PublishJob { id, to: Some(to), topic: None, payload, ttl_secs })
}

fn notification() -> impl Strategy<Value = Notification> {
    (message_id(), any::<u64>(), payload(), any::<u64>(), any::<u64>()).prop_map(
        |(id, seq, payload, published_at_ms, expires_at_ms)| Notification {
            id,
            seq,
            payload,
            published_at_ms,
            expires_at_ms,
        },
    )
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedData,
        ErrorCode::FrameTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::SlowConsumer,
        ErrorCode::TokenExpired,
        ErrorCode::TokenRefused,
        ErrorCode::ShuttingDown,
    ])
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (connection_id(), gateway_id(), any::<u64>(), any::<usize>(), any::<u64>()).prop_map(
            |(connection_id, gateway_id, heartbeat_interval_ms, max_frame_bytes, token_expires_at_ms)| {
                ServerFrame::Hello(Hello {
                    connection_id,
                    gateway_id,
                    heartbeat_interval_ms,
                    max_frame_bytes,
                    token_expires_at_ms,
                })
            }
        ),
        any::<u64>().prop_map(|token_expires_at_ms| ServerFrame::Refreshed { token_expires_at_ms }),
        notification().prop_map(ServerFrame::Notification),
        (error_code(), ".{0,40}").prop_map(|(code, message)| ServerFrame::Error { code, message }),
    ]
}

fn rejection() -> impl Strategy<Value = Rejection> {
    let code = prop::sample::select(vec![
        RejectCode::Malformed,
        RejectCode::PayloadTooLarge,
        RejectCode::NoRecipients,
        RejectCode::TooManyRecipients,
        RejectCode::InvalidId,
        RejectCode::InvalidRecipient,
        RejectCode::InvalidTtl,
        RejectCode::IdConflict,
        RejectCode::DeadLetter,
    ]);
    (prop::option::of(".{0,20}"), any::<u64>(), ".{0,30}", code, ".{0,40}", any::<u64>()).prop_map(
        |(job_id, stream_seq, subject, code, reason, rejected_at_ms)| Rejection {
            job_id,
            stream_seq,
            subject,
            code,
            reason,
            rejected_at_ms,
        },
    )
}

fn gateway_command() -> impl Strategy<Value = GatewayCommand> {
    let traceparent = prop::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-01");
    let routed = (prop::collection::vec(user_id(), 0..8), notification(), traceparent, any::<bool>())
        .prop_map(|(users, notification, traceparent, resend)| Routed { users, notification, traceparent, resend });
    prop_oneof![
        prop::collection::vec(routed, 0..4).prop_map(GatewayCommand::Deliver),
        (user_id(), connection_id(), prop::collection::vec(notification(), 0..4), prop::option::of(any::<u64>()))
            .prop_map(|(user, connection_id, notifications, more_after_seq)| GatewayCommand::Replay(Replay {
                user,
                connection_id,
                notifications,
                more_after_seq,
            })),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let kind = prop::sample::select(vec![AckKind::Delivered, AckKind::Read]);
    let traceparent = prop::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-01");
    let record =
        (user_id(), connection_id(), gateway_id(), kind, message_ids(), message_ids(), any::<u64>(), traceparent)
            .prop_map(|(user, connection_id, gateway_id, kind, ids, read_unsent, at_ms, traceparent)| AckRecord {
                user,
                connection_id,
                gateway_id,
                kind,
                ids,
                read_unsent,
                at_ms,
                traceparent,
            });
    prop_oneof![
        prop::collection::vec(record, 0..4).prop_map(Event::Acks),
        (user_id(), connection_id(), gateway_id(), any::<u64>()).prop_map(
            |(user, connection_id, gateway_id, at_ms)| {
                Event::Online(Online { user, connection_id, gateway_id, at_ms })
            }
        ),
        (user_id(), connection_id(), gateway_id(), any::<u64>(), any::<u64>()).prop_map(
            |(user, connection_id, gateway_id, after_seq, at_ms)| {
                Event::More(More { user, connection_id, gateway_id, after_seq, at_ms })
            }
        ),
    ]
}

/// Objects that look like frames or jobs (a known `type`, known field names, values of any
/// type), to reach further into the decoders than random text does.
fn near_miss() -> impl Strategy<Value = String> {
    let tag = prop::sample::select(vec!["ack", "read", "hello", "notification", "error", "ping", ""]);
    let field = prop::sample::select(vec![
        "ids",
        "id",
        "to",
        "payload",
        "ttl_secs",
        "seq",
        "code",
        "message",
        "connection_id",
        "gateway_id",
        "heartbeat_interval_ms",
        "max_frame_bytes",
        "published_at_ms",
        "expires_at_ms",
        "type",
    ]);
    (prop::option::of(tag), prop::collection::vec((field, json_value()), 0..8)).prop_map(|(tag, fields)| {
        let mut object = serde_json::Map::new();
        if let Some(tag) = tag {
            object.insert("type".to_owned(), Value::from(tag));
        }
        for (name, value) in fields {
            object.insert(name.to_owned(), value);
        }
        Value::Object(object).to_string()
    })
}

/// A valid encoding with one byte overwritten or the tail cut off.
fn damaged(valid: String, at: prop::sample::Index, byte: u8, cut: bool) -> Vec<u8> {
    let mut bytes = valid.into_bytes();
    if bytes.is_empty() {
        return bytes;
    }
    let i = at.index(bytes.len());
    if cut {
        bytes.truncate(i);
    } else {
        bytes[i] = byte;
    }
    bytes
}

/// Runs every public decoder on the input. They may fail; they must not panic.
fn decode_everything(bytes: &[u8]) {
    let _ = serde_json::from_slice::<ClientFrame>(bytes);
    let _ = serde_json::from_slice::<PublishJob>(bytes);
    let _ = serde_json::from_slice::<GatewayCommand>(bytes);
    let _ = serde_json::from_slice::<Event>(bytes);
    let _ = serde_json::from_slice::<Rejection>(bytes);
    let text = String::from_utf8_lossy(bytes);
    let _ = ClientFrame::decode(&text);
    let _ = serde_json::from_str::<PublishJob>(&text);
    let _ = ServerFrame::decode(&text);
}

// --- Properties ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        decode_everything(text.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn near_misses_never_panic(text in near_miss()) {
        decode_everything(text.as_bytes());
    }

    #[test]
    fn damaged_frames_never_panic(
        frame in server_frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        decode_everything(&damaged(serde_json::to_string(&frame).unwrap(), at, byte, cut));
    }

    #[test]
    fn damaged_jobs_never_panic(
        job in publish_job(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        decode_everything(&damaged(serde_json::to_string(&job).unwrap(), at, byte, cut));
    }

    #[test]
    fn client_frames_round_trip(frame in client_frame()) {
        let text = serde_json::to_string(&frame).unwrap();
        prop_assert_eq!(ClientFrame::decode(&text).unwrap(), frame);
    }

    #[test]
    fn publish_jobs_round_trip(job in publish_job()) {
        let text = serde_json::to_string(&job).unwrap();
        let back: PublishJob = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back.id, &job.id);
        prop_assert_eq!(&back.to, &job.to);
        prop_assert_eq!(back.ttl_secs, job.ttl_secs);
        prop_assert_eq!(back.payload.get(), job.payload.get());
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let text = serde_json::to_string(&frame).unwrap();
        let back = ServerFrame::decode(&text).unwrap();
        // ServerFrame has no PartialEq (its payload is raw JSON): compare the encodings, which
        // carry the payload's bytes unchanged.
        prop_assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }

    #[test]
    fn rejections_round_trip(rejection in rejection()) {
        let text = serde_json::to_string(&rejection).unwrap();
        prop_assert_eq!(serde_json::from_str::<Rejection>(&text).unwrap(), rejection);
    }

    #[test]
    fn gateway_commands_round_trip(command in gateway_command()) {
        let text = serde_json::to_string(&command).unwrap();
        let back: GatewayCommand = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }

    #[test]
    fn events_round_trip(event in event()) {
        let text = serde_json::to_string(&event).unwrap();
        prop_assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), event);
    }
}

/// serde reads a tagged enum from an array as well; a client frame is an object and nothing else.
#[test]
fn a_client_frame_is_an_object_not_an_array() {
    assert!(ClientFrame::decode(r#"["ack", ["m-1"]]"#).is_err());
    assert!(ClientFrame::decode(r#"  {"type": "ack", "ids": ["m-1"]}"#).is_ok());
}
