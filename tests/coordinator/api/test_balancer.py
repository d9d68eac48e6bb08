"""Load-balanced invocation over HTTP (coordinator/api/balancer.py driving
coordinator/services/balancer/), agent updates (PATCH /v1/agents/{id}) and
``client.invoke``.

Agents are small aiohttp apps on 127.0.0.1 that record every call and answer
as the test tells them. The balancer's breakers, rate buckets and retry
budget and the health checker's due times run on the harness's manual clock,
so they move only with ``h.clock.advance``; HTTP to the agents and request
timeouts are real time. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from coordinator.client import CoordinatorClient, InvokeAnswer
from coordinator.commands.agents import AgentAlive, AgentSuspect
from coordinator.commands.balancer import DEFAULT_POLICY
from coordinator.errors import BadGateway, InvalidInput, RateLimited, RequestTimeout, Unavailable
from tests.coordinator.api.conftest import NODE_ID, Harness
from tests.waiting import DEADLINE_S, eventually

HOLD = b"hold"  # a request body that makes an agent wait for its release

# -- test agents --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    path: str
    headers: CIMultiDict[str]
    body: bytes


class Agent:
    """An agent endpoint. Invocations (any POST) are recorded and answered
    with ``status`` and a JSON body naming the agent, or by ``respond`` when
    set. A request whose body is ``HOLD``, or any request while ``slow``,
    waits for ``release`` (set by the test or the teardown), never longer than
    the deadline. ``GET /health`` answers ``health_status``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[Call] = []
        self.status = 200
        self.slow = False
        self.respond: Callable[[Call], web.Response] | None = None
        self.health_status = 200
        self.health_calls = 0
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/{path:.*}", self._invoke)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def _invoke(self, request: web.Request) -> web.Response:
        call = Call(request.path, request.headers.copy(), await request.read())
        self.calls.append(call)
        if self.slow or call.body == HOLD:
            await asyncio.wait_for(self.release.wait(), DEADLINE_S)
        if self.respond is not None:
            return self.respond(call)
        return web.json_response({"agent": self.name, "n": len(self.calls)}, status=self.status)

    async def _health(self, request: web.Request) -> web.Response:
        self.health_calls += 1
        return web.json_response({"ok": self.health_status < 300}, status=self.health_status)


StartAgent = Callable[[str], Awaitable[Agent]]


@pytest.fixture
async def start_agent() -> AsyncIterator[StartAgent]:
    agents: list[Agent] = []

    async def start(name: str) -> Agent:
        agent = Agent(name)
        await agent.server.start_server()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.release.set()  # a held handler must not stall the server's shutdown
    for agent in agents:
        await agent.server.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- helpers --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def agent(self) -> str | None:
        return self.headers.get("X-Coord-Agent")

    @property
    def attempts(self) -> int | None:
        raw = self.headers.get("X-Coord-Attempts")
        return None if raw is None else int(raw)

    @property
    def error(self) -> dict[str, Any]:
        assert self.agent is None, "an agent's answer, not the node's own error"
        return self.json()["error"]


async def add(h: Harness, agent_id: str, agent: Agent | None = None, *, agent_type: str = "worker",
              endpoint: str | None = None, **fields: Any) -> None:
    """Register ``agent_id`` with ``agent``'s endpoint (or ``endpoint``), for an hour:
    the manual clock moves in these tests and no lease must run out."""
    endpoint = endpoint or (agent.endpoint if agent is not None else None)
    if endpoint is not None:
        fields["endpoint"] = endpoint
    await h.register(agent_type, id=agent_id, ttl_s=3600, **fields)


async def configure(h: Harness, agent_type: str = "worker", **policy: Any) -> dict[str, Any]:
    _, data = await h.call("PUT", f"/v1/services/{agent_type}", policy, expect=200)
    return data


