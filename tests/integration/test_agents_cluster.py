"""Agents, leases and locks on a real three-node cluster."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.client import CoordinatorClient
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


async def _events_of(client: CoordinatorClient, agent_id: str, kind: str) -> list[dict]:
    events = await client.events(1, limit=10_000)
    return [e for e in events if e["type"] == kind and e["data"].get("agentId") == agent_id]


async def test_expiry_after_ttl_emits_terminated_once_and_frees_its_lock(make_cluster) -> None:
    cluster = make_cluster()
    endpoints = [cluster.url(n) for n in cluster.members]
    async with CoordinatorClient(endpoints) as client:
        agent = await client.register("worker", agent_id="w-1", ttl_s=1.0)
        token = await client.acquire("jobs/leader", "w-1", ttl_s=60)
        assert token is not None
        assert await client.acquire("jobs/leader", "someone-else") is None  # held

        async def terminated():
            return await _events_of(client, "w-1", "agent.terminated")

        events = await eventually(terminated, "agent.terminated for w-1", 10, interval_s=CLUSTER_POLL_S)
        assert events[0]["data"]["reason"] == "expired"
        assert events[0]["data"]["lease_id"] == agent.lease_id
        assert await client.agents("worker") == []
        released = [e for e in await client.events(1, limit=10_000)
                    if e["type"] == "lock.released" and e["data"]["name"] == "jobs/leader"]
        assert released and released[0]["data"]["holder"] == "w-1"

        next_token = await client.acquire("jobs/leader", "w-2")
        assert next_token is not None and next_token > token
        # the stale holder's fenced write is refused and changes nothing
        assert await client.put("jobs/state", "by-w-2", fence={"lock": "jobs/leader", "token": next_token})
        with pytest.raises(Exception) as refused:
            await client.put("jobs/state", "by-w-1", fence={"lock": "jobs/leader", "token": token})
        assert getattr(refused.value, "code", "") == "conflict"
        assert (await client.get("jobs/state"))["value"] == "by-w-2"
        await asyncio.sleep(0)
        # still exactly once, on every node
    for node_id in cluster.members:
        async with CoordinatorClient(cluster.url(node_id)) as one:
            assert len(await _events_of(one, "w-1", "agent.terminated")) == 1


async def test_heartbeats_keep_an_agent_alive_across_a_leader_failover(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    async with CoordinatorClient([cluster.url(n) for n in followers]) as client:
        async with client.agent("worker", agent_id="steady", ttl_s=2.0) as registration:
            started = time.monotonic()
            cluster.kill(leader)
            await asyncio.to_thread(cluster.wait_leader, 30, followers)
            # live through several TTLs after the failover
            while time.monotonic() - started < 3 * registration.ttl_s:
                await asyncio.sleep(0.2)
            assert [a["id"] for a in await client.agents("worker")] == ["steady"]
            assert await _events_of(client, "steady", "agent.terminated") == []
        # leaving is a deregistration, reason "left"
        events = await _events_of(client, "steady", "agent.terminated")
        assert [e["data"]["reason"] for e in events] == ["left"]


async def test_a_follower_shows_the_leaders_leases_when_asked(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)
    async with CoordinatorClient([cluster.url(leader)]) as client, \
            CoordinatorClient([cluster.url(follower)]) as there:
        await client.register("worker", agent_id="w-lease", ttl_s=120)
        local = await there.request("GET", "/v1/agents")
        assert [a["lease_remaining_s"] for a in local["agents"]] == [None]  # leases live on the leader
        asked = await there.request("GET", "/v1/agents", params={"leases": "leader"})
        assert asked["leases_from"] == leader
        assert 100 < asked["agents"][0]["lease_remaining_s"] <= 120
        cluster.kill(leader)  # the listing still answers: without leases while no leader answers
        alone = await there.request("GET", "/v1/agents", params={"leases": "leader", "consistency": "stale"})
        assert alone["leases_from"] != leader
        if alone["leases_from"] is None:
            assert alone["agents"][0]["lease_remaining_s"] is None
