"""LeaseKeeper: leases in the leader's memory, expiry committed by lease id."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.errors import NotFound
from coordinator.services.leases import NotLeader
from tests.coordinator.services.conftest import Sim
from tests.waiting import eventually


async def _register(sim: Sim, agent_id: str, ttl_ms: int = 2000) -> int:
    result = await sim.propose("agent.register", {"id": agent_id, "type": "w", "ttl_ms": ttl_ms})
    assert result.ok
    return result.value["lease_id"]


async def _tick_and_settle(sim: Sim) -> None:
    sim.node.leases.tick()
    await eventually(lambda: not sim.node.leases._expiring, "expiry proposals to finish")


async def test_heartbeat_renews_and_reports(sim: Sim) -> None:
    lease_id = await _register(sim, "w1")
    sim.clock.advance(1.5)
    assert sim.node.leases.remaining_s("agent", "w1") == pytest.approx(0.5)
    answer = sim.node.leases.heartbeat("w1")
    assert answer == {"id": "w1", "lease_id": lease_id, "ttl_s": 2.0, "health": "unknown"}
    assert sim.node.leases.remaining_s("agent", "w1") == 2.0
    assert sim.node.leases.remaining_s("agent", "nobody") is None
    with pytest.raises(NotFound):
        sim.node.leases.heartbeat("nobody")


async def test_expiry_is_proposed_once_per_lapse(sim: Sim) -> None:
    await _register(sim, "w1")
    sim.clock.advance(2)
    sim.node.leases.tick()
    sim.node.leases.tick()  # a second tick while the first expiry is in flight proposes nothing
    await eventually(lambda: not sim.node.leases._expiring, "the expiry to finish")
    assert sim.ops().count("agent.expire") == 1
    assert "w1" not in sim.applier.machine.registry.agents
    await _tick_and_settle(sim)
    assert sim.ops().count("agent.expire") == 1
    assert sim.node.leases.expired_agents == 1


async def test_expiry_decided_before_a_reregistration_spares_the_new_lease(sim: Sim) -> None:
    old_lease = await _register(sim, "w1")
    sim.engine.hold = True
    # The agent re-registers; that command is ordered before the expiry below.
    rejoin = asyncio.create_task(sim.propose("agent.register", {"id": "w1", "type": "w", "ttl_ms": 2000}))
    await eventually(lambda: sim.node.proposer.inflight == 1, "the re-registration to be proposed")
    sim.clock.advance(2.5)
    sim.node.leases.tick()  # decides, from the old lease, that w1 expired
    await eventually(lambda: sim.node.proposer.inflight == 2, "the expiry to be proposed")
    sim.engine.release()
    new_lease = (await rejoin).value["lease_id"]
    await eventually(lambda: not sim.node.leases._expiring, "the expiry to finish")
    assert new_lease > old_lease
    agent = sim.applier.machine.registry.agents.get("w1")
    assert agent is not None and agent.lease_id == new_lease
    assert sim.node.leases.expired_agents == 0
    # The keeper still tracks the new lease and expires it in its own time.
    assert sim.node.leases.remaining_s("agent", "w1") == 2.0
    sim.clock.advance(2)
    await _tick_and_settle(sim)
    assert "w1" not in sim.applier.machine.registry.agents


async def test_lock_expiry_names_the_grant(sim: Sim) -> None:
    grant = await sim.propose("lock.acquire", {"name": "l", "holder": "a", "ttl_ms": 1000})
    sim.clock.advance(1)
    await _tick_and_settle(sim)
    assert "l" not in sim.applier.machine.locks.locks
    assert sim.node.leases.expired_locks == 1
    assert sim.node.leases.remaining_s("lock", "l") is None
    # An expiry naming an old grant does nothing to a newer one.
    await sim.propose("lock.acquire", {"name": "l", "holder": "b", "ttl_ms": 1000})
    stale = await sim.propose("lock.expire", {"name": "l", "token": grant.value["fencing_token"]})
    assert stale.value == {"expired": False}
    assert sim.applier.machine.locks.locks["l"].holder == "b"


async def test_follower_keeps_no_leases(sim: Sim) -> None:
    await _register(sim, "w1")
    sim.engine.step_down()
    assert not sim.node.leases.active
    with pytest.raises(NotLeader):
        sim.node.leases.heartbeat("w1")
    sim.clock.advance(100)
    sim.node.leases.tick()
    assert not sim.node.leases._expiring
    assert "w1" in sim.applier.machine.registry.agents


async def test_new_leader_commits_a_barrier_then_refreshes_every_lease(sim: Sim) -> None:
    await _register(sim, "w1", ttl_ms=2000)
    await sim.propose("lock.acquire", {"name": "l", "holder": "a", "ttl_ms": 3000})
    sim.engine.step_down()
    sim.clock.advance(50)
    barriers = sim.ops().count("barrier")
    sim.engine.become_leader()
    await eventually(lambda: sim.node.leases.active, "the take-over")
    assert sim.ops().count("barrier") == barriers + 1
    assert sim.node.leases.remaining_s("agent", "w1") == 2.0
    assert sim.node.leases.remaining_s("lock", "l") == 3.0
    await _tick_and_settle(sim)
    assert "w1" in sim.applier.machine.registry.agents


async def test_take_over_retries_the_barrier_until_it_commits(sim: Sim) -> None:
    sim.engine.step_down()
    sim.engine.no_leader = True
    sim.engine.become_leader()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not sim.node.leases.active
    sim.engine.no_leader = False
    await eventually(lambda: sim.node.leases.active, "the take-over after the barrier commits")


async def test_restore_refreshes_leases_from_the_snapshot(sim: Sim) -> None:
    await _register(sim, "w1")
    blob = sim.applier.snapshot()
    await sim.propose("agent.deregister", {"id": "w1"})
    assert sim.node.leases.remaining_s("agent", "w1") is None
    sim.applier.restore(blob)
    assert sim.node.leases.remaining_s("agent", "w1") == 2.0


async def test_a_leader_cut_off_from_its_quorum_renews_nothing(sim: Sim) -> None:
    """A leader whose quorum has not answered within the engine's
    ``quorum_lease_s`` may already have been replaced: it refuses heartbeats
    (503 with Retry-After over HTTP) and moves no agent or lock deadline."""
    from coordinator.errors import Unavailable

    await _register(sim, "w1")
    assert (await sim.propose("lock.acquire", {"name": "l", "holder": "w1", "ttl_ms": 2000})).ok
    sim.clock.advance(1.0)
    sim.engine.quorum_age_s = 0.6  # just past quorum_lease_s = 0.5
    with pytest.raises(Unavailable) as refused:
        sim.node.leases.heartbeat("w1")
    assert refused.value.retry_after_s > 0
    assert sim.node.leases.remaining_s("agent", "w1") == pytest.approx(1.0)
    assert sim.node.leases.remaining_s("lock", "l") == pytest.approx(1.0)
    assert sim.node.leases.refused_heartbeats == 1
    sim.engine.quorum_age_s = 0.1  # heard from a majority again
    sim.node.leases.heartbeat("w1")
    assert sim.node.leases.remaining_s("agent", "w1") == 2.0
    assert sim.node.leases.remaining_s("lock", "l") == 2.0


async def test_a_tick_looks_only_at_what_is_due_and_the_heap_keeps_one_entry_per_lease(sim: Sim) -> None:
    """Heartbeats move deadlines without touching the heap; an entry that comes
    up for a renewed lease goes back at the new deadline; only the lapsed
    lease is expired, at its own deadline and not before."""
    for agent_id in ("w1", "w2", "w3"):
        await _register(sim, agent_id, ttl_ms=2000)
    await _register(sim, "w1", ttl_ms=2000)  # a re-registration: a new lease, the old entry is dropped
    leases = sim.node.leases
    for _ in range(50):  # w1 and w2 keep heartbeating, w3 goes quiet
        sim.clock.advance(0.1)
        leases.heartbeat("w1")
        leases.heartbeat("w2")
        leases.tick()
    assert len(leases._due) <= 4
    assert "w3" not in sim.applier.machine.registry.agents or leases._expiring
    await eventually(lambda: not leases._expiring, "the expiry to finish")
    assert sim.ops().count("agent.expire") == 1
    assert set(sim.applier.machine.registry.agents) == {"w1", "w2"}
    assert leases.remaining_s("agent", "w1") == pytest.approx(2.0)
    sim.clock.advance(2.0)
    await _tick_and_settle(sim)
    assert set(sim.applier.machine.registry.agents) == set()
    assert sim.ops().count("agent.expire") == 3


async def test_a_failed_expiry_is_proposed_again_at_a_later_tick(sim: Sim) -> None:
    await _register(sim, "w1")
    sim.clock.advance(2)
    sim.engine.no_leader = True  # the proposal fails at once
    await _tick_and_settle(sim)
    assert "w1" in sim.applier.machine.registry.agents and sim.ops().count("agent.expire") == 0
    sim.engine.no_leader = False
    sim.node.leases.tick()  # the same tick time: its retry is queued for the next tick
    assert sim.ops().count("agent.expire") == 0
    sim.clock.advance(sim.node.leases.tick_s)
    await _tick_and_settle(sim)
    assert "w1" not in sim.applier.machine.registry.agents and sim.ops().count("agent.expire") == 1
    assert not sim.node.leases._agents
