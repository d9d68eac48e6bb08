"""Every test of the core runs under blockbuster: a blocking call (file or
socket I/O, sleep, lock wait) made from our code on the event loop fails it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    with blockbuster_ctx(["coordinator"]) as bb:
        yield bb
