// Topic subscriptions: the pure bookkeeping, and the client resubscribing from the last offset on
// every connection (automatic recovery), against a fake WebSocket.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { HeraldClient, TopicSubscriptions } from "../../dist/index.js";

const message = (topic, offset, id = `${topic}-${offset}`) => ({
  type: "topic_message",
  topic,
  offset,
  id,
  payload: { id },
  published_at_ms: Date.now(),
  expires_at_ms: Date.now() + 600_000,
});

test("subscriptions remember the last offset and leave copies out", () => {
  const s = new TopicSubscriptions();
  const got = [];
  const handler = (m) => got.push(m.id);
  assert.equal(s.add("news", handler), true);
  assert.equal(s.add("news", () => {}), false, "a second handler needs no second subscribe");
  assert.deepEqual(s.frame("news"), { type: "subscribe", topic: "news" });
  assert.equal(s.accept(message("news", 5)).length, 2);
  assert.equal(s.accept(message("news", 5)).length, 0, "the same offset again");
  assert.equal(s.accept(message("news", 3)).length, 0, "an older one");
  assert.equal(s.accept(message("weather", 9)).length, 0, "not subscribed");
  assert.deepEqual(s.resubscribe(), [{ type: "subscribe", topic: "news", since: 5 }]);
  assert.deepEqual(s.status("news"), { state: "pending" });
  assert.equal(s.remove("news", handler), false, "another handler remains");
  assert.equal(s.size, 1);
});

class FakeSocket {
  static all = [];
  constructor(url, options) {
    this.url = url;
    this.options = options;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  on() {}
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: 1005, reason: "" }), 0);
  }
  terminate() {
    this.readyState = 3;
  }
  hello() {
    this.readyState = 1;
    this.frame({ type: "hello", connection_id: "c1", gateway_id: "gw", heartbeat_interval_ms: 15000, max_frame_bytes: 16384 });
  }
  frame(f) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  serverClose(code) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
}

async function settle() {
  for (let i = 0; i < 5; i++) await Promise.resolve();
}

test("subscribe sends at once when open, resubscribes with since after a reconnect, acks what it hands out", async (t) => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
  t.after(() => mock.timers.reset());
  FakeSocket.all = [];
  const client = new HeraldClient({ url: "ws://gw.test", WebSocket: FakeSocket, getToken: () => "t" });
  const answers = [];
  client.on("subscribed", (a) => answers.push(a));
  client.on("topicRefused", (r) => answers.push(r));
  client.connect();
  await settle();
  const got = [];
  // Before hello: nothing is sent; the hello subscribes.
  const stopNews = client.subscribe("news", (m) => got.push(m.id));
  let socket = FakeSocket.all.at(-1);
  assert.deepEqual(socket.sent, []);
  socket.hello();
  assert.deepEqual(socket.sent, [{ type: "subscribe", topic: "news" }]);
  client.subscribe("weather", () => {});
  assert.deepEqual(socket.sent.at(-1), { type: "subscribe", topic: "weather" }, "open: sent at once");
  socket.frame({ type: "subscribed", topic: "news" });
  socket.frame({ type: "topic_refused", request: "subscribe", topic: "weather", reason: "not_allowed", message: "no" });
  assert.deepEqual(answers, [{ topic: "news" }, { topic: "weather", reason: "not_allowed", message: "no" }]);
  assert.equal(client.topicStatus("weather").state, "refused");
  socket.frame(message("news", 7));
  socket.frame(message("news", 7));
  assert.deepEqual(got, ["news-7"]);
  mock.timers.tick(100);
  assert.deepEqual(socket.sent.at(-1), { type: "ack", ids: ["news-7"] });

  // The connection drops; the next one recovers from offset 7.
  socket.serverClose(1012);
  mock.timers.tick(1000);
  await settle();
  socket = FakeSocket.all.at(-1);
  assert.equal(FakeSocket.all.length, 2);
  socket.hello();
  assert.deepEqual(socket.sent, [
    { type: "subscribe", topic: "news", since: 7 },
    { type: "subscribe", topic: "weather" },
  ]);
  socket.frame({ type: "subscribed", topic: "news", recovered: true });
  assert.deepEqual(answers.at(-1), { topic: "news", recovered: true });
  socket.frame(message("news", 9));
  assert.deepEqual(got, ["news-7", "news-9"]);
  stopNews();
  assert.deepEqual(socket.sent.at(-1), { type: "unsubscribe", topic: "news" });
  socket.frame(message("news", 10));
  assert.deepEqual(got, ["news-7", "news-9"], "no handler left");
  const closing = client.close();
  mock.timers.tick(1000);
  await closing;
});
