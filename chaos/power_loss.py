"""What a power cut leaves of a stopped node's files (the lost-fsync nemesis).

A node started with ``--unsafe-test-power-loss`` records, under
``<data-dir>/unsafe-power-loss/``, what of its files would survive a power
cut at each instant (the node side and the record's format:
``cluster/power_loss.py``; this module only reads the format, as chaos
imports nothing of the service). ``cut_power`` is called once the node's
process is gone (SIGKILL): every file the record names goes back to its last
durable state (content as of its last fsync; a name created or renamed onto
without an fsync of its directory reverts to the old file, or vanishes), the
record is deleted, and the node's next start adopts what is on disk.

A file still on the inode its durable content was synced on, whose content
only grew since, keeps a seeded random part of its unsynced tail half the
time (``torn_tail``): whole records that a disk happened to write, and
usually a record cut in the middle, which the journal must cut off as a torn
tail when it opens.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

RECORD_DIR = "unsafe-power-loss"  # cluster.power_loss.RECORD_DIR
MANIFEST = "manifest.json"  # cluster.power_loss.MANIFEST
CUT_MARKER = "power-cut"  # left by cut_power in the emptied record, until the node records again
_VERSION = 1


class NoRecord(RuntimeError):
    """The data directory has no power-loss record: its node did not run with
    ``--unsafe-test-power-loss``, so what it synced is unknown."""


def cut_power(data_dir: str, rng: random.Random, *, torn_tail: bool = True) -> dict[str, Any]:
    """Put every file the record under ``data_dir`` names back to what a
    power cut leaves, then delete the record. The node must not be running
    (the caller killed it and waited for it to be gone).

    A node whose power was cut again before it started recording (killed
    while it was starting up) wrote nothing since the last cut: the marker
    the last cut left says so, and nothing changes.

    Returns what was lost: ``{"reverted": [rel...], "removed": [rel...],
    "torn": [rel...], "dropped_bytes": n}``. Raises ``NoRecord`` without a
    record, ``OSError`` when a file cannot be rewritten (the run should fail)."""
    record = os.path.join(data_dir, RECORD_DIR)
    summary: dict[str, Any] = {"reverted": [], "removed": [], "torn": [], "dropped_bytes": 0}
    try:
        with open(os.path.join(record, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        if os.path.exists(os.path.join(record, CUT_MARKER)):
            return summary
        raise NoRecord(f"{data_dir} has no {RECORD_DIR}/{MANIFEST}: start the node with "
                       "--unsafe-test-power-loss") from None
    if not isinstance(manifest, dict) or manifest.get("version") != _VERSION:
        raise NoRecord(f"{record}/{MANIFEST} is not a version {_VERSION} power-loss record")
    for rel, entry in sorted(manifest["files"].items()):
        path = os.path.join(data_dir, rel)
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise OSError(f"power-loss record names a path outside {data_dir}: {rel!r}")
        current, inode = _read(path)
        if entry is None:
            if current is not None:
                os.unlink(path)
                summary["removed"].append(rel)
                summary["dropped_bytes"] += len(current)
            continue
        durable = b""
        if entry["image"] is not None:
            with open(os.path.join(record, entry["image"]), "rb") as f:
                durable = f.read(int(entry["length"]))
            if len(durable) != int(entry["length"]):
                raise OSError(f"power-loss record: image {entry['image']} of {rel} is short")
        if current == durable:
            continue
        kept = durable
        if (torn_tail and current is not None and inode == entry["inode"] and len(current) > len(durable)
                and current.startswith(durable) and rng.random() < 0.5):
            kept = current[:rng.randrange(len(durable), len(current) + 1)]
            summary["torn"].append(rel)
        _write(path, kept)
        summary["reverted"].append(rel)
        summary["dropped_bytes"] += max(0, len(current or b"") - len(kept))
    # the record is spent: the node's next start adopts what is on disk now
    shutil.rmtree(record)
    os.mkdir(record)
    with open(os.path.join(record, CUT_MARKER), "w", encoding="ascii") as f:
        f.write("the power was cut; the next start adopts what is on disk\n")
    return summary


def _read(path: str) -> tuple[bytes | None, int | None]:
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return None, None


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
