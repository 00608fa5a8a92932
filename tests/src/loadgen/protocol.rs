//! What the generator reads on a connection, for each wire flavour it speaks: Herald's JSON
//! frames (also spoken by the bare fan-out server), Socket.IO's Engine.IO framing, and plain
//! WebSocket (the `ws` peer). Pure
//! functions over text, so each is unit tested; the sockets are the worker's.
//!
//! Every load message carries `"lg_k"` (its index, unique in a run) and `"lg_t"` (the generator's
//! send time, microseconds since the epoch) in its payload. Fields are found by substring rather
//! than by a full JSON parse: the generator shares two cores with the system it measures.

use serde::{Deserialize, Serialize};

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Flavor {
    /// Herald's client protocol (`hello`, `notification`, acks). The bare server speaks its
    /// subset (a `hello`, then notifications; it ignores acks).
    Herald,
    /// Engine.IO 4 over WebSocket, with Socket.IO packets inside (the peer).
    EngineIo,
    /// A plain WebSocket (the `ws` peer): ready once upgraded, pinged with WebSocket ping frames
    /// (answered by the WebSocket library), sent Herald-shaped notifications by its `/publish`.
    Plain,
}

impl Flavor {
    /// Whether the connection is ready once the upgrade is done, with no frame to wait for.
    pub(crate) fn ready_on_upgrade(self) -> bool {
        self == Flavor::Plain
    }
}

/// What one text frame means to the generator.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound<'a> {
    /// The connection is established (Herald `hello`, Socket.IO connect ack).
    Ready,
    /// A load message.
    Message(Message<'a>),
    /// Engine.IO open packet: answer with a Socket.IO connect.
    EioOpen,
    /// Engine.IO ping: answer with a pong.
    EioPing,
    /// Anything else (error frames, unknown types): counted, not acted on.
    Other,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    /// The Herald message id, to ack; None on the peer.
    pub(crate) id: Option<&'a str>,
    pub(crate) k: Option<u64>,
    pub(crate) sent_us: Option<u64>,
    pub(crate) published_ms: Option<u64>,
    /// Herald's `seq`, to check the order of a replay; None on the peer.
    pub(crate) seq: Option<u64>,
}

pub(crate) fn classify(flavor: Flavor, text: &str) -> Inbound<'_> {
    match flavor {
        // The `ws` peer relays the generator's notification-shaped bodies as they are.
        Flavor::Herald | Flavor::Plain => classify_herald(text),
        Flavor::EngineIo => classify_engine_io(text),
    }
}

fn classify_herald(text: &str) -> Inbound<'_> {
    // `type` comes first in every frame Herald (and the bare server) sends.
    if text.starts_with(r#"{"type":"notification""#) || text.starts_with(r#"{"type":"topic_message""#) {
        Inbound::Message(message(text, true))
    } else if text.starts_with(r#"{"type":"hello""#) {
        Inbound::Ready
    } else {
        Inbound::Other
    }
}

fn classify_engine_io(text: &str) -> Inbound<'_> {
    match text.as_bytes() {
        [b'4', b'2', ..] => Inbound::Message(message(text, false)),
        [b'4', b'0', ..] => Inbound::Ready,
        [b'0', ..] => Inbound::EioOpen,
        [b'2'] => Inbound::EioPing,
        _ => Inbound::Other,
    }
}

