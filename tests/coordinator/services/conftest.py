"""A ``CoordinatorNode`` over ``SimEngine`` with a ``ManualClock``, without HTTP
(tests that need HTTP wrap it with ``aiohttp_client(make_app(node))``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from coordinator.clock import ManualClock, SeededRng
from coordinator.services.applier import Applier
from coordinator.services.node import CoordinatorNode, Identity
from coordinator.types import RequestKey, Result
from tests.fakes import SimEngine
from tests.waiting import eventually


@dataclass
class Sim:
    node: CoordinatorNode
    engine: SimEngine
    applier: Applier
    clock: ManualClock

    def ops(self) -> list[str]:
        """The operations in the log, in order (decoded from the engine's log)."""
        from coordinator.codec import decode_command

        return [decode_command(blob).op for blob in self.engine.log]

    async def propose(self, op: str, args: dict[str, Any], request: RequestKey | None = None) -> Result:
        return await self.node.proposer.propose(op, args, request)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    applier = Applier()
    engine = SimEngine(applier)
    clock = ManualClock()
    node = CoordinatorNode(Identity("n1", engine.address, "127.0.0.1:17001"), engine, applier, clock, SeededRng(1),
                           proposal_timeout_s=0.5, check_endpoints=False)  # test agents listen on loopback
    await node.start()
    try:
        await eventually(lambda: node.leases.active, "the lease keeper to become active")
        await eventually(lambda: "n1" in applier.machine.members.members, "the node to register itself")
        yield Sim(node, engine, applier, clock)
    finally:
        await node.stop()
