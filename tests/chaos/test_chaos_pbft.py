"""The chaos register workload on a real four-node PBFT cluster with one
Byzantine replica of each kind (issue 9's "done"), and a primary that stops.
Each run is judged by the linearizability checker of chaos/ as a user runs it."""

from __future__ import annotations

import pytest

from tests.chaos.test_chaos_run import _run

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize(("kind", "node"), [("equivocate", "n1"), ("forge", "n4"), ("silent", "n4")])
def test_one_byzantine_replica_keeps_the_register_linearizable(tmp_path, kind: str, node: str) -> None:
    result, verdict, run = _run(tmp_path, "--engine", "pbft", "--byzantine", kind, "--nemesis", "none",
                                "--duration", "6", "--seed", "909")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert verdict["byzantine"] == {node: kind}
    assert verdict["register"]["verdict"] == "linearizable" and verdict["locks"]["valid"]
    counts = verdict["register"]["operations"]
    assert counts["ok"] > 300 and counts["fail"] == 0  # every operation went through, around the faulty replica
    correct = {n: s for n, s in verdict["final_status"].items() if n != node}
    assert all(s["healthy"] for s in correct.values()), correct
    assert len({s["term"] for s in correct.values()}) == 1  # the correct replicas share one view
    if kind == "equivocate":
        # The equivocating primary of view 0 was replaced: a view change happened.
        assert all(s["term"] >= 1 and s["leader_id"] != "n1" for s in correct.values()), correct
    assert f"one {kind} replica" in (run / "report.txt").read_text()
    assert "MISBEHAVES on purpose" in (run / "cluster" / f"{node}.log").read_text()


def test_a_primary_that_stops_is_replaced_and_writes_go_on(tmp_path) -> None:
    result, verdict, run = _run(tmp_path, "--engine", "pbft", "--nemesis", "pause-leader,kill-leader",
                                "--duration", "16", "--fault-s", "4", "--quiet-s", "2", "--seed", "910")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert verdict["register"]["verdict"] == "linearizable" and verdict["locks"]["valid"]
    report = (run / "report.txt").read_text()
    assert "pause-leader" in report and "kill-leader" in report
    statuses = verdict["final_status"]
    assert all(s["healthy"] for s in statuses.values()), statuses
    assert len({s["term"] for s in statuses.values()}) == 1, statuses  # nobody was left behind in a view alone
    assert min(s["term"] for s in statuses.values()) >= 2  # two primaries stopped, two view changes
