"""The system calls that make a file durable, in one place.

Everything in ``cluster`` that fsyncs, truncates a file it keeps durable,
renames one over another or fsyncs a directory calls these functions instead
of ``os`` directly: ``sync``, ``truncate``, ``replace``, ``sync_dir``. By
default they are exactly the ``os`` calls. A test-only observer may be
attached for a directory (``observe_under``): it is told about every one of
these calls on a path inside that directory, after the call succeeded. The
power-loss recorder (``cluster.power_loss``, ``--unsafe-test-power-loss``)
is the one observer; it learns from them what a power cut would leave.

Writes need no hook: an observer reads what a sync made durable from the file
itself. A new fsync in ``cluster`` must go through ``sync`` (and a rename of a
durable file through ``replace``), or a power-loss run will treat what it
wrote as never synced.

Threading: any thread. An observer does its own locking.
"""

from __future__ import annotations

import os
from typing import Protocol


class SyncObserver(Protocol):
    """Told about durability calls on paths under its directory (test only).
    Each method runs after the real call succeeded, on the caller's thread;
    an exception propagates to the caller as the call's own would."""

    def synced(self, fd: int, path: str) -> None: ...

    def truncated(self, fd: int, path: str, size: int) -> None: ...

    def replaced(self, src: str, dst: str) -> None: ...

    def dir_synced(self, directory: str) -> None: ...


# directory (absolute, with a trailing separator) -> observer; empty unless a
# node runs with --unsafe-test-power-loss, so the normal cost is one dict test
_observers: dict[str, SyncObserver] = {}


def observe_under(directory: str, observer: SyncObserver | None) -> None:
    """Attach ``observer`` to every path under ``directory`` (None detaches).
    For tests and ``--unsafe-test-power-loss`` only."""
    global _observers
    root = os.path.join(os.path.abspath(directory), "")
    # a new dict, never a mutation: other threads may be iterating the old one
    changed = {k: v for k, v in _observers.items() if k != root}
    if observer is not None:
        changed[root] = observer
    _observers = changed


def _observer(path: str) -> SyncObserver | None:
    if not _observers:
        return None
    full = os.path.abspath(path)
    for root, observer in _observers.items():
        if full.startswith(root):
            return observer
    return None


def sync(fd: int, path: str, *, data_only: bool = False) -> None:
    """fsync (``data_only``: fdatasync) the open file ``fd``, which is ``path``."""
    if data_only:
        os.fdatasync(fd)
    else:
        os.fsync(fd)
    observer = _observer(path)
    if observer is not None:
        observer.synced(fd, path)


def truncate(fd: int, path: str, size: int) -> None:
    """Cut the open file ``fd`` (which is ``path``) to ``size`` bytes. Not
    durable until the next ``sync`` of the file. A buffered file object must
    be flushed first."""
    os.ftruncate(fd, size)
    observer = _observer(path)
    if observer is not None:
        observer.truncated(fd, path, size)


def replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` atomically; durable after ``sync_dir``."""
    os.replace(src, dst)
    observer = _observer(dst)
    if observer is not None:
        observer.replaced(src, dst)


def sync_dir(path: str) -> None:
    """fsync the directory holding ``path``: the names created, renamed or
    removed in it so far are durable when this returns."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    observer = _observer(path)
    if observer is not None:
        observer.dir_synced(directory)
