"""Watches of key prefixes and of the event sequence.

A watcher keeps a cursor (a revision or a sequence number) and reads forward
through the state machine's bounded history whenever the replica changes.
It never holds a queue of its own, so a slow watcher costs nothing until it
falls behind the retained history; then it gets ``Compacted`` and must
re-read and watch again (etcd's model).

Loop thread only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from coordinator.errors import Compacted
from coordinator.services.applier import Applier
from coordinator.state.eventstore import StoredEvent
from coordinator.types import Event, KvChange

BATCH_MAX = 256


async def watch_kv(applier: Applier, prefix: str, from_revision: int | None) -> AsyncIterator[list[KvChange]]:
    """Yield batches of changes under ``prefix`` with revision >= the cursor.

    ``from_revision=None`` starts after the current revision (new changes only).
    """
    cursor = applier.machine.kv.revision + 1 if from_revision is None else from_revision
    while True:
        seen = applier.version
        kv = applier.machine.kv
        if cursor <= kv.compact_revision and cursor <= kv.revision:
            raise Compacted(f"revision {cursor} is compacted; the oldest retained is {kv.compact_revision + 1}",
                            compact_revision=kv.compact_revision)
        if cursor > kv.revision + 1:
            cursor = kv.revision + 1  # the replica was reset to an older state: resume from there
        batch = kv.changes_since(cursor, prefix, BATCH_MAX)
        if batch:
            cursor = batch[-1].revision + 1
            yield batch
            continue
        cursor = max(cursor, kv.revision + 1)  # nothing under the prefix up to the head
        await applier.wait_change(seen)


async def watch_events(applier: Applier, from_seq: int | None, types: tuple[str, ...] = (),
                       shown: Callable[[Event], bool] | None = None) -> AsyncIterator[list[Event]]:
    """Yield batches of events with seq >= the cursor, optionally only of
    ``types`` (exact names, or prefixes ending in ``.*``) and that ``shown``
    accepts (the caller's view)."""
    cursor = applier.machine.events.last_seq + 1 if from_seq is None else from_seq
    while True:
        seen = applier.version
        events = applier.machine.events
        if cursor < events.first_seq and cursor <= events.last_seq:
            raise Compacted(f"event {cursor} is compacted; the oldest retained is {events.first_seq}",
                            first_seq=events.first_seq)
        batch = events.since(cursor, BATCH_MAX)
        if batch:
            cursor = batch[-1].seq + 1
            selected = [e for e in batch if event_matches(e.type, types) and (shown is None or shown(e))]
            if selected:
                yield selected
            continue
        cursor = max(cursor, events.last_seq + 1)
        await applier.wait_change(seen)


async def watch_category(applier: Applier, category: str,
                         from_position: int | None) -> AsyncIterator[list[StoredEvent]]:
    """Yield batches of the category's events with position >= the cursor
    (``None``: only events appended from now on). Events dropped by a stream
    truncation after the cursor end the watch with ``Compacted``."""
    cursor = applier.machine.store.position + 1 if from_position is None else from_position
    while True:
        seen = applier.version
        store = applier.machine.store
        log = store.categories.get(category)
        if log is not None and cursor <= log.dropped_through:
            raise Compacted(f"events of category {category!r} up to position {log.dropped_through} were truncated "
                            "below stream snapshots; read the streams (and their snapshots) instead",
                            dropped_through=log.dropped_through)
        batch = store.category_since(category, cursor, BATCH_MAX)
        if batch:
            cursor = batch[-1].position + 1
            yield batch
            continue
        cursor = max(cursor, store.position + 1)
        await applier.wait_change(seen)


def event_matches(event_type: str, types: tuple[str, ...]) -> bool:
    if not types:
        return True
    for pattern in types:
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
        if pattern == event_type:
            return True
    return False
