"""Active health checks of agents, run by the leader (one place decides, so
health does not flap between nodes' opinions); a change is committed as
``agent.health`` and every node's balancer follows the committed health.

For each agent type whose policy has ``health_check.kind`` ``http`` (GET
the agent's endpoint + ``path``, healthy on 2xx) or ``tcp`` (a TCP connect
to the endpoint's host and port), each agent with an endpoint is checked
every ``interval_s``. ``unhealthy_after`` failures in a row take it out of
rotation; ``healthy_after`` successes in a row bring it back. The counts
live on the leader and start over after an election. Health an agent
reports with its heartbeat is committed the same way, so with both, the
latest change wins. Loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp

from coordinator.commands.agents import AgentHealth
from coordinator.commands.balancer import DEFAULT_POLICY
from coordinator.errors import CoordinatorError
from coordinator.services.agent_http import EndpointGuard, agent_url
from coordinator.services.applier import Applier
from coordinator.services.proposals import Proposer, raise_for

log = logging.getLogger(__name__)

CONCURRENT_CHECKS = 64


class HealthChecker:
    def __init__(self, applier: Applier, proposer: Proposer, is_active: Any, *, monotonic: Any,
                 tick_s: float = 0.1, guard: EndpointGuard | None = None) -> None:
        """``guard``: where agents may be probed (default: anywhere, as on an anonymous node)."""
        self.applier = applier
        self.guard = guard or EndpointGuard(None)
        self.proposer = proposer
        self.is_active = is_active
        self.monotonic = monotonic
        self.tick_s = tick_s
        self.checks = 0
        self.changes = 0
        self._next_due: dict[str, float] = {}
        self._streak: dict[str, int] = {}  # > 0: successes in a row, < 0: failures in a row
        self._running: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(CONCURRENT_CHECKS)
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self.is_active():
                self._stop_checks()
                continue
            self.step()

    def step(self) -> None:
        """Start the checks that are due. It visits only the agents of the
        types whose policy checks health (few, usually none), not every
        agent: a step runs every ``tick_s`` on the leader's loop, and a walk
        over 100,000 agents there took a fifth of its time."""
        machine = self.applier.machine
        now = self.monotonic()
        present = set()
        if DEFAULT_POLICY["health_check"]["kind"] != "none":
            agents: Iterable[Any] = machine.registry.agents.values()
        else:
            agents = (agent for agent_type, policy in machine.policies.policies.items()
                      if policy["health_check"]["kind"] != "none" for agent in machine.registry.of_type(agent_type))
        for agent in agents:
            check = machine.policies.of(agent.type)["health_check"]
            if check["kind"] == "none" or not agent.endpoint:
                continue
            present.add(agent.id)
            if agent.id in self._running or self._next_due.get(agent.id, 0.0) > now:
                continue
            self._next_due[agent.id] = now + check["interval_s"]
            self._running[agent.id] = asyncio.get_running_loop().create_task(
                self._check(agent.id, agent.endpoint, check), name=f"health {agent.id}")
        for agent_id in [a for a in self._next_due if a not in present]:
            self._next_due.pop(agent_id, None)
            self._streak.pop(agent_id, None)
        for agent_id in [a for a, t in self._running.items() if t.done()]:
            del self._running[agent_id]

    def _stop_checks(self) -> None:
        for task in self._running.values():
            task.cancel()
        self._running.clear()
        self._next_due.clear()
        self._streak.clear()

    async def stop(self) -> None:
        self._stop_checks()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _check(self, agent_id: str, endpoint: str, check: dict[str, Any]) -> None:
        async with self._slots:
            ok, detail = await self._probe(endpoint, check)
        self.checks += 1
        streak = self._streak.get(agent_id, 0)
        streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
        self._streak[agent_id] = streak
        agent = self.applier.machine.registry.agents.get(agent_id)
        if agent is None:
            return
        if ok and streak >= check["healthy_after"] and agent.health != "healthy":
            await self._commit(agent_id, "healthy", f"{check['kind']} check passed {streak} times in a row")
        elif not ok and -streak >= check["unhealthy_after"] and agent.health != "unhealthy":
            await self._commit(agent_id, "unhealthy",
                               f"{check['kind']} check failed {-streak} times in a row: {detail}")

    async def _probe(self, endpoint: str, check: dict[str, Any]) -> tuple[bool, str]:
        timeout_s = check["timeout_s"]
        refusal = self.guard.refusal(endpoint)
        if refusal is not None:
            return False, f"endpoint refused: {refusal}"
        try:
            if check["kind"] == "tcp":
                async with asyncio.timeout(timeout_s):
                    _, writer = await self.guard.open_connection(endpoint, timeout_s)
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                return True, "connected"
            async with self._client().get(agent_url(endpoint, check["path"]), allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                await response.read()
                return 200 <= response.status < 300, f"HTTP {response.status}"
        except TimeoutError:
            return False, f"no answer within {timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return False, f"{type(exc).__name__}"

    async def _commit(self, agent_id: str, health: str, reason: str) -> None:
        try:
            command = AgentHealth(agent_id, health, reason)
            raise_for(await self.proposer.propose(command.op, command.to_args()))
            self.changes += 1
        except CoordinatorError as exc:  # the next check tries again
            log.info("health of %s: committing %s failed (%s)", agent_id, health, exc.message)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=self.guard.connector(limit=CONCURRENT_CHECKS,
                                                                                 force_close=True))
        return self._session
