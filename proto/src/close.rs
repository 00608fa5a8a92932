//! WebSocket close codes sent by a gateway. Standard codes where one fits, `4xxx` (mirroring HTTP
//! statuses) for Herald's own reasons. Every close leaves undelivered messages pending: a client
//! that reconnects gets them again.

/// The gateway is shutting down or being drained: reconnect (to any gateway) right away.
pub const SERVICE_RESTART: u16 = 1012;
/// A binary frame: the protocol is JSON text only.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A frame larger than the gateway's configured limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// A text frame that is not a valid client frame (not JSON, unknown type, missing fields).
pub const BAD_FRAME: u16 = 4400;
/// The token expired while the connection was open, or a `refresh` frame's token was refused:
/// get a fresh one and reconnect.
pub const TOKEN_EXPIRED: u16 = 4401;
/// The client did not answer pings in time.
pub const HEARTBEAT_TIMEOUT: u16 = 4408;
/// The client read too slowly and its outbound queue filled up: reconnect and it gets the rest.
pub const SLOW_CONSUMER: u16 = 4409;
/// An operator closed this user's connections (`heraldctl kick`): get a new token before
/// reconnecting, and expect a refused or revoked one.
pub const KICKED: u16 = 4403;
/// The client sent frames faster than the per-connection rate limit: back off, then reconnect.
pub const RATE_LIMITED: u16 = 4429;
