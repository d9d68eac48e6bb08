"""The leader drives broker transports from committed entries (DESIGN rule 4).

For every topic bound to a transport, the leader reads the messages after
the binding's committed cursor, publishes them to the broker (idempotently:
each carries its topic offset as the broker's dedupe key) and, once the
broker confirmed, commits ``bus.cursor``. A new leader resumes from the
committed cursor, so a leader change re-sends at most one batch, which the
broker recognises where it can. A broker that is down: the cursor stops,
the binding's backlog grows up to its bound (then publishes get a 503), the
transport's health goes red; when it returns, the backlog drains.

Transports are the plugins configured on this node (``NodeConfig.transports``,
resolved by ``coordinator.main``); a binding to a transport this node lacks
is reported unhealthy while this node leads.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from coordinator.commands.bus import BusCursor
from coordinator.errors import CoordinatorError
from coordinator.ports import BusTransport, Clock
from coordinator.services.applier import Applier
from coordinator.services.proposals import Proposer, raise_for
from coordinator.types import TransportEntry

log = logging.getLogger(__name__)

BATCH_MAX = 500
RETRY_MAX_S = 2.0


class TransportDriver:
    def __init__(self, applier: Applier, proposer: Proposer, transports: dict[str, BusTransport], clock: Clock,
                 is_active: Any, *, factory: Any = None, tick_s: float = 0.02) -> None:
        self.applier = applier
        self.proposer = proposer
        self.transports = transports
        self.local = frozenset(transports)  # named in this node's config: they win over cluster-wide URLs
        self.factory = factory  # (name, url) -> BusTransport, from the composition root; None: no cluster URLs
        self._urls: dict[str, str] = {}  # cluster-wide URLs the transports below were made from
        self.config_errors: dict[str, str] = {}
        self.clock = clock
        self.tick_s = tick_s
        self.is_active = is_active  # the leader's bus is active (its barrier committed)
        self.active = False
        self.sent = 0          # entries the brokers confirmed, led by this node
        self.errors: dict[str, str] = {}  # transport name -> last error (cleared by a success)
        self._bound: dict[tuple[str, int], str | None] = {}  # (topic, binding index) made at the broker -> transport
        self._tasks: dict[str, asyncio.Task[None]] = {}  # topic -> its publish in flight
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        for name, transport in self.transports.items():
            try:
                await transport.start()
            except CoordinatorError as exc:
                self.errors[name] = exc.message  # retried by publishing; health shows it meanwhile
                log.warning("transport %s: not reachable at start (%s)", name, exc.message)

    async def stop(self) -> None:
        self.set_active(False)
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for transport in self.transports.values():
            try:
                await transport.close()
            except Exception:
                log.exception("closing transport %s failed", transport.name)

    def set_active(self, active: bool) -> None:
        """The leader's bus became active (after its barrier), or this node stepped down."""
        self.active = active
        if not active:
            self._bound.clear()
            for task in self._tasks.values():
                task.cancel()

    async def sync_cluster_urls(self) -> None:
        """Make, replace or drop transports to follow the committed cluster-wide
        URLs (``bus.transport.configure``); this node's own config wins."""
        wanted = {n: u for n, u in self.applier.machine.bus.transport_urls.items() if n not in self.local}
        for name in [n for n in self._urls if wanted.get(n) != self._urls[n]]:
            old = self.transports.pop(name, None)
            del self._urls[name]
            self.errors.pop(name, None)
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
        if self.factory is None:
            return
        for name, url in wanted.items():
            if name in self._urls:
                continue
            try:
                transport = self.factory(name, url)
            except CoordinatorError as exc:
                self.config_errors[name] = exc.message
                continue
            self.config_errors.pop(name, None)
            self._urls[name] = url
            self.transports[name] = transport
            try:
                await transport.start()
            except CoordinatorError as exc:
                self.errors[name] = exc.message

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if self._urls != {n: u for n, u in self.applier.machine.bus.transport_urls.items()
                              if n not in self.local}:
                await self.sync_cluster_urls()
            active = bool(self.is_active())
            if active != self.active:
                self.set_active(active)
            if active:
                self.step()

    def step(self) -> None:
        """Start a publish for every bound topic with unsent messages and none in flight."""
        now = asyncio.get_running_loop().time()  # retry pacing is real time, not the injected clock
        self._tasks = {name: task for name, task in self._tasks.items() if not task.done()}
        bus = self.applier.machine.bus
        for topic, created in [k for k in self._bound if k[0] not in bus.bindings
                               or bus.bindings[k[0]].created_index != k[1]]:
            self._spawn_unbind(topic, created)
        for topic, binding in list(bus.bindings.items()):
            task = self._tasks.get(topic)
            if (task is not None and not task.done()) or self._retry_at.get(topic, 0.0) > now:
                continue
            if binding.mode == "direct":  # nodes publish it themselves; the leader makes (and unmakes) it
                if (topic, binding.created_index) not in self._bound:
                    self._tasks[topic] = asyncio.get_running_loop().create_task(self._bind_direct(topic))
                continue
            if binding.cursor >= bus.topics[topic].next_offset - 1:
                continue
            self._tasks[topic] = asyncio.get_running_loop().create_task(self._publish(topic))

    def _spawn_unbind(self, topic: str, created: int) -> None:
        """The binding was removed (committed): remove the topic's broker resources.
        Best effort: a leader change in between leaves them to the operator."""
        transport_name = self._bound.pop((topic, created))
        transport = self.transports.get(transport_name) if transport_name else None
        if transport is None:
            return

        async def unbind() -> None:
            try:
                await transport.unbind(topic)
            except CoordinatorError as exc:
                log.warning("transport %s: removing %s at the broker failed (%s)", transport.name, topic,
                            exc.message)

        self._tasks[f"unbind {topic} {created}"] = asyncio.get_running_loop().create_task(unbind())

    async def _publish(self, topic: str) -> None:
        bus = self.applier.machine.bus
        binding = bus.bindings.get(topic)
        if binding is None:
            return
        transport = self.transports.get(binding.transport)
        if transport is None:
            self.errors[binding.transport] = "not configured on the leader"
            self._back_off(topic)
            return
        bodies = bus.unsent(topic, BATCH_MAX)  # held messages in (cursor, cursor + BATCH_MAX]
        last = min(bus.topics[topic].next_offset - 1, binding.cursor + BATCH_MAX)
        created = binding.created_index
        try:
            if (topic, created) not in self._bound:
                await transport.bind(topic)
                self._bound[(topic, created)] = binding.transport
            if bodies:
                await transport.publish([TransportEntry(topic, b.offset, b.index, b.message) for b in bodies])
            cursor = BusCursor(topic, last, created)
            raise_for(await self.proposer.propose(cursor.op, cursor.to_args()))
        except CoordinatorError as exc:
            # Bind again before the next try: a broker that restarted without
            # persistence lost the topic's resources (and what it held: its durability).
            self._bound.pop((topic, created), None)
            self.errors[binding.transport] = exc.message
            log.info("transport %s: publishing %s failed (%s); will retry", binding.transport, topic, exc.message)
            self._back_off(topic)
            return
        self.sent += len(bodies)
        self.errors.pop(binding.transport, None)
        self._failures.pop(topic, None)
        self._retry_at.pop(topic, None)

    async def _bind_direct(self, topic: str) -> None:
        binding = self.applier.machine.bus.bindings.get(topic)
        transport = self.transports.get(binding.transport) if binding is not None else None
        if binding is None or transport is None:
            if binding is not None:
                self.errors[binding.transport] = "not configured on the leader"
                self._back_off(topic)
            return
        try:
            await transport.bind(topic)
        except CoordinatorError as exc:
            self.errors[binding.transport] = exc.message
            self._back_off(topic)
            return
        self._bound[(topic, binding.created_index)] = binding.transport
        self.errors.pop(binding.transport, None)
        self._failures.pop(topic, None)
        self._retry_at.pop(topic, None)

    def _back_off(self, topic: str) -> None:
        failures = self._failures.get(topic, 0) + 1
        self._failures[topic] = failures
        self._retry_at[topic] = asyncio.get_running_loop().time() + min(0.05 * 2 ** failures, RETRY_MAX_S)

    # -- status --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        out = {}
        for name, transport in self.transports.items():
            health = await transport.health()
            ok = health.ok and name not in self.errors
            out[name] = {"ok": ok, "detail": self.errors.get(name, health.detail), "guarantee": transport.guarantee}
        return out

    def bindings(self) -> list[dict[str, Any]]:
        bus = self.applier.machine.bus
        out = []
        for topic, binding in bus.bindings.items():
            row = binding.describe(bus.topics[topic].next_offset)
            row["configured"] = binding.transport in self.transports
            row["error"] = self.errors.get(binding.transport)
            out.append(row)
        return out