fn message(text: &str, herald: bool) -> Message<'_> {
    Message {
        id: if herald { string_field(text, r#""id":""#) } else { None },
        k: number_field(text, r#""lg_k":"#),
        sent_us: number_field(text, r#""lg_t":"#),
        published_ms: if herald { number_field(text, r#""published_at_ms":"#) } else { None },
        seq: if herald { number_field(text, r#""seq":"#) } else { None },
    }
}

/// The unsigned integer right after the first `key` (which includes the colon).
pub(crate) fn number_field(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..].trim_start();
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The string right after the first `key` (which includes the opening quote). Ids the generator
/// publishes contain no escapes.
fn string_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = text.find(key)? + key.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// Herald's ack frame for these ids.
pub(crate) fn ack_frame(ids: &[String]) -> String {
    serde_json::json!({ "type": "ack", "ids": ids }).to_string()
}

/// Engine.IO's answers.
pub(crate) const EIO_PONG: &str = "3";
pub(crate) const SIO_CONNECT: &str = "40";

/// The payload of a load message: its index and its send time.
pub(crate) fn payload(k: u64, sent_us: u64) -> String {
    format!(r#"{{"lg_k":{k},"lg_t":{sent_us}}}"#)
}

/// A Herald-shaped notification of load message `k`, sent at `now_us`, for the systems the
/// generator sends frames to itself (the peers' and the bare server's `/publish`, the bare
/// server's `/send`), so that every system carries frames of about the same size.
pub(crate) fn notification(id: &str, k: u64, now_us: u64) -> String {
    format!(
        r#"{{"type":"notification","id":"{id}","seq":{},"payload":{},"published_at_ms":{},"expires_at_ms":{}}}"#,
        k + 1,
        payload(k, now_us),
        now_us / 1000,
        now_us / 1000 + 3_600_000
    )
}

pub(crate) fn now_us() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn herald_frames() {
        let hello = r#"{"type":"hello","connection_id":"c","gateway_id":"g","heartbeat_interval_ms":15000,"max_frame_bytes":16384}"#;
        assert_eq!(classify(Flavor::Herald, hello), Inbound::Ready);
        let n = r#"{"type":"notification","id":"d-7","seq":9,"payload":{"lg_k":7,"lg_t":1700000000000123},"published_at_ms":1700000000000,"expires_at_ms":1}"#;
        assert_eq!(
            classify(Flavor::Herald, n),
            Inbound::Message(Message {
                id: Some("d-7"),
                k: Some(7),
                sent_us: Some(1_700_000_000_000_123),
                published_ms: Some(1_700_000_000_000),
                seq: Some(9),
            })
        );
        assert_eq!(classify(Flavor::Herald, r#"{"type":"error","code":"x"}"#), Inbound::Other);
        let t = r#"{"type":"topic_message","topic":"lg","offset":3,"id":"t-0","payload":{"lg_k":0,"lg_t":5},"published_at_ms":4,"expires_at_ms":9}"#;
        assert_eq!(
            classify(Flavor::Herald, t),
            Inbound::Message(Message {
                id: Some("t-0"),
                k: Some(0),
                sent_us: Some(5),
                published_ms: Some(4),
                seq: None
            })
        );
        assert_eq!(classify(Flavor::Herald, r#"{"type":"subscribed","topic":"lg"}"#), Inbound::Other);
    }

    #[test]
    fn engine_io_frames() {
        assert_eq!(classify(Flavor::EngineIo, r#"0{"sid":"x","pingInterval":25000}"#), Inbound::EioOpen);
        assert_eq!(classify(Flavor::EngineIo, "2"), Inbound::EioPing);
        assert_eq!(classify(Flavor::EngineIo, r#"40{"sid":"y"}"#), Inbound::Ready);
        let n = r#"42["n",{"payload":{"lg_k":3,"lg_t":55}}]"#;
        assert_eq!(
            classify(Flavor::EngineIo, n),
            Inbound::Message(Message { id: None, k: Some(3), sent_us: Some(55), published_ms: None, seq: None })
        );
    }

    #[test]
    fn plain_frames_are_the_relayed_notifications() {
        assert!(Flavor::Plain.ready_on_upgrade() && !Flavor::Herald.ready_on_upgrade());
        let n = r#"{"type":"notification","id":"g-3","seq":4,"payload":{"lg_k":3,"lg_t":55},"published_at_ms":1,"expires_at_ms":2}"#;
        assert!(matches!(classify(Flavor::Plain, n), Inbound::Message(Message { k: Some(3), .. })));
        assert_eq!(classify(Flavor::Plain, "2"), Inbound::Other, "no Engine.IO pings on a plain socket");
    }

    #[test]
    fn a_notification_made_here_reads_back_as_the_load_message_it_is() {
        let frame = notification("d-7", 7, 1_700_000_000_000_123);
        assert_eq!(
            classify(Flavor::Herald, &frame),
            Inbound::Message(Message {
                id: Some("d-7"),
                k: Some(7),
                sent_us: Some(1_700_000_000_000_123),
                published_ms: Some(1_700_000_000_000),
                seq: Some(8),
            })
        );
    }

    #[test]
    fn fields_and_payload_round_trip() {
        let p = payload(12, 34);
        assert_eq!(number_field(&p, r#""lg_k":"#), Some(12));
        assert_eq!(number_field(&p, r#""lg_t":"#), Some(34));
        assert_eq!(number_field(&p, r#""nope":"#), None);
        let ack: serde_json::Value = serde_json::from_str(&ack_frame(&["a".into(), "b".into()])).unwrap_or_default();
        assert_eq!(ack, serde_json::json!({ "type": "ack", "ids": ["a", "b"] }));
    }
}
