//! Frames on a client's WebSocket: JSON text frames, each an object with a `type` field.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{ConnectionId, GatewayId, MessageId};
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
            ClientFrame::Refresh { .. } => None,
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
