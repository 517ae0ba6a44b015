// Times the dashboard's fleet view in headless Chromium (Debian's `chromium`) over the
// DevTools protocol: page load -> fleet table rendered with every agent counted, the cost of
// each live update (`applyUpdate`, which re-renders the table), a sort click and a filter
// keystroke, and the main thread's long tasks (> 50 ms) while updates arrive.
//
// Usage (Node >= 20, no packages):
//   concierge-loadtest fleet --hold 120s ...   # prints the admin and ingress URLs
//   node --experimental-websocket loadtest/scripts/fleet-page.mjs ADMIN_URL [INGRESS_URL AGENT_PREFIX]
// With INGRESS_URL and AGENT_PREFIX, it posts one event a second to each of 50 agents
// (`<prefix>00000`..`<prefix>00049`, route `r<i>`) while it watches live updates, so the
// updates carry changed rows.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [adminUrl, ingressUrl, prefix] = process.argv.slice(2);
if (!adminUrl) {
  console.error("usage: fleet-page.mjs ADMIN_URL [INGRESS_URL AGENT_PREFIX]");
  process.exit(2);
}
const WATCH_MS = 15000;

const profile = mkdtempSync(join(tmpdir(), "fleet-page-"));
const chrome = spawn("chromium", [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
  "--remote-debugging-port=0", "--window-size=1366,900", `--user-data-dir=${profile}`, "about:blank",
], { stdio: ["ignore", "ignore", "pipe"] });
const wsUrl = await new Promise((resolve, reject) => {
  let buf = "";
  chrome.stderr.on("data", (d) => {
    buf += d;
    const m = buf.match(/DevTools listening on (ws:\S+)/);
    if (m) resolve(m[1]);
  });
  setTimeout(() => reject(new Error("chromium did not print its DevTools address")), 30000);
});

const ws = new WebSocket(wsUrl);
await new Promise((r) => ws.addEventListener("open", r));
let nextId = 0;
const pending = new Map();
ws.addEventListener("message", (m) => {
  const msg = JSON.parse(m.data);
  if (msg.id && pending.has(msg.id)) {
    pending.get(msg.id)(msg);
    pending.delete(msg.id);
  }
});
let session = null;
function call(method, params = {}) {
  const id = ++nextId;
  const msg = { id, method, params };
  if (session) msg.sessionId = session;
  ws.send(JSON.stringify(msg));
  return new Promise((resolve, reject) => pending.set(id, (r) => (r.error ? reject(new Error(JSON.stringify(r.error))) : resolve(r.result))));
}
async function evaluate(expression) {
  const r = await call("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
  if (r.exceptionDetails) throw new Error(JSON.stringify(r.exceptionDetails));
  return r.result.value;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const { targetId } = await call("Target.createTarget", { url: "about:blank" });
session = (await call("Target.attachToTarget", { targetId, flatten: true })).sessionId;
await call("Page.enable");
await call("Runtime.enable");
await call("Emulation.setDeviceMetricsOverride", { width: 1366, height: 900, deviceScaleFactor: 1, mobile: false });
// Before the app runs: record long tasks, and time every fleet render and live update.
await call("Page.addScriptToEvaluateOnNewDocument", {
  source: `
    window.__perf = { longtasks: [], renders: [], updates: [] };
    new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__perf.longtasks.push([e.startTime, e.duration]); })
      .observe({ type: "longtask", buffered: true });
    addEventListener("DOMContentLoaded", () => {
      const wrap = (name, into) => {
        const f = window[name];
        window[name] = function (...a) { const t = performance.now(); try { return f.apply(this, a); } finally { window.__perf[into].push([t, performance.now() - t]); } };
      };
      wrap("renderFleet", "renders");
      wrap("applyUpdate", "updates");
    });
  `,
});

const navStart = Date.now();
await call("Page.navigate", { url: adminUrl });
const agents = await (async () => {
  for (;;) {
    const v = await evaluate(`(() => { const t = document.querySelector("#totals"); const rows = document.querySelectorAll("#fleet-table tbody tr").length;
      return { rows, agents: state.totals ? state.totals.agents : 0, fleet: state.fleet.size }; })()`).catch(() => null);
    if (v && v.rows > 0 && v.fleet > 0 && v.fleet === v.agents) return v;
    if (Date.now() - navStart > 60000) throw new Error("the fleet table did not render within 60 s: " + JSON.stringify(v));
    await sleep(20);
  }
})();
const loadMs = Date.now() - navStart;
const first = await evaluate(`({ render: window.__perf.renders.slice(-1)[0], update: window.__perf.updates[0],
  nav: performance.getEntriesByType("navigation")[0].domContentLoadedEventEnd })`);

// Interactions: sort by a column, then by id back, type a filter, clear it.
const interact = await evaluate(`(() => {
  const out = {};
  const click = (key) => { const t = performance.now(); document.querySelector('th[data-key="' + key + '"] button').click(); return performance.now() - t; };
  out.sort_buffered_ms = click("pending");
  out.sort_id_ms = click("id");
  const input = document.getElementById("filter-text");
  let t = performance.now(); input.value = "0001"; input.dispatchEvent(new Event("input")); out.filter_ms = performance.now() - t;
  t = performance.now(); input.value = ""; input.dispatchEvent(new Event("input")); out.unfilter_ms = performance.now() - t;
  out.rows_in_dom = document.querySelectorAll("#fleet-table tbody tr").length;
  return out;
})()`);

// Live updates for WATCH_MS, with traffic to 50 agents if an ingress URL was given.
const watchFrom = await evaluate("performance.now()");
let posting = Boolean(ingressUrl && prefix);
const poster = (async () => {
  let seq = 0;
  while (posting) {
    await Promise.all(Array.from({ length: 50 }, (_, i) => {
      const id = prefix + String(i).padStart(5, "0");
      return fetch(`${ingressUrl}/hooks/${id}/r${i}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ seq: seq++ }) }).catch(() => {});
    }));
    await sleep(1000);
  }
})();
await sleep(WATCH_MS);
posting = false;
await poster;
const live = await evaluate(`(() => {
  const from = ${watchFrom};
  const upd = window.__perf.updates.filter(([t]) => t >= from).map(([, d]) => d).sort((a, b) => a - b);
  const lt = window.__perf.longtasks.filter(([t]) => t >= from).map(([, d]) => d);
  const q = (p) => upd.length ? upd[Math.min(upd.length - 1, Math.floor(p * upd.length))] : null;
  return { updates: upd.length, update_p50_ms: q(0.5), update_max_ms: upd.length ? upd[upd.length - 1] : null,
    longtasks: lt.length, longtask_total_ms: lt.reduce((a, b) => a + b, 0), longtask_max_ms: lt.length ? Math.max(...lt) : 0,
    busy_share: lt.reduce((a, b) => a + b, 0) / (performance.now() - from) };
})()`);

const report = {
  agents: agents.agents, rows_rendered: agents.rows, load_to_table_ms: loadMs,
  dom_content_loaded_ms: first.nav, first_update_ms: first.update && first.update[1], first_render_ms: first.render && first.render[1],
  ...interact, watch_ms: WATCH_MS, ...live,
};
console.log(JSON.stringify(report, (k, v) => (typeof v === "number" ? Math.round(v * 10) / 10 : v)));
ws.close();
chrome.kill();
await new Promise((r) => chrome.on("exit", r));
rmSync(profile, { recursive: true, force: true });
