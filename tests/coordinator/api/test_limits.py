"""What callers may hold open on a node: SSE streams and long polls per
principal and in total (429 / 503 naming the limit), and connections (a 503
over real sockets, then closed)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientSession, web

from coordinator.api.app import make_app
from coordinator.api.auth import AuthSettings
from coordinator.api.limits import OPEN, BoundedRunner, OpenLimits, connections_cap
from tests.coordinator.api.conftest import Harness
from tests.sse import open_stream
from tests.waiting import eventually

TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def _limited(h: Harness, aiohttp_client: Any, per_principal: int, total: int) -> Any:
    app = make_app(h.node, AuthSettings(allow_anonymous=True, admin_token=TOKEN),
                   limits=OpenLimits(long_requests_per_principal=per_principal, long_requests_max=total))
    return await aiohttp_client(app)


async def test_one_caller_holds_at_most_its_share_of_streams(h: Harness, aiohttp_client: Any) -> None:
    http = await _limited(h, aiohttp_client, per_principal=2, total=10)
    first = await open_stream(http, "/v1/watch/events")
    second = await open_stream(http, "/v1/watch?prefix=a/")
    refused = await http.get("/v1/watch/events")
    body = await refused.json()
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert body["error"]["code"] == "rate_limited" and body["error"]["limit"] == "long_requests_per_principal"
    assert "anonymous caller 127.0.0.1" in body["error"]["message"]
    # Another principal (the admin) still gets its own share.
    admin = await open_stream(http, "/v1/watch/events", ADMIN)
    # Short requests are never counted: reads and a fetch that does not wait still answer.
    sub = (await (await http.post("/v1/subscriptions", json={"topic": "t"})).json())["id"]
    assert (await http.get(f"/v1/subscriptions/{sub}/messages?wait_s=0")).status == 200
    assert (await http.get("/v1/kv/a")).status == 404
    # A waiting fetch is a long request like a stream.
    waiting = await http.get(f"/v1/subscriptions/{sub}/messages?wait_s=5")
    assert waiting.status == 429
    # Closing a stream gives its slot back.
    first.close()
    slots = http.server.app[OPEN]
    await eventually(lambda: slots.by_principal.get("anonymous caller 127.0.0.1") == 1, "the slot to be freed")
    third = await open_stream(http, "/v1/watch/events")
    assert slots.refused["per_principal"] == 2
    for response in (second, admin, third):
        response.close()
    await eventually(lambda: slots.total == 0, "every slot to be freed")


async def test_the_node_holds_at_most_its_total(h: Harness, aiohttp_client: Any) -> None:
    http = await _limited(h, aiohttp_client, per_principal=2, total=3)
    held = [await open_stream(http, "/v1/watch/events"), await open_stream(http, "/v1/watch/events"),
            await open_stream(http, "/v1/watch/events", ADMIN)]
    refused = await http.get("/v1/watch/events", headers=ADMIN)
    body = await refused.json()
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert body["error"]["limit"] == "long_requests_max"
    assert http.server.app[OPEN].refused == {"per_principal": 0, "total": 1, "connections": 0}
    metrics = await (await http.get("/metrics")).text()
    assert "coord_http_long_requests 3.0" in metrics
    assert 'coord_http_open_refused_total{limit="total"} 1.0' in metrics
    for response in held:
        response.close()


async def test_a_refused_long_request_holds_nothing(h: Harness, aiohttp_client: Any) -> None:
    http = await _limited(h, aiohttp_client, per_principal=1, total=1)
    response = await http.get("/v1/watch/events?from_seq=0")  # a 400 from the handler
    assert response.status == 400
    slots = http.server.app[OPEN]
    assert slots.total == 0 and slots.by_principal == {}


async def test_connections_over_the_cap_get_a_503_and_are_closed(h: Harness) -> None:
    """Real sockets: the cap holds before any handler runs, and the node keeps serving."""
    app = make_app(h.node, AuthSettings(allow_anonymous=True))
    runner = BoundedRunner(app, connections_max=16)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(16):  # idle connections, up to the cap
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            held.append(writer)
        await eventually(lambda: len(runner.server.connections) == 16, "16 connections to be accepted")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            answer = await reader.read()  # the node writes its refusal and closes
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
        assert json.loads(body)["error"]["limit"] == "connections_max"
        assert app[OPEN].refused["connections"] == 1
        for w in held[:8]:
            w.close()
        await eventually(lambda: len(runner.server.connections) <= 8, "closed connections to be let go")
        async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/v1/status") as response:
            assert response.status == 200
    finally:
        for w in held:
            w.close()
        await runner.cleanup()


def test_the_connection_cap_stays_under_the_descriptor_limit(monkeypatch: Any) -> None:
    import coordinator.api.limits as limits

    monkeypatch.setattr(limits.resource, "getrlimit", lambda _kind: (1024, 4096))
    assert connections_cap(8192) == 1024 - limits.FD_RESERVE
    assert connections_cap(100) == 100
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _kind: (100, 100))
    assert connections_cap(8192) == 16


async def test_a_request_line_over_the_parser_limit_is_a_json_400_naming_the_url(h: Harness) -> None:
    """aiohttp's parser refuses it before any handler: the answer is still the
    error body, naming the field (found by tests/integration/test_openapi_fuzz.py)."""
    app = make_app(h.node, AuthSettings(allow_anonymous=True))
    runner = BoundedRunner(app, connections_max=16, max_line_size=8190, max_field_size=8190)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/kv", params={"prefix": "p" * 9000}) as response:
                assert response.status == 400
                assert (await response.json())["error"]["field"] == "url"
            async with session.get(f"http://127.0.0.1:{port}/v1/status", headers={"X-Big": "v" * 9000}) as response:
                assert response.status == 400
                assert (await response.json())["error"]["field"] == "headers"
            async with session.get(f"http://127.0.0.1:{port}/v1/status") as response:
                assert response.status == 200
        for raw, field in ((b"GET /v1/kv/\xc3\xa9 HTTP/1.1", "url"), (b"G(T /v1/status HTTP/1.1", "method")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await reader.read()
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400" and json.loads(body)["error"]["field"] == field, answer
    finally:
        await runner.cleanup()
