"""A node that listens elsewhere than the addresses it is known by
(``--http-bind``, ``--raft-bind``: issue 24), and its JSON and access logs.

One node alone (a cluster of one elects itself), listening on 127.0.0.1
ports other than its advertised ones: what it tells clients (status, the
member table) is the advertised address, and nothing listens there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.waiting import wait_until

pytestmark = pytest.mark.cluster
SECRET = "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf"
TOKEN = "admin-token-never-in-a-log-0123456789"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _get(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.loads(response.read())


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_node_listens_on_its_bind_addresses_and_tells_its_advertised_ones(tmp_path: Path) -> None:
    http, http_bind, raft, raft_bind = _free_ports(4)
    env = {**os.environ, "COORD_CLUSTER_SECRET": SECRET, "COORD_ADMIN_TOKEN": TOKEN}
    log_path = tmp_path / "n1.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--node-id", "n1", "--http", f"127.0.0.1:{http}",
             "--http-bind", f"127.0.0.1:{http_bind}", "--raft", f"127.0.0.1:{raft}", "--raft-bind",
             f"127.0.0.1:{raft_bind}", "--data-dir", str(tmp_path / "n1"), "--log-format", "json",
             "--access-log"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{http_bind}"

        def leading() -> dict | None:
            try:
                status = _get(f"{base}/v1/status")
            except OSError:
                return None
            return status if status.get("role") == "leader" else None

        status = wait_until(leading, "the node to lead alone", timeout_s=30)
        assert status["http"] == f"127.0.0.1:{http}" and status["raft"] == f"127.0.0.1:{raft}"
        members = wait_until(lambda: _get(f"{base}/v1/members").get("members"), "its member record", timeout_s=15)
        assert [(m["id"], m["raft"], m["http"]) for m in members] == [("n1", f"127.0.0.1:{raft}", f"127.0.0.1:{http}")]
        assert _listening(http_bind) and _listening(raft_bind)
        assert not _listening(http) and not _listening(raft)
        _get(f"{base}/v1/kv?prefix=x&token=query-secret")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "coordinator.access"]
    kv = next(line for line in access if line["path"] == "/v1/kv")
    assert kv["method"] == "GET" and kv["status"] == 200 and kv["principal"] == "admin" and kv["ms"] >= 0
    assert TOKEN not in text and "query-secret" not in text
    assert any("advertised as" in line["msg"] for line in lines)
