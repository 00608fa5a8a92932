//! Messages between Herald's own processes. Externally tagged (`{"deliver": …}`) so that raw
//! payloads pass through without being parsed again.

use serde::{Deserialize, Serialize};

use crate::client::{AckKind, Notification};
use crate::ids::{ConnectionId, GatewayId, MessageId, TopicName, UserId};
use crate::UnixMillis;

/// Dispatcher → one gateway, on that gateway's own core NATS subject. Best effort by design: a
/// command that is lost leaves its receipts pending, and they are sent again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayCommand {
    /// New messages, each for every local connection of the listed users.
    Deliver(Vec<Routed>),
    /// A page of pending messages for one connection that came online, oldest first.
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
    /// Sent again because the ack timeout passed without an ack. A gateway writes a notification
    /// to a connection that was sent it already only when this is set: any other second copy
    /// (the same message live and in a replay) is a duplicate it leaves out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resend: bool,
}

/// Sent to each gateway that presence says holds a connection of `user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kick {
    pub user: UserId,
}

/// One page of a connection's replay: the user's oldest pending messages after where the
/// previous page ended, in `seq` order, bounded in count and bytes (one command).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    pub user: UserId,
    pub connection_id: ConnectionId,
    pub notifications: Vec<Notification>,
    /// More of the backlog follows, after this `seq`: the gateway asks for it ([`Event::More`])
    /// once the connection has taken this page. Absent on the page that ends the backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more_after_seq: Option<u64>,
}

/// Gateway → dispatchers, on the durable events stream (`herald.events.>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Acknowledgements from clients, batched by the gateway.
    Acks(Vec<AckRecord>),
    /// A connection was registered in presence and wants its pending messages.
    Online(Online),
    /// A connection took a replay page that said more follows, and wants the next one.
    More(More),
    /// Acks of topic messages, counted per message by one gateway over one flush interval.
    TopicAcks(Vec<TopicAckCount>),
}

/// How many of one gateway's connections acked one topic message for the first time, and how
/// many distinct users they were, since the gateway's last report. A user whose connections
/// acked on two gateways, or in two reports, is counted in each: `users` adds up to an upper
/// bound of the distinct users who acked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicAckCount {
    pub id: MessageId,
    pub topic: TopicName,
    pub gateway_id: GatewayId,
    pub connections: u64,
    pub users: u64,
    pub at_ms: UnixMillis,
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

/// The next page of one connection's replay: the user's pending messages after `after_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct More {
    pub user: UserId,
    pub connection_id: ConnectionId,
    pub gateway_id: GatewayId,
    /// The `more_after_seq` of the page the connection took.
    pub after_seq: u64,
    pub at_ms: UnixMillis,
}
