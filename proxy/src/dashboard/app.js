// Concierge dashboard: plain JavaScript, no dependencies, no build step.
// Every value from the API is inserted as text (never as HTML).
"use strict";

const state = {
  token: sessionStorage.getItem("concierge-token") || "",
  canAct: false,
  fleet: new Map(),
  totals: null,
  status: null,
  paused: false,
  stream: null,
  sort: { key: "pending", dir: -1 },
  filter: { text: "", state: "" },
  route: null,
  fleetLimit: 200,
};

// Rows of the fleet table in the DOM at first; "Show more" adds as many again. Rendering
// every row of a 10,000-agent fleet on each live update blocked the page for ~200 ms a tick.
const FLEET_PAGE = 200;

// ---- helpers ------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function fmtDur(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  const m = s / 60;
  if (m < 60) return Math.floor(m) + " min " + Math.round(s % 60) + " s";
  const hrs = m / 60;
  if (hrs < 48) return Math.floor(hrs) + " h " + Math.round(m % 60) + " min";
  return Math.floor(hrs / 24) + " d";
}

function fmtTime(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString();
}

function ago(ms) {
  if (!ms) return "–";
  return fmtDur(Date.now() - ms) + " ago";
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (state.token) opts.headers["Authorization"] = "Bearer " + state.token;
  if (opts.body && typeof opts.body !== "string") {
    opts.body = JSON.stringify(opts.body);
    opts.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, opts);
  if (r.status === 401) {
    showLogin("That token was not accepted.");
    throw new Error("unauthorized");
  }
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
  return body;
}

function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

function notice(text, isError) {
  const el = document.getElementById("action-result");
  if (!el) return;
  el.textContent = text;
  el.className = isError ? "error" : "ok";
}

// ---- sign-in and live updates ------------------------------------------------------

function showLogin(message) {
  stopStream();
  document.getElementById("login").hidden = false;
  document.getElementById("view").hidden = true;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").focus();
}

document.getElementById("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = document.getElementById("token").value;
  sessionStorage.setItem("concierge-token", state.token);
  start();
});

async function start() {
  try {
    const who = await api("/api/whoami");
    state.canAct = who.can_act;
  } catch (e) {
    if (e.message !== "unauthorized") showBanner(["Cannot reach the admin API: " + e.message]);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("view").hidden = false;
  startStream();
  route();
}

function stopStream() {
  if (state.stream) { state.stream.abort(); state.stream = null; }
}

// Server-sent events read with fetch, so the token travels in a header, not the URL.
async function startStream() {
  stopStream();
  const ctrl = new AbortController();
  state.stream = ctrl;
  setLive("live");
  try {
    const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
    const r = await fetch("/api/events/stream", { headers, signal: ctrl.signal });
    if (!r.ok) throw new Error("HTTP " + r.status);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let idx;
      while ((idx = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, idx);
        buf = buf.slice(idx + 2);
        let kind = "message", data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trimStart();
        }
        if (data) applyUpdate(kind, JSON.parse(data));
      }
    }
  } catch (e) {
    if (ctrl.signal.aborted) return;
    setLive("reconnecting");
  }
  if (state.stream === ctrl && !state.paused) setTimeout(() => { if (!state.paused) startStream(); }, 2000);
}

function setLive(text) {
  document.getElementById("live-status").textContent =
    text === "live" ? "Live" : text === "paused" ? "Updates paused" : "Reconnecting…";
}

document.getElementById("live-toggle").addEventListener("click", (e) => {
  state.paused = !state.paused;
  e.target.setAttribute("aria-pressed", String(state.paused));
  e.target.textContent = state.paused ? "Resume updates" : "Pause updates";
  if (state.paused) { stopStream(); setLive("paused"); } else startStream();
});

function applyUpdate(kind, msg) {
  if (kind === "fleet") state.fleet.clear();
  for (const a of msg.agents) state.fleet.set(a.id, a);
  state.totals = msg.totals;
  state.status = msg.status;
  showBanner(msg.status.warnings);
  if (state.route && state.route.name === "fleet") {
    // A delta without changed rows only moves the totals: leave the table alone.
    if (kind === "delta" && msg.agents.length === 0) renderTotals(); else renderFleet();
  }
  if (state.route && state.route.name === "agent" && msg.agents.some((a) => a.id === state.route.id)) {
    refreshAgent();
  }
}

