"""Invoke "an agent of type X": any node picks an instance from the
replicated registry and forwards the request to its endpoint over a pooled
keep-alive connection.

Per request: rate limits (per caller, per type) → the agents of the type
with an endpoint that are not unhealthy nor suspected by the leader's
failure detector (``liveness``) → those whose circuit breaker lets a
request through → the type's strategy picks one → forward, with the
request's timeout → record latency and outcome (breaker, load stats) →
maybe retry on another agent.

Retries: a request that never reached an agent (connection refused) is
always safe to send elsewhere; one that may have reached it (a timeout, a
5xx, a broken exchange) is retried only when the caller said it is
idempotent or gave an idempotency key; such a request's time is split
evenly over the attempts still allowed, so a timeout leaves time for the
next. Every retry needs the type's retry budget (a share of recent
requests), so retries cannot amplify an outage.

What a node measures stays on the node: breakers, load, latency and rate
buckets are per node. Policies (strategy, limits, thresholds) are committed
(``coordinator.state.balancing``, checked by ``coordinator.commands.balancer``). Loop thread only.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from coordinator.errors import BadGateway, InvalidInput, RateLimited, RequestTimeout, Unavailable
from coordinator.ports import Strategy
from coordinator.services.agent_http import EndpointGuard, agent_url, read_capped
from coordinator.services.applier import Applier
from coordinator.services.balancer.breaker import BreakerConfig, CircuitBreaker
from coordinator.services.balancer.limits import KeyedBuckets, RetryBudget, TokenBucket, backoff_s
from coordinator.services.balancer.strategies import LoadStats, NeedsKey, make_strategy
from coordinator.state.registry import Agent
from coordinator.types import Candidate

ANSWER_MAX_BYTES = 16 << 20
BREAKER_CONFIGS_MAX = 1000
PASSED_HEADERS = ("Content-Type", "Cache-Control", "ETag", "Retry-After")
REQUEST_ID_HEADER = "X-Request-Id"
AGENT_HEADER = "X-Coord-Agent"
ATTEMPTS_HEADER = "X-Coord-Attempts"


@dataclass(frozen=True, slots=True)
class Invocation:
    """What goes to the agent."""

    agent_type: str
    body: bytes
    content_type: str | None
    request_id: str
    timeout_s: float | None = None
    key: str | None = None
    idempotent: bool = False
    idempotency_key: str | None = None
    caller: str | None = None
    path: str | None = None  # at the agent; the type's policy path when None


@dataclass(frozen=True, slots=True)
class Answer:
    """The agent's answer, passed through to the caller."""

    status: int
    body: bytes
    headers: dict[str, str]
    agent_id: str
    attempts: int


@dataclass(slots=True)
class _Type:
    strategy_name: str
    strategy: Strategy
    budget: RetryBudget
    limits_config: Any = None
    per_type: TokenBucket | None = None
    per_caller: KeyedBuckets | None = None


@dataclass(slots=True)
class _Breaker:
    config: BreakerConfig
    breaker: CircuitBreaker


@dataclass(slots=True)
class _Failure:
    error: Exception
    answer: Answer | None = None  # an agent's 5xx, passed through when nothing better comes
    sent: bool = True  # the request may have reached the agent


@dataclass(slots=True)
class BalancerCounters:
    invoked: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    rate_limited: int = 0
    unavailable: int = 0
    by_agent: dict[str, int] = field(default_factory=dict)


