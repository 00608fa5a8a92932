import { test } from "node:test";
import assert from "node:assert/strict";
import { Backoff } from "../../dist/index.js";

test("steps double from 250 ms up to 10 s", () => {
  const b = new Backoff({}, () => 0.5); // no jitter: the middle of the range
  const delays = Array.from({ length: 9 }, () => b.next());
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
});

test("jitter stays between half and one and a half times the step", () => {
  assert.equal(new Backoff({}, () => 0).next(), 125);
  assert.equal(new Backoff({}, () => 0.999999).next(), 375);
  const b = new Backoff();
  for (let i = 0; i < 200; i++) {
    const step = b.step;
    const d = b.next();
    assert.ok(d >= step * 0.5 - 1 && d <= step * 1.5 + 1, `${d} for a step of ${step}`);
  }
});

test("reset starts from the bottom again; atLeast raises the step within the cap", () => {
  const b = new Backoff({}, () => 0.5);
  b.next();
  b.next();
  b.reset();
  assert.equal(b.next(), 250);
  b.reset();
  b.atLeast(2000);
  assert.equal(b.next(), 2000);
  b.atLeast(60_000);
  assert.equal(b.step, 10_000);
});
