// The dashboard: plain JavaScript, no build step. Panels are filled from the
// node's JSON API and kept live by one Server-Sent Events stream of the
// cluster's events (/v1/watch/events), read with fetch so it can carry the
// credential. Only counters that move without events (indexes, publish
// counts, backlogs) are refreshed on one timer.
"use strict";

const state = { token: sessionStorage.getItem("coord-token"), agents: [], leaderChanges: [] };
const $ = (id) => document.getElementById(id);

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

class NeedsLogin extends Error {}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (response.status === 401 || response.status === 403) throw new NeedsLogin(path);
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
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
  const [agents, services] = await Promise.all([getJSON("/v1/agents"), getJSON("/v1/services")]);
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
    const lease = cell(row, a.lease_remaining_s === null ? "on the leader" : Math.round(a.lease_remaining_s) + " s",
                       "num");
    if (a.lease_remaining_s === null) lease.title = "Leases are kept by the leader; this node does not know the rest.";
    cell(row, a.weight, "num");
    cell(row, a.balancer ? a.balancer.inflight : null, "num");
    const breaker = a.balancer ? a.balancer.breaker.state : null;
    cell(row, breaker && breaker.replace("_", " "), breaker === "open" ? "bad" : breaker === "half_open" ? "warn" : "");
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
    const response = await fetch(`/v1/chaos/runs/${encodeURIComponent(name)}/latency.png`, { headers: headers() });
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
      const response = await fetch("/v1/watch/events" + query, { headers: headers() });
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
  if (event.type.startsWith("system.")) refreshCluster().catch(report);
  if (event.type.startsWith("agent.")) refreshAgents().catch(report);
  if (event.type.startsWith("saga.")) refreshSagas().catch(report);
}

function setLive(text) { $("live").textContent = text; }

function report(error) {
  if (error instanceof NeedsLogin) showLogin();
  else setLive("error: " + error.message);
}

// -- login ------------------------------------------------------------------------------------

function showLogin() {
  $("login").hidden = false;
  $("token").focus();
}

$("login-form").addEventListener("submit", async (submitted) => {
  submitted.preventDefault();
  state.token = $("token").value.trim();
  try {
    await getJSON("/v1/cluster");
    sessionStorage.setItem("coord-token", state.token);
    $("login").hidden = true;
    $("login-error").textContent = "";
    start();
  } catch (error) {
    $("login-error").textContent = "That token was not accepted.";
  }
});

$("agent-filter").addEventListener("input", renderAgents);

async function start() {
  try {
    await Promise.all([refreshCluster(), loadLeaderChanges(), refreshAgents(), refreshBus(), refreshSagas(),
                       refreshChaos()]);
  } catch (error) {
    report(error);
    if (error instanceof NeedsLogin) return;
  }
  if (state.following) return;
  state.following = true;
  follow();
  // Counters that move without events (indexes, publish counts, backlogs): one timer for both panels.
  setInterval(() => Promise.all([refreshCluster(), refreshBus()]).catch(report), 5000);
}

start();
