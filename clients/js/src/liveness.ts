/**
 * When an open connection counts as dead (proto/README.md, "Keep-alive"): the gateway pings every
 * `heartbeat_interval_ms`, so a client that can see pings may give up after two intervals without
 * a ping or a frame. Browsers answer pings but cannot see them: there an idle connection and a
 * dead one look the same, and no deadline applies.
 */

/** Slack on top of two intervals, for a ping delayed by a busy gateway or network. */
export const LIVENESS_SLACK_MS = 1_000;

/** The instant after which the connection is dead, or null where pings cannot be seen. */
export function deadline(lastActivityMs: number, heartbeatIntervalMs: number, pingsVisible: boolean): number | null {
  if (!pingsVisible || !(heartbeatIntervalMs > 0)) return null;
  return lastActivityMs + 2 * heartbeatIntervalMs + LIVENESS_SLACK_MS;
}
