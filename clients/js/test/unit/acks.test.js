import { test } from "node:test";
import assert from "node:assert/strict";
import { AckQueue, TokenBucket, chunkIds, MAX_IDS_PER_FRAME } from "../../dist/index.js";

const size = (kind, ids) => Buffer.byteLength(JSON.stringify({ type: kind, ids }));

test("chunks fill frames up to max_frame_bytes exactly, never past", () => {
  const ids = Array.from({ length: 500 }, (_, i) => `order-${i}.shipped-${"x".repeat(i % 90)}`);
  for (const max of [64, 200, 1024, 16384]) {
    const frames = chunkIds("ack", ids, max);
    const fit = ids.filter((id) => size("ack", [id]) <= max);
    assert.deepEqual(frames.flat(), fit, `${max}: every id that fits a frame, in order`);
    for (const f of frames) assert.ok(size("ack", f) <= max, `${max}: ${size("ack", f)}`);
    // Greedy: the next id would not have fit in the frame before it.
    for (let i = 0; i + 1 < frames.length; i++) {
      assert.ok(size("ack", [...frames[i], frames[i + 1][0]]) > max, `${max}: frame ${i} could take more`);
    }
  }
});

test("chunks hold at most MAX_IDS_PER_FRAME ids", () => {
  const ids = Array.from({ length: 2500 }, (_, i) => `m${i}`);
  const frames = chunkIds("read", ids, 1 << 20);
  assert.deepEqual(frames.map((f) => f.length), [MAX_IDS_PER_FRAME, MAX_IDS_PER_FRAME, 500]);
});

test("an id too long for any frame is left out rather than sent", () => {
  assert.deepEqual(chunkIds("ack", ["a".repeat(100), "b"], 40), [["b"]]);
});

test("a token bucket refills at its rate and caps at its capacity", () => {
  const b = new TokenBucket(10, 10, 0);
  assert.ok(b.take(10, 0));
  assert.equal(b.take(1, 0), false);
  assert.equal(b.waitMs(1, 0), 100);
  assert.ok(b.take(5, 500));
  assert.equal(b.available(100_000), 10);
});

test("the queue paces ids and frames within the gateway's limits", () => {
  const q = new AckQueue(0, { framesPerSec: 50, idsPerSec: 2000 });
  q.add("ack", Array.from({ length: 10_000 }, (_, i) => `m-${i}`));
  let sent = 0;
  let frames = 0;
  let now = 0;
  // Over 10 s the gateway allows 2 x 2000 (burst) + 2000 per second.
  while (q.size > 0 && now <= 10_000) {
    const batch = q.take(now, 16384);
    frames += batch.frames.length;
    for (const f of batch.frames) {
      assert.ok(size(f.type, f.ids) <= 16384);
      sent += f.ids.length;
    }
    const elapsed = now / 1000;
    assert.ok(sent <= 2000 + 2000 * elapsed, `${sent} ids by ${now} ms`);
    assert.ok(frames <= 50 + 50 * elapsed, `${frames} frames by ${now} ms`);
    if (batch.retryInMs === null) break;
    now += batch.retryInMs;
  }
  assert.equal(sent, 10_000);
  assert.ok(now >= 4000 && now <= 5100, `10000 ids at 2000/s after the first 2000 take about 4 s, took ${now} ms`);
});

test("a read replaces a waiting ack, and reads go first", () => {
  const q = new AckQueue(0);
  q.add("ack", ["a", "b", "c"]);
  q.add("read", ["b"]);
  q.add("ack", ["b"]);
  const { frames, retryInMs } = q.take(0, 16384);
  assert.deepEqual(frames, [{ type: "read", ids: ["b"] }, { type: "ack", ids: ["a", "c"] }]);
  assert.equal(retryInMs, null);
  assert.equal(q.size, 0);
});

test("clear drops what waits (the connection is gone)", () => {
  const q = new AckQueue(0);
  q.add("ack", ["a"]);
  q.clear();
  assert.deepEqual(q.take(0, 16384).frames, []);
});
