"""A local three-member etcd cluster on 127.0.0.1 for the side-by-side benchmark.

Standard library only. Each member runs ``etcd`` (Debian's etcd-server,
found on PATH or at ``ETCD_BIN``) with its own data directory under
``directory``, client port ``base + i`` and peer port ``base + 100 + i``.
etcd fsyncs its WAL before it acknowledges (its default; this never passes
``--unsafe-no-fsync``). Processes are signalled only by the PID recorded when
they were started, after checking they still run that member.

The v3 JSON gateway is what the benchmark drives: ``POST /v3/kv/put`` and
``POST /v3/kv/range`` with base64 keys and values (the range is linearizable
unless ``serializable`` is set, which this never does).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class EtcdMissing(RuntimeError):
    """No etcd binary: scripts/bench.sh installs Debian's etcd-server."""


def etcd_binary() -> str:
    found = os.environ.get("ETCD_BIN") or shutil.which("etcd")
    if not found:
        raise EtcdMissing("etcd not found (apt-get install etcd-server, or set ETCD_BIN)")
    return found


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def post_json(url: str, body: dict[str, Any], timeout: float = 1.0) -> Any:
    """POST ``body`` as JSON; the decoded answer, or None when unreachable or not 2xx."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError, urllib.error.HTTPError):
        return None


class EtcdCluster:
    """Three etcd members (``e1 e2 e3``) started as child processes."""

    def __init__(self, directory: str | Path, base_port: int, members: int = 3) -> None:
        self.dir = Path(directory)
        self.base_port = base_port
        self.names = [f"e{i}" for i in range(1, members + 1)]
        self.binary = etcd_binary()
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def client_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.base_port + self.names.index(name) + 1}"

    def peer_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.base_port + 100 + self.names.index(name) + 1}"

    @property
    def urls(self) -> list[str]:
        return [self.client_url(n) for n in self.names]

    def command(self, name: str) -> list[str]:
        initial = ",".join(f"{n}={self.peer_url(n)}" for n in self.names)
        return [self.binary, "--name", name, "--data-dir", str(self.dir / name),
                "--listen-client-urls", self.client_url(name), "--advertise-client-urls", self.client_url(name),
                "--listen-peer-urls", self.peer_url(name), "--initial-advertise-peer-urls", self.peer_url(name),
                "--initial-cluster", initial, "--initial-cluster-token", f"bench-{self.base_port}",
                "--initial-cluster-state", "new", "--log-level", "warn"]

    def start(self, name: str) -> int:
        child = self._children.get(name)
        if child is not None and child.poll() is None:
            return child.pid
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{name}.log", "ab") as log:
            child = subprocess.Popen(self.command(name), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[name] = child
        return child.pid

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    def running(self, name: str) -> bool:
        child = self._children.get(name)
        return child is not None and child.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL by the recorded PID; waits until it is gone."""
        child = self._children.get(name)
        if child is not None and child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)

    def stop_all(self) -> None:
        for child in self._children.values():
            if child.poll() is None:
                os.kill(child.pid, signal.SIGTERM)
        for name, child in self._children.items():
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(name)

    def pids(self) -> list[int]:
        return [child.pid for child in self._children.values() if child.poll() is None]

    def term(self) -> int:
        """The highest Raft term the running members report (0 when none answers)."""
        terms = [int(s["header"]["raft_term"]) for n in self.names if self.running(n)
                 if (s := self.status(n)) and "header" in s]
        return max(terms, default=0)

    def status(self, name: str) -> dict[str, Any] | None:
        return post_json(self.client_url(name) + "/v3/maintenance/status", {})

    def leader(self) -> str | None:
        """The member every running member names as leader, if they agree."""
        ids: dict[str, str] = {}
        leaders = set()
        for name in self.names:
            if not self.running(name):
                continue
            status = self.status(name)
            if not status or "leader" not in status:
                return None
            ids[str(status["header"]["member_id"])] = name
            leaders.add(str(status["leader"]))
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())

    def wait_leader(self, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            exited = [n for n in self.names if n in self._children and not self.running(n)]
            if exited:
                raise RuntimeError(f"etcd member(s) {exited} exited; see {self.dir}/<name>.log")
            time.sleep(0.05)
        raise TimeoutError(f"no etcd leader within {timeout_s}s")

    def wait_healthy(self, name: str, timeout_s: float = 30.0) -> None:
        """Until ``name`` answers a linearizable read (it rejoined and caught up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if post_json(self.client_url(name) + "/v3/kv/range", {"key": b64("health")}) is not None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd member {name} not serving within {timeout_s}s")


__all__ = ["EtcdCluster", "EtcdMissing", "b64", "etcd_binary", "post_json"]
