"""Cluster status, liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import json
import re

import pytest

from tests.coordinator.api.conftest import HTTP, NODE_ID, RAFT, Harness
from tests.waiting import eventually


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


@pytest.mark.parametrize("member_id", ["bad id", "-n4", "n4/x", ""])
async def test_a_new_member_id_must_be_a_name(h: Harness, member_id: str) -> None:
    before = h.fingerprint()
    status, body = await h.call("POST", "/v1/members", {"id": member_id, "raft": "127.0.0.1:1", "http": "127.0.0.1:2"})
    assert status == 400 and body["error"]["field"] == "id"
    assert h.fingerprint() == before


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


# -- state digest and a halted replica (issue 20, item 10) ----------------------------------------

async def test_status_and_metrics_carry_the_state_digest(h: Harness) -> None:
    await h.put("k", 1)
    _, status = await h.call("GET", "/v1/status", expect=200)
    digest = status["digest"]
    assert digest["index"] == status["applied_index"] == h.applier.digest.index
    assert digest["value"] == h.applier.digest.value.hex() and len(digest["value"]) == 64
    assert digest["points"][-1] == [digest["index"], digest["value"]]
    assert digest["check"] == {"checks": 0, "mismatches": 0, "members": {}, "agree": True}
    assert status["healthy"] is True and status["problem"] is None and status["apply_failure"] is None
    async with h.http.get("/metrics") as response:
        text = await response.text()
    assert _sample(text, "coord_state_digest_index") == digest["index"]
    assert _sample(text, "coord_replica_halted") == 0
    assert _sample(text, "coord_digest_mismatches_total") == 0


async def test_a_failing_handler_halts_the_node_which_refuses_reads_and_writes(h: Harness, monkeypatch,
                                                                                caplog) -> None:
    """A bug in a handler (anything but the state machine's refusal) must not
    be logged and skipped: the replica stops at that entry, the node says so
    in status and metrics, and answers writes and reads with 503."""
    import logging

    from coordinator.commands.kv import KvPut
    from coordinator.state import machine

    caplog.set_level(logging.CRITICAL)
    await h.put("k", 1)

    def broken(sm, ctx, cmd):  # kv.put's handler takes its typed command
        raise ZeroDivisionError(cmd.value)

    monkeypatch.setitem(machine._HANDLERS, KvPut, broken)
    index = h.applier.applied_index + 1
    status, body = await h.call("PUT", "/v1/kv/k", {"value": "payload-not-to-show"})
    assert status == 504 and body["error"]["code"] == "outcome_unknown"  # committed; this node cannot say more
    monkeypatch.undo()  # the bug is gone, but the state may be half-applied: still refused

    _, st = await h.call("GET", "/v1/status", expect=200)
    assert st["healthy"] is False
    assert st["problem"] == f"apply failed at index {index}: ZeroDivisionError"
    assert st["apply_failure"] == {"kind": "apply", "index": index, "error": "ZeroDivisionError"}
    assert st["role"] == "stopped"  # the engine left consensus
    assert {"node", "role", "leader", "term", "commit_index", "members"} <= set(st)
    assert "payload-not-to-show" not in json.dumps(st)
    for method, path, body in (("PUT", "/v1/kv/k", {"value": 2}), ("GET", "/v1/kv/k", None),
                               ("GET", "/v1/kv/k?consistency=stale", None), ("POST", "/v1/locks/l",
                                                                             {"holder": "a", "ttl_s": 5})):
        async with h.http.request(method, path, json=body) as response:
            answer = await response.json()
            assert response.status == 503, (method, path, answer)
            assert response.headers.get("Retry-After")
            assert f"apply failed at index {index}" in answer["error"]["message"]
            assert "payload-not-to-show" not in json.dumps(answer)
    async with h.http.get("/readyz") as response:
        assert response.status == 503
    async with h.http.get("/metrics") as response:
        text = await response.text()
    assert _sample(text, "coord_replica_halted") == 1
    assert _sample(text, "coord_node_healthy") == 0
    assert h.applier.applied_index == index  # nothing applied after the failed entry
    assert "payload-not-to-show" not in caplog.text
