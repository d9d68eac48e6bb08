"""The key/value store: values with revisions, and a bounded change history.

``revision`` is store-wide (etcd's model): every put or delete increments it,
and each key remembers the revision of its creation and last change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedDict

from coordinator.state.base import ApplyContext
from coordinator.types import KvChange


@dataclass(slots=True)
class KvEntry:
    value: Any
    create_revision: int
    mod_revision: int
    version: int


class KvStore:
    def __init__(self, history_max: int) -> None:
        self.history_max = history_max
        self.revision = 0
        self._entries: SortedDict[str, KvEntry] = SortedDict()
        self._history: deque[KvChange] = deque()

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

    def put(self, ctx: ApplyContext, key: str, value: Any) -> int:
        self.revision += 1
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = KvEntry(value, self.revision, self.revision, 1)
        else:
            entry.value = value
            entry.mod_revision = self.revision
            entry.version += 1
        self._record(ctx, KvChange(self.revision, key, "put", value, ctx.index))
        return self.revision

    def delete(self, ctx: ApplyContext, key: str) -> int:
        self.revision += 1
        del self._entries[key]
        self._record(ctx, KvChange(self.revision, key, "delete", None, ctx.index))
        return self.revision

    def _record(self, ctx: ApplyContext, change: KvChange) -> None:
        self._history.append(change)
        while len(self._history) > self.history_max:
            self._history.popleft()
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
            "entries": [[k, e.value, e.create_revision, e.mod_revision, e.version] for k, e in self._entries.items()],
            "history": [[c.revision, c.key, c.kind, c.value, c.index] for c in self._history],
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], history_max: int) -> KvStore:
        store = cls(history_max)
        store.revision = data["revision"]
        store._entries = SortedDict({k: KvEntry(v, c, m, ver) for k, v, c, m, ver in data["entries"]})
        store._history = deque(KvChange(r, k, kind, v, i) for r, k, kind, v, i in data["history"])
        return store