function showBanner(warnings) {
  const el = document.getElementById("banner");
  el.replaceChildren();
  if (!warnings || warnings.length === 0) { el.hidden = true; return; }
  el.hidden = false;
  el.append(h("strong", {}, "The store cannot keep its promises: "),
    h("ul", {}, warnings.map((w) => h("li", {}, w))));
}

// ---- routing ---------------------------------------------------------------------------

window.addEventListener("hashchange", route);

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  let r = { name: "fleet" };
  if (parts[0] === "agent" && parts[1]) {
    r = parts[2] === "event" && parts[3] ? { name: "event", id: parts[1], offset: parts[3] } : { name: "agent", id: parts[1] };
  } else if (parts[0] === "channels") r = { name: "channels" };
  else if (parts[0] === "audit") r = { name: "audit" };
  state.route = r;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === r.name) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const view = document.getElementById("view");
  view.replaceChildren();
  if (r.name === "fleet") renderFleet();
  else if (r.name === "agent") renderAgent();
  else if (r.name === "event") renderEvent();
  else if (r.name === "channels") renderChannels();
  else if (r.name === "audit") renderAudit();
}

// ---- fleet view ------------------------------------------------------------------------

const COLUMNS = [
  ["id", "Agent"], ["state", "State"], ["pending", "Buffered"], ["pending_bytes", "Bytes"],
  ["oldest_pending_age_ms", "Oldest"], ["last_wake", "Last wake"], ["next_action_in_ms", "Next retry"],
  ["connected", "Connected"], ["channels", "Channels"],
];

function sortValue(a, key) {
  if (key === "last_wake") return a.last_wake ? a.last_wake.started_at_ms : -1;
  if (key === "channels") return a.channels.length;
  const v = a[key];
  return v === null || v === undefined ? -1 : v;
}

function renderFleet() {
  const view = document.getElementById("view");
  let table = document.getElementById("fleet-table");
  if (!table) {
    view.replaceChildren(
      h("h2", {}, "Fleet"),
      h("div", { id: "totals", class: "totals", "aria-live": "polite" }),
      h("div", { class: "filters" },
        h("label", { for: "filter-text" }, "Filter agents"),
        h("input", { id: "filter-text", type: "search", value: state.filter.text,
          oninput: (e) => { state.filter.text = e.target.value; state.fleetLimit = FLEET_PAGE; renderFleet(); } }),
        h("label", { for: "filter-state" }, "State"),
        h("select", { id: "filter-state", onchange: (e) => { state.filter.state = e.target.value; state.fleetLimit = FLEET_PAGE; renderFleet(); } },
          ["", "asleep", "waking", "awake", "unreachable"].map((s) =>
            h("option", { value: s, selected: state.filter.state === s }, s || "any")))),
      h("table", { id: "fleet-table" },
        h("caption", { class: "sr-only" }, "Agents, one row each; column headers sort"),
        h("thead", {}, h("tr", {}, COLUMNS.map(([key, label]) =>
          h("th", { scope: "col", "data-key": key },
            h("button", { type: "button", onclick: () => {
              state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (key === "id" ? 1 : -1) };
              renderFleet();
            } }, label))))),
        h("tbody", {})));
    table = document.getElementById("fleet-table");
  }
  renderTotals();
  for (const th of table.querySelectorAll("th")) {
    const key = th.dataset.key;
    th.setAttribute("aria-sort", key === state.sort.key ? (state.sort.dir > 0 ? "ascending" : "descending") : "none");
  }
  const q = state.filter.text.toLowerCase();
  const rows = [...state.fleet.values()]
    .filter((a) => (!q || a.id.toLowerCase().includes(q) || a.channels.some((c) => `${c.kind}/${c.name}`.toLowerCase().includes(q)))
      && (!state.filter.state || a.state === state.filter.state))
    .sort((a, b) => {
      const x = sortValue(a, state.sort.key), y = sortValue(b, state.sort.key);
      return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * state.sort.dir;
    });
  const tbody = table.querySelector("tbody");
  const shown = rows.slice(0, state.fleetLimit);
  tbody.replaceChildren(...shown.map(fleetRow));
  if (rows.length > shown.length) {
    tbody.append(h("tr", { class: "more-rows" }, h("td", { colspan: COLUMNS.length },
      `Showing ${shown.length} of ${rows.length} agents in this order (the totals count all). `,
      h("button", { type: "button", id: "fleet-more", onclick: () => { state.fleetLimit += FLEET_PAGE; renderFleet(); } },
        `Show ${Math.min(FLEET_PAGE, rows.length - shown.length)} more`))));
  }
}

