"""The node's replica of the state machine, driven by the engine.

Implements ``coordinator.ports.ReplicatedFSM``. Decodes each committed entry,
applies it, hands the result to the proposal waiting for it (if this node
proposed it) and tells listeners (leases, watches, metrics). Keeps the
replica's running ``StateDigest`` (``coordinator.state.digest``), which
snapshots carry.

Failure: a state machine refuses a bad command with ``Result.error`` and
never raises for it. Anything else raised while applying an entry or
restoring a snapshot is a bug, and the state may be half-applied: the
applier *halts*. It records ``failure`` (kind, index, exception type),
raises ``ReplicaHalted`` to the engine (which stops driving it and leaves
consensus), fails the proposals and index waiters pending here, and from
then on refuses every ``apply``, ``restore`` and ``snapshot`` (a snapshot of
a half-applied state must never be written or sent). Halting is for the
life of the process: a restart replays from the snapshot and journal, and a
deterministic bug fails again at the same index, which is the point.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from coordinator.codec import decode_command, decode_snapshot, encode_result, encode_snapshot
from coordinator.errors import CoordinatorError, OutcomeUnknown, ReplicaHalted
from coordinator.state import Limits, StateMachine
from coordinator.state.digest import StateDigest, summary_bytes
from coordinator.types import Command, Result

log = logging.getLogger(__name__)

Listener = Callable[[Command, Result], None]


@dataclass(frozen=True, slots=True)
class ApplyFailure:
    """Why this replica halted: ``kind`` "apply" or "restore", the log index,
    the exception's type name (never its message: it may quote data)."""

    kind: str
    index: int
    error: str

    @property
    def problem(self) -> str:
        return f"{self.kind} failed at index {self.index}: {self.error}"


class InjectedApplyFailure(RuntimeError):
    """Raised by the unsafe test failpoint ``fail_apply_at`` (a stand-in for a handler bug)."""


class Applier:
    def __init__(self, limits: Limits | None = None, *, fail_apply_at: int | None = None) -> None:
        """``fail_apply_at``: UNSAFE, tests only: applying the first entry at or
        past this index raises ``InjectedApplyFailure`` (the composition root
        sets it only from ``COORD_UNSAFE_TEST_FAIL_APPLY_AT``)."""
        self.limits = limits or Limits()
        self.machine = StateMachine(self.limits)
        self.digest = StateDigest()
        self.failure: ApplyFailure | None = None
        self._fail_apply_at = fail_apply_at
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
        """Apply the entry at ``index``; its result bytes. Raises
        ``ReplicaHalted`` (only) once this replica halted, at this entry or
        before: see the module docstring."""
        if self.failure is not None:
            self._refuse_if_halted()
        try:
            command = decode_command(blob)
        except CoordinatorError as exc:
            # Deterministic on every replica: the same bytes fail the same way.
            self.undecodable += 1
            log.error("entry %d is not a command (%s); applied as a no-op", index, exc.message)
            command = Command(op="noop", args={}, now_ms=0)
        try:
            if self._fail_apply_at is not None and index >= self._fail_apply_at:
                raise InjectedApplyFailure(f"unsafe test failpoint fail_apply_at={self._fail_apply_at}")
            result = self.machine.apply(index, command)
            result_bytes = self._result_bytes(result)
            self.digest.advance(index, blob, result_bytes, self._summary())
        except Exception as exc:  # a bug: Rejected never leaves machine.apply
            self._halt("apply", index, exc)
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
        return result_bytes

    def _summary(self) -> bytes:
        """O(1) counters of the state that the digest chains after each entry
        (``coordinator.state.digest``): a handler that moved one differently
        on some replica shows at once, not only at a later result."""
        m = self.machine
        return summary_bytes(m.applied_index, m.kv.revision, len(m.kv), m.events.last_seq,
                             len(m.registry.agents), len(m.locks.locks))

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
        """The state and its digest; ``ReplicaHalted`` once halted."""
        self._refuse_if_halted()
        return encode_snapshot({**self.machine.snapshot_data(), "digest": self.digest.to_data()})

    def restore(self, blob: bytes) -> None:
        """Replace the state (and digest) with a snapshot's. Raises
        ``ReplicaHalted`` when halted or when the snapshot cannot be
        restored (the replica then halts: it holds no usable state)."""
        self._refuse_if_halted()
        index = self.applied_index
        try:
            data = decode_snapshot(blob)
            if type(data.get("applied_index")) is int:
                index = data["applied_index"]
            machine = StateMachine.from_snapshot_data(data, self.limits)
            digest = StateDigest.from_data(data.get("digest"), machine.applied_index, hashlib.sha256(blob).digest())
        except Exception as exc:
            self._halt("restore", index, exc)
        self.machine, self.digest = machine, digest
        self._after_reset()
        self._wake(self.machine.applied_index)

    def reset(self) -> None:
        """Empty state and digest, for a replay from the start. A halt stays."""
        self.machine = StateMachine(self.limits)
        self.digest = StateDigest()
        self._after_reset()

    # -- halting -------------------------------------------------------------------

    def _refuse_if_halted(self) -> None:
        if self.failure is not None:
            raise ReplicaHalted(f"this replica halted: {self.failure.problem}", retry_after_s=5.0)

    def _halt(self, kind: str, index: int, exc: BaseException) -> NoReturn:
        """Record the failure, fail what waits here, raise ``ReplicaHalted``."""
        self.failure = ApplyFailure(kind, index, type(exc).__name__)
        # The stack says where the bug is; the exception's text and the entry may
        # quote callers' data (values, keys), so neither is logged.
        stack = "".join(traceback.format_tb(exc.__traceback__))
        log.critical("%s; this replica stops applying the log and refuses to serve until it is restarted "
                     "(a restart replays from the snapshot and journal)\n%s", self.failure.problem, stack)
        halted = ReplicaHalted(f"this replica halted: {self.failure.problem}", retry_after_s=5.0)
        waiters, self._waiters = self._waiters, {}
        for future in waiters.values():
            if not future.done():
                # committed (or about to be) by the others: this node cannot say how it ended
                future.set_exception(OutcomeUnknown(f"this replica halted: {self.failure.problem}"))
        index_waiters, self._index_waiters = self._index_waiters, []
        for _, _, future in index_waiters:
            if not future.done():
                future.set_exception(halted)
        self._changed()
        raise halted from None

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
        """Return once the local replica has applied ``index``; ``ReplicaHalted``
        if it halted (before or while waiting)."""
        self._refuse_if_halted()
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
        if not self._change_waiters:
            return
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
