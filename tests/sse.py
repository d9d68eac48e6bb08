"""Reading the API's Server-Sent Events in tests: open a stream, then read
its events one at a time (the server's ``: connected`` and keep-alive
comments are skipped)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.waiting import DEADLINE_S


async def open_stream(http: TestClient, path: str, headers: dict[str, str] | None = None) -> ClientResponse:
    """GET ``path`` as an event stream: 200, ``text/event-stream``, and the
    ``: connected`` comment every stream starts with, read within 5 s. The
    caller closes the response (closed here when a check fails)."""
    response = await http.get(path, headers=headers)
    try:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        async with asyncio.timeout(DEADLINE_S):
            assert await response.content.readline() == b": connected\n"
    except BaseException:
        response.close()
        raise
    return response


@asynccontextmanager
async def streaming(http: TestClient, path: str, headers: dict[str, str] | None = None
                    ) -> AsyncIterator[ClientResponse]:
    """``open_stream`` as a context: the response is closed on leaving it."""
    response = await open_stream(http, path, headers)
    try:
        yield response
    finally:
        response.close()


async def read_event(response: ClientResponse, timeout_s: float = DEADLINE_S, *,
                     id_type: Callable[[str], Any] = int) -> dict[str, Any]:
    """The next event: ``{"id", "event", "data"}`` with ``data`` parsed as
    JSON, ``event`` "message" when the server named none, and ``id`` made by
    ``id_type`` (revisions, sequence numbers and positions are numbers; pass
    ``str`` for the bus's delivery ids), None when the event had none. Fails
    when the stream ends or nothing whole arrives within ``timeout_s``."""
    event: dict[str, Any] = {"id": None, "event": "message", "data": None}
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await response.content.readline()
            if not raw:
                raise AssertionError("the stream ended")
            line = raw.decode().rstrip("\n")
            if not line:
                if event["data"] is not None:
                    return event
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            if name == "id":
                event["id"] = id_type(value)
            elif name == "event":
                event["event"] = value
            elif name == "data":
                event["data"] = json.loads(value)
