"""The message bus over HTTP: publish, subscriptions, fetch (long-poll), acks,
dead letters, groups, replay, at-most-once, TTL, agents' inboxes,
request/reply, SSE, and the cluster's own events on the bus.

Time moves only through ``h.clock.advance``; bus timers fire when a
``bus.tick`` commits, which these tests propose themselves (``tick``) so
that nothing depends on the leader's 50 ms loop having run yet.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from coordinator.commands.bus import BusTick
from tests.coordinator.api.conftest import Harness
from tests.sse import read_event, streaming
from tests.waiting import DEADLINE_S, eventually

# -- helpers -----------------------------------------------------------------------------


async def publish(h: Harness, topic: str, body: dict[str, Any]) -> dict[str, Any]:
    _, data = await h.call("POST", f"/v1/topics/{topic}/messages", body, expect=200)
    return data


async def subscribe(h: Harness, topic: str, **fields: Any) -> str:
    _, data = await h.call("POST", "/v1/subscriptions", {"topic": topic, **fields}, expect=201)
    return data["id"]


async def fetch(h: Harness, sub: str, max_n: int = 10, wait_s: float = 0) -> list[dict[str, Any]]:
    _, data = await h.call("GET", f"/v1/subscriptions/{sub}/messages?max={max_n}&wait_s={wait_s}", expect=200)
    return data["messages"]


async def inbox(h: Harness, agent: str, max_n: int = 10) -> list[dict[str, Any]]:
    _, data = await h.call("GET", f"/v1/agents/{agent}/messages?max={max_n}", expect=200)
    return data["messages"]


async def ack(h: Harness, sub: str, ids: list[str]) -> dict[str, Any]:
    _, data = await h.call("POST", f"/v1/subscriptions/{sub}/ack", {"delivery_ids": ids}, expect=200)
    return data


async def describe(h: Harness, sub: str) -> dict[str, Any]:
    _, data = await h.call("GET", f"/v1/subscriptions/{sub}", expect=200)
    return data


async def dlq(h: Harness, sub: str) -> dict[str, Any]:
    _, data = await h.call("GET", f"/v1/subscriptions/{sub}/dlq", expect=200)
    return data


async def tick(h: Harness, seconds: float) -> None:
    """Move the clock and commit a ``bus.tick`` (it fires whatever is due)."""
    h.clock.advance(seconds)
    await h.node.duties._tick(BusTick())


def bus_state(h: Harness) -> Any:
    """Everything the bus holds: the replicated state and the leader's volatile queues."""
    volatile = {k: list(q) for k, q in h.node.bus.volatile.queues.items()}
    return json.dumps([h.applier.machine.bus.to_data(), volatile], sort_keys=True, default=str)


def payloads(deliveries: list[dict[str, Any]]) -> list[Any]:
    return [d["message"]["payload"] for d in deliveries]


async def parked(h: Harness) -> None:
    """Wait until some fetch is parked in a long-poll."""
    await eventually(lambda: h.node.bus._waiters, "a fetch to wait for messages")


# -- publishing ----------------------------------------------------------------------------


async def test_publish_one_message_fills_defaults(h: Harness) -> None:
    sub = await subscribe(h, "orders.created")
    before = h.clock.now_ms()
    result = await publish(h, "orders.created", {"payload": {"n": 1}})
    assert set(result) == {"id", "offset", "routed", "topic"}
    assert result["topic"] == "orders.created"
    assert result["offset"] == 1
    assert result["routed"] == 1
    assert result["id"].startswith("msg-")

    [delivery] = await fetch(h, sub)
    message = delivery["message"]
    assert message["id"] == result["id"]
    assert message["type"] == "event"
    assert message["source"] == "anonymous"
    assert message["destination"] == []
    assert message["timestamp"] == before
    assert message["priority"] == 5
    assert message["ttl"] is None and message["correlationId"] is None and message["replyTo"] is None
    assert message["headers"] == {}
    assert message["payload"] == {"n": 1}
    assert message["deliveryOptions"] == {
        "guarantee": "at-least-once",
        "retry": {"max_attempts": 5, "backoff_ms": 1000, "backoff_multiplier": 2.0, "max_backoff_ms": 60_000},
        "timeout": 30_000, "persistent": True}

    second = await publish(h, "orders.created", {"id": "mine", "type": "command", "source": "tester"})
    assert second == {"id": "mine", "offset": 2, "routed": 1, "topic": "orders.created"}


async def test_publish_a_batch(h: Harness) -> None:
    await subscribe(h, "batch")
    result = await publish(h, "batch", {"messages": [{"payload": i} for i in range(3)] + [{"id": "x", "payload": 3}]})
    assert result["topic"] == "batch"
    assert [m["offset"] for m in result["messages"]] == [1, 2, 3, 4]
    assert [m["routed"] for m in result["messages"]] == [1, 1, 1, 1]
    assert result["messages"][3]["id"] == "x"
    ids = [m["id"] for m in result["messages"]]
    assert len(set(ids)) == 4
    _, read = await h.call("GET", "/v1/topics/batch/messages?from_offset=1", expect=200)
    assert [m["message"]["payload"] for m in read["messages"]] == [0, 1, 2, 3]
    assert [m["message"]["id"] for m in read["messages"]] == ids


async def test_publish_without_subscribers_is_retained_but_routed_nowhere(h: Harness) -> None:
    result = await publish(h, "lonely", {"payload": "x"})
    assert result["routed"] == 0 and result["offset"] == 1
    _, read = await h.call("GET", "/v1/topics/lonely/messages", expect=200)
    assert [m["offset"] for m in read["messages"]] == [1]


async def test_exactly_once_publish_dedupes_by_id(h: Harness) -> None:
    sub = await subscribe(h, "pay")
    body = {"id": "p-1", "payload": 10, "deliveryOptions": {"guarantee": "exactly-once"}}
    first = await publish(h, "pay", body)
    again = await publish(h, "pay", body)
    assert again["offset"] == first["offset"]
    assert again.get("duplicate") is True
    assert len(await fetch(h, sub)) == 1


async def test_exactly_once_dedupe_window_ends(h: Harness) -> None:
    body = {"id": "p-1", "payload": 10, "deliveryOptions": {"guarantee": "exactly-once"}}
    first = await publish(h, "pay", body)
    h.clock.advance(121)  # past the 120 s dedupe window
    again = await publish(h, "pay", body)
    assert again["offset"] == first["offset"] + 1 and "duplicate" not in again


async def test_a_retried_publish_with_a_request_id_is_stored_once(h: Harness) -> None:
    sub = await subscribe(h, "idem")
    body = {"messages": [{"payload": 1}, {"payload": 2}], "request_id": "batch-1"}
    first = await publish(h, "idem", body)
    again = await publish(h, "idem", body)
    assert again == first
    assert payloads(await fetch(h, sub)) == [1, 2]
    _, topic = await h.call("GET", "/v1/topics/idem", expect=200)
    assert topic["published"] == 2


