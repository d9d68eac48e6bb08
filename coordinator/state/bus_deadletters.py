"""Dead letters: the entries a consumer gave up on (too many attempts, TTL,
rejected, overflow, a transform that failed), with their reason, at most
``dlq_max`` per consumer (the oldest go first); redriven to the ready queue
or purged by command."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coordinator.state.base import ApplyContext, Rejected
from coordinator.state.bus_records import BusLimits, Consumer, Entry
from coordinator.state.bus_retention import Retention


class DeadLetters:
    def __init__(self, limits: BusLimits, retention: Retention) -> None:
        self.limits = limits
        self.retention = retention

    def add(self, ctx: ApplyContext, consumer: Consumer, entry: Entry, reason: str, *,
            in_entries: bool = True) -> None:
        """``entry`` is dead (``in_entries``: it leaves the consumer's entries)."""
        if in_entries:
            consumer.entries.pop(entry.seq, None)
        entry.state = "dead"
        entry.member = None
        entry.reason = reason
        entry.dead_ms = ctx.now_ms
        consumer.dlq[entry.seq] = entry
        consumer.counters["dead_lettered"] += 1
        while len(consumer.dlq) > self.limits.dlq_max:
            oldest = consumer.dlq.pop(next(iter(consumer.dlq)))
            consumer.counters["dlq_dropped"] += 1
            self.retention.release(self.retention.bodies[(oldest.topic, oldest.offset)], consumer.key)

    def list(self, consumer: Consumer, limit: int) -> list[dict[str, Any]]:
        out = []
        for entry in consumer.dlq.values():
            if len(out) >= limit:
                break
            out.append({"delivery_id": consumer.delivery_id(entry.seq), "reason": entry.reason,
                        "attempts": entry.attempts, "dead_ms": entry.dead_ms, "topic": entry.topic,
                        "offset": entry.offset,
                        "message": self.retention.bodies[(entry.topic, entry.offset)].message})
        return out

    def redrive(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str] | None) -> dict[str, Any]:
        """Dead letters back to the ready queue with fresh attempts (all when
        ``delivery_ids`` is None). They keep their delivery ids."""
        chosen = self._chosen(consumer, delivery_ids)
        room = self.limits.queue_max - len(consumer.entries)
        if len(chosen) > room:
            raise Rejected("unavailable", f"the queue has room for {max(room, 0)} more messages")
        for entry in chosen:
            del consumer.dlq[entry.seq]
            entry.attempts = 0
            entry.reason = None
            consumer.entries[entry.seq] = entry
            consumer.push_ready(entry)
            consumer.counters["redriven"] += 1
        return {"redriven": [consumer.delivery_id(e.seq) for e in chosen]}

    def purge(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str] | None) -> dict[str, Any]:
        chosen = self._chosen(consumer, delivery_ids)
        for entry in chosen:
            del consumer.dlq[entry.seq]
            self.retention.release(self.retention.bodies[(entry.topic, entry.offset)], consumer.key)
        return {"purged": len(chosen)}

    @staticmethod
    def _chosen(consumer: Consumer, delivery_ids: Sequence[str] | None) -> list[Entry]:
        if delivery_ids is None:
            return list(consumer.dlq.values())
        chosen = []
        for delivery_id, seq in consumer.seqs(delivery_ids):
            entry = consumer.dlq.get(seq) if seq is not None else None
            if entry is None:
                raise Rejected("not_found", f"delivery {delivery_id!r} is not a dead letter of this consumer")
            chosen.append(entry)
        return chosen
