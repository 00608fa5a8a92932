/**
 * When to send a fresh token on an open connection (proto/README.md, "refresh"): some time before
 * the current token's `exp`, so that a slow token provider does not cost the connection. The
 * margin is a tenth of the token's remaining life, within [MIN_REFRESH_MARGIN_MS,
 * MAX_REFRESH_MARGIN_MS]. The timer is the client's business.
 */

export const MIN_REFRESH_MARGIN_MS = 30_000;
export const MAX_REFRESH_MARGIN_MS = 300_000;

/**
 * The instant to refresh at, or null when there is nothing to refresh: no expiry known (a gateway
 * older than `token_expires_at_ms`) or already expired (the gateway closes with 4401, and the
 * reconnect asks for a fresh token anyway).
 */
export function refreshAt(expiresAtMs: unknown, nowMs: number): number | null {
  if (typeof expiresAtMs !== "number" || !Number.isFinite(expiresAtMs)) return null;
  const left = expiresAtMs - nowMs;
  if (left <= 0) return null;
  const margin = Math.min(MAX_REFRESH_MARGIN_MS, Math.max(MIN_REFRESH_MARGIN_MS, left / 10));
  return Math.max(nowMs, expiresAtMs - margin);
}
