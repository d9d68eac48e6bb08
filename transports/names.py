"""Broker-side names made from ours (namespaces, topics, groups): what NATS
and Kafka both need. Stdlib only, so any plugin may use it."""

from __future__ import annotations

import hashlib

_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")


def escape(name: str) -> str:
    """A one-to-one mapping of any string onto ``[A-Za-z0-9_-]``: ``_XX`` is a
    byte-sized character in hex, ``_uXXXXXX`` any other; ``_`` followed by
    anything else (``_S``, ``_h``) never comes out of it, so it can separate."""
    out = []
    for char in name:
        if char in _KEEP:
            out.append(char)
        elif ord(char) < 256:
            out.append(f"_{ord(char):02x}")
        else:
            out.append(f"_u{ord(char):06x}")
    return "".join(out)


def bounded(name: str, limit: int) -> str:
    """``name`` if it has at most ``limit`` characters, else its head and
    ``_h`` with 40 hex digits of its SHA-256 (still unique, within ``limit``)."""
    if len(name) <= limit:
        return name
    return f"{name[:limit - 42]}_h{hashlib.sha256(name.encode()).hexdigest()[:40]}"
