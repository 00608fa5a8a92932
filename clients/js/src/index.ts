/**
 * `@herald/client`: Herald's client SDK. See README.md for what it does and what it leaves to
 * the application; proto/README.md is the protocol it implements.
 */

export { HeraldClient } from "./client.js";
export type {
  ConnectionState,
  HeraldClientOptions,
  TokenRequest,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { Backoff } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { decide } from "./reconnect.js";
export type { Decision, Ending, TokenReason } from "./reconnect.js";
export { SeenIds } from "./seen.js";
export type { SeenOptions, SeenState } from "./seen.js";
export { AckQueue, TokenBucket, chunkIds } from "./acks.js";
export type { AckKind, Batch, PacingOptions } from "./acks.js";
export { SeqOrder } from "./order.js";
export { TopicSubscriptions } from "./topics.js";
export type { SubscribeFrame, TopicHandler, TopicStatus } from "./topics.js";
export { deadline } from "./liveness.js";
export { refreshAt, MIN_REFRESH_MARGIN_MS, MAX_REFRESH_MARGIN_MS } from "./refresh.js";
export { CloseCode, MAX_IDS_PER_FRAME, MAX_MESSAGE_ID_BYTES } from "./protocol.js";
export type {
  ClientFrame,
  ConnectionId,
  ErrorCode,
  GatewayId,
  Hello,
  MessageId,
  Notification,
  ServerFrame,
  TopicName,
  TopicNotification,
  TopicRefusal,
} from "./protocol.js";