function renderTotals() {
  const t = state.totals;
  const totals = document.getElementById("totals");
  if (!totals) return;
  totals.replaceChildren();
  if (t) {
    const by = t.by_state || {};
    totals.append(
      stat("Agents", t.agents), stat("Buffered events", t.pending, "total-pending"),
      stat("Buffered bytes", fmtBytes(t.pending_bytes)), stat("Oldest buffered", t.oldest_pending_age_ms ? fmtDur(t.oldest_pending_age_ms) : "–"),
      stat("Awake", by.awake || 0), stat("Waking", by.waking || 0), stat("Asleep", by.asleep || 0),
      stat("Unreachable", by.unreachable || 0));
  }
}

function stat(label, value, id) {
  return h("div", { class: "stat" }, h("span", { class: "label" }, label), h("span", { class: "value", id }, value));
}

function wakeSummary(w) {
  if (!w) return "never";
  const took = w.connected_after_ms !== null && w.connected_after_ms !== undefined ? fmtDur(w.connected_after_ms) : "";
  return `${ago(w.started_at_ms)} · ${w.outcome.replace("_", " ")}${took ? " in " + took : ""}`;
}

function fleetRow(a) {
  return h("tr", { "data-agent": a.id },
    h("th", { scope: "row", "data-col": "id" }, h("a", { href: "#/agent/" + encodeURIComponent(a.id) }, a.id),
      a.paused ? h("span", { class: "tag" }, "paused") : null),
    h("td", { "data-col": "state" }, h("span", { class: "state state-" + a.state }, a.state)),
    h("td", { "data-col": "pending", class: "num" }, a.pending),
    h("td", { "data-col": "pending_bytes", class: "num" }, fmtBytes(a.pending_bytes)),
    h("td", { "data-col": "oldest" }, fmtDur(a.oldest_pending_age_ms)),
    h("td", { "data-col": "last_wake" }, wakeSummary(a.last_wake)),
    h("td", { "data-col": "next" }, a.next_action_in_ms !== null && a.state !== "awake" ? "in " + fmtDur(a.next_action_in_ms) : "–"),
    h("td", { "data-col": "connected" }, a.connected ? "yes" : "no"),
    h("td", { "data-col": "channels" }, a.channels.length ? h("ul", { class: "chans" }, a.channels.map(channelItem)) : "–"));
}

// Held connections that are up (or push channels, which hold nothing) are healthy.
const HEALTHY = new Set(["connected", "listening", "push"]);

function channelItem(c) {
  const health = HEALTHY.has(c.state) ? "ok" : c.state === "starting" || c.state === "reconnecting" || c.state === "connecting" ? "warn" : "bad";
  return h("li", { class: "chan chan-" + health, "data-channel": `${c.kind}/${c.name}`, "data-health": health,
    title: c.last_error ? "Last error: " + c.last_error : null },
    `${c.kind}/${c.name} `, h("span", { class: "chan-state" }, c.state === "push" ? "push" : c.state));
}

// ---- agent view ------------------------------------------------------------------------

let agentTimer = null;

async function renderAgent() {
  const id = state.route.id;
  const view = document.getElementById("view");
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← Fleet")),
    h("h2", {}, "Agent ", h("code", {}, id)),
    h("div", { id: "agent-summary", class: "cards" }, "Loading…"),
    h("section", { "aria-labelledby": "actions-h" },
      h("h3", { id: "actions-h" }, "Actions"),
      state.canAct ? actionBar(id) : h("p", {}, "Signed in with the read-only token: actions are disabled."),
      h("p", { id: "action-result", role: "status", "aria-live": "polite" })),
    h("section", { "aria-labelledby": "timeline-h" },
      h("h3", { id: "timeline-h" }, "Wake timeline and buffer"),
      h("div", { id: "timeline" })),
    h("section", { "aria-labelledby": "events-h" },
      h("h3", { id: "events-h" }, "Buffered events"),
      eventFilters(id),
      h("div", { id: "events" })));
  await refreshAgent();
  loadEvents(id, 0);
  clearInterval(agentTimer);
  agentTimer = setInterval(() => {
    if (!state.route || state.route.name !== "agent") { clearInterval(agentTimer); return; }
    if (!state.paused) refreshAgent();
  }, 5000);
}

