"""Topics bound to a broker transport, over HTTP, with the in-process
reference transport: the leader publishes committed messages to it and
commits the cursor; an outage holds them (bounded) and they drain after."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from coordinator.commands.bus import BusPublish, BusTransportAck
from coordinator.errors import Conflict, InvalidInput
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.waiting import eventually
from transports.memory import InMemoryTransport


@pytest.fixture
async def bound(make_harness: HarnessFactory) -> tuple[Harness, InMemoryTransport]:
    transport = InMemoryTransport(namespace="t", ack_timeout_s=30)
    h = await make_harness(transports={"memory": transport})
    await h.call("PUT", "/v1/topics/orders/binding", {"transport": "memory", "backlog_max": 5}, expect=200)
    return h, transport


async def _binding(h: Harness) -> dict[str, Any]:
    _, body = await h.call("GET", "/v1/bindings", expect=200)
    return body


async def _broker_has(transport: InMemoryTransport, topic: str) -> list[int]:
    return [e.offset for e in transport._topics.get(topic, [])]


async def test_committed_messages_reach_the_broker_and_the_cursor_follows(bound: Any) -> None:
    h, transport = bound
    for i in range(3):
        await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": i}}, expect=200)
    await eventually(lambda: h.applier.machine.bus.bindings["orders"].cursor == 3, "the cursor to reach 3")
    assert await _broker_has(transport, "orders") == [1, 2, 3]
    await transport.subscribe("orders", "g")
    got = await transport.fetch("orders", "g", "c", 10, 0)
    assert [d.message["payload"] for d in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    listing = await _binding(h)
    assert listing["bindings"][0] | {"backlog": 0, "cursor": 3, "transport": "memory"} == listing["bindings"][0]
    assert listing["transports"]["memory"]["ok"] is True


async def test_a_broker_outage_holds_a_bounded_backlog_that_drains_after(bound: Any) -> None:
    h, transport = bound
    transport.down = True
    for i in range(5):
        await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": i}}, expect=200)
    status, body = await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": 5}})
    assert status == 503 and "wait for the memory transport" in body["error"]["message"]
    await eventually(lambda: "memory" in h.node.transports.errors, "the transport to be reported unhealthy")
    listing = await _binding(h)
    assert listing["bindings"][0]["backlog"] == 5 and listing["transports"]["memory"]["ok"] is False
    _, st = await h.call("GET", "/v1/status", expect=200)
    assert st["transports"]["memory"]["error"]
    async with h.http.get("/metrics") as response:
        text = await response.text()
    assert 'coord_transport_backlog{topic="orders",transport="memory"} 5.0' in text
    assert 'coord_transport_healthy{transport="memory"} 0.0' in text
    transport.down = False
    await eventually(lambda: h.applier.machine.bus.bindings["orders"].cursor == 5, "the backlog to drain")
    assert await _broker_has(transport, "orders") == [1, 2, 3, 4, 5]
    await eventually(lambda: "memory" not in h.node.transports.errors, "health to recover")


async def test_bind_refuses_an_unconfigured_transport_and_unbind_waits_for_the_backlog(bound: Any) -> None:
    h, transport = bound
    before = h.fingerprint()
    status, body = await h.call("PUT", "/v1/topics/other/binding", {"transport": "kafka"})
    assert status == 400 and body["error"]["field"] == "transport"
    assert h.fingerprint() == before
    status, _ = await h.call("PUT", "/v1/topics/orders/binding", {"transport": "memory", "backlog_max": 0})
    assert status == 400
    transport.down = True
    await h.call("POST", "/v1/topics/orders/messages", {"payload": 1}, expect=200)
    status, _ = await h.call("DELETE", "/v1/topics/orders/binding")
    assert status == 409
    _, dropped = await h.call("DELETE", "/v1/topics/orders/binding", {"drop_backlog": True}, expect=200)
    assert dropped["dropped"] == 1
    assert (await _binding(h))["bindings"] == []


async def test_unbinding_removes_the_topic_at_the_broker(bound: Any) -> None:
    h, transport = bound
    await h.call("POST", "/v1/topics/orders/messages", {"payload": 1}, expect=200)
    # The cursor, not the broker: the leader commits the cursor after the broker took the message,
    # and until then the binding has a backlog, which an unbind refuses (409).
    await eventually(lambda: h.applier.machine.bus.bindings["orders"].cursor == 1, "the cursor to pass the message")
    assert await _broker_has(transport, "orders") == [1]
    await h.call("DELETE", "/v1/topics/orders/binding", expect=200)
    await eventually(lambda: "orders" not in transport._topics, "the broker's topic to be removed")


async def test_a_subscription_on_a_bound_topic_is_served_by_the_broker(bound: Any) -> None:
    h, _transport = bound
    _, sub = await h.call("POST", "/v1/subscriptions", {"topic": "orders", "group": "billing"}, expect=201)
    assert sub["consumer"]["transport"] == "memory"
    status, body = await h.call("POST", "/v1/subscriptions", {"topic": "orders", "filter": "payload.i > 1"})
    assert status == 400 and body["error"]["field"] == "filter"
    for i in range(3):
        await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": i}}, expect=200)
    # the leader may send them to the broker in more than one batch: a fetch takes what is there
    await eventually(lambda: h.applier.machine.bus.bindings["orders"].cursor == 3, "the broker to hold all 3")
    _, got = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?max=10&wait_s=2", expect=200)
    assert [d["message"]["payload"] for d in got["messages"]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    ids = [d["delivery_id"] for d in got["messages"]]
    _, acked = await h.call("POST", f"/v1/subscriptions/{sub['id']}/ack", {"delivery_ids": [*ids[:2], "nope"]},
                            expect=200)
    assert acked == {"acked": ids[:2], "unknown": ["nope"]}
    consumer = h.applier.machine.bus.consumers["g:billing"]
    assert list(consumer.acked_keys) == ["orders:1", "orders:2"]
    _, nacked = await h.call("POST", f"/v1/subscriptions/{sub['id']}/nack", {"delivery_ids": [ids[2]]}, expect=200)
    assert nacked["nacked"] == [ids[2]]
    _, again = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?wait_s=2", expect=200)
    assert [(d["offset"], d["redelivered"]) for d in again["messages"]] == [(3, True)]


async def test_a_message_the_broker_hands_out_again_after_its_ack_committed_is_not_delivered(bound: Any) -> None:
    """The broker ack was lost (or the broker cannot dedupe a re-send): the
    committed key makes the service ack it at the broker and skip it."""
    h, transport = bound
    _, sub = await h.call("POST", "/v1/subscriptions", {"topic": "orders"}, expect=201)
    await h.call("POST", "/v1/topics/orders/messages", {"payload": "once"}, expect=200)
    await eventually(lambda: h.applier.machine.bus.bindings["orders"].cursor == 1, "the broker to hold it")
    _, got = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?wait_s=2", expect=200)
    delivery = got["messages"][0]
    # committed, the broker ack lost:
    await h.node.write_command(BusTransportAck.parse({"sub": sub["id"], "keys": ["orders:1"]}))
    await transport.nack("orders", sub["id"], [delivery["delivery_id"]])
    _, again = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?wait_s=0.3", expect=200)
    assert again["messages"] == []
    assert await transport.lag("orders", sub["id"]) == 0  # acked at the broker this time


async def test_a_cluster_wide_transport_url_is_committed_used_and_never_shown(make_harness: HarnessFactory) -> None:
    made: dict[str, InMemoryTransport] = {}

    def factory(name: str, url: str) -> InMemoryTransport:
        if name != "mem":
            raise InvalidInput(f"transports.{name}: unknown transport", field="name")
        made[url] = InMemoryTransport(url, namespace="t")
        return made[url]

    h = await make_harness(transport_factory=factory)
    secret_url = "memory://user:s3cret@broker:1"
    await h.call("PUT", "/v1/transports/mem", {"url": secret_url}, expect=200)
    await eventually(lambda: "mem" in h.node.transports.transports, "the node to make the transport")
    await h.call("PUT", "/v1/topics/jobs/binding", {"transport": "mem"}, expect=200)
    await h.call("POST", "/v1/topics/jobs/messages", {"payload": 1}, expect=200)
    await eventually(lambda: made[secret_url]._topics.get("jobs"), "the message at the cluster-wide transport")
    _, listing = await h.call("GET", "/v1/transports", expect=200)
    assert listing["transports"] == [{"name": "mem", "source": "cluster", "url": "memory://user:***@broker:1",
                                      "error": None, "ok": True, "detail": "in process",
                                      "guarantee": "exactly-once"}]
    for path in ("/v1/transports", "/v1/status", "/v1/bindings", "/metrics"):
        async with h.http.get(path) as response:
            assert "s3cret" not in await response.text(), path
    await h.call("PUT", "/v1/transports/kafka", {"url": "kafka://127.0.0.1:9092"}, expect=200)
    await eventually(lambda: "kafka" in h.node.transports.config_errors, "the unknown plugin to be reported")
    status, _ = await h.call("PUT", "/v1/transports/x", {"url": "no-scheme"})
    assert status == 400
    await h.call("DELETE", "/v1/topics/jobs/binding", expect=200)
    await h.call("DELETE", "/v1/transports/mem", expect=200)
    await eventually(lambda: "mem" not in h.node.transports.transports, "the transport to be dropped")
    status, _ = await h.call("DELETE", "/v1/transports/mem")
    assert status == 404


@pytest.fixture
async def direct(make_harness: HarnessFactory) -> tuple[Harness, InMemoryTransport]:
    transport = InMemoryTransport(namespace="t", ack_timeout_s=30)
    h = await make_harness(transports={"memory": transport})
    _, binding = await h.call("PUT", "/v1/topics/orders/binding", {"transport": "memory", "mode": "direct"},
                              expect=200)
    assert binding["mode"] == "direct"
    return h, transport


async def test_a_direct_publish_goes_to_the_broker_without_a_log_entry(direct: Any) -> None:
    h, transport = direct
    before = h.fingerprint()
    _, one = await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": 0}}, expect=200)
    assert one["direct"] is True and one["offset"] is None and one["id"].startswith("msg-")
    _, batch = await h.call("POST", "/v1/topics/orders/messages",
                            {"messages": [{"id": "a", "payload": 1}, {"id": "b", "payload": 2}],
                             "request_id": "r1"}, expect=200)
    assert [m["id"] for m in batch["messages"]] == ["a", "b"]
    assert h.fingerprint() == before  # nothing committed
    assert [e.message["payload"] for e in transport._topics["orders"]] == [{"i": 0}, 1, 2]
    # the same request again: the same broker keys, which this broker recognises
    await h.call("POST", "/v1/topics/orders/messages",
                 {"messages": [{"id": "a", "payload": 1}, {"id": "b", "payload": 2}], "request_id": "r1"},
                 expect=200)
    assert len(transport._topics["orders"]) == 3
    assert [e.key for e in transport._topics["orders"]][1:] == ["r/anonymous/r1/0", "r/anonymous/r1/1"]


async def test_a_direct_publish_refuses_what_it_cannot_carry_and_a_broker_outage_is_a_503(direct: Any) -> None:
    h, transport = direct
    status, body = await h.call("POST", "/v1/topics/orders/messages",
                                {"id": "x", "payload": 1, "deliveryOptions": {"guarantee": "exactly-once"}})
    assert status == 400 and body["error"]["field"] == "deliveryOptions.guarantee"
    status, body = await h.call("POST", "/v1/topics/orders/messages", {"payload": 1, "priority": 99})
    assert status == 400  # the same validation as a log publish
    transport.down = True
    async with h.http.post("/v1/topics/orders/messages", json={"payload": 1}) as response:
        assert response.status == 503 and response.headers.get("Retry-After")
    transport.down = False
    assert transport._topics.get("orders", []) == []
    # a log-mode entry naming the topic is refused by the state machine
    with pytest.raises(Conflict, match="is direct"):
        await h.node.write_command(BusPublish.parse({"topic": "orders", "messages": [
            {"id": "m", "type": "event", "source": "s"}]}))
    status, body = await h.call("PUT", "/v1/topics/orders/binding", {"transport": "memory"})
    assert status == 409 and "direct mode" in body["error"]["message"]
    status, body = await h.call("POST", "/v1/topics/orders/request", {"payload": 1, "timeout_s": 1})
    assert status == 409 and "request/reply" in body["error"]["message"]


async def test_a_direct_subscription_is_served_from_the_broker_and_checkpointed(direct: Any) -> None:
    h, _transport = direct
    _, sub = await h.call("POST", "/v1/subscriptions", {"topic": "orders", "group": "billing"}, expect=201)
    for i in range(3):
        await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": i}}, expect=200)
    _, got = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?max=10&wait_s=2", expect=200)
    assert [d["message"]["payload"] for d in got["messages"]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [d["offset"] for d in got["messages"]] == [1, 2, 3]  # the broker's sequence
    assert {d["guarantee"] for d in got["messages"]} == {"at-least-once"}
    ids = [d["delivery_id"] for d in got["messages"]]
    before = h.fingerprint()
    _, acked = await h.call("POST", f"/v1/subscriptions/{sub['id']}/ack", {"delivery_ids": [*ids[:2], "nope"]},
                            expect=200)
    assert acked == {"acked": ids[:2], "unknown": ["nope"]}
    _, nacked = await h.call("POST", f"/v1/subscriptions/{sub['id']}/nack", {"delivery_ids": [ids[2]]}, expect=200)
    assert nacked["nacked"] == [ids[2]]
    assert h.fingerprint() == before  # acks and nacks are the broker's, not the log's
    _, again = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?wait_s=2", expect=200)
    assert [(d["offset"], d["redelivered"]) for d in again["messages"]] == [(3, True)]
    await h.call("POST", f"/v1/subscriptions/{sub['id']}/ack", {"delivery_ids": [again["messages"][0]["delivery_id"]]},
                 expect=200)
    await h.node.bus.checkpoint_once()  # what run_checkpoints does every second
    consumer = h.applier.machine.bus.consumers["g:billing"]
    assert consumer.counters["acked"] == 3 and consumer.counters["position"] == 3
    await h.node.bus.checkpoint_once()
    assert consumer.counters["acked"] == 3  # nothing new: nothing committed


async def test_a_direct_fetch_copies_the_brokers_json_text_of_a_message(direct: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport that hands over the JSON text a message was parsed from
    (``message_json``, NATS) has it copied into the response: the client
    reads the same deliveries as when the message is encoded again."""
    h, transport = direct
    _, sub = await h.call("POST", "/v1/subscriptions", {"topic": "orders", "group": "billing"}, expect=201)
    for i in range(4):
        await h.call("POST", "/v1/topics/orders/messages", {"payload": {"i": i, "text": "größer \u2028 \"q\""}},
                     expect=200)
    fetch = transport.fetch
    texts: list[bytes] = []

    async def with_text(*args: Any) -> Any:  # every other one with its text, as a transport may
        got = await fetch(*args)
        out = []
        for n, d in enumerate(got):
            text = json.dumps(d.message, ensure_ascii=False, separators=(", ", ": ")).encode() if n % 2 else b""
            texts.append(text)
            out.append(dataclasses.replace(d, message_json=text))
        return out

    monkeypatch.setattr(transport, "fetch", with_text)
    async with h.http.get(f"/v1/subscriptions/{sub['id']}/messages?max=10&wait_s=2") as response:
        assert response.status == 200 and response.content_type == "application/json"
        raw = await response.read()
    got = json.loads(raw)
    assert set(got) == {"messages", "backlog"} and len(got["messages"]) == 4
    assert [d["message"]["payload"] for d in got["messages"]] == [
        {"i": i, "text": "größer \u2028 \"q\""} for i in range(4)]
    assert all(set(d) >= {"delivery_id", "attempt", "redelivered", "topic", "offset", "guarantee"}
               for d in got["messages"])
    assert texts[1] in raw and texts[3] in raw  # copied as the broker held them, spacing and all


