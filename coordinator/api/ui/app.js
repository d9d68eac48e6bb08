// The dashboard: plain JavaScript, no build step. Panels are filled from the
// node's JSON API and kept live by one Server-Sent Events stream of the
// cluster's events (/v1/watch/events), read with fetch so it can carry the
// credential. Only counters that move without events (indexes, loads,
// publish counts, backlogs) are refreshed on one timer.
"use strict";

// The credential: the admin token, or an agent's id and Ed25519 key (requests
// signed in the browser with WebCrypto, as the Python client signs them). The
// token is kept in sessionStorage (this tab only, gone when it closes, cleared
// by "Sign out"); an agent's key only in memory, imported non-extractable: a
// reload asks for it again (the id is remembered), and no script can read it out.
const saved = JSON.parse(sessionStorage.getItem("coord-session") || "null");
const state = { session: saved && saved.kind === "admin" ? saved : null, signer: null,
                rememberedAgent: saved && saved.kind === "agent" ? saved.id : null,
                clockOffsetMs: 0, agents: [], leaderChanges: [] };
const $ = (id) => document.getElementById(id);

class NeedsLogin extends Error {}
class Hidden extends Error {  // a 403: this credential may not see it
  constructor(path, error) { super(error.message || path); this.error = error; }
}

// The dashboard only reads: every request it signs has an empty body.
const EMPTY_BODY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

