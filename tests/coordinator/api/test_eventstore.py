"""The event store and projections over HTTP (coordinator/api/eventstore.py),
the category watch as Server-Sent Events, bad input, and permissions."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from coordinator.api.auth import AuthSettings
from coordinator.client import CoordinatorClient
from coordinator.codec import decode_command
from coordinator.errors import Conflict
from coordinator.state import Limits
from coordinator.state.eventstore import EventStoreLimits
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.coordinator.api.test_auth import ADMIN_TOKEN, CLUSTER_SECRET, _agent, as_admin, as_agent, join, refused
from tests.sse import open_stream, read_event

DAVE = _agent("dave", 9)


@pytest.fixture
async def secure(make_harness: HarnessFactory) -> Harness:
    """A node with the admin token and signed agents, no anonymous access."""
    return await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET))


def events(*types: str, **data: Any) -> list[dict[str, Any]]:
    return [{"type": t, "data": dict(data)} for t in types]


async def test_append_read_and_conflict(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/streams/order-1", {"expected_version": "no_stream",
                                                            "events": events("Placed", "Paid", amount=3)}, expect=201)
    assert (first["first_version"], first["version"], len(first["positions"])) == (0, 1, 2)
    before = h.fingerprint()
    status, error = await h.call("POST", "/v1/streams/order-1", {"expected_version": 0,
                                                                 "events": events("Shipped")})
    assert status == 409 and error["error"]["code"] == "conflict" and "version 1" in error["error"]["message"]
    assert h.fingerprint()[2:] == before[2:]  # the refused append changed nothing (it is a log entry)
    _, page = await h.call("GET", "/v1/streams/order-1", expect=200)
    assert [e["type"] for e in page["events"]] == ["Placed", "Paid"] and page["version"] == 1
    assert page["index"] >= first["index"] and page["events"][0]["data"] == {"amount": 3}
    _, back = await h.call("GET", "/v1/streams/order-1?direction=backward&limit=1", expect=200)
    assert [e["version"] for e in back["events"]] == [1] and back["next_version"] == 0
    await h.call("GET", "/v1/streams/order-404", expect=404)


async def test_retry_with_event_ids_is_idempotent(h: Harness) -> None:
    body = {"expected_version": -1, "events": [{"type": "Added", "data": {}, "id": "evt-1"}]}
    await h.call("POST", "/v1/streams/cart-1", body, expect=201)
    _, again = await h.call("POST", "/v1/streams/cart-1", body, expect=200)
    assert again["duplicate"] is True and again["version"] == 0


async def test_bad_input_is_refused_before_it_is_proposed(h: Harness) -> None:
    before = h.fingerprint()
    cases = [
        ({"events": [{"type": "A", "data": 1}, {"type": 7, "data": 1}]}, "events[1].type"),
        ({"events": [{"type": "A"}]}, "events[0].data"),
        ({"events": []}, "events"),
        ({"events": [{"type": "A", "data": 1}], "expected_version": "latest"}, "expected_version"),
        ({"events": [{"type": "A", "data": 1}], "bogus": 1}, "bogus"),
    ]
    for body, field in cases:
        status, error = await h.call("POST", "/v1/streams/order-1", body)
        assert status == 400 and error["error"]["field"] == field, (body, error)
    status, error = await h.call("POST", "/v1/streams/order-1", raw=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert status == 400 and error["error"]["field"] == "body"
    status, _ = await h.call("POST", "/v1/streams/order-1",
                             raw=io.BytesIO(b'{"events": [{"type": "A", "data": "' + b"x" * (2 << 20) + b'"}]}'),
                             headers={"Content-Type": "application/json"})
    assert status == 413
    for query, field in (("direction=sideways", "direction"), ("limit=0", "limit"), ("from_version=-1",
                                                                                    "from_version")):
        status, error = await h.call("GET", f"/v1/streams/order-1?{query}")
        assert status == 400 and error["error"]["field"] == field, query
    status, error = await h.call("PUT", "/v1/projections/p", {"source": {"category": "o"}, "fold": "sum"})
    assert status == 400 and error["error"]["field"] == "field"
    status, error = await h.call("PUT", "/v1/projections/p", {"source": {"category": "o-x"}, "fold": "count"})
    assert status == 400 and error["error"]["field"] == "source.category"
    status, error = await h.call("GET", "/v1/categories/a-b/events")
    assert status == 400 and error["error"]["field"] == "category"
    assert h.fingerprint() == before


async def test_a_full_store_answers_503_and_a_snapshot_makes_room(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(eventstore=EventStoreLimits(events_max=3)))
    await h.call("POST", "/v1/streams/log-1", {"events": events("E", "E", "E")}, expect=201)
    status, error = await h.call("POST", "/v1/streams/log-1", {"events": events("E")})
    assert status == 503 and error["error"]["code"] == "unavailable"
    _, snap = await h.call("PUT", "/v1/streams/log-1/snapshot", {"version": 1, "state": {"n": 2}, "truncate": True},
                           expect=200)
    assert snap["first_version"] == 2 and snap["dropped"] == 2
    await h.call("POST", "/v1/streams/log-1", {"expected_version": 2, "events": events("E")}, expect=201)
    _, page = await h.call("GET", "/v1/streams/log-1?from_version=0", expect=200)
    assert page["snapshot"]["state"] == {"n": 2} and [e["version"] for e in page["events"]] == [2, 3]
    await h.call("DELETE", "/v1/streams/log-1?expected_version=2", expect=409)
    await h.call("DELETE", "/v1/streams/log-1?expected_version=3", expect=200)
    await h.call("GET", "/v1/streams/log-1", expect=404)


async def test_categories_list_read_and_watch(h: Harness) -> None:
    await h.call("POST", "/v1/streams/order-1", {"events": events("Placed")}, expect=201)
    response = await open_stream(h.http, "/v1/categories/order/watch?from_position=1")
    try:
        first = await read_event(response)
        assert first["id"] == 1 and first["event"] == "Placed" and first["data"]["stream"] == "order-1"
        await h.call("POST", "/v1/streams/user-1", {"events": events("Joined")}, expect=201)
        await h.call("POST", "/v1/streams/order-2", {"events": events("Placed", "Paid")}, expect=201)
        second, third = await read_event(response), await read_event(response)
        assert [(e["id"], e["event"]) for e in (second, third)] == [(3, "Placed"), (4, "Paid")]
    finally:
        response.close()
    _, page = await h.call("GET", "/v1/categories/order/events?from_position=2&limit=1", expect=200)
    assert [e["position"] for e in page["events"]] == [3] and page["next_position"] == 4
    _, listed = await h.call("GET", "/v1/streams?category=order", expect=200)
    assert [s["stream"] for s in listed["streams"]] == ["order-1", "order-2"]
    _, stats = await h.call("GET", "/v1/eventstore", expect=200)
    assert stats["events"] == 4 and stats["streams"] == 3


async def test_watch_resumes_from_last_event_id_and_reports_truncation(h: Harness) -> None:
    await h.call("POST", "/v1/streams/job-1", {"events": events("A", "B", "C")}, expect=201)
    response = await open_stream(h.http, "/v1/categories/job/watch", headers={"Last-Event-ID": "1"})
    try:
        assert (await read_event(response))["id"] == 2
    finally:
        response.close()
    await h.call("PUT", "/v1/streams/job-1/snapshot", {"version": 1, "state": {}, "truncate": True}, expect=200)
    status, error = await h.call("GET", "/v1/categories/job/watch?from_position=1")
    assert status == 410 and error["error"]["code"] == "compacted" and error["error"]["dropped_through"] == 2


async def test_projections_over_http(h: Harness) -> None:
    await h.call("POST", "/v1/streams/order-1", {"events": [{"type": "Placed", "data": {"amount": 5, "s": "new"}}]},
                 expect=201)
    _, made = await h.call("PUT", "/v1/projections/revenue", {"source": {"category": "order"}, "fold": "sum",
                                                              "field": "amount", "group_by": "s"}, expect=200)
    assert made["value"] == {"new": 5}
    _, appended = await h.call("POST", "/v1/streams/order-2", {"events": [{"type": "Placed",
                                                                           "data": {"amount": 2, "s": "new"}}]},
                               expect=201)
    _, got = await h.call("GET", "/v1/projections/revenue", expect=200)
    assert got["value"] == {"new": 7} and got["index"] == appended["index"] and got["applied_index"] >= got["index"]
    assert got["position"] == appended["positions"][-1]
    _, rebuilt = await h.call("POST", "/v1/projections/revenue/rebuild", expect=200)
    assert rebuilt["value"] == {"new": 7}
    _, listed = await h.call("GET", "/v1/projections", expect=200)
    assert [p["name"] for p in listed["projections"]] == ["revenue"]
    await h.call("DELETE", "/v1/projections/revenue", expect=200)
    await h.call("GET", "/v1/projections/revenue", expect=404)


async def test_stream_permissions(secure: Harness) -> None:
    sh = secure
    """An agent holding ``stream`` on ``order-*`` appends and reads order
    streams and the order category, and nothing else; projections are the admin's."""
    await as_admin(sh, "PUT", "/v1/roles/orders-writer",
                   {"permissions": [{"action": "stream", "pattern": "order-*"}]}, expect=200)
    await join(sh, DAVE)
    await as_admin(sh, "PUT", f"/v1/agents/{DAVE.id}/roles", {"roles": ["orders-writer"]}, expect=200)
    await as_admin(sh, "POST", "/v1/streams/user-1", {"events": events("Joined")}, expect=201)
    await as_agent(sh, DAVE, "POST", "/v1/streams/order-1", {"events": events("Placed")}, expect=201)
    await as_agent(sh, DAVE, "GET", "/v1/streams/order-1", expect=200)
    await as_agent(sh, DAVE, "GET", "/v1/categories/order/events", expect=200)
    await as_agent(sh, DAVE, "GET", "/v1/streams?category=order", expect=200)
    await as_agent(sh, DAVE, "GET", "/v1/projections", expect=200)
    error = await refused(sh, 403, "POST", "/v1/streams/user-1", {"events": events("X")}, who=DAVE)
    assert (error["permission"], error["resource"]) == ("stream", "user-1")
    await refused(sh, 403, "GET", "/v1/streams/user-1", who=DAVE)
    await refused(sh, 403, "GET", "/v1/categories/user/events", who=DAVE)
    await refused(sh, 403, "GET", "/v1/streams", who=DAVE)
    await refused(sh, 403, "PUT", "/v1/projections/p", {"source": {"category": "order"}, "fold": "count"}, who=DAVE)
    await refused(sh, 401, "GET", "/v1/streams/order-1")


