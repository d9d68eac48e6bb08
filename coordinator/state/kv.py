"""The key/value store: values with revisions, and a bounded change history.

``revision`` is store-wide (etcd's model): every put or delete increments it,
and each key remembers the revision of its creation and last change.

Bytes are counted (``approx_size`` of key and value): ``bytes`` for the live
entries, each charged to the principal that wrote it last (``owned``), and
the change history is trimmed by bytes as well as by count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedDict

from coordinator.state.base import ApplyContext, approx_size, charge
from coordinator.types import KvChange, build_kv_change


@dataclass(slots=True)
class KvEntry:
    value: Any
    create_revision: int
    mod_revision: int
    version: int
    size: int = 0  # approx_size of key and value
    owner: str | None = None  # the principal that wrote it last


def entry_size(key: str, value: Any) -> int:
    return len(key) + approx_size(value)


class KvStore:
    def __init__(self, history_max: int, history_bytes_max: int = 64 << 20) -> None:
        self.history_max = history_max
        self.history_bytes_max = history_bytes_max
        self.revision = 0
        self.bytes = 0  # live entries
        self.history_bytes = 0
        self.owned: dict[str, int] = {}  # principal -> bytes of the live entries it wrote
        self._entries: SortedDict[str, KvEntry] = SortedDict()
        self._history: deque[KvChange] = deque()
        self._history_sizes: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> KvEntry | None:
        return self._entries.get(key)

    def range(self, prefix: str, limit: int, start_after: str | None = None) -> list[tuple[str, KvEntry]]:
        """Keys starting with ``prefix`` (after ``start_after``) in order, at most ``limit``."""
        lo = start_after if start_after is not None and start_after > prefix else prefix
        out: list[tuple[str, KvEntry]] = []
        for key in self._entries.irange(minimum=lo):
            if key == start_after:
                continue
            if not key.startswith(prefix) or len(out) >= limit:
                break
            out.append((key, self._entries[key]))
        return out

    def put(self, ctx: ApplyContext, key: str, value: Any, size: int | None = None) -> int:
        """Store ``value`` under ``key`` for ``ctx.principal``; ``size`` is
        ``entry_size(key, value)`` when the caller already has it."""
        size = entry_size(key, value) if size is None else size
        self.revision += 1
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = KvEntry(value, self.revision, self.revision, 1)
        else:
            self._uncount(entry)
            entry.value = value
            entry.mod_revision = self.revision
            entry.version += 1
        entry.size, entry.owner = size, ctx.principal
        self.bytes += size
        charge(self.owned, entry.owner, size)
        self._record(ctx, build_kv_change(self.revision, key, "put", value, ctx.index), size)
        return self.revision

    def delete(self, ctx: ApplyContext, key: str) -> int:
        self.revision += 1
        self._uncount(self._entries.pop(key))
        self._record(ctx, build_kv_change(self.revision, key, "delete", None, ctx.index), len(key))
        return self.revision

    def _uncount(self, entry: KvEntry) -> None:
        self.bytes -= entry.size
        charge(self.owned, entry.owner, -entry.size)

    def _record(self, ctx: ApplyContext, change: KvChange, size: int) -> None:
        self._history.append(change)
        self._history_sizes.append(size)
        self.history_bytes += size
        while len(self._history) > self.history_max or (self.history_bytes > self.history_bytes_max
                                                         and len(self._history) > 1):
            self._history.popleft()
            self.history_bytes -= self._history_sizes.popleft()
        ctx.changes.append(change)

    @property
    def compact_revision(self) -> int:
        """Changes at or below this revision are no longer retained."""
        return self._history[0].revision - 1 if self._history else self.revision

    def changes_since(self, revision: int, prefix: str, limit: int) -> list[KvChange]:
        """Retained changes with ``change.revision >= revision`` under ``prefix``.

        Revisions in the history are contiguous (one change per revision), so
        the start is found by arithmetic rather than a scan.
        """
        if not self._history:
            return []
        out = []
        for i in range(max(0, revision - self._history[0].revision), len(self._history)):
            if len(out) >= limit:
                break
            change = self._history[i]
            if change.key.startswith(prefix):
                out.append(change)
        return out

    def to_data(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "entries": [[k, e.value, e.create_revision, e.mod_revision, e.version, e.size, e.owner]
                        for k, e in self._entries.items()],
            "history": [[c.revision, c.key, c.kind, c.value, c.index] for c in self._history],
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], history_max: int, history_bytes_max: int = 64 << 20) -> KvStore:
        """Rows written before bytes were counted have five fields: their size
        is computed and their owner is unknown (charged to nobody)."""
        store = cls(history_max, history_bytes_max)
        store.revision = data["revision"]
        for row in data["entries"]:
            key, value, created, modified, version = row[:5]
            size, owner = (row[5], row[6]) if len(row) > 5 else (entry_size(key, value), None)
            store._entries[key] = KvEntry(value, created, modified, version, size, owner)
            store.bytes += size
            charge(store.owned, owner, size)
        for r, k, kind, v, i in data["history"]:
            store._history.append(build_kv_change(r, k, kind, v, i))
            size = entry_size(k, v) if kind == "put" else len(k)
            store._history_sizes.append(size)
            store.history_bytes += size
        return store
