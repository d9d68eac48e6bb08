"""UNSAFE, chaos tests only (``--unsafe-test-power-loss``): a record of what a
power cut would leave of a node's files.

A ``PowerLossRecorder`` watches the durability calls of ``cluster.files``
(fsync, fdatasync, truncate, rename, directory fsync) on paths under one data
directory and keeps, for each file it has seen, the bytes that would survive
a power cut at this instant, under ``<data-dir>/unsafe-power-loss/``. The
lost-fsync nemesis (``chaos.power_loss``) kills the node and puts every file
back to that state. The model is the pessimistic reading of POSIX:

* the content of a file survives as of its last fsync/fdatasync;
* a new name (a created file, a rename onto a name) survives only after an
  fsync of its directory; until then the old name (or none) survives, with
  the old content;
* a file renamed into place whose own content was never synced survives,
  once the directory is synced, empty.

So a node that acknowledges before its journal is synced, or renames a file
into place without syncing it or its directory, loses data in a power-loss run.

The record (the contract with ``chaos.power_loss``):

* ``manifest.json``: ``{"version": 1, "files": {REL: ENTRY}, "synced": {...}}``
  where REL is a
  path relative to the data directory and ENTRY is ``null`` (the name would
  not survive: remove the file) or ``{"image": ID or null, "length": N,
  "inode": INO}`` (the file survives with the first N bytes of the image file
  ID in the record directory, or empty when ID is null; INO is the inode
  the content was synced on, so a file still on that inode whose content
  only grew may keep a torn part of its unsynced tail).
  ``synced`` (the recorder's own, for a restart after a plain crash) gives
  what each file's content was last synced as, whether or not its name is
  durable yet.
* ``<ID>``: image files. Files the manifest does not name are not touched.
* Written with a temporary file and a rename, never fsynced: a simulated
  power cut does not touch it, and the node's SIGKILL can only interrupt it
  between two consistent states. The rollback empties the record but for a
  marker file ``power-cut``; the node's next start with the flag adopts what
  is on disk as durable (after a power cut, what is on disk is what
  survived) and removes the marker.

On start without a record, every regular file under the data directory is
adopted as durable (files named ``unsafe-*`` and the ``chaos`` directory are
left out). With a record (a restart after a plain crash), the record stands:
what the crashed process wrote and never synced is still not durable, though
the restarted node can read it from the page cache.

Threading: the hooks run on whatever thread made the call (pysyncobj's tick
thread, a PBFT storage worker); one lock serialises them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass

from cluster import files

log = logging.getLogger(__name__)

RECORD_DIR = "unsafe-power-loss"
MANIFEST = "manifest.json"
CUT_MARKER = "power-cut"  # left by chaos.power_loss.cut_power; removed once a start adopted the files
_VERSION = 1
_ADOPT_MAX_FILES = 10_000  # a data directory holds a handful; refuse a runaway walk
_TAIL_CHECK = 64  # bytes before the synced length compared before appending to an image


@dataclass(frozen=True, slots=True)
class Image:
    """Content that survives: the first ``length`` bytes of image ``id``
    (None: an empty file), synced on inode ``inode``."""

    id: str | None
    length: int
    inode: int

    def to_json(self) -> dict[str, object]:
        return {"image": self.id, "length": self.length, "inode": self.inode}


class PowerLossRecorder:
    """Keeps ``<data_dir>/unsafe-power-loss/`` equal to what a power cut would
    leave of the files under ``data_dir``. Implements
    ``cluster.files.SyncObserver``; attach with ``start`` (which adopts or
    loads the record), detach with ``stop``. Raises ``OSError`` when the
    record cannot be written: a power-loss run must not go on blind."""

    def __init__(self, data_dir: str) -> None:
        self.root = os.path.abspath(data_dir)
        self.dir = os.path.join(self.root, RECORD_DIR)
        self._lock = threading.Lock()
        self._durable: dict[str, Image | None] = {}  # what survives, per name (the manifest)
        self._synced: dict[str, Image] = {}  # last synced content of the file now at each name
        self._pending: set[str] = set()  # names created or renamed since their directory's last fsync
        self._low: dict[str, int] = {}  # lowest truncation of each file since its last sync
        self._next_id = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            os.makedirs(self.dir, exist_ok=True)
            existing = [n for n in os.listdir(self.dir) if n.isdigit()]
            self._next_id = max((int(n) for n in existing), default=0) + 1
            if os.path.exists(os.path.join(self.dir, MANIFEST)):
                self._load()
            else:
                self._adopt()
            self._write_manifest()
            self._collect(existing)
            try:  # the rollback's marker: this start has adopted what the cut left
                os.unlink(os.path.join(self.dir, CUT_MARKER))
            except FileNotFoundError:
                pass
        files.observe_under(self.root, self)
        log.warning("UNSAFE: power-loss recorder on %s: every fsync and rename is recorded in %s "
                    "(chaos tests only)", self.root, self.dir)

    def stop(self) -> None:
        files.observe_under(self.root, None)

    def _adopt(self) -> None:
        """No record: what is on disk now is durable."""
        count = 0
        for directory, subdirs, names in os.walk(self.root):
            rel_dir = os.path.relpath(directory, self.root)
            if rel_dir == ".":
                subdirs[:] = [d for d in subdirs if d not in (RECORD_DIR, "chaos") and not d.startswith("unsafe-")]
            for name in sorted(names):
                full = os.path.join(directory, name)
                if name.startswith("unsafe-") or not os.path.isfile(full) or os.path.islink(full):
                    continue
                count += 1
                if count > _ADOPT_MAX_FILES:
                    raise OSError(f"power-loss recorder: more than {_ADOPT_MAX_FILES} files under {self.root}")
                with open(full, "rb") as f:
                    image = self._new_image(f.fileno())
                rel = os.path.relpath(full, self.root)
                self._durable[rel] = image
                self._synced[rel] = image

    def _load(self) -> None:
        with open(os.path.join(self.dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or manifest.get("version") != _VERSION:
            raise OSError(f"power-loss recorder: {self.dir}/{MANIFEST} is not a version {_VERSION} record")
        synced = {rel: _image(entry) for rel, entry in manifest.get("synced", {}).items()}
        for rel, entry in manifest["files"].items():
            image = _image(entry)
            self._durable[rel] = image
            try:
                inode = os.stat(os.path.join(self.root, rel)).st_ino
            except FileNotFoundError:
                continue
            if rel in synced and synced[rel].inode == inode:
                self._synced[rel] = synced[rel]  # what the crashed process last synced of this file
            if image is None or image.inode != inode:
                # renamed or created by the crashed process, its directory not synced since
                self._pending.add(rel)

    # -- cluster.files.SyncObserver ---------------------------------------------------------------

    def synced(self, fd: int, path: str) -> None:
        rel = self._rel(path)
        with self._lock:
            image = self._image_after_sync(rel, fd)
            self._synced[rel] = image
            self._low.pop(rel, None)
            durable = self._durable.setdefault(rel, None)
            if durable is None or durable.inode != image.inode:
                # a file created (or put there without files.replace) since its
                # directory's last fsync: the name itself is not durable yet
                self._pending.add(rel)
            if rel not in self._pending:
                self._durable[rel] = image
            self._commit()

    def truncated(self, fd: int, path: str, size: int) -> None:
        rel = self._rel(path)
        with self._lock:
            self._low[rel] = min(self._low.get(rel, size), size)

    def replaced(self, src: str, dst: str) -> None:
        old, new = self._rel(src), self._rel(dst)
        with self._lock:
            image = self._synced.pop(old, None)
            if image is None:  # content never synced: survives empty if the rename does
                image = Image(None, 0, os.stat(dst).st_ino)
            self._synced[new] = image
            if old in self._low:
                self._low[new] = self._low.pop(old)
            else:
                self._low.pop(new, None)
            for rel in (old, new):
                self._durable.setdefault(rel, None)
                self._pending.add(rel)
            self._commit()

    def dir_synced(self, directory: str) -> None:
        with self._lock:
            for rel in sorted(self._pending):
                full = os.path.join(self.root, rel)
                if os.path.dirname(full) != directory:
                    continue
                self._pending.discard(rel)
                try:
                    inode = os.stat(full).st_ino
                except FileNotFoundError:
                    self._durable[rel] = None
                    continue
                image = self._synced.get(rel)
                self._durable[rel] = image if image is not None else Image(None, 0, inode)
            self._commit()

    # -- images -----------------------------------------------------------------------------------

    def _rel(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def _image_after_sync(self, rel: str, fd: int) -> Image:
        """The file's whole content is durable now. Append to its last image
        when the file only grew since (the journal's common case), else copy it."""
        stat = os.fstat(fd)
        previous = self._synced.get(rel)
        if (previous is not None and previous.id is not None and previous.inode == stat.st_ino
                and previous.length <= min(stat.st_size, self._low.get(rel, previous.length))):
            path = os.path.join(self.dir, previous.id)
            if os.path.getsize(path) == previous.length:
                start = max(0, previous.length - _TAIL_CHECK)
                with open(path, "r+b") as image:
                    image.seek(start)
                    if image.read() == _read(fd, start, previous.length - start):
                        image.write(_read(fd, previous.length, stat.st_size - previous.length))
                        return Image(previous.id, stat.st_size, stat.st_ino)
        return self._new_image(fd)

    def _new_image(self, fd: int) -> Image:
        stat = os.fstat(fd)
        image_id = f"{self._next_id:08d}"
        self._next_id += 1
        with open(os.path.join(self.dir, image_id), "wb") as image:
            image.write(_read(fd, 0, stat.st_size))
        return Image(image_id, stat.st_size, stat.st_ino)

    def _commit(self) -> None:
        self._write_manifest()
        self._collect(os.listdir(self.dir))

    def _write_manifest(self) -> None:
        manifest = {"version": _VERSION,
                    "files": {rel: None if image is None else image.to_json()
                              for rel, image in sorted(self._durable.items())},
                    # for a restart after a plain crash: what each file's content was last synced as
                    "synced": {rel: image.to_json() for rel, image in sorted(self._synced.items())}}
        tmp = os.path.join(self.dir, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(self.dir, MANIFEST))  # not files.replace: the record is not observed

    def _collect(self, names: list[str]) -> None:
        """Delete image files nothing refers to (after the manifest that
        dropped them is written, so a kill in between leaves only garbage)."""
        used = {image.id for image in (*self._durable.values(), *self._synced.values()) if image is not None}
        for name in names:
            if name.isdigit() and name not in used:
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass


def _image(entry: dict[str, object] | None) -> Image | None:
    if entry is None:
        return None
    return Image(entry["image"], int(entry["length"]), int(entry["inode"]))  # type: ignore[arg-type]


def _read(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes of the open file ``fd`` from ``offset``, also when it
    was opened write-only (through /proc: Linux, as the chaos tools are)."""
    if length <= 0:
        return b""
    try:
        data = os.pread(fd, length, offset)
    except OSError:
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            f.seek(offset)
            data = f.read(length)
    if len(data) != length:
        raise OSError(f"power-loss recorder: short read ({len(data)} of {length} bytes)")
    return data
