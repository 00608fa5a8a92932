import { test } from "node:test";
import assert from "node:assert/strict";
import { SeenIds } from "../../dist/index.js";

test("an id is new once, then a duplicate", () => {
  const s = new SeenIds();
  assert.equal(s.add("m1", 10_000, 0, 0), true);
  assert.equal(s.add("m1", 10_000, 0, 5), false);
  assert.equal(s.size, 1);
});

test("ids are forgotten once expired past the margin, by the server's clock", () => {
  // The local clock runs 1 h ahead of the server's: published at server time 0, seen at 3_600_000.
  const ahead = 3_600_000;
  const s = new SeenIds({ marginMs: 1000 });
  s.add("short", 5_000, 0, ahead);
  s.add("long", 500_000, 0, ahead);
  assert.equal(s.prune(ahead + 5_000), 0, "expired only 0 ms ago by the server's clock");
  assert.equal(s.prune(ahead + 6_001), 1);
  assert.equal(s.state("short"), undefined);
  assert.equal(s.state("long"), "received");
});

test("a clock behind the server's never forgets early either", () => {
  const s = new SeenIds({ marginMs: 0 });
  // Seen 10 s after publication by a clock 1 min behind: the offset estimate is -50 s, the
  // delay included, so the estimated server time lags the true one by 10 s.
  s.add("m", 20_000, 0, -50_000);
  assert.equal(s.prune(-30_000), 0, "estimated server time 20 s: not past expiry (true time: 30 s)");
  assert.equal(s.prune(-29_999), 1);
});

test("memory is bounded: over the cap, the soonest-expiring go first", () => {
  const s = new SeenIds({ maxIds: 100 });
  for (let i = 0; i < 1000; i++) s.add(`m${i}`, 1_000_000 + i, 0, 0);
  assert.ok(s.size <= 100, `${s.size}`);
  assert.equal(s.state("m999"), "received", "the latest-expiring stay");
  assert.equal(s.state("m0"), undefined);
});

test("states only move forward", () => {
  const s = new SeenIds();
  s.add("m", 1e12, 0, 0);
  s.mark("m", "read");
  s.mark("m", "acked");
  assert.equal(s.state("m"), "read");
  s.mark("unknown", "acked");
  assert.equal(s.state("unknown"), undefined);
});