BAD_PUBLISHES = [
    pytest.param({"deliveryOptions": {"guarantee": "exactly-once"}}, "id", id="exactly-once-without-id"),
    pytest.param({"messages": [{"id": "a"}, {"deliveryOptions": {"guarantee": "exactly-once"}}]},
                 "messages[1].id", id="batch-exactly-once-without-id"),
    pytest.param({"messages": [{"priority": 3}, {"priority": 11}]}, "messages[1].priority", id="batch-priority"),
    pytest.param({"priority": "urgent"}, "priority", id="priority-name"),
    pytest.param({"priority": True}, "priority", id="priority-bool"),
    pytest.param({"deliveryOptions": {"guarantee": "maybe"}}, "deliveryOptions.guarantee", id="guarantee"),
    pytest.param({"deliveryOptions": {"retry": {"max_attempts": 0}}}, "deliveryOptions.retry.max_attempts",
                 id="max-attempts"),
    pytest.param({"deliveryOptions": {"persistent": False}}, "deliveryOptions.persistent",
                 id="at-least-once-not-persistent"),
    pytest.param({"deliveryOptions": {"speed": "fast"}}, "deliveryOptions.speed", id="delivery-unknown"),
    pytest.param({"headers": {"x": 1}}, "headers.x", id="header-value"),
    pytest.param({"headers": ["x"]}, "headers", id="headers-list"),
    pytest.param({"type": "shout"}, "type", id="type"),
    pytest.param({"ttl": 0}, "ttl", id="ttl"),
    pytest.param({"destination": "a1"}, "destination", id="destination-not-list"),
    pytest.param({"type": "response"}, "correlationId", id="response-without-correlation"),
    pytest.param({"replyTo": "a.*"}, "replyTo", id="reply-to-pattern"),
    pytest.param({"bogus": 1}, "bogus", id="unknown-field"),
    pytest.param({"messages": [{"payload": 1}], "payload": 2}, "payload", id="batch-with-message-fields"),
    pytest.param({"messages": {"payload": 1}}, "messages", id="messages-not-a-list"),
    pytest.param({"messages": []}, "messages", id="empty-batch"),
]


@pytest.mark.parametrize(("body", "field"), BAD_PUBLISHES)
async def test_bad_publish_is_400_naming_the_field_and_stores_nothing(h: Harness, body: dict[str, Any],
                                                                      field: str) -> None:
    await subscribe(h, "t")
    await publish(h, "t", {"payload": "before"})
    fingerprint, state = h.fingerprint(), bus_state(h)
    status, error = await h.call("POST", "/v1/topics/t/messages", body)
    assert status == 400, error
    assert error["error"]["code"] == "invalid"
    assert error["error"]["field"] == field
    assert error["error"]["message"].startswith(field + ":")
    assert h.fingerprint() == fingerprint
    assert bus_state(h) == state


@pytest.mark.parametrize("batch", [[{"payload": 1}, {"bogus": 2}], [{"payload": 1}, "text"]])
async def test_a_bad_batch_item_is_400_and_stores_nothing(h: Harness, batch: list[Any]) -> None:
    await subscribe(h, "t")
    fingerprint, state = h.fingerprint(), bus_state(h)
    status, error = await h.call("POST", "/v1/topics/t/messages", {"messages": batch})
    assert status == 400, error
    assert error["error"]["field"].startswith("messages[1]")
    assert h.fingerprint() == fingerprint and bus_state(h) == state


@pytest.mark.parametrize(("batch", "field"), [([{"payload": 1}, {"bogus": 2}], "messages[1].bogus"),
                                              ([{"payload": 1}, "text"], "messages[1]")])
async def test_a_bad_batch_item_names_its_dotted_field(h: Harness, batch: list[Any], field: str) -> None:
    status, error = await h.call("POST", "/v1/topics/t/messages", {"messages": batch})
    assert status == 400
    assert error["error"]["field"] == field


@pytest.mark.parametrize("topic", ["a..b", "a.*", "orders.>", "sp ace", "x" * 65])
async def test_publish_to_a_bad_topic_is_400(h: Harness, topic: str) -> None:
    fingerprint, state = h.fingerprint(), bus_state(h)
    status, error = await h.call("POST", f"/v1/topics/{topic}/messages", {"payload": 1})
    assert status == 400, error
    assert error["error"]["field"] == "topic"
    assert h.fingerprint() == fingerprint and bus_state(h) == state


@pytest.mark.parametrize("guarantee", ["at-least-once", "at-most-once"])
@pytest.mark.parametrize("topic", ["agent.x", "lock.mine", "system.failure"])
async def test_publish_to_a_reserved_topic_is_400_and_stores_nothing(h: Harness, topic: str,
                                                                     guarantee: str) -> None:
    sub = await subscribe(h, topic)
    state = bus_state(h)
    status, error = await h.call("POST", f"/v1/topics/{topic}/messages",
                                 {"payload": 1, "deliveryOptions": {"guarantee": guarantee}})
    assert status == 400, error
    assert error["error"]["field"] == "topic"
    assert bus_state(h) == state
    assert await fetch(h, sub) == []


@pytest.mark.parametrize("topic", ["agent.x", "task.unknown-status"])
async def test_publish_to_a_reserved_topic_never_reaches_the_log(h: Harness, topic: str) -> None:
    fingerprint = h.fingerprint()
    status, _ = await h.call("POST", f"/v1/topics/{topic}/messages", {"payload": {"taskId": "t1"}})
    assert status == 400
    assert h.fingerprint() == fingerprint


async def test_task_topics_carry_typed_task_events(h: Harness) -> None:
    sub = await subscribe(h, "task.*")
    await publish(h, "task.progress", {"payload": {"taskId": "t1", "progress": 50}})
    state = bus_state(h)
    for topic, body, field in [("task.progress", {"payload": {"taskId": "t1", "progress": 150}}, "payload.progress"),
                               ("task.progress", {"payload": {"progress": 1}}, "payload.taskId"),
                               ("task.started", {"type": "command", "payload": {"taskId": "t1"}}, "type"),
                               ("task.unknown", {"payload": {"taskId": "t1"}}, "topic")]:
        status, error = await h.call("POST", f"/v1/topics/{topic}/messages", body)
        assert status == 400, (topic, body, error)
        assert error["error"]["field"] == field
    assert bus_state(h) == state
    assert payloads(await fetch(h, sub)) == [{"taskId": "t1", "progress": 50}]


async def test_publish_body_over_one_mib_is_413(h: Harness) -> None:
    await subscribe(h, "big")
    fingerprint, state = h.fingerprint(), bus_state(h)
    raw = io.BytesIO(json.dumps({"payload": "x" * (1 << 20)}).encode())
    status, error = await h.call("POST", "/v1/topics/big/messages", raw=raw,
                                 headers={"Content-Type": "application/json"})
    assert status == 413
    assert error["error"]["code"] == "too_large"
    assert h.fingerprint() == fingerprint and bus_state(h) == state


async def test_publish_of_bad_json_is_400(h: Harness) -> None:
    fingerprint = h.fingerprint()
    for raw in (b"{", b"[1]", b""):
        status, error = await h.call("POST", "/v1/topics/t/messages", raw=raw or None)
        assert status == 400, raw
        assert error["error"]["field"] == "body"
    assert h.fingerprint() == fingerprint


# -- subscriptions -------------------------------------------------------------------------


