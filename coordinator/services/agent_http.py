"""HTTP to agents, shared by the saga orchestrator, the balancer and the
health checks, and the guard that keeps those calls off addresses the admin
did not allow (server-side request forgery; ``coordinator.commands.endpoints``)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from coordinator.commands.base import Rejected
from coordinator.commands.endpoints import address_refusal, endpoint_refusal, split_endpoint


def agent_url(endpoint: str, path: str) -> str:
    """An agent's registered endpoint (``host:port`` or a URL) joined with a path."""
    base = endpoint if endpoint.startswith(("http://", "https://")) else f"http://{endpoint}"
    return base.rstrip("/") + path


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` (reading stops there)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class EndpointGuard:
    """Where the leader may connect for an agent. ``allow_of`` gives the
    admin's current allow-list (replicated); None for a guard that allows
    everything (a node with ``--allow-anonymous``).

    Two checks: ``refusal`` on the endpoint as registered (its name against
    the list, a written address), before each call, since the list may have
    changed since; and, in every connector it makes, the address each
    socket is about to connect to (what DNS answered, the target of a
    redirect), so a name resolving to a refused address later is refused
    at connect time. Call on the event loop."""

    def __init__(self, allow_of: Callable[[], Sequence[str]] | None) -> None:
        self.allow_of = allow_of
        self.refused = 0  # connections and calls refused

    def refusal(self, endpoint: str) -> str | None:
        if self.allow_of is None:
            return None
        try:
            why = endpoint_refusal(endpoint, self.allow_of())
        except Rejected as exc:
            why = exc.message
        if why is not None:
            self.refused += 1
        return why

    def connector(self, **options: Any) -> aiohttp.TCPConnector:
        """A connector whose sockets refuse addresses the list does not allow."""
        if self.allow_of is None:
            return aiohttp.TCPConnector(**options)
        return aiohttp.TCPConnector(socket_factory=self._socket, **options)

    def _socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        why = address_refusal(str(address[0]), self.allow_of() if self.allow_of is not None else ())
        if why is not None and self.allow_of is not None:
            self.refused += 1
            raise OSError(errno.EACCES, f"refused to connect: {why}")
        return socket.socket(family=family, type=type_, proto=proto)

    async def open_connection(self, endpoint: str, timeout_s: float
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to ``endpoint``'s host and port, to an address the
        list allows (resolved once; the connection goes to that address).
        ``OSError`` when there is none."""
        host, port = split_endpoint(endpoint)
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            last: OSError = OSError(errno.EHOSTUNREACH, f"{host} has no address")
            for *_, address in infos:
                why = address_refusal(str(address[0]), self.allow_of()) if self.allow_of is not None else None
                if why is not None:
                    self.refused += 1
                    last = OSError(errno.EACCES, f"refused to connect: {why}")
                    continue
                try:
                    return await asyncio.open_connection(str(address[0]), port)
                except OSError as exc:
                    last = exc
            raise last