async function headers(method, path) {  // path: as sent, with its query
  const session = state.session;
  if (!session) return {};
  if (session.kind === "admin") return { Authorization: "Bearer " + session.token };
  const url = new URL(path, location.origin);
  const ts = String(Date.now() + state.clockOffsetMs);
  const nonce = base64(crypto.getRandomValues(new Uint8Array(18))).replace(/\+/g, "-").replace(/\//g, "_");
  const text = ["COORD-ED25519-V1", method, location.host, url.pathname + url.search, ts, nonce, EMPTY_BODY_SHA256]
    .join("\n");
  const sig = base64(await crypto.subtle.sign("Ed25519", state.signer, new TextEncoder().encode(text)));
  return { Authorization: `Coord-Ed25519 agent="${session.id}", ts="${ts}", nonce="${nonce}", sig="${sig}"` };
}

async function get(path) {
  return fetch(path, { headers: await headers("GET", path) });
}

async function getJSON(path) {
  const response = await get(path);
  if (response.status === 401) throw new NeedsLogin(path);
  if (response.status === 403) throw new Hidden(path, ((await response.json()).error) || {});
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

// -- an agent's key in the browser -----------------------------------------------------------

const PKCS8_ED25519 = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

function base64(bytes) { return btoa(String.fromCharCode(...new Uint8Array(bytes))); }
function unbase64(text) { return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); }

function seedOf(text) {  // the key file written by AgentKeys.save, or its seed alone (base64)
  let seed = text.trim();
  if (seed.startsWith("{")) {
    try { seed = JSON.parse(seed).seed; } catch { throw new Error("That is not an agent key file (not JSON)."); }
    if (typeof seed !== "string") throw new Error("That key file has no seed.");
  }
  let bytes;
  try { bytes = unbase64(seed); } catch { throw new Error("The key is not base64."); }
  if (bytes.length !== 32) throw new Error("The key is not an Ed25519 seed (32 bytes).");
  return seed;
}

async function importAgentKey(seed) {
  if (!window.isSecureContext || !crypto.subtle) {
    throw new Error("Signing needs a secure context: open the dashboard over https, or on 127.0.0.1.");
  }
  const pkcs8 = new Uint8Array([...PKCS8_ED25519, ...unbase64(seed)]);
  try {
    return await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
  } catch {
    throw new Error("This browser cannot sign with Ed25519 (WebCrypto); use the admin token.");
  }
}

function emptyRow(body, columns, text) {
  if (body.rows.length) return;
  const row = document.createElement("tr");
  const td = cell(row, text, "empty");
  td.colSpan = columns;
  body.appendChild(row);
}

function linkCell(row, text, onClick) {  // a cell holding a button that opens the row's details
  const td = document.createElement("td");
  const open = document.createElement("button");
  open.className = "link";
  open.textContent = text;
  open.addEventListener("click", onClick);
  td.appendChild(open);
  row.appendChild(td);
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// -- cluster ---------------------------------------------------------------------------------

const UNREACHABLE = {
  ClientConnectorError: "down: connection refused",
  TimeoutError: "no answer within 1 s",
  ServerDisconnectedError: "down: disconnected",
};

async function refreshCluster() {
  const view = await getJSON("/v1/cluster");
  $("node").textContent = view.node;
  const body = $("members").tBodies[0];
  body.replaceChildren();
  for (const m of view.members) {
    const row = document.createElement("tr");
    row.dataset.member = m.id || m.raft;
    row.dataset.role = m.reachable ? m.role : "unreachable";
    const name = cell(row, m.id || m.raft);
    if (m.role === "leader") {
      row.classList.add("leader");
      const badge = document.createElement("span");
      badge.className = "badge leader";
      badge.textContent = "leader";
      name.append(" ", badge);
    }
    if (!m.reachable) {
      cell(row, "unreachable", "bad");
      for (let i = 0; i < 4; i++) cell(row, null, "num");
      cell(row, UNREACHABLE[m.error] || "no answer", "bad");
    } else {
      cell(row, m.role);
      cell(row, m.term, "num");
      cell(row, m.commit_index, "num");
      cell(row, m.applied_index, "num");
      cell(row, m.apply_lag, "num" + (m.apply_lag > 100 ? " warn" : ""));
      cell(row, m.healthy ? "healthy" : (m.problem || "unhealthy"), m.healthy ? "ok" : "bad");
    }
    body.appendChild(row);
  }
}

async function loadLeaderChanges() {
  const page = await getJSON("/v1/events?types=system.leader.elected&limit=1000");
  state.leaderChanges = page.events.slice(-20);
  renderLeaderChanges();
}

function renderLeaderChanges() {
  const list = $("leader-changes");
  list.replaceChildren();
  for (const e of state.leaderChanges) {
    const item = document.createElement("li");
    const when = new Date(e.time_ms).toLocaleTimeString();
    item.textContent = `${when} · ${e.data.node} elected, term ${e.data.term}`;
    list.appendChild(item);
  }
}

// -- agents -----------------------------------------------------------------------------------

async function refreshAgents() {
  const [agents, services] = await Promise.all([getJSON("/v1/agents?leases=leader"),
                                                 getJSON("/v1/services?scope=cluster")]);
  state.leasesFrom = agents.leases_from;
  const balanced = {};
  for (const service of services.services) for (const a of service.agents) balanced[a.id] = a;
  state.agents = agents.agents.map((a) => ({ ...a, balancer: balanced[a.id] || null }));
  renderAgents();
}

function renderAgents() {
  const needle = $("agent-filter").value.trim().toLowerCase();
  const shown = state.agents.filter((a) =>
    !needle || [a.id, a.type, a.health].some((v) => String(v).toLowerCase().includes(needle)));
  const body = $("agent-table").tBodies[0];
  body.replaceChildren();
  for (const a of shown) {
    const row = document.createElement("tr");
    row.dataset.agent = a.id;
    cell(row, a.id);
    cell(row, a.type);
    cell(row, a.health, a.health === "healthy" ? "ok" : a.health === "unhealthy" ? "bad" : "");
    const lease = cell(row, a.lease_remaining_s === null ? null : Math.round(a.lease_remaining_s) + " s", "num");
    lease.title = state.leasesFrom ? "as the leader, " + state.leasesFrom + ", counts it"
      : "leases are kept by the leader, which did not answer";
    cell(row, a.weight, "num");
    const views = Object.entries(a.balancer ? a.balancer.by_node : {});  // every node balances its own calls
    const load = cell(row, views.length ? views.reduce((sum, [, v]) => sum + v.inflight, 0) : null, "num");
    load.title = views.map(([node, v]) => `${node}: ${v.inflight} in flight, ${v.requests} requests`).join("\n");
    const open = views.filter(([, v]) => v.breaker.state !== "closed");
    const breaker = cell(row, !views.length ? null : open.length
      ? open.map(([node, v]) => `${v.breaker.state.replace("_", " ")} on ${node}`).join(", ") : "closed",
    open.some(([, v]) => v.breaker.state === "open") ? "bad" : open.length ? "warn" : "");
    breaker.title = views.map(([node, v]) => `${node}: ${v.breaker.state.replace("_", " ")}`).join("\n");
    cell(row, a.endpoint);
    body.appendChild(row);
  }
  emptyRow(body, 8, state.agents.length ? "no agent matches the filter" : "no agents registered");
  const total = state.agents.length;
  $("agent-count").textContent = (shown.length === total ? String(total) : `${shown.length} of ${total}`)
    + (total === 1 ? " agent" : " agents");
}

// -- bus --------------------------------------------------------------------------------------

async function refreshBus() {
  const [topics, subscriptions, transports, bindings] = await Promise.all([
    getJSON("/v1/topics"), getJSON("/v1/subscriptions"), getJSON("/v1/transports"), getJSON("/v1/bindings")]);
  const now = Date.now();
  const before = state.published || {};
  const seconds = state.publishedAt ? (now - state.publishedAt) / 1000 : null;
  state.published = {};
  const topicBody = $("topic-table").tBodies[0];
  topicBody.replaceChildren();
  for (const t of topics.topics) {
    state.published[t.topic] = t.published;
    const row = document.createElement("tr");
    row.dataset.topic = t.topic;
    cell(row, t.topic);
    cell(row, t.published, "num");
    const rate = seconds && t.topic in before ? (t.published - before[t.topic]) / seconds : null;
    cell(row, rate === null ? null : rate.toFixed(1), "num");
    cell(row, t.retained, "num");
    topicBody.appendChild(row);
  }
  emptyRow(topicBody, 4, "no topics yet");
  state.publishedAt = now;
  const subBody = $("subscription-table").tBodies[0];
  subBody.replaceChildren();
  const seen = new Set();
  for (const sub of subscriptions.subscriptions) {
    const name = sub.kind === "group" ? "group " + sub.name : sub.id;
    if (seen.has(name)) continue;  // a group's members share one queue
    seen.add(name);
    const row = document.createElement("tr");
    row.dataset.consumer = name;
    cell(row, name);
    cell(row, sub.topic);
    cell(row, sub.backlog, "num");
    cell(row, sub.pending, "num");
    cell(row, sub.dlq, "num" + (sub.dlq > 0 ? " bad" : ""));
    cell(row, sub.guarantee);
    subBody.appendChild(row);
  }
  emptyRow(subBody, 6, "no subscriptions");
  const lag = {};
  for (const b of bindings.bindings) (lag[b.transport] = lag[b.transport] || []).push(`${b.topic} (${b.backlog})`);
  const transportBody = $("transport-table").tBodies[0];
  transportBody.replaceChildren();
  for (const t of transports.transports) {
    const row = document.createElement("tr");
    cell(row, t.name);
    cell(row, t.ok ? "healthy" : (t.error || "unhealthy"), t.ok ? "ok" : "bad");
    cell(row, (lag[t.name] || []).join(", ") || null);
    transportBody.appendChild(row);
  }
  emptyRow(transportBody, 3, "none configured: the replicated log carries the bus");
}

// -- sagas ------------------------------------------------------------------------------------

async function refreshSagas() {
  const page = await getJSON("/v1/sagas?order=newest&limit=50");
  $("saga-counts").textContent = Object.entries(page.counts)
    .map(([name, count]) => `${name}: ${count}`).join(" · ") || "no sagas";
  const body = $("saga-table").tBodies[0];
  body.replaceChildren();
  for (const saga of page.sagas) {
    const row = document.createElement("tr");
    row.dataset.saga = saga.id;
    linkCell(row, saga.id, () => showSaga(saga.id).catch(report));
    cell(row, saga.name);
    cell(row, saga.state, saga.state === "completed" ? "ok" : saga.state === "failed-stuck" ? "bad" : "");
    cell(row, new Date(saga.updated_ms).toLocaleTimeString());
    body.appendChild(row);
  }
  emptyRow(body, 4, "no sagas yet");
  if (state.saga) showSaga(state.saga).catch(report);
}

async function showSaga(id) {
  state.saga = id;
  const saga = await getJSON("/v1/sagas/" + encodeURIComponent(id));
  $("saga-detail").hidden = false;
  $("saga-detail-title").textContent = `${saga.id} (${saga.name}): ${saga.state}`;
  const list = $("saga-history");
  list.replaceChildren();
  for (const h of saga.history) {
    const item = document.createElement("li");
    const step = h.step ? ` ${h.step}` + (h.phase ? ` (${h.phase} ${h.attempt})` : "") : "";
    const detail = h.detail && h.detail.error ? ` — ${h.detail.error}` : "";
    item.textContent = `${new Date(h.time_ms).toLocaleTimeString()} · ${h.event}${step}${detail}`;
    if (h.phase === "compensation" || h.event.includes("compensat")) item.className = "compensation";
    if (h.event.endsWith("failed") || h.event.endsWith("stuck")) item.className = "failure";
    list.appendChild(item);
  }
}

// -- chaos runs -------------------------------------------------------------------------------

async function refreshChaos() {
  const page = await getJSON("/v1/chaos/runs");
  $("chaos-where").textContent = page.directory
    ? "From " + page.directory + " (python -m chaos.run --out there)." : "No chaos directory on this node.";
  const body = $("chaos-table").tBodies[0];
  body.replaceChildren();
  for (const run of page.runs) {
    const row = document.createElement("tr");
    row.dataset.run = run.run;
    linkCell(row, runTime(run.run), () => showChaos(run.run).catch(report));
    const verdict = run.valid === true ? "passed" : run.valid === false ? "FAILED" : "no verdict";
    cell(row, verdict, run.valid === true ? "ok" : run.valid === false ? "bad" : "warn");
    cell(row, Object.entries(run.checks).map(([check, ok]) => `${check}: ${ok ? "ok" : "failed"}`).join(", "));
    body.appendChild(row);
  }
  emptyRow(body, 3, "no runs yet");
}

function runTime(name) {  // chaos.run names a run by its start: 20261127-101010
  const m = /^(\d{4})(\d{2})(\d{2})-(\d{2})(\d{2})(\d{2})$/.exec(name);
  return m ? `${m[1]}-${m[2]}-${m[3]} ${m[4]}:${m[5]}:${m[6]}` : name;
}

async function showChaos(name) {
  const run = await getJSON("/v1/chaos/runs/" + encodeURIComponent(name));
  $("chaos-detail").hidden = false;
  $("chaos-detail-title").textContent = `${runTime(run.run)}: ${run.valid === true ? "passed" : run.valid === false
    ? "FAILED" : "no verdict"}`;
  $("chaos-report").textContent = run.report || "(no report)";
  const plot = $("chaos-plot");
  plot.hidden = true;
  if (run.has_plot) {
    const response = await get(`/v1/chaos/runs/${encodeURIComponent(name)}/latency.png`);
    if (response.ok) {
      if (plot.src) URL.revokeObjectURL(plot.src);
      plot.src = URL.createObjectURL(await response.blob());
      plot.hidden = false;
    }
  }
}

// -- live: one SSE stream of the cluster's events, read with fetch -----------------------------

async function follow() {
  let lastId = null;
  for (;;) {
    try {
      const query = lastId === null ? "" : "?from_seq=" + (lastId + 1);
      const response = await get("/v1/watch/events" + query);
      if (response.status === 401 || response.status === 403) throw new NeedsLogin("watch");
      if (!response.ok || !response.body) throw new Error("watch: " + response.status);
      setLive("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = parseEvent(block);
          if (event) {
            lastId = event.id ?? lastId;
            onEvent(event);
          }
        }
      }
    } catch (error) {
      if (error instanceof NeedsLogin) { showLogin(); return; }
    }
    setLive("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function parseEvent(block) {
  const event = { id: null, type: "message", data: null };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(": ");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 2);
    if (name === "id") event.id = Number(value);
    else if (name === "event") event.type = value;
    else if (name === "data") event.data = JSON.parse(value);
  }
  return event.data === null ? null : event;
}

function onEvent(event) {
  if (event.type === "system.leader.elected") {
    state.leaderChanges = [...state.leaderChanges, event.data].slice(-20);
    renderLeaderChanges();
  }
  if (event.type.startsWith("system.")) refresh("cluster", refreshCluster);
  if (event.type.startsWith("agent.")) refresh("agents", refreshAgents);
  if (event.type.startsWith("saga.")) refresh("sagas", refreshSagas);
}

function setLive(text) { $("live").textContent = text; }

function report(error) {
  if (error instanceof NeedsLogin) showLogin();
  else setLive("error: " + error.message);
}

// -- panels: each filled by its reads; one the credential may not see says so -----------------

const PANELS = {
  cluster: [refreshCluster, loadLeaderChanges],
  agents: [refreshAgents],
  bus: [refreshBus],
  sagas: [refreshSagas],
  chaos: [refreshChaos],
};

async function refresh(name, ...reads) {  // false when the credential was refused (the login is shown)
  try {
    await Promise.all((reads.length ? reads : PANELS[name]).map((read) => read()));
    showHidden(name, null);
  } catch (error) {
    if (error instanceof Hidden) showHidden(name, error.error);
    else report(error);
    return !(error instanceof NeedsLogin);
  }
  return true;
}

function showHidden(name, error) {  // error: the 403's body (permission, resource), or null when shown
  const section = $(name);
  let note = section.querySelector(".hidden-note");
  section.querySelector(".body").hidden = error !== null;
  if (error === null) { if (note) note.remove(); return; }
  if (!note) {
    note = document.createElement("p");
    note.className = "hidden-note";
    section.querySelector("h2").after(note);
  }
  const needs = error.permission === "admin" ? "the admin" : `${error.permission} on ${error.resource}`;
  note.textContent = `Not shown to ${whoText()}: this needs ${needs}.`;
}

// -- signing in -------------------------------------------------------------------------------

function whoText() {
  const session = state.session;
  return !session ? "anyone" : session.kind === "admin" ? "the admin" : `agent ${session.id}`;
}

function showWho() {
  $("who").textContent = state.session ? "signed in as " + whoText() : "";
  $("sign-out").hidden = !state.session;
}

function showLogin() {
  $("login").hidden = false;
  if (state.rememberedAgent && !$("agent-id").value) {
    $("kind-agent").checked = true;
    $("agent-id").value = state.rememberedAgent;
    $("login-note").textContent = `Give agent ${state.rememberedAgent}'s key again: it was kept in memory only.`;
  }
  chooseKind();
}

function chooseKind() {
  const agent = $("kind-agent").checked;
  $("admin-fields").hidden = agent;
  $("agent-fields").hidden = !agent;
  $("token").required = !agent;
  $("agent-id").required = agent;
  $("agent-key").required = agent;
  (agent ? ($("agent-id").value ? $("agent-key") : $("agent-id")) : $("token")).focus();
}

async function measureClock() {  // signatures carry a time the node accepts within 30 s of its own
  const response = await fetch("/v1/status");
  const date = Date.parse(response.headers.get("Date") || "");
  const offset = Number.isNaN(date) ? 0 : date - Date.now();
  state.clockOffsetMs = Math.abs(offset) > 2000 ? offset : 0;
}

$("login-form").addEventListener("submit", async (submitted) => {
  submitted.preventDefault();
  $("login-error").textContent = "";
  let session;
  try {
    const agent = $("kind-agent").checked;
    session = agent ? { kind: "agent", id: $("agent-id").value.trim() }
      : { kind: "admin", token: $("token").value.trim() };
    state.session = session;
    state.signer = agent ? await importAgentKey(seedOf($("agent-key").value)) : null;
    if (agent) await measureClock();
    const response = await get("/v1/cluster");
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "refused: " + response.status);
    }
  } catch (error) {
    state.session = null;
    state.signer = null;
    $("login-error").textContent = "Not accepted: " + error.message;
    return;
  }
  sessionStorage.setItem("coord-session", JSON.stringify(session));
  $("token").value = "";
  $("agent-key").value = "";
  $("login").hidden = true;
  showWho();
  start();
});

$("kind-admin").addEventListener("change", chooseKind);
$("kind-agent").addEventListener("change", chooseKind);
$("agent-key-file").addEventListener("change", async () => {
  const file = $("agent-key-file").files[0];
  if (file) $("agent-key").value = (await file.text()).slice(0, 4096);
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem("coord-session");
  location.reload();  // drops the key, the stream and every panel's data with the page
});

$("agent-filter").addEventListener("input", renderAgents);
document.addEventListener("keydown", (pressed) => {  // "/" filters the agents, unless typing somewhere
  if (pressed.key !== "/" || pressed.ctrlKey || pressed.metaKey || pressed.altKey) return;
  if (pressed.target.closest("input, textarea, select, [contenteditable]")) return;
  pressed.preventDefault();
  $("agent-filter").focus();
});

async function start() {
  showWho();
  const shown = await Promise.all(Object.keys(PANELS).map((name) => refresh(name)));
  if (!shown.every(Boolean)) return;  // needs a login: the form is shown
  if (state.following) return;
  state.following = true;
  follow();
  // Counters that move without events (indexes, loads, publish counts, backlogs): one timer.
  setInterval(() => { refresh("cluster", refreshCluster); refresh("agents"); refresh("bus"); }, 5000);
}

start();
