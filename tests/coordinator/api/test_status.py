"""Cluster status, liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import re

from tests.coordinator.api.conftest import HTTP, NODE_ID, RAFT, Harness, eventually


async def test_status_has_the_contract_fields(h: Harness) -> None:
    await h.put("k", 1)
    _, status = await h.call("GET", "/v1/status", expect=200)
    assert {"node", "role", "leader", "term", "commit_index", "members"} <= set(status)
    assert status["node"] == NODE_ID
    assert status["role"] == "leader"
    assert status["leader"] == HTTP  # the leader's HTTP address, not its Raft address
    assert status["term"] == 1
    assert status["commit_index"] == len(h.engine.log)
    assert status["applied_index"] == status["commit_index"]
    assert status["members"] == [{"id": NODE_ID, "raft": RAFT, "http": HTTP, "leader": True, "connected": True}]
    assert status["leases_active"] is True


async def test_status_commit_index_follows_writes(h: Harness) -> None:
    _, before = await h.call("GET", "/v1/status", expect=200)
    await h.put("k", 1)
    await h.put("k", 2)
    _, after = await h.call("GET", "/v1/status", expect=200)
    assert after["commit_index"] == before["commit_index"] + 2


async def test_status_on_a_follower_without_leader(h: Harness) -> None:
    h.engine.step_down()
    _, status = await h.call("GET", "/v1/status", expect=200)
    assert status["role"] == "follower"
    assert status["leader"] is None
    assert status["leases_active"] is False


async def test_members_list(h: Harness) -> None:
    _, body = await h.call("GET", "/v1/members", expect=200)
    assert [m["id"] for m in body["members"]] == [NODE_ID]


async def test_healthz(h: Harness) -> None:
    _, body = await h.call("GET", "/healthz", expect=200)
    assert body["status"] == "alive" and body["node"] == NODE_ID
    h.engine.step_down()
    await h.call("GET", "/healthz", expect=200)  # alive even without a leader


async def test_readyz_follows_the_engine(h: Harness) -> None:
    _, body = await h.call("GET", "/readyz", expect=200)
    assert body["status"] == "ready"

    # Readiness reads the engine's status: no known leader is "not ready".
    h.engine.step_down()
    async with h.http.get("/readyz") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        body = await response.json()
    assert body["status"] == "not ready" and "leader" in body["reason"]

    h.engine.become_leader()
    await h.call("GET", "/readyz", expect=200)


async def test_readyz_trusts_the_engine_while_it_claims_leadership(h: Harness) -> None:
    """``SimEngine.no_leader`` refuses submits but its status still names a
    leader, and readiness looks only at that status, so the node stays
    "ready" while writes answer 503. A real engine reports the lost leader
    (pysyncobj after its leader fallback timeout); then /readyz is 503 as the
    test above shows."""
    h.engine.no_leader = True
    await h.call("GET", "/readyz", expect=200)
    status, _ = await h.call("PUT", "/v1/kv/k", {"value": 1})
    assert status == 503


def _sample(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


async def test_metrics(h: Harness) -> None:
    await h.put("k", 1)
    await h.call("GET", "/v1/kv/missing")
    async with h.http.get("/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    assert _sample(text, "coord_raft_term") == 1
    assert _sample(text, "coord_raft_is_leader") == 1
    assert _sample(text, "coord_raft_commit_index") == len(h.engine.log)
    assert _sample(text, "coord_kv_keys") == 1
    assert _sample(text, "coord_read_barriers_total") == h.node.reads.barriers
    assert 'coord_http_request_seconds_bucket{' in text
    assert _sample(text, "coord_http_request_seconds_count",
                   '{method="PUT",route="/v1/kv/{key}",status="200"}') == 1
    assert _sample(text, "coord_http_errors_total", '{code="404"}') == 1
    assert _sample(text, "coord_proposals_total", '{outcome="committed"}') >= 2


async def test_metrics_carry_an_engines_own_counts(h: Harness, monkeypatch) -> None:
    async with h.http.get("/metrics") as response:
        assert "coord_engine_events" not in await response.text()  # the simulated engine counts nothing
    monkeypatch.setattr(h.engine, "event_counts", lambda: {"dropped_bad_signature": 3, "node_frames_received": 7},
                        raising=False)
    async with h.http.get("/metrics") as response:
        text = await response.text()
    assert _sample(text, "coord_engine_events_total", '{event="dropped_bad_signature"}') == 3
    assert _sample(text, "coord_engine_events_total", '{event="node_frames_received"}') == 7


async def test_metrics_count_expired_leases(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=1)
    await h.advance_and_tick(2)
    await eventually(lambda: h.node.leases.expired_agents == 1, "the agent to expire")
    async with h.http.get("/metrics") as response:
        text = await response.text()
    assert _sample(text, "coord_leases_expired_total", '{kind="agent"}') == 1
    assert _sample(text, "coord_agents") == 0


async def test_unsafe_stale_reads_skip_the_barrier_and_say_so(make_harness) -> None:
    h = await make_harness(unsafe_stale_reads=True)
    await h.put("k", 1)
    barriers = h.node.reads.barriers
    assert (await h.get("k"))["value"] == 1
    assert h.node.reads.barriers == barriers  # no barrier: local state, possibly stale
    _, status = await h.call("GET", "/v1/status", expect=200)
    assert status["unsafe_stale_reads"] is True
