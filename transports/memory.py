"""``InMemoryTransport``: the reference implementation of ``BusTransport``,
in process, for tests and as the model the broker plugins are checked
against (hashicorp's ``InmemTransport``, etcd's ``MemoryStorage``).

It deduplicates by entry key like a broker that can (``exactly-once``),
redelivers what was not acked after ``ack_timeout_s``, and can be told to
be down (``down = True``) to exercise a broker outage.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from coordinator.errors import Unavailable
from coordinator.types import TransportDelivery, TransportEntry, TransportHealth


@dataclass
class _Group:
    cursor: int = 0  # position in the topic's list of entries
    pending: dict[str, tuple[int, float, bool]] = field(default_factory=dict)  # id -> (position, due, redelivered)
    returned: list[int] = field(default_factory=list)  # positions nacked or timed out, to hand out first


class InMemoryTransport:
    name = "memory"
    guarantee = "exactly-once"

    def __init__(self, url: str = "memory://", *, namespace: str = "coord", timeout_s: float = 5.0,
                 ack_timeout_s: float = 30.0) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.down = False
        self._topics: dict[str, list[TransportEntry]] = {}
        self._keys: dict[str, set[str]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._changed = asyncio.Event()
        self._seq = 0

    def _check(self) -> None:
        if self.down:
            raise Unavailable("memory transport is down", retry_after_s=1.0)

    async def start(self) -> None:
        self._check()

    async def close(self) -> None:
        return None

    async def bind(self, topic: str) -> None:
        self._check()
        self._topics.setdefault(topic, [])
        self._keys.setdefault(topic, set())

    async def unbind(self, topic: str) -> None:
        self._check()
        self._topics.pop(topic, None)
        self._keys.pop(topic, None)
        for key in [k for k in self._groups if k[0] == topic]:
            del self._groups[key]

    async def publish(self, entries: list[TransportEntry]) -> int:
        return self._append(entries, renumber=False)

    async def publish_direct(self, entries: list[TransportEntry]) -> int:
        """Append, deduplicating by key; a delivery's offset is the position (from 1)."""
        return self._append(entries, renumber=True)

    def _append(self, entries: list[TransportEntry], *, renumber: bool) -> int:
        """Store the entries whose key the topic does not hold yet; how many
        were new. ``renumber``: the entry's offset becomes its position."""
        self._check()
        new = 0
        for entry in entries:
            if entry.topic not in self._topics:
                raise Unavailable(f"topic {entry.topic!r} is not bound", retry_after_s=1.0)
            if entry.key in self._keys[entry.topic]:
                continue
            self._keys[entry.topic].add(entry.key)
            stored = self._topics[entry.topic]
            stored.append(TransportEntry(entry.topic, len(stored) + 1, 0, entry.message, entry.key)
                          if renumber else entry)
            new += 1
        self._changed.set()
        return new

    async def subscribe(self, topic: str, group: str) -> None:
        self._check()
        if topic not in self._topics:
            raise Unavailable(f"topic {topic!r} is not bound", retry_after_s=1.0)
        self._groups.setdefault((topic, group), _Group())

    async def fetch(self, topic: str, group: str, consumer: str, max_n: int,
                    wait_s: float) -> list[TransportDelivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            self._check()
            out = self._take(topic, group, max_n, loop.time())
            remaining = deadline - loop.time()
            if out or remaining <= 0:
                return out
            self._changed.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _take(self, topic: str, group: str, max_n: int, now: float) -> list[TransportDelivery]:
        state = self._groups.get((topic, group))
        if state is None:
            raise Unavailable(f"group {group!r} of {topic!r} does not exist", retry_after_s=1.0)
        for delivery_id, (position, due, _) in list(state.pending.items()):
            if due <= now:
                del state.pending[delivery_id]
                state.returned.append(position)
        entries = self._topics[topic]
        out = []
        while len(out) < max_n:
            if state.returned:
                position, redelivered = state.returned.pop(0), True
            elif state.cursor < len(entries):
                position, redelivered = state.cursor, False
                state.cursor += 1
            else:
                break
            self._seq += 1
            delivery_id = str(self._seq)
            state.pending[delivery_id] = (position, now + self.ack_timeout_s, redelivered)
            entry = entries[position]
            out.append(TransportDelivery(delivery_id, topic, entry.offset, entry.key, entry.message, redelivered))
        return out

    async def ack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        self._check()
        state = self._groups.get((topic, group))
        for delivery_id in delivery_ids:
            if state is not None:
                state.pending.pop(delivery_id, None)

    async def nack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        self._check()
        state = self._groups.get((topic, group))
        for delivery_id in delivery_ids:
            if state is not None and delivery_id in state.pending:
                state.returned.append(state.pending.pop(delivery_id)[0])
        self._changed.set()

    async def health(self) -> TransportHealth:
        return TransportHealth(not self.down, "down" if self.down else "in process")

    async def lag(self, topic: str, group: str) -> int:
        self._check()
        state = self._groups.get((topic, group))
        if state is None:
            return len(self._topics.get(topic, ()))
        return len(self._topics[topic]) - state.cursor + len(state.pending) + len(state.returned)


