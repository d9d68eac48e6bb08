"""The node's replica of the state machine, driven by the engine.

Implements ``coordinator.ports.ReplicatedFSM``. Decodes each committed entry,
applies it, hands the result to the proposal waiting for it (if this node
proposed it) and tells listeners (leases, watches, metrics).

Loop thread only.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable

from coordinator.codec import decode_command, decode_snapshot, encode_result, encode_snapshot
from coordinator.errors import CoordinatorError
from coordinator.state import Limits, StateMachine
from coordinator.types import Command, Result

log = logging.getLogger(__name__)

Listener = Callable[[Command, Result], None]


class Applier:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.machine = StateMachine(self.limits)
        self.undecodable = 0
        self.unencodable_results = 0
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._index_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._listeners: list[Listener] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self.version = 0  # grows on every apply, restore and reset
        self._change_waiters: list[asyncio.Future[None]] = []

    # -- ReplicatedFSM ---------------------------------------------------------

    def apply(self, index: int, blob: bytes) -> bytes:
        try:
            command = decode_command(blob)
        except CoordinatorError as exc:
            # Deterministic on every replica: the same bytes fail the same way.
            self.undecodable += 1
            log.error("entry %d is not a command (%s); applied as a no-op", index, exc.message)
            command = Command(op="noop", args={}, now_ms=0)
        result = self.machine.apply(index, command)
        if command.proposal_id is not None:
            waiter = self._waiters.pop(command.proposal_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(result)
        for listener in self._listeners:
            try:
                listener(command, result)
            except Exception:
                log.exception("apply listener failed at index %d", index)
        self._wake(index)
        return self._result_bytes(result)

    def _result_bytes(self, result: Result) -> bytes:
        try:
            return encode_result(result)
        except (TypeError, ValueError, OverflowError) as exc:
            # A domain returned something that is not plain data: a bug, but the
            # same on every replica, so a fixed marker keeps them comparable.
            self.unencodable_results += 1
            log.error("result at index %d is not plain data (%s)", result.index, type(exc).__name__)
            return encode_result(Result(result.index, value="<not plain data>", error=result.error))

    def snapshot(self) -> bytes:
        return encode_snapshot(self.machine.snapshot_data())

    def restore(self, blob: bytes) -> None:
        self.machine = StateMachine.from_snapshot_data(decode_snapshot(blob), self.limits)
        self._after_reset()
        self._wake(self.machine.applied_index)

    def reset(self) -> None:
        self.machine = StateMachine(self.limits)
        self._after_reset()

    # -- for services ------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self.machine.applied_index

    def expect(self, proposal_id: str) -> asyncio.Future[Result]:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters[proposal_id] = future
        return future

    def forget(self, proposal_id: str) -> None:
        self._waiters.pop(proposal_id, None)

    async def wait_applied(self, index: int) -> None:
        """Return once the local replica has applied ``index``."""
        if self.machine.applied_index >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._index_waiters, (index, self._seq, future))
        await future

    def on_apply(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_reset(self, listener: Callable[[], None]) -> None:
        self._reset_listeners.append(listener)

    def _wake(self, index: int) -> None:
        while self._index_waiters and self._index_waiters[0][0] <= index:
            _, _, future = heapq.heappop(self._index_waiters)
            if not future.done():
                future.set_result(None)
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        waiters, self._change_waiters = self._change_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def wait_change(self, seen_version: int) -> None:
        """Return once ``version`` is past ``seen_version`` (for watchers)."""
        if self.version > seen_version:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._change_waiters.append(future)
        await future

    def _after_reset(self) -> None:
        for listener in self._reset_listeners:
            try:
                listener()
            except Exception:
                log.exception("reset listener failed")
        self._changed()
