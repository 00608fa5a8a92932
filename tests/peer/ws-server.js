// The second peer: a plain `ws` WebSocketServer, the floor of what a Node process spends on an
// idle WebSocket. No Socket.IO framing, no Redis, no authentication, no compression; it pings
// every client every 25 s (as Socket.IO does) and closes one that did not answer the last ping.
//
// PORT (listen port on 127.0.0.1). `POST /publish` sends the body, as one text frame, to every
// client of this process (the generator posts to each process, as it does to the bare server).
// `GET /healthz`.
"use strict";

const { WebSocketServer } = require("ws");
const { controlServer } = require("./control");

const port = Number(process.env.PORT || 3001);
const PING_EVERY_MS = 25000;

const server = controlServer((body) => {
  for (const client of wss.clients) {
    client.send(body);
  }
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

server.listen(port, "127.0.0.1", () => console.log(`ws peer listening on 127.0.0.1:${port}`));

const stop = () => {
  clearInterval(heartbeat);
  wss.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
