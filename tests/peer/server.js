// The peer Herald is measured against: Socket.IO 4 with @socket.io/redis-adapter, so that several
// Node processes share one Redis and a broadcast reaches the clients of all of them.
//
// It does less than Herald, by design of Socket.IO: no authentication here, no durable offline
// delivery (a client that is not connected misses the message), no receipts, no acks.
//
// PORT (listen port on 127.0.0.1), REDIS_URL. `POST /publish` with a JSON body broadcasts it as
// event "n" to every connected client of every process, through the adapter. `GET /healthz`.
"use strict";

const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const { controlServer } = require("./control");

const port = Number(process.env.PORT || 3000);
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const server = controlServer((body) => io.emit("n", JSON.parse(body)));

  // WebSocket only (no long-polling upgrade dance), no compression: the cheapest Socket.IO set-up,
  // and the one closest to what the generator does with Herald.
  const io = new Server(server, {
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
    adapter: createAdapter(pub, sub),
  });

  server.listen(port, "127.0.0.1", () => console.log(`peer listening on 127.0.0.1:${port}`));

  const stop = () => {
    io.close();
    pub.quit().catch(() => {});
    sub.quit().catch(() => {});
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
