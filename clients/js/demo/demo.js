// The demo page: one HeraldClient for the user typed in, a table of what arrives, and the
// receipt of each message as the dispatcher's API reports it. Tokens come from the dev server
// (/dev/token), publishing and receipts from the dispatcher's API through the dev server (/api).
import { HeraldClient } from "/dist/index.js";

const $ = (id) => document.getElementById(id);
const rows = new Map(); // message id -> { tr, cells, polling }
let client = null;
let user = "";

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)}  ${text}\n`;
  $("log").textContent = line + $("log").textContent;
}

function showState(s) {
  const badge = $("state");
  badge.dataset.state = s.state;
  if (s.state === "connecting") {
    badge.textContent = `connecting (attempt ${s.attempt})`;
    $("detail").textContent = "";
  } else if (s.state === "open") {
    badge.textContent = "open";
    $("detail").textContent = `gateway ${s.hello.gateway_id} · connection ${s.hello.connection_id}`;
  } else {
    badge.textContent = `closed ${s.code}`;
    const again = s.willReconnect ? `reconnecting in ${s.delayMs} ms` : "not reconnecting";
    $("detail").textContent = `${s.reason || s.error || ""} · ${again}`;
  }
  log(`state ${JSON.stringify(s)}`);
}

async function token({ attempt, reason }) {
  const answer = await fetch(`/dev/token?user=${encodeURIComponent(user)}`);
  if (!answer.ok) throw new Error(`token endpoint: ${answer.status}`);
  log(`token for ${user} (attempt ${attempt}, ${reason})`);
  return (await answer.json()).token;
}

function row(id) {
  let r = rows.get(id);
  if (r !== undefined) return r;
  const tr = document.createElement("tr");
  tr.dataset.id = id;
  const cells = {};
  for (const name of ["seq", "id", "payload", "arrived", "receipt", "actions"]) {
    cells[name] = document.createElement("td");
    cells[name].className = name === "id" ? "id" : name === "seq" || name === "arrived" ? "mono" : name;
    tr.append(cells[name]);
  }
  cells.id.textContent = id;
  cells.receipt.textContent = "…";
  $("messages").prepend(tr);
  r = { tr, cells, polling: false };
  rows.set(id, r);
  $("count").textContent = `(${rows.size})`;
  return r;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function arrived(n) {
  const r = row(n.id);
  r.tr.dataset.arrived = "true";
  r.cells.seq.textContent = String(n.seq);
  const title = n.payload && typeof n.payload === "object" && "title" in n.payload ? n.payload.title : null;
  r.cells.payload.textContent = title ?? JSON.stringify(n.payload);
  r.cells.arrived.textContent = new Date().toISOString().slice(11, 23);
  r.cells.actions.replaceChildren();
  if (!$("autoack").checked) {
    r.cells.actions.append(button("Ack", () => client?.ack([n.id])));
  }
  r.cells.actions.append(button("Mark read", () => client?.read([n.id])));
  log(`notification ${n.id} seq ${n.seq}`);
  void poll(n.id);
}

/** Follows one message's receipt for the connected user until it reads `read` (or 2 minutes). */
async function poll(id) {
  const r = row(id);
  if (r.polling) return;
  r.polling = true;
  const until = Date.now() + 120_000;
  while (Date.now() < until) {
    try {
      const answer = await fetch(`/api/v1/messages/${encodeURIComponent(id)}`);
      if (answer.ok) {
        const body = await answer.json();
        const mine = body.receipts.find((x) => x.user === user) ?? body.receipts[0];
        if (mine !== undefined) {
          r.cells.receipt.textContent = mine.state;
          r.cells.receipt.dataset.receipt = mine.state;
          r.cells.receipt.title = mine.delivered_by ? `by ${mine.delivered_by.connection_id} on ${mine.delivered_by.gateway_id}` : "";
          if (mine.state === "read") break;
        }
      } else if (answer.status !== 404) {
        r.cells.receipt.textContent = `API ${answer.status}`;
      }
    } catch (e) {
      r.cells.receipt.textContent = `API unreachable`;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  r.polling = false;
}

async function connect() {
  user = $("user").value.trim();
  if (user === "") return;
  const { gateways } = await (await fetch("/dev/config")).json();
  let next = 0;
  client = new HeraldClient({
    // Each attempt tries the next gateway, as a load balancer would.
    url: () => gateways[next++ % gateways.length],
    getToken: token,
    autoAck: $("autoack").checked,
    ...($("ordered").checked ? { orderWindowMs: 250 } : {}),
  });
  client.on("state", showState);
  client.on("notification", arrived);
  client.on("duplicate", (n) => log(`duplicate ${n.id} (not shown again)`));
  client.on("error", (e) => log(`error ${e.message}`));
  client.on("subscribed", (a) => {
    log(`subscribed ${JSON.stringify(a)}`);
    showSubscriptions();
  });
  client.on("topicRefused", (r) => {
    log(`topic refused ${JSON.stringify(r)}`);
    showSubscriptions();
  });
  client.connect();
  $("connect").disabled = true;
  $("disconnect").disabled = false;
  $("user").disabled = true;
  if ($("to").value.trim() === "") $("to").value = user;
}

async function disconnect() {
  const c = client;
  client = null;
  topicHandlers.clear();
  showSubscriptions();
  await c?.close();
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  $("user").disabled = false;
}

async function publish() {
  const to = $("to").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (to.length === 0) return;
  const id = `demo-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  const job = { id, to, payload: { title: $("title").value, sent_at_ms: Date.now() } };
  const post = (path) =>
    fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(job) });
  let answer = await post("/api/v1/publish");
  let via = "POST /v1/publish";
  if (answer.status === 404 || answer.status === 405) {
    // A dispatcher without the publish API: the dev server publishes through JetStream instead.
    answer = await post("/dev/publish");
    via = "heraldctl (the dispatcher has no POST /v1/publish)";
  }
  const body = await answer.json().catch(() => ({}));
  if (answer.status === 201 || answer.status === 200) {
    $("published").textContent = `${body.id} seq ${body.seq}${body.duplicate ? " (duplicate)" : ""} via ${via}`;
    $("published").dataset.id = body.id;
    log(`published ${body.id} seq ${body.seq} to ${to.join(",")} via ${via}`);
    if (to.includes(user)) void poll(body.id);
  } else {
    $("published").textContent = `refused (${answer.status}): ${body.code ?? body.error ?? ""} ${body.reason ?? ""}`;
    log(`publish refused ${answer.status} ${JSON.stringify(body)}`);
  }
}

