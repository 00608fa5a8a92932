import { test } from "node:test";
import assert from "node:assert/strict";
import { refreshAt, MIN_REFRESH_MARGIN_MS, MAX_REFRESH_MARGIN_MS } from "../../dist/index.js";

test("a token is refreshed a tenth of its life before it expires, within bounds", () => {
  const now = 1_764_000_000_000;
  const hour = 3_600_000;
  assert.equal(refreshAt(now + hour, now), now + hour - 300_000, "an hour: 5 min before (the cap)");
  assert.equal(refreshAt(now + 20 * 60_000, now), now + 20 * 60_000 - 120_000, "20 min: 2 min before");
  assert.equal(refreshAt(now + 100_000, now), now + 100_000 - MIN_REFRESH_MARGIN_MS, "short: 30 s before");
  assert.equal(refreshAt(now + 10_000, now), now, "less than the margin left: now");
  assert.ok(MAX_REFRESH_MARGIN_MS > MIN_REFRESH_MARGIN_MS);
});

test("nothing to refresh without an expiry or past it", () => {
  const now = 1_764_000_000_000;
  assert.equal(refreshAt(undefined, now), null, "a gateway that does not say");
  assert.equal(refreshAt("soon", now), null);
  assert.equal(refreshAt(now, now), null, "expired: the reconnect gets a fresh token");
  assert.equal(refreshAt(now - 1, now), null);
});
