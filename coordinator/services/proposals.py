"""Propose a command and wait for its result: encode → engine.submit → the
local replica applies it → the caller gets the ``Result``.

The outcome is one of: a ``Result`` (possibly with a state error such as a
CAS conflict), ``Unavailable`` (certainly not applied: retry later),
``OutcomeUnknown`` (handed to consensus, no answer in time: retry with the
same ``request_id``), ``TooLarge``. On an engine that confirms results
(``coordinator.ports.ConfirmsResults``, PBFT) the ``Result`` is returned
only once the engine confirmed it too; a disagreement is ``OutcomeUnknown``.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
from collections import deque
from typing import Any

from coordinator.codec import check_command_size, encode_command
from coordinator.errors import (
    Compacted,
    Conflict,
    CoordinatorError,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    QuotaExceeded,
    ReplicaHalted,
    TooLarge,
    Unavailable,
)
from coordinator.ports import Clock, ConfirmsResults, ConsensusEngine, Failure, Rng
from coordinator.services.applier import Applier
from coordinator.types import Command, RequestKey, Result

_LIMIT_IN_MESSAGE = re.compile(r"more than ([a-z_]+) \(")
_STATE_ERRORS: dict[str, type[CoordinatorError]] = {
    "compacted": Compacted,
    "conflict": Conflict,
    "not_found": NotFound,
    "unavailable": Unavailable,
}


class _Expired(Exception):
    """Set on a proposal's futures when ``timeout_s`` passed without an outcome."""


def request_key(principal: str, request_id: str | None, *request: str) -> RequestKey:
    """The log's key for a request of ``principal`` (``admin``, ``anonymous``,
    ``agent:<id>``; ``cluster`` for the nodes' own): its idempotency key for
    ``request_id`` with a digest of ``request`` (the parts that say what was
    asked), or none when ``request_id`` is None."""
    if request_id is None:
        return RequestKey(principal)
    text = "\n".join(request).encode("utf-8", "surrogatepass")
    return RequestKey(principal, f"{principal}/{request_id}", hashlib.sha256(text).hexdigest()[:32])


def cluster_request(op: str, *parts: str) -> RequestKey:
    """A node's own idempotent proposal: no caller can give a ``cluster`` key."""
    return request_key("cluster", "/".join((op, *parts)), op, *parts)


def raise_for(result: Result) -> Any:
    """The result's value, or the error the state machine decided, raised."""
    if result.error is None:
        return result.value
    raise state_error(*result.error)


def state_error(code: str, message: str) -> CoordinatorError:
    """The error for a state machine's refusal (``Result.error`` or a
    ``Rejected`` raised by a check run before proposing)."""
    if code == "invalid":
        field, _, _ = message.partition(":")
        return InvalidInput(message, field=field or None)
    if code == "quota":  # "<limit>: ..." (state.base.over_quota)
        return QuotaExceeded(message, limit=message.partition(":")[0])
    if code == "too_large":  # "<field>: about N bytes, more than <limit> (M)" (state.base.too_large)
        named = _LIMIT_IN_MESSAGE.search(message)
        return TooLarge(message, field=message.partition(":")[0], limit=named.group(1) if named else None)
    return _STATE_ERRORS.get(code, CoordinatorError)(message)


class Proposer:
    def __init__(self, engine: ConsensusEngine, applier: Applier, clock: Clock, rng: Rng, *,
                 inflight_max: int = 1024, timeout_s: float = 5.0, command_max_bytes: int = 1 << 20,
                 leader_hint: Any = None) -> None:
        self.engine = engine
        self.applier = applier
        self.clock = clock
        self.inflight_max = inflight_max
        self.timeout_s = timeout_s
        self.command_max_bytes = command_max_bytes
        self.inflight = 0
        self.outcomes: dict[str, int] = {}
        self._leader_hint = leader_hint or (lambda: None)
        self.confirms_results = isinstance(engine, ConfirmsResults) and bool(engine.confirms_results)
        self._prefix = rng.token_hex(6)
        self._counter = itertools.count(1)
        # One timer for all proposals instead of one per proposal: deadlines
        # are appended in order (timeout_s is fixed), the timer fires for the
        # oldest and re-arms for the next.
        self._deadlines: deque[tuple[float, tuple[asyncio.Future[Any] | None, ...]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def propose(self, op: str, args: dict[str, Any], request: RequestKey | None = None) -> Result:
        """Commit ``op(args)`` and return its ``Result``. ``request`` makes a
        retry idempotent: the log answers a repeat of the same key and digest
        with the first result, and a reuse of the key for another request
        with a conflict naming request_id."""
        if self.applier.failure is not None:
            # This replica halted (services.applier): it could not tell the
            # caller its result, nor serve a read after it. 503, not forwarded.
            self._count("halted")
            raise ReplicaHalted(f"this node stopped applying the log ({self.applier.failure.problem}); "
                                "use another node", retry_after_s=5.0)
        if self.inflight >= self.inflight_max:
            self._count("overloaded")
            raise Unavailable(f"{self.inflight} proposals in flight on this node", retry_after_s=0.2,
                              leader=self._leader_hint())
        proposal_id = f"{self._prefix}-{next(self._counter)}"
        command = Command(op=op, args=args, now_ms=self.clock.now_ms(), proposal_id=proposal_id,
                          request_id=None if request is None else request.id,
                          request_digest=None if request is None else request.digest,
                          principal=None if request is None else request.principal)
        blob = encode_command(command)
        check_command_size(blob, self.command_max_bytes)
        future = self.applier.expect(proposal_id)
        # On an engine that confirms results (PBFT) the answer also waits for
        # done(None): replicas other than this one computed the same result.
        confirmed: asyncio.Future[None] | None = None
        if self.confirms_results:
            confirmed = asyncio.get_running_loop().create_future()
        self.inflight += 1

        def done(reason: str | None) -> None:
            if reason is None:
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
                return  # committed: the result arrives when the local replica applies it
            if future.done() and (confirmed is None or confirmed.done()):
                return
            if reason in Failure.DEFINITE:
                error: CoordinatorError = Unavailable(f"not committed: {reason}", retry_after_s=0.5,
                                                      leader=self._leader_hint())
            else:
                error = OutcomeUnknown(f"outcome unknown: {reason}")
            for waiting in (future, confirmed):
                if waiting is not None and not waiting.done():
                    waiting.set_exception(error)

        try:
            self.engine.submit(blob, done)
            self._expire_at(future, confirmed)
            result = await future
            if confirmed is not None:
                await confirmed
        except _Expired:
            self._count("timeout")
            raise OutcomeUnknown(f"no outcome within {self.timeout_s}s") from None
        except CoordinatorError as exc:
            self._count(exc.code)
            raise
        finally:
            self.inflight -= 1
            self.applier.forget(proposal_id)
            for waited in (future, confirmed):
                if waited is None:
                    continue
                if not waited.done():
                    waited.cancel()  # the caller left: nothing waits for it any more
                elif not waited.cancelled():
                    waited.exception()  # retrieved: no "never retrieved" noise
        self._count("committed")
        return result

    def _expire_at(self, *waiting: asyncio.Future[Any] | None) -> None:
        """Fail each of ``waiting`` (None: nothing) with ``_Expired`` if still pending ``timeout_s`` from now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._deadlines.append((deadline, waiting))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._deadlines and self._deadlines[0][0] <= now:
            for waiting in self._deadlines.popleft()[1]:
                if waiting is not None and not waiting.done():
                    waiting.set_exception(_Expired())
        if self._deadlines:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