function actionBar(id) {
  return h("div", { class: "actions" },
    h("button", { type: "button", id: "act-wake", onclick: async () => {
      if (!await confirmAction(`Wake agent ${id} now?`)) return;
      try { await api(`/api/agents/${encodeURIComponent(id)}/wake`, { method: "POST" }); notice("Wake requested."); }
      catch (e) { notice(e.message, true); }
      refreshAgent();
    } }, "Wake now"),
    h("button", { type: "button", id: "act-pause", onclick: async () => {
      const a = state.fleet.get(id);
      const paused = a && a.paused;
      if (!await confirmAction(`${paused ? "Resume" : "Pause"} delivery to ${id}?`)) return;
      try { await api(`/api/agents/${encodeURIComponent(id)}/${paused ? "resume" : "pause"}`, { method: "POST" }); notice(paused ? "Delivery resumed." : "Delivery paused."); }
      catch (e) { notice(e.message, true); }
      refreshAgent();
    } }, "Pause / resume delivery"),
    h("form", { class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      const from = Number(document.getElementById("redeliver-from").value);
      if (!await confirmAction(`Deliver again every retained event of ${id} from offset ${from}? The agent's session restarts.`)) return;
      try { const r = await api(`/api/agents/${encodeURIComponent(id)}/redeliver`, { method: "POST", body: { from } }); notice(`Cursor moved back to ${r.cursor}.`); }
      catch (err) { notice(err.message, true); }
      refreshAgent();
    } },
      h("label", { for: "redeliver-from" }, "Redeliver from offset"),
      h("input", { id: "redeliver-from", type: "number", min: 1, required: true }),
      h("button", { type: "submit" }, "Redeliver")),
    h("form", { class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      const upTo = Number(document.getElementById("drop-up-to").value);
      const path = `/api/agents/${encodeURIComponent(id)}/drop`;
      try {
        const p = await api(path, { method: "POST", body: { up_to: upTo, preview: true } });
        if (!await confirmAction(`Drop ${p.would_drop} pending event(s) of ${id} up to offset ${p.up_to}? They are skipped, not delivered (still readable while retained).`)) return;
        const r = await api(path, { method: "POST", body: { up_to: upTo } });
        notice(`Dropped ${r.dropped} event(s).`);
      } catch (err) { notice(err.message, true); }
      refreshAgent();
    } },
      h("label", { for: "drop-up-to" }, "Acknowledge (skip) pending up to offset"),
      h("input", { id: "drop-up-to", type: "number", min: 1, required: true }),
      h("button", { type: "submit", class: "danger" }, "Drop…")));
}

async function refreshAgent() {
  const id = state.route && state.route.id;
  if (!id || state.route.name !== "agent") return;
  let a;
  try { a = await api(`/api/agents/${encodeURIComponent(id)}`); }
  catch (e) { const s = document.getElementById("agent-summary"); if (s) s.textContent = e.message; return; }
  if (!state.route || state.route.id !== id) return;
  const before = state.fleet.get(id);
  state.fleet.set(id, Object.assign(before || {}, a));
  // Acks and operator actions change which events are pending: reload the list then.
  if (state.eventsCursor !== undefined && state.eventsCursor !== a.cursor) loadEvents(id, 0);
  const summary = document.getElementById("agent-summary");
  if (!summary) return;
  summary.replaceChildren(
    h("div", { class: "card" },
      h("h3", {}, "Status"),
      h("dl", {},
        h("dt", {}, "State"), h("dd", {}, h("span", { id: "agent-state", class: "state state-" + a.state }, a.state)),
        h("dt", {}, "Connected"), h("dd", { id: "agent-connected" }, a.connected ? "yes" : "no"),
        h("dt", {}, "Delivery"), h("dd", {}, a.paused ? "paused by an operator" : "running"),
        h("dt", {}, "Buffered"), h("dd", { id: "agent-pending" }, `${a.pending} events, ${fmtBytes(a.pending_bytes)}`),
        h("dt", {}, "Oldest buffered"), h("dd", {}, fmtDur(a.oldest_pending_age_ms)),
        h("dt", {}, "Cursor / head"), h("dd", {}, `${a.cursor} / ${a.head}`),
        h("dt", {}, "Retained from"), h("dd", {}, a.first_retained === null ? "–" : "offset " + a.first_retained),
        h("dt", {}, "Wake"), h("dd", {}, `${a.driver} driver, policy ${a.policy}`))),
    whyCard(a));
  renderTimeline(a);
}

