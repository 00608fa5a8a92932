// The e2e app in Node: the SDK with `ws`; config from HERALD_SDK_CONFIG, reports on stdout (one
// JSON object a line), commands on stdin (one JSON object a line).
import { createInterface } from "node:readline";
import WebSocket from "ws";
import { HeraldClient } from "../../dist/index.js";
import { start } from "./app.js";

const report = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const run = start(JSON.parse(process.env.HERALD_SDK_CONFIG ?? "{}"), { HeraldClient, WebSocket, report });
for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim() === "") continue;
  const command = JSON.parse(line);
  await run(command);
  if (command.cmd === "close") break;
}
process.exit(0);
