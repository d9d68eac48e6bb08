"""How a benchmark runs: its command line, the local cluster it measures, and
its way out on Ctrl-C or SIGTERM. Shared by the benchmarks that start this
project's nodes (``bench.cluster``, ``bench.bus``, ``bench.balancer``,
``bench.engines``); ``bench.compare`` uses the parser and ``interruptible``
too.

Caller: a benchmark's ``main``, on the main thread (signal handlers can only
be set there). Every node is started by ``devcluster.cluster.LocalCluster``
and stopped by the PID it recorded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from devcluster.cluster import LocalCluster, free_base_port

BASE_PORT_ENV = "COORD_BENCH_BASE_PORT"


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m bench.<module>``: its usage names
    that command and its help is the module's docstring, line breaks kept."""
    return argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_base_port(parser: argparse.ArgumentParser, default: int) -> None:
    """``--base-port``: nodes use base+1.. (HTTP) and base+101.. (Raft).
    ``COORD_BENCH_BASE_PORT`` replaces ``default``; 0 picks a free range."""
    parser.add_argument("--base-port", type=int, default=int(os.environ.get(BASE_PORT_ENV, str(default))),
                        help=f"nodes use base+1.. (HTTP) and base+101.. (Raft); 0 picks a range that is free "
                             f"now, so a test run on the same machine does not collide (default {default}, "
                             f"or ${BASE_PORT_ENV})")


def base_port(requested: int, nodes: int = 3) -> int:
    """``requested`` when its nodes' ports on 127.0.0.1 are free now, a free
    range when it is 0. Exits with a message naming the taken port: a node
    that cannot bind would only show up as a leader that never comes. Binds
    with SO_REUSEADDR as the nodes do, so the connections of a run that just
    ended (TIME_WAIT) do not count as taken; a listener does."""
    if requested == 0:
        return free_base_port(nodes)
    for port in [requested + i for i in range(1, nodes + 1)] + [requested + 100 + i for i in range(1, nodes + 1)]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(f"port {port} on 127.0.0.1 is taken; pass another --base-port "
                                 "(0 picks a free range)") from None
    return requested


@contextmanager
def local_cluster(prefix: str, base: int, *, nodes: int = 3, **options: Any) -> Iterator[LocalCluster]:
    """A fresh ``nodes``-node cluster with durability fsync in a temporary
    directory, every node started (not yet waited for: ``wait_leader``).
    On leaving, also by an exception or Ctrl-C, every node is stopped by PID
    and the directory removed. ``base`` 0 picks a free port range;
    ``options`` go to ``LocalCluster`` (``engine``, ``extra_args``)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        cluster = LocalCluster(directory, base_port=base_port(base, nodes), nodes=nodes, durability="fsync",
                               **options)
        try:
            cluster.start_all()
            yield cluster
        finally:
            cluster.stop_all()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def interruptible(started: str) -> Iterator[None]:
    """Ctrl-C, and SIGTERM made to act like it, unwind through the
    ``finally`` blocks inside (``local_cluster``'s) that stop what the
    benchmark ``started``; then the benchmark says so and exits with status
    130 (``SystemExit``). Main thread only."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted; {started} were stopped", file=sys.stderr)
        raise SystemExit(130) from None


__all__ = ["BASE_PORT_ENV", "add_base_port", "base_port", "interruptible", "local_cluster", "parser"]
