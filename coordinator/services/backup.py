"""Consistent snapshots for backups (``GET /v1/snapshot``).

``take()`` first runs the linearizable read barrier (ReadIndex through the
leader, or a barrier entry): once it returns, the local replica holds every
entry committed before the request. It then takes ``Applier.snapshot()``
synchronously on the loop, so the state it captures is exactly the one at
``applied_index`` (nothing applies between two awaits), together with the
digest at that index and the engine's current term. Checksumming and framing
(``coordinator.snapshot_file``) run in a thread.

Cost: the synchronous part is the state machine's own ``snapshot()`` (the
same the engine takes for log compaction), which blocks this node's loop
for its duration (measured in docs/benchmarks.md, "Backup and restore":
``bench/backup.py``). About two thirds of it is msgpack encoding, which
holds the GIL: done in a thread it would stall the loop all the same.
At most one snapshot is taken per node at a time: a second request while one
runs is refused at once with ``RateLimited`` (429, Retry-After), so backups
cannot pile up copies of the state in memory.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from coordinator import snapshot_file
from coordinator.errors import RateLimited
from coordinator.ports import ConsensusEngine
from coordinator.services.applier import Applier


@dataclass(frozen=True, slots=True)
class Taken:
    data: bytes  # the whole snapshot file
    checksum: str
    header: dict[str, Any]
    snapshot_ms: float  # how long the loop was blocked taking the state


class SnapshotTaker:
    def __init__(self, applier: Applier, engine: ConsensusEngine, node_id: str,
                 barrier: Any, wall_ms: Any) -> None:
        """``barrier``: ``async (consistency) -> None``, the node's read barrier;
        ``wall_ms``: the clock's wall time in ms (for the header only)."""
        self._applier = applier
        self._engine = engine
        self._node_id = node_id
        self._barrier = barrier
        self._wall_ms = wall_ms
        self._busy = False
        self.taken = 0
        self.refused_busy = 0
        self.last_snapshot_ms = 0.0
        self.last_bytes = 0

    async def take(self) -> Taken:
        """A snapshot file of the state as of (at least) this call. Raises
        ``RateLimited`` while another is being taken here, and what the read
        barrier raises (503 without a quorum, or once this replica halted)."""
        if self._busy:
            self.refused_busy += 1
            raise RateLimited("a snapshot is already being taken on this node; try again shortly",
                              retry_after_s=1.0)
        self._busy = True
        try:
            await self._barrier("linearizable")
            started = time.perf_counter()
            body = self._applier.snapshot()  # on the loop: the state at exactly this index
            snapshot_ms = (time.perf_counter() - started) * 1000
            header = self._header()
            data, checksum = await asyncio.to_thread(snapshot_file.encode, header, body)
        finally:
            self._busy = False
        self.taken += 1
        self.last_snapshot_ms = snapshot_ms
        self.last_bytes = len(data)
        return Taken(data, checksum, {**header, "body_bytes": len(body)}, snapshot_ms)

    def _header(self) -> dict[str, Any]:
        """Index, term, digest and what the state holds (read on the loop, in
        the same step as the snapshot)."""
        m = self._applier.machine
        digest = self._applier.digest
        status = self._engine.status()
        return {
            "index": m.applied_index,
            "term": status.term,
            "digest": {"index": digest.index, "value": digest.value.hex()},
            "node": self._node_id,
            "created_ms": int(self._wall_ms()),
            "holds": {
                "keys": len(m.kv),
                "kv_revision": m.kv.revision,
                "agents": len(m.registry.agents),
                "locks": len(m.locks.locks),
                "topics": len(m.bus.topics),
                "subscriptions": len(m.bus.subscriptions),
                "sagas": len(m.sagas.sagas),
                "stored_events": m.store.events_count,
                "members": len(m.members.members),
            },
            "members": sorted(({"id": member_id, "raft": member.raft, "http": member.http}
                               for member_id, member in m.members.members.items()), key=lambda r: r["id"]),
        }