async def test_the_python_client(h: Harness, client: CoordinatorClient) -> None:
    first = await client.append("order-7", [{"type": "Placed", "data": {"amount": 4}}], expected_version="no_stream")
    assert first["version"] == 0
    with pytest.raises(Conflict):
        await client.append("order-7", [{"type": "Placed", "data": {}}], expected_version="no_stream")
    await client.append("order-7", [{"type": "Paid", "data": {"amount": 4}}], expected_version=0)
    page = await client.read_stream("order-7")
    assert [e["type"] for e in page["events"]] == ["Placed", "Paid"]
    assert [e["version"] for e in (await client.read_stream("order-7", backward=True))["events"]] == [1, 0]
    assert await client.read_stream("order-8") is None
    made = await client.put_projection("paid", {"source": {"category": "order"}, "fold": "count", "types": ["Paid"]})
    assert made["value"] == 1
    seen: list[dict[str, Any]] = []

    async def watch() -> None:
        async for event in client.watch_category("order", from_position=1):
            seen.append(event)
            if len(seen) == 3:
                return

    watcher = asyncio.create_task(watch())
    await client.append("order-9", [{"type": "Paid", "data": {}}])
    async with asyncio.timeout(5):
        await watcher
    assert [(e["stream"], e["type"]) for e in seen] == [("order-7", "Placed"), ("order-7", "Paid"),
                                                        ("order-9", "Paid")]
    assert (await client.projection("paid"))["value"] == 2
    assert (await client.rebuild_projection("paid"))["value"] == 2
    snap = await client.snapshot_stream("order-7", 1, {"paid": True}, truncate=True)
    assert snap["first_version"] == 2
    assert (await client.category_events("order"))["dropped_through"] == 2
    await client.delete_projection("paid")
    assert await client.projection("paid") is None
    await client.delete_stream("order-9", expected_version=0)
    assert await client.read_stream("order-9") is None


