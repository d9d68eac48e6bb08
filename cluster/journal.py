"""A durable Raft journal: the log entries, ``currentTerm`` and ``votedFor``.

It implements the journal interface pysyncobj expects (``add``, ``clear``,
``deleteEntriesFrom``, ``deleteEntriesTo``, indexing, ``setCurrentTerm``...)
without importing pysyncobj, and differs from pysyncobj's own FileJournal
where that one loses data:

* ``setCurrentTerm`` writes the term and vote to disk and fsyncs (file and
  directory) before it returns, so no vote or append response that reflects
  them can leave the node first (pysyncobj issue #84).
* entries are appended with ``write`` and made durable by ``sync()``, which
  the engine calls before any message leaves the node (group commit: one
  fdatasync for everything appended since the last message).
* every record carries its length and CRC32; a torn record at the tail (a
  crash in the middle of a write) is cut off, a damaged record before the
  tail makes ``open`` fail with ``JournalCorrupt``.
* metadata is msgpack through ``coordinator.codec``, never pickle. The entry
  payloads are pysyncobj's own command envelopes, stored as opaque bytes.

Every fsync, truncation and rename goes through ``cluster.files`` (so the
power-loss recorder of chaos tests sees it).

Threading: used only by pysyncobj's tick thread after construction.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

from cluster import files
from cluster.errors import JournalCorrupt
from coordinator.codec import decode_record, encode_record

_HEADER = struct.Struct("<II")  # payload length, crc32 of payload
_ENTRY = struct.Struct("<QQ")  # index, term
_MAGIC = b"COORDJ1\n"


def _fsync_dir(path: str) -> None:
    files.sync_dir(path)


def write_file_durably(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``fsync=False``:
    atomically only, for durability "none")."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            files.sync(f.fileno(), tmp)
    files.replace(tmp, path)
    if fsync:
        _fsync_dir(path)


def frame(payload: bytes) -> bytes:
    """One journal record: length, CRC32, payload."""
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes, offset: int, path: str) -> tuple[list[tuple[int, bytes]], int]:
    """The records ``frame`` wrote from ``offset`` on, as (start, payload), and
    where the valid ones end. A torn record at the tail (a crash in the middle
    of a write) ends the list; a damaged record with valid-looking data after
    it raises ``JournalCorrupt``."""
    payloads: list[tuple[int, bytes]] = []
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            break  # torn header at the tail
        length, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if end > len(data):
            break  # torn payload at the tail
        payload = data[offset + _HEADER.size:end]
        if zlib.crc32(payload) != crc:
            if end >= len(data) or not any(data[end:]):  # nothing valid-looking follows: a torn tail
                break
            raise JournalCorrupt(f"{path}: damaged record at byte {offset}")
        payloads.append((offset, payload))
        offset = end
    return payloads, offset


class DurableJournal:
    def __init__(self, path: str, durability: str = "fsync") -> None:
        if durability not in ("fsync", "none"):
            raise ValueError("durability must be 'fsync' or 'none'")
        self.path = path
        self.meta_path = path + ".meta"
        self.durability = durability
        self.syncs = 0  # number of fdatasync calls, for tests and metrics
        self.synced_len = 0  # entries known durable
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []  # file offset where entry i starts
        self._dirty = False
        self._meta_dirty = False
        self._meta: dict[str, Any] = self._load_meta()
        self._file = self._open_log()
        self.synced_len = len(self._entries)

    # -- loading -------------------------------------------------------------

    def _load_meta(self) -> dict[str, Any]:
        try:
            with open(self.meta_path, "rb") as f:
                meta = decode_record(f.read())
        except FileNotFoundError:
            return {"term": 0, "voted_for": None, "commit_index": 1}
        except Exception as exc:
            raise JournalCorrupt(f"unreadable journal metadata {self.meta_path}: {exc}") from exc
        if not isinstance(meta, dict):
            raise JournalCorrupt(f"journal metadata {self.meta_path} is not a map")
        return meta

    def _open_log(self) -> Any:
        if not os.path.exists(self.path):
            with open(self.path, "wb") as f:
                f.write(_MAGIC)
                f.flush()
                files.sync(f.fileno(), self.path)
            _fsync_dir(self.path)
        f = open(self.path, "r+b")  # noqa: SIM115 - kept open for the journal's life
        data = f.read()
        if not data.startswith(_MAGIC):
            f.close()
            raise JournalCorrupt(f"{self.path} is not a coordinator journal")
        try:
            payloads, offset = read_frames(data, len(_MAGIC), self.path)
        except JournalCorrupt:
            f.close()
            raise
        for start, payload in payloads:
            if len(payload) < _ENTRY.size:
                f.close()
                raise JournalCorrupt(f"{self.path}: damaged record at byte {start}")
            index, term = _ENTRY.unpack_from(payload)
            self._entries.append((payload[_ENTRY.size:], index, term))
            self._offsets.append(start)
        if offset != len(data):
            files.truncate(f.fileno(), self.path, offset)
        # What was read may be only in the page cache (a crashed predecessor's
        # unsynced appends, a compaction whose rename was not yet synced), and a
        # leader's append that matches it adds nothing, so no sync would come
        # before this node acknowledges it: make it durable now, once per open.
        files.sync(f.fileno(), self.path)
        _fsync_dir(self.path)
        f.seek(offset)
        return f

    # -- pysyncobj's journal interface --------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        payload = _ENTRY.pack(idx, term) + bytes(command)
        offset = self._file.tell()
        self._file.write(frame(payload))
        self._entries.append((bytes(command), idx, term))
        self._offsets.append(offset)
        self._dirty = True

    def clear(self) -> None:
        self._truncate_to(0)

    def deleteEntriesFrom(self, entry_from: int) -> None:  # noqa: N802 - pysyncobj's name
        self._truncate_to(entry_from)

    def deleteEntriesTo(self, entry_to: int) -> None:  # noqa: N802 - pysyncobj's name
        """Drop the first ``entryTo`` entries (log compaction): rewrite the file."""
        keep = self._entries[entry_to:]
        tmp = self.path + ".compact"
        offsets = []
        with open(tmp, "wb") as f:
            f.write(_MAGIC)
            for command, idx, term in keep:
                offsets.append(f.tell())
                payload = _ENTRY.pack(idx, term) + command
                f.write(frame(payload))
            f.flush()
            files.sync(f.fileno(), tmp)
        self._file.close()
        files.replace(tmp, self.path)
        _fsync_dir(self.path)
        self._file = open(self.path, "r+b")  # noqa: SIM115
        self._file.seek(0, os.SEEK_END)
        self._entries = keep
        self._offsets = offsets
        self._dirty = False
        self.synced_len = len(keep)

    def _truncate_to(self, count: int) -> None:
        if count >= len(self._entries):
            return
        offset = self._offsets[count] if count < len(self._offsets) else len(_MAGIC)
        del self._entries[count:]
        del self._offsets[count:]
        self._file.flush()
        files.truncate(self._file.fileno(), self.path, offset)
        self._file.seek(offset)
        self.synced_len = min(self.synced_len, count)
        self._dirty = True

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def setRaftCommitIndex(self, commit_index: int) -> None:  # noqa: N802
        # Not needed for safety (the leader re-sends it); saved once a second.
        self._meta["commit_index"] = commit_index
        self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return int(self._meta.get("commit_index", 1))

    def setCurrentTerm(self, term: int, voted_for: str | None) -> None:  # noqa: N802
        self._meta["term"] = term
        self._meta["voted_for"] = voted_for
        self._store_meta()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if self._meta_dirty:
            self._store_meta()

    def flush(self) -> None:
        self.sync()

    def _destroy(self) -> None:
        self.sync()
        self._file.close()

    # -- durability ------------------------------------------------------------------

    def sync(self) -> None:
        """Make every appended entry durable (no-op when nothing is new)."""
        if not self._dirty:
            return
        self._file.flush()
        if self.durability == "fsync":
            files.sync(self._file.fileno(), self.path, data_only=True)
            self.syncs += 1
        self._dirty = False
        self.synced_len = len(self._entries)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _store_meta(self) -> None:
        data = encode_record(self._meta)
        if self.durability == "fsync":
            write_file_durably(self.meta_path, data)
        else:
            with open(self.meta_path + ".tmp", "wb") as f:
                f.write(data)
            files.replace(self.meta_path + ".tmp", self.meta_path)
        self._meta_dirty = False