class Balancer:
    def __init__(self, applier: Applier, rng: random.Random, *, connections_per_agent: int = 64,
                 monotonic: Any = time.monotonic, guard: EndpointGuard | None = None) -> None:
        """``guard``: where agents may be called (default: anywhere, as on an anonymous node)."""
        self.applier = applier
        self.guard = guard or EndpointGuard(None)
        self.rng = rng
        self.connections_per_agent = connections_per_agent
        self.monotonic = monotonic
        self.stats = LoadStats()
        self.counters = BalancerCounters()
        self._types: dict[str, _Type] = {}
        self._breakers: dict[str, _Breaker] = {}
        self._breaker_configs: dict[int, tuple[dict[str, Any], BreakerConfig]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def run(self, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.forget_gone()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- invoking -----------------------------------------------------------------------

    async def invoke(self, call: Invocation) -> Answer:
        policy = self.applier.machine.policies.of(call.agent_type)
        timeout_s = call.timeout_s if call.timeout_s is not None else policy["timeout_s"]
        deadline = self.monotonic() + timeout_s
        state = self._type(call.agent_type, policy)
        self._rate_limit(state, policy, call)
        state.budget.request(self.monotonic())
        self.counters.invoked += 1
        tried: set[str] = set()
        retry = policy["retry"]
        attempt = 0
        failure: _Failure | None = None
        while True:
            attempt += 1
            try:
                agent = self._pick(call, state, policy, tried)
            except Unavailable:
                if failure is None:
                    self.counters.unavailable += 1
                    raise
                # Nowhere left to retry (the other circuits are open, or the one
                # agent's opened on this failure): the caller gets what the last
                # attempt got, not a 503 that says the request had no effect.
                return self._give_up(failure)
            if failure is not None:
                self.counters.retried += 1
            tried.add(agent.id)
            left_s = max(0.001, deadline - self.monotonic())
            if call.idempotent or call.idempotency_key is not None:
                # Leave the attempts still allowed their share of the time, or a
                # timeout would use it all and never be retried.
                left_s /= max(1, retry["max_attempts"] - attempt + 1)
            outcome = await self._send(agent, call, policy, left_s, attempt)
            if isinstance(outcome, Answer):
                self.counters.succeeded += 1
                return outcome
            failure = outcome
            now = self.monotonic()
            may_retry = (not outcome.sent or call.idempotent or call.idempotency_key is not None)
            if (not may_retry or attempt >= retry["max_attempts"] or now >= deadline
                    or not state.budget.try_retry(now)):
                return self._give_up(outcome)
            pause = min(backoff_s(attempt, retry["backoff_s"], retry["backoff_max_s"], self.rng),
                        max(0.0, deadline - now))
            await asyncio.sleep(pause)

    def _give_up(self, failure: _Failure) -> Answer:
        """The last attempt's outcome for the caller: an agent's 5xx passed through, else the error."""
        self.counters.failed += 1
        if failure.answer is not None:
            return failure.answer
        raise failure.error

    def _rate_limit(self, state: _Type, policy: dict[str, Any], call: Invocation) -> None:
        now = self.monotonic()
        limits = policy["rate_limit"]
        if state.limits_config != limits:
            state.limits_config = limits
            per_type, per_caller = limits["per_type"], limits["per_caller"]
            state.per_type = TokenBucket(per_type["rate"], per_type["burst"], now) if per_type else None
            state.per_caller = KeyedBuckets(per_caller["rate"], per_caller["burst"]) if per_caller else None
        if state.per_caller is not None:
            wait = state.per_caller.take(call.caller or "anonymous", now)
            if wait > 0:
                self.counters.rate_limited += 1
                raise RateLimited(f"caller {call.caller or 'anonymous'!r} is over its rate for agent type "
                                  f"{call.agent_type!r}", retry_after_s=wait)
        if state.per_type is not None:
            wait = state.per_type.take(now)
            if wait > 0:
                self.counters.rate_limited += 1
                raise RateLimited(f"agent type {call.agent_type!r} is over its rate", retry_after_s=wait)

    def _pick(self, call: Invocation, state: _Type, policy: dict[str, Any], tried: set[str]) -> Agent:
        agents = self.applier.machine.registry.agents
        usable = {a.id: a for a in agents.values()
                  if a.type == call.agent_type and a.endpoint and a.health != "unhealthy" and a.liveness == "alive"}
        if not usable:
            raise Unavailable(f"no agent of type {call.agent_type!r} with an endpoint is available",
                              retry_after_s=1.0)
        now = self.monotonic()
        fresh = [a for a in usable.values() if a.id not in tried] or list(usable.values())
        open_for: list[float] = []
        candidates = []
        for agent in fresh:
            breaker = self._breaker(agent.id, policy)
            snapshot_state = breaker.state(now)
            if snapshot_state == "open":
                open_for.append(breaker.snapshot(now).get("retry_in_s") or 1.0)
            else:
                candidates.append(Candidate(agent.id, agent.weight))
        while candidates:
            try:
                chosen = state.strategy.pick(candidates, self.stats, call.key)
            except NeedsKey:
                raise InvalidInput("key: the consistent_hash strategy needs a request key "
                                   "(?key= or the X-Coord-Key header)", field="key") from None
            if self._breaker(chosen.id, policy).allow(now):
                return usable[chosen.id]
            candidates = [c for c in candidates if c.id != chosen.id]  # half-open, its probes are out
            open_for.append(0.1)
        raise Unavailable(f"every agent of type {call.agent_type!r} has its circuit open",
                          retry_after_s=max(0.1, min(open_for, default=1.0)))

    async def _send(self, agent: Agent, call: Invocation, policy: dict[str, Any], timeout_s: float,
                    attempt: int) -> Answer | _Failure:
        breaker = self._breaker(agent.id, policy)
        refusal = self.guard.refusal(agent.endpoint or "")
        if refusal is not None:
            return _Failure(BadGateway(f"agent {agent.id!r}: its endpoint is refused: {refusal}"), sent=False)
        url = agent_url(agent.endpoint or "", call.path or policy["path"])
        headers = {REQUEST_ID_HEADER: call.request_id}
        if call.content_type:
            headers["Content-Type"] = call.content_type
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        if call.caller is not None:
            headers["X-Coord-Caller"] = call.caller
        started = self.monotonic()
        self.stats.started(agent.id)
        self.counters.by_agent[agent.id] = self.counters.by_agent.get(agent.id, 0) + 1
        ok = cancelled = False
        try:
            async with self._client().post(url, data=call.body, headers=headers, allow_redirects=False,
                                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                body = await read_capped(response, ANSWER_MAX_BYTES)
                if body is None:
                    raise ValueError(f"answer over {ANSWER_MAX_BYTES} bytes")
                # By name, case-insensitively: agents (and aiohttp's own parser,
                # which gives "Etag") do not all spell header names alike.
                passed = {name: ", ".join(response.headers.getall(name))
                          for name in PASSED_HEADERS if name in response.headers}
                passed.update({AGENT_HEADER: agent.id, REQUEST_ID_HEADER: call.request_id,
                               ATTEMPTS_HEADER: str(attempt)})
                answer = Answer(response.status, body, passed, agent.id, attempt)
                ok = response.status < 500
                if ok:
                    return answer
                return _Failure(BadGateway(f"agent {agent.id!r} answered {response.status}"), answer=answer)
        except aiohttp.ClientConnectorError as exc:
            return _Failure(BadGateway(f"agent {agent.id!r} is unreachable: {exc.os_error or exc}"), sent=False)
        except TimeoutError:
            return _Failure(RequestTimeout(f"agent {agent.id!r} did not answer within {timeout_s:.3g} s"))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _Failure(BadGateway(f"agent {agent.id!r} broke the exchange: {type(exc).__name__}"))
        except asyncio.CancelledError:
            cancelled = True  # the caller left: says nothing about the agent
            raise
        finally:
            now = self.monotonic()
            self.stats.finished(agent.id, now - started, now)
            if cancelled:
                breaker.release(now)
            else:
                breaker.record(ok, now)

    # -- per type, per agent -------------------------------------------------------------------

    def _type(self, agent_type: str, policy: dict[str, Any]) -> _Type:
        state = self._types.get(agent_type)
        retry = policy["retry"]
        if state is None or state.strategy_name != policy["strategy"]:
            state = _Type(policy["strategy"], make_strategy(policy["strategy"], self.rng),
                          RetryBudget(ratio=retry["budget_ratio"]))
            self._types[agent_type] = state
        elif state.budget.ratio != retry["budget_ratio"]:
            # A new ratio starts a new budget; without this the first policy's
            # ratio would hold until the strategy changed.
            state.budget = RetryBudget(ratio=retry["budget_ratio"])
        return state

    def _breaker(self, agent_id: str, policy: dict[str, Any]) -> CircuitBreaker:
        source = policy["breaker"]  # a committed policy's dict: the same object until it is configured again
        cached = self._breaker_configs.get(id(source))
        if cached is None or cached[0] is not source:
            if len(self._breaker_configs) > BREAKER_CONFIGS_MAX:
                self._breaker_configs.clear()
            cached = (source, BreakerConfig(**source))
            self._breaker_configs[id(source)] = cached
        config = cached[1]
        held = self._breakers.get(agent_id)
        if held is None or held.config != config:
            held = _Breaker(config, CircuitBreaker(config))
            self._breakers[agent_id] = held
        return held.breaker

    def forget_gone(self) -> None:
        """Drop what this node keeps about agents that left the registry."""
        present = set(self.applier.machine.registry.agents)
        for agent_id in [a for a in self._breakers if a not in present]:
            del self._breakers[agent_id]
        self.stats.forget(present)
        for agent_id in [a for a in self.counters.by_agent if a not in present]:
            del self.counters.by_agent[agent_id]

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=self.guard.connector(limit=0, limit_per_host=self.connections_per_agent,
                                               keepalive_timeout=30))
        return self._session

    # -- status -------------------------------------------------------------------------------

    def breakers(self) -> dict[str, dict[str, Any]]:
        now = self.monotonic()
        return {agent_id: held.breaker.snapshot(now) for agent_id, held in self._breakers.items()}

    def status(self) -> dict[str, Any]:
        c = self.counters
        agents = {}
        for agent_id, snapshot in self.breakers().items():
            latency = self.stats.latency(agent_id)
            agents[agent_id] = {"breaker": snapshot, "inflight": self.stats.inflight(agent_id),
                                "latency_ms": None if latency is None else round(latency * 1000, 3),
                                "requests": c.by_agent.get(agent_id, 0)}
        return {"invoked": c.invoked, "succeeded": c.succeeded, "failed": c.failed, "retried": c.retried,
                "rate_limited": c.rate_limited, "unavailable": c.unavailable, "agents": agents}