async def test_metrics(h: Harness) -> None:
    await h.call("POST", "/v1/streams/m-1", {"events": events("A", "B")}, expect=201)
    await h.call("PUT", "/v1/projections/n", {"source": {"category": "m"}, "fold": "count"}, expect=200)
    async with h.http.get("/metrics") as response:
        text = await response.text()
    assert "coord_eventstore_events 2.0" in text and "coord_eventstore_streams 1.0" in text
    assert 'coord_eventstore_total{kind="appended"} 2.0' in text and "coord_projections 1.0" in text


async def test_the_log_carries_what_the_client_sent_in_its_order(h: Harness) -> None:
    """The args of these writes are the log's bytes (and the digest chain's):
    the same as before the command types, keys in the client's order."""
    def last_args() -> list[tuple[str, Any]]:
        return list(decode_command(h.engine.log[-1]).args.items())

    event = {"data": {"n": 1}, "id": None, "type": "Placed"}
    await h.call("POST", "/v1/streams/order-1", {"events": [event], "expected_version": -1}, expect=201)
    assert last_args() == [("stream", "order-1"), ("events", [event]), ("expected_version", -1)]
    assert list(last_args()[1][1][0]) == ["data", "id", "type"]
    await h.call("PUT", "/v1/streams/order-1/snapshot", {"truncate": False, "state": {}, "version": 0}, expect=200)
    assert last_args() == [("stream", "order-1"), ("truncate", False), ("state", {}), ("version", 0)]
    await h.call("DELETE", "/v1/streams/order-1?expected_version=0", expect=200)
    assert last_args() == [("stream", "order-1"), ("expected_version", 0)]
    await h.call("PUT", "/v1/projections/p", {"fold": "count", "source": {"category": "order"}}, expect=200)
    assert last_args() == [("name", "p"), ("definition", {"source": {"category": "order"}, "types": None,
                                                          "fold": "count", "field": None, "group_by": None})]
    await h.call("POST", "/v1/projections/p/rebuild", expect=200)
    assert last_args() == [("name", "p")]