async def invoke(h: Harness, agent_type: str = "worker", data: bytes | io.BytesIO = b'{"q": 1}', *,
                 params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Reply:
    async with h.http.post(f"/v1/services/{agent_type}/invoke", data=data, params=params,
                           headers=headers) as response:
        return Reply(response.status, response.headers, await response.read())


async def answered_by(h: Harness, count: int, agent_type: str = "worker", **kwargs: Any) -> list[str | None]:
    """Who answered ``count`` invocations made one after the other (all must be 200)."""
    agents = []
    for _ in range(count):
        reply = await invoke(h, agent_type, **kwargs)
        assert reply.status == 200, (reply.status, reply.body)
        agents.append(reply.agent)
    return agents


async def service(h: Harness, agent_type: str = "worker") -> dict[str, Any]:
    _, data = await h.call("GET", f"/v1/services/{agent_type}", expect=200)
    return data


async def balancer_status(h: Harness) -> dict[str, Any]:
    _, data = await h.call("GET", "/v1/status", expect=200)
    return data["balancer"]


async def metrics(h: Harness) -> str:
    async with h.http.get("/metrics") as response:
        assert response.status == 200
        return await response.text()


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def health_of(h: Harness, agent_id: str) -> str:
    return h.applier.machine.registry.agents[agent_id].health


# -- invoke: what goes to the agent and what comes back ---------------------------------------


async def test_invoke_forwards_the_request_and_passes_the_answer_back(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    agent.respond = lambda call: web.Response(
        status=201, body=b"<done/>", content_type="application/xml",
        headers={"ETag": '"v7"', "Cache-Control": "no-store", "Retry-After": "3", "X-Private": "kept home"})
    reply = await invoke(h, data=b"<order id='1'/>", headers={
        "Content-Type": "application/xml", "X-Request-Id": "req-given", "Idempotency-Key": "ik-1",
        "X-Coord-Caller": "alice"})

    assert (reply.status, reply.body) == (201, b"<done/>")
    assert reply.headers["Content-Type"] == "application/xml"
    assert reply.headers["ETag"] == '"v7"'
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Retry-After"] == "3"
    assert "X-Private" not in reply.headers
    assert (reply.agent, reply.attempts, reply.headers["X-Request-Id"]) == ("a", 1, "req-given")

    [call] = agent.calls
    assert (call.path, call.body) == ("/invoke", b"<order id='1'/>")  # the default policy's path
    assert call.headers["Content-Type"] == "application/xml"
    assert call.headers["X-Request-Id"] == "req-given"
    assert call.headers["Idempotency-Key"] == "ik-1"
    assert call.headers["X-Coord-Caller"] == "alice"


async def test_a_request_id_is_generated_when_none_is_given(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    first, second = await invoke(h), await invoke(h)
    assert first.status == second.status == 200
    ids = [first.headers["X-Request-Id"], second.headers["X-Request-Id"]]
    assert all(i.startswith("req-") for i in ids) and ids[0] != ids[1]
    assert [c.headers["X-Request-Id"] for c in agent.calls] == ids
    assert "Idempotency-Key" not in agent.calls[0].headers and "X-Coord-Caller" not in agent.calls[0].headers
    assert first.json() == {"agent": "a", "n": 1}


async def test_the_policy_path_is_used(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    await configure(h, path="/v2/run")
    await invoke(h)
    await h.call("DELETE", "/v1/services/worker", expect=200)
    await invoke(h)
    assert [c.path for c in agent.calls] == ["/v2/run", "/invoke"]


async def test_an_agent_error_status_is_its_own_answer(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    for status in (404, 409, 422):
        agent.status = status
        reply = await invoke(h)
        assert (reply.status, reply.agent, reply.json()["agent"]) == (status, "a", "a")


# -- strategies ------------------------------------------------------------------------------------


async def test_round_robin_spreads_evenly(h: Harness, start_agent: StartAgent) -> None:
    agents = [await start_agent(name) for name in "abc"]
    for agent in agents:
        await add(h, agent.name, agent)
    assert await answered_by(h, 9) == list("abcabcabc")
    assert [len(a.calls) for a in agents] == [3, 3, 3]


async def test_weighted_round_robin_follows_weights_and_their_changes(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, strategy="weighted_round_robin")
    for name, weight in (("a", 5), ("b", 1), ("c", 1)):
        await add(h, name, await start_agent(name), weight=weight)
    assert "".join(await answered_by(h, 7)) == "aabacaa"  # smooth: spread out, not aaaaabc

    await h.call("PATCH", "/v1/agents/b", {"weight": 5}, expect=200)
    await h.call("PATCH", "/v1/agents/a", {"weight": 1}, expect=200)
    assert "".join(await answered_by(h, 7)) == "bbabcbb"
    await h.call("PATCH", "/v1/agents/c", {"weight": 3}, expect=200)
    picks = await answered_by(h, 9)
    assert {n: picks.count(n) for n in "abc"} == {"a": 1, "b": 5, "c": 3}


async def test_consistent_hash_sends_a_key_to_the_same_agent(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, strategy="consistent_hash")
    for name in "abc":
        await add(h, name, await start_agent(name))
    owners = {}
    for i in range(12):
        key = f"user-{i}"
        by_query = await answered_by(h, 2, params={"key": key})
        by_header = await answered_by(h, 1, headers={"X-Coord-Key": key})
        assert len(set(by_query + by_header)) == 1, (key, by_query, by_header)
        owners[key] = by_query[0]
    assert len(set(owners.values())) > 1  # keys are spread, not all on one agent


async def test_consistent_hash_without_a_key_is_bad_input(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, strategy="consistent_hash")
    agent = await start_agent("a")
    await add(h, "a", agent)
    reply = await invoke(h)
    assert reply.status == 400 and reply.error["field"] == "key" and "key" in reply.error["message"]
    assert agent.calls == []


async def test_least_connections_prefers_an_idle_agent(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, strategy="least_connections")
    agents = {name: await start_agent(name) for name in "ab"}
    for name, agent in agents.items():
        await add(h, name, agent)
    held = asyncio.create_task(invoke(h, data=HOLD))
    busy = await eventually(lambda: next((a for a in agents.values() if a.calls), None), "the held request to arrive")
    idle = next(a for a in agents.values() if a is not busy)
    rows = {row["id"]: row for row in (await service(h))["agents"]}
    assert (rows[busy.name]["inflight"], rows[idle.name]["inflight"]) == (1, 0)

    assert await answered_by(h, 4) == [idle.name] * 4
    busy.release.set()
    reply = await held
    assert (reply.status, reply.agent) == (200, busy.name)
    assert len(busy.calls) == 1


# -- which agents are usable ------------------------------------------------------------------------


async def test_unhealthy_agents_and_agents_without_endpoint_are_skipped(h: Harness, start_agent: StartAgent) -> None:
    agents = {name: await start_agent(name) for name in "abc"}
    for name, agent in agents.items():
        await add(h, name, agent)
    await add(h, "no-endpoint")
    await h.call("POST", "/v1/agents/a/heartbeat", {"health": "unhealthy"}, expect=200)
    assert health_of(h, "a") == "unhealthy"
    assert sorted(await answered_by(h, 4)) == ["b", "b", "c", "c"]

    for name in "bc":
        await h.call("POST", f"/v1/agents/{name}/heartbeat", {"health": "unhealthy"}, expect=200)
    reply = await invoke(h)
    assert reply.status == 503 and reply.error["code"] == "unavailable"
    assert reply.headers["Retry-After"] == "1"
    assert "worker" in reply.error["message"]
    assert [len(a.calls) for a in agents.values()] == [0, 2, 2]

    await h.call("POST", "/v1/agents/b/heartbeat", {"health": "healthy"}, expect=200)
    assert await answered_by(h, 2) == ["b", "b"]


async def test_agents_the_leader_suspects_are_skipped_until_they_recover(h: Harness, start_agent: StartAgent) -> None:
    agents = {name: await start_agent(name) for name in "ab"}
    for name, agent in agents.items():
        await add(h, name, agent)
    lease_of = {name: h.applier.machine.registry.agents[name].lease_id for name in "ab"}
    await h.node.write_command(AgentSuspect("a", lease_of["a"]))
    assert sorted(await answered_by(h, 3)) == ["b", "b", "b"]
    await h.node.write_command(AgentAlive("a", lease_of["a"]))
    assert "a" in await answered_by(h, 6)


async def test_a_type_without_agents_is_unavailable(h: Harness) -> None:
    reply = await invoke(h, "nobody")
    assert reply.status == 503 and reply.headers["Retry-After"] == "1"
    assert "nobody" in reply.error["message"]
    status = await balancer_status(h)
    assert (status["invoked"], status["unavailable"]) == (1, 1)


# -- circuit breakers ------------------------------------------------------------------------------------


async def test_a_failing_agent_is_cut_off_by_its_breaker_and_probed_back(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, breaker={"consecutive_failures": 2, "open_s": 5, "min_requests": 1000},
                    retry={"max_attempts": 1})
    bad, good = await start_agent("a"), await start_agent("b")
    await add(h, "a", bad)
    await add(h, "b", good)
    bad.status = 500

    replies = [await invoke(h) for _ in range(4)]
    assert [(r.status, r.agent) for r in replies] == [(500, "a"), (200, "b"), (500, "a"), (200, "b")]
    assert await answered_by(h, 5) == ["b"] * 5  # open: nothing more reaches a
    assert len(bad.calls) == 2

    row = (await balancer_status(h))["agents"]["a"]
    assert row["breaker"]["state"] == "open" and row["breaker"]["retry_in_s"] == 5
    assert row["breaker"]["consecutive_failures"] == 2 and row["requests"] == 2
    rows = {r["id"]: r for r in (await service(h))["agents"]}
    assert rows["a"]["breaker"]["state"] == "open" and rows["b"]["breaker"]["state"] == "closed"
    text = await metrics(h)
    assert sample(text, "coord_breaker_state", '{agent="a"}') == 2
    assert sample(text, "coord_breaker_state", '{agent="b"}') == 0

    h.clock.advance(4.9)
    assert await answered_by(h, 2) == ["b", "b"]  # still open just before open_s
    h.clock.advance(0.1)
    assert (await balancer_status(h))["agents"]["a"]["breaker"]["state"] == "half_open"
    assert sample(await metrics(h), "coord_breaker_state", '{agent="a"}') == 1
    bad.status = 200
    assert await answered_by(h, 1) == ["a"]  # the probe
    assert len(bad.calls) == 3
    assert (await balancer_status(h))["agents"]["a"]["breaker"]["state"] == "closed"
    assert sample(await metrics(h), "coord_breaker_state", '{agent="a"}') == 0
    assert await answered_by(h, 4) == ["b", "a", "b", "a"]


async def test_a_failed_probe_opens_the_breaker_again(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, breaker={"consecutive_failures": 1, "open_s": 2}, retry={"max_attempts": 1})
    bad = await start_agent("a")
    await add(h, "a", bad)
    bad.status = 500
    assert (await invoke(h)).status == 500
    h.clock.advance(2)
    probe = await invoke(h)
    assert (probe.status, probe.agent) == (500, "a")
    reply = await invoke(h)
    assert reply.status == 503 and len(bad.calls) == 2
    assert (await service(h))["agents"][0]["breaker"]["state"] == "open"


async def test_every_circuit_open_is_unavailable(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, breaker={"consecutive_failures": 1, "open_s": 5}, retry={"max_attempts": 1})
    agents = [await start_agent(name) for name in "ab"]
    for agent in agents:
        agent.status = 500
        await add(h, agent.name, agent)
    assert [(r.status, r.agent) for r in [await invoke(h), await invoke(h)]] == [(500, "a"), (500, "b")]
    h.clock.advance(2)
    reply = await invoke(h)
    assert reply.status == 503 and reply.error["code"] == "unavailable"
    assert "circuit" in reply.error["message"]
    assert reply.headers["Retry-After"] == "3"  # until the first breaker goes half-open
    assert [len(a.calls) for a in agents] == [1, 1]


# -- retries ----------------------------------------------------------------------------------------------


async def test_a_refused_connection_is_retried_on_another_agent(h: Harness, start_agent: StartAgent) -> None:
    live = await start_agent("b")
    await add(h, "a", endpoint=f"http://127.0.0.1:{closed_port()}")
    await add(h, "b", live)
    reply = await invoke(h)  # neither idempotent nor keyed: it never reached "a"
    assert (reply.status, reply.agent, reply.attempts) == (200, "b", 2)
    assert len(live.calls) == 1
    assert (await balancer_status(h))["retried"] == 1


async def test_an_unreachable_agent_alone_is_a_bad_gateway(h: Harness) -> None:
    await add(h, "a", endpoint=f"127.0.0.1:{closed_port()}")  # host:port, no scheme
    reply = await invoke(h)
    assert reply.status == 502 and reply.error["code"] == "bad_gateway"
    assert "unreachable" in reply.error["message"]


async def test_a_500_is_retried_only_when_the_request_is_idempotent(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, breaker={"consecutive_failures": 100}, retry={"backoff_s": 0, "backoff_max_s": 0})
    bad, good = await start_agent("a"), await start_agent("b")
    await add(h, "a", bad)
    await add(h, "b", good)
    bad.status = 500

    # Round robin: a, b, a, b, ... A failed attempt on a is retried on b.
    reply = await invoke(h)
    assert (reply.status, reply.agent, reply.attempts) == (500, "a", 1)
    assert reply.json() == {"agent": "a", "n": 1}  # the agent's own answer, passed through
    assert (await invoke(h)).agent == "b"

    for how in ({"headers": {"Idempotency-Key": "ik-9"}}, {"params": {"idempotent": "1"}},
                {"headers": {"X-Coord-Idempotent": "true"}}):
        reply = await invoke(h, **how)
        assert (reply.status, reply.agent, reply.attempts) == (200, "b", 2), how
    assert len(bad.calls) == 4 and len(good.calls) == 4
    assert bad.calls[1].headers["Idempotency-Key"] == good.calls[1].headers["Idempotency-Key"] == "ik-9"
    assert bad.calls[1].headers["X-Request-Id"] == good.calls[1].headers["X-Request-Id"]
    status = await balancer_status(h)
    assert (status["retried"], status["failed"], status["succeeded"]) == (3, 1, 4)


async def test_retries_stop_at_max_attempts(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, breaker={"consecutive_failures": 100}, retry={"max_attempts": 3, "backoff_s": 0,
                                                                     "backoff_max_s": 0})
    agents = [await start_agent(name) for name in "abcd"]
    for agent in agents:
        agent.status = 503
        await add(h, agent.name, agent)
    reply = await invoke(h, params={"idempotent": "yes"})
    assert (reply.status, reply.agent, reply.attempts) == (503, "c", 3)
    assert [len(a.calls) for a in agents] == [1, 1, 1, 0]


async def test_a_retry_with_nowhere_to_go_passes_the_last_answer_through(h: Harness, start_agent: StartAgent) -> None:
    """The only agent answers 500 and its breaker opens on it: the retry finds
    no agent, and the caller gets the agent's 500, not a 503 claiming nothing
    happened."""
    await configure(h, breaker={"consecutive_failures": 1}, retry={"backoff_s": 0, "backoff_max_s": 0})
    bad = await start_agent("a")
    await add(h, "a", bad)
    bad.status = 500
    reply = await invoke(h, headers={"Idempotency-Key": "k"})
    assert (reply.status, reply.agent, reply.attempts) == (500, "a", 1)
    assert len(bad.calls) == 1


async def test_the_retry_budget_stops_retries(h: Harness, start_agent: StartAgent) -> None:
    """With budget_ratio 0 only the floor of 10 retries per second is left; once
    it is spent, failures pass through until the clock refills it."""
    await configure(h, retry={"budget_ratio": 0, "backoff_s": 0, "backoff_max_s": 0},
                    breaker={"consecutive_failures": 1000, "min_requests": 1_000_000})
    bad, good = await start_agent("a"), await start_agent("b")
    await add(h, "a", bad)
    await add(h, "b", good)
    bad.status = 500
    # Each call starts on a (round robin after the retry went to b) and is retried on b.
    for _ in range(10):
        reply = await invoke(h, params={"idempotent": "1"})
        assert (reply.status, reply.agent, reply.attempts) == (200, "b", 2)
    reply = await invoke(h, params={"idempotent": "1"})
    assert (reply.status, reply.agent, reply.attempts) == (500, "a", 1)
    assert (await invoke(h, params={"idempotent": "1"})).agent == "b"  # round robin moves on

    h.clock.advance(1)
    reply = await invoke(h, params={"idempotent": "1"})
    assert (reply.status, reply.agent, reply.attempts) == (200, "b", 2)
    assert (await balancer_status(h))["retried"] == 11


async def test_a_changed_budget_ratio_takes_effect(h: Harness, start_agent: StartAgent) -> None:
    """The budget follows the policy even when the strategy stays the same."""
    fast = {"backoff_s": 0, "backoff_max_s": 0}
    await configure(h, retry={"budget_ratio": 1, **fast}, breaker={"consecutive_failures": 1000,
                                                                   "min_requests": 1_000_000})
    bad, good = await start_agent("a"), await start_agent("b")
    await add(h, "a", bad)
    await add(h, "b", good)
    bad.status = 500
    assert (await invoke(h, params={"idempotent": "1"})).attempts == 2
    await configure(h, retry={"budget_ratio": 0, **fast}, breaker={"consecutive_failures": 1000,
                                                                   "min_requests": 1_000_000})
    attempts = [(await invoke(h, params={"idempotent": "1"})).attempts for _ in range(11)]
    assert attempts == [2] * 10 + [1]


# -- timeouts -------------------------------------------------------------------------------------------------


async def test_a_slow_agent_times_out_and_is_retried_only_when_idempotent(h: Harness,
                                                                          start_agent: StartAgent) -> None:
    slow, fast = await start_agent("a"), await start_agent("b")
    await add(h, "a", slow)
    await add(h, "b", fast)
    slow.slow = True
    reply = await invoke(h, params={"timeout_s": "0.2"})
    assert reply.status == 504 and reply.error["code"] == "timeout" and "'a'" in reply.error["message"]
    assert (await invoke(h)).agent == "b"

    reply = await invoke(h, headers={"X-Coord-Timeout": "0.2", "X-Coord-Idempotent": "1"})
    assert (reply.status, reply.agent, reply.attempts) == (200, "b", 2)
    assert len(slow.calls) == 2 and len(fast.calls) == 2


async def test_the_policy_timeout_applies_when_the_caller_gives_none(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, timeout_s=0.2)
    slow = await start_agent("a")
    await add(h, "a", slow)
    slow.slow = True
    reply = await invoke(h)
    assert reply.status == 504 and reply.error["code"] == "timeout"


# -- rate limits ------------------------------------------------------------------------------------------


async def test_the_per_type_rate_limit(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, rate_limit={"per_type": {"rate": 1, "burst": 2}})
    agent = await start_agent("a")
    await add(h, "a", agent)
    assert await answered_by(h, 2, headers={"X-Coord-Caller": "alice"}) == ["a", "a"]
    for caller in ("alice", "bob"):  # the type's bucket is shared by every caller
        reply = await invoke(h, headers={"X-Coord-Caller": caller})
        assert reply.status == 429 and reply.error["code"] == "rate_limited"
        assert reply.headers["Retry-After"] == "1" and reply.error["retry_after_s"] == 1.0
    assert len(agent.calls) == 2

    h.clock.advance(1)
    assert (await invoke(h)).status == 200
    assert (await invoke(h)).status == 429
    assert (await balancer_status(h))["rate_limited"] == 3


async def test_the_per_caller_rate_limit(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, rate_limit={"per_caller": {"rate": 1, "burst": 2}})
    await add(h, "a", await start_agent("a"))
    alice = {"headers": {"X-Coord-Caller": "alice"}}
    await answered_by(h, 2, **alice)
    reply = await invoke(h, **alice)
    assert reply.status == 429 and reply.error["retry_after_s"] == 1.0 and reply.headers["Retry-After"] == "1"
    assert "alice" in reply.error["message"]
    await answered_by(h, 2, headers={"X-Coord-Caller": "bob"})  # every caller has its own bucket
    await answered_by(h, 2)  # and callers without a name share one
    assert (await invoke(h)).status == 429

    h.clock.advance(0.5)
    reply = await invoke(h, **alice)
    assert reply.status == 429 and reply.error["retry_after_s"] == 0.5
    assert reply.headers["Retry-After"] == "1"  # whole seconds, rounded up
    h.clock.advance(0.5)
    assert (await invoke(h, **alice)).status == 200
    assert (await invoke(h, **alice)).status == 429


# -- active health checks ------------------------------------------------------------------------------


async def test_http_health_checks_take_an_agent_out_and_bring_it_back(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    agent.health_status = 500
    await configure(h, health_check={"kind": "http", "interval_s": 1, "timeout_s": 0.5, "healthy_after": 2,
                                     "unhealthy_after": 2})
    checker = h.node.health

    await eventually(lambda: checker.checks == 1, "the first check")
    assert health_of(h, "a") == "unknown"  # one failure is not enough
    h.clock.advance(1)
    await eventually(lambda: health_of(h, "a") == "unhealthy", "the agent to be marked unhealthy")
    assert checker.checks == 2 and agent.health_calls == 2
    [event] = await h.events("agent.health.changed")
    assert event["data"] == {"agentId": "a", "agentType": "worker", "from": "unknown", "to": "unhealthy",
                             "reason": "http check failed 2 times in a row: HTTP 500"}
    assert (await invoke(h)).status == 503

    agent.health_status = 200
    h.clock.advance(1)
    await eventually(lambda: checker.checks == 3, "the third check")
    assert health_of(h, "a") == "unhealthy"
    h.clock.advance(1)
    await eventually(lambda: health_of(h, "a") == "healthy", "the agent to be healthy again")
    events = await h.events("agent.health.changed")
    assert events[-1]["data"]["reason"] == "http check passed 2 times in a row"
    assert (events[-1]["data"]["from"], events[-1]["data"]["to"]) == ("unhealthy", "healthy")
    assert (await invoke(h)).agent == "a"

    status = await balancer_status(h)
    assert status["health_checks"] == 4 and status["health_changes"] == 2
    assert sample(await metrics(h), "coord_health_checks_total") == 4


async def test_tcp_health_checks_notice_a_closed_port(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    await configure(h, health_check={"kind": "tcp", "interval_s": 1, "timeout_s": 0.5, "healthy_after": 1,
                                     "unhealthy_after": 2})
    checker = h.node.health
    await eventually(lambda: health_of(h, "a") == "healthy", "the first tcp check to pass")
    assert agent.health_calls == 0  # a TCP connect only, no HTTP

    await agent.server.close()
    h.clock.advance(1)
    await eventually(lambda: checker.checks == 2, "the second check")
    assert health_of(h, "a") == "healthy"
    h.clock.advance(1)
    await eventually(lambda: health_of(h, "a") == "unhealthy", "the agent to be marked unhealthy")
    event = (await h.events("agent.health.changed"))[-1]
    assert event["data"]["reason"].startswith("tcp check failed 2 times in a row: ")


# -- policies -----------------------------------------------------------------------------------------------


async def test_policies_are_configured_shown_and_removed(h: Harness, start_agent: StartAgent) -> None:
    await add(h, "a", await start_agent("a"), weight=3)
    await add(h, "b")
    data = await configure(h, strategy="least_connections", rate_limit={"per_type": {"rate": 5}},
                           retry={"max_attempts": 3})
    policy = {**DEFAULT_POLICY, "strategy": "least_connections",
              "retry": {**DEFAULT_POLICY["retry"], "max_attempts": 3},
              "rate_limit": {"per_caller": None, "per_type": {"rate": 5, "burst": 5}}}
    assert data == {"type": "worker", "policy": policy}
    await configure(h, "planner", path="/plan")
    await invoke(h)

    worker = await service(h)
    assert (worker["type"], worker["policy"], worker["configured"]) == ("worker", policy, True)
    rows = {r["id"]: r for r in worker["agents"]}
    assert set(rows) == {"a", "b"}
    assert {k: rows["a"][k] for k in ("weight", "health", "inflight", "requests")} == {
        "weight": 3, "health": "unknown", "inflight": 0, "requests": 1}
    assert rows["a"]["breaker"]["state"] == "closed" and rows["a"]["latency_ms"] is not None
    assert rows["b"] == {"id": "b", "endpoint": None, "weight": 1, "health": "unknown",
                         "breaker": {"state": "closed"}, "inflight": 0, "latency_ms": None, "requests": 0}

    _, listing = await h.call("GET", "/v1/services", expect=200)
    by_type = {s["type"]: s for s in listing["services"]}
    assert list(by_type) == ["planner", "worker"]
    assert by_type["planner"]["policy"]["path"] == "/plan" and by_type["planner"]["agents"] == []
    assert by_type["worker"] == worker

    _, removed = await h.call("DELETE", "/v1/services/worker", expect=200)
    assert removed == {"type": "worker", "policy": DEFAULT_POLICY}
    worker = await service(h)
    assert worker["policy"] == DEFAULT_POLICY and worker["configured"] is False
    status, body = await h.call("DELETE", "/v1/services/worker")
    assert status == 404 and body["error"]["code"] == "not_found"
    unknown = await service(h, "ghost")
    assert (unknown["configured"], unknown["agents"], unknown["policy"]) == (False, [], DEFAULT_POLICY)


async def test_put_takes_a_request_id_and_an_empty_body(h: Harness) -> None:
    _, first = await h.call("PUT", "/v1/services/worker", {"strategy": "round_robin", "request_id": "r-1"},
                            expect=200)
    before = h.fingerprint()
    _, again = await h.call("PUT", "/v1/services/worker", {"strategy": "round_robin", "request_id": "r-1"},
                            expect=200)
    assert again == first and h.fingerprint()[2:] == before[2:]
    async with h.http.put("/v1/services/other") as response:
        assert response.status == 200 and (await response.json())["policy"] == DEFAULT_POLICY


@pytest.mark.parametrize(("body", "field"), [
    ({"strategy": "random"}, "strategy"),
    ({"strategi": "round_robin"}, "strategi"),
    ({"breaker": {"threshold": 1}}, "breaker.threshold"),
    ({"breaker": {"consecutive_failures": 0}}, "breaker.consecutive_failures"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": "5"}, "timeout_s"),
    ({"retry": {"max_attempts": 11}}, "retry.max_attempts"),
    ({"retry": {"backoff_s": 2, "backoff_max_s": 1}}, "retry.backoff_max_s"),
    ({"health_check": {"kind": "http", "interval_s": 1, "timeout_s": 2}}, "health_check.timeout_s"),
    ({"health_check": {"kind": "icmp"}}, "health_check.kind"),
    ({"rate_limit": {"per_caller": {"rate": -1}}}, "rate_limit.per_caller.rate"),
    ({"path": "no-slash"}, "path"),
    ([1], "body"),
])
async def test_a_bad_policy_is_refused_before_anything_is_proposed(h: Harness, body: Any, field: str) -> None:
    before = h.fingerprint()
    status, data = await h.call("PUT", "/v1/services/worker", body)
    assert status == 400 and data["error"]["field"] == field, data
    assert h.fingerprint() == before
    assert h.applier.machine.policies.policies == {}


async def test_bad_type_names_are_refused(h: Harness) -> None:
    before = h.fingerprint()
    for method, path in (("PUT", "/v1/services/a%01b"), ("DELETE", "/v1/services/a%01b"),
                         ("GET", "/v1/services/a%01b"), ("POST", "/v1/services/a%01b/invoke")):
        status, data = await h.call(method, path)
        assert status == 400 and data["error"]["field"] == "type", (method, data)
    assert h.fingerprint() == before


# -- bad invoke input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({"timeout_s": "soon"}, {}, "timeout_s"),
    ({"timeout_s": "nan"}, {}, "timeout_s"),
    ({"timeout_s": "inf"}, {}, "timeout_s"),
    ({"timeout_s": "0"}, {}, "timeout_s"),
    ({"timeout_s": "0.001"}, {}, "timeout_s"),
    ({"timeout_s": "-1"}, {}, "timeout_s"),
    ({"timeout_s": "300.5"}, {}, "timeout_s"),
    ({}, {"X-Coord-Timeout": "later"}, "timeout_s"),
    ({"key": "k" * 1025}, {}, "key"),
    ({"key": "a\x01b"}, {}, "key"),
    ({"key": ""}, {}, "key"),
    ({}, {"X-Coord-Key": "k" * 1025}, "key"),
    ({}, {"Idempotency-Key": "i" * 257}, "Idempotency-Key"),
    ({}, {"X-Coord-Caller": "c" * 257}, "X-Coord-Caller"),
    ({}, {"X-Request-Id": "r" * 129}, "X-Request-Id"),
])
async def test_bad_invoke_input_is_refused_naming_the_field(h: Harness, start_agent: StartAgent,
                                                            params: dict[str, str], headers: dict[str, str],
                                                            field: str) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    reply = await invoke(h, params=params, headers=headers)
    assert reply.status == 400 and reply.error["field"] == field, reply.body
    assert agent.calls == []


async def test_timeouts_at_the_bounds_are_accepted(h: Harness, start_agent: StartAgent) -> None:
    await add(h, "a", await start_agent("a"))
    for value in ("0.01", "300", "1e1"):
        assert (await invoke(h, params={"timeout_s": value})).status == 200


async def test_a_body_over_one_mebibyte_is_too_large(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    # In a stream: aiohttp warns about large bytes bodies (and warnings are errors here).
    reply = await invoke(h, data=io.BytesIO(b"x" * ((1 << 20) + 1)))
    assert reply.status == 413 and reply.error["code"] == "too_large"
    assert (await invoke(h, data=io.BytesIO(b"x" * (1 << 20)))).status == 200
    assert len(agent.calls) == 1 and len(agent.calls[0].body) == 1 << 20


# -- PATCH /v1/agents/{id} -------------------------------------------------------------------------------


async def test_patch_changes_weight_endpoint_and_metadata_and_keeps_the_lease(h: Harness,
                                                                              start_agent: StartAgent) -> None:
    old, new = await start_agent("old"), await start_agent("new")
    await add(h, "a", old, metadata={"zone": "a"})
    _, before = await h.call("GET", "/v1/agents/a", expect=200)
    await invoke(h)

    _, patched = await h.call("PATCH", "/v1/agents/a", {"weight": 4}, expect=200)
    assert patched["weight"] == 4 and patched["lease_id"] == before["lease_id"]
    _, patched = await h.call("PATCH", "/v1/agents/a", {"endpoint": new.endpoint, "metadata": {"zone": "b"}},
                              expect=200)
    _, after = await h.call("GET", "/v1/agents/a", expect=200)
    assert after == {**before, "weight": 4, "endpoint": new.endpoint, "metadata": {"zone": "b"},
                     "lease_remaining_s": after["lease_remaining_s"]}
    assert patched == {k: v for k, v in after.items() if k != "lease_remaining_s"}
    await invoke(h)
    assert (len(old.calls), len(new.calls)) == (1, 1)  # invocations follow the new endpoint

    updates = [e for e in await h.events("agent.*") if e["type"] == "agent.updated"]
    assert [e["data"]["weight"] for e in updates] == [4, 4]
    assert updates[-1]["data"]["metadata"] == {"zone": "b"}
    assert all(e["data"]["lease_id"] == before["lease_id"] for e in updates)


@pytest.mark.parametrize(("body", "status", "field"), [
    ({}, 400, "body"),
    (None, 400, "body"),
    ({"weight": None}, 400, "body"),
    ({"weight": 0}, 400, "weight"),
    ({"weight": 1_000_001}, 400, "weight"),
    ({"weight": "2"}, 400, "weight"),
    ({"endpoint": ""}, 400, "endpoint"),
    ({"metadata": [1]}, 400, "metadata"),
    ({"ttl_s": 5}, 400, "ttl_s"),
])
async def test_bad_patches_change_nothing(h: Harness, body: Any, status: int, field: str) -> None:
    await add(h, "a", endpoint="h:1")
    before = h.fingerprint()
    got, data = await h.call("PATCH", "/v1/agents/a", body)
    assert (got, data["error"]["field"]) == (status, field), data
    assert h.fingerprint() == before


async def test_patching_an_unknown_agent_is_not_found(h: Harness) -> None:
    status, data = await h.call("PATCH", "/v1/agents/ghost", {"weight": 2})
    assert status == 404 and data["error"]["code"] == "not_found" and "ghost" in data["error"]["message"]


# -- status and metrics ------------------------------------------------------------------------------------


async def test_status_and_metrics_count_invocations(h: Harness, start_agent: StartAgent) -> None:
    await configure(h, breaker={"consecutive_failures": 100}, retry={"backoff_s": 0, "backoff_max_s": 0},
                    rate_limit={"per_caller": {"rate": 1, "burst": 1}})
    bad, good = await start_agent("a"), await start_agent("b")
    await add(h, "a", bad)
    await add(h, "b", good)
    bad.status = 500
    await invoke(h, headers={"X-Coord-Caller": "1"})  # a: 500, not retried
    await invoke(h, headers={"X-Coord-Caller": "2"})  # b
    await invoke(h, headers={"X-Coord-Caller": "3", "Idempotency-Key": "k"})  # a, then b
    await invoke(h, headers={"X-Coord-Caller": "3"})  # rate limited
    await invoke(h, "nobody")
    status = await balancer_status(h)
    counts = {k: status[k] for k in ("invoked", "succeeded", "failed", "retried", "rate_limited", "unavailable")}
    assert counts == {"invoked": 4, "succeeded": 2, "failed": 1, "retried": 1, "rate_limited": 1, "unavailable": 1}
    assert {a: row["requests"] for a, row in status["agents"].items()} == {"a": 2, "b": 2}
    text = await metrics(h)
    for outcome, count in counts.items():
        assert sample(text, "coord_invocations_total", f'{{outcome="{outcome}"}}') == count


# -- client.invoke ------------------------------------------------------------------------------------------


async def test_client_invoke_returns_the_agents_answer(h: Harness, start_agent: StartAgent,
                                                       client: CoordinatorClient) -> None:
    agent = await start_agent("a")
    await add(h, "a", agent)
    answer = await client.invoke("worker", {"task": 1}, idempotency_key="ik", caller="me", request_id="rid-1")
    assert isinstance(answer, InvokeAnswer)
    assert (answer.status, answer.agent, answer.attempts) == (200, "a", 1)
    assert answer.json() == {"agent": "a", "n": 1}
    assert answer.headers["X-Request-Id"] == "rid-1"
    [call] = agent.calls
    assert json.loads(call.body) == {"task": 1} and call.headers["Content-Type"] == "application/json"
    assert (call.headers["Idempotency-Key"], call.headers["X-Coord-Caller"]) == ("ik", "me")

    agent.status = 404
    answer = await client.invoke("worker", data=b"raw", content_type="text/plain")
    assert (answer.status, answer.agent) == (404, "a")  # the agent's own 404 is an answer, not an error
    assert (agent.calls[-1].body, agent.calls[-1].headers["Content-Type"]) == (b"raw", "text/plain")


async def test_client_invoke_raises_the_nodes_refusals(h: Harness, start_agent: StartAgent,
                                                       client: CoordinatorClient) -> None:
    with pytest.raises(Unavailable):
        await client.invoke("nobody", {})
    with pytest.raises(InvalidInput) as invalid:
        await client.invoke("nobody", {}, timeout_s=0)
    assert invalid.value.field == "timeout_s"

    await configure(h, "hashed", strategy="consistent_hash")
    await add(h, "h1", await start_agent("h1"), agent_type="hashed")
    with pytest.raises(InvalidInput) as invalid:
        await client.invoke("hashed", {})
    assert invalid.value.field == "key"
    assert (await client.invoke("hashed", {}, key="user-1")).agent == "h1"

    await configure(h, "limited", rate_limit={"per_type": {"rate": 1, "burst": 1}})
    await add(h, "l1", await start_agent("l1"), agent_type="limited")
    assert (await client.invoke("limited", {})).status == 200
    with pytest.raises(RateLimited) as limited:
        await client.invoke("limited", {})
    assert limited.value.retry_after_s == 1.0

    slow = await start_agent("s1")
    slow.slow = True
    await add(h, "s1", slow, agent_type="slow")
    with pytest.raises(RequestTimeout):
        await client.invoke("slow", {}, timeout_s=0.2)

    await add(h, "d1", agent_type="dead", endpoint=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BadGateway):
        await client.invoke("dead", {})


async def test_scope_cluster_lists_every_members_view(h: Harness, start_agent: StartAgent) -> None:
    await add(h, "a", await start_agent("a"))
    await invoke(h)
    _, local = await h.call("GET", "/v1/services", expect=200)
    _, cluster = await h.call("GET", "/v1/services?scope=cluster", expect=200)
    row = local["services"][0]["agents"][0]
    assert cluster["services"][0]["agents"][0]["by_node"] == {
        NODE_ID: {k: row[k] for k in ("breaker", "inflight", "latency_ms", "requests")}}
    assert cluster["unreachable"] == [] and "by_node" not in row


async def test_an_unknown_scope_is_400_naming_it(h: Harness) -> None:
    status, body = await h.call("GET", "/v1/services?scope=everywhere")
    assert status == 400 and body["error"]["field"] == "scope"
