"""cluster-up.sh / cluster-down.sh: a local cluster on 127.0.0.1 (see coordinator.devcluster)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from coordinator.devcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", default=str(ROOT / ".cluster"))
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 3, 5))
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("COORD_BASE_PORT", "7000")))
    parser.add_argument("--engine", default="raft")
    parser.add_argument("--durability", default="fsync", choices=("fsync", "none"))
    parser.add_argument("--wait-s", type=float, default=30.0)
    args = parser.parse_args()
    cluster = LocalCluster(args.dir, base_port=args.base_port, nodes=args.nodes, engine=args.engine,
                           durability=args.durability)
    if args.action == "down":
        stopped = cluster.stop_all()
        print(f"stopped {', '.join(stopped)}" if stopped else "no running nodes found")
        return 0
    running = [n for n in cluster.members if cluster.pid(n) is not None]
    if running:
        print(f"already running: {', '.join(running)} (data in {cluster.dir}); starting only the others")
    for node_id in cluster.members:
        if node_id not in running:
            print(f"started {node_id} (pid {cluster.start(node_id)})")
    try:
        leader = cluster.wait_leader(args.wait_s)
    except (TimeoutError, RuntimeError) as exc:
        print(f"cluster-up: {exc}; logs in {cluster.dir}", file=sys.stderr)
        return 1
    print(f"leader: {leader} ({cluster.url(leader)})")
    for node_id in cluster.members:
        spec = cluster.specs[node_id]
        print(f"{node_id}: {cluster.url(node_id)}  (raft {spec.raft})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
