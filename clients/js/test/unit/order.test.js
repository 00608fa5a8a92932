import { test } from "node:test";
import assert from "node:assert/strict";
import { SeqOrder, deadline } from "../../dist/index.js";

test("held notifications come out in seq order once their window is over", () => {
  const o = new SeqOrder(100);
  o.push(5, "e", 0);
  o.push(3, "c", 10);
  o.push(9, "i", 50);
  assert.deepEqual(o.release(99), []);
  // At 100 the first one's wait is over: everything up to seq 5 goes, seq 9 waits.
  assert.deepEqual(o.release(100), ["c", "e"]);
  assert.equal(o.nextInMs(100), 50);
  o.push(7, "g", 120);
  assert.deepEqual(o.release(150), ["g", "i"], "a lower seq arriving late still goes first");
  assert.equal(o.size, 0);
  assert.equal(o.nextInMs(150), null);
});

test("flush gives everything in order", () => {
  const o = new SeqOrder(1000);
  o.push(2, "b", 0);
  o.push(1, "a", 0);
  assert.deepEqual(o.flush(), ["a", "b"]);
});

test("a connection is dead after two silent intervals, once hello has said how long one is", () => {
  assert.equal(deadline(1000, 15_000), 1000 + 30_000 + 1000);
  assert.equal(deadline(1000, 0), null);
});
