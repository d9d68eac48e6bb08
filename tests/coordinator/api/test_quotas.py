"""Byte bounds on what callers make every replica hold (issue 20, item 6):
one item over its cap is a 413 naming the field and the limit, a store or an
agent's share over its limit a 507 naming the limit, and nothing changes."""

from __future__ import annotations

from coordinator.api.auth import AuthSettings
from coordinator.state import Limits
from coordinator.state.bus import BusLimits
from coordinator.state.eventstore import EventStoreLimits
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.coordinator.api.test_auth import ADMIN_TOKEN, ALICE, BOB, CLUSTER_SECRET, as_admin, as_agent, join

KB = 1024


async def _secure(make_harness: HarnessFactory, limits: Limits) -> Harness:
    h = await make_harness(limits=limits, auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET))
    await as_admin(h, "PUT", "/v1/roles/writer", {"permissions": [
        {"action": "kv", "pattern": "*"}, {"action": "send", "pattern": "*"}, {"action": "stream", "pattern": "*"},
        {"action": "serve", "pattern": "worker"}]}, expect=200)
    for who in (ALICE, BOB):
        await join(h, who)
        await as_admin(h, "PUT", f"/v1/agents/{who.id}/roles", {"roles": ["writer"]}, expect=200)
    return h


async def test_a_value_over_its_cap_is_413_naming_field_and_limit(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_value_bytes_max=4 * KB))
    status, body = await h.call("PUT", "/v1/kv/big", {"value": "x" * (5 * KB)})
    assert status == 413
    assert body["error"]["field"] == "value" and body["error"]["limit"] == "kv_value_bytes_max"
    assert h.applier.machine.kv.get("big") is None and h.applier.machine.kv.bytes == 0


async def test_a_full_key_value_store_is_507_until_something_is_deleted(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_bytes_max=10 * KB))
    for i in range(4):
        await h.call("PUT", f"/v1/kv/k{i}", {"value": "x" * (2 * KB)}, expect=200)
    held = h.applier.machine.kv.bytes
    status, body = await h.call("PUT", "/v1/kv/k9", {"value": "x" * (3 * KB)})
    assert status == 507 and body["error"]["limit"] == "kv_bytes_max"
    assert h.applier.machine.kv.get("k9") is None and h.applier.machine.kv.bytes == held
    # overwriting with a value no larger still works; so does writing after a delete
    await h.call("PUT", "/v1/kv/k0", {"value": "y" * (2 * KB)}, expect=200)
    await h.call("DELETE", "/v1/kv/k1", expect=200)
    await h.call("PUT", "/v1/kv/k9", {"value": "x" * (2 * KB)}, expect=200)


async def test_the_change_history_is_trimmed_by_bytes(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_history_bytes_max=8 * KB))
    for i in range(20):
        await h.call("PUT", "/v1/kv/same", {"value": "x" * KB + str(i)}, expect=200)
    kv = h.applier.machine.kv
    assert kv.history_bytes <= 8 * KB and kv.compact_revision > 10  # the oldest changes were let go


async def test_an_agents_share_is_bounded_across_stores_and_others_are_not_held_back(
        make_harness: HarnessFactory) -> None:
    h = await _secure(make_harness, Limits(principal_bytes_max=12 * KB))
    machine = h.applier.machine
    await as_agent(h, ALICE, "PUT", "/v1/kv/a1", {"value": "x" * (5 * KB)}, expect=200)
    await as_agent(h, ALICE, "POST", "/v1/topics/t/messages", {"payload": "y" * (5 * KB)}, expect=200)
    refused = await as_agent(h, ALICE, "POST", "/v1/streams/s-1",
                             {"events": [{"type": "E", "data": "z" * (3 * KB)}]}, expect=507)
    assert refused.error["limit"] == "principal_bytes_max" and "agent:alice" in refused.error["message"]
    before = machine.principal_bytes("agent:alice")
    refused = await as_agent(h, ALICE, "PUT", "/v1/kv/a2", {"value": "x" * (3 * KB)}, expect=507)
    assert refused.error["limit"] == "principal_bytes_max" and machine.kv.get("a2") is None
    assert machine.principal_bytes("agent:alice") == before
    # bob has a share of his own; the admin is held by the stores' limits only
    await as_agent(h, BOB, "PUT", "/v1/kv/b1", {"value": "x" * (8 * KB)}, expect=200)
    await as_admin(h, "PUT", "/v1/kv/admin1", {"value": "x" * (20 * KB)}, expect=200)
    # alice may replace her own value with one no larger, and writes again once she deletes
    await as_agent(h, ALICE, "PUT", "/v1/kv/a1", {"value": "w" * (5 * KB)}, expect=200)
    await as_agent(h, ALICE, "DELETE", "/v1/kv/a1", expect=200)
    await as_agent(h, ALICE, "PUT", "/v1/kv/a2", {"value": "x" * (3 * KB)}, expect=200)
    # a key another principal overwrites is charged to the writer, released from the first
    await as_admin(h, "PUT", "/v1/kv/a2", {"value": 1}, expect=200)
    assert machine.kv.owned.get("agent:alice", 0) == 0


