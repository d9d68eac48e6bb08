"""Leases of agents and locks, kept by the leader in memory (DESIGN rule 5).

Heartbeats never enter the log. The leader remembers, per lease, a deadline
on its own monotonic clock; a heartbeat (or a lock refresh) moves it. When a
deadline passes, the leader proposes ``agent.expire`` / ``lock.expire``
naming the lease, so an expiry decided before a re-registration cannot touch
the new lease. Only the expiry is committed.

A new leader first commits a barrier (so its replica holds every committed
registration), then gives every lease a fresh TTL before expiring anything:
no agent is expired for heartbeats the old leader received.

A leader answers a heartbeat only while a quorum has answered it within the
engine's ``quorum_lease_s`` (``coordinator.ports.KnowsQuorumContact``): a
leader cut off from the others would otherwise keep renewing leases from
memory (pysyncobj steps down only after ``leader_fallback_s``, 2 s) while a
new leader, elected after the minimum election timeout, counts the TTL from
its own takeover and expires the agent. Engines without the feature are
trusted for as long as they say they lead.

Loop thread only. ``tick`` is driven by ``run`` every ``tick_s``. It
looks only at the leases that are due: each lease has one entry in a heap of
deadlines (``_Lease.queued`` says which); a heartbeat only moves the lease's
deadline, and an entry popped for a lease renewed since is put back at the
new deadline. A tick costs what expires, not what is registered (at 100,000
agents a pass over every lease took 40 ms; ``bench.agents``).

Heartbeats answered by any node reach the leader through the node's merged
``HeardTable`` (``coordinator.services.liveness``, filled by gossip):
``heard`` moves a lease's deadline to the TTL after the last heartbeat heard
anywhere, renews the holder's locks, and sets the moment its failure
detector would suspect the agent (``suspect_at``, plus ``suspect_grace_s``
for a heartbeat still on its way through gossip). Suspicion has its own heap,
kept like the deadlines': when one passes, ``agent.suspect`` is proposed
naming the lease; a suspected agent heard again gets ``agent.alive``. Both
are proposed only on a change of the committed ``liveness`` (one proposal in
flight per agent); expiry stays ``agent.expire`` at the TTL.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any

from coordinator.commands.agents import AgentAlive, AgentExpire, AgentRegister, AgentSuspect
from coordinator.commands.locks import LockAcquire, LockExpire
from coordinator.errors import CoordinatorError, NotFound, Unavailable
from coordinator.ports import Clock, KnowsQuorumContact
from coordinator.services.applier import Applier
from coordinator.services.liveness import Heard, HeardTable
from coordinator.services.proposals import Proposer
from coordinator.services.reads import Reads
from coordinator.types import Command, Result

log = logging.getLogger(__name__)


class NotLeader(CoordinatorError):
    """Heartbeats go to the leader; the caller forwards them."""

    code = "not_leader"


@dataclass(slots=True)
class _Lease:
    lease_id: int
    ttl_s: float
    deadline: float
    queued: float = 0.0  # the time of this lease's entry in the heap of deadlines
    suspect_at: float = math.inf  # agents: when the detector would suspect it (nothing heard since)
    suspect_queued: float = 0.0  # the time of its entry in the heap of suspicions; 0: none


class LeaseKeeper:
    def __init__(self, applier: Applier, proposer: Proposer, reads: Reads, clock: Clock, *,
                 tick_s: float = 0.1, quorum: KnowsQuorumContact | None = None, table: HeardTable | None = None,
                 suspect_grace_s: float = 0.5) -> None:
        """``quorum``: the engine, when it can say how recently a quorum answered.
        ``table``: the node's merged heard table (its detectors; a new leader's
        suspicions start from it). ``suspect_grace_s``: added to every
        detector's moment, for heartbeats still travelling by gossip."""
        self.applier = applier
        self.table = table
        self.suspect_grace_s = suspect_grace_s
        self.suspected = 0  # agent.suspect proposals that changed the liveness
        self.recovered = 0  # agent.alive ones
        self.quorum = quorum
        self.refused_heartbeats = 0  # refused because no quorum answered recently
        self.proposer = proposer
        self.reads = reads
        self.clock = clock
        self.tick_s = tick_s
        self.active = False  # leader, caught up, leases refreshed
        self.expired_agents = 0
        self.expired_locks = 0
        self._agents: dict[str, _Lease] = {}
        self._locks: dict[str, _Lease] = {}
        self._due: list[tuple[float, str, str]] = []  # (queued, kind, name): one live entry per lease
        self._expiring: set[tuple[str, str]] = set()
        self._suspects: list[tuple[float, str]] = []  # (suspect_queued, agent id)
        self._judging: set[str] = set()  # agents with a verdict proposal in flight
        self._term_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # expiry proposals under way
        applier.on_apply(self._on_apply)
        applier.on_reset(self._on_reset)

    # -- leadership -----------------------------------------------------------------

    def on_role(self, role: str) -> None:
        if role == "leader":
            if self._term_task is None or self._term_task.done():
                self._term_task = asyncio.get_running_loop().create_task(self._take_over())
        else:
            self._step_down()

    async def _take_over(self) -> None:
        """Until it succeeds or this node steps down (which cancels it)."""
        await self.reads.barrier_until_done("leases")
        self._refresh_all()
        self.active = True
        log.info("leases: active with %d agent and %d lock leases", len(self._agents), len(self._locks))

    def _step_down(self) -> None:
        if self._term_task is not None:
            self._term_task.cancel()
        self.active = False
        self._agents.clear()
        self._locks.clear()
        self._due.clear()
        self._suspects.clear()

    def _refresh_all(self) -> None:
        now = self.clock.monotonic()
        machine = self.applier.machine
        self._agents = {a.id: _Lease(a.lease_id, a.ttl_ms / 1000, now + a.ttl_ms / 1000)
                        for a in machine.registry.agents.values()}
        self._locks = {lk.name: _Lease(lk.token, lk.ttl_ms / 1000, now + lk.ttl_ms / 1000)
                       for lk in machine.locks.locks.values()}
        self._due = []
        for kind, table in (("agent", self._agents), ("lock", self._locks)):
            for name, lease in table.items():
                lease.queued = lease.deadline
                self._due.append((lease.deadline, kind, name))
        heapq.heapify(self._due)
        self._suspects = []
        if self.table is not None:
            # A full suspicion window from the takeover, as every lease gets a full
            # TTL: heartbeats refused during the election are not held against agents.
            settings = self.table.settings
            for name, lease in self._agents.items():
                heard = self.table.entries.get(name)
                moment = heard.detector.suspect_at(settings) if heard is not None else math.inf
                if heard is not None and moment < math.inf and heard.detector.last_s is not None:
                    lease.suspect_at = max(moment, now + moment - heard.detector.last_s) + self.suspect_grace_s
                    lease.suspect_queued = lease.suspect_at
                    self._suspects.append((lease.suspect_at, name))
            heapq.heapify(self._suspects)

    def _add(self, kind: str, name: str, lease: _Lease) -> None:
        (self._agents if kind == "agent" else self._locks)[name] = lease
        self._queue(kind, name, lease, lease.deadline)

    def _queue(self, kind: str, name: str, lease: _Lease, at: float) -> None:
        lease.queued = at
        heapq.heappush(self._due, (at, kind, name))

    # -- what the log applied ------------------------------------------------------------

    def _on_apply(self, command: Command, result: Result) -> None:
        if not self.active:
            return
        now = self.clock.monotonic()
        machine = self.applier.machine
        if result.ok and command.op == AgentRegister.op:
            agent = machine.registry.agents.get(result.value["id"])
            if agent is not None:
                self._add("agent", agent.id, _Lease(agent.lease_id, agent.ttl_ms / 1000, now + agent.ttl_ms / 1000))
        if result.ok and command.op == LockAcquire.op:
            lock = machine.locks.locks.get(command.args["name"])
            if lock is not None:
                self._add("lock", lock.name, _Lease(lock.token, lock.ttl_ms / 1000, now + lock.ttl_ms / 1000))
        for event in result.events:
            if event.type == "agent.terminated":
                self._agents.pop(event.data["agentId"], None)
            elif event.type == "lock.released":
                self._locks.pop(event.data["name"], None)

    def _on_reset(self) -> None:
        if self.active:
            self._refresh_all()

    # -- heartbeats ------------------------------------------------------------------------

    def heartbeat(self, agent_id: str) -> dict[str, Any]:
        """Renew an agent's lease and the leases of the locks it holds.
        Raises ``NotLeader`` on a follower, ``NotFound`` for an unknown agent,
        ``Unavailable`` when no quorum answered this leader within the
        engine's ``quorum_lease_s`` (it may have been replaced; nothing renewed)."""
        if not self.active:
            raise NotLeader("heartbeats are kept by the leader")
        self._check_quorum_contact()
        agent = self.applier.machine.registry.agents.get(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} is not registered")
        now = self.clock.monotonic()
        ttl_s = agent.ttl_ms / 1000
        lease = self._agents.get(agent_id)
        if lease is not None and lease.lease_id == agent.lease_id:
            lease.ttl_s, lease.deadline = ttl_s, now + ttl_s  # its heap entry moves when it comes up
        else:
            self._add("agent", agent_id, _Lease(agent.lease_id, ttl_s, now + ttl_s))
        for lock in self.applier.machine.locks.held_by(agent_id):
            lease = self._locks.get(lock.name)
            if lease is not None:
                lease.deadline = max(lease.deadline, now + lease.ttl_s)
        return {"id": agent_id, "lease_id": agent.lease_id, "ttl_s": ttl_s, "health": agent.health}

    def heard(self, agent_id: str, heard: Heard) -> None:
        """The merged table heard ``agent_id`` at ``heard.at_s`` (this node's
        monotonic clock): on an active leader, renew its lease and its locks'
        to the TTL after that, and move its suspicion; a suspected agent
        heard again gets ``agent.alive``. Ignored elsewhere."""
        if not self.active:
            return
        machine = self.applier.machine
        agent = machine.registry.agents.get(agent_id)
        if agent is None:
            return
        ttl_s = agent.ttl_ms / 1000
        lease = self._agents.get(agent_id)
        if lease is not None and lease.lease_id == agent.lease_id:
            lease.ttl_s, lease.deadline = ttl_s, max(lease.deadline, heard.at_s + ttl_s)
        else:
            lease = _Lease(agent.lease_id, ttl_s, heard.at_s + ttl_s)
            self._add("agent", agent_id, lease)
        for lock in machine.locks.held_by(agent_id):
            lock_lease = self._locks.get(lock.name)
            if lock_lease is not None:
                lock_lease.deadline = max(lock_lease.deadline, heard.at_s + lock_lease.ttl_s)
        settings = self.table.settings if self.table is not None else None
        if settings is not None:
            at = heard.detector.suspect_at(settings) + self.suspect_grace_s
            lease.suspect_at = at
            if at < math.inf and (lease.suspect_queued == 0.0 or at < lease.suspect_queued):
                lease.suspect_queued = at
                heapq.heappush(self._suspects, (at, agent_id))
        if agent.liveness == "suspect" and agent_id not in self._judging:
            self._spawn_verdict(AgentAlive(agent_id, agent.lease_id))

    def _check_quorum_contact(self) -> None:
        if self.quorum is None:
            return
        age_s = self.quorum.quorum_contact_age_s()
        if age_s is None or age_s > self.quorum.quorum_lease_s:
            self.refused_heartbeats += 1
            raise Unavailable("this leader has not heard from a majority recently and may have been replaced; "
                              "nothing was renewed", retry_after_s=max(0.1, self.quorum.quorum_lease_s))

    def remaining_s(self, kind: str, name: str) -> float | None:
        lease = (self._agents if kind == "agent" else self._locks).get(name)
        if lease is None:
            return None
        return max(0.0, lease.deadline - self.clock.monotonic())

    # -- expiry ---------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if self.active:
                self.tick()

    def tick(self) -> None:
        """Propose the expiry of every lease whose deadline passed (one
        proposal in flight per lease; a failed one is proposed again at a
        later tick, until the lease is gone or renewed)."""
        now = self.clock.monotonic()
        due = self._due
        while due and due[0][0] <= now:
            queued, kind, name = heapq.heappop(due)
            lease = (self._agents if kind == "agent" else self._locks).get(name)
            if lease is None or lease.queued != queued:
                continue  # the lease is gone, or this entry was replaced by a newer one
            if lease.deadline > now:
                self._queue(kind, name, lease, lease.deadline)  # renewed since it was queued
                continue
            if (kind, name) not in self._expiring:
                expire = AgentExpire(name, lease.lease_id) if kind == "agent" else LockExpire(name, lease.lease_id)
                self._spawn_expiry(kind, name, expire)
            self._queue(kind, name, lease, now + self.tick_s)  # looked at again until it is gone
        suspects = self._suspects
        while suspects and suspects[0][0] <= now:
            queued, name = heapq.heappop(suspects)
            lease = self._agents.get(name)
            if lease is None or lease.suspect_queued != queued:
                continue
            if lease.suspect_at > now:  # heard since: back at its new moment
                lease.suspect_queued = lease.suspect_at
                heapq.heappush(suspects, (lease.suspect_at, name))
                continue
            lease.suspect_queued = 0.0
            agent = self.applier.machine.registry.agents.get(name)
            if agent is not None and agent.lease_id == lease.lease_id and agent.liveness == "alive" \
                    and name not in self._judging:
                self._spawn_verdict(AgentSuspect(name, lease.lease_id))

    def _spawn_verdict(self, verdict: AgentSuspect | AgentAlive) -> None:
        self._judging.add(verdict.id)
        task = asyncio.get_running_loop().create_task(self._judge(verdict))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _judge(self, verdict: AgentSuspect | AgentAlive) -> None:
        """Propose a liveness verdict; a failed suspicion is looked at again a
        second later (a failed ``agent.alive`` waits for the next heartbeat)."""
        try:
            result = await self.proposer.propose(verdict.op, verdict.to_args())
            if result.ok and result.value.get("changed"):
                if isinstance(verdict, AgentSuspect):
                    self.suspected += 1
                else:
                    self.recovered += 1
        except CoordinatorError as exc:
            log.info("leases: %s %s failed (%s)", verdict.op, verdict.id, exc.message)
            lease = self._agents.get(verdict.id)
            if isinstance(verdict, AgentSuspect) and self.active and lease is not None and lease.suspect_queued == 0.0:
                lease.suspect_queued = self.clock.monotonic() + 1.0
                heapq.heappush(self._suspects, (lease.suspect_queued, verdict.id))
        finally:
            self._judging.discard(verdict.id)

    def _spawn_expiry(self, kind: str, name: str, expire: AgentExpire | LockExpire) -> None:
        self._expiring.add((kind, name))
        task = asyncio.get_running_loop().create_task(self._expire(kind, name, expire))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel the takeover and every expiry under way (node shutdown)."""
        self._step_down()
        tasks = [t for t in (self._term_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _expire(self, kind: str, name: str, expire: AgentExpire | LockExpire) -> None:
        try:
            result = await self.proposer.propose(expire.op, expire.to_args())
            if result.ok and result.value.get("expired"):
                if kind == "agent":
                    self.expired_agents += 1
                else:
                    self.expired_locks += 1
            elif result.ok:
                # The lease it named is gone (renewed by re-registration): forget it
                # unless a newer lease replaced it meanwhile.
                table = self._agents if kind == "agent" else self._locks
                lease = table.get(name)
                named = expire.lease_id if isinstance(expire, AgentExpire) else expire.token
                if lease is not None and lease.lease_id == named:
                    table.pop(name, None)
        except CoordinatorError as exc:
            log.info("leases: expiring %s %s failed (%s); will retry", kind, name, exc.message)
        finally:
            self._expiring.discard((kind, name))
