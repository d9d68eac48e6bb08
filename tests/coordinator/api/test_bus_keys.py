"""A keyed consumer group over HTTP and the Python client."""

from __future__ import annotations

from coordinator.client import CoordinatorClient
from tests.coordinator.api.conftest import Harness


async def test_a_keyed_group_over_http(h: Harness, client: CoordinatorClient) -> None:
    status, error = await h.call("POST", "/v1/subscriptions", {"topic": "orders", "key": "order"})
    assert status == 400 and error["error"]["field"] == "key"
    m1 = await client.subscribe("orders", group="g", key="payload.order")
    m2 = await client.subscribe("orders", group="g", key="payload.order")
    for order in ("A", "A", "B"):
        await client.publish("orders", {"payload": {"order": order}})
    first = await client.fetch(m1, max=10)
    assert [(d["key"], d["key_seq"]) for d in first] == [("A", 1), ("B", 1)]
    assert [d["seq"] for d in first] == [1, 3]
    assert await client.fetch(m2, max=10) == []
    await client.ack(m1, [d["delivery_id"] for d in first])
    assert [(d["key"], d["key_seq"]) for d in await client.fetch(m1, max=10)] == [("A", 2)]
    _, described = await h.call("GET", f"/v1/subscriptions/{m1}", expect=200)
    assert described["key"] == "payload.order", described