async def test_agent_metadata_is_capped_413(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(agent_metadata_bytes_max=2 * KB))
    status, body = await h.call("POST", "/v1/agents", {"id": "a", "type": "t", "metadata": {"blob": "x" * (3 * KB)}})
    assert status == 413 and body["error"]["field"] == "metadata"
    assert body["error"]["limit"] == "agent_metadata_bytes_max" and "a" not in h.applier.machine.registry.agents
    await h.call("POST", "/v1/agents", {"id": "a", "type": "t", "metadata": {"blob": "x"}}, expect=201)
    status, _ = await h.call("PATCH", "/v1/agents/a", {"metadata": {"blob": "x" * (3 * KB)}})
    assert status == 413 and h.applier.machine.registry.agents["a"].metadata == {"blob": "x"}


async def test_the_registry_is_bounded_in_bytes(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(registry_bytes_max=6 * KB))
    for i in range(3):
        await h.call("POST", "/v1/agents", {"id": f"a{i}", "type": "t", "metadata": {"m": "x" * KB}}, expect=201)
    status, body = await h.call("POST", "/v1/agents", {"id": "a9", "type": "t", "metadata": {"m": "x" * (3 * KB)}})
    assert status == 507 and body["error"]["limit"] == "registry_bytes_max"
    assert "a9" not in h.applier.machine.registry.agents


async def test_the_bus_is_bounded_in_bytes_and_evicts_what_no_one_holds(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(bus=BusLimits(bytes_max=20 * KB)))
    bus = h.applier.machine.bus
    _, sub = await h.call("POST", "/v1/subscriptions", {"topic": "held"}, expect=201)
    for _ in range(3):
        await h.call("POST", "/v1/topics/held/messages", {"payload": "x" * (5 * KB)}, expect=200)
    status, body = await h.call("POST", "/v1/topics/held/messages", {"payload": "x" * (6 * KB)})
    assert status == 507 and body["error"]["limit"] == "bus_bytes_max" and bus.bytes <= 20 * KB
    # retained messages nobody holds make room by eviction instead
    for _ in range(10):
        await h.call("POST", "/v1/topics/retained/messages", {"payload": "r" * KB}, expect=200)
    assert bus.bytes <= 20 * KB
    _, got = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?max=10", expect=200)
    await h.call("POST", f"/v1/subscriptions/{sub['id']}/ack",
                 {"delivery_ids": [d["delivery_id"] for d in got["messages"]]}, expect=200)
    await h.call("POST", "/v1/topics/held/messages", {"payload": "x" * (6 * KB)}, expect=200)


async def test_the_event_store_is_bounded_in_bytes_507(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(eventstore=EventStoreLimits(bytes_max=4 * KB)))
    await h.call("POST", "/v1/streams/s-1", {"events": [{"type": "E", "data": "x" * (3 * KB)}]}, expect=201)
    status, body = await h.call("POST", "/v1/streams/s-1", {"events": [{"type": "E", "data": "x" * (2 * KB)}]})
    assert status == 507 and body["error"]["limit"] == "eventstore_bytes_max"


async def test_shares_survive_a_snapshot(make_harness: HarnessFactory) -> None:
    h = await _secure(make_harness, Limits())
    await as_agent(h, ALICE, "PUT", "/v1/kv/a", {"value": "x" * KB}, expect=200)
    await as_agent(h, ALICE, "POST", "/v1/topics/t/messages", {"payload": "y" * KB}, expect=200)
    await as_agent(h, ALICE, "POST", "/v1/streams/s-1", {"events": [{"type": "E", "data": "z"}]}, expect=201)
    machine = h.applier.machine
    held = machine.principal_bytes("agent:alice")
    assert held > 2 * KB
    h.applier.restore(h.applier.snapshot())
    restored = h.applier.machine
    assert restored is not machine and restored.principal_bytes("agent:alice") == held
    assert (restored.kv.bytes, restored.bus.bytes, restored.registry.bytes) == (
        machine.kv.bytes, machine.bus.bytes, machine.registry.bytes)


async def test_the_event_history_is_trimmed_by_bytes(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(events_bytes_max=40 * KB))
    for i in range(10):  # each registration's event carries its 8 KiB of metadata
        await h.call("POST", "/v1/agents", {"id": f"a{i}", "type": "t", "metadata": {"m": "x" * (8 * KB)}},
                     expect=201)
    events = h.applier.machine.events
    assert events.bytes <= 40 * KB and events.first_seq > 5
    _, gone = await h.call("GET", "/v1/events?since=1", expect=410)  # a watcher learns the older ones are gone
    assert gone["error"]["first_seq"] == events.first_seq
