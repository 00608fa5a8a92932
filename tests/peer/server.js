// The peer Herald is measured against: Socket.IO 4 with @socket.io/redis-adapter, so that several
// Node processes share one Redis and a broadcast reaches the clients of all of them.
//
// It does less than Herald, by design of Socket.IO: no authentication here, no durable offline
// delivery (a client that is not connected misses the message), no receipts, no acks.
//
// PORT (listen port on 127.0.0.1), REDIS_URL. `POST /publish` with a JSON body broadcasts it as
// event "n" to every connected client of every process, through the adapter. `GET /healthz`.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = Number(process.env.PORT || 3000);
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/healthz") {
      res.end("ok");
      return;
    }
    if (req.method === "POST" && req.url === "/publish") {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        try {
          io.emit("n", JSON.parse(Buffer.concat(chunks).toString("utf8")));
          res.end("ok");
        } catch (e) {
          res.statusCode = 400;
          res.end(String(e));
        }
      });
      return;
    }
    res.statusCode = 404;
    res.end();
  });

  // WebSocket only (no long-polling upgrade dance), no compression: the cheapest Socket.IO set-up,
  // and the one closest to what the generator does with Herald.
  const io = new Server(server, {
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
    adapter: createAdapter(pub, sub),
  });

  // The generator keeps its publish connection between rounds.
  server.keepAliveTimeout = 60000;
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
