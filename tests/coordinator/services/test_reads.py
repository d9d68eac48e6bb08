"""Linearizable reads through shared barriers; stale reads from local state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator.api.app import make_app
from coordinator.api.auth import AuthSettings
from coordinator.clock import ManualClock, SeededRng
from coordinator.errors import ReadIndexRefused, Unavailable
from coordinator.ports import ConfirmsReads
from coordinator.services.applier import Applier
from coordinator.services.node import CoordinatorNode, Identity
from tests.coordinator.services.conftest import Sim
from tests.fakes import SimEngine
from tests.waiting import eventually


async def test_concurrent_reads_share_one_barrier(sim: Sim) -> None:
    before = sim.ops().count("barrier")
    indexes = await asyncio.gather(*(sim.node.reads.barrier() for _ in range(20)))
    assert len(set(indexes)) == 1
    assert sim.ops().count("barrier") == before + 1
    assert sim.applier.applied_index >= indexes[0]


async def test_concurrent_http_gets_cause_far_fewer_barriers(sim: Sim, aiohttp_client: Any) -> None:
    http = await aiohttp_client(make_app(sim.node, AuthSettings(allow_anonymous=True)))
    async with http.put("/v1/kv/k", json={"value": "v"}) as response:
        assert response.status == 200

    async def get() -> Any:
        async with http.get("/v1/kv/k") as response:
            assert response.status == 200
            return await response.json()

    barriers = sim.node.reads.barriers
    log_barriers = sim.ops().count("barrier")
    answers = await asyncio.gather(*(get() for _ in range(20)))
    assert all(a["value"] == "v" for a in answers)
    used = sim.node.reads.barriers - barriers
    assert 1 <= used <= 5, used
    assert sim.ops().count("barrier") - log_barriers == used


async def test_a_read_never_joins_a_barrier_already_proposed(sim: Sim) -> None:
    """A barrier proposed before a read began may be ordered before a write the
    reader already saw acknowledged; so later reads wait for the next one."""
    sim.engine.hold = True
    first = asyncio.create_task(sim.node.reads.barrier())
    await eventually(lambda: sim.node.proposer.inflight == 1, "the first barrier to be proposed")
    proposed = sim.node.reads.barriers
    second = asyncio.create_task(sim.node.reads.barrier())
    third = asyncio.create_task(sim.node.reads.barrier())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()
    # One barrier at a time: the next waits for the first to finish, then serves both.
    assert sim.node.reads.barriers == proposed and sim.node.proposer.inflight == 1
    sim.engine.release()
    i1, i2, i3 = await asyncio.gather(first, second, third)
    assert i2 == i3 > i1
    assert sim.node.reads.barriers == proposed + 1


async def test_a_read_after_a_write_sees_it(sim: Sim, aiohttp_client: Any) -> None:
    http = await aiohttp_client(make_app(sim.node, AuthSettings(allow_anonymous=True)))
    for i in range(10):
        async with http.put("/v1/kv/counter", json={"value": i}) as response:
            assert response.status == 200
            revision = (await response.json())["revision"]
        async with http.get("/v1/kv/counter") as response:
            got = await response.json()
        assert got["value"] == i and got["revision"] == revision


async def test_a_barrier_waits_for_writes_proposed_before_it(sim: Sim) -> None:
    sim.engine.hold = True
    write = asyncio.create_task(sim.propose("kv.put", {"key": "k", "value": 1}))
    await eventually(lambda: sim.node.proposer.inflight == 1, "the write to be proposed")
    read = asyncio.create_task(sim.node.reads.barrier())
    await eventually(lambda: sim.node.proposer.inflight == 2, "the barrier to be proposed")
    sim.engine.release()
    index = await read
    assert sim.applier.machine.kv.get("k") is not None  # applied before the read returned
    assert (await write).index < index


async def test_a_failed_barrier_fails_every_reader_and_the_next_one_works(sim: Sim) -> None:
    sim.engine.no_leader = True
    results = await asyncio.gather(*(sim.node.reads.barrier() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    sim.engine.no_leader = False
    index = await sim.node.reads.barrier()
    assert index == sim.applier.applied_index


async def test_a_cancelled_reader_does_not_cancel_the_others(sim: Sim) -> None:
    sim.engine.hold = True
    quitter = asyncio.create_task(sim.node.reads.barrier())
    stayer = asyncio.create_task(sim.node.reads.barrier())
    await eventually(lambda: sim.node.proposer.inflight == 1, "the barrier to be proposed")
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    sim.engine.release()
    assert await stayer > 0


async def test_stale_consistency_proposes_nothing(sim: Sim) -> None:
    before = len(sim.engine.log)
    await sim.node.read_barrier("stale")
    assert len(sim.engine.log) == before
    await sim.node.read_barrier("linearizable")
    assert len(sim.engine.log) == before + 1


class ConfirmingSimEngine(SimEngine):
    """A SimEngine with ReadIndex (``coordinator.ports.ConfirmsReads``): the
    next ``read_index`` answers with the log's length, or raises ``refuse``."""

    def __init__(self, fsm: Any) -> None:
        super().__init__(fsm)
        self.refuse: Exception | None = None
        self.read_indexes = 0

    async def read_index(self) -> int:
        self.read_indexes += 1
        if self.refuse is not None:
            raise self.refuse
        return len(self.log)


@pytest.fixture
async def confirming() -> AsyncIterator[tuple[CoordinatorNode, ConfirmingSimEngine]]:
    applier = Applier()
    engine = ConfirmingSimEngine(applier)
    node = CoordinatorNode(Identity("n1", engine.address, "127.0.0.1:17001"), engine, applier, ManualClock(),
                           SeededRng(1), proposal_timeout_s=0.5)
    await node.start()
    try:
        await eventually(lambda: node.leases.active, "the lease keeper to become active")
        yield node, engine
    finally:
        await node.stop()


async def test_an_engine_that_confirms_reads_is_asked_instead_of_the_log(confirming) -> None:
    node, engine = confirming
    assert isinstance(engine, ConfirmsReads)
    before = len(engine.log)
    await asyncio.gather(*(node.read_barrier("linearizable") for _ in range(5)))
    assert len(engine.log) == before and engine.read_indexes == 5
    assert node.reads.read_index_reads == 5 and node.reads.read_index_refused == 0


async def test_a_refused_read_index_falls_back_to_a_barrier(confirming) -> None:
    node, engine = confirming
    engine.refuse = ReadIndexRefused("the leader has not committed an entry of its term yet")
    barriers = node.reads.barriers
    await node.read_barrier("linearizable")
    assert node.reads.barriers == barriers + 1 and node.reads.read_index_refused == 1


async def test_a_read_index_without_a_majority_fails_the_read(confirming) -> None:
    node, engine = confirming
    engine.refuse = Unavailable("no majority confirmed this leader")
    barriers = node.reads.barriers
    with pytest.raises(Unavailable) as raised:
        await node.read_barrier("linearizable")
    assert not isinstance(raised.value, ReadIndexRefused)
    assert node.reads.barriers == barriers  # no barrier: it could not have committed either


async def test_the_barrier_of_a_new_leader_still_goes_through_the_log(confirming) -> None:
    """Services that take over after an election need an entry of their own."""
    node, engine = confirming
    before = len(engine.log)
    index = await node.reads.barrier()
    assert len(engine.log) == before + 1 == index
