"""A leader cut off from its followers stops renewing leases from memory
once no majority has answered it within the minimum election timeout, well
before pysyncobj's ``leader_fallback_s`` (2 s) makes it step down, while a
new leader takes over on the other side (issue 20, item 9)."""

from __future__ import annotations

import asyncio
import time
import urllib.parse

import aiohttp
import pytest

from coordinator.client import CoordinatorClient
from tests.integration.conftest import isolate, proxied_cluster
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster

ELECTION_MIN_S = 0.5  # NodeConfig.election_timeout_min_s, the engine's quorum_lease_s
SLACK_S = 0.5  # one heartbeat period, the tick, a loaded machine's scheduling
HEARTBEAT_EVERY_S = 0.05
WATCH_S = 1.8  # under leader_fallback_s: the old code still answers heartbeats from memory here


async def test_an_isolated_leader_refuses_heartbeats_after_the_election_timeout(make_cluster) -> None:
    async with proxied_cluster(make_cluster) as (cluster, proxy):
        old = await asyncio.to_thread(cluster.wait_leader, 30)
        async with CoordinatorClient(cluster.url(old)) as client:
            await client.register("worker", agent_id="w-q", ttl_s=1.0)
            assert await client.acquire("jobs/q", "w-q", ttl_s=5.0) is not None
        base = cluster.url(old)
        beat = f"{base}/v1/agents/w-q/heartbeat"
        answers: list[tuple[float, int, str | None]] = []  # (sent after the cut, status, Retry-After)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            async with session.post(beat, json={}) as response:
                assert response.status == 200, await response.text()

            isolate(cluster, proxy, old)
            cut = time.monotonic()
            lock_remaining = None
            while (sent := time.monotonic() - cut) < WATCH_S:
                try:
                    async with session.post(beat, json={}) as response:
                        answers.append((sent, response.status, response.headers.get("Retry-After")))
                except (TimeoutError, aiohttp.ClientError):
                    answers.append((sent, 0, None))
                if lock_remaining is None and sent > ELECTION_MIN_S + SLACK_S + 0.2:
                    # heartbeats renew the agent's locks too: the lock's lease, as the old
                    # leader keeps it in memory, must not have moved since the cut either
                    url = f"{base}/v1/locks/{urllib.parse.quote('jobs/q', safe='')}?consistency=stale"
                    async with session.get(url) as response:
                        body = await response.json()
                    lock_remaining = (sent, body.get("lease_remaining_s"))
                await asyncio.sleep(HEARTBEAT_EVERY_S)

            late_ok = [a for a in answers if a[1] == 200 and a[0] > ELECTION_MIN_S + SLACK_S]
            assert not late_ok, (f"the cut-off leader renewed leases from memory {late_ok[-1][0]:.2f}s after "
                                 f"the cut: {answers}")
            refused = [a for a in answers if a[1] != 200]
            assert refused and refused[0][1] == 503 and refused[0][2] is not None, answers
            assert lock_remaining is not None
            at, remaining = lock_remaining
            # None: the old leader stepped down and forgot its leases, which renews nothing either
            assert remaining is None or remaining < 5.0 - (at - ELECTION_MIN_S - SLACK_S) + 0.1, lock_remaining

            # a lock refresh (acquire again by its holder) goes through the log: no majority, no 200
            try:
                url = f"{base}/v1/locks/{urllib.parse.quote('jobs/q', safe='')}"
                async with session.post(url, json={"holder": "w-q", "ttl_s": 5.0},
                                        timeout=aiohttp.ClientTimeout(total=3.0)) as response:
                    assert response.status != 200, await response.text()
            except (TimeoutError, aiohttp.ClientError):
                pass

        majority = [n for n in cluster.members if n != old]
        new = await asyncio.to_thread(cluster.wait_leader, 30, majority)
        assert new != old
        # the new leader counted the TTL from its own takeover and expired the agent
        # that only the old leader heard from: the renewals above would have been lies
        async with CoordinatorClient(cluster.url(new)) as client:
            async def expired() -> bool:
                return all(a["id"] != "w-q" for a in await client.agents("worker"))

            await eventually(expired, "the new leader to expire the agent", 15, interval_s=CLUSTER_POLL_S)