async def test_subscribe_list_get_delete(h: Harness) -> None:
    status, created = await h.call("POST", "/v1/subscriptions", {"topic": "jobs"})
    assert status == 201
    sub = created["id"]
    assert isinstance(sub, str) and sub

    await publish(h, "jobs", {"payload": 1})
    await publish(h, "jobs", {"payload": 2})
    [first] = await fetch(h, sub, max_n=1)
    await h.call("POST", f"/v1/subscriptions/{sub}/nack", {"delivery_ids": [first["delivery_id"]],
                                                         "dead_letter": True}, expect=200)
    await publish(h, "jobs", {"payload": 3})
    await fetch(h, sub, max_n=1)

    got = await describe(h, sub)
    assert got["id"] == sub and got["topic"] == "jobs" and got["guarantee"] == "at-least-once"
    assert (got["backlog"], got["pending"], got["dlq"]) == (1, 1, 1)
    _, listed = await h.call("GET", "/v1/subscriptions", expect=200)
    assert [s["id"] for s in listed["subscriptions"]] == [sub]
    assert listed["subscriptions"][0]["backlog"] == 1

    _, gone = await h.call("DELETE", f"/v1/subscriptions/{sub}", expect=200)
    assert gone["id"] == sub
    status, error = await h.call("GET", f"/v1/subscriptions/{sub}/messages")
    assert status == 404 and error["error"]["code"] == "not_found"
    await h.call("GET", f"/v1/subscriptions/{sub}", expect=404)
    _, listed = await h.call("GET", "/v1/subscriptions", expect=200)
    assert listed["subscriptions"] == []
    await h.call("DELETE", f"/v1/subscriptions/{sub}", expect=404)
    # A message nobody holds any more is only in the topic's retained log.
    assert len(h.applier.machine.bus.bodies) == 3


async def test_subscription_with_a_bad_filter_is_400_with_the_position(h: Harness) -> None:
    fingerprint = h.fingerprint()
    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "t", "filter": "priority >> 3"})
    assert status == 400
    assert error["error"]["field"] == "filter"
    assert "position 10" in error["error"]["message"]
    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "t", "filter": "type == 'event' and"})
    assert status == 400 and error["error"]["field"] == "filter"
    assert "position 19" in error["error"]["message"]
    assert h.fingerprint() == fingerprint


@pytest.mark.parametrize(("body", "field"), [
    ({"topic": "t", "guarantee": "twice"}, "guarantee"),
    ({"topic": "t", "start": "middle"}, "start"),
    ({"topic": "t", "start": "beginning", "start_offset": 3}, "start_offset"),
    ({"topic": "t", "start_offset": 1, "start_time_ms": 5}, "start_time_ms"),
    ({"topic": "t", "start_offset": -1}, "start_offset"),
    ({"topic": "t", "start_time_ms": "yesterday"}, "start_time_ms"),
    ({"topic": "t", "ack_timeout_s": 0}, "ack_timeout_s"),
    ({"topic": "t", "max_attempts": 0}, "max_attempts"),
    ({"topic": "a.>.b"}, "topic"),
    ({"topic": ""}, "topic"),
    ({}, "topic"),
    ({"topic": "t", "colour": "red"}, "colour"),
])
async def test_bad_subscription_is_400_and_proposes_nothing(h: Harness, body: dict[str, Any], field: str) -> None:
    fingerprint, state = h.fingerprint(), bus_state(h)
    status, error = await h.call("POST", "/v1/subscriptions", body)
    assert status == 400, error
    assert error["error"]["field"] == field
    assert h.fingerprint() == fingerprint and bus_state(h) == state


async def test_start_offset_on_a_wildcard_is_400(h: Harness) -> None:
    await publish(h, "orders.eu", {"payload": 1})
    state = bus_state(h)
    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "orders.*", "start_offset": 1})
    assert status == 400
    assert error["error"]["field"] == "start_offset"
    assert bus_state(h) == state


async def test_start_offset_on_a_wildcard_never_reaches_the_log(h: Harness) -> None:
    fingerprint = h.fingerprint()
    status, _ = await h.call("POST", "/v1/subscriptions", {"topic": "orders.*", "start_offset": 1})
    assert status == 400
    assert h.fingerprint() == fingerprint


async def test_subscription_owned_by_an_agent_goes_with_it(h: Harness) -> None:
    await h.register(id="owner", ttl_s=3600)
    sub = await subscribe(h, "owned", agent="owner")
    assert (await describe(h, sub))["agent"] == "owner"
    await h.call("DELETE", "/v1/agents/owner", expect=200)
    await h.call("GET", f"/v1/subscriptions/{sub}", expect=404)
    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "owned", "agent": "owner"})
    assert status == 404 and error["error"]["code"] == "not_found"


async def test_joining_a_group_with_another_topic_is_409(h: Harness) -> None:
    await subscribe(h, "jobs", group="workers")
    await subscribe(h, "jobs", group="workers")
    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "other", "group": "workers"})
    assert status == 409 and error["error"]["code"] == "conflict"
    status, _ = await h.call("POST", "/v1/subscriptions", {"topic": "jobs", "group": "workers",
                                                           "filter": "priority > 3"})
    assert status == 409
    _, listed = await h.call("GET", "/v1/subscriptions", expect=200)
    assert len(listed["subscriptions"]) == 2
    assert listed["subscriptions"][0]["kind"] == "group" and listed["subscriptions"][0]["name"] == "workers"


# -- fetching ------------------------------------------------------------------------------


async def test_fetch_returns_deliveries_with_their_fields(h: Harness) -> None:
    sub = await subscribe(h, "f")
    published = await publish(h, "f", {"payload": "hello", "headers": {"k": "v"}})
    [delivery] = await fetch(h, sub)
    assert set(delivery) >= {"delivery_id", "attempt", "redelivered", "topic", "offset", "guarantee", "message"}
    assert isinstance(delivery["delivery_id"], str)
    assert delivery["attempt"] == 1 and delivery["redelivered"] is False
    assert delivery["topic"] == "f" and delivery["offset"] == published["offset"]
    assert delivery["guarantee"] == "at-least-once"
    assert delivery["message"]["payload"] == "hello" and delivery["message"]["headers"] == {"k": "v"}
    # Handed out: not handed out again before its ack timeout.
    assert await fetch(h, sub) == []
    assert (await describe(h, sub))["pending"] == 1


async def test_fetch_respects_max_and_priority_order(h: Harness) -> None:
    sub = await subscribe(h, "p")
    for priority, name in [(1, "low-1"), (9, "critical"), ("high", "high"), (5, "normal"), (1, "low-2"),
                           ("low", "named-low")]:
        await publish(h, "p", {"payload": name, "priority": priority})
    first = await fetch(h, sub, max_n=2)
    assert payloads(first) == ["critical", "high"]
    rest = await fetch(h, sub, max_n=10)
    assert payloads(rest) == ["normal", "named-low", "low-1", "low-2"]
    assert [d["message"]["priority"] for d in rest] == [5, 2, 1, 1]


