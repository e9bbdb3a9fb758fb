// Drives the demo page (GET /api/demo) in headless Chromium; tests/test_demo_browser.py runs it.
//
//   node tests/browser/demo.spec.mjs <page URL> <dev user>
//
// Signs in through the dev host's dev sign-in, waits for the ACS identity and token expiry, then
// moves the *page's* clock 51 minutes ahead (Playwright's clock API fakes Date and timers in the
// page only): AzureCommunicationTokenCredential's proactive refresh, scheduled 10 minutes before
// the 60-minute token's exp, fires and calls POST /api/token/refresh on the real service.
// Prints one JSON line with what the page shows.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, user] = process.argv.slice(2);
if (!url || !user) {
  console.error("usage: node demo.spec.mjs <page URL> <dev user>");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const userDataDir = mkdtempSync(join(tmpdir(), "demo-chromium-"));
const problems = [];
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
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
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`console error: ${msg.text()}`);
  });
  page.setDefaultTimeout(30_000);

  await page.clock.install(); // before the page's scripts run: they get the controllable clock
  const response = await page.goto(url);
  if (!response || response.status() !== 200) throw new Error(`GET ${url}: ${response?.status()}`);
  await page.fill("#user", user);
  await page.click("#dev-signin button");
  await page.waitForFunction(() => document.getElementById("identity").textContent.startsWith("8:acs:"));
  const text = (id) => page.textContent(`#${id}`);
  const before = { expires: await text("expires"), refreshes: await text("refreshes") };

  await page.waitForTimeout(1100); // so that the refreshed token's exp (whole seconds) is later
  await page.clock.fastForward("51:00");
  await page.waitForFunction(() => Number(document.getElementById("refreshes").textContent) >= 1);
  await page.waitForFunction(() => document.getElementById("status").textContent === "Token refreshed.");

  console.log(
    JSON.stringify({
      identity: await text("identity"),
      before,
      after: {
        expires: await text("expires"),
        refreshes: await text("refreshes"),
        refreshed: await text("refreshed"),
      },
      status: await text("status"),
      problems,
    }),
  );
} catch (err) {
  console.error(String(err?.stack || err));
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
