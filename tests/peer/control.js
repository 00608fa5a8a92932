// The HTTP side both peers share: `GET /healthz`, and `POST /publish`, whose body (UTF-8) goes to
// `publish`; a throw from it answers 400 with the error. `POST /gc` runs a full garbage
// collection (node --expose-gc; 501 without it), so that a memory reading is of what the process
// holds, not of when its collector last ran. Anything else is 404. The generator keeps its
// publish connection between rounds, hence the long keep-alive.
"use strict";

const http = require("node:http");

function controlServer(publish) {
  const server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/healthz") {
      res.end("ok");
      return;
    }
    if (req.method === "POST" && req.url === "/gc") {
      if (typeof global.gc !== "function") {
        res.statusCode = 501;
        res.end("start node with --expose-gc");
        return;
      }
      global.gc();
      res.end("ok");
      return;
    }
    if (req.method === "POST" && req.url === "/publish") {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        try {
          publish(Buffer.concat(chunks).toString("utf8"));
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
  server.keepAliveTimeout = 60000;
  return server;
}

module.exports = { controlServer };
