"""Linearizable reads: by ReadIndex where the engine offers it, else through
a barrier in the log; stale reads from local state.

A leader cut off from the majority believes it leads for a while, so a
default read never trusts local leadership. On an engine that confirms reads
(``coordinator.ports.ConfirmsReads``: raft) the engine takes the leader's
commit index after the read began, confirms with a heartbeat round that a
majority still follows that leader, and returns once the local replica
applied up to the index (Raft thesis §6.4); nothing is written to the log.
Otherwise (PBFT, or when the engine refuses: no leader known, a new leader
that has not committed an entry of its term yet) the read commits a
``barrier`` entry and reads once the local replica applied it. Only a leader
with a live majority can commit; the barrier is ordered after every write
acknowledged before the read began, so the read sees them all.

Concurrent reads share barriers: a read joins the next barrier that has not
been proposed yet, never one already under way (that one may have been
ordered before the read began). Under load one barrier serves many reads.
The engine shares its heartbeat rounds the same way.

``barrier`` itself always goes through the log: a new leader's services use
it to know that every later entry is theirs.
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.commands.cluster import Barrier
from coordinator.errors import CoordinatorError, ReadIndexRefused
from coordinator.ports import ConfirmsReads
from coordinator.services.applier import Applier
from coordinator.services.proposals import Proposer, raise_for

log = logging.getLogger(__name__)


class Reads:
    def __init__(self, proposer: Proposer, applier: Applier, confirms: ConfirmsReads | None = None) -> None:
        self.proposer = proposer
        self.applier = applier
        self.confirms = confirms
        self.barriers = 0
        self.read_index_reads = 0  # confirmed by the engine without a log entry
        self.read_index_refused = 0  # the engine refused; a barrier confirmed them instead
        self._next: asyncio.Future[int] | None = None
        self._lock = asyncio.Lock()

    async def linearizable(self) -> None:
        """Before a linearizable read of local state: return once the local
        replica reflects every write acknowledged before this call. Raises
        ``Unavailable`` (no majority confirmed the leader, or the barrier
        failed), ``ReplicaHalted``, or like ``Proposer.propose``."""
        if self.confirms is not None:
            try:
                await self.confirms.read_index()
            except ReadIndexRefused:
                self.read_index_refused += 1
            else:
                self.read_index_reads += 1
                await self.applier.wait_applied(0)  # ReplicaHalted when the replica stopped meanwhile
                return
        await self.barrier()

    async def barrier(self) -> int:
        """Wait until the local replica reflects every write committed before
        this call; returns the barrier's index. Raises like ``Proposer.propose``."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_retrieve)
            asyncio.get_running_loop().create_task(self._run(self._next))
        return await asyncio.shield(self._next)

    async def barrier_until_done(self, who: str) -> int:
        """A new leader's first barrier (its replica then holds every committed
        entry), retried until it succeeds; the caller cancels it on step-down.
        Returns the barrier's index: every later entry was appended by this leader."""
        attempt = 0
        while True:
            try:
                return await self.barrier()
            except CoordinatorError as exc:
                attempt += 1
                log.info("%s: barrier after election failed (%s), retrying", who, exc.message)
                await asyncio.sleep(min(0.05 * attempt, 0.5))

    async def _run(self, future: asyncio.Future[int]) -> None:
        async with self._lock:
            if self._next is future:
                self._next = None  # later reads need a barrier proposed after them
            try:
                self.barriers += 1
                result = await self.proposer.propose(Barrier.op, Barrier().to_args())
                index = raise_for(result)["index"]
                await self.applier.wait_applied(index)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(index)


def _retrieve(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()