function whyCard(a) {
  const items = [];
  const w = a.last_wake;
  const s = a.wake_settings;
  if (a.state === "awake") items.push("The agent is awake and holds a session.");
  else {
    if (a.pending === 0) items.push("Nothing is buffered, so there is no reason to wake it.");
    if (a.policy === "never") items.push("Its wake policy is “never”: it connects on its own schedule.");
    else if (a.policy.startsWith("coalesce") && a.state === "asleep" && a.pending > 0) items.push(`Events are being gathered (${a.policy}) before one wake.`);
    if (a.driver === "none") items.push("No wake driver is configured.");
    if (a.state === "waking") items.push(`A wake is in progress (attempt ${w ? w.attempts : "?"} of ${s.max_attempts}).`);
    if (a.state === "unreachable") items.push(`All ${s.max_attempts} attempts failed; retrying every ${fmtDur(s.unreachable_retry_ms)}.`);
    if (a.last_error) items.push("Last error: " + a.last_error);
    if (a.next_action_in_ms !== null && a.next_action_in_ms !== undefined) items.push("Next attempt in " + fmtDur(a.next_action_in_ms) + ".");
    if (a.paused) items.push("Delivery is paused by an operator.");
  }
  items.push(`Backoff: ${fmtDur(s.backoff_initial_ms)} doubling to ${fmtDur(s.backoff_max_ms)}; the agent must connect within ${fmtDur(s.connect_timeout_ms)} of the driver returning.`);
  return h("div", { class: "card", id: "why" },
    h("h3", {}, a.state === "awake" ? "Why is this agent awake?" : "Why is this agent not awake?"),
    h("ul", {}, items.map((i) => h("li", {}, i))));
}

