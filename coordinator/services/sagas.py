"""The leader orchestrates sagas (DESIGN rule 4): it performs what the
replicated saga state says is in flight and proposes the outcomes.

The state machine (``coordinator.state.sagas``) decides every transition;
this service only acts:

- An attempt in flight (started by a committed command) that this leader has
  not invoked yet is invoked once, and its outcome proposed as
  ``saga.outcome``. The set of attempts invoked is kept for the whole
  leadership, so one leader never runs an attempt twice.
- Attempts already in flight when this node became the leader belong to a
  leader that may have died mid-call: their outcome was never committed, so
  they are re-driven with the same attempt number (and so the same
  idempotency key), after committing ``saga.resumed``. Steps are therefore
  at-least-once; an agent that honours the idempotency key makes them
  effectively once.
- A waiting attempt whose retry time passed by this leader's clock gets
  ``saga.retry`` proposed; the state starts it, and the rule above invokes it.

Actions: an agent gets an HTTP POST at its endpoint (one of a type is
chosen by the load balancer, with the type's strategy, health, breakers and
retries, keyed by the saga id; a named one is called directly); a topic gets
a bus message (with ``reply``, a request whose response decides). Loop
thread only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from coordinator.commands.base import Rejected
from coordinator.commands.messages import normalize
from coordinator.commands.sagas import SagaOutcome, SagaResumed, SagaRetry
from coordinator.errors import CoordinatorError
from coordinator.ports import Clock
from coordinator.services.agent_http import EndpointGuard, agent_url, read_capped
from coordinator.services.applier import Applier
from coordinator.services.balancer.service import Balancer, Invocation
from coordinator.services.bus import BusService
from coordinator.services.duties import LeaderDuties
from coordinator.services.proposals import Proposer, raise_for
from coordinator.state.sagas import Saga, idempotency_key

log = logging.getLogger(__name__)

RESULT_MAX_BYTES = 64 * 1024  # a step's result kept in the replicated state
ANSWER_MAX_BYTES = 1 << 20  # read from an agent at most
ERROR_BODY_CHARS = 300
PROPOSE_RETRY_MAX_S = 2.0
# 4xx answers that say "try again" rather than "no": everything else in 4xx fails the step for good.
TRANSIENT_4XX = frozenset({408, 409, 425, 429})
IDEMPOTENCY_HEADER = "Idempotency-Key"
NEVER = 2**63

Key = tuple[str, str, str, int]  # saga, step, phase, attempt


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    result: Any = None
    error: str | None = None
    permanent: bool = False

    def command(self, key: Key) -> SagaOutcome:
        """The ``saga.outcome`` of attempt ``key``. Built whole, not parsed: the
        error goes in the log as it was always written (the parse on every
        replica cuts it to ``MAX_ERROR_LEN``)."""
        if self.ok:
            return SagaOutcome(*key, ok=True, result=self.result)
        return SagaOutcome(*key, ok=False, error=self.error, permanent=self.permanent)


def _judge(who: str, status: int, raw: bytes) -> Outcome:
    """An agent's answer as an attempt's outcome: 2xx success (the JSON body
    is the result); 4xx other than TRANSIENT_4XX fails for good; else retry."""
    text = raw.decode(errors="replace")
    if 200 <= status < 300:
        try:
            result = json.loads(raw) if raw.strip() else None
        except ValueError:
            result = text[:ERROR_BODY_CHARS]
        return Outcome(True, result=_bounded_result(result))
    permanent = 400 <= status < 500 and status not in TRANSIENT_4XX
    return Outcome(False, error=f"{who} answered {status}: {text[:ERROR_BODY_CHARS]}", permanent=permanent)


def _bounded_result(value: Any) -> Any:
    size = len(json.dumps(value, separators=(",", ":")).encode())
    return value if size <= RESULT_MAX_BYTES else {"truncated": True, "bytes": size}


class SagaOrchestrator:
    def __init__(self, applier: Applier, proposer: Proposer, bus: BusService, balancer: Balancer, clock: Clock,
                 duties: LeaderDuties, *, node_id: str, tick_s: float = 0.02, connections_per_agent: int = 32,
                 guard: EndpointGuard | None = None) -> None:
        self.applier = applier
        self.guard = guard or EndpointGuard(None)  # where agents may be called (default: anywhere)
        self.proposer = proposer
        self.bus = bus
        self.balancer = balancer
        self.clock = clock
        self.duties = duties  # active: this node leads and its term's barrier is applied
        self.node_id = node_id
        self.tick_s = tick_s
        self.connections_per_agent = connections_per_agent
        self.active = False
        self.invoked = 0  # attempts this node invoked, over all its leaderships
        self.resumed = 0
        self._session: aiohttp.ClientSession | None = None
        self._done: set[Key] = set()  # attempts invoked in this leadership
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._retries: dict[Key, asyncio.Task[None]] = {}
        self._scanned_index = -1  # applied index at the last scan of the live sagas
        self._next_due_ms = NEVER  # the earliest retry not yet due at that scan

    # -- lifecycle -------------------------------------------------------------------

    async def stop(self) -> None:
        self._set_active(False)
        await asyncio.gather(*self._tasks.values(), *self._retries.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _set_active(self, active: bool) -> None:
        self.active = active
        self._done.clear()
        for task in [*self._tasks.values(), *self._retries.values()]:
            task.cancel()
        self._tasks.clear()
        self._retries.clear()
        self._scanned_index = -1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            active = self.duties.active
            if active != self.active:
                self._set_active(active)
            if active:
                self.step()

    def step(self) -> None:
        """Invoke every attempt in flight not yet invoked here; propose every due retry.
        Scans the live sagas only when something was applied, a retry is due
        or a task finished, not on every tick."""
        sagas = self.applier.machine.sagas
        now_ms = self.clock.now_ms()
        finished = any(t.done() for t in self._tasks.values()) or any(t.done() for t in self._retries.values())
        if (self.applier.machine.applied_index == self._scanned_index and now_ms < self._next_due_ms
                and not finished):
            return
        self._scanned_index = self.applier.machine.applied_index
        self._next_due_ms = NEVER
        loop = asyncio.get_running_loop()
        for saga_id in list(sagas.live):
            saga = sagas.sagas[saga_id]
            for flight in saga.in_flight():
                key = (saga.id, *flight)
                if key not in self._done:
                    self._done.add(key)
                    self._tasks[key] = loop.create_task(self._drive(key), name=f"saga {key}")
            for step, phase, attempt, due_ms in saga.waiting():
                key = (saga.id, step, phase, attempt)
                if due_ms <= now_ms and key not in self._retries:
                    self._retries[key] = loop.create_task(self._retry(key), name=f"saga retry {key}")
                elif due_ms > now_ms:
                    self._next_due_ms = min(self._next_due_ms, due_ms)
        for key in [k for k, t in self._retries.items() if t.done()]:
            del self._retries[key]
        for key in [k for k, t in self._tasks.items() if t.done()]:
            del self._tasks[key]
            saga = sagas.sagas.get(key[0])
            if saga is None or key[1:] not in saga.in_flight():
                self._done.discard(key)  # its outcome is committed: it can never be in flight again

    # -- attempts --------------------------------------------------------------------------

    async def _drive(self, key: Key) -> None:
        saga = self.applier.machine.sagas.sagas.get(key[0])
        if saga is None:
            return
        if saga.steps[key[1]].started_index <= self.duties.active_since_index:  # started under an earlier leader
            result = await self._propose(SagaResumed(*key, node=self.node_id))
            if result is None or not result.get("applied"):
                return  # the attempt finished meanwhile (a late outcome of the old leader)
            self.resumed += 1
        self.invoked += 1
        try:
            outcome = await self._perform(saga, key)
        except Exception as exc:  # a bug must fail the attempt, not wedge the saga
            log.exception("saga %s: invoking %s failed", key[0], key[1:])
            outcome = Outcome(False, error=f"internal error: {type(exc).__name__}")
        await self._propose(outcome.command(key))

    async def _retry(self, key: Key) -> None:
        await self._propose(SagaRetry(*key))

    async def _propose(self, command: SagaOutcome | SagaRetry | SagaResumed) -> dict[str, Any] | None:
        """Propose until committed, or until this node stops leading (then the
        next leader re-drives). Outcomes and retries are idempotent in the state."""
        delay = 0.05
        op, args = command.op, command.to_args()
        while self.active:
            try:
                return raise_for(await self.proposer.propose(op, args))
            except CoordinatorError as exc:
                if exc.code in ("invalid", "not_found"):
                    log.warning("saga %s: %s refused: %s", command.saga, op, exc.message)
                    return None
                log.info("saga %s: %s not committed yet (%s); retrying", command.saga, op, exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROPOSE_RETRY_MAX_S)
        return None

    async def _perform(self, saga: Saga, key: Key) -> Outcome:
        _, step_id, phase, attempt = key
        step = saga.step_def(step_id)
        action = step["action"] if phase == "action" else step["compensation"]
        request = {
            "saga_id": saga.id,
            "saga_name": saga.definition["name"],
            "step": step_id,
            "phase": phase,
            "attempt": attempt,
            "idempotency_key": idempotency_key(*key),
            "input": saga.definition["input"],
            "payload": action["payload"],
            "results": {k: r.result for k, r in saga.steps.items() if r.succeeded_seq},
        }
        if phase == "compensation":
            request["result"] = saga.steps[step_id].result  # what the action answered, to undo it
        if action["kind"] == "agent":
            return await self._call_agent(action, request, step["timeout_s"])
        return await self._send_topic(action, request, step["timeout_s"])

    async def _call_agent(self, action: dict[str, Any], request: dict[str, Any], timeout_s: float) -> Outcome:
        """An agent of a type through the balancer (its strategy, health,
        breakers and retries; the saga id is the consistent-hash key), or a
        named agent directly."""
        body = json.dumps(request).encode()
        key = request["idempotency_key"]
        if "agent_type" in action:
            try:
                answer = await self.balancer.invoke(Invocation(
                    action["agent_type"], body, "application/json", key, timeout_s=timeout_s,
                    key=request["saga_id"], idempotency_key=key, path=action["path"]))
            except CoordinatorError as exc:
                return Outcome(False, error=exc.message[:ERROR_BODY_CHARS])
            return _judge(f"agent {answer.agent_id!r}", answer.status, answer.body)
        agent = self.applier.machine.registry.agents.get(action["agent_id"])
        if agent is None or not agent.endpoint:
            what = "is not registered" if agent is None else "has no endpoint"
            return Outcome(False, error=f"agent {action['agent_id']!r} {what}")
        who = f"agent {agent.id!r}"
        refusal = self.guard.refusal(agent.endpoint)
        if refusal is not None:
            return Outcome(False, error=f"{who}: its endpoint is refused: {refusal}"[:ERROR_BODY_CHARS])
        headers = {IDEMPOTENCY_HEADER: key, "Content-Type": "application/json"}
        try:
            async with self._client().post(agent_url(agent.endpoint, action["path"]), data=body, headers=headers,
                                           allow_redirects=False,
                                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                raw = await read_capped(response, ANSWER_MAX_BYTES)
        except TimeoutError:
            return Outcome(False, error=f"{who} did not answer within {timeout_s:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Outcome(False, error=f"{who} unreachable: {type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS])
        if raw is None:  # more than we read: the step's answer, but too large to keep
            if 200 <= response.status < 300:
                return Outcome(True, result={"truncated": True, "bytes": f">{ANSWER_MAX_BYTES}"})
            raw = b"(an answer over 1 MiB)"
        return _judge(who, response.status, raw)

    async def _send_topic(self, action: dict[str, Any], request: dict[str, Any], timeout_s: float) -> Outcome:
        """A message on the topic, exactly-once by the attempt's idempotency key
        (a re-driven attempt is recognised by the bus). With ``reply``, a
        request: the response's payload is the result, unless it says
        ``{"ok": false, "error"?, "permanent"?}``."""
        raw = {"id": request["idempotency_key"], "type": "request" if action["reply"] else "command",
               "source": f"saga:{request['saga_id']}", "payload": request,
               "deliveryOptions": {"guarantee": "exactly-once"}}
        if action["reply"]:
            raw["replyTo"] = self.bus.reply_topic()
        try:
            message = normalize(raw, self.clock.now_ms())
            if not action["reply"]:
                await self.bus.publish(action["topic"], [message])
                return Outcome(True, result=None)
            answer = await self.bus.request(action["topic"], message, timeout_s)
        except Rejected as exc:
            return Outcome(False, error=exc.message, permanent=True)
        except CoordinatorError as exc:
            return Outcome(False, error=exc.message)
        payload = answer["response"].get("payload")
        if isinstance(payload, dict) and payload.get("ok") is False:
            return Outcome(False, error=str(payload.get("error") or "the responder said no")[:ERROR_BODY_CHARS],
                           permanent=payload.get("permanent") is True)
        return Outcome(True, result=_bounded_result(payload))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=self.guard.connector(limit_per_host=self.connections_per_agent))
        return self._session

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sagas = self.applier.machine.sagas
        return {"active": self.active, "live": len(sagas.live), "invoking": len(self._tasks),
                "invoked": self.invoked, "resumed": self.resumed, **sagas.counts()}
