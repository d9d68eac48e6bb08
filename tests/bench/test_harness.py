"""bench/harness.py and bench/report.py: the pieces every benchmark shares,
and every benchmark's command line (``python -m bench.<name> --help``)."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys

import pytest

from bench.harness import base_port
from bench.report import pct_ms, process_cpu_s, processes_cpu_s
from devcluster.cluster import free_base_port

BENCHMARKS = ("ab", "agents", "apply", "backup", "balancer", "bus", "cluster", "compare", "engines", "eventstore",
              "gen_ab", "load", "scale", "charts")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_names_its_command_in_its_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert f"usage: python -m bench.{name}" in capsys.readouterr().out


def test_a_requested_base_port_is_checked_and_zero_picks_a_free_range() -> None:
    base = free_base_port(3)
    assert base_port(base) == base
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", base + 102))
        listener.listen()
        with pytest.raises(SystemExit, match=f"port {base + 102} on 127.0.0.1 is taken"):
            base_port(base)
    assert base_port(0) > 0


def test_cpu_time_of_processes_counts_the_gone_as_zero() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_cpu_s(gone.pid) == 0.0
    assert processes_cpu_s([None, gone.pid]) == 0.0
    assert processes_cpu_s([os.getpid(), None]) > 0


def test_percentiles_of_seconds_in_milliseconds() -> None:
    assert pct_ms([0.003, 0.001, 0.002], 0.5) == 2.0
    assert pct_ms([], 0.5) != pct_ms([], 0.5)  # nan
