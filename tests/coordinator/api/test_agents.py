"""Agents over HTTP: registration, listing, heartbeats kept by the leader in
memory, expiry committed exactly once, health changes and deregistration."""

from __future__ import annotations

from tests.coordinator.api.conftest import Harness
from tests.waiting import eventually


async def _terminated(h: Harness, agent_id: str) -> list[dict]:
    return [e for e in await h.events("agent.terminated") if e["data"]["agentId"] == agent_id]


async def test_register_answers_201_with_id_lease_and_ttl(h: Harness) -> None:
    status, body = await h.call("POST", "/v1/agents", {"id": "planner-1", "type": "planner", "ttl_s": 5,
                                                       "metadata": {"zone": "eu"}, "endpoint": "10.0.0.1:80",
                                                       "weight": 3})
    assert status == 201
    assert body["id"] == "planner-1"
    assert isinstance(body["lease_id"], int) and body["lease_id"] > 0
    assert body["ttl_s"] == 5

    _, agent = await h.call("GET", "/v1/agents/planner-1", expect=200)
    assert agent["type"] == "planner"
    assert agent["metadata"] == {"zone": "eu"}
    assert agent["endpoint"] == "10.0.0.1:80"
    assert agent["weight"] == 3
    assert agent["lease_id"] == body["lease_id"]
    assert agent["health"] == "unknown"
    assert agent["lease_remaining_s"] == 5

    spawned = await h.events("agent.spawned")
    assert [e["data"]["agentId"] for e in spawned] == ["planner-1"]


async def test_register_without_id_generates_one(h: Harness) -> None:
    first = await h.register("worker")
    second = await h.register("worker")
    assert first["id"].startswith("agent-") and second["id"].startswith("agent-")
    assert first["id"] != second["id"]
    assert first["ttl_s"] == 10  # the default
    _, listed = await h.call("GET", "/v1/agents", expect=200)
    assert {a["id"] for a in listed["agents"]} == {first["id"], second["id"]}


async def test_register_is_idempotent_by_request_id(h: Harness) -> None:
    first = await h.register("worker", request_id="join-1")
    again = await h.register("worker", request_id="join-1")
    assert again == first
    _, listed = await h.call("GET", "/v1/agents", expect=200)
    assert len(listed["agents"]) == 1
    assert len(await h.events("agent.spawned")) == 1


async def test_reregistering_renews_the_lease_and_emits_updated(h: Harness) -> None:
    first = await h.register("worker", id="w1", ttl_s=2)
    second = await h.register("worker", id="w1", ttl_s=4)
    assert second["lease_id"] > first["lease_id"]
    assert [e["type"] for e in await h.events("agent.*")] == ["agent.spawned", "agent.updated"]
    _, agent = await h.call("GET", "/v1/agents/w1", expect=200)
    assert agent["ttl_s"] == 4


async def test_list_filters_by_type(h: Harness) -> None:
    await h.register("planner", id="p1")
    await h.register("worker", id="w2")
    await h.register("worker", id="w1")
    _, workers = await h.call("GET", "/v1/agents?type=worker", expect=200)
    assert [a["id"] for a in workers["agents"]] == ["w1", "w2"]
    _, planners = await h.call("GET", "/v1/agents?type=planner", expect=200)
    assert [a["id"] for a in planners["agents"]] == ["p1"]
    _, none = await h.call("GET", "/v1/agents?type=critic", expect=200)
    assert none["agents"] == []
    _, everyone = await h.call("GET", "/v1/agents", expect=200)
    assert [a["id"] for a in everyone["agents"]] == ["p1", "w1", "w2"]


async def test_get_unknown_agent_is_404(h: Harness) -> None:
    status, body = await h.call("GET", "/v1/agents/ghost")
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_heartbeat_keeps_an_agent_alive_across_many_ttls(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=2)
    for _ in range(6):  # 9 s in all: four and a half TTLs
        await h.advance_and_tick(1.5)
        _, beat = await h.call("POST", "/v1/agents/w1/heartbeat", {}, expect=200)
        assert beat["id"] == "w1" and beat["ttl_s"] == 2
    _, agent = await h.call("GET", "/v1/agents/w1", expect=200)
    assert agent["lease_remaining_s"] == 2
    assert h.node.leases.expired_agents == 0
    assert await _terminated(h, "w1") == []


async def test_heartbeats_are_not_log_entries(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=2)
    before = h.fingerprint()
    for _ in range(5):
        await h.call("POST", "/v1/agents/w1/heartbeat", expect=200)
    assert h.fingerprint() == before


async def test_missed_heartbeats_expire_the_agent_exactly_once(h: Harness) -> None:
    registered = await h.register("worker", id="w1", ttl_s=2)
    await h.advance_and_tick(1.9)
    await h.call("GET", "/v1/agents/w1", expect=200)

    await h.advance_and_tick(0.2)
    await eventually(lambda: "w1" not in h.applier.machine.registry.agents, "w1 to expire")
    status, _ = await h.call("GET", "/v1/agents/w1")
    assert status == 404
    for _ in range(3):  # later ticks find nothing left to expire
        await h.advance_and_tick(5)
    terminated = await _terminated(h, "w1")
    assert len(terminated) == 1
    assert terminated[0]["data"]["reason"] == "expired"
    assert terminated[0]["data"]["lease_id"] == registered["lease_id"]
    assert h.node.leases.expired_agents == 1
    # A heartbeat after expiry: the agent must register again.
    status, body = await h.call("POST", "/v1/agents/w1/heartbeat", {})
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_heartbeat_to_unknown_agent_is_404(h: Harness) -> None:
    status, body = await h.call("POST", "/v1/agents/nobody/heartbeat", {})
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_reported_health_change_is_committed_once(h: Harness) -> None:
    await h.register("worker", id="w1")
    for _ in range(3):
        _, beat = await h.call("POST", "/v1/agents/w1/heartbeat", {"health": "unhealthy"}, expect=200)
        assert beat["health"] == "unhealthy"
    changes = await h.events("agent.health.changed")
    assert len(changes) == 1
    assert changes[0]["data"]["from"] == "unknown" and changes[0]["data"]["to"] == "unhealthy"
    _, agent = await h.call("GET", "/v1/agents/w1", expect=200)
    assert agent["health"] == "unhealthy"

    await h.call("POST", "/v1/agents/w1/heartbeat", {"health": "healthy"}, expect=200)
    changes = await h.events("agent.health.changed")
    assert [(c["data"]["from"], c["data"]["to"]) for c in changes] == [("unknown", "unhealthy"),
                                                                        ("unhealthy", "healthy")]
    # A plain heartbeat leaves health alone.
    await h.call("POST", "/v1/agents/w1/heartbeat", expect=200)
    assert len(await h.events("agent.health.changed")) == 2


