"""bench.scale's state part at a small share of the caps: every kind's
entries are accepted (a refused entry stops the worker) and the restored
replica holds what was applied."""

from __future__ import annotations

import pytest

from bench.scale import KINDS, _caps, state_worker


@pytest.mark.parametrize("kind", KINDS)
def test_the_state_worker_fills_a_replica_and_restores_it(kind: str) -> None:
    rows = state_worker(kind, [0.001, 0.002])
    assert [r["items"] for r in rows] == [max(1, int(_caps()[kind] * s)) for s in (0.001, 0.002)]
    for row in rows:
        assert row["held_count"] == row["items"]
        assert row["snapshot_mb"] > 0
