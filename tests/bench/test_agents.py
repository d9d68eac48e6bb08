"""bench/agents.py against a real three-node cluster on loopback (a free
port range), with tiny counts: every agent registers and heartbeats, the
probes expire within TTL + slack and no other agent does, in this process
and over generator processes spread over all nodes; and the report."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.agents import main, measure, table


def _args(**changes: object) -> argparse.Namespace:
    args = argparse.Namespace(interval_s=0.5, ttl_s=3.0, seconds=1.0, procs=1, connections=4, probes=5,
                              slack_s=3.0, via="leader", seed=7, base_port=0, register_s=60.0,
                              heartbeat="http")
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def _check(row: dict, n: int, probes: int) -> None:
    assert row["registered"] == n and row["register_failed"] == 0
    assert row["errors"] == {}
    assert row["achieved_per_s"] > 0 and row["intended_per_s"] == n / 0.5
    assert row["p50_ms"] <= row["p99_ms"]
    assert row["leader_cpu"] > 0 and len(row["follower_cpu"]) == 2
    assert not math.isnan(row["leader_rss_mb"])
    expiry = row["expiry"]
    assert (expiry["probes"], expiry["expired"], expiry["early"], expiry["late"]) == (probes, probes, 0, 0)
    assert expiry["others_registered"] == expiry["others_expected"] == n - probes
    assert expiry["correct"]
    assert 3.0 <= expiry["after_last_ack_s"]["min"] <= expiry["after_last_ack_s"]["max"] <= 3.0 + 3.0


@pytest.mark.cluster
@pytest.mark.parametrize(("via", "heartbeat"), [("leader", "http"), ("followers", "http"), ("followers", "udp")])
async def test_agents_heartbeat_and_only_the_probes_expire(via: str, heartbeat: str) -> None:
    row = await measure(40, _args(via=via, heartbeat=heartbeat))
    assert row["heartbeat"] == heartbeat and row["node_cpu_us_per_beat"] > 0
    _check(row, 40, 5)
    if via == "followers":  # answered by the followers, gossiped to the leader
        assert row["leader_answered_per_s"] == 0 and row["leader_merged_per_s"] > 0


@pytest.mark.cluster
async def test_generator_processes_share_the_agents_and_spread_over_every_node() -> None:
    row = await measure(30, _args(procs=2, via="all", probes=4, heartbeat="udp"))
    assert row["procs"] == 2 and row["connections"] == 8
    _check(row, 30, 4)


def test_the_table_says_whether_the_goal_is_met_at_100k() -> None:
    row = {"agents": 100_000, "registered": 100_000, "procs": 2, "connections": 512, "intended_per_s": 10_000,
           "achieved_per_s": 9_990,
           "p50_ms": 1.0, "p99_ms": 9.0, "late_p99_ms": 5, "errors": {}, "leader_cpu": 0.8,
           "follower_cpu": [0.1, 0.1], "generator_cpu": 1.0, "leader_rss_mb": 300, "follower_rss_mb": [200, 200],
           "leader_answered_per_s": 0, "leader_merged_per_s": 9_990,
           "expiry": {"probes": 100, "expired": 100, "after_last_ack_s": {"min": 30.1, "max": 30.4},
                      "others_registered": 99_900, "others_expected": 99_900, "correct": True}}
    assert "**met**" in table([row], _args())
    udp = table([{**row, "heartbeat": "udp", "node_cpu_us_per_beat": 41.5, "errors": {"udp lost": 3}}], _args())
    assert "| 100,000 | udp | 2 x 256 |" in udp and "| 3 (udp lost: 3) |" in udp and "| 42 |" in udp
    assert "**not met**" in table([{**row, "leader_cpu": 1.2}], _args())
    assert "**not met**" in table([{**row, "expiry": {**row["expiry"], "correct": False}}], _args())
    assert "**not met**" in table([{**row, "registered": 40_000}], _args())
    assert "(40,000 in)" in table([{**row, "registered": 40_000}], _args())
    assert "not measured" in table([{**row, "agents": 50_000, "registered": 50_000}], _args())


@pytest.mark.parametrize("argv", [["--agents", "0"], ["--agents", "100001"], ["--agents", "10,x"],
                                  ["--agents", "50", "--probes", "51"], ["--interval-s", "30", "--ttl-s", "30"]])
def test_unbounded_or_inconsistent_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


def test_the_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "usage: python -m bench.agents" in capsys.readouterr().out
