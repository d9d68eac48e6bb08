"""A running digest of the replicated state machine's history.

Every replica that applied the same entries in the same order, with the same
results, holds the same ``StateDigest`` at the same index; a replica that
applied another entry, computed another result, or whose cheap state
counters drifted, holds another one from that index on, forever (each value
hashes the previous one). That makes two replicas comparable at any index
they both reached, cheaply: one SHA-256 over a few fixed-size fields per
applied entry, no pass over the state.

    value(i) = sha256(value(prev) || i || sha256(entry) || sha256(result) || sha256(summary))

``entry`` is the log entry's bytes as the engine handed them, ``result`` the
bytes ``ReplicatedFSM.apply`` returns for it (``codec.encode_result``), and
``summary`` a handful of O(1) counters of the state after the entry (see
``Applier``): a handler that changed the state differently without changing
its result still shows there when it moved one of them. The digest does not
hash the whole state, so a divergence that touches neither a result nor a
counter shows only once it reaches a later result.

Snapshots carry the digest (``to_data``/``from_data``): a replica restored
from a snapshot continues the same chain. ``checkpoints`` keeps the values at
the first index of every ``every`` entries (the first applied index at or
past each multiple of ``every``: Raft indexes have gaps where the engine's
own entries are, and every replica has the same gaps), so replicas at
different indexes still find a recent index in common.

Pure: hashlib only, no clock, no I/O. One instance per replica, owned by
``services.applier.Applier`` on the loop thread.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from typing import Any

from coordinator.errors import InvariantError

GENESIS = bytes(32)
CHECKPOINT_EVERY = 64  # entries between comparable checkpoints
CHECKPOINTS_KEPT = 16  # so a replica up to ~1000 entries behind still shares one
DIGEST_VERSION = 1

_sha256 = hashlib.sha256


class StateDigest:
    def __init__(self, index: int = 0, value: bytes = GENESIS, *, every: int = CHECKPOINT_EVERY,
                 kept: int = CHECKPOINTS_KEPT) -> None:
        if every < 1 or kept < 1 or len(value) != 32 or index < 0:
            raise InvariantError("a state digest needs every >= 1, kept >= 1, a 32-byte value and an index >= 0")
        self.index = index
        self.value = value
        self.every = every
        self.checkpoints: deque[tuple[int, bytes]] = deque(maxlen=kept)

    def advance(self, index: int, entry: bytes, result: bytes, summary: bytes = b"") -> None:
        """Chain the entry applied at ``index``. Indexes must grow (``InvariantError``)."""
        if index <= self.index:
            raise InvariantError(f"digest index {index} after {self.index}")
        previous = self.index
        self.value = _sha256(b"".join((self.value, index.to_bytes(8, "big"), _sha256(entry).digest(),
                                       _sha256(result).digest(), _sha256(summary).digest()))).digest()
        self.index = index
        if previous // self.every != index // self.every:
            self.checkpoints.append((index, self.value))

    def points(self) -> list[tuple[int, str]]:
        """Every (index, hex value) this replica can be compared at: the
        checkpoints, then the latest, ascending, without repeats."""
        out = [(i, v.hex()) for i, v in self.checkpoints]
        if not out or out[-1][0] != self.index:
            out.append((self.index, self.value.hex()))
        return out

    def to_data(self) -> list[Any]:
        """Plain data for the snapshot: the chain's index and value."""
        return [DIGEST_VERSION, self.index, self.value]

    @classmethod
    def from_data(cls, data: Any, index: int, fallback_seed: bytes) -> StateDigest:
        """The digest a snapshot carries. A snapshot written before digests
        existed (``data`` None) starts a new chain at ``index`` from
        ``fallback_seed`` (the hash of the snapshot's bytes): replicas that
        restored the same snapshot agree with each other from there on, not
        with one that replayed the same entries from the log."""
        if data is None:
            return cls(index, hashlib.sha256(b"restored-without-digest" + fallback_seed).digest())
        if (not isinstance(data, list) or len(data) != 3 or data[0] != DIGEST_VERSION or type(data[1]) is not int
                or not isinstance(data[2], bytes) or len(data[2]) != 32):
            raise InvariantError("the snapshot's state digest is malformed")
        if data[1] != index:
            raise InvariantError(f"the snapshot's digest is at index {data[1]}, its state at {index}")
        return cls(data[1], data[2])


_SUMMARY_FORMATS: dict[int, struct.Struct] = {}  # by number of counters: compiled once, not per entry


def summary_bytes(*counters: int) -> bytes:
    """Fixed-width bytes of a few state counters: each as 8 bytes, big-endian,
    signed (one that does not fit in 64 bits raises ``struct.error``)."""
    form = _SUMMARY_FORMATS.get(len(counters))
    if form is None:
        form = _SUMMARY_FORMATS[len(counters)] = struct.Struct(f">{len(counters)}q")
    return form.pack(*counters)