function renderTimeline(a) {
  const el = document.getElementById("timeline");
  if (!el) return;
  const wakes = [...(a.wake_history || [])];
  if (a.last_wake) wakes.push(a.last_wake);
  const list = h("table", { class: "compact" },
    h("caption", { class: "sr-only" }, "Wakes, newest first"),
    h("thead", {}, h("tr", {}, ["Started", "Reason", "Attempts", "Driver called", "Connected", "First delivery", "Events drained", "Outcome", "Error"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, wakes.slice().reverse().map((w) => h("tr", {},
      h("td", {}, fmtTime(w.started_at_ms)), h("td", {}, w.reason), h("td", { class: "num" }, w.attempts),
      h("td", {}, fmtDur(w.driver_called_after_ms)), h("td", {}, fmtDur(w.connected_after_ms)),
      h("td", {}, fmtDur(w.first_delivery_after_ms)), h("td", { class: "num" }, w.events_drained ?? 0),
      h("td", {}, w.outcome.replace("_", " ")), h("td", {}, w.error || "")))));
  el.replaceChildren(bars(a, wakes), sparkline(a.buffer_history || []), wakes.length ? list : h("p", {}, "No wakes yet."));
}

// The last 3 hours as an SVG strip (now at the right): lifecycle periods on top (asleep grey,
// waking amber, awake green, unreachable red), wakes in the middle (green connected, red
// unreachable, amber in progress), event arrivals per minute as ticks at the bottom.
function bars(a, wakes) {
  const ns = "http://www.w3.org/2000/svg";
  const now = Date.now(), span = 3 * 3600 * 1000, width = 600;
  const xOf = (t) => width * (1 - (now - t) / span);
  const svg = document.createElementNS(ns, "svg");
  const el = (tag, attrs, title) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (title) { const t = document.createElementNS(ns, "title"); t.textContent = title; e.append(t); }
    svg.append(e);
    return e;
  };
  svg.setAttribute("viewBox", `0 0 ${width} 42`);
  svg.setAttribute("class", "strip");
  svg.setAttribute("role", "img");
  svg.setAttribute("id", "wake-strip");
  // Periods: the agent starts asleep when the proxy starts; each change opens a new period.
  const changes = [{ at_ms: a.started_at_ms || now - span, state: "asleep" }, ...(a.state_changes || [])];
  let periods = 0;
  changes.forEach((c, i) => {
    const end = i + 1 < changes.length ? changes[i + 1].at_ms : now;
    const x0 = Math.max(0, xOf(c.at_ms)), x1 = Math.min(width, xOf(end));
    if (x1 <= 0 || x1 - x0 < 0.5) return;
    periods++;
    el("rect", { x: x0.toFixed(1), y: 1, height: 12, width: (x1 - x0).toFixed(1), class: "span-" + c.state, "data-state": c.state },
      `${c.state} from ${fmtTime(c.at_ms)} for ${fmtDur(end - c.at_ms)}`);
  });
  for (const w of wakes) {
    const dur = w.connected_after_ms || (w.outcome === "in_progress" ? now - w.started_at_ms : 1000);
    const bar = Math.max(3, width * dur / span);
    const x = Math.min(width - bar, xOf(w.started_at_ms));
    if (x < 0) continue;
    el("rect", { x: x.toFixed(1), y: 15, height: 12, width: bar.toFixed(1), class: "wake-" + w.outcome },
      `${fmtTime(w.started_at_ms)}: ${w.outcome}`);
  }
  const arrivals = (a.arrivals || []).filter((m) => m.minute_ms + 60000 > now - span);
  const peak = Math.max(1, ...arrivals.map((m) => m.events));
  let events = 0;
  for (const m of arrivals) {
    events += m.events;
    const x = Math.max(0.5, Math.min(width - 0.5, xOf(m.minute_ms + 30000)));
    el("line", { x1: x.toFixed(1), x2: x.toFixed(1), y1: 41, y2: (41 - 2 - 10 * m.events / peak).toFixed(1), class: "arrival" },
      `${m.events} event(s) arrived in the minute from ${fmtTime(m.minute_ms)}`);
  }
  svg.setAttribute("aria-label", `Last 3 hours: ${periods} asleep/awake period(s), ${wakes.length} wake(s), ${events} event arrival(s)`);
  return h("figure", {}, svg, h("figcaption", {},
    "Last 3 hours, now at the right. Top: asleep (grey), waking (amber), awake (green), unreachable (red). Middle: wakes. Bottom: events arriving, per minute."));
}

function sparkline(samples) {
  if (samples.length < 2) return h("p", {}, "Buffer history appears after a few minutes (one sample a minute).");
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 60;
  const max = Math.max(1, ...samples.map((s) => s.pending));
  const maxAge = Math.max(1, ...samples.map((s) => s.oldest_age_ms));
  const t0 = samples[0].at_ms, t1 = samples[samples.length - 1].at_ms;
  const x = (s) => (width * (s.at_ms - t0) / Math.max(1, t1 - t0)).toFixed(1);
  const pts = samples.map((s) => `${x(s)},${(height - height * s.pending / max).toFixed(1)}`);
  const agePts = samples.map((s) => `${x(s)},${(height - height * s.oldest_age_ms / maxAge).toFixed(1)}`);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("id", "buffer-spark");
  svg.setAttribute("aria-label", `Buffered events over time, peak ${max}; age of the oldest buffered event, peak ${fmtDur(maxAge)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("class", "depth");
  const age = document.createElementNS(ns, "polyline");
  age.setAttribute("points", agePts.join(" "));
  age.setAttribute("class", "age");
  svg.append(age, line);
  const last = samples[samples.length - 1];
  return h("figure", {}, svg, h("figcaption", {},
    `Last ${fmtDur(t1 - t0)}: buffered events (solid, peak ${max}) and age of the oldest buffered event (dashed, peak ${fmtDur(maxAge)}; now ${fmtDur(last.oldest_age_ms)})`));
}

function eventFilters(id) {
  const field = (name, label, type) => [h("label", { for: "ev-" + name }, label), h("input", { id: "ev-" + name, name, type: type || "text" })];
  return h("form", { class: "filters", id: "event-filter", onsubmit: (e) => { e.preventDefault(); loadEvents(id, 0); } },
    field("offset", "Offset", "number"), field("dedupe_key", "Dedupe key"), field("channel", "Channel"),
    field("conversation", "Conversation"), field("since", "Since", "datetime-local"), field("until", "Until", "datetime-local"),
    h("button", { type: "submit" }, "Search"));
}

// The event list's filter fields as API parameters (empty fields left out).
function eventFilter() {
  const f = document.getElementById("event-filter");
  const val = (n) => f.elements[n].value.trim();
  const out = {};
  for (const n of ["dedupe_key", "channel", "conversation"]) if (val(n)) out[n] = val(n);
  if (val("since")) out.since_ms = new Date(val("since")).getTime();
  if (val("until")) out.until_ms = new Date(val("until")).getTime();
  return out;
}

// Drops pending events after a count preview and a confirmation: `what` is `{ offsets }` or `{ filter }`.
async function dropEvents(id, what, description) {
  const path = `/api/agents/${encodeURIComponent(id)}/drop`;
  try {
    const p = await api(path, { method: "POST", body: Object.assign({ preview: true }, what) });
    if (p.would_drop === 0) { notice("No pending event matches: nothing to drop."); return; }
    const scope = p.complete ? "" : " (among the first 10,000 pending events; repeat for more)";
    if (!await confirmAction(`Drop ${p.would_drop} pending event(s) of ${id} ${description}${scope}? They are removed from the buffer and never delivered.`)) return;
    const r = await api(path, { method: "POST", body: what });
    notice(`Dropped ${r.dropped} event(s).`);
  } catch (err) { notice(err.message, true); }
  await refreshAgent();
  loadEvents(id, 0);
}

async function loadEvents(id, after) {
  const el = document.getElementById("events");
  if (!el) return;
  const f = document.getElementById("event-filter");
  const val = (n) => f.elements[n].value.trim();
  if (val("offset")) { location.hash = `#/agent/${encodeURIComponent(id)}/event/${val("offset")}`; return; }
  const q = new URLSearchParams({ after: String(after), limit: "50" });
  for (const [k, v] of Object.entries(eventFilter())) q.set(k, String(v));
  let r;
  try { r = await api(`/api/agents/${encodeURIComponent(id)}/events?${q}`); }
  catch (e) { el.textContent = e.message; return; }
  const a = state.fleet.get(id) || {};
  state.eventsCursor = a.cursor;
  const table = h("table", { class: "compact", id: "events-table" },
    h("caption", { class: "sr-only" }, "Events of this agent by offset"),
    h("thead", {}, h("tr", {}, (state.canAct ? ["Select"] : []).concat(["Offset", "Status", "Received", "Channel", "Conversation", "Sender", "Text"]).map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, r.events.map((e) => h("tr", { "data-offset": e.offset },
      state.canAct ? h("td", {}, e.offset > (a.cursor || 0)
        ? h("input", { type: "checkbox", class: "ev-select", value: e.offset, "aria-label": `Select event ${e.offset}`,
          onchange: (ev) => ev.target.closest("tr").classList.toggle("selected", ev.target.checked) }) : "") : null,
      h("th", { scope: "row" }, h("a", { href: `#/agent/${encodeURIComponent(id)}/event/${e.offset}` }, e.offset)),
      h("td", {}, e.offset <= (a.cursor || 0) ? "acked" : "pending"),
      h("td", {}, fmtTime(e.received_at_ms)), h("td", {}, `${e.channel.kind}/${e.channel.name}`),
      h("td", {}, e.conversation), h("td", {}, e.sender || "–"), h("td", { class: "text" }, (e.text || "").slice(0, 120))))));
  const nav = h("p", { class: "pager" },
    after > 0 ? h("button", { type: "button", onclick: () => loadEvents(id, 0) }, "First page") : null,
    r.next_after !== null && r.next_after !== undefined && r.events.length > 0
      ? h("button", { type: "button", onclick: () => loadEvents(id, r.next_after) }, "Next page") : null,
    r.scanned !== undefined ? ` ${r.events.length} match(es) in ${r.scanned} examined` : ` ${r.events.length} shown`);
  const tools = state.canAct ? h("p", { class: "actions", id: "drop-tools" },
    h("button", { type: "button", class: "danger", id: "drop-selected", onclick: () => {
      const offsets = [...document.querySelectorAll("#events-table .ev-select:checked")].map((c) => Number(c.value));
      if (!offsets.length) { notice("Select pending events first (the boxes in the list).", true); return; }
      dropEvents(id, { offsets }, `at offset(s) ${offsets.slice(0, 10).join(", ")}${offsets.length > 10 ? ", …" : ""}`);
    } }, "Drop selected…"),
    h("button", { type: "button", class: "danger", id: "drop-filtered", onclick: () => {
      const filter = eventFilter();
      dropEvents(id, { filter }, Object.keys(filter).length ? "matching the filter above" : "(every pending event)");
    } }, "Drop all pending matching the filter…")) : null;
  el.replaceChildren(r.events.length ? table : h("p", {}, "No retained events match."), nav, tools);
}

// ---- event view ------------------------------------------------------------------------

async function renderEvent() {
  const { id, offset } = state.route;
  const view = document.getElementById("view");
  view.replaceChildren(h("p", {}, h("a", { href: "#/agent/" + encodeURIComponent(id) }, "← Agent " + id)), h("h2", {}, `Event ${offset}`));
  let e;
  try { e = await api(`/api/agents/${encodeURIComponent(id)}/events/${encodeURIComponent(offset)}`); }
  catch (err) { view.append(h("p", { class: "error" }, err.message)); return; }
  view.append(
    h("dl", { class: "card" },
      ...[["Offset", e.offset], ["Status", e.status],
        ["Delivery attempts", h("span", { id: "event-attempts" }, String(e.delivery_attempts),
          e.delivery_attempts_complete ? "" : " or more", " (since this process started)")],
        ["Channel", `${e.channel.kind}/${e.channel.name}`], ["Conversation", e.conversation], ["Sender", e.sender || "–"],
        ["Dedupe key", e.dedupe_key || "–"], ["Received", fmtTime(e.received_at_ms)], ["Content type", e.content_type],
        ["Size", fmtBytes(e.size)], ["Attachments", e.attachments], ["Text", e.text || "–"]]
        .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    e.deliveries.length ? h("table", { class: "compact", id: "deliveries-table" },
      h("caption", {}, "Deliveries of this event"),
      h("thead", {}, h("tr", {}, ["Attempt", "Delivered at", "Session", "In batch of offsets"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, e.deliveries.map((d, i) => h("tr", {}, h("td", { class: "num" }, i + 1),
        h("td", {}, fmtTime(d.at_ms)), h("td", {}, d.session.toString(16)), h("td", {}, `${d.from}–${d.to}`))))) : null,
    h("h3", {}, "Headers and metadata (secrets redacted)"),
    e.meta.length ? h("table", { class: "compact" }, h("tbody", {}, e.meta.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v))))) : h("p", {}, "None."),
    h("h3", {}, "Raw payload"),
    h("pre", { class: "raw", tabindex: 0 }, e.raw_pretty || e.raw.text || ("base64: " + e.raw.base64)));
}

// ---- channels and audit ----------------------------------------------------------------

// Figures an adapter reports next to a connection's state; unknown keys are shown as given.
const DETAIL_LABELS = {
  identify_remaining: "Session starts left today", identify_total: "Session starts per day",
  identify_reset_at_ms: "Session starts reset", identify_max_concurrency: "Identify max concurrency",
};

function connectionDetails(details) {
  const keys = Object.keys(details || {});
  if (!keys.length) return "–";
  return h("dl", { class: "details" }, keys.flatMap((k) => {
    const v = details[k];
    const value = k.endsWith("_at_ms") ? h("time", { datetime: new Date(v).toISOString() }, fmtTime(v)) : String(v);
    return [h("dt", {}, DETAIL_LABELS[k] || k), h("dd", { "data-detail": k }, value)];
  }));
}

async function renderChannels() {
  const view = document.getElementById("view");
  view.replaceChildren(h("h2", {}, "Channels"));
  let r;
  try { r = await api("/api/channels"); } catch (e) { view.append(h("p", { class: "error" }, e.message)); return; }
  view.append(
    h("h3", {}, "Held connections"),
    r.connections.length ? h("table", { class: "compact" },
      h("thead", {}, h("tr", {}, ["Channel", "Name", "State", "Since", "Reconnects", "Last event", "Last error", "Details"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, r.connections.map((c) => h("tr", {}, h("td", {}, c.channel), h("th", { scope: "row" }, c.name),
        h("td", {}, c.state), h("td", {}, ago(c.since_ms)), h("td", { class: "num" }, c.reconnects),
        h("td", {}, ago(c.last_event_ms)), h("td", {}, c.last_error || ""), h("td", {}, connectionDetails(c.details)))))) : h("p", {}, "No held connections."),
    h("h3", {}, "Webhook routes"),
    r.webhooks.length ? h("table", { class: "compact" },
      h("thead", {}, h("tr", {}, ["Route", "Agent", "Path", "Verification", "Replies"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, r.webhooks.map((w) => h("tr", {}, h("th", { scope: "row" }, w.route), h("td", {}, w.agent),
        h("td", {}, h("code", {}, w.path)), h("td", {}, w.verify), h("td", {}, w.replies ? "yes" : "no"))))) : h("p", {}, "No webhook routes."));
}

async function renderAudit() {
  const view = document.getElementById("view");
  view.replaceChildren(h("h2", {}, "Audit log"));
  let r;
  try { r = await api("/api/audit"); } catch (e) { view.append(h("p", { class: "error" }, e.message)); return; }
  view.append(r.entries.length ? h("table", { class: "compact", id: "audit-table" },
    h("thead", {}, h("tr", {}, ["When", "Who", "Action", "Agent", "Detail", "Result"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, r.entries.map((e) => h("tr", {}, h("td", {}, fmtTime(e.at_ms)), h("td", {}, e.actor), h("td", {}, e.action),
      h("td", {}, e.agent), h("td", {}, e.detail), h("td", {}, e.result))))) : h("p", {}, "No actions yet (the last 1000 are kept in the store)."));
}

start();
