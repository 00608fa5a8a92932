//! Messages between Herald's own processes. Externally tagged (`{"deliver": …}`) so that raw
//! payloads pass through without being parsed again.

use serde::{Deserialize, Serialize};

use crate::client::{AckKind, Notification};
use crate::ids::{ConnectionId, GatewayId, MessageId, UserId};
use crate::UnixMillis;

/// Dispatcher → one gateway, on that gateway's own core NATS subject. Best effort by design: a
/// command that is lost leaves its receipts pending, and they are sent again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayCommand {
    /// New messages, each for every local connection of the listed users.
    Deliver(Vec<Routed>),
    /// Pending messages for one connection that just came online, oldest first.
    Replay(Replay),
    /// Close every connection of this user on the gateway (an operator's kick).
    Kick(Kick),
}

/// One notification and the users on the receiving gateway it is for. A fan-out to many users
/// travels once per gateway, not once per recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Routed {
    pub users: Vec<UserId>,
    pub notification: Notification,
    /// W3C trace context of the dispatcher's routing span, when traces are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Sent to each gateway that presence says holds a connection of `user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kick {
    pub user: UserId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    pub user: UserId,
    pub connection_id: ConnectionId,
    pub notifications: Vec<Notification>,
}

/// Gateway → dispatchers, on the durable events stream (`herald.events.>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Acknowledgements from clients, batched by the gateway.
    Acks(Vec<AckRecord>),
    /// A connection was registered in presence and wants its pending messages.
    Online(Online),
}

/// What one client frame acknowledged. The user comes from the connection's token, never from
/// the client, so a client can only ever move its own user's receipts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    pub user: UserId,
    pub connection_id: ConnectionId,
    pub gateway_id: GatewayId,
    pub kind: AckKind,
    /// Ids the gateway sent this connection (before their expiry): an ack or read of these moves
    /// a pending or expired receipt.
    pub ids: Vec<MessageId>,
    /// Only for `read`: ids this connection was not sent (another device got them). They can
    /// only turn a receipt that is `delivered` already into `read`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_unsent: Vec<MessageId>,
    pub at_ms: UnixMillis,
    /// W3C trace context of the gateway's ack span (for the first traced id), when traces are
    /// exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Online {
    pub user: UserId,
    pub connection_id: ConnectionId,
    pub gateway_id: GatewayId,
    pub at_ms: UnixMillis,
}
