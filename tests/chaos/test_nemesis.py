"""Nemesis choices that need a node flag: lost-fsync is offered (and runs)
only when the nodes record what a power cut leaves."""

from __future__ import annotations

import asyncio
import random

import pytest

from chaos.nemesis import POWER_LOSS_FLAG, Nemesis
from chaos.workload import History
from devcluster.cluster import LocalCluster


def _nemesis(tmp_path, extra_args: tuple[str, ...]) -> Nemesis:
    cluster = LocalCluster(tmp_path / "cluster", base_port=22000, extra_args=extra_args)  # never started
    return Nemesis(cluster, None, History(), random.Random(1))


def test_mix_picks_lost_fsync_only_for_nodes_that_record(tmp_path) -> None:
    assert "lost-fsync" not in _nemesis(tmp_path, ())._usable()
    assert "lost-fsync" in _nemesis(tmp_path, (POWER_LOSS_FLAG,))._usable()


def test_lost_fsync_refuses_nodes_without_the_record(tmp_path) -> None:
    nemesis = _nemesis(tmp_path, ())
    with pytest.raises(ValueError, match=POWER_LOSS_FLAG):
        asyncio.run(nemesis.start("lost-fsync"))
