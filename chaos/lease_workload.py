"""The lease check: agents heartbeating over HTTP while the nemesis acts.

One *steady* agent heartbeats every ``every_s`` through the whole run; a few
*quitters* heartbeat the same way and stop one after another. Every renewal
(the registration, each heartbeat answered 200) and every observation that
the agent is gone (a heartbeat or a linearizable ``GET /v1/agents/{id}``
answered 404) is recorded as an event ``{"f": "renew" | "gone", "agent",
"sent", "done", "status"}`` (``time.monotonic_ns()`` of this process, the
same clock the node processes' monotonic timers run on).

``check_leases`` then requires:

- no agent is seen gone before ``ttl_s`` after its last renewal was *sent*
  (the leader started the new TTL no earlier than that): an early expiry,
  whatever the nemesis did to the clocks;
- a quitter is seen gone within ``ttl_s + bound_s`` of its last renewal's
  answer (expiry is a leader's timer plus one commit; ``bound_s`` covers
  the tick, the commit, a leader change under the other nemeses and the
  polling);
- with ``steady_must_survive`` (a nemesis that takes no node away, such as
  clock-skew), the steady agent is never gone; otherwise it may be, after
  a nemesis kept it from renewing for ``ttl_s`` (counted, not a problem).

Every loop is bounded in count and time; requests carry ``op_timeout_s``.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
from typing import Any

import aiohttp

from chaos.workload import History, make_session

POLL_S = 0.2


class LeaseWorkload:
    def __init__(self, endpoints: list[str], history: History, *, seed: int = 0, ttl_s: float = 3.0,
                 every_s: float = 0.5, quitters: int = 3, op_timeout_s: float = 2.0, bound_s: float = 4.0) -> None:
        if not 0 < every_s < ttl_s / 2:
            raise ValueError("every_s must be under half of ttl_s")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.history = history
        self.rng = random.Random(seed)
        self.ttl_s = ttl_s
        self.every_s = every_s
        self.quitters = quitters
        self.timeout = aiohttp.ClientTimeout(total=op_timeout_s)
        self.bound_s = bound_s
        self.run_id = f"{self.rng.getrandbits(32):08x}"

    async def _request(self, session: aiohttp.ClientSession, method: str, path: str, agent: str, f: str,
                       body: dict[str, Any] | None = None) -> int | None:
        """One request to a random node; records a renew (200/201) or gone (404) event."""
        url = self.rng.choice(self.endpoints) + path
        sent = time.monotonic_ns()
        try:
            async with session.request(method, url, json=body, timeout=self.timeout) as response:
                status = response.status
                await response.read()
        except (TimeoutError, aiohttp.ClientError):
            return None
        kind = "renew" if status in (200, 201) and f == "renew" else "gone" if status == 404 else None
        if kind is not None:
            self.history.add({"type": "lease", "f": kind, "agent": agent, "sent": sent,
                              "done": time.monotonic_ns(), "status": status})
        return status

    async def _register(self, session: aiohttp.ClientSession, agent: str, deadline: float) -> bool:
        body = {"id": agent, "type": "chaos-lease", "ttl_s": self.ttl_s}
        while time.monotonic() < deadline:
            if await self._request(session, "POST", "/v1/agents", agent, "renew", body) in (200, 201):
                return True
            await asyncio.sleep(0.1)
        return False

    async def _heartbeat_until(self, session: aiohttp.ClientSession, agent: str, stop_at: float) -> None:
        path = f"/v1/agents/{urllib.parse.quote(agent, safe='')}/heartbeat"
        while time.monotonic() < stop_at:
            started = time.monotonic()
            status = await self._request(session, "POST", path, agent, "renew", {})
            if status == 404:  # the check reports it; re-join so the run goes on measuring
                await self._register(session, agent, min(stop_at, time.monotonic() + 5))
            elif status != 200:
                await asyncio.sleep(0.05)  # refused (503) or no answer: try another node soon
                continue
            await asyncio.sleep(max(0.0, self.every_s - (time.monotonic() - started)))

    async def _watch_gone(self, session: aiohttp.ClientSession, agent: str, deadline: float) -> None:
        path = f"/v1/agents/{urllib.parse.quote(agent, safe='')}"
        while time.monotonic() < deadline:
            if await self._request(session, "GET", path, agent, "watch") == 404:
                return
            await asyncio.sleep(POLL_S)

    async def _steady(self, session: aiohttp.ClientSession, duration_s: float) -> None:
        stop_at = time.monotonic() + duration_s
        agent = f"chaos-steady-{self.run_id}"
        if await self._register(session, agent, stop_at):
            await self._heartbeat_until(session, agent, stop_at)

    async def _quitter(self, session: aiohttp.ClientSession, i: int, duration_s: float) -> None:
        start = time.monotonic()
        agent = f"chaos-quitter-{self.run_id}-{i}"
        stop_at = start + duration_s * (i + 1) / (self.quitters + 1)
        if not await self._register(session, agent, stop_at):
            return
        await self._heartbeat_until(session, agent, stop_at)
        self.history.add({"type": "lease", "f": "stop", "agent": agent, "sent": time.monotonic_ns()})
        await self._watch_gone(session, agent, time.monotonic() + self.ttl_s + self.bound_s + 30)

    async def run(self, duration_s: float) -> None:
        """Steady agent and quitters for ``duration_s``; the last quitter's
        expiry is watched for at most ``ttl_s + bound_s + 30`` s more."""
        self.history.add({"type": "lease", "f": "config", "ttl_s": self.ttl_s, "bound_s": self.bound_s})
        async with make_session() as session:
            await asyncio.gather(self._steady(session, duration_s),
                                 *(self._quitter(session, i, duration_s) for i in range(self.quitters)))


def check_leases(events: list[dict[str, Any]], *, steady_must_survive: bool = False) -> dict[str, Any]:
    """Judge the lease events (see the module docstring)."""
    config = next((e for e in events if e.get("type") == "lease" and e.get("f") == "config"), None)
    if config is None:
        return {"valid": None, "problems": [{"kind": "no lease workload ran"}], "agents": 0}
    ttl_ns, bound_ns = int(config["ttl_s"] * 1e9), int(config["bound_s"] * 1e9)
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("type") == "lease" and "agent" in event:
            by_agent.setdefault(event["agent"], []).append(event)
    problems: list[dict[str, Any]] = []
    renewals = 0
    expiries_s: list[float] = []
    steady_lapses = 0
    for agent, evs in sorted(by_agent.items()):
        last_renew: dict[str, Any] | None = None
        stopped = False
        seen_gone = None
        for event in sorted(evs, key=lambda e: e.get("done", e["sent"])):
            if event["f"] == "renew":
                renewals += 1
                if last_renew is None or event["sent"] > last_renew["sent"]:
                    last_renew = event
            elif event["f"] == "stop":
                stopped = True
            elif event["f"] == "gone" and last_renew is not None:
                early = last_renew["sent"] + ttl_ns - event["done"]
                if early > 0:
                    problems.append({"kind": "expired early", "agent": agent, "early_s": round(early / 1e9, 3)})
                if seen_gone is None and stopped:
                    seen_gone = event
                if not agent.startswith("chaos-quitter") and early <= 0:
                    steady_lapses += 1
                    if steady_must_survive:
                        gap = (event["sent"] - last_renew["done"]) / 1e9
                        problems.append({"kind": "steady agent expired", "agent": agent,
                                         "since_last_renewal_s": round(gap, 3)})
        if agent.startswith("chaos-quitter") and stopped and last_renew is not None:
            if seen_gone is None:
                problems.append({"kind": "never expired after it stopped", "agent": agent})
            else:
                after = (seen_gone["done"] - last_renew["done"]) / 1e9
                expiries_s.append(after)
                if seen_gone["done"] > last_renew["done"] + ttl_ns + bound_ns:
                    problems.append({"kind": "expired late", "agent": agent, "after_s": round(after, 3),
                                     "limit_s": config["ttl_s"] + config["bound_s"]})
    return {"valid": not problems, "agents": len(by_agent), "renewals": renewals, "steady_lapses": steady_lapses,
            "quitter_expiry_s": [round(x, 2) for x in expiries_s], "problems": problems[:10]}