async def test_wildcard_and_filter_routing(h: Harness) -> None:
    star = await subscribe(h, "orders.*")
    tail = await subscribe(h, "orders.>")
    exact = await subscribe(h, "orders.eu")
    rich_eu = await subscribe(h, "orders.>", filter="headers.region == 'eu' and payload.total > 100")
    for topic, region, total in [("orders.eu", "eu", 500), ("orders.eu", "eu", 5), ("orders.us.west", "us", 900),
                                 ("orders.eu.north", "eu", 200), ("orders", "eu", 1000), ("other.eu", "eu", 999)]:
        await publish(h, topic, {"payload": {"total": total, "topic": topic}, "headers": {"region": region}})

    def seen(deliveries: list[dict[str, Any]]) -> list[tuple[str, int]]:
        return [(d["topic"], d["message"]["payload"]["total"]) for d in deliveries]

    assert seen(await fetch(h, star)) == [("orders.eu", 500), ("orders.eu", 5)]
    assert seen(await fetch(h, tail)) == [("orders.eu", 500), ("orders.eu", 5), ("orders.us.west", 900),
                                          ("orders.eu.north", 200)]
    assert seen(await fetch(h, exact)) == [("orders.eu", 500), ("orders.eu", 5)]
    assert seen(await fetch(h, rich_eu)) == [("orders.eu", 500), ("orders.eu.north", 200)]


async def test_filter_on_missing_path_and_exists(h: Harness) -> None:
    has = await subscribe(h, "f", filter="exists(payload.tag)")
    neq = await subscribe(h, "f", filter="payload.tag != 'x'")
    inn = await subscribe(h, "f", filter="type in ['command', 'request'] or not exists(payload.tag)")
    await publish(h, "f", {"payload": {"tag": "x"}})
    await publish(h, "f", {"payload": {"tag": "y"}, "type": "command"})
    await publish(h, "f", {"payload": {}})
    assert [d["offset"] for d in await fetch(h, has)] == [1, 2]
    assert [d["offset"] for d in await fetch(h, neq)] == [2]  # a missing path makes != false too
    assert [d["offset"] for d in await fetch(h, inn)] == [2, 3]


async def test_long_poll_returns_a_message_published_while_it_waits(h: Harness) -> None:
    sub = await subscribe(h, "lp")
    waiting = asyncio.create_task(fetch(h, sub, wait_s=2))
    try:
        await parked(h)
        assert not waiting.done()
        await publish(h, "lp", {"payload": "late"})
        async with asyncio.timeout(DEADLINE_S):
            got = await waiting
    finally:
        waiting.cancel()
    assert payloads(got) == ["late"]


async def test_long_poll_with_nothing_returns_empty_after_the_wait(h: Harness) -> None:
    sub = await subscribe(h, "quiet")
    waiting = asyncio.create_task(fetch(h, sub, wait_s=0.2))
    try:
        await parked(h)
        await publish(h, "elsewhere", {"payload": "not for it"})
        assert not waiting.done()
        h.clock.advance(0.2)
        async with asyncio.timeout(DEADLINE_S):
            got = await waiting
    finally:
        waiting.cancel()
    assert got == []


@pytest.mark.parametrize("query", ["max=0", "max=1001", "max=ten", "max=1.5", "wait_s=-1", "wait_s=61",
                                   "wait_s=soon", "wait_s=nan"])
async def test_bad_fetch_parameters_are_400(h: Harness, query: str) -> None:
    sub = await subscribe(h, "q")
    await publish(h, "q", {"payload": 1})
    fingerprint = h.fingerprint()
    status, error = await h.call("GET", f"/v1/subscriptions/{sub}/messages?{query}")
    assert status == 400, error
    assert error["error"]["field"] == query.split("=")[0]
    assert h.fingerprint() == fingerprint
    assert (await describe(h, sub))["backlog"] == 1


async def test_fetch_of_unknown_subscription_is_404(h: Harness) -> None:
    status, error = await h.call("GET", "/v1/subscriptions/sub-999/messages")
    assert status == 404 and error["error"]["code"] == "not_found"


async def test_a_parked_fetch_of_a_deleted_subscription_ends_with_404(h: Harness) -> None:
    sub = await subscribe(h, "gone")
    waiting = asyncio.create_task(h.call("GET", f"/v1/subscriptions/{sub}/messages?wait_s=0.3"))
    try:
        await parked(h)
        await h.call("DELETE", f"/v1/subscriptions/{sub}", expect=200)
        async with asyncio.timeout(DEADLINE_S):
            status, error = await waiting
    finally:
        waiting.cancel()
    assert status == 404 and error["error"]["code"] == "not_found"


# -- acks, nacks, redelivery, dead letters -------------------------------------------------------


async def test_ack_removes_the_delivery(h: Harness) -> None:
    sub = await subscribe(h, "a", ack_timeout_s=1)
    await publish(h, "a", {"payload": 1})
    [delivery] = await fetch(h, sub)
    result = await ack(h, sub, [delivery["delivery_id"], "nope"])
    assert result == {"acked": [delivery["delivery_id"]], "unknown": ["nope"]}
    got = await describe(h, sub)
    assert (got["backlog"], got["pending"], got["acked"]) == (0, 0, 1)
    await tick(h, 100)
    assert await fetch(h, sub) == []
    again = await ack(h, sub, [delivery["delivery_id"]])
    assert again["unknown"] == [delivery["delivery_id"]]


@pytest.mark.parametrize("body", [{}, {"delivery_ids": []}, {"delivery_ids": "1.1"}, {"delivery_ids": [1]}])
async def test_bad_ack_is_400(h: Harness, body: dict[str, Any]) -> None:
    sub = await subscribe(h, "a")
    status, error = await h.call("POST", f"/v1/subscriptions/{sub}/ack", body)
    assert status == 400, error
    assert error["error"]["field"].startswith("delivery_ids")


async def test_redelivery_after_the_ack_timeout(h: Harness) -> None:
    sub = await subscribe(h, "r", ack_timeout_s=1)
    await publish(h, "r", {"payload": "again"})  # default backoff: 1000 ms after attempt 1
    [first] = await fetch(h, sub)
    assert first["attempt"] == 1

    await tick(h, 1.9)  # timeout (1 s) + backoff (1 s) not yet passed
    assert await fetch(h, sub) == []
    assert (await describe(h, sub))["pending"] == 1

    await tick(h, 0.2)
    [second] = await fetch(h, sub)
    assert second["delivery_id"] == first["delivery_id"]
    assert second["attempt"] == 2 and second["redelivered"] is True
    assert second["message"] == first["message"]
    got = await describe(h, sub)
    assert got["redelivered"] == 1 and got["delivered"] == 2


async def test_redelivery_happens_without_help_once_the_clock_moves(h: Harness) -> None:
    """The leader's own loop proposes the tick when a timer is due."""
    sub = await subscribe(h, "r", ack_timeout_s=1)
    await publish(h, "r", {"payload": "again"})
    [first] = await fetch(h, sub)
    h.clock.advance(2.5)
    await eventually(lambda: h.applier.machine.bus.consumers["s:" + sub].ready_count == 1,
                     "the leader to fire the redelivery timer")
    [second] = await fetch(h, sub)
    assert second["delivery_id"] == first["delivery_id"] and second["attempt"] == 2


async def test_nack_with_delay_and_without(h: Harness) -> None:
    sub = await subscribe(h, "n")
    await publish(h, "n", {"payload": 1})
    [first] = await fetch(h, sub)
    _, result = await h.call("POST", f"/v1/subscriptions/{sub}/nack",
                             {"delivery_ids": [first["delivery_id"]], "delay_s": 5}, expect=200)
    assert result == {"nacked": [first["delivery_id"]], "unknown": []}
    assert await fetch(h, sub) == []
    assert (await describe(h, sub))["delayed"] == 1
    await tick(h, 4.9)
    assert await fetch(h, sub) == []
    await tick(h, 0.1)
    [second] = await fetch(h, sub)
    assert second["delivery_id"] == first["delivery_id"] and second["attempt"] == 2

    await h.call("POST", f"/v1/subscriptions/{sub}/nack",
                 {"delivery_ids": [second["delivery_id"]], "delay_s": 0}, expect=200)
    [third] = await fetch(h, sub)
    assert third["attempt"] == 3

    # Only a pending delivery can be nacked.
    await ack(h, sub, [third["delivery_id"]])
    _, result = await h.call("POST", f"/v1/subscriptions/{sub}/nack", {"delivery_ids": [third["delivery_id"]]},
                             expect=200)
    assert result == {"nacked": [], "unknown": [third["delivery_id"]]}


