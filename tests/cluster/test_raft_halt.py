"""The raft engine stops driving a replica that raised while applying, and its
watchdog gives up on a stall that comes back at the same index (issue 20,
item 10). A one-node pysyncobj cluster in-process: it elects itself, so
entries commit and apply through the real bridge and tick thread."""

from __future__ import annotations

import asyncio
import functools
import logging

from cluster import raft_pysyncobj as raft
from coordinator.codec import encode_command
from coordinator.commands.kv import KvPut
from coordinator.services.applier import Applier
from coordinator.types import Command
from tests.cluster.pbft.harness import free_ports
from tests.waiting import eventually

SECRET = "s" * 32
WAIT_S = 15.0  # a one-node pysyncobj cluster elects itself and applies well within this
POLL_S = 0.02
# The wait of these one-node engine tests (and of test_raft_compaction and test_raft_entries, which share the setup).
until = functools.partial(eventually, timeout_s=WAIT_S, interval_s=POLL_S)


def _engine(tmp_path, applier: Applier, address: str | None = None, **kwargs) -> raft.PySyncObjEngine:
    """A one-node engine on a fresh port, or on ``address``: a restart must reuse the address,
    since a snapshot records the members by address (another one would be a second, absent voter)."""
    address = address or f"127.0.0.1:{free_ports(1)[0]}"
    return raft.PySyncObjEngine(node_id="n1", address=address, peers=[], data_dir=str(tmp_path), secret=SECRET,
                                fsm=applier, durability="none", election_timeout_s=(0.2, 0.4), heartbeat_s=0.05,
                                **kwargs)


def _put(key: str, value: int) -> bytes:
    return encode_command(Command(op="kv.put", args={"key": key, "value": value}, now_ms=1))


async def _submit(engine: raft.PySyncObjEngine, blob: bytes) -> str | None:
    future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    engine.submit(blob, lambda reason: future.done() or future.set_result(reason))
    async with asyncio.timeout(10):
        return await future


async def _write(engine: raft.PySyncObjEngine, key: str, value: int) -> None:
    """Submit until committed (a one-node cluster needs an election first)."""

    async def committed() -> bool:
        return await _submit(engine, _put(key, value)) is None

    await eventually(committed, f"{key} to be committed", WAIT_S, interval_s=0.05)


async def test_an_apply_that_raises_halts_the_engine_and_a_restart_replays(tmp_path, monkeypatch, caplog) -> None:
    from coordinator.state import machine

    caplog.set_level(logging.CRITICAL)
    applier = Applier()
    engine = _engine(tmp_path, applier, stall_timeout_s=0.3)
    roles: list[str] = []
    engine.on_role_change(roles.append)
    await engine.start()
    try:
        await _write(engine, "a", 1)
        await eventually(lambda: applier.machine.kv.get("a") is not None, "a to be applied", WAIT_S, interval_s=POLL_S)
        original = machine._HANDLERS[KvPut]

        def broken(sm, ctx, cmd):  # kv.put's handler takes its typed command
            if cmd.key == "b":
                raise LookupError("handler bug")
            return original(sm, ctx, cmd)

        monkeypatch.setitem(machine._HANDLERS, KvPut, broken)
        assert await _submit(engine, _put("b", 2)) is None  # committed: the log is fine, the replica is not
        await eventually(lambda: engine.halted is not None, "the engine to halt", WAIT_S, interval_s=POLL_S)
        failed_at = applier.failure.index
        assert engine.halted == f"apply failed at index {failed_at}: LookupError"
        status = engine.status()
        assert (status.role, status.healthy, status.problem) == ("stopped", False, engine.halted)
        assert status.term >= 1 and status.commit_index >= failed_at  # what it last knew, still reported
        await eventually(lambda: roles[-1:] == ["stopped"],
                         "listeners to hear that the node stopped leading", WAIT_S, interval_s=POLL_S)
        assert await _submit(engine, _put("c", 3)) == "no_leader"
        # the watchdog sees no SyncObj to watch and never rebuilds a halted engine
        rounds = engine.watch_rounds
        await eventually(lambda: engine.watch_rounds >= rounds + 2,
                         "two more rounds of the watchdog", WAIT_S, interval_s=POLL_S)
        await eventually(lambda: engine._halting is not None and engine._halting.done(),
                         "the SyncObj to be destroyed", WAIT_S, interval_s=POLL_S)
        assert engine.recoveries == 0 and engine._sync is None
    finally:
        await engine.stop()
    monkeypatch.undo()

    # A restart replays the journal into a fresh replica: with the bug gone, the entry applies.
    replayed = Applier()
    again = _engine(tmp_path, replayed)
    await again.start()
    try:
        await eventually(lambda: replayed.machine.kv.get("b") is not None,
                         "the replay to apply b", WAIT_S, interval_s=POLL_S)
        assert replayed.machine.kv.get("a").value == 1 and replayed.machine.kv.get("b").value == 2
        assert again.halted is None and replayed.failure is None
    finally:
        await again.stop()


async def test_a_stall_that_comes_back_at_the_same_index_halts_instead_of_rebuilding_forever(
        tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.CRITICAL)
    monkeypatch.setenv("COORD_FAILPOINTS", "apply_stall_always_at=4")
    applier = Applier()
    engine = _engine(tmp_path, applier, stall_timeout_s=0.3, rebuilds_max=2)
    await engine.start()
    try:
        await _write(engine, "a", 1)
        for i in range(6):  # past index 4: pysyncobj's apply loop stalls there, in every incarnation
            engine.submit(_put(f"k{i}", i), lambda reason: None)
        await eventually(lambda: engine.halted is not None, "the watchdog to give up", 30, interval_s=POLL_S)
        assert engine.recoveries == 2
        assert "apply stalled at index" in engine.halted and "again after 2 rebuilds" in engine.halted
        status = engine.status()
        assert status.role == "stopped" and not status.healthy and status.problem == engine.halted
        rounds = engine.watch_rounds
        await eventually(lambda: engine.watch_rounds >= rounds + 4,
                         "four more rounds of the watchdog", WAIT_S, interval_s=POLL_S)
        assert engine.recoveries == 2  # it looked, and rebuilt nothing
    finally:
        await engine.stop()
