"""Linearizable reads through a barrier in the log; stale reads from local state.

pysyncobj has no ReadIndex, and a leader cut off from the majority believes
it leads for a while. So a default read never trusts local leadership: it
commits a ``barrier`` entry and reads once the local replica applied it. Only
a leader with a live majority can commit; the barrier is ordered after every
write acknowledged before the read began, so the read sees them all.

Concurrent reads share barriers: a read joins the next barrier that has not
been proposed yet, never one already under way (that one may have been
ordered before the read began). Under load one barrier serves many reads.
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.errors import CoordinatorError
from coordinator.services.applier import Applier
from coordinator.services.proposals import Proposer, raise_for

log = logging.getLogger(__name__)


class Reads:
    def __init__(self, proposer: Proposer, applier: Applier) -> None:
        self.proposer = proposer
        self.applier = applier
        self.barriers = 0
        self._next: asyncio.Future[int] | None = None
        self._lock = asyncio.Lock()

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
                result = await self.proposer.propose("barrier", {})
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
