"""What an agent sees in listings and event streams (coordinator/api/visibility.py):
only the topics, subscriptions, bindings, sagas and lock events its roles
reach; the admin and a development-mode node see everything. An item asked
for by name that the caller may not see is a 403 naming the permission."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.api.auth import AuthSettings
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.coordinator.api.test_auth import (
    ADMIN_TOKEN,
    ALICE,
    BOB,
    CLUSTER_SECRET,
    MALLORY,
    as_admin,
    as_agent,
    authorization,
    join,
)
from tests.sse import open_stream, read_event
from transports.memory import InMemoryTransport

ROLES = {
    # alice: the orders topics, checkout sagas, locks under alice-
    "orders": [{"action": "receive", "pattern": "orders.*"}, {"action": "saga", "pattern": "checkout"},
               {"action": "lock", "pattern": "alice-*"}, {"action": "stream", "pattern": "order-*"}],
    # bob: may only publish to billing.eu (send alone makes a topic visible)
    "billing-sender": [{"action": "send", "pattern": "billing.eu"}],
}


async def denied(h: Harness, who: Any, path: str) -> dict[str, Any]:
    """GET ``path`` as ``who``: a 403, whose error is returned. (A read's
    barrier appends to the log, so the log is not compared here.)"""
    reply = await as_agent(h, who, "GET", path)
    assert reply.status == 403, f"{path}: {reply.status} {reply.text}"
    assert reply.error["code"] == "forbidden"
    return reply.error


def _saga(name: str) -> dict[str, Any]:
    return {"name": name, "steps": [{"id": "s1", "action": {"kind": "topic", "topic": "orders.eu"}}]}


@pytest.fixture
async def world(make_harness: HarnessFactory) -> dict[str, Any]:
    """Topics orders.eu, billing.eu and hr.payroll with a subscription each (the
    admin's) and one of bob's own on hr.payroll; billing.eu bound to a
    broker; sagas checkout and refund; locks alice-1 and bob-1."""
    h = await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET),
                           transports={"memory": InMemoryTransport(namespace="v", ack_timeout_s=30)})
    for name, permissions in ROLES.items():
        await as_admin(h, "PUT", f"/v1/roles/{name}", {"permissions": permissions}, expect=200)
    for who in (ALICE, BOB, MALLORY):
        await join(h, who)
    await as_admin(h, "PUT", "/v1/agents/alice/roles", {"roles": ["orders"]}, expect=200)
    await as_admin(h, "PUT", "/v1/agents/bob/roles", {"roles": ["billing-sender"]}, expect=200)
    subs = {}
    for topic in ("orders.eu", "billing.eu", "hr.payroll"):
        reply = await as_admin(h, "POST", "/v1/subscriptions", {"topic": topic}, expect=201)
        subs[topic] = reply.body["id"]
        await as_admin(h, "POST", f"/v1/topics/{topic}/messages", {"payload": {"n": 1}}, expect=200)
    # bob's own subscription on a topic it may not receive from (made by the admin for it)
    reply = await as_admin(h, "POST", "/v1/subscriptions", {"topic": "hr.payroll", "agent": "bob"}, expect=201)
    subs["bob"] = reply.body["id"]
    await as_admin(h, "PUT", "/v1/topics/billing.eu/binding", {"transport": "memory"}, expect=200)
    sagas = {}
    for name in ("checkout", "refund"):
        sagas[name] = (await as_admin(h, "POST", "/v1/sagas", _saga(name), expect=201)).body["id"]
    for lock in ("alice-1", "bob-1"):
        await as_admin(h, "POST", f"/v1/locks/{lock}", {"holder": "x", "ttl_s": 60}, expect=200)
    return {"h": h, "subs": subs, "sagas": sagas}


async def _topics(h: Harness, who: Any) -> list[str]:
    reply = await (as_admin(h, "GET", "/v1/topics") if who is None else as_agent(h, who, "GET", "/v1/topics"))
    assert reply.status == 200, reply.text
    return sorted(t["topic"] for t in reply.body["topics"])


async def test_topics_listed_are_those_the_agent_may_send_receive_or_subscribe(world: dict[str, Any]) -> None:
    h = world["h"]
    assert await _topics(h, None) == ["billing.eu", "hr.payroll", "orders.eu"]
    assert await _topics(h, ALICE) == ["orders.eu"]
    assert await _topics(h, BOB) == ["billing.eu"]
    assert await _topics(h, MALLORY) == []


async def test_a_topic_asked_for_by_name_is_403_when_not_visible(world: dict[str, Any]) -> None:
    h = world["h"]
    await as_agent(h, ALICE, "GET", "/v1/topics/orders.eu", expect=200)
    error = await denied(h, ALICE, "/v1/topics/hr.payroll")
    assert (error["permission"], error["resource"]) == ("receive", "hr.payroll")
    assert "send, receive and subscribe" in error["message"]


async def test_subscriptions_listed_are_its_own_and_those_it_may_receive(world: dict[str, Any]) -> None:
    h, subs = world["h"], world["subs"]

    async def listed(who: Any) -> set[str]:
        reply = await as_agent(h, who, "GET", "/v1/subscriptions", expect=200)
        return {s["id"] for s in reply.body["subscriptions"]}

    assert await listed(ALICE) == {subs["orders.eu"]}
    assert await listed(BOB) == {subs["bob"]}  # its own, though it may not receive on hr.payroll
    assert await listed(MALLORY) == set()
    admin = await as_admin(h, "GET", "/v1/subscriptions", expect=200)
    assert {s["id"] for s in admin.body["subscriptions"]} == set(subs.values())
    await as_agent(h, BOB, "GET", f"/v1/subscriptions/{subs['bob']}", expect=200)
    error = await denied(h, BOB, f"/v1/subscriptions/{subs['hr.payroll']}")
    assert (error["permission"], error["resource"]) == ("receive", "hr.payroll")


async def test_bindings_listed_are_those_of_visible_topics(world: dict[str, Any]) -> None:
    h = world["h"]
    bob = await as_agent(h, BOB, "GET", "/v1/bindings", expect=200)
    assert [b["topic"] for b in bob.body["bindings"]] == ["billing.eu"]
    alice = await as_agent(h, ALICE, "GET", "/v1/bindings", expect=200)
    assert alice.body["bindings"] == []
    assert "memory" in alice.body["transports"]  # brokers' health is not a topic's


@pytest.mark.parametrize("order", ["oldest", "newest"])
async def test_sagas_and_their_counts_are_those_it_may_start(world: dict[str, Any], order: str) -> None:
    h, sagas = world["h"], world["sagas"]
    alice = await as_agent(h, ALICE, "GET", f"/v1/sagas?order={order}", expect=200)
    assert [s["id"] for s in alice.body["sagas"]] == [sagas["checkout"]]
    assert sum(alice.body["counts"].values()) == 1
    bob = await as_agent(h, BOB, "GET", f"/v1/sagas?order={order}", expect=200)
    assert bob.body["sagas"] == [] and sum(bob.body["counts"].values()) == 0
    admin = await as_admin(h, "GET", f"/v1/sagas?order={order}", expect=200)
    assert sum(admin.body["counts"].values()) == 2


async def test_a_saga_asked_for_by_id_is_403_when_not_visible(world: dict[str, Any]) -> None:
    h, sagas = world["h"], world["sagas"]
    await as_agent(h, ALICE, "GET", f"/v1/sagas/{sagas['checkout']}", expect=200)
    error = await denied(h, ALICE, f"/v1/sagas/{sagas['refund']}")
    assert (error["permission"], error["resource"]) == ("saga", "refund")


def _kinds(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["type"], e["data"].get("name")) for e in events if e["type"].startswith(("saga.", "lock."))]


async def test_events_show_sagas_and_locks_it_may_see_and_every_agent_event(world: dict[str, Any]) -> None:
    h = world["h"]
    alice = await as_agent(h, ALICE, "GET", "/v1/events?limit=1000", expect=200)
    shown = _kinds(alice.body["events"])
    assert ("lock.acquired", "alice-1") in shown and ("saga.started", "checkout") in shown
    assert {name for _, name in shown} == {"alice-1", "checkout"}
    joined = {e["data"]["agentId"] for e in alice.body["events"] if e["type"] == "agent.spawned"}
    assert {"alice", "bob", "mallory"} <= joined
    admin = await as_admin(h, "GET", "/v1/events?limit=1000", expect=200)
    assert {name for _, name in _kinds(admin.body["events"])} == {"alice-1", "bob-1", "checkout", "refund"}


async def test_the_event_stream_skips_what_the_agent_may_not_see(world: dict[str, Any]) -> None:
    h = world["h"]
    path = "/v1/watch/events?types=lock.*"
    response = await open_stream(h.http, path, {"Authorization": authorization(h, ALICE, "GET", path, b"")})
    try:
        await as_admin(h, "POST", "/v1/locks/bob-2", {"holder": "x"}, expect=200)
        await as_admin(h, "POST", "/v1/locks/alice-2", {"holder": "x"}, expect=200)
        event = await read_event(response)  # bob-2's came first: had it been sent, it would be read here
        assert (event["event"], event["data"]["data"]["name"]) == ("lock.acquired", "alice-2")
    finally:
        response.close()


async def test_development_mode_shows_everything(make_harness: HarnessFactory) -> None:
    h = await make_harness()  # --allow-anonymous
    await join(h, ALICE)
    for topic in ("orders.eu", "hr.payroll"):
        await h.call("POST", f"/v1/topics/{topic}/messages", {"payload": 1}, expect=200)
    reply = await as_agent(h, ALICE, "GET", "/v1/topics", expect=200)
    assert sorted(t["topic"] for t in reply.body["topics"]) == ["hr.payroll", "orders.eu"]


async def test_denied_lookups_are_counted(world: dict[str, Any]) -> None:
    h = world["h"]
    await denied(h, MALLORY, f"/v1/sagas/{world['sagas']['refund']}")
    text = (await as_admin(h, "GET", "/metrics", expect=200)).text
    assert 'coord_auth_denied_total{permission="saga"} 1.0' in text, json.dumps(text[-400:])


async def test_chaos_runs_are_the_admins(world: dict[str, Any]) -> None:
    h = world["h"]
    error = await denied(h, ALICE, "/v1/chaos/runs")
    assert (error["permission"], error["resource"]) == ("admin", "/v1/chaos/runs")
    await as_admin(h, "GET", "/v1/chaos/runs", expect=200)


async def test_an_agent_reads_only_its_own_roles_and_grant(world: dict[str, Any]) -> None:
    h = world["h"]
    alice = (await as_agent(h, ALICE, "GET", "/v1/roles", expect=200)).body
    assert [r["name"] for r in alice["roles"]] == ["orders"]
    assert alice["grants"] == [{"agent": "alice", "roles": ["orders"]}]
    mallory = (await as_agent(h, MALLORY, "GET", "/v1/roles", expect=200)).body
    assert mallory == {"roles": [], "grants": []}
    admin = (await as_admin(h, "GET", "/v1/roles", expect=200)).body
    assert [r["name"] for r in admin["roles"]] == ["billing-sender", "orders"] and len(admin["grants"]) == 2


async def test_projections_processors_and_transforms_follow_their_source(world: dict[str, Any]) -> None:
    """Their values are folded from a source: an agent sees them when it may
    read the whole category (stream on <category>-*) or receive on the topic."""
    h = world["h"]
    for name, source in (("orders-count", {"category": "order"}), ("payroll-count", {"category": "hr"}),
                         ("orders-seen", {"topic": "orders.*"}), ("payroll-seen", {"topic": "hr.payroll"})):
        await as_admin(h, "PUT", f"/v1/projections/{name}", {"source": source, "fold": "count"}, expect=200)
        await as_admin(h, "PUT", f"/v1/processors/{name}", {
            "source": source, "window": {"kind": "tumbling", "size_s": 5}, "fold": "count",
            "emit": f"stats.{name}"}, expect=200)
    for name, topic in (("orders-v2", "orders.*"), ("payroll-v2", "hr.>")):
        await as_admin(h, "PUT", f"/v1/transforms/{name}", {"topic": topic, "rule": "drop payload.x"}, expect=200)

    for kind, key in (("projections", "projections"), ("processors", "processors")):
        alice = await as_agent(h, ALICE, "GET", f"/v1/{kind}", expect=200)
        assert [p["name"] for p in alice.body[key]] == ["orders-count", "orders-seen"]
        admin = await as_admin(h, "GET", f"/v1/{kind}", expect=200)
        assert len(admin.body[key]) == 4
        await as_agent(h, ALICE, "GET", f"/v1/{kind}/orders-count", expect=200)
        error = await denied(h, ALICE, f"/v1/{kind}/payroll-count")
        assert (error["permission"], error["resource"]) == ("stream", "hr-*")
        error = await denied(h, ALICE, f"/v1/{kind}/payroll-seen")
        assert (error["permission"], error["resource"]) == ("receive", "hr.payroll")
    transforms = await as_agent(h, ALICE, "GET", "/v1/transforms", expect=200)
    assert [t["name"] for t in transforms.body["transforms"]] == ["orders-v2"]
    error = await denied(h, ALICE, "/v1/transforms/payroll-v2")
    assert (error["permission"], error["resource"]) == ("receive", "hr.>")
