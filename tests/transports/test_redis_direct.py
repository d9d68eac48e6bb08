"""Direct publishes to Redis share pipelines: calls that come while one is
in flight go out together, and a call fails only for its own entries."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from coordinator.errors import Unavailable
from coordinator.types import TransportEntry
from tests.transports.conftest import URLS
from transports.redis_streams import RedisStreamsTransport

pytestmark = pytest.mark.integration


def _entries(topic: str, tag: str, n: int) -> list[TransportEntry]:
    return [TransportEntry(topic, 0, 0, {"id": f"{tag}{i}", "payload": i}, f"{tag}.{i}") for i in range(n)]


async def test_concurrent_direct_publishes_share_a_pipeline_and_fail_alone() -> None:
    transport = RedisStreamsTransport(URLS["redis"], namespace=f"coordtest{secrets.token_hex(4)}", timeout_s=3.0)
    await transport.start()
    pipelines = 0
    original = transport._xadd_direct

    async def counted(entries: list[TransportEntry]) -> list[object]:
        nonlocal pipelines
        pipelines += 1
        return await original(entries)

    transport._xadd_direct = counted  # type: ignore[method-assign]
    try:
        await transport.bind("orders")
        calls = [transport.publish_direct(_entries("orders", f"c{c}", 20)) for c in range(8)]
        calls.append(transport.publish_direct(_entries("never.bound", "x", 2)))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[:8] == [20] * 8
        assert isinstance(results[8], Unavailable) and "no stream" in results[8].message
        assert pipelines < 9  # the calls that came while the first was out went together
        await transport.subscribe("orders", "g")
        got = await transport.fetch("orders", "g", "c", 500, 0.5)
        assert sorted(d.key for d in got) == sorted(f"c{c}.{i}" for c in range(8) for i in range(20))
    finally:
        await transport.unbind("orders")
        await transport.close()
