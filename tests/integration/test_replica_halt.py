"""A node whose replica fails to apply an entry halts, answers 503 and says
why, while the other two keep serving; restarted without the fault it
replays, catches up and its state digest agrees again (issue 20, item 10).
Real node processes; the fault is the unsafe test failpoint
``COORD_UNSAFE_TEST_FAIL_APPLY_AT`` (coordinator/main.py)."""

from __future__ import annotations

import asyncio
import urllib.request

import aiohttp
import pytest

from chaos.digests import compare_digests
from coordinator.client import CoordinatorClient
from tests.waiting import CLUSTER_POLL_S, wait_until

pytestmark = pytest.mark.cluster


async def _answers(base: str) -> dict[str, int]:
    """Status codes of a write, a linearizable read and a stale read on ``base``."""
    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=8)) as session:
        async with session.put(f"{base}/v1/kv/after", json={"value": 1}) as response:
            out["write"] = response.status
            if response.status == 503:
                assert response.headers.get("Retry-After")
                assert "apply failed at index" in (await response.json())["error"]["message"]
        async with session.get(f"{base}/v1/kv/halt/00") as response:
            out["read"] = response.status
        async with session.get(f"{base}/v1/kv/halt/00?consistency=stale") as response:
            out["stale"] = response.status
    return out


def test_a_node_that_fails_to_apply_halts_and_the_others_keep_serving(make_cluster) -> None:
    cluster = make_cluster(start=False)
    cluster.start("n1")
    cluster.start("n2")
    leader = cluster.wait_leader(30, ["n1", "n2"])
    fail_at = cluster.status(leader)["commit_index"] + 15
    cluster.start("n3", env={"COORD_UNSAFE_TEST_FAIL_APPLY_AT": str(fail_at)})
    assert cluster.wait_leader(30) == leader

    async def write_all() -> None:
        async with CoordinatorClient(cluster.url(leader)) as client:
            for i in range(40):
                await client.put(f"halt/{i:02d}", i)

    asyncio.run(write_all())
    halted = wait_until(lambda: (s := cluster.status("n3")) and not s["healthy"] and s, "n3 to report the failure", 20,
                        interval_s=CLUSTER_POLL_S)
    failure = halted["apply_failure"]
    assert failure["kind"] == "apply" and failure["index"] >= fail_at and failure["error"] == "InjectedApplyFailure"
    assert halted["problem"] == f"apply failed at index {failure['index']}: InjectedApplyFailure"
    assert halted["role"] == "stopped"
    # the failpoint raises before the entry touches the state: nothing from that index on was applied
    assert halted["applied_index"] == halted["digest"]["index"] < failure["index"]
    assert {"node", "role", "leader", "term", "commit_index", "members"} <= set(halted)
    with urllib.request.urlopen(cluster.url("n3") + "/metrics", timeout=3) as response:
        metrics = response.read().decode()
    assert "coord_replica_halted 1.0" in metrics and "coord_node_healthy 0.0" in metrics
    assert "InjectedApplyFailure" in cluster.log_tail("n3", 200)

    assert asyncio.run(_answers(cluster.url("n3"))) == {"write": 503, "read": 503, "stale": 503}
    other = "n2" if leader == "n1" else "n1"
    for node in (leader, other):  # the two others still have a quorum and serve everything
        assert asyncio.run(_answers(cluster.url(node))) == {"write": 200, "read": 200, "stale": 200}
    assert cluster.wait_leader(10, ["n1", "n2"]) == leader  # n3 left the cluster; nothing changed for them
    assert cluster.status("n3")["healthy"] is False  # and it does not come back by itself

    # Restarted without the failpoint, n3 replays its journal, catches up and agrees.
    cluster.stop("n3")
    cluster.start("n3")
    commit = cluster.status(leader)["commit_index"]
    recovered = cluster.wait_caught_up("n3", commit, 30)
    assert recovered["problem"] is None and recovered["apply_failure"] is None
    verdict = wait_until(lambda: (v := compare_digests({n: cluster.status(n) for n in cluster.members}))["valid"]
                         is not None and v, "the digests to share an index", 20, interval_s=CLUSTER_POLL_S)
    assert verdict["valid"] is True, verdict