@pytest.mark.parametrize(("body", "field"), [
    ({"delivery_ids": ["1.1"], "delay_s": -1}, "delay_s"),
    ({"delivery_ids": ["1.1"], "delay_s": 3601}, "delay_s"),
    ({"delivery_ids": ["1.1"], "dead_letter": "yes"}, "dead_letter"),
    ({"delivery_ids": ["1.1"], "later": True}, "later"),
])
async def test_bad_nack_is_400(h: Harness, body: dict[str, Any], field: str) -> None:
    sub = await subscribe(h, "n")
    fingerprint = h.fingerprint()
    status, error = await h.call("POST", f"/v1/subscriptions/{sub}/nack", body)
    assert status == 400 and error["error"]["field"] == field
    assert h.fingerprint() == fingerprint


async def test_max_attempts_then_dlq_redrive_and_purge(h: Harness) -> None:
    sub = await subscribe(h, "d", ack_timeout_s=1, max_attempts=2)
    published = await publish(h, "d", {"payload": "poison"})
    [first] = await fetch(h, sub)
    await tick(h, 2.0)  # 1 s timeout + 1 s backoff
    [second] = await fetch(h, sub)
    assert second["attempt"] == 2
    await tick(h, 3.0)  # 1 s timeout + 2 s backoff: attempts exhausted
    assert await fetch(h, sub) == []

    letters = await dlq(h, sub)
    assert letters["count"] == 1
    [letter] = letters["dead_letters"]
    assert letter["delivery_id"] == first["delivery_id"]
    assert letter["reason"] == "max_attempts" and letter["attempts"] == 2
    assert letter["topic"] == "d" and letter["offset"] == published["offset"]
    assert letter["message"]["payload"] == "poison"
    assert (await describe(h, sub))["dlq"] == 1

    _, redriven = await h.call("POST", f"/v1/subscriptions/{sub}/dlq/redrive", expect=200)
    assert redriven == {"redriven": [first["delivery_id"]]}
    assert (await dlq(h, sub))["count"] == 0
    [back] = await fetch(h, sub)
    assert back["delivery_id"] == first["delivery_id"] and back["attempt"] == 1
    assert back["message"]["payload"] == "poison"

    _, nacked = await h.call("POST", f"/v1/subscriptions/{sub}/nack",
                             {"delivery_ids": [back["delivery_id"]], "dead_letter": True}, expect=200)
    assert nacked["nacked"] == [back["delivery_id"]]
    [letter] = (await dlq(h, sub))["dead_letters"]
    assert letter["reason"] == "rejected"

    _, purged = await h.call("POST", f"/v1/subscriptions/{sub}/dlq/purge", expect=200)
    assert purged == {"purged": 1}
    assert await dlq(h, sub) == {"dead_letters": [], "count": 0}
    await tick(h, 3600)
    assert await fetch(h, sub) == []
    got = await describe(h, sub)
    assert (got["backlog"], got["pending"], got["delayed"], got["dlq"]) == (0, 0, 0, 0)


async def test_nack_of_the_last_attempt_dead_letters(h: Harness) -> None:
    sub = await subscribe(h, "d", max_attempts=1)
    await publish(h, "d", {"payload": 1})
    [delivery] = await fetch(h, sub)
    await h.call("POST", f"/v1/subscriptions/{sub}/nack", {"delivery_ids": [delivery["delivery_id"]]}, expect=200)
    [letter] = (await dlq(h, sub))["dead_letters"]
    assert letter["reason"] == "max_attempts"
    # Processed after all: an ack takes it out of the DLQ.
    assert (await ack(h, sub, [delivery["delivery_id"]]))["acked"] == [delivery["delivery_id"]]
    assert (await dlq(h, sub))["count"] == 0


async def test_redrive_and_purge_of_chosen_dead_letters(h: Harness) -> None:
    sub = await subscribe(h, "d")
    for i in range(3):
        await publish(h, "d", {"payload": i})
    deliveries = await fetch(h, sub)
    ids = [d["delivery_id"] for d in deliveries]
    await h.call("POST", f"/v1/subscriptions/{sub}/nack", {"delivery_ids": ids, "dead_letter": True}, expect=200)
    _, redriven = await h.call("POST", f"/v1/subscriptions/{sub}/dlq/redrive", {"delivery_ids": [ids[1]]},
                               expect=200)
    assert redriven == {"redriven": [ids[1]]}
    _, purged = await h.call("POST", f"/v1/subscriptions/{sub}/dlq/purge", {"delivery_ids": [ids[0]]}, expect=200)
    assert purged == {"purged": 1}
    assert [d["delivery_id"] for d in (await dlq(h, sub))["dead_letters"]] == [ids[2]]
    assert payloads(await fetch(h, sub)) == [1]


async def test_redrive_of_a_delivery_that_is_not_dead_is_404(h: Harness) -> None:
    sub = await subscribe(h, "d")
    status, error = await h.call("POST", f"/v1/subscriptions/{sub}/dlq/redrive", {"delivery_ids": ["9.9"]})
    assert status == 404 and error["error"]["code"] == "not_found"


async def test_retry_max_attempts_of_the_message_applies_without_a_subscription_setting(h: Harness) -> None:
    sub = await subscribe(h, "d", ack_timeout_s=1)
    await publish(h, "d", {"payload": 1, "deliveryOptions": {"retry": {"max_attempts": 1, "backoff_ms": 0}}})
    await fetch(h, sub)
    await tick(h, 1.0)
    [letter] = (await dlq(h, sub))["dead_letters"]
    assert letter["reason"] == "max_attempts" and letter["attempts"] == 1


# -- consumer groups -------------------------------------------------------------------------


async def test_group_members_compete_for_messages(h: Harness) -> None:
    a = await subscribe(h, "work", group="workers")
    b = await subscribe(h, "work", group="workers")
    assert a != b
    for i in range(6):
        await publish(h, "work", {"payload": i})
    got_a, got_b = [], []
    while True:
        from_a = await fetch(h, a, max_n=1)
        from_b = await fetch(h, b, max_n=1)
        got_a += payloads(from_a)
        got_b += payloads(from_b)
        if not from_a and not from_b:
            break
    assert sorted(got_a + got_b) == list(range(6))
    assert got_a and got_b
    assert not set(got_a) & set(got_b)
    # A plain subscription next to the group gets its own copy of everything.
    solo = await subscribe(h, "work", start="beginning")
    assert payloads(await fetch(h, solo)) == list(range(6))


