// The demo's development server (`make run` starts it; never for production). It serves the demo
// page and the built SDK, and stands in for what a real application's backend would do:
//
//   GET  /dev/config        the gateways to connect to (the page tries them in turn)
//   GET  /dev/token?user=u  a client token for any user: there is no login here
//   *    /api/...           the dispatcher's HTTP API (/v1/publish, /v1/messages/{id}), with the
//                           admin token added here, so it never reaches the browser and no CORS
//                           is needed
//   POST /dev/publish       publishes through JetStream with heraldctl, for a dispatcher that
//                           has no POST /v1/publish yet (the page falls back to it on a 404)
//
// Settings (all required): HERALD_DEMO_LISTEN (host:port), HERALD_DEMO_GATEWAYS (comma-separated
// ws:// URLs), HERALD_DEMO_API (the dispatcher's http:// URL), HERALD_JWT_SECRET,
// HERALD_ADMIN_TOKEN; HERALD_DEMO_HERALDCTL, the heraldctl binary, for /dev/publish.
import { createHmac } from "node:crypto";
import { execFile } from "node:child_process";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";

const env = (name) => {
  const value = process.env[name];
  if (value === undefined || value === "") {
    console.error(`demo: ${name} is not set`);
    process.exit(2);
  }
  return value;
};
const listen = env("HERALD_DEMO_LISTEN");
const gateways = env("HERALD_DEMO_GATEWAYS").split(",").map((s) => s.trim()).filter(Boolean);
const api = new URL(env("HERALD_DEMO_API"));
const secret = env("HERALD_JWT_SECRET");
const adminToken = env("HERALD_ADMIN_TOKEN");
const heraldctl = process.env.HERALD_DEMO_HERALDCTL ?? "";
const root = normalize(fileURLToPath(new URL("../", import.meta.url)));

const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".map": "application/json" };
const MAX_BODY = 256 * 1024;

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

function mint(user, ttlSecs) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  // Dev tokens allow the demo's topics: `news` and everything under `demo.`.
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlSecs, topics: ["news", "demo.*"] }));
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

function json(response, status, value) {
  response.writeHead(status, { "content-type": "application/json", "cache-control": "no-store" });
  response.end(JSON.stringify(value));
}

async function body(request) {
  const chunks = [];
  let size = 0;
  for await (const chunk of request) {
    size += chunk.length;
    if (size > MAX_BODY) throw new Error("body too large");
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

async function proxy(request, response, path) {
  const target = new URL(path, api);
  const init = { method: request.method, headers: { authorization: `Bearer ${adminToken}` } };
  if (request.method !== "GET" && request.method !== "HEAD") {
    init.body = await body(request);
    init.headers["content-type"] = request.headers["content-type"] ?? "application/json";
  }
  try {
    const answer = await fetch(target, init);
    response.writeHead(answer.status, { "content-type": answer.headers.get("content-type") ?? "application/json" });
    response.end(Buffer.from(await answer.arrayBuffer()));
  } catch (e) {
    json(response, 502, { error: "dispatcher_unreachable", reason: String(e.message) });
  }
}

function publishWithHeraldctl(job) {
  return new Promise((resolve) => {
    if (heraldctl === "") {
      resolve([501, { error: "unavailable", reason: "HERALD_DEMO_HERALDCTL is not set" }]);
      return;
    }
    const args = ["publish", "--to", job.to.join(","), "--payload", JSON.stringify(job.payload)];
    if (typeof job.id === "string") args.push("--id", job.id);
    if (Number.isInteger(job.ttl_secs)) args.push("--ttl-secs", String(job.ttl_secs));
    execFile(heraldctl, args, { timeout: 15_000 }, (error, stdout, stderr) => {
      if (error) {
        resolve([502, { error: "publish_failed", reason: (stderr || error.message).trim() }]);
        return;
      }
      const seq = Number(/seq=(\d+)/.exec(stdout)?.[1]);
      const duplicate = /duplicate=true/.test(stdout);
      resolve([duplicate ? 200 : 201, { id: job.id, seq, ...(duplicate ? { duplicate } : {}) }]);
    });
  });
}

async function file(response, path) {
  const full = normalize(`${root}${path}`);
  if (!full.startsWith(root.endsWith(sep) ? root : root + sep)) {
    response.writeHead(403).end();
    return;
  }
  try {
    const data = await readFile(full);
    response.writeHead(200, { "content-type": TYPES[extname(full)] ?? "application/octet-stream", "cache-control": "no-store" });
    response.end(data);
  } catch {
    response.writeHead(404).end();
  }
}

const server = createServer(async (request, response) => {
  try {
    const url = new URL(request.url ?? "/", "http://demo");
    const path = decodeURIComponent(url.pathname);
    if (path === "/dev/config") {
      json(response, 200, { gateways });
    } else if (path === "/dev/token") {
      const user = url.searchParams.get("user") ?? "";
      const ttl = Number(url.searchParams.get("ttl_secs") ?? 300);
      if (user === "" || user.length > 256 || /\p{Cc}/u.test(user) || !(ttl > 0 && ttl <= 86_400)) {
        json(response, 400, { error: "bad_request", reason: "user must be 1-256 bytes without control characters, ttl_secs 1-86400" });
      } else {
        json(response, 200, { token: mint(user, ttl), expires_in_secs: ttl });
      }
    } else if (path.startsWith("/api/")) {
      await proxy(request, response, `${path.slice(4)}${url.search}`);
    } else if (path === "/dev/publish" && request.method === "POST") {
      const job = JSON.parse((await body(request)).toString("utf8"));
      if (!Array.isArray(job.to) || job.to.length === 0 || !("payload" in job)) {
        json(response, 400, { error: "rejected", code: "malformed", reason: "a job needs to and payload" });
        return;
      }
      const [status, answer] = await publishWithHeraldctl(job);
      json(response, status, answer);
    } else if (path === "/" || path === "/index.html") {
      await file(response, "demo/index.html");
    } else if (path.startsWith("/demo/") || path.startsWith("/dist/")) {
      await file(response, path.slice(1));
    } else {
      response.writeHead(404).end();
    }
  } catch (e) {
    json(response, 400, { error: "bad_request", reason: String(e.message) });
  }
});

const at = listen.lastIndexOf(":");
server.listen(Number(listen.slice(at + 1)), listen.slice(0, at), () => {
  console.log(`demo: http://${listen}/ (gateways ${gateways.join(" ")}, API ${api.origin})`);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