async def test_deregister_terminates_with_reason_left(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=2)
    status, body = await h.call("DELETE", "/v1/agents/w1")
    assert status == 200 and body == {"id": "w1"}
    terminated = await _terminated(h, "w1")
    assert len(terminated) == 1 and terminated[0]["data"]["reason"] == "left"
    status, _ = await h.call("GET", "/v1/agents/w1")
    assert status == 404
    # Its lease is forgotten: no expiry is proposed for it later.
    await h.advance_and_tick(10)
    assert len(await _terminated(h, "w1")) == 1
    assert h.node.leases.expired_agents == 0
    status, _ = await h.call("DELETE", "/v1/agents/w1")
    assert status == 404


async def test_expired_agent_releases_its_lock_and_the_next_token_is_larger(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=2)
    _, held = await h.call("POST", "/v1/locks/job", {"holder": "w1", "ttl_s": 60}, expect=200)
    status, _ = await h.call("POST", "/v1/locks/job", {"holder": "w2", "ttl_s": 60})
    assert status == 409

    await h.advance_and_tick(2.5)  # the agent's lease runs out long before the lock's
    await eventually(lambda: "job" not in h.applier.machine.locks.locks, "the lock to be released")
    released = await h.events("lock.released")
    assert len(released) == 1
    assert released[0]["data"]["holder"] == "w1" and released[0]["data"]["reason"] == "agent expired"

    _, next_grant = await h.call("POST", "/v1/locks/job", {"holder": "w2", "ttl_s": 60}, expect=200)
    assert next_grant["fencing_token"] > held["fencing_token"]
    status, _ = await h.call("PUT", "/v1/kv/out", {"value": 1, "fence": {"lock": "job",
                                                                          "token": held["fencing_token"]}})
    assert status == 409


async def test_deregistered_agent_releases_its_lock(h: Harness) -> None:
    await h.register("worker", id="w1")
    await h.call("POST", "/v1/locks/job", {"holder": "w1", "ttl_s": 60}, expect=200)
    await h.call("DELETE", "/v1/agents/w1", expect=200)
    status, _ = await h.call("GET", "/v1/locks/job")
    assert status == 404
    released = await h.events("lock.released")
    assert released[0]["data"]["reason"] == "agent left"


async def test_agent_heartbeats_renew_the_locks_it_holds(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=10)
    _, held = await h.call("POST", "/v1/locks/job", {"holder": "w1", "ttl_s": 2}, expect=200)
    for _ in range(4):  # 6 s: three times the lock's TTL
        await h.advance_and_tick(1.5)
        await h.call("POST", "/v1/agents/w1/heartbeat", expect=200)
    _, lock = await h.call("GET", "/v1/locks/job", expect=200)
    assert lock["holder"] == "w1" and lock["fencing_token"] == held["fencing_token"]
    # Without heartbeats the lock's own TTL runs out.
    await h.advance_and_tick(2.5)
    await eventually(lambda: "job" not in h.applier.machine.locks.locks, "the lock to expire")


async def test_heartbeat_on_a_follower_without_leader_is_503(h: Harness) -> None:
    await h.register("worker", id="w1")
    h.engine.step_down()
    async with h.http.post("/v1/agents/w1/heartbeat", json={}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"]
        body = await response.json()
    assert body["error"]["code"] == "unavailable"
    # A heartbeat already forwarded once is never forwarded again.
    async with h.http.post("/v1/agents/w1/heartbeat", json={}, headers={"X-Coord-Forwarded": "1"}) as response:
        assert response.status == 503
        await response.read()


async def test_new_leader_gives_every_lease_a_fresh_ttl(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=2)
    await h.advance_and_tick(1.5)
    h.engine.step_down()
    assert not h.node.leases.active
    h.clock.advance(10)  # time passes without a leader: nobody can expire anything
    h.engine.become_leader()
    await eventually(lambda: h.node.leases.active, "the lease keeper to take over")
    await h.advance_and_tick(1.5)
    _, agent = await h.call("GET", "/v1/agents/w1", expect=200)
    assert 0 < agent["lease_remaining_s"] <= 2
    await h.advance_and_tick(1)
    await eventually(lambda: "w1" not in h.applier.machine.registry.agents, "w1 to expire")


async def test_leases_from_the_leader_on_the_leader_are_its_own(h: Harness) -> None:
    await h.register("worker", id="w1", ttl_s=30)
    _, body = await h.call("GET", "/v1/agents?leases=leader", expect=200)
    assert body["leases_from"] == "n1" and body["agents"][0]["lease_remaining_s"] == 30
    status, error = await h.call("GET", "/v1/agents?leases=somewhere")
    assert status == 400 and error["error"]["field"] == "leases"
