// A static file server for the browser tests and the demo: files under `root`, on 127.0.0.1 and a
// free port, nothing outside `root`.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";

const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".map": "application/json", ".css": "text/css" };

export function serve(rootUrl, port = 0) {
  const root = normalize(fileURLToPath(rootUrl));
  const server = createServer(async (request, response) => {
    const path = normalize(`${root}${decodeURIComponent(new URL(request.url, "http://x").pathname)}`);
    if (!path.startsWith(root.endsWith(sep) ? root : root + sep)) {
      response.writeHead(403).end();
      return;
    }
    try {
      const body = await readFile(path);
      response.writeHead(200, { "content-type": TYPES[extname(path)] ?? "application/octet-stream" }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  return new Promise((resolve) => {
    server.listen(port, "127.0.0.1", () => {
      resolve({ url: `http://127.0.0.1:${server.address().port}`, close: () => server.close() });
    });
  });
}
