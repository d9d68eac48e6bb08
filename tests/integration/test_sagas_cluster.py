"""Sagas on a real three-node cluster with small test agents over HTTP: the
success path, a failure at step k with its compensations, and a leader
SIGKILL in the middle of a saga (it finishes on the new leader, and the
committed history starts and ends each attempt at most once)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from coordinator.client import CoordinatorClient
from tests.integration.http_agent import HttpAgent
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

Behaviour = Callable[[dict[str, Any]], Awaitable[web.Response]]


class TestAgent(HttpAgent):
    """Answers saga calls at /saga with whatever ``behaviour`` says, and records every call."""

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.calls: list[dict[str, Any]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/saga", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        body["header_key"] = request.headers.get("Idempotency-Key")
        self.calls.append(body)
        return await self.behaviour(body)

    def keys(self, phase: str = "action") -> list[str]:
        return [c["idempotency_key"] for c in self.calls if c["phase"] == phase]


async def _ok(body: dict[str, Any]) -> web.Response:
    return web.json_response({"done": body["step"], "by": body["idempotency_key"]})


def _steps(names: str, agent_type: str = "booking") -> list[dict[str, Any]]:
    return [{"id": name, "action": {"kind": "agent", "agent_type": agent_type, "payload": {"what": name}},
             "compensation": {"kind": "agent", "agent_type": agent_type, "path": "/saga"},
             "timeout_s": 5, "retry": {"max_attempts": 3, "backoff_s": 0.05}} for name in names]


def _check_history(saga: dict[str, Any]) -> None:
    """Each (step, phase, attempt) started at most once and ended at most once."""
    started = collections.Counter((h["step"], h["phase"], h["attempt"]) for h in saga["history"]
                                  if h["event"] == "saga.step.started")
    ended = collections.Counter((h["step"], h["phase"], h["attempt"]) for h in saga["history"]
                                if h["event"] in ("saga.step.succeeded", "saga.step.failed",
                                                  "saga.step.compensated", "saga.step.stuck"))
    assert max(started.values()) == 1, started
    assert max(ended.values()) == 1, ended
    assert set(ended) <= set(started)


async def _final(client: CoordinatorClient, saga_id: str, timeout_s: float = 40) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        saga = await client.saga(saga_id)
        return saga if saga and saga["state"] in ("completed", "compensated", "failed-stuck") else None

    return await eventually(done, f"saga {saga_id} to finish", timeout_s, interval_s=CLUSTER_POLL_S)


async def test_a_saga_runs_its_steps_in_order_across_the_cluster(make_cluster: Any) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    async with TestAgent(_ok) as agent, CoordinatorClient([cluster.url(n) for n in followers]) as client:
        await client.register("booking", agent_id="booker", endpoint=agent.endpoint, ttl_s=60)
        started = await client.start_saga(_steps("abc"), saga_id="trip-1", name="book-trip", input={"who": "ada"})
        assert started == {"id": "trip-1", "state": "running"}
        saga = await _final(client, "trip-1")
        assert saga["state"] == "completed"
        assert [s["status"] for s in saga["steps"]] == ["succeeded"] * 3
        assert saga["steps"][1]["result"] == {"done": "b", "by": "trip-1/b/action/1"}
        assert agent.keys() == ["trip-1/a/action/1", "trip-1/b/action/1", "trip-1/c/action/1"]
        assert all(c["header_key"] == c["idempotency_key"] and c["input"] == {"who": "ada"} for c in agent.calls)
        assert agent.calls[2]["results"]["a"] == {"done": "a", "by": "trip-1/a/action/1"}
        _check_history(saga)
        events = [e["type"] for e in await client.events(1, limit=10_000) if e["type"].startswith("saga.")
                  and e["data"].get("sagaId") == "trip-1"]
        assert events[0] == "saga.started" and events[-1] == "saga.completed"
        assert events.count("saga.step.succeeded") == 3


async def test_a_failure_at_step_k_compensates_the_steps_before_it_in_reverse(make_cluster: Any) -> None:
    async def fail_c(body: dict[str, Any]) -> web.Response:
        if body["step"] == "c" and body["phase"] == "action":
            return web.json_response({"error": "no rooms"}, status=422)  # a business "no": not retried
        return await _ok(body)

    cluster = make_cluster()
    async with TestAgent(fail_c) as agent, CoordinatorClient([cluster.url(n) for n in cluster.members]) as client:
        await client.register("booking", agent_id="booker", endpoint=agent.endpoint, ttl_s=60)
        await client.start_saga(_steps("abcd"), saga_id="trip-2")
        saga = await _final(client, "trip-2")
        assert saga["state"] == "compensated"
        assert "no rooms" in saga["reason"]
        assert [s["status"] for s in saga["steps"]] == ["compensated", "compensated", "failed", "abandoned"]
        assert agent.keys() == ["trip-2/a/action/1", "trip-2/b/action/1", "trip-2/c/action/1"]
        assert agent.keys("compensation") == ["trip-2/b/compensation/1", "trip-2/a/compensation/1"]
        compensations = [c for c in agent.calls if c["phase"] == "compensation"]
        assert compensations[0]["result"] == {"done": "b", "by": "trip-2/b/action/1"}  # what to undo
        _check_history(saga)


async def test_a_saga_finishes_on_the_new_leader_after_the_old_one_is_killed(make_cluster: Any) -> None:
    """Step b is in flight at the leader when it dies. The new leader commits
    saga.resumed and calls b again with the same attempt (same idempotency
    key), then runs c: nothing is lost, no attempt starts twice in the log."""
    b_arrived = asyncio.Event()
    release = asyncio.Event()

    async def hold_b(body: dict[str, Any]) -> web.Response:
        if body["step"] == "b" and body["phase"] == "action":
            b_arrived.set()
            await release.wait()
        return await _ok(body)

    cluster = make_cluster()
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    async with TestAgent(hold_b) as agent, CoordinatorClient([cluster.url(n) for n in followers]) as client:
        await client.register("booking", agent_id="booker", endpoint=agent.endpoint, ttl_s=120)
        await client.start_saga(_steps("abc"), saga_id="trip-3")
        async with asyncio.timeout(20):
            await b_arrived.wait()
        cluster.kill(leader)
        release.set()  # the old leader's call dies with it; the new leader's is answered
        new_leader = await asyncio.to_thread(cluster.wait_leader, 30, followers)
        saga = await _final(client, "trip-3", 60)
        assert saga["state"] == "completed"
        _check_history(saga)
        resumed = [h for h in saga["history"] if h["event"] == "saga.step.resumed"]
        assert [(h["step"], h["attempt"]) for h in resumed] == [("b", 1)]
        assert resumed[0]["detail"]["node"] == new_leader
        keys = agent.keys()
        assert set(keys) == {"trip-3/a/action/1", "trip-3/b/action/1", "trip-3/c/action/1"}
        assert keys.count("trip-3/b/action/1") == 2  # at-least-once: re-driven with the same key
        assert keys.count("trip-3/a/action/1") == keys.count("trip-3/c/action/1") == 1
