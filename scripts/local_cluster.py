"""cluster-up.sh / cluster-down.sh: a local cluster on 127.0.0.1 (see devcluster.cluster)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devcluster.cluster import LocalCluster, recorded_pid

ROOT = Path(__file__).resolve().parent.parent


def proxy_pid(cluster: LocalCluster) -> int | None:
    """The recorded PID of the proxy daemon if it still runs ``chaos.proxy``."""
    return recorded_pid(cluster.dir / "proxy.pid", "chaos.proxy", "serve")


def start_proxy(cluster: LocalCluster) -> None:
    """Run the links of a proxied cluster in a ``python -m chaos.proxy serve`` daemon."""
    if proxy_pid(cluster) is not None:
        return
    control = cluster.base_port + 40
    cmd = [sys.executable, "-m", "chaos.proxy", "serve", "--control", str(control),
           *[f"--link={link.name}={link.listen_port}:{link.target_port}" for link in cluster.links.values()]]
    cluster.dir.mkdir(parents=True, exist_ok=True)
    with open(cluster.dir / "proxy.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT)
    (cluster.dir / "proxy.pid").write_text(f"{proc.pid}\n")
    print(f"started the fault proxy (pid {proc.pid}); control it with: "
          f"python -m chaos.proxy status|set|reset|heal --control {control}")


def stop_proxy(cluster: LocalCluster) -> None:
    pid = proxy_pid(cluster)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while proxy_pid(cluster) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proxy_pid(cluster) is not None:
        os.kill(pid, signal.SIGKILL)
    (cluster.dir / "proxy.pid").unlink(missing_ok=True)
    print(f"stopped the fault proxy (pid {pid})")


def tls_running(directory: Path) -> bool | None:
    """Whether the nodes running from ``directory`` serve HTTPS (None: none runs).
    Nodes started with --tls keep it when cluster-up runs again without the flag."""
    modes = {recorded_pid(pid_file, "--tls-cert") is not None
             for pid_file in directory.glob("n*.pid") if recorded_pid(pid_file, "serve") is not None}
    return None if not modes else True in modes


def secure_running(directory: Path) -> bool | None:
    """Whether the nodes running from ``directory`` require credentials (None: none runs)."""
    modes = {recorded_pid(pid_file, "--admin-token-file") is not None
             for pid_file in directory.glob("n*.pid") if recorded_pid(pid_file, "serve") is not None}
    return None if not modes else True in modes


def engine_running(directory: Path) -> str | None:
    """The engine of the nodes running from ``directory`` (None: none runs)."""
    modes = {"pbft" if recorded_pid(pid_file, "--pbft-keyring") is not None else "raft"
             for pid_file in directory.glob("n*.pid") if recorded_pid(pid_file, "serve") is not None}
    return None if not modes else "pbft" if "pbft" in modes else "raft"


def engine_on_disk(directory: Path) -> str | None:
    """The engine whose data the node directories hold (None: no data yet).
    PBFT keeps ``n<i>/pbft/``, Raft ``n<i>/raft.journal``; a cluster started
    again without ``--engine`` keeps the engine its data was written by."""
    found = {"pbft" if (node / "pbft").is_dir() else "raft" for node in directory.glob("n*")
             if node.is_dir() and ((node / "pbft").is_dir() or (node / "raft.journal").exists())}
    return found.pop() if len(found) == 1 else None


def recorded_nodes(directory: Path) -> int:
    """The highest i of the ``n<i>.pid`` files in ``directory`` (0 if none)."""
    found = [int(p.stem[1:]) for p in directory.glob("n*.pid") if p.stem[1:].isdigit()]
    return max(found, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", default=str(ROOT / ".cluster"))
    parser.add_argument("--nodes", type=int, choices=(1, 3, 4, 5, 7),
                        help="how many nodes (default 3 for raft, 4 for pbft, which needs 3f+1: 4 or 7)")
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("COORD_BASE_PORT", "7000")))
    parser.add_argument("--engine", choices=("raft", "pbft"),
                        help="consensus engine (default raft; pbft: Byzantine fault tolerant, 3f+1 nodes)")
    parser.add_argument("--durability", default="fsync", choices=("fsync", "none"))
    parser.add_argument("--wait-s", type=float, default=30.0)
    parser.add_argument("--proxy", action="store_true",
                        help="wire the nodes' Raft links through a chaos fault proxy (python -m chaos.proxy)")
    parser.add_argument("--tls", action="store_true",
                        help="serve HTTPS with certificates from a local CA generated under DIR/tls")
    parser.add_argument("--secure", action="store_true",
                        help="require credentials (an admin token generated in DIR/admin.token, agents' "
                             "signatures); without it the cluster allows anonymous access (development)")
    args = parser.parse_args()
    proxied = args.proxy or (Path(args.dir) / "proxy.pid").exists()
    running_tls = tls_running(Path(args.dir))
    if args.action == "up" and args.tls and running_tls is False:
        print("cluster-up: nodes already run without TLS; stop them first (cluster-down.sh)", file=sys.stderr)
        return 1
    tls = args.tls or bool(running_tls)
    running_secure = secure_running(Path(args.dir))
    if args.action == "up" and args.secure and running_secure is False:
        print("cluster-up: nodes already run with anonymous access; stop them first (cluster-down.sh)",
              file=sys.stderr)
        return 1
    secure = args.secure or bool(running_secure)
    running_engine = engine_running(Path(args.dir))
    if args.action == "up" and args.engine and running_engine and args.engine != running_engine:
        print(f"cluster-up: nodes already run with engine {running_engine}; stop them first (cluster-down.sh)",
              file=sys.stderr)
        return 1
    on_disk = engine_on_disk(Path(args.dir))
    engine = args.engine or running_engine or on_disk or "raft"
    if args.action == "up" and on_disk and engine != on_disk:
        print(f"cluster-up: note: the data in {args.dir} was written by engine {on_disk}; engine {engine} "
              "starts from its own (empty) state beside it (remove the directory to start over)", file=sys.stderr)
    nodes = args.nodes or (4 if engine == "pbft" else 3)
    if args.action == "down":
        nodes = max(nodes, recorded_nodes(Path(args.dir)))  # stop every node started, whatever its count
    elif engine == "pbft" and nodes not in (4, 7):
        print(f"cluster-up: PBFT needs 3f+1 nodes (4 or 7), not {nodes}", file=sys.stderr)
        return 1
    if args.action == "up" and engine == "pbft" and proxied:
        print("cluster-up: the fault proxy (--proxy, or a proxy started earlier from this directory) is not "
              "supported with engine pbft yet", file=sys.stderr)
        return 1
    chaos_dir = Path(__file__).resolve().parent.parent / ".chaos"  # python -m chaos.run's default --out
    cluster = LocalCluster(args.dir, base_port=args.base_port, nodes=nodes, engine=engine,
                           durability=args.durability, proxied=proxied and engine != "pbft", tls=tls, secure=secure,
                           extra_args=("--chaos-dir", str(chaos_dir)))
    if args.action == "down":
        stopped = cluster.stop_all()
        print(f"stopped {', '.join(stopped)}" if stopped else "no running nodes found")
        stop_proxy(cluster)
        return 0
    if proxied:
        start_proxy(cluster)
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
    if secure:
        print(f"credentials required: the admin token is in {cluster.admin_token_file} "
              "(Authorization: Bearer <token>)")
    else:
        print("anonymous access allowed (development mode; --secure requires credentials)")
    if tls:
        print(f"CA certificate: {cluster.ca_file}")
        print(f"try: curl --cacert {cluster.ca_file} {cluster.url(leader)}/v1/status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