// --- topics -----------------------------------------------------------------------------------------

const topicHandlers = new Map(); // topic -> the function that unsubscribes

function showSubscriptions() {
  const parts = [...topicHandlers.keys()].map((t) => {
    const status = client?.topicStatus(t);
    if (status === undefined || status.state === "pending") return `${t} (pending)`;
    if (status.state === "refused") return `${t} (refused: ${status.reason})`;
    return status.recovered === false ? `${t} (subscribed, some missed messages are gone)` : `${t} (subscribed)`;
  });
  $("subscriptions").textContent = parts.length === 0 ? "No subscriptions." : `Subscribed: ${parts.join(" · ")}`;
}

function topicArrived(m) {
  const tr = document.createElement("tr");
  const title = m.payload && typeof m.payload === "object" && "title" in m.payload ? m.payload.title : null;
  const receipt = document.createElement("td");
  receipt.textContent = "…";
  for (const [text, cls] of [[String(m.offset), "mono"], [m.topic, "mono"], [m.id, "id"], [title ?? JSON.stringify(m.payload), ""], [new Date().toISOString().slice(11, 23), "mono"]]) {
    const td = document.createElement("td");
    td.textContent = text;
    td.className = cls;
    tr.append(td);
  }
  tr.append(receipt);
  $("topic-messages").prepend(tr);
  log(`topic ${m.topic} offset ${m.offset} ${m.id}`);
  void pollTopicReceipt(m.id, receipt);
}

/** The aggregate receipt of a topic message: connections and users that acked, for 30 s. */
async function pollTopicReceipt(id, cell) {
  const until = Date.now() + 30_000;
  while (Date.now() < until) {
    try {
      const answer = await fetch(`/api/v1/messages/${encodeURIComponent(id)}`);
      if (answer.ok) {
        const r = (await answer.json()).topic_receipt;
        if (r !== undefined) cell.textContent = `${r.acked_connections} connections · ${r.acked_users} users`;
      }
    } catch {
      cell.textContent = "API unreachable";
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function subscribeTopic() {
  const topic = $("topic").value.trim();
  if (client === null || topic === "" || topicHandlers.has(topic)) return;
  topicHandlers.set(topic, client.subscribe(topic, topicArrived));
  showSubscriptions();
}

function unsubscribeTopic() {
  const topic = $("topic").value.trim();
  topicHandlers.get(topic)?.();
  topicHandlers.delete(topic);
  showSubscriptions();
}

async function publishTopic() {
  const topic = $("topic").value.trim();
  if (topic === "") return;
  const id = `demo-topic-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  const job = { id, topic, payload: { title: $("topic-title").value, sent_at_ms: Date.now() }, ttl_secs: 600 };
  const answer = await fetch("/api/v1/publish", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(job),
  });
  const body = await answer.json().catch(() => ({}));
  $("topic-published").textContent =
    answer.status === 201 || answer.status === 200 ? `${body.id} to ${topic}` : `refused (${answer.status}): ${body.code ?? body.error ?? ""} ${body.reason ?? ""}`;
  log(`publish to topic ${topic}: ${answer.status} ${JSON.stringify(body)}`);
}

$("subscribe").addEventListener("click", subscribeTopic);
$("unsubscribe").addEventListener("click", unsubscribeTopic);
$("publish-topic").addEventListener("click", () => void publishTopic());

$("connect").addEventListener("click", () => void connect());
$("disconnect").addEventListener("click", () => void disconnect());
$("publish").addEventListener("click", () => void publish());
window.heraldDemoReady = true;