async def test_leaving_a_group_keeps_its_messages_for_the_others(h: Harness) -> None:
    a = await subscribe(h, "work", group="workers")
    b = await subscribe(h, "work", group="workers")
    await publish(h, "work", {"payload": "kept"})
    await h.call("DELETE", f"/v1/subscriptions/{a}", expect=200)
    assert payloads(await fetch(h, b)) == ["kept"]
    _, deleted = await h.call("DELETE", "/v1/groups/workers", expect=200)
    assert deleted["group"] == "workers"
    await h.call("GET", f"/v1/subscriptions/{b}/messages", expect=404)


# -- replay and retention --------------------------------------------------------------------------


async def test_replay_from_the_beginning_an_offset_and_a_time(h: Harness) -> None:
    t0 = h.clock.now_ms()
    await publish(h, "hist", {"payload": 1})
    h.clock.advance(10)
    await publish(h, "hist", {"payload": 2})
    await publish(h, "hist", {"payload": 3})

    new = await subscribe(h, "hist")
    assert await fetch(h, new) == []
    beginning = await subscribe(h, "hist", start="beginning")
    assert [(d["offset"], d["message"]["payload"]) for d in await fetch(h, beginning)] == [(1, 1), (2, 2), (3, 3)]
    offset = await subscribe(h, "hist", start_offset=2)
    assert payloads(await fetch(h, offset)) == [2, 3]
    later = await subscribe(h, "hist", start_time_ms=t0 + 5000)
    assert payloads(await fetch(h, later)) == [2, 3]
    exact = await subscribe(h, "hist", start_time_ms=t0)
    assert payloads(await fetch(h, exact)) == [1, 2, 3]
    future = await subscribe(h, "hist", start_offset=99)
    assert await fetch(h, future) == []

    await publish(h, "hist", {"payload": 4})
    assert payloads(await fetch(h, beginning)) == [4]
    assert payloads(await fetch(h, future)) == [4]  # a start offset only chooses what is replayed


async def test_replay_of_a_wildcard_from_the_beginning_in_publish_order(h: Harness) -> None:
    await publish(h, "zone.b", {"payload": "b1"})
    await publish(h, "zone.a", {"payload": "a1"})
    await publish(h, "zone.b", {"payload": "b2"})
    sub = await subscribe(h, "zone.*", start="beginning")
    assert payloads(await fetch(h, sub)) == ["b1", "a1", "b2"]


async def test_retention_by_count_and_compacted_start_offset(h: Harness) -> None:
    _, configured = await h.call("PUT", "/v1/topics/ret", {"max_messages": 2}, expect=200)
    assert configured["topic"] == "ret" and configured["max_messages"] == 2
    for i in range(1, 6):
        await publish(h, "ret", {"payload": i})

    _, read = await h.call("GET", "/v1/topics/ret/messages?from_offset=1", expect=200)
    assert [m["offset"] for m in read["messages"]] == [4, 5]
    assert [m["message"]["payload"] for m in read["messages"]] == [4, 5]
    assert read["first_offset"] == 4 and read["next_offset"] == 6
    _, read = await h.call("GET", "/v1/topics/ret/messages?from_offset=5", expect=200)
    assert [m["offset"] for m in read["messages"]] == [5]
    _, read = await h.call("GET", "/v1/topics/ret/messages?from_offset=1&limit=1", expect=200)
    assert [m["offset"] for m in read["messages"]] == [4]

    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "ret", "start_offset": 2})
    assert status == 410
    assert error["error"]["code"] == "compacted"
    assert "start_offset" in error["error"]["message"]
    sub = await subscribe(h, "ret", start_offset=4)
    assert payloads(await fetch(h, sub)) == [4, 5]
    sub = await subscribe(h, "ret", start="beginning")
    assert payloads(await fetch(h, sub)) == [4, 5]

    # Shrinking the window trims at once.
    await h.call("PUT", "/v1/topics/ret", {"max_messages": 1}, expect=200)
    _, topic = await h.call("GET", "/v1/topics/ret", expect=200)
    assert topic["retained"] == 1 and topic["first_offset"] == 5 and topic["published"] == 5


async def test_retention_by_age(h: Harness) -> None:
    await h.call("PUT", "/v1/topics/aged", {"max_age_s": 10}, expect=200)
    await publish(h, "aged", {"payload": "old"})
    await tick(h, 6)
    await publish(h, "aged", {"payload": "young"})
    await tick(h, 5)
    _, read = await h.call("GET", "/v1/topics/aged/messages", expect=200)
    assert [m["message"]["payload"] for m in read["messages"]] == ["young"]


async def test_topics_list_and_get(h: Harness) -> None:
    await publish(h, "a.one", {"payload": 1})
    await publish(h, "a.one", {"payload": 2})
    await publish(h, "b.two", {"payload": 3})
    await h.call("PUT", "/v1/topics/c.three", {"max_messages": 7}, expect=200)
    _, listed = await h.call("GET", "/v1/topics", expect=200)
    by_name = {t["topic"]: t for t in listed["topics"]}
    assert {"a.one", "b.two", "c.three"} <= set(by_name)
    assert by_name["a.one"]["retained"] == 2 and by_name["a.one"]["next_offset"] == 3
    assert by_name["c.three"]["max_messages"] == 7 and by_name["c.three"]["retained"] == 0
    _, prefixed = await h.call("GET", "/v1/topics?prefix=a.", expect=200)
    assert [t["topic"] for t in prefixed["topics"]] == ["a.one"]
    status, _ = await h.call("GET", "/v1/topics/none.here")
    assert status == 404
    _, empty = await h.call("GET", "/v1/topics/none.here/messages", expect=200)
    assert empty["messages"] == []


@pytest.mark.parametrize(("body", "field"), [
    ({"max_messages": -1}, "max_messages"), ({"max_messages": "2"}, "max_messages"),
    ({"max_age_s": 0}, "max_age_s"), ({"keep": 1}, "keep")])
async def test_bad_topic_settings_are_400(h: Harness, body: dict[str, Any], field: str) -> None:
    fingerprint = h.fingerprint()
    status, error = await h.call("PUT", "/v1/topics/t", body)
    assert status == 400 and error["error"]["field"] == field
    assert h.fingerprint() == fingerprint


# -- at-most-once -------------------------------------------------------------------------------


async def test_at_most_once_is_delivered_once_and_never_logged(h: Harness) -> None:
    sub = await subscribe(h, "amo", ack_timeout_s=1)
    other = await subscribe(h, "amo")
    fingerprint = h.fingerprint()
    result = await publish(h, "amo", {"payload": "fleeting", "deliveryOptions": {"guarantee": "at-most-once"}})
    assert result["offset"] is None and result["routed"] == 2 and result["topic"] == "amo"
    assert h.fingerprint() == fingerprint  # routed by the leader, not a log entry

    [delivery] = await fetch(h, sub)
    assert delivery["guarantee"] == "at-most-once"
    assert delivery["message"]["payload"] == "fleeting"
    assert delivery["message"]["deliveryOptions"]["persistent"] is False
    assert delivery["attempt"] == 1 and delivery["offset"] is None
    assert payloads(await fetch(h, other)) == ["fleeting"]

    await tick(h, 3600)
    assert await fetch(h, sub) == []
    assert (await describe(h, sub))["pending"] == 0
    _, read = await h.call("GET", "/v1/topics/amo/messages", expect=200)
    assert read["messages"] == []
    assert (await dlq(h, sub))["count"] == 0


