"""Two checkouts of this project side by side: the same load against a
three-node cluster started from checkout A, then from checkout B, over
interleaved rounds (A B, B A, ...): operations per second and the CPU the
three nodes spent per operation, so a change's before/after is measured in
one run on a noisy machine.

    python -m bench.ab BEFORE_DIR AFTER_DIR [--clients 64] [--rounds 3] [--seconds 5] [--kind write|read]

Each directory is a checkout with its own ``.venv`` (``./scripts/test.sh``
or ``./scripts/cluster-up.sh`` there makes one). Each side's cluster runs
from that side's checkout; the load generator (``bench.load``) is this
checkout's for both sides (``bench.load.run_generators``), so the sides
differ only in the servers. From 64 clients on the load comes from two
generator processes, as in ``bench.compare``. The checkouts may be of any
commit: ``_CLUSTER`` runs in each one's own interpreter and imports only its
launcher, from wherever that commit kept it. Every process is stopped by
PID, also on Ctrl-C or SIGTERM; each cell is bounded by ``--seconds``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.compare import generator_procs, seed_coord
from bench.harness import interruptible, parser
from bench.load import run_generators
from bench.report import processes_cpu_s

# Run in the checkout's own interpreter: starts its cluster, prints the URLs
# and PIDs, stops it (by PID, LocalCluster.stop_all) when told on stdin, or
# when stdin closes (the parent gone, or unwinding after an error).
_CLUSTER = """
import json, sys, tempfile
try:
    from devcluster.cluster import LocalCluster, free_base_port
except ImportError:  # a checkout from before the launcher left the core package
    from coordinator.devcluster import LocalCluster, free_base_port
cluster = LocalCluster(tempfile.mkdtemp(prefix="coord-ab-"), base_port=free_base_port(3), nodes=3,
                       durability="fsync")
try:
    cluster.start_all()
    cluster.wait_leader(30)
    print(json.dumps({"urls": [cluster.url(n) for n in cluster.members],
                      "pids": [cluster.pid(n) for n in cluster.members]}), flush=True)
    sys.stdin.readline()
finally:
    cluster.stop_all()
"""


def _stop(cluster: subprocess.Popen[str]) -> None:
    """Tell the cluster's process to stop its nodes (closing its stdin) and
    wait for it; SIGKILL it only when it has not within a minute (its nodes
    may then outlive it: their PIDs are in its directory)."""
    for pipe in (cluster.stdin, cluster.stdout):
        if pipe is not None:
            pipe.close()
    try:
        cluster.wait(60)
    except subprocess.TimeoutExpired:
        cluster.kill()
        cluster.wait(10)


def run_side(repo: Path, clients: int, seconds: float, kind: str) -> dict[str, Any]:
    python = str(repo / ".venv" / "bin" / "python")
    cluster = subprocess.Popen([python, "-c", _CLUSTER], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert cluster.stdout is not None and cluster.stdin is not None
        info = json.loads(cluster.stdout.readline())
        time.sleep(1.0)  # the post-election entries
        if kind == "read":
            seed_coord(info["urls"][0])
        before = processes_cpu_s(info["pids"])
        try:
            load = run_generators("coord", info["urls"], clients, generator_procs(clients), seconds, kind)
        except RuntimeError as exc:
            raise RuntimeError(f"bench.load against {repo}: {exc}") from None
        cpu = processes_cpu_s(info["pids"]) - before
    finally:
        _stop(cluster)
    ops = load["ops"]
    return {"ops_s": ops / load["elapsed_s"], "cpu_ms_per_op": cpu * 1000 / ops if ops else float("nan"),
            "generator_ms_per_op": load["cpu_s"] * 1000 / ops if ops else float("nan"), "errors": load["errors"]}


def main(argv: list[str] | None = None) -> int:
    cli = parser("ab", __doc__)
    cli.add_argument("before", type=Path)
    cli.add_argument("after", type=Path)
    cli.add_argument("--clients", type=int, default=64)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--seconds", type=float, default=5.0)
    cli.add_argument("--kind", choices=("write", "read"), default="write")
    args = cli.parse_args(argv)
    if not (1 <= args.clients <= 1024 and 1 <= args.rounds <= 20 and 0 < args.seconds <= 120):
        cli.error("--clients 1..1024, --rounds 1..20, --seconds up to 120")
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with interruptible("the clusters and generators"):  # through run_side's and run_generators' finally
        for r in range(args.rounds):
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                cell = run_side(sides[name], args.clients, args.seconds, args.kind)
                results[name].append(cell)
                print(f"round {r + 1} {name:6s} {cell['ops_s']:7.0f} ops/s  nodes' CPU "
                      f"{cell['cpu_ms_per_op']:.3f} ms/op  generator {cell['generator_ms_per_op']:.3f} ms/op  "
                      f"errors {sum(cell['errors'].values())}", flush=True)
    pairs = list(zip(results["before"], results["after"], strict=True))
    ops = [a["ops_s"] / b["ops_s"] for b, a in pairs]
    cpu = [a["cpu_ms_per_op"] / b["cpu_ms_per_op"] for b, a in pairs]
    print(f"after ÷ before, {args.kind}s at {args.clients} clients: ops/s {', '.join(f'{x:.2f}' for x in ops)} "
          f"(median {statistics.median(ops):.2f}); CPU per op {', '.join(f'{x:.2f}' for x in cpu)} "
          f"(median {statistics.median(cpu):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
