"""The heartbeat datagram: its fixed layout, its MAC and the per-lease key.
Pure (``struct`` and ``hmac``, no sockets): the node's UDP listener
(``coordinator.services.udp``) and the client (``coordinator.client``) both
use it.

A request is 34 bytes, big-endian::

    0   1  version (1)
    1   1  health: 0 none, else 1 + its index in HEALTH_STATES
    2   8  lease id (unsigned)
    10  8  counter (unsigned): must rise per lease (the agent's ms clock will do)
    18 16  MAC: HMAC-SHA-256(lease key, REQUEST_LABEL + bytes 0..17), first 16 bytes

A reply is the same size (never larger than a request: a spoofed source
gets no amplification)::

    0   1  version (1)
    1   1  status: OK, UNKNOWN_LEASE or NOT_READY
    2   8  lease id
    10  8  the request's counter
    18 16  MAC: HMAC-SHA-256(lease key, REPLY_LABEL + bytes 0..17), first 16 bytes

The lease key is ``HMAC-SHA-256(K_hb, lease id as 8 bytes)``, ``K_hb`` the
key derived from the cluster secret for heartbeats
(``crypto.KEY_HEARTBEAT``): every node computes it, nothing is stored, and
only the caller who registered the lease is given it.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from coordinator.commands.agents import HEALTH_STATES  # the wire numbers them in this order: append only

VERSION = 1
SIZE = 34
MAC_BYTES = 16
REQUEST_LABEL = b"COORD-HB-V1\n"
REPLY_LABEL = b"COORD-HB-ACK-V1\n"
OK = 0
UNKNOWN_LEASE = 1  # not a lease this cluster holds (expired, deregistered, replaced): register again
NOT_READY = 2  # this node cannot vouch for the lease now (no fresh word from the leader): try another node
STATUSES = (OK, UNKNOWN_LEASE, NOT_READY)
U64_MAX = 2**64 - 1

_HEAD = struct.Struct(">BBQQ")  # version, health or status, lease id, counter


@dataclass(frozen=True, slots=True)
class Beat:
    lease_id: int
    counter: int
    health: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    lease_id: int
    counter: int
    status: int


def lease_key(heartbeat_key: bytes, lease_id: int) -> bytes:
    """The per-lease key (given to whoever registered the lease)."""
    return hmac.digest(heartbeat_key, lease_id.to_bytes(8, "big"), "sha256")


def _mac(key: bytes, label: bytes, head: bytes) -> bytes:
    return hmac.digest(key, label + head, "sha256")[:MAC_BYTES]


def encode_beat(key: bytes, beat: Beat) -> bytes:
    """``key``: the lease key. ``ValueError`` for a counter or lease id out of range or an unknown health."""
    health = 0 if beat.health is None else 1 + HEALTH_STATES.index(beat.health)
    if not 0 <= beat.lease_id <= U64_MAX or not 0 <= beat.counter <= U64_MAX:
        raise ValueError("lease id and counter: 0 .. 2**64 - 1")
    head = _HEAD.pack(VERSION, health, beat.lease_id, beat.counter)
    return head + _mac(key, REQUEST_LABEL, head)


def peek_lease(data: bytes) -> int | None:
    """The lease id of what may be a request (the right size and version),
    before its MAC is checked; None for anything else."""
    if len(data) != SIZE or data[0] != VERSION or data[1] > len(HEALTH_STATES):
        return None
    return int.from_bytes(data[2:10], "big")


def decode_beat(keys: tuple[bytes, ...], data: bytes) -> Beat | None:
    """The request if ``data`` is one whose MAC verifies under one of the
    lease ``keys``; None otherwise (wrong size, version, health byte, MAC)."""
    if peek_lease(data) is None:
        return None
    head, mac = data[:18], data[18:]
    if not any(hmac.compare_digest(mac, _mac(key, REQUEST_LABEL, head)) for key in keys):
        return None
    _, health, lease_id, counter = _HEAD.unpack(head)
    return Beat(lease_id, counter, None if health == 0 else HEALTH_STATES[health - 1])


def encode_ack(key: bytes, ack: Ack) -> bytes:
    head = _HEAD.pack(VERSION, ack.status, ack.lease_id, ack.counter)
    return head + _mac(key, REPLY_LABEL, head)


def peek_ack(data: bytes) -> tuple[int, int] | None:
    """The lease id and counter of what may be a reply, before its MAC is
    checked (so a client can find which request and key it answers); None
    for anything of another size."""
    if len(data) != SIZE:
        return None
    _, _, lease_id, counter = _HEAD.unpack_from(data)
    return lease_id, counter


def decode_ack(key: bytes, data: bytes) -> Ack | None:
    """The reply if ``data`` is one made with the lease ``key``; None otherwise."""
    if len(data) != SIZE or data[0] != VERSION or data[1] not in STATUSES:
        return None
    head, mac = data[:18], data[18:]
    if not hmac.compare_digest(mac, _mac(key, REPLY_LABEL, head)):
        return None
    _, status, lease_id, counter = _HEAD.unpack(head)
    return Ack(lease_id, counter, status)