async def test_at_most_once_subscription_downgrades_persistent_messages(h: Harness) -> None:
    sub = await subscribe(h, "amo", guarantee="at-most-once")
    await publish(h, "amo", {"payload": "logged"})
    [delivery] = await fetch(h, sub)
    assert delivery["guarantee"] == "at-most-once"
    assert (await describe(h, sub))["pending"] == 0
    await tick(h, 3600)
    assert await fetch(h, sub) == []
    _, read = await h.call("GET", "/v1/topics/amo/messages", expect=200)
    assert [m["message"]["payload"] for m in read["messages"]] == ["logged"]  # the topic still retains it


async def test_at_most_once_wakes_a_long_poll(h: Harness) -> None:
    sub = await subscribe(h, "amo")
    waiting = asyncio.create_task(fetch(h, sub, wait_s=2))
    try:
        await parked(h)
        await publish(h, "amo", {"payload": "now", "deliveryOptions": {"guarantee": "at-most-once"}})
        async with asyncio.timeout(DEADLINE_S):
            got = await waiting
    finally:
        waiting.cancel()
    assert payloads(got) == ["now"]


# -- TTL -------------------------------------------------------------------------------------------


async def test_message_ttl_expires_into_the_dlq(h: Harness) -> None:
    sub = await subscribe(h, "ttl")
    await publish(h, "ttl", {"payload": "short", "ttl": 1000})
    await publish(h, "ttl", {"payload": "long", "ttl": 60_000})
    await tick(h, 1.5)
    assert payloads(await fetch(h, sub)) == ["long"]
    [letter] = (await dlq(h, sub))["dead_letters"]
    assert letter["reason"] == "ttl"
    assert letter["message"]["payload"] == "short"


async def test_a_delivered_message_that_expires_before_its_ack_is_not_redelivered(h: Harness) -> None:
    sub = await subscribe(h, "ttl", ack_timeout_s=1)
    await publish(h, "ttl", {"payload": "short", "ttl": 1500})
    assert len(await fetch(h, sub)) == 1
    await tick(h, 2.0)  # the redelivery is due, and the TTL passed
    assert await fetch(h, sub) == []
    [letter] = (await dlq(h, sub))["dead_letters"]
    assert letter["reason"] == "ttl" and letter["attempts"] == 1


async def test_an_expired_at_most_once_message_is_not_delivered(h: Harness) -> None:
    sub = await subscribe(h, "ttl")
    await publish(h, "ttl", {"payload": "short", "ttl": 1000, "deliveryOptions": {"guarantee": "at-most-once"}})
    h.clock.advance(2)
    assert await fetch(h, sub) == []


async def test_an_expired_message_is_dead_lettered_at_fetch_even_before_a_tick(h: Harness) -> None:
    sub = await subscribe(h, "ttl")
    await publish(h, "ttl", {"payload": "short", "ttl": 1000})
    h.clock.advance(1.5)
    assert await fetch(h, sub) == []
    [letter] = (await dlq(h, sub))["dead_letters"]
    assert letter["reason"] == "ttl"


# -- agents' inboxes ---------------------------------------------------------------------------------


