"""Redis Streams: a fetch whose remaining wait is under a millisecond must not
become ``XREADGROUP ... BLOCK 0``, which blocks forever (seen in CI: the
fetch hung until the transport's timeout and answered Unavailable)."""

from __future__ import annotations

import secrets

import pytest

from tests.transports.conftest import PLUGINS, transport_class
from transports.redis_streams import block_milliseconds

TOPIC = "orders.eu"


@pytest.mark.parametrize(("block_s", "block_ms"), [(0.0, None), (-1.0, None), (0.0001, 1), (0.0009, 1),
                                                    (0.001, 1), (0.0011, 2), (0.25, 250)])
def test_block_rounds_up_and_never_to_zero(block_s: float, block_ms: int | None) -> None:
    assert block_milliseconds(block_s) == block_ms


@pytest.mark.integration
async def test_a_sub_millisecond_read_returns_instead_of_blocking_forever() -> None:
    transport = transport_class("redis")(PLUGINS["redis"][1], namespace=f"coordtest{secrets.token_hex(4)}",
                                         timeout_s=3.0)
    await transport.start()
    try:
        await transport.bind(TOPIC)
        await transport.subscribe(TOPIC, "g")
        key = transport._key(TOPIC)
        # an empty group, a wait of 0.4 ms: nothing, at once (was: Unavailable after the 3-s timeout)
        assert await transport._read_new(TOPIC, key, "g", "c1", 10, 0.0004) == []
    finally:
        await transport.unbind(TOPIC)
        await transport.close()
