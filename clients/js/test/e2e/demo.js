// Drives the demo page (clients/js/demo) in headless Chromium as a person would: connect as a
// user, publish a notification to them, watch it arrive and its receipt turn `delivered`, mark
// it read and watch `read`. Screenshots go to HERALD_DEMO_SCREENSHOTS; reports go to stdout as
// JSON lines, the last one `{"ev": "demo", ...}` with what the page showed.
import { chromium } from "playwright-core";

const report = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const url = process.env.HERALD_DEMO_URL ?? "http://127.0.0.1:8080/";
const user = process.env.HERALD_DEMO_USER ?? "alice";
const shots = process.env.HERALD_DEMO_SCREENSHOTS ?? ".";
const TIMEOUT = 20_000;

const browser = await chromium.launch({
  executablePath: process.env.HERALD_TEST_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let code = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
  page.on("pageerror", (e) => report({ ev: "error", message: `page: ${e.message}` }));
  page.on("console", (m) => {
    if (m.type() === "error") report({ ev: "console", text: m.text() });
  });
  await page.goto(url);
  await page.waitForFunction(() => window.heraldDemoReady === true, null, { timeout: TIMEOUT });
  await page.fill("#user", user);
  await page.fill("#to", user);
  await page.click("#connect");
  await page.waitForSelector("#state[data-state=open]", { timeout: TIMEOUT });
  report({ ev: "step", step: "open", detail: await page.textContent("#detail") });

  await page.fill("#title", "Your order is on its way");
  await page.click("#publish");
  const published = await page.waitForSelector("#published[data-id]", { timeout: TIMEOUT });
  const id = await published.getAttribute("data-id");
  report({ ev: "step", step: "published", id, text: await published.textContent() });

  const row = `tr[data-id="${id}"]`;
  await page.waitForSelector(`${row}[data-arrived=true]`, { timeout: TIMEOUT });
  await page.waitForSelector(`${row} td.receipt[data-receipt=delivered]`, { timeout: TIMEOUT });
  report({ ev: "step", step: "delivered", id });
  await page.screenshot({ path: `${shots}/sdk-demo-delivered.png` });

  await page.click(`${row} button:has-text("Mark read")`);
  await page.waitForSelector(`${row} td.receipt[data-receipt=read]`, { timeout: TIMEOUT });
  report({ ev: "step", step: "read", id });
  await page.screenshot({ path: `${shots}/sdk-demo.png` });

  report({
    ev: "demo",
    id,
    published: await published.textContent(),
    row: await page.textContent(row),
    state: await page.getAttribute("#state", "data-state"),
  });
} catch (e) {
  report({ ev: "error", message: `demo driver: ${e && e.message}` });
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
