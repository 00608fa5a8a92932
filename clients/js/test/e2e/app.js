// The application the SDK's end-to-end tests drive (tests/tests/sdk.rs), the same code in Node and
// in a browser page: it connects with the SDK, shows (reports) every notification, and answers
// commands. Every event is reported as one JSON object; the Rust test reads them.
//
// Tokens are minted here with WebCrypto (HS256, the test secret), as a token endpoint would:
// `tokens` lists each attempt's lifetime in seconds (negative: already expired), the last one
// repeating.

const encoder = new TextEncoder();

function base64url(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function mint(secret, user, ttlSecs, topics) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(encoder.encode(JSON.stringify({ alg: "HS256", typ: "JWT" })));
  const body = { sub: user, iat: now, exp: now + ttlSecs, ...(topics === undefined ? {} : { topics }) };
  const claims = base64url(encoder.encode(JSON.stringify(body)));
  const key = await crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const signature = await crypto.subtle.sign("HMAC", key, encoder.encode(`${header}.${claims}`));
  return `${header}.${claims}.${base64url(new Uint8Array(signature))}`;
}

/**
 * Starts the app. `config`: { urls, secret, user, tokens, ackDelayMs?, orderWindowMs?, refreshTokens?,
 * subscribe? } (`subscribe`: topics the token allows and the app subscribes to at start).
 * Returns the function that runs a command ({ cmd: "read", ids } or { cmd: "close" }).
 */
export function start(config, { HeraldClient, WebSocket, report: send }) {
  const report = (event) => send({ ...event, t: Date.now() });
  let next = 0;
  let minted = 0;
  const lifetimes = config.tokens ?? [3600];
  const client = new HeraldClient({
    // Each attempt tries the next gateway, as a load balancer would.
    url: () => config.urls[next++ % config.urls.length],
    getToken: async ({ attempt, reason }) => {
      const ttl = lifetimes[Math.min(minted, lifetimes.length - 1)];
      minted += 1;
      report({ ev: "token", attempt, reason, ttl });
      return mint(config.secret, config.user, ttl, config.subscribe);
    },
    ...(WebSocket === undefined ? {} : { WebSocket }),
    ...(config.ackDelayMs === undefined ? {} : { ackDelayMs: config.ackDelayMs }),
    ...(config.orderWindowMs === undefined ? {} : { orderWindowMs: config.orderWindowMs }),
    ...(config.refreshTokens === undefined ? {} : { refreshTokens: config.refreshTokens }),
  });
  client.on("state", (s) => report({ ev: "state", ...s }));
  client.on("notification", (n) => report({ ev: "notification", id: n.id, seq: n.seq, payload: n.payload }));
  client.on("duplicate", (n) => report({ ev: "duplicate", id: n.id, seq: n.seq }));
  client.on("error", (e) => report({ ev: "error", message: String(e && e.message) }));
  client.on("subscribed", (a) => report({ ev: "subscribed", ...a }));
  client.on("topicRefused", (r) => report({ ev: "topic_refused", ...r }));
  for (const topic of config.subscribe ?? []) {
    client.subscribe(topic, (m) => report({ ev: "topic", topic: m.topic, offset: m.offset, id: m.id }));
  }
  client.connect();
  report({ ev: "started" });
  return async (command) => {
    if (command.cmd === "read") {
      client.read(command.ids);
      report({ ev: "done", cmd: "read" });
    } else if (command.cmd === "close") {
      await client.close();
      report({ ev: "done", cmd: "close" });
    } else {
      report({ ev: "error", message: `unknown command ${JSON.stringify(command)}` });
    }
  };
}
