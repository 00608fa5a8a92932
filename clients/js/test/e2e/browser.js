// The e2e app in headless Chromium: serves clients/js over HTTP on a free port, opens page.html
// in Debian's chromium through playwright-core, and relays its reports to stdout and commands
// from stdin, as node.js does. HERALD_TEST_CHROMIUM names the browser (default /usr/bin/chromium).
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";
import { serve } from "./serve.js";

const report = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const config = JSON.parse(process.env.HERALD_SDK_CONFIG ?? "{}");
const server = await serve(new URL("../../", import.meta.url));
const browser = await chromium.launch({
  executablePath: process.env.HERALD_TEST_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Playwright gives every launch a fresh temporary profile (--user-data-dir) of its own.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let exitCode = 0;
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => report({ ev: "error", message: `page: ${e.message}` }));
  page.on("console", (m) => {
    if (m.type() === "error") report({ ev: "console", text: m.text() });
  });
  await page.exposeFunction("report", report);
  await page.goto(`${server.url}/test/e2e/page.html`);
  await page.waitForFunction(() => window.appLoaded === true);
  await page.evaluate((c) => window.startApp(c), config);
  for await (const line of createInterface({ input: process.stdin })) {
    if (line.trim() === "") continue;
    const command = JSON.parse(line);
    await page.evaluate((c) => window.runCommand(c), command);
    if (command.cmd === "close") break;
  }
} catch (e) {
  report({ ev: "error", message: `browser driver: ${e && e.message}` });
  exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
process.exit(exitCode);
