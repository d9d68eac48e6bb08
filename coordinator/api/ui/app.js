// The dashboard: plain JavaScript, no build step. Panels are filled from the
// node's JSON API and kept live by one Server-Sent Events stream of the
// cluster's events (/v1/watch/events), read with fetch so it can carry the
// credential. Only the cluster panel's counters are refreshed on a timer
// (commit and applied indexes move without events).
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
  state.agents = (await getJSON("/v1/agents")).agents;
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
    cell(row, a.endpoint);
    body.appendChild(row);
  }
  const total = state.agents.length;
  $("agent-count").textContent = (shown.length === total ? String(total) : `${shown.length} of ${total}`)
    + (total === 1 ? " agent" : " agents");
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
    await Promise.all([refreshCluster(), loadLeaderChanges(), refreshAgents()]);
  } catch (error) {
    report(error);
    if (error instanceof NeedsLogin) return;
  }
  if (state.following) return;
  state.following = true;
  follow();
  setInterval(() => refreshCluster().catch(report), 5000);
}

start();