async def test_a_node_without_the_transport_answers_503_naming_it(direct: Any) -> None:
    h, transport = direct
    del h.node.bus.transports["memory"]  # as on a node whose config lacks it
    try:
        async with h.http.post("/v1/topics/orders/messages", json={"payload": 1}) as response:
            body = await response.json()
            assert response.status == 503 and response.headers.get("Retry-After")
        assert "'memory' is not configured on this node" in body["error"]["message"]
    finally:
        h.node.bus.transports["memory"] = transport
    assert transport._topics.get("orders", []) == []


async def test_a_publish_that_met_the_direct_binding_in_the_log_goes_direct(direct: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose replica had not applied the binding yet proposes a log
    publish; the log refuses it (409, the topic is direct), and the node,
    now knowing the binding, sends the messages to the broker instead."""
    h, transport = direct
    service = h.node.bus
    real = service.direct_binding
    lagging = iter([None, None])  # the route's check and the service's first look: not applied yet
    monkeypatch.setattr(service, "direct_binding", lambda topic: next(lagging, None) or real(topic))
    _, answer = await h.call("POST", "/v1/topics/orders/messages", {"payload": "late"}, expect=200)
    assert answer["direct"] is True
    assert [e.message["payload"] for e in transport._topics["orders"]] == ["late"]
