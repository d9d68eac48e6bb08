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
* every record carries a header checked on its own (a sync mark, the
  payload's length and CRC32, and a CRC32 of those) and the payload's CRC32
  (format ``COORDJ2``, ``frame_v2``). A torn record at the tail (a crash in
  the middle of a write) is cut off; a damaged record, header or payload,
  with a valid record anywhere after it makes ``open`` fail with
  ``JournalCorrupt`` naming the file and byte offset, so a node never starts
  with a log silently shorter than the one it acknowledged. The first format,
  ``COORDJ1`` (length and payload CRC only), is still read, checked the same
  way as far as it can be, and rewritten as ``COORDJ2`` on open.
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

_HEADER = struct.Struct("<II")  # COORDJ1 (and PBFT's journal): payload length, crc32 of payload
_ENTRY = struct.Struct("<QQ")  # index, term
_MAGIC_V1 = b"COORDJ1\n"
_MAGIC = b"COORDJ2\n"
# COORDJ2: sync mark, payload length, crc32 of payload, crc32 of the 10 bytes before it.
_HEADER_V2 = struct.Struct("<2sIII")
_MARK = b"\xc5J"  # lets a reader find the next record start after damage with bytes.find
_HEADER_V2_CHECKED = _HEADER_V2.size - 4  # the bytes the header CRC covers


def _fsync_dir(path: str) -> None:
    files.sync_dir(path)


def _create(path: str) -> Any:
    """Open ``path`` for writing from scratch, readable by the owner only
    (mode 0600 whatever the umask: it holds the cluster's data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, "wb")


def write_file_durably(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``fsync=False``:
    atomically only, for durability "none"); the file is mode 0600."""
    tmp = path + ".tmp"
    with _create(tmp) as f:
        f.write(data)
        f.flush()
        if fsync:
            files.sync(f.fileno(), tmp)
    files.replace(tmp, path)
    if fsync:
        _fsync_dir(path)


def replace_durably(src: str, dst: str, *, fsync: bool = True) -> None:
    """Rename the complete file ``src`` (written by someone else, maybe never
    synced) onto ``dst``: its data is fsynced before the rename, the directory
    after, so when this returns ``dst`` holds ``src``'s bytes across a power
    cut (``fsync=False``: the rename only). Raises ``OSError``."""
    os.chmod(src, 0o600)  # written by pysyncobj with the process's umask
    if fsync:
        fd = os.open(src, os.O_RDONLY)
        try:
            files.sync(fd, src)
        finally:
            os.close(fd)
    files.replace(src, dst)
    if fsync:
        _fsync_dir(dst)


def frame(payload: bytes) -> bytes:
    """One ``COORDJ1`` record (PBFT's journal still writes these): length,
    CRC32 of the payload, payload. The length is outside the CRC; the Raft
    journal writes ``frame_v2``."""
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


def _damaged_in_the_middle(path: str, offset: int, following: int) -> str:
    return (f"{path}: damaged record at byte {offset} with a valid record after it (byte {following}), "
            "not a torn tail: refusing to start without the entries after it (to rebuild this node from "
            "the other members, move its data directory away)")


def frame_v2(payload: bytes) -> bytes:
    """One ``COORDJ2`` record: a header that carries its own CRC, then the payload."""
    head = _MARK + struct.pack("<II", len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


_OK, _TORN, _BAD = "ok", "torn", "bad"


def _record_v2_at(data: bytes, offset: int) -> tuple[str, int]:
    """Classify the record at ``offset``: (``_OK``, its end), (``_TORN``, -1)
    when it runs past the end of ``data`` (the header, if complete, is valid),
    (``_BAD``, its end or -1 when the header itself is damaged)."""
    if offset + _HEADER_V2.size > len(data):
        return _TORN, -1
    mark, length, crc, head_crc = _HEADER_V2.unpack_from(data, offset)
    if mark != _MARK or zlib.crc32(data[offset:offset + _HEADER_V2_CHECKED]) != head_crc:
        return _BAD, -1
    end = offset + _HEADER_V2.size + length
    if end > len(data):
        return _TORN, -1
    if zlib.crc32(data[offset + _HEADER_V2.size:end]) != crc:
        return _BAD, end
    return _OK, end


def _next_valid_v2(data: bytes, start: int) -> int | None:
    """The offset of the first complete, valid record at or after ``start``."""
    position = data.find(_MARK, start)
    while position != -1:  # each turn moves past a mark: at most len(data) turns
        if _record_v2_at(data, position)[0] == _OK:
            return position
        position = data.find(_MARK, position + 1)
    return None


def read_frames_v2(data: bytes, offset: int, path: str) -> tuple[list[tuple[int, bytes]], int]:
    """The records ``frame_v2`` wrote from ``offset`` on, as (start, payload),
    and where the valid ones end.

    A record that runs past the end of the file, or a damaged record (header
    or payload) with no complete valid record anywhere after it, is a torn
    tail (a crash in the middle of appending, or blocks of the last unsynced
    writes missing): the list ends there. A damaged record followed by a valid
    one is damage in the middle of the log, which a torn write cannot
    produce: ``JournalCorrupt`` naming the file and the record's offset.
    (Damage to the very last record cannot be told from a torn write; it is
    cut off like one.)"""
    payloads: list[tuple[int, bytes]] = []
    while offset < len(data):  # every turn moves offset forward or leaves
        state, end = _record_v2_at(data, offset)
        if state == _OK:
            payloads.append((offset, data[offset + _HEADER_V2.size:end]))
            offset = end
            continue
        if state == _TORN:
            break
        following = _next_valid_v2(data, end if end > 0 else offset + 1)
        if following is None:
            break
        raise JournalCorrupt(_damaged_in_the_middle(path, offset, following))
    return payloads, offset


def _next_valid_v1(data: bytes, start: int, min_length: int) -> int | None:
    """The offset of the first complete ``frame`` record at or after ``start``
    whose payload has at least ``min_length`` bytes and matches its CRC
    (COORDJ1 has no mark to search for: every offset is tried, which only
    happens once, when a damaged old journal is opened)."""
    end_of_data = len(data)
    for position in range(start, end_of_data - _HEADER.size - min_length + 1):
        length, crc = _HEADER.unpack_from(data, position)
        end = position + _HEADER.size + length
        if length >= min_length and end <= end_of_data and zlib.crc32(data[position + _HEADER.size:end]) == crc:
            return position
    return None


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
        self._end = self._file.tell()  # the file's length (read from any thread)
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
            self._create_empty()
        for path in (self.path, self.meta_path):  # written before files were 0600: owner only from now on
            if os.path.exists(path):
                os.chmod(path, 0o600)
        with open(self.path, "rb") as f:
            data = f.read()
        if len(data) < len(_MAGIC) and _MAGIC.startswith(data):
            self._create_empty()  # a crash while the file was being created: nothing was in it
            data = _MAGIC
        if data.startswith(_MAGIC):
            payloads, offset = read_frames_v2(data, len(_MAGIC), self.path)
        elif data.startswith(_MAGIC_V1):
            payloads, offset = read_frames(data, len(_MAGIC_V1), self.path)
            # COORDJ1 cannot tell a damaged length from a torn tail by the header alone:
            # a complete valid entry record after the stop means the stop was damage.
            following = _next_valid_v1(data, offset + 1, _ENTRY.size) if offset < len(data) else None
            if following is not None:
                raise JournalCorrupt(_damaged_in_the_middle(self.path, offset, following))
        else:
            raise JournalCorrupt(f"{self.path} is not a coordinator journal")
        for start, payload in payloads:
            if len(payload) < _ENTRY.size:
                raise JournalCorrupt(f"{self.path}: damaged record at byte {start}")
            index, term = _ENTRY.unpack_from(payload)
            self._entries.append((payload[_ENTRY.size:], index, term))
            self._offsets.append(start)
        if not data.startswith(_MAGIC):  # an old format: rewritten in the current one before anything is appended
            f, self._offsets = self._rewrite(self._entries)
            return f
        f = open(self.path, "r+b")  # noqa: SIM115 - kept open for the journal's life
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

    def _create_empty(self) -> None:
        with _create(self.path) as f:
            f.write(_MAGIC)
            f.flush()
            files.sync(f.fileno(), self.path)
        _fsync_dir(self.path)

    def _rewrite(self, entries: list[tuple[bytes, int, int]]) -> tuple[Any, list[int]]:
        """Replace the file with ``entries`` in the current format, durably
        (temporary file, fsync, rename, fsync of the directory); returns the
        new file, open at its end, and each entry's offset."""
        tmp = self.path + ".compact"
        offsets = []
        with _create(tmp) as f:
            f.write(_MAGIC)
            for command, idx, term in entries:
                offsets.append(f.tell())
                f.write(frame_v2(_ENTRY.pack(idx, term) + command))
            f.flush()
            files.sync(f.fileno(), tmp)
        files.replace(tmp, self.path)
        _fsync_dir(self.path)
        f = open(self.path, "r+b")  # noqa: SIM115 - kept open for the journal's life
        f.seek(0, os.SEEK_END)
        return f, offsets

    # -- pysyncobj's journal interface --------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        payload = _ENTRY.pack(idx, term) + bytes(command)
        offset = self._file.tell()
        record = frame_v2(payload)
        self._file.write(record)
        self._end = offset + len(record)
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
        rewritten, self._offsets = self._rewrite(keep)
        self._file.close()
        self._file = rewritten
        self._end = rewritten.tell()
        self._entries = keep
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
        self._end = offset
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
    def size_bytes(self) -> int:
        """The journal file's length: what compaction by bytes looks at."""
        return self._end

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _store_meta(self) -> None:
        data = encode_record(self._meta)
        if self.durability == "fsync":
            write_file_durably(self.meta_path, data)
        else:
            with _create(self.meta_path + ".tmp") as f:
                f.write(data)
            files.replace(self.meta_path + ".tmp", self.meta_path)
        self._meta_dirty = False


def read_entries(path: str) -> list[tuple[bytes, int, int]]:
    """The entries of the journal at ``path`` as (command, index, term),
    read without changing the file (offline tools; the node must not run).
    A torn tail is left out, as ``open`` would cut it; damage in the middle
    raises ``JournalCorrupt``. A missing file holds no entry."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    if data.startswith(_MAGIC):
        payloads, _ = read_frames_v2(data, len(_MAGIC), path)
    elif data.startswith(_MAGIC_V1):
        payloads, _ = read_frames(data, len(_MAGIC_V1), path)
    elif len(data) < len(_MAGIC) and _MAGIC.startswith(data):
        return []
    else:
        raise JournalCorrupt(f"{path} is not a coordinator journal")
    entries = []
    for start, payload in payloads:
        if len(payload) < _ENTRY.size:
            raise JournalCorrupt(f"{path}: damaged record at byte {start}")
        index, term = _ENTRY.unpack_from(payload)
        entries.append((payload[_ENTRY.size:], index, term))
    return entries


def read_meta(path: str) -> dict[str, Any]:
    """The journal's metadata (term, vote, commit index saved about once a
    second), read without changing anything; defaults when there is none."""
    try:
        with open(path + ".meta", "rb") as f:
            meta = decode_record(f.read())
    except FileNotFoundError:
        return {"term": 0, "voted_for": None, "commit_index": 1}
    if not isinstance(meta, dict):
        raise JournalCorrupt(f"journal metadata {path}.meta is not a map")
    return meta
