"""Start and stop a local cluster on 127.0.0.1 (used by cluster-up.sh / cluster-down.sh).

Layout under --dir (default .cluster/): ``secret`` (generated once, mode 600),
``nN/`` data directories, ``nN.log``, ``nN.pid``. Ports: HTTP base+1.., Raft
base+101.. (base from COORD_BASE_PORT, default 7000). Processes are stopped by
the PID recorded at start, after checking that the PID still runs our node.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ports(base: int, count: int) -> list[tuple[str, int, int]]:
    return [(f"n{i}", base + i, base + 100 + i) for i in range(1, count + 1)]


def pid_alive(pid_file: Path, node_id: str) -> int | None:
    """The PID in ``pid_file`` if that process is still our node ``node_id``."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    args = [a.decode(errors="replace") for a in cmdline]
    if "serve" in args and node_id in args:
        return pid
    return None


def fetch_status(http: str, timeout: float = 1.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{http}/v1/status", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def up(args: argparse.Namespace) -> int:
    data = Path(args.dir)
    data.mkdir(parents=True, exist_ok=True)
    secret_file = data / "secret"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    nodes = ports(args.base_port, args.nodes)
    running = [n for n, _, _ in nodes if pid_alive(data / f"{n}.pid", n)]
    if running and len(running) == len(nodes):
        print(f"cluster already running ({', '.join(running)}); nothing started")
    exe = str(Path(sys.executable).with_name("coordinator"))
    env = dict(os.environ)
    env.pop("COORD_CLUSTER_SECRET", None)
    for node_id, http, raft in nodes:
        if node_id in running:
            continue
        peers = [f"--peer={p}=127.0.0.1:{pr},127.0.0.1:{ph}" for p, ph, pr in nodes if p != node_id]
        cmd = [exe, "serve", "--node-id", node_id, "--http", f"127.0.0.1:{http}", "--raft", f"127.0.0.1:{raft}",
               "--data-dir", str(data / node_id), "--secret-file", str(secret_file),
               "--engine", args.engine, "--durability", args.durability, *peers]
        with open(data / f"{node_id}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=ROOT, env=env)
        (data / f"{node_id}.pid").write_text(f"{proc.pid}\n")
        print(f"started {node_id} (pid {proc.pid})")
    deadline = time.monotonic() + args.wait_s
    leader = None
    while time.monotonic() < deadline:
        dead = [n for n, _, _ in nodes if not pid_alive(data / f"{n}.pid", n)]
        if dead:
            print(f"node(s) {', '.join(dead)} exited; see {data}/<node>.log", file=sys.stderr)
            return 1
        statuses = [fetch_status(f"127.0.0.1:{h}") for _, h, _ in nodes]
        leaders = {s["leader"] for s in statuses if s and s.get("leader")}
        if all(statuses) and len(leaders) == 1:
            leader = leaders.pop()
            break
        time.sleep(0.1)
    if leader is None:
        print(f"no leader elected within {args.wait_s}s; see {data}/<node>.log", file=sys.stderr)
        return 1
    print(f"leader: http://{leader}")
    for node_id, http, raft in nodes:
        print(f"{node_id}: http://127.0.0.1:{http}  (raft 127.0.0.1:{raft})")
    return 0


def down(args: argparse.Namespace) -> int:
    data = Path(args.dir)
    stopped = 0
    for pid_file in sorted(data.glob("n*.pid")):
        node_id = pid_file.stem
        pid = pid_alive(pid_file, node_id)
        if pid is None:
            pid_file.unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pid_alive(pid_file, node_id):
            time.sleep(0.05)
        if pid_alive(pid_file, node_id):
            os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        stopped += 1
        print(f"stopped {node_id} (pid {pid})")
    if not stopped:
        print("no running nodes found")
    return 0


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
    return up(args) if args.action == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
