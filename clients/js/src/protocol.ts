// Generated from the Rust types in proto/src by proto/src/typescript.rs: do not edit.
// Regenerate with `make ts-types`; `make test` fails while this file and the types differ.

/**
 * A message's id: the publisher's `id`, or one Herald assigned. It never holds `/`, space or
 * any character a key could be split on.
 */
export type MessageId = string;

/**
 * One WebSocket connection, assigned by its gateway.
 */
export type ConnectionId = string;

/**
 * One gateway process; part of its NATS subjects.
 */
export type GatewayId = string;

/**
 * A topic: what a topic job is addressed to and what a client subscribes to. It is also
 * the last part of the topic's NATS subject, hence the subject-token grammar.
 */
export type TopicName = string;

/**
 * Why a gateway reports an error to a client. Sent in an `error` frame before a close.
 */
export type ErrorCode = "bad_frame" | "unsupported_data" | "frame_too_large" | "rate_limited" | "slow_consumer" | "token_expired" | "token_refused" | "shutting_down" | "kicked";

/**
 * Which client frame a `topic_refused` answers.
 */
export type TopicRequest = "subscribe" | "unsubscribe";

/**
 * Why a `subscribe` or `unsubscribe` was refused. The connection stays open either way.
 */
export type TopicRefusal = "invalid_topic" | "not_allowed" | "too_many_subscriptions" | "already_subscribed" | "not_subscribed";

/**
 * The first frame on every connection.
 */
export type Hello = { 
/**
 * This connection's id, as it appears in receipts (`delivered_by`).
 */
connection_id: ConnectionId, gateway_id: GatewayId, 
/**
 * How often the gateway pings. A client that does not answer (pong) within two intervals is
 * closed with 4408. Browsers answer pings themselves but cannot see them, so only a client
 * with access to pings can use two silent intervals as a sign of a dead connection.
 */
heartbeat_interval_ms: number, 
/**
 * The largest frame the gateway accepts from the client.
 */
max_frame_bytes: number, 
/**
 * When the token the connection was opened with expires (its `exp`). The connection is
 * closed with 4401 then, unless a `refresh` frame brought a newer token before.
 */
token_expires_at_ms: number, };

/**
 * One message for the user. May arrive more than once (delivery is at-least-once): deduplicate
 * by `id`, and order by `seq`.
 */
export type Notification = { id: MessageId, 
/**
 * Increases with publish order across all of Herald (the job's JetStream sequence); two
 * messages to one user never share it.
 */
seq: number, 
/**
 * The publisher's JSON, exactly as published.
 */
payload: unknown, published_at_ms: number, 
/**
 * After this instant the message is never delivered; its receipt reads `expired`.
 */
expires_at_ms: number, };

/**
 * One topic message on a client's socket.
 */
export type TopicNotification = { topic: TopicName, 
/**
 * The message's position in Herald's topics stream: it grows with publish order, with gaps
 * (other topics' messages). Pass the last one you got as `since` when you subscribe again.
 */
offset: number, id: MessageId, payload: unknown, published_at_ms: number, expires_at_ms: number, };

/**
 * A frame from a gateway to a client.
 *
 * Serialized with a `type` tag. Decoding goes through [`ServerFrame::decode`], because the
 * notification payload is kept as raw JSON, which serde cannot buffer inside a tagged enum.
 */
export type ServerFrame = { "type": "hello" } & Hello | { "type": "notification" } & Notification | { "type": "error", code: ErrorCode, message: string, } | { "type": "heartbeat" } | { "type": "refreshed", token_expires_at_ms: number, } | { "type": "subscribed", topic: TopicName, recovered?: boolean | null, } | { "type": "unsubscribed", topic: TopicName, } | { "type": "topic_refused", request: TopicRequest, 
/**
 * The `topic` of the refused frame, as sent.
 */
topic: string, reason: TopicRefusal, message: string, } | { "type": "topic_message" } & TopicNotification;

/**
 * A frame from a client to its gateway.
 */
export type ClientFrame = { "type": "ack", ids: Array<MessageId>, } | { "type": "read", ids: Array<MessageId>, } | { "type": "refresh", token: string, } | { "type": "subscribe", topic: string, since?: number | null, } | { "type": "unsubscribe", topic: string, };

/** WebSocket close codes a gateway sends (proto/src/close.rs). */
export const CloseCode = {
  /** The gateway is shutting down or being drained: reconnect (to any gateway) right away. */
  SERVICE_RESTART: 1012,
  /** A binary frame: the protocol is JSON text only. */
  UNSUPPORTED_DATA: 1003,
  /** A frame larger than the gateway's configured limit. */
  MESSAGE_TOO_BIG: 1009,
  /** A text frame that is not a valid client frame (not JSON, unknown type, missing fields). */
  BAD_FRAME: 4400,
  /** The token expired while the connection was open, or a `refresh` frame's token was refused: get a fresh one and reconnect. */
  TOKEN_EXPIRED: 4401,
  /** The client did not answer pings in time. */
  HEARTBEAT_TIMEOUT: 4408,
  /** The client read too slowly and its outbound queue filled up: reconnect and it gets the rest. */
  SLOW_CONSUMER: 4409,
  /** An operator closed this user's connections (`heraldctl kick`): get a new token before reconnecting, and expect a refused or revoked one. */
  KICKED: 4403,
  /** The client sent frames faster than the per-connection rate limit: back off, then reconnect. */
  RATE_LIMITED: 4429,
} as const;

/** Longest message id, in bytes (proto/src/ids.rs). */
export const MAX_MESSAGE_ID_BYTES = 128;

/** Most ids one `ack` or `read` frame may carry (proto/src/client.rs). */
export const MAX_IDS_PER_FRAME = 1000;
