"""Our log entries are the codec's bytes behind a command-type byte of our
own: no pickle in the journal or in appends (pysyncobj pickles a replicated
method's arguments, and every replica unpickles them to apply). Entries of
the older kind, written through pysyncobj's replicated method, still apply."""

from __future__ import annotations

import asyncio

from cluster import raft_pysyncobj as raft
from coordinator.services.applier import Applier
from tests.cluster.test_raft_halt import _engine, _put, _write, until


async def test_entries_are_our_bytes_not_a_pickle(tmp_path) -> None:
    applier = Applier()
    engine = _engine(tmp_path, applier)
    await engine.start()
    try:
        await _write(engine, "a", 1)
        blob = _put("b", 2)
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        engine.submit(blob, lambda reason: done.done() or done.set_result(reason))
        assert await asyncio.wait_for(done, 10) is None
        await until(lambda: applier.machine.kv.get("b") is not None, "b to be applied")
        ours = [entry for entry, _index, _term in engine._journal._entries if entry[:1] == b"\x07"]
        assert bytes([raft.COMMAND_TYPE_OURS]) + blob in ours
        assert all(b"\x80\x04" not in entry[:3] for entry in ours)  # no pickle protocol header in them
    finally:
        await engine.stop()


async def test_an_entry_of_the_older_kind_still_applies_after_a_restart(tmp_path) -> None:
    applier = Applier()
    engine = _engine(tmp_path, applier)
    await engine.start()
    try:
        await _write(engine, "new", 1)
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        # what a node of the previous version wrote: pysyncobj's replicated method, pickled
        engine._sync._apply(_put("old", 2), callback=lambda result, error: engine._bridge.post(
            ("done", lambda reason: done.done() or done.set_result(reason), None)))
        assert await asyncio.wait_for(done, 10) is None
        await until(lambda: applier.machine.kv.get("old") is not None, "the older entry to apply")
    finally:
        await engine.stop()
    replayed = Applier()
    again = _engine(tmp_path, replayed)
    await again.start()
    try:
        await until(lambda: replayed.machine.kv.get("old") is not None and replayed.machine.kv.get("new") is not None,
                     "both kinds to replay from the journal")
    finally:
        await again.stop()
