// The client against a fake WebSocket, with Node's mocked timers: what it sends, when it
// reconnects and with which token, and what the application sees.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { HeraldClient } from "../../dist/index.js";

class FakeSocket {
  static all = [];
  constructor(url, options) {
    this.url = url;
    this.options = options;
    this.readyState = 0;
    this.sent = [];
    this.listeners = {};
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  on(event, fn) {
    (this.listeners[event] ??= []).push(fn);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closedWith = code;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: 1005, reason: reason ?? "" }), 0);
  }
  terminate() {
    this.readyState = 3;
    this.closedWith = "terminated";
  }
  // What the gateway does:
  hello(overrides = {}) {
    this.readyState = 1;
    this.frame({ type: "hello", connection_id: `c${FakeSocket.all.length}`, gateway_id: "gw", heartbeat_interval_ms: 15000, max_frame_bytes: 16384, ...overrides });
  }
  frame(f) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  ping() {
    for (const fn of this.listeners.ping ?? []) fn();
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

/** A browser-like socket: no `on`, so no pings and no HTTP status. */
class BrowserSocket extends FakeSocket {}
BrowserSocket.prototype.on = undefined;
BrowserSocket.prototype.terminate = undefined;

const note = (id, seq, extra = {}) => ({ type: "notification", id, seq, payload: { id }, published_at_ms: Date.now(), expires_at_ms: Date.now() + 3_600_000, ...extra });

async function settle() {
  for (let i = 0; i < 5; i++) await Promise.resolve();
}

/** close(), with the mocked clock moved on for the socket's close event. */
async function stop(client) {
  const closing = client.close();
  mock.timers.tick(1000);
  await closing;
}

async function start(options = {}) {
  FakeSocket.all = [];
  const tokens = [];
  const states = [];
  const seen = [];
  const client = new HeraldClient({
    url: "ws://gw.test",
    WebSocket: FakeSocket,
    getToken: (request) => {
      tokens.push(request);
      return `token-${tokens.length}`;
    },
    ...options,
  });
  client.on("state", (s) => states.push(s));
  const duplicates = [];
  client.on("notification", (n) => seen.push(n.id));
  client.on("duplicate", (n) => duplicates.push(n.id));
  client.connect();
  await settle();
  return { client, tokens, states, seen, duplicates, socket: () => FakeSocket.all.at(-1) };
}

test("connects with the token in a header, delivers once, acks every copy in batches", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, tokens, states, seen, duplicates, socket } = await start();
  assert.equal(socket().url, "ws://gw.test/v1/connect?heartbeat=frame");
  assert.deepEqual(socket().options, { headers: { Authorization: "Bearer token-1" } });
  assert.deepEqual(tokens, [{ attempt: 1, reason: "connect" }]);
  socket().hello();
  assert.equal(states.at(-1).state, "open");
  socket().frame(note("m1", 1));
  socket().frame(note("m2", 2));
  socket().frame(note("m1", 1));
  socket().frame({ type: "from_the_future", x: 1 });
  assert.deepEqual(seen, ["m1", "m2"], "a copy is not shown again; unknown frames are ignored");
  assert.deepEqual(duplicates, ["m1"]);
  assert.deepEqual(socket().sent, [], "acks wait to be batched");
  mock.timers.tick(100);
  assert.deepEqual(socket().sent, [{ type: "ack", ids: ["m1", "m2"] }]);
  socket().frame(note("m1", 1));
  mock.timers.tick(100);
  assert.deepEqual(socket().sent.at(-1), { type: "ack", ids: ["m1"] }, "a copy is acked again");
  await stop(client);
});

test("in a browser the token goes in the query string", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, socket } = await start({ WebSocket: BrowserSocket, tokenIn: "query", url: "ws://gw.test/base/" });
  assert.equal(socket().url, "ws://gw.test/base/v1/connect?heartbeat=frame&token=token-1");
  assert.equal(socket().options, undefined);
  await stop(client);
});

test("1012 reconnects within a second; 4401 first asks for a fresh token; dedupe holds across both", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, tokens, states, seen, socket } = await start();
  socket().hello();
  socket().frame(note("m1", 1));
  socket().frame({ type: "error", code: "shutting_down", message: "reconnect" });
  socket().serverClose(1012, "reconnect");
  const closed = states.at(-1);
  assert.deepEqual([closed.state, closed.code, closed.error, closed.willReconnect], ["closed", 1012, "shutting_down", true]);
  assert.ok(closed.delayMs >= 0 && closed.delayMs < 1000, `a random delay under a second: ${closed.delayMs}`);
  mock.timers.tick(closed.delayMs);
  await settle();
  assert.equal(FakeSocket.all.length, 2);
  assert.deepEqual(tokens.at(-1), { attempt: 1, reason: "connect" });
  socket().hello();
  socket().frame(note("m1", 1)); // the replay of what was not acked
  assert.deepEqual(seen, ["m1"]);
  mock.timers.tick(100);
  assert.deepEqual(socket().sent, [{ type: "ack", ids: ["m1"] }], "acked on the connection that was sent it");

  socket().serverClose(4401, "token expired");
  assert.equal(states.at(-1).willReconnect, true);
  mock.timers.tick(states.at(-1).delayMs);
  await settle();
  assert.deepEqual(tokens.at(-1), { attempt: 1, reason: "expired" });
  assert.equal(FakeSocket.all.length, 3);
  await stop(client);
});

