"""HTTP to agents, shared by the saga orchestrator and the balancer."""

from __future__ import annotations

import aiohttp


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
