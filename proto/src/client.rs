//! Frames on a client's WebSocket: JSON text frames, each an object with a `type` field.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{ConnectionId, GatewayId, MessageId, TopicName};
use crate::topic::{TopicNotification, TopicRefusal, TopicRequest};
use crate::UnixMillis;

/// Most ids one `ack` or `read` frame may carry; a frame with more closes with 4400.
pub const MAX_IDS_PER_FRAME: usize = 1000;

/// A frame from a client to its gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// The client has the messages with these ids: their receipts become `delivered`. Only ids
    /// this connection was sent count (proto/README.md, "Acks").
    Ack { ids: Vec<MessageId> },
    /// The user has seen these messages: their receipts become `read` (which implies
    /// `delivered`), if this connection was sent them or they were delivered already.
    Read { ids: Vec<MessageId> },
    /// A new token for the same user: the connection then lasts until its `exp` instead of the
    /// current token's. Answered with `refreshed`; a refused one closes the connection with 4401.
    Refresh { token: String },
    /// Receive the messages published to `topic` from now on; with `since` (the last `offset`
    /// the client got of it), first those it missed, as far as the topics stream still holds
    /// them. Answered with `subscribed` or `topic_refused`. The topic is a string here, not a
    /// [`TopicName`]: a bad name is refused with a reason, and the connection stays.
    Subscribe {
        topic: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Stop receiving `topic`. Answered with `unsubscribed` or `topic_refused`.
    Unsubscribe { topic: String },
}

impl ClientFrame {
    /// Decodes a text frame from a client. Only a JSON object is a frame: serde would also read
    /// the enum from an array (`["ack", ["id"]]`), a form the protocol does not have.
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        if !text.trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("a client frame is a JSON object"));
        }
        serde_json::from_str(text)
    }

    /// What an `ack` or `read` frame tells the dispatcher, and about which messages; None for
    /// a frame that acknowledges nothing (`refresh`).
    pub fn into_parts(self) -> Option<(AckKind, Vec<MessageId>)> {
        match self {
            ClientFrame::Ack { ids } => Some((AckKind::Delivered, ids)),
            ClientFrame::Read { ids } => Some((AckKind::Read, ids)),
            ClientFrame::Refresh { .. } | ClientFrame::Subscribe { .. } | ClientFrame::Unsubscribe { .. } => None,
        }
    }
}

/// What a client acknowledged of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckKind {
    Delivered,
    Read,
}

/// A frame from a gateway to a client.
///
/// Serialized with a `type` tag. Decoding goes through [`ServerFrame::decode`], because the
/// notification payload is kept as raw JSON, which serde cannot buffer inside a tagged enum.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Hello(Hello),
    Notification(Notification),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Sent every heartbeat interval to a client that connected with `heartbeat=frame`: a
    /// sign of life a browser can see (it cannot see pings).
    Heartbeat,
    /// A `refresh` was accepted: the connection now lasts until the new token expires.
    Refreshed {
        token_expires_at_ms: UnixMillis,
    },
    /// A `subscribe` was accepted. `recovered` answers a `subscribe` with `since`: true when
    /// every message of the topic after `since` follows (before any newer one), false when
    /// some of them are gone (older than the topics stream keeps, or more than a recovery
    /// brings). Absent for a `subscribe` without `since`.
    Subscribed {
        topic: TopicName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// An `unsubscribe` was done: no message of the topic is queued for the connection after
    /// this frame.
    Unsubscribed {
        topic: TopicName,
    },
    /// A `subscribe` or `unsubscribe` was refused; the connection stays open.
    TopicRefused {
        request: TopicRequest,
        /// The `topic` of the refused frame, as sent.
        topic: String,
        reason: TopicRefusal,
        message: String,
    },
    /// One message published to a topic this connection is subscribed to.
    TopicMessage(TopicNotification),
}

