"""The load balancer on a real three-node cluster with small test agents over
HTTP: an agent that starts failing is taken out by its circuit breaker while
the others keep serving, and the caller sees no more failures than the
breaker's threshold (none at all when it lets the node retry); a failing
health check, run by the leader, takes an agent out on every node."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from aiohttp import web

from coordinator.client import CoordinatorClient
from tests.integration.http_agent import HttpAgent
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


class EchoAgent(HttpAgent):
    """/invoke echoes (or answers 500 once told to fail), /health answers
    200 or 503; it counts what it served."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.failing = False
        self.sick = False
        self.served: collections.Counter[str] = collections.Counter()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/invoke", self._invoke)
        app.router.add_get("/health", self._health)

    async def _invoke(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.failing:
            self.served["failed"] += 1
            return web.json_response({"error": "boom"}, status=500)
        self.served["ok"] += 1
        return web.Response(body=body, content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": not self.sick}, status=503 if self.sick else 200)



async def _agents(client: CoordinatorClient, agents: list[EchoAgent]) -> None:
    for agent in agents:
        await client.register("calc", agent_id=agent.name, endpoint=agent.endpoint, ttl_s=300)


@pytest.mark.parametrize("retries", [False, True], ids=["no-retries", "idempotent"])
async def test_a_failing_agent_is_taken_out_by_its_breaker(make_cluster: Any, retries: bool) -> None:
    cluster = make_cluster()
    node = cluster.members[0]  # breakers are per node: one node, one breaker per agent
    async with EchoAgent("a1") as a1, EchoAgent("a2") as a2, EchoAgent("a3") as a3, \
            CoordinatorClient([cluster.url(node)]) as client:
        await _agents(client, [a1, a2, a3])
        await client.request("PUT", "/v1/services/calc", {
            "strategy": "round_robin",
            "breaker": {"consecutive_failures": 3, "open_s": 600},
            "retry": {"max_attempts": 3 if retries else 1}})
        for i in range(9):
            answer = await client.invoke("calc", {"i": i})
            assert answer.status == 200
        assert a2.served["ok"] == 3
        a2.failing = True
        failures = 0
        for i in range(60):
            key = f"call-{i}" if retries else None
            answer = await client.invoke("calc", {"i": i}, idempotency_key=key)
            if answer.status != 200:
                assert answer.status == 500 and answer.agent == "a2"
                failures += 1
            else:
                assert answer.json() == {"i": i}
        assert failures == (0 if retries else 3)  # the breaker's threshold, then a2 is out
        assert a2.served["failed"] == 3  # and it got nothing after its circuit opened
        assert a1.served["ok"] + a3.served["ok"] == 6 + 60 - failures
        status = await client.status()
        assert status["balancer"]["agents"]["a2"]["breaker"]["state"] == "open"
        assert status["balancer"]["agents"]["a1"]["breaker"]["state"] == "closed"


async def test_a_failing_health_check_takes_the_agent_out_on_every_node(make_cluster: Any) -> None:
    cluster = make_cluster()
    endpoints = [cluster.url(n) for n in cluster.members]
    async with EchoAgent("h1") as h1, EchoAgent("h2") as h2, CoordinatorClient(endpoints) as client:
        await _agents(client, [h1, h2])
        await client.request("PUT", "/v1/services/calc", {
            "health_check": {"kind": "http", "path": "/health", "interval_s": 0.2, "timeout_s": 0.2,
                             "healthy_after": 1, "unhealthy_after": 2}})

        async def health_everywhere(agent_id: str, want: str) -> bool:
            for endpoint in endpoints:
                async with CoordinatorClient([endpoint]) as one:
                    agent = await one.request("GET", f"/v1/agents/{agent_id}", params={"consistency": "stale"})
                    if agent["health"] != want:
                        return False
            return True

        await eventually(lambda: health_everywhere("h2", "healthy"), "h2 to be checked healthy", 20,
                         interval_s=CLUSTER_POLL_S)
        h2.sick = True
        await eventually(lambda: health_everywhere("h2", "unhealthy"), "h2 to turn unhealthy on every node", 20,
                         interval_s=CLUSTER_POLL_S)
        before = h2.served["ok"]
        for endpoint in endpoints:  # every node follows the committed health
            async with CoordinatorClient([endpoint]) as one:
                for i in range(4):
                    assert (await one.invoke("calc", {"i": i})).agent == "h1"
        assert h2.served["ok"] == before
        changes = [e for e in await client.events(1, limit=10_000)
                   if e["type"] == "agent.health.changed" and e["data"]["agentId"] == "h2"]
        assert [e["data"]["to"] for e in changes][-1] == "unhealthy"
        assert "http check failed 2 times in a row" in changes[-1]["data"]["reason"]
        h2.sick = False
        await eventually(lambda: health_everywhere("h2", "healthy"), "h2 back in rotation", 20,
                         interval_s=CLUSTER_POLL_S)


async def test_every_nodes_view_of_an_agent_is_listed_with_scope_cluster(make_cluster: Any) -> None:
    """Breakers are per node: one node's open circuit shows in ``by_node`` of
    ``GET /v1/services?scope=cluster`` asked on another, the others' closed;
    a member that is down is listed as unreachable."""
    cluster = make_cluster()
    caller, asked, other = cluster.members
    async with EchoAgent("v1") as v1, CoordinatorClient([cluster.url(caller)]) as client, \
            CoordinatorClient([cluster.url(asked)]) as viewer:
        await _agents(client, [v1])
        await client.request("PUT", "/v1/services/calc", {"breaker": {"consecutive_failures": 2, "open_s": 600},
                                                          "retry": {"max_attempts": 1}})
        v1.failing = True
        for i in range(2):
            assert (await client.invoke("calc", {"i": i})).status == 500

        async def views() -> dict[str, Any] | None:
            listing = await viewer.request("GET", "/v1/services", params={"scope": "cluster"})
            agent = next(a for s in listing["services"] for a in s["agents"] if a["id"] == "v1")
            return agent["by_node"] if set(agent["by_node"]) == set(cluster.members) else None

        by_node = await eventually(views, "every member's view of v1", 20, interval_s=CLUSTER_POLL_S)
        assert by_node[caller]["breaker"]["state"] == "open" and by_node[caller]["requests"] == 2
        assert by_node[asked]["breaker"]["state"] == by_node[other]["breaker"]["state"] == "closed"
        assert by_node[asked]["requests"] == by_node[other]["requests"] == 0

        cluster.kill(other)
        listing = await viewer.request("GET", "/v1/services", params={"scope": "cluster"})
        assert [u["node"] for u in listing["unreachable"]] == [other]
        agent = listing["services"][0]["agents"][0]
        assert set(agent["by_node"]) == {caller, asked}
