"""The leader's term and the duties only the leader does on a clock.

``LeaderDuties`` says when this node leads *and* has caught up (``active``):
on becoming leader it commits a barrier of its term and waits until the
local replica applied it, so every entry of earlier terms is in the local
state. ``active_since_index`` is that barrier's index: later entries are
this leader's. Services that act only on the leader (the bus's fetches and
at-most-once queues, broker transports, health checks, sagas) ask
``active``; those that keep leader-only memory hear ``on_change`` and drop
it when the term ends.

While active, every ``tick_s`` it:

- proposes ``bus.tick`` when the replicated timer heap says a redelivery, a
  TTL or a retention age is due by its clock, else ``streams.tick`` when a
  stream processor's window or pattern deadline is due (one tick in flight
  at a time);
- watches the members: one the leader cannot reach for ``failure_after_s``
  becomes a committed ``system.failure`` event, and ``system.recovered``
  when it is back.

It also commits ``system.leader.elected`` when a term becomes active.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from coordinator.commands.bus import BusTick
from coordinator.commands.cluster import SystemReport
from coordinator.commands.streams import StreamsTick
from coordinator.errors import CoordinatorError
from coordinator.ports import Clock, ConsensusEngine
from coordinator.services.applier import Applier
from coordinator.services.proposals import Proposer, raise_for
from coordinator.services.reads import Reads

log = logging.getLogger(__name__)


class LeaderDuties:
    def __init__(self, applier: Applier, proposer: Proposer, reads: Reads, engine: ConsensusEngine, clock: Clock,
                 *, node_id: str, member_id: Callable[[str], str | None] | None = None, tick_s: float = 0.05,
                 failure_after_s: float = 3.0) -> None:
        self.applier = applier
        self.proposer = proposer
        self.reads = reads
        self.engine = engine
        self.clock = clock
        self.node_id = node_id
        self._member_id_of = member_id  # raft address -> member id, when the member table does not know it yet
        self.tick_s = tick_s
        self.failure_after_s = failure_after_s
        self.active = False  # leader, caught up
        self.active_since_index = 0  # the barrier that made it active: later entries are this leader's
        self.ticks = 0
        self._listeners: list[Callable[[bool], None]] = []
        self._term_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._unreachable: dict[str, float] = {}  # raft address -> since (monotonic)
        self._reported: dict[str, None] = {}      # raft addresses reported failed

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(True)`` when a term becomes active, ``listener(False)`` when this node stops leading."""
        self._listeners.append(listener)

    # -- the term ---------------------------------------------------------------------------

    def on_role(self, role: str) -> None:
        if role == "leader":
            if self._term_task is None or self._term_task.done():
                self._term_task = asyncio.get_running_loop().create_task(self._take_over())
        else:
            self._step_down()

    async def _take_over(self) -> None:
        self.active_since_index = await self.reads.barrier_until_done("leader")
        self.active = True
        self._unreachable.clear()
        self._reported.clear()
        self._tell(True)
        await self._report(SystemReport("system.leader.elected", {"node": self.node_id,
                                                                  "term": self.engine.status().term}))

    def _step_down(self) -> None:
        if self._term_task is not None:
            self._term_task.cancel()
        self.active = False
        self._tell(False)

    def _tell(self, active: bool) -> None:
        for listener in self._listeners:
            try:
                listener(active)
            except Exception:
                log.exception("leadership listener failed")

    async def stop(self) -> None:
        self._step_down()
        tasks = [t for t in (self._term_task, self._tick_task, *self._reports) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the duties -------------------------------------------------------------------------

    async def run(self) -> None:
        """Every ``tick_s`` while active: fire due bus timers and stream
        processors' windows and deadlines, watch members."""
        while True:
            await asyncio.sleep(self.tick_s)
            if not self.active:
                continue
            machine = self.applier.machine
            now_ms = self.clock.now_ms()
            if self._tick_task is None or self._tick_task.done():
                due = machine.bus.next_due_ms()
                if due is not None and due <= now_ms:
                    self._tick_task = asyncio.get_running_loop().create_task(self._tick(BusTick()))
                else:
                    due = machine.streams.next_due_ms()  # a window to close or a pattern deadline
                    if due is not None and due <= now_ms:
                        self._tick_task = asyncio.get_running_loop().create_task(self._tick(StreamsTick()))
            self._watch_members()

    async def _tick(self, tick: BusTick | StreamsTick) -> None:
        try:
            raise_for(await self.proposer.propose(tick.op, tick.to_args()))
            self.ticks += 1
        except CoordinatorError as exc:
            log.info("leader: %s failed (%s); will retry", tick.op, exc.message)

    def _watch_members(self) -> None:
        st = self.engine.status()
        now = self.clock.monotonic()
        for raft in st.members:
            if raft == st.node:
                continue
            if raft in st.connected:
                self._unreachable.pop(raft, None)
                if raft in self._reported:
                    del self._reported[raft]
                    self._spawn_report(SystemReport("system.recovered", {"member": self._member_id(raft),
                                                                         "raft": raft}))
                continue
            since = self._unreachable.setdefault(raft, now)
            if now - since >= self.failure_after_s and raft not in self._reported:
                self._reported[raft] = None
                self._spawn_report(SystemReport("system.failure", {"member": self._member_id(raft), "raft": raft,
                                                                    "reason": "unreachable from the leader",
                                                                    "for_s": round(now - since, 1)}))

    def _member_id(self, raft: str) -> str | None:
        member = self.applier.machine.members.by_raft(raft)
        if member is not None:
            return member.id
        return self._member_id_of(raft) if self._member_id_of is not None else None

    def _spawn_report(self, report: SystemReport) -> None:
        task = asyncio.get_running_loop().create_task(self._report(report))
        self._reports.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._reports.discard)

    async def _report(self, report: SystemReport) -> None:
        try:
            raise_for(await self.proposer.propose(report.op, report.to_args()))
        except CoordinatorError as exc:
            log.info("leader: reporting %s failed (%s)", report.type, exc.message)