impl ServerFrame {
    /// Decodes a text frame sent by a gateway.
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Kind {
            Hello,
            Notification,
            Error,
            Heartbeat,
            Refreshed,
            Subscribed,
            Unsubscribed,
            TopicRefused,
            TopicMessage,
        }
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "type")]
            kind: Kind,
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            code: ErrorCode,
            message: String,
        }
        #[derive(Deserialize)]
        struct RefreshedBody {
            token_expires_at_ms: UnixMillis,
        }
        #[derive(Deserialize)]
        struct SubscribedBody {
            topic: TopicName,
            #[serde(default)]
            recovered: Option<bool>,
        }
        #[derive(Deserialize)]
        struct UnsubscribedBody {
            topic: TopicName,
        }
        #[derive(Deserialize)]
        struct RefusedBody {
            request: TopicRequest,
            topic: String,
            reason: TopicRefusal,
            message: String,
        }
        Ok(match serde_json::from_str::<Probe>(text)?.kind {
            Kind::Hello => ServerFrame::Hello(serde_json::from_str(text)?),
            Kind::Notification => ServerFrame::Notification(serde_json::from_str(text)?),
            Kind::Error => {
                let body: ErrorBody = serde_json::from_str(text)?;
                ServerFrame::Error { code: body.code, message: body.message }
            }
            Kind::Heartbeat => ServerFrame::Heartbeat,
            Kind::Refreshed => {
                let body: RefreshedBody = serde_json::from_str(text)?;
                ServerFrame::Refreshed { token_expires_at_ms: body.token_expires_at_ms }
            }
            Kind::Subscribed => {
                let body: SubscribedBody = serde_json::from_str(text)?;
                ServerFrame::Subscribed { topic: body.topic, recovered: body.recovered }
            }
            Kind::Unsubscribed => {
                let body: UnsubscribedBody = serde_json::from_str(text)?;
                ServerFrame::Unsubscribed { topic: body.topic }
            }
            Kind::TopicRefused => {
                let b: RefusedBody = serde_json::from_str(text)?;
                ServerFrame::TopicRefused { request: b.request, topic: b.topic, reason: b.reason, message: b.message }
            }
            Kind::TopicMessage => ServerFrame::TopicMessage(serde_json::from_str(text)?),
        })
    }
}

/// The first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct Hello {
    /// This connection's id, as it appears in receipts (`delivered_by`).
    pub connection_id: ConnectionId,
    pub gateway_id: GatewayId,
    /// How often the gateway pings. A client that does not answer (pong) within two intervals is
    /// closed with 4408. Browsers answer pings themselves but cannot see them, so only a client
    /// with access to pings can use two silent intervals as a sign of a dead connection.
    pub heartbeat_interval_ms: u64,
    /// The largest frame the gateway accepts from the client.
    pub max_frame_bytes: usize,
    /// When the token the connection was opened with expires (its `exp`). The connection is
    /// closed with 4401 then, unless a `refresh` frame brought a newer token before.
    pub token_expires_at_ms: UnixMillis,
}

/// One message for the user. May arrive more than once (delivery is at-least-once): deduplicate
/// by `id`, and order by `seq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct Notification {
    pub id: MessageId,
    /// Increases with publish order across all of Herald (the job's JetStream sequence); two
    /// messages to one user never share it.
    pub seq: u64,
    /// The publisher's JSON, exactly as published.
    #[cfg_attr(test, ts(type = "unknown"))]
    pub payload: Box<RawValue>,
    pub published_at_ms: UnixMillis,
    /// After this instant the message is never delivered; its receipt reads `expired`.
    pub expires_at_ms: UnixMillis,
}

/// Why a gateway reports an error to a client. Sent in an `error` frame before a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    UnsupportedData,
    FrameTooLarge,
    RateLimited,
    SlowConsumer,
    TokenExpired,
    /// A `refresh` frame's token was refused (invalid, expired, or another user's).
    TokenRefused,
    ShuttingDown,
    /// An operator closed the user's connections.
    Kicked,
}