test("a 401 refusal asks for a fresh token; attempts back off until a hello", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, tokens, states, socket } = await start();
  const delays = [];
  for (let i = 0; i < 4; i++) {
    for (const fn of socket().listeners["unexpected-response"] ?? []) fn({}, { statusCode: 401 });
    socket().serverClose(1006, "");
    const s = states.at(-1);
    assert.equal(s.httpStatus, 401);
    delays.push(s.delayMs);
    mock.timers.tick(s.delayMs);
    await settle();
  }
  assert.deepEqual(tokens.map((r) => r.reason), ["connect", "unauthorized", "unauthorized", "unauthorized", "unauthorized"]);
  assert.deepEqual(tokens.map((r) => r.attempt), [1, 2, 3, 4, 5]);
  for (let i = 0; i < delays.length; i++) {
    const step = 250 * 2 ** i;
    assert.ok(delays[i] >= step / 2 && delays[i] <= step * 1.5, `attempt ${i + 1}: ${delays[i]} ms`);
  }
  assert.equal(socket().closedWith, null);
  await stop(client);
});

test("4400 stops reconnecting and says why", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, states, socket } = await start();
  const errors = [];
  client.on("error", (e) => errors.push(e.message));
  socket().hello();
  socket().serverClose(4400, "bad frame");
  assert.equal(states.at(-1).willReconnect, false);
  mock.timers.tick(60_000);
  await settle();
  assert.equal(FakeSocket.all.length, 1);
  assert.match(errors.join(), /refused a frame/);
});

test("where pings are visible, two silent intervals drop the connection", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, states, socket } = await start();
  const first = socket();
  first.hello({ heartbeat_interval_ms: 1000 });
  for (let i = 0; i < 10; i++) {
    mock.timers.tick(1000);
    first.ping();
  }
  assert.equal(states.at(-1).state, "open", "pings keep it open");
  mock.timers.tick(3001);
  assert.equal(first.closedWith, "terminated");
  assert.equal(states.at(-1).state, "closed");
  assert.match(states.at(-1).reason, /no ping/);
  await stop(client);
});

test("in a browser, heartbeat frames keep the connection and their absence drops it", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, states, socket } = await start({ WebSocket: BrowserSocket, tokenIn: "query" });
  const first = socket();
  assert.match(first.url, /[?&]heartbeat=frame/, "asks for heartbeat frames");
  first.hello({ heartbeat_interval_ms: 1000 });
  for (let i = 0; i < 10; i++) {
    mock.timers.tick(1000);
    first.frame({ type: "heartbeat" });
  }
  assert.equal(states.at(-1).state, "open", "heartbeat frames keep it open");
  mock.timers.tick(3001);
  assert.equal(states.at(-1).state, "closed");
  assert.match(states.at(-1).reason, /no ping or frame/);
  await stop(client);
});

test("reads asked for while offline go out after the next hello; a read copy is read again", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, socket } = await start({ autoAck: false });
  client.read(["r1"]);
  socket().hello();
  mock.timers.tick(0);
  assert.deepEqual(socket().sent, [{ type: "read", ids: ["r1"] }]);
  socket().frame(note("m1", 1));
  mock.timers.tick(200);
  assert.deepEqual(socket().sent.length, 1, "autoAck off: nothing acked by itself");
  client.read(["m1"]);
  mock.timers.tick(100);
  assert.deepEqual(socket().sent.at(-1), { type: "read", ids: ["m1"] });
  socket().frame(note("m1", 1));
  mock.timers.tick(100);
  assert.deepEqual(socket().sent.at(-1), { type: "read", ids: ["m1"] }, "the copy of a read message is read again");
  await stop(client);
});

test("acks are packed within max_frame_bytes", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, socket } = await start();
  socket().hello({ max_frame_bytes: 256 });
  for (let i = 0; i < 100; i++) socket().frame(note(`message-${i}`, i));
  mock.timers.tick(100);
  const frames = socket().sent;
  assert.ok(frames.length > 1);
  assert.equal(frames.flatMap((f) => f.ids).length, 100);
  for (const f of frames) assert.ok(JSON.stringify(f).length <= 256);
  await stop(client);
});

test("with orderWindowMs, notifications come out by seq", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, seen, socket } = await start({ orderWindowMs: 50 });
  socket().hello();
  socket().frame(note("c", 30));
  socket().frame(note("a", 10));
  mock.timers.tick(20);
  socket().frame(note("b", 20));
  assert.deepEqual(seen, []);
  mock.timers.tick(30);
  assert.deepEqual(seen, ["a", "b", "c"]);
  mock.timers.tick(100);
  assert.deepEqual(socket().sent, [{ type: "ack", ids: ["a", "b", "c"] }], "acked once shown");
  await stop(client);
});

test("close() sends what waits, closes with 1000 and stops", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  const { client, states, socket } = await start();
  socket().hello();
  socket().frame(note("m1", 1));
  const closing = client.close();
  mock.timers.tick(0);
  await closing;
  assert.deepEqual(socket().sent, [{ type: "ack", ids: ["m1"] }]);
  assert.equal(socket().closedWith, 1000);
  assert.deepEqual([states.at(-1).state, states.at(-1).willReconnect], ["closed", false]);
  mock.timers.tick(60_000);
  await settle();
  assert.equal(FakeSocket.all.length, 1);
});
