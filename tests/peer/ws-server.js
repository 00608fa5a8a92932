// The second peer: a plain `ws` WebSocketServer, the floor of what a Node process spends on an
// idle WebSocket. No Socket.IO framing, no Redis, no authentication, no compression; it pings
// every client every 25 s (as Socket.IO does) and closes one that did not answer the last ping.
//
// PORT (listen port on 127.0.0.1). `POST /publish` sends the body, as one text frame, to every
// client of this process (the generator posts to each process, as it does to the bare server).
// `GET /healthz`.
"use strict";

const http = require("node:http");
const { WebSocketServer } = require("ws");

const port = Number(process.env.PORT || 3001);
const PING_EVERY_MS = 25000;

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/healthz") {
    res.end("ok");
    return;
  }
  if (req.method === "POST" && req.url === "/publish") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString("utf8");
      for (const client of wss.clients) {
        client.send(body);
      }
      res.end("ok");
    });
    return;
  }
  res.statusCode = 404;
  res.end();
});

const wss = new WebSocketServer({ server, perMessageDeflate: false });

// One timer for every client, not one per client: the cheapest heartbeat `ws` documents.
wss.on("connection", (socket) => {
  socket.alive = true;
  socket.on("pong", () => {
    socket.alive = true;
  });
  socket.on("error", () => socket.terminate());
});
const heartbeat = setInterval(() => {
  for (const socket of wss.clients) {
    if (!socket.alive) {
      socket.terminate();
      continue;
    }
    socket.alive = false;
    socket.ping();
  }
}, PING_EVERY_MS);

// The generator keeps its publish connection between rounds.
server.keepAliveTimeout = 60000;
server.listen(port, "127.0.0.1", () => console.log(`ws peer listening on 127.0.0.1:${port}`));

const stop = () => {
  clearInterval(heartbeat);
  wss.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
