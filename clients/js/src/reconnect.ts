/**
 * What to do after a connection ends, from how it ended: the close code (or the HTTP status of a
 * refused upgrade) and whether it had got as far as `hello`. The rules are proto/README.md's
 * "Close codes", "Connecting" and "Reconnecting" tables; the timers are the client's business.
 */

import { CloseCode } from "./protocol.js";

/**
 * Why the token provider is being asked: it may use a cached token only for "connect". "refresh":
 * the open connection's token expires soon; a token with a later `exp` keeps it open.
 */
export type TokenReason = "connect" | "expired" | "unauthorized" | "refresh";

export type Decision =
  /**
   * Reconnect soon, after a random delay of up to `spreadMs`, without backoff: the gateway is
   * draining and any other one will do, but its clients should not all arrive at once.
   */
  | { readonly action: "soon"; readonly token: TokenReason; readonly spreadMs: number }
  /** Reconnect after the backoff delay, which is at least `minStepMs` for this ending. */
  | { readonly action: "backoff"; readonly token: TokenReason; readonly minStepMs: number }
  /** Do not reconnect: retrying cannot help until the application (or SDK) is fixed. */
  | { readonly action: "stop"; readonly why: string };

export interface Ending {
  /** The WebSocket close code (1006 when the connection was lost without a close frame). */
  readonly code: number;
  /** The HTTP status of a refused upgrade, where the runtime exposes it (Node `ws`). */
  readonly httpStatus?: number;
  /** Whether this connection received `hello` before it ended. */
  readonly opened: boolean;
}

/** A pause long enough for a rate limit or a full gateway to have room again. */
const SLOW_DOWN_MS = 2_000;
/** The longest random delay before reconnecting from a draining gateway (proto/README.md). */
export const DRAIN_SPREAD_MS = 1_000;

export function decide(ending: Ending): Decision {
  switch (ending.httpStatus) {
    case 401:
      return { action: "backoff", token: "unauthorized", minStepMs: 0 };
    case 429: // too_many_connections: this user holds its limit on that gateway.
    case 503: // gateway_full or draining: the load balancer may pick another one.
      return { action: "backoff", token: "connect", minStepMs: SLOW_DOWN_MS };
    default:
      break;
  }
  switch (ending.code) {
    case CloseCode.SERVICE_RESTART:
      return { action: "soon", token: "connect", spreadMs: DRAIN_SPREAD_MS };
    case CloseCode.TOKEN_EXPIRED:
      return { action: "backoff", token: "expired", minStepMs: 0 };
    case CloseCode.RATE_LIMITED:
      return { action: "backoff", token: "connect", minStepMs: SLOW_DOWN_MS };
    case CloseCode.KICKED:
      // An operator closed this user's connections: a fresh token, which the backend may refuse.
      return { action: "backoff", token: "unauthorized", minStepMs: SLOW_DOWN_MS };
    case CloseCode.UNSUPPORTED_DATA:
    case CloseCode.MESSAGE_TOO_BIG:
    case CloseCode.BAD_FRAME:
      return { action: "stop", why: `the gateway refused a frame this client sent (close ${ending.code})` };
    default:
      // 4408, 4409, 1001, 1006, ...: the connection is gone. A browser also reports a refused
      // upgrade (a 401 among them) as 1006 before any hello, hence a fresh token then.
      return { action: "backoff", token: ending.opened ? "connect" : "unauthorized", minStepMs: 0 };
  }
}
