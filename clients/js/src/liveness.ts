/**
 * When an open connection counts as dead (proto/README.md, "Keep-alive"): the gateway pings every
 * `heartbeat_interval_ms` and, as the SDK asks with `heartbeat=frame`, sends a `heartbeat` text
 * frame too, which browsers (blind to pings) can see. Two intervals without a ping or a frame,
 * and the connection is dead.
 */

/** Slack on top of two intervals, for a ping delayed by a busy gateway or network. */
export const LIVENESS_SLACK_MS = 1_000;

/** The instant after which the connection is dead, or null before `hello` says the interval. */
export function deadline(lastActivityMs: number, heartbeatIntervalMs: number): number | null {
  if (!(heartbeatIntervalMs > 0)) return null;
  return lastActivityMs + 2 * heartbeatIntervalMs + LIVENESS_SLACK_MS;
}
