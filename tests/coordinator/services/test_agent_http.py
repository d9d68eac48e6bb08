"""The endpoint guard (coordinator/services/agent_http.py) over real sockets:
the leader's calls to agents refuse, at connect time, an address the admin
did not allow, whatever name led there (a DNS answer that changed since the
endpoint was registered: rebinding), and connect where it is allowed.

The agent is a real TCP server on 127.0.0.1 that counts the connections it
accepted: a refusal must leave it at zero (nothing was sent).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver

from coordinator.services.agent_http import EndpointGuard

REBOUND = "rebind.example.com"  # a public-looking name whose DNS answer is now 127.0.0.1


class ReboundResolver(AbstractResolver):
    """DNS as an attacker controls it: every name resolves to 127.0.0.1."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": 0}]

    async def close(self) -> None:
        return None


class Agent:
    """A minimal HTTP agent: answers 200 to anything, counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            async with asyncio.timeout(5):
                await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    a = Agent()
    a.server = await asyncio.start_server(a.serve, "127.0.0.1", 0)
    try:
        yield a
    finally:
        a.server.close()
        await a.server.wait_closed()


async def _get(guard: EndpointGuard, url: str, **connector: Any) -> int:
    async with aiohttp.ClientSession(connector=guard.connector(**connector)) as session, \
            session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status


async def test_a_loopback_address_is_refused_at_connect_time_and_nothing_reaches_it(agent: Agent) -> None:
    guard = EndpointGuard(lambda: [])
    assert guard.refusal(f"127.0.0.1:{agent.port}") is not None
    with pytest.raises(aiohttp.ClientConnectorError, match=r"refused to connect: 127\.0\.0\.1 is a loopback"):
        await _get(guard, f"http://127.0.0.1:{agent.port}/")
    assert agent.connections == 0


async def test_a_name_that_resolves_to_loopback_now_is_refused_at_connect_time(agent: Agent) -> None:
    """The name passes the registration check (a public name, the list is
    empty); the address the socket would connect to does not."""
    guard = EndpointGuard(lambda: [])
    assert guard.refusal(f"{REBOUND}:{agent.port}") is None
    with pytest.raises(aiohttp.ClientConnectorError, match="refused to connect"):
        await _get(guard, f"http://{REBOUND}:{agent.port}/", resolver=ReboundResolver(), use_dns_cache=False)
    assert agent.connections == 0
    assert guard.refused == 1


async def test_what_the_admin_allows_is_connected_to(agent: Agent) -> None:
    allow = ["127.0.0.1/32"]
    guard = EndpointGuard(lambda: allow)
    assert await _get(guard, f"http://127.0.0.1:{agent.port}/") == 200
    allow = ["10.0.0.0/8"]  # changed by the admin: refused from the next connection on
    with pytest.raises(aiohttp.ClientConnectorError):
        await _get(guard, f"http://127.0.0.1:{agent.port}/")
    assert agent.connections == 1


async def test_the_tcp_probe_connects_only_to_an_allowed_address(agent: Agent) -> None:
    allow: list[str] = []
    guard = EndpointGuard(lambda: allow)
    with pytest.raises(OSError, match="refused to connect"):
        await guard.open_connection(f"localhost:{agent.port}", 5)
    allow = ["127.0.0.0/8", "::1"]
    _, writer = await guard.open_connection(f"127.0.0.1:{agent.port}", 5)
    writer.close()
    await writer.wait_closed()
    assert agent.connections == 1


async def test_an_anonymous_nodes_guard_allows_everything(agent: Agent) -> None:
    guard = EndpointGuard(None)
    assert guard.refusal(f"127.0.0.1:{agent.port}") is None
    assert await _get(guard, f"http://127.0.0.1:{agent.port}/") == 200
