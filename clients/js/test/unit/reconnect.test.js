import { test } from "node:test";
import assert from "node:assert/strict";
import { decide, CloseCode } from "../../dist/index.js";

test("1012 reconnects soon, after a random delay of up to a second", () => {
  assert.deepEqual(decide({ code: CloseCode.SERVICE_RESTART, opened: true }), { action: "soon", token: "connect", spreadMs: 1000 });
});

test("4401 and HTTP 401 ask for a fresh token first", () => {
  assert.equal(decide({ code: CloseCode.TOKEN_EXPIRED, opened: true }).token, "expired");
  assert.equal(decide({ code: CloseCode.TOKEN_EXPIRED, opened: true }).action, "backoff");
  const refused = decide({ code: 1006, httpStatus: 401, opened: false });
  assert.deepEqual(refused, { action: "backoff", token: "unauthorized", minStepMs: 0 });
});

test("a browser's 1006 before hello may hide a 401: fresh token; after hello: any token", () => {
  assert.equal(decide({ code: 1006, opened: false }).token, "unauthorized");
  assert.equal(decide({ code: 1006, opened: true }).token, "connect");
});

test("4403 (kicked) asks for a fresh token and waits first", () => {
  const d = decide({ code: CloseCode.KICKED, opened: true });
  assert.equal(d.action, "backoff");
  assert.equal(d.token, "unauthorized");
  assert.ok(d.minStepMs >= 1000);
});

test("codes that mean 'fix the client' stop reconnecting", () => {
  for (const code of [CloseCode.UNSUPPORTED_DATA, CloseCode.MESSAGE_TOO_BIG, CloseCode.BAD_FRAME]) {
    assert.equal(decide({ code, opened: true }).action, "stop", `${code}`);
  }
});

test("rate limits and full gateways back off longer; the rest back off", () => {
  for (const ending of [
    { code: CloseCode.RATE_LIMITED, opened: true },
    { code: 1006, httpStatus: 429, opened: false },
    { code: 1006, httpStatus: 503, opened: false },
  ]) {
    const d = decide(ending);
    assert.equal(d.action, "backoff");
    assert.ok(d.minStepMs >= 1000, JSON.stringify(ending));
  }
  for (const code of [CloseCode.HEARTBEAT_TIMEOUT, CloseCode.SLOW_CONSUMER, 1001, 1006, 1011]) {
    assert.deepEqual(decide({ code, opened: true }), { action: "backoff", token: "connect", minStepMs: 0 });
  }
});
