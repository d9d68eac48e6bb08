"""Each node compares its state digest with the members' (coordinator/services/digests.py)."""

from __future__ import annotations

import logging

from coordinator.codec import encode_command
from coordinator.services.applier import Applier
from coordinator.services.digests import DigestWatch, compare_points
from coordinator.types import Command

ME = "127.0.0.1:1"


def _applier(n: int, value_at: dict[int, object] | None = None) -> Applier:
    applier = Applier()
    for i in range(1, n + 1):
        value = (value_at or {}).get(i, i)
        applier.apply(i, encode_command(Command(op="kv.put", args={"key": "k", "value": value}, now_ms=1)))
    return applier


def _row(applier: Applier) -> dict:
    return {"digest": {"index": applier.digest.index, "value": applier.digest.value.hex(),
                       "points": [list(p) for p in applier.digest.points()]}}


def test_compare_points() -> None:
    assert compare_points([(64, "a"), (70, "b")], [[64, "a"], [80, "c"]]) == (True, 64)
    assert compare_points([(64, "a"), (70, "b")], [[64, "x"], [70, "y"]]) == (False, 64)
    assert compare_points([(64, "a")], [[65, "a"]]) == (None, None)
    assert compare_points([(64, "a")], "not a list") == (None, None)
    assert compare_points([(64, "a")], [["64", "a"], [64]]) == (None, None)


async def test_the_watch_counts_and_reports_a_member_whose_digest_differs(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="coordinator.services.digests")
    mine = _applier(70)
    same = _applier(70)
    behind = _applier(66)  # shares the checkpoint at 64
    diverged = _applier(70, {65: "other"})  # another result from index 65 on
    answers = [({"id": "me", "raft": ME}, {}, None),
               ({"id": "same", "raft": "r2"}, _row(same), None),
               ({"id": "behind", "raft": "r3"}, _row(behind), None),
               ({"id": "diverged", "raft": "r4"}, _row(diverged), None),
               ({"id": "gone", "raft": "r5"}, None, "ClientConnectorError")]

    async def ask() -> list:
        return answers

    watch = DigestWatch(mine, ask, ME, interval_s=5)
    outcome = await watch.check_once()
    assert outcome == {"same": {"agree": True, "index": 70}, "behind": {"agree": True, "index": 64},
                       # agrees at 64; 70 is the first shared index after the split at 65
                       "diverged": {"agree": False, "index": 70},
                       "gone": {"agree": None, "index": None, "error": "ClientConnectorError"}}
    assert (watch.checks, watch.mismatches) == (3, 1)
    assert watch.status()["agree"] is False
    assert "differs from member diverged's at index 70" in caplog.text
