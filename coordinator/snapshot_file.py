"""The backup file of ``coordinator snapshot save``: self-checking.

Layout (all of it is what ``GET /v1/snapshot`` sends)::

    MAGIC                 b"COORDSNAP\\n" (10 bytes)
    header length         4 bytes, big-endian
    header                JSON (UTF-8): format, index, term, digest, node,
                          created_ms, body_bytes, body_sha256, holds, members
    body                  the state machine's snapshot (``Applier.snapshot()``:
                          our msgpack codec, never pickle)
    trailer               b"SHA256" + the SHA-256 of every byte before it

A file cut short, padded, or changed anywhere fails ``parse`` with
``InvalidInput`` naming what is wrong. The checksum an operator compares is
the trailer's digest (hex), printed by save and status. Standard library
only: the CLI reads these files without the server extra.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from coordinator.errors import InvalidInput

MAGIC = b"COORDSNAP\n"
FORMAT = 1
TRAILER_TAG = b"SHA256"
TRAILER_BYTES = len(TRAILER_TAG) + 32
HEADER_MAX_BYTES = 1 << 20  # a member list and a few counters: far below this
_LENGTH = struct.Struct(">I")
PREFIX_BYTES = len(MAGIC) + _LENGTH.size


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    header: dict[str, Any]
    body: bytes
    checksum: str  # hex SHA-256 of everything before the trailer

    @property
    def index(self) -> int:
        return int(self.header["index"])


def encode(header: dict[str, Any], body: bytes) -> tuple[bytes, str]:
    """The file's bytes and its checksum (hex). ``header`` gets ``format``,
    ``body_bytes`` and ``body_sha256`` added."""
    full = {**header, "format": FORMAT, "body_bytes": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    head = json.dumps(full, sort_keys=True, separators=(",", ":")).encode()
    if len(head) > HEADER_MAX_BYTES:
        raise InvalidInput(f"snapshot header: {len(head)} bytes, at most {HEADER_MAX_BYTES}", field="header")
    digest = hashlib.sha256()
    parts = [MAGIC, _LENGTH.pack(len(head)), head, body]
    for part in parts:
        digest.update(part)
    checksum = digest.digest()
    return b"".join([*parts, TRAILER_TAG, checksum]), checksum.hex()


def parse(data: bytes | memoryview, name: str = "snapshot") -> SnapshotFile:
    """Check and split a whole file; ``InvalidInput`` (field ``name``) says
    why it is not a good snapshot."""
    view = memoryview(data)
    if len(view) < PREFIX_BYTES + TRAILER_BYTES or bytes(view[:len(MAGIC)]) != MAGIC:
        raise InvalidInput(f"{name}: not a coordinator snapshot file (no COORDSNAP header)", field=name)
    (head_len,) = _LENGTH.unpack_from(view, len(MAGIC))
    if head_len > HEADER_MAX_BYTES or PREFIX_BYTES + head_len + TRAILER_BYTES > len(view):
        raise InvalidInput(f"{name}: truncated or damaged (header length {head_len})", field=name)
    end = len(view) - TRAILER_BYTES
    if bytes(view[end:end + len(TRAILER_TAG)]) != TRAILER_TAG:
        raise InvalidInput(f"{name}: no checksum trailer at its end (cut short, or bytes added)", field=name)
    checksum = hashlib.sha256(view[:end]).digest()
    if checksum != bytes(view[end + len(TRAILER_TAG):]):
        raise InvalidInput(f"{name}: checksum mismatch: the file is damaged or incomplete", field=name)
    try:
        header = json.loads(bytes(view[PREFIX_BYTES:PREFIX_BYTES + head_len]))
    except ValueError:
        raise InvalidInput(f"{name}: the header is not JSON", field=name) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise InvalidInput(f"{name}: unsupported snapshot format {found!r}", field=name)
    body = bytes(view[PREFIX_BYTES + head_len:end])
    if header.get("body_bytes") != len(body) or header.get("body_sha256") != hashlib.sha256(body).hexdigest():
        raise InvalidInput(f"{name}: the body does not match its header", field=name)
    if type(header.get("index")) is not int or header["index"] < 0:
        raise InvalidInput(f"{name}: the header has no index", field=name)
    return SnapshotFile(header, body, checksum.hex())


def read(path: str) -> SnapshotFile:
    """``parse`` of the file at ``path`` (``OSError`` when unreadable)."""
    with open(path, "rb") as f:
        return parse(f.read(), "snapshot")