async def test_direct_message_goes_to_the_agents_inbox_only(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    topic_sub = await subscribe(h, "direct")
    result = await publish(h, "direct", {"payload": "for a1", "destination": ["a1"]})
    assert result["routed"] == 1

    [delivery] = await inbox(h, "a1")
    assert delivery["message"]["payload"] == "for a1"
    assert delivery["message"]["destination"] == ["a1"]
    assert await fetch(h, topic_sub) == []
    _, read = await h.call("GET", "/v1/topics/direct/messages", expect=200)
    assert read["messages"] == []  # direct messages are not retained for replay

    _, acked = await h.call("POST", "/v1/agents/a1/ack", {"delivery_ids": [delivery["delivery_id"]]}, expect=200)
    assert acked == {"acked": [delivery["delivery_id"]], "unknown": []}
    await tick(h, 120)
    assert await inbox(h, "a1") == []
    _, letters = await h.call("GET", "/v1/agents/a1/dlq", expect=200)
    assert letters["count"] == 0


async def test_direct_message_to_two_agents(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    await h.register(id="a2", ttl_s=3600)
    result = await publish(h, "direct", {"payload": "both", "destination": ["a1", "a2"]})
    assert result["routed"] == 2
    assert payloads(await inbox(h, "a1")) == ["both"]
    assert payloads(await inbox(h, "a2")) == ["both"]


async def test_direct_message_to_an_unknown_agent_is_404_and_stores_nothing(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    state = bus_state(h)
    for guarantee in ("at-least-once", "at-most-once"):
        status, error = await h.call("POST", "/v1/topics/direct/messages",
                                     {"payload": 1, "destination": ["a1", "ghost"],
                                      "deliveryOptions": {"guarantee": guarantee}})
        assert status == 404, error
        assert error["error"]["code"] == "not_found"
        assert "ghost" in error["error"]["message"]
    assert bus_state(h) == state
    assert await inbox(h, "a1") == []


async def test_at_most_once_direct_message(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    fingerprint = h.fingerprint()
    result = await publish(h, "direct", {"payload": "quick", "destination": ["a1"],
                                         "deliveryOptions": {"guarantee": "at-most-once"}})
    assert result["routed"] == 1 and result["offset"] is None
    assert h.fingerprint() == fingerprint
    [delivery] = await inbox(h, "a1")
    assert delivery["guarantee"] == "at-most-once" and delivery["message"]["payload"] == "quick"
    assert await inbox(h, "a1") == []


async def test_inbox_nack_and_dlq(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    await publish(h, "direct", {"payload": "bad", "destination": ["a1"]})
    [delivery] = await inbox(h, "a1")
    await h.call("POST", "/v1/agents/a1/nack", {"delivery_ids": [delivery["delivery_id"]], "dead_letter": True},
                 expect=200)
    _, letters = await h.call("GET", "/v1/agents/a1/dlq", expect=200)
    assert letters["count"] == 1 and letters["dead_letters"][0]["reason"] == "rejected"
    await h.call("POST", "/v1/agents/a1/dlq/redrive", expect=200)
    assert payloads(await inbox(h, "a1")) == ["bad"]


async def test_inbox_of_an_unknown_agent_is_404(h: Harness) -> None:
    status, error = await h.call("GET", "/v1/agents/ghost/messages")
    assert status == 404 and error["error"]["code"] == "not_found"


async def test_registered_agent_without_mail_has_an_empty_inbox(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    assert await inbox(h, "a1") == []


async def test_inbox_long_poll_wakes_on_a_direct_message(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    waiting = asyncio.create_task(h.call("GET", "/v1/agents/a1/messages?wait_s=2", expect=200))
    try:
        await parked(h)
        await publish(h, "direct", {"payload": "ping", "destination": ["a1"]})
        async with asyncio.timeout(DEADLINE_S):
            _, got = await waiting
    finally:
        waiting.cancel()
    assert payloads(got["messages"]) == ["ping"]


# -- request / reply ---------------------------------------------------------------------------------


async def test_request_gets_the_response(h: Harness) -> None:
    sub = await subscribe(h, "svc.echo")

    async def responder() -> dict[str, Any]:
        [delivery] = await fetch(h, sub, max_n=1, wait_s=5)
        request = delivery["message"]
        assert request["type"] == "request" and request["replyTo"]
        await publish(h, request["replyTo"], {"type": "response", "correlationId": request["id"],
                                              "source": "echo", "payload": {"echo": request["payload"]}})
        await ack(h, sub, [delivery["delivery_id"]])
        return request

    answering = asyncio.create_task(responder())
    try:
        async with asyncio.timeout(DEADLINE_S):
            status, body = await h.call("POST", "/v1/topics/svc.echo/request",
                                        {"payload": {"say": "hi"}, "source": "asker", "timeout_s": 5})
            request = await answering
    finally:
        answering.cancel()
    assert status == 200, body
    assert body["request"]["id"] == request["id"] and body["request"]["topic"] == "svc.echo"
    assert body["request"]["offset"] == 1
    assert body["response"]["correlationId"] == request["id"]
    assert body["response"]["payload"] == {"echo": {"say": "hi"}}
    assert body["response"]["type"] == "response"


async def test_request_without_responders_is_503(h: Harness) -> None:
    status, body = await h.call("POST", "/v1/topics/svc.nobody/request", {"payload": 1, "timeout_s": 5})
    assert status == 503
    assert body["error"]["code"] == "unavailable"
    assert "no responders" in body["error"]["message"]


async def test_request_without_an_answer_in_time_is_504(h: Harness) -> None:
    sub = await subscribe(h, "svc.silent")
    status, body = await h.call("POST", "/v1/topics/svc.silent/request", {"payload": 1, "timeout_s": 0.2})
    assert status == 504
    assert body["error"]["code"] == "timeout"
    # The request itself was delivered to the subscriber.
    [delivery] = await fetch(h, sub)
    assert delivery["message"]["type"] == "request"


async def test_a_response_that_names_another_request_does_not_answer(h: Harness) -> None:
    sub = await subscribe(h, "svc.wrong")

    async def responder() -> None:
        [delivery] = await fetch(h, sub, max_n=1, wait_s=5)
        await publish(h, delivery["message"]["replyTo"], {"type": "response", "correlationId": "someone-else"})

    answering = asyncio.create_task(responder())
    try:
        status, body = await h.call("POST", "/v1/topics/svc.wrong/request", {"payload": 1, "timeout_s": 0.5})
        async with asyncio.timeout(DEADLINE_S):
            await answering
    finally:
        answering.cancel()
    assert status == 504, body


@pytest.mark.parametrize(("body", "field"), [
    ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": 301}, "timeout_s"), ({"type": "event"}, "type"),
    ({"priority": 10}, "priority"), ({"nope": 1}, "nope")])
async def test_bad_request_is_400(h: Harness, body: dict[str, Any], field: str) -> None:
    await subscribe(h, "svc")
    fingerprint = h.fingerprint()
    status, error = await h.call("POST", "/v1/topics/svc/request", body)
    assert status == 400, error
    assert error["error"]["field"] == field
    assert h.fingerprint() == fingerprint


# -- Server-Sent Events ---------------------------------------------------------------------------------


async def test_stream_delivers_messages_as_events(h: Harness) -> None:
    sub = await subscribe(h, "s")
    await publish(h, "s", {"payload": "before"})
    async with streaming(h.http, f"/v1/subscriptions/{sub}/stream") as response:
        first = await read_event(response, id_type=str)
        assert first["event"] == "message"
        assert first["data"]["message"]["payload"] == "before"
        assert first["id"] == first["data"]["delivery_id"]
        assert first["data"]["attempt"] == 1 and first["data"]["topic"] == "s"

        await publish(h, "s", {"payload": "after"})
        second = await read_event(response, id_type=str)
        assert second["data"]["message"]["payload"] == "after"
        assert second["id"] == second["data"]["delivery_id"] != first["id"]
        # Without auto_ack, what was streamed waits for an ack.
        assert (await describe(h, sub))["pending"] == 2


async def test_stream_with_auto_ack_acks_what_it_sent(h: Harness) -> None:
    sub = await subscribe(h, "s", ack_timeout_s=1)
    async with streaming(h.http, f"/v1/subscriptions/{sub}/stream?auto_ack=true") as response:
        await publish(h, "s", {"payload": 1})
        await publish(h, "s", {"payload": 2})
        got = [await read_event(response, id_type=str), await read_event(response, id_type=str)]
        assert [e["data"]["message"]["payload"] for e in got] == [1, 2]

        async def settled() -> bool:
            d = await describe(h, sub)
            return d["pending"] == 0 and d["acked"] == 2

        await eventually(settled, "the stream to ack what it sent")
    await tick(h, 10)
    assert await fetch(h, sub) == []


async def test_stream_of_an_inbox(h: Harness) -> None:
    await h.register(id="a1", ttl_s=3600)
    async with streaming(h.http, "/v1/agents/a1/stream") as response:
        await publish(h, "direct", {"payload": "hi a1", "destination": ["a1"]})
        event = await read_event(response, id_type=str)
        assert event["data"]["message"]["payload"] == "hi a1"


async def test_stream_of_an_unknown_subscription_is_404_json(h: Harness) -> None:
    async with h.http.get("/v1/subscriptions/sub-404/stream") as response:
        assert response.status == 404
        assert response.headers["Content-Type"].startswith("application/json")
        body = await response.json()
    assert body["error"]["code"] == "not_found"


async def test_stream_with_a_bad_auto_ack_is_400(h: Harness) -> None:
    sub = await subscribe(h, "s")
    status, error = await h.call("GET", f"/v1/subscriptions/{sub}/stream?auto_ack=yes")
    assert status == 400 and error["error"]["field"] == "auto_ack"


# -- the cluster's events on the bus ---------------------------------------------------------------------


async def test_agent_events_reach_subscribers_on_the_bus(h: Harness) -> None:
    sub = await subscribe(h, "agent.>")
    spawned = await subscribe(h, "agent.spawned")
    await h.register(id="worker-1", ttl_s=3600)
    [delivery] = await fetch(h, sub)
    assert delivery["topic"] == "agent.spawned"
    message = delivery["message"]
    assert message["type"] == "event" and message["source"] == "coordinator"
    assert message["payload"]["agentId"] == "worker-1"
    assert payloads(await fetch(h, spawned))[0]["agentId"] == "worker-1"

    await h.call("DELETE", "/v1/agents/worker-1", expect=200)
    [terminated] = await fetch(h, sub)
    assert terminated["topic"] == "agent.terminated"
    assert terminated["message"]["payload"]["agentId"] == "worker-1"
    assert await fetch(h, spawned) == []


async def test_cluster_events_are_not_retained_for_replay(h: Harness) -> None:
    await h.register(id="worker-1", ttl_s=3600)
    sub = await subscribe(h, "agent.>", start="beginning")
    assert await fetch(h, sub) == []


# -- status and metrics ------------------------------------------------------------------------------------


async def test_status_has_a_bus_section_and_metrics_render(h: Harness) -> None:
    await subscribe(h, "st")
    await publish(h, "st", {"payload": 1})
    await publish(h, "st", {"payload": 2, "deliveryOptions": {"guarantee": "at-most-once"}})
    _, status = await h.call("GET", "/v1/status", expect=200)
    bus = status["bus"]
    assert bus["active"] is True
    assert bus["subscriptions"] == 1 and bus["consumers"] == 1
    assert bus["topics"] >= 1 and bus["published"] >= 1
    assert bus["volatile_routed"] == 1
    async with h.http.get("/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert "/v1/topics/{topic}/messages" in text
