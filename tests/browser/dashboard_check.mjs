// Drive headless Debian chromium (playwright-core) against `ambit dashboard` and report what
// the page shows, as one JSON line on stdout, for tests/browser/test_dashboard.py to judge.
//
// Why a script of its own: Playwright's driver is Node; the Python test owns the cluster, the
// traffic and the verdicts, this script only looks. Every request the page makes outside
// 127.0.0.1 is aborted and reported (the page must work offline: no CDN), and every console
// error and uncaught exception is reported.
//
// usage: node dashboard_check.mjs URL SCENARIO SCREENSHOT_DIR [ARG]
//   traffic              wait for the client->server edge (mTLS) and the denied edge with its
//                        policy; screenshots of the graph, nodes and policies tabs
//   capture WORKLOAD_ID  wait until WORKLOAD_ID shows as not captured (graph and table)
//   waypoint WORKLOAD_ID wait for the waypoint's L7 edge to WORKLOAD_ID naming its client
import { chromium } from "playwright-core";

const [url, scenario, shots, arg] = process.argv.slice(2);
const TIMEOUT = 30000;
const result = { scenario, ok: false, consoleErrors: [], blocked: [], details: {} };

// Poll fn in the page until it returns something truthy. Not page.waitForFunction: its
// polling re-evaluates the predicate from a string, which the page's CSP (no 'unsafe-eval')
// refuses; page.evaluate calls the function directly.
async function waitFor(page, fn, arg = null, timeout = TIMEOUT, every = 100) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const got = await page.evaluate(fn, arg);
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms: ${fn.toString().slice(0, 200)}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("console", (msg) => {
    if (msg.type() === "error") result.consoleErrors.push(msg.text());
  });
  page.on("pageerror", (err) => result.consoleErrors.push(String(err)));
  await page.route("**/*", (route) => {
    const u = new URL(route.request().url());
    if (u.protocol === "data:" || u.hostname === "127.0.0.1") return route.continue();
    result.blocked.push(route.request().url());
    return route.abort();
  });
  await page.goto(url, { waitUntil: "load" });
  await waitFor(page, () => window.ambitModel !== null);
  if (scenario === "traffic") {
    const t0 = Date.now();
    result.details = await waitFor(page, () => {
      const cy = window.ambitGraph;
      const ok = cy.getElementById("e:tcp:default/client->default/server");
      const denied = cy.getElementById("e:tcp:default/denied->default/server");
      if (ok.empty() || denied.empty()) return null;
      if (!ok.data("mtls") || !denied.hasClass("denied") || !denied.data("deniedBy")) return null;
      // The policy's denials are counted on the server's node (its agent merges the
      // ztunnel's metrics on its own schedule): the page shows them once they are there.
      const policy = window.ambitModel.policies.find((p) => p.name === "allow-client");
      if (!policy || !(policy.denied >= 1)) return null;
      const rows = [...document.querySelectorAll("#edges tbody tr")].map((tr) => ({
        cells: [...tr.children].map((td) => td.textContent), denied: tr.classList.contains("denied") }));
      return {
        allowedEdge: { label: ok.data("label"), mtls: ok.data("mtls"), classes: ok.classes() },
        deniedEdge: { label: denied.data("label"), deniedBy: denied.data("deniedBy"), classes: denied.classes() },
        rows,
        status: document.getElementById("status").textContent,
      };
    }, null, TIMEOUT, 200);
    result.details.waitedMs = Date.now() - t0;
    await page.waitForTimeout(300);  // let the layout settle for the picture
    await page.screenshot({ path: `${shots}/dashboard-graph.png`, fullPage: true });
    await page.click('header nav a[data-tab="nodes"]');
    await page.waitForSelector("#tab-nodes:not([hidden]) .node-card");
    await page.screenshot({ path: `${shots}/dashboard-nodes.png`, fullPage: true });
    result.details.nodeCards = await page.$$eval(".node-card h3", (hs) => hs.map((h) => h.textContent));
    await page.click('header nav a[data-tab="policies"]');
    await page.waitForSelector("#tab-policies:not([hidden]) #policies tbody tr");
    result.details.policies = await page.$$eval("#policies tbody tr", (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    await page.screenshot({ path: `${shots}/dashboard-policies.png`, fullPage: true });
    result.ok = true;
  } else if (scenario === "capture") {
    // The test changes the pod only once the page is up: the wait below is the page's alone.
    process.stderr.write("ready\n");
    const t0 = Date.now();
    result.details = await waitFor(page, (id) => {
      const node = window.ambitGraph.getElementById("w:" + id);
      const row = [...document.querySelectorAll("#workloads tbody tr")]
        .find((tr) => tr.children[0].textContent === id);
      if (node.empty() || !node.hasClass("nocap") || !row) return null;
      if (row.children[5].textContent !== "not captured") return null;
      return { label: node.data("label"), captured: row.children[5].textContent, why: row.children[6].textContent };
    }, arg);
    result.details.waitedMs = Date.now() - t0;
    result.details.seenAt = Date.now() / 1000;
    await page.screenshot({ path: `${shots}/dashboard-not-captured.png`, fullPage: true });
    result.ok = true;
  } else if (scenario === "waypoint") {
    // An L7 edge from the waypoint to ARG whose clients name the client workload (the
    // ztunnel's baggage, read by the waypoint), drawn dashed from the waypoint's diamond.
    result.details = await waitFor(page, (id) => {
      const m = window.ambitModel;
      const e = m.edges.find((x) => x.kind === "http" && x.target === id);
      if (!e || !e.clients.some((c) => c.id === "default/client")) return null;
      const drawn = window.ambitGraph.getElementById("e:" + e.id);
      const wp = window.ambitGraph.getElementById("w:" + e.source);
      if (drawn.empty() || !drawn.hasClass("http") || wp.empty() || !wp.hasClass("waypoint")) return null;
      return { edge: e.id, clients: e.clients.map((c) => c.id), requests: e.requests,
               label: drawn.data("label"), waypoint: wp.data("label"),
               routes: [...document.querySelectorAll("#routes tbody tr")].map((tr) => [...tr.children].map((td) => td.textContent)) };
    }, arg, TIMEOUT, 200);
    await page.waitForTimeout(300);
    await page.screenshot({ path: `${shots}/dashboard-waypoint.png`, fullPage: true });
    result.ok = true;
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
