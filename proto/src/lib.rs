//! Herald's wire contract, and nothing else: the serde types that cross a socket or a NATS subject.
//!
//! * [`client`]: frames between a client and a gateway (the public protocol).
//! * [`job`]: what a backend publishes to JetStream, and the rejections it may get back.
//! * [`internal`]: what gateways and dispatchers tell each other over NATS.
//! * [`topic`]: topic subscriptions, their claim patterns, and topic messages.
//! * [`close`]: the WebSocket close codes a client must understand.
//! * [`ids`]: message, user, connection and gateway ids, validated where they are built.
//!
//! `README.md` next to this crate is the protocol document; the JSON files under `golden/` are its
//! examples, and the tests below keep the two in step with these types. The JS SDK's declarations
//! (`clients/js/src/protocol.ts`) are generated from them too, and checked by `typescript`.

pub mod client;
pub mod close;
pub mod ids;
pub mod internal;
pub mod job;
pub mod topic;
#[cfg(test)]
mod typescript;

pub use client::{AckKind, ClientFrame, ErrorCode, Hello, Notification, ServerFrame};
pub use ids::{ConnectionId, GatewayId, InvalidId, MessageId, TopicName, UserId};
pub use internal::{AckRecord, Event, GatewayCommand, Kick, More, Online, Replay, Routed, TopicAckCount};
pub use job::{PublishJob, RejectCode, Rejection};
pub use topic::{TopicNotification, TopicPattern, TopicPublication, TopicRefusal, TopicRequest};

/// Milliseconds since the Unix epoch: every timestamp on the wire uses this unit.
pub type UnixMillis = u64;
