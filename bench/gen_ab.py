"""The load generator against its own past: ``bench/load.py`` as of git
``--ref`` and this checkout's, side by side against the same servers over
interleaved rounds (ref first in odd rounds, this checkout first in even
ones): the generator's CPU per request and the servers', so a change to the
generator is measured in one run on a noisy machine.

    python -m bench.gen_ab --ref REF [--servers bare|etcd] [--kinds write,read]
                           [--clients 64] [--procs 2] [--rounds 3] [--seconds 6]

``bare``: three aiohttp processes on 127.0.0.1 answering ``PUT`` and ``GET
/v1/kv/{key}`` with a fixed JSON body, about the least a server in this
stack does per request; the generator drives them as ``--system coord``.
``etcd``: a three-member etcd (``bench/etcd.py``), driven as ``--system
etcd``. Each cell runs ``--procs`` generator processes sharing ``--clients``
for ``--seconds``, each from a one-second warm-up on. REF's ``bench/load.py``
is taken with ``git show`` into a temporary directory and run with this
checkout on ``PYTHONPATH`` (it imports ``bench.etcd`` and ``bench.report``).
Every process is stopped by PID.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import parser
from bench.load import GENERATOR, ROOT, run_generators
from bench.report import pct, processes_cpu_s

# One bare server: binds an ephemeral port on 127.0.0.1, prints it, serves.
_BARE = """
import json, socket, sys
from aiohttp import web
async def put(request):
    json.loads(await request.read())
    return web.Response(body=b'{"revision":1}', content_type="application/json")
async def get(request):
    return web.Response(body=b'{"key":"bench/0/0","value":"v","revision":1}', content_type="application/json")
app = web.Application()
app.router.add_put("/v1/kv/{key:(?s:.+)}", put)
app.router.add_get("/v1/kv/{key:(?s:.+)}", get)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, access_log=None, print=None)
"""


class Servers:
    """The servers under load: their base URLs and PIDs once started, and
    the ``--system`` the generator drives them as. ``stop`` stops whatever
    ``start`` started, also after ``start`` failed half-way."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind, self.directory = kind, directory
        self.system = "etcd" if kind == "etcd" else "coord"
        self.urls: list[str] = []
        self.pids: list[int] = []
        self._etcd: Any = None
        self._children: list[subprocess.Popen[str]] = []

    def start(self) -> None:
        if self.kind == "etcd":
            from bench.etcd import EtcdCluster
            from devcluster.cluster import free_base_port
            self._etcd = EtcdCluster(self.directory / "etcd", free_base_port(3))
            self._etcd.start_all()
            self._etcd.wait_leader()
            self.urls, self.pids = self._etcd.urls, self._etcd.pids()
            return
        for _ in range(3):
            child = subprocess.Popen([sys.executable, "-c", _BARE], stdout=subprocess.PIPE, text=True)
            self._children.append(child)
            assert child.stdout is not None
            port = child.stdout.readline().strip()
            if not port.isdigit():
                raise RuntimeError("a bare server did not start")
            self.urls.append(f"http://127.0.0.1:{port}")
            self.pids.append(child.pid)

    def stop(self) -> None:
        if self._etcd is not None:
            self._etcd.stop_all()
        for child in self._children:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run_cell(generator: list[str], servers: Servers, kind: str, clients: int, procs: int,
             seconds: float) -> dict[str, Any]:
    before = processes_cpu_s(servers.pids)
    load = run_generators(servers.system, servers.urls, clients, procs, seconds, kind, command=generator,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    server_cpu = processes_cpu_s(servers.pids) - before
    ops = load["ops"]
    per_op = 1000 / ops if ops else float("nan")
    return {"ops_s": ops / load["elapsed_s"], "gen_ms_op": load["cpu_s"] * per_op,
            "server_ms_op": server_cpu * per_op, "p50_ms": pct([v / 1000 for v in load["latencies_us"]], 0.5),
            "errors": sum(load["errors"].values())}


def main(argv: list[str] | None = None) -> int:
    cli = parser("gen_ab", __doc__)
    cli.add_argument("--ref", required=True, help="git commit whose bench/load.py is the 'before'")
    cli.add_argument("--servers", choices=("bare", "etcd"), default="bare")
    cli.add_argument("--kinds", default="write")
    cli.add_argument("--clients", type=int, default=64)
    cli.add_argument("--procs", type=int, default=2)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--seconds", type=float, default=6.0)
    args = cli.parse_args(argv)
    kinds = args.kinds.split(",")
    if not (set(kinds) <= {"write", "read"} and 1 <= args.procs <= 8 and args.procs <= args.clients <= 1024
            and 1 <= args.rounds <= 20 and 0 < args.seconds <= 120):
        cli.error("--kinds write,read; --procs 1..8; --clients procs..1024; --rounds 1..20; --seconds up to 120")
    with tempfile.TemporaryDirectory(prefix="gen-ab-") as tmp:
        old = Path(tmp) / "load_ref.py"
        old.write_bytes(subprocess.run(["git", "show", f"{args.ref}:bench/load.py"], cwd=ROOT, check=True,
                                       capture_output=True, timeout=30).stdout)
        generators = {"ref": [sys.executable, str(old)], "this": list(GENERATOR)}
        servers = Servers(args.servers, Path(tmp))
        try:
            servers.start()
            time.sleep(1.0)
            results: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for kind in kinds:
                run_cell(generators["this"], servers, kind, args.clients, args.procs, 1.0)  # warm-up
                for r in range(args.rounds):
                    for name in ("ref", "this") if r % 2 == 0 else ("this", "ref"):
                        cell = run_cell(generators[name], servers, kind, args.clients, args.procs, args.seconds)
                        results.setdefault((kind, name), []).append(cell)
                        print(f"{kind} round {r + 1} {name:4s} {cell['ops_s']:6.0f} ops/s  generator "
                              f"{cell['gen_ms_op']:.3f} ms/op  servers {cell['server_ms_op']:.3f} ms/op  "
                              f"p50 {cell['p50_ms']:.2f} ms  errors {cell['errors']}", flush=True)
        finally:
            servers.stop()
    print(f"medians over {args.rounds} rounds, {args.servers} servers, {args.clients} clients in {args.procs} "
          f"generator processes, {args.seconds:g} s per cell (ref = {args.ref}):")
    for (kind, name), cells in results.items():
        def median(field: str, cells: list[dict[str, Any]] = cells) -> float:
            return statistics.median(c[field] for c in cells)
        print(f"  {kind} {name:4s} {median('ops_s'):6.0f} ops/s  generator {median('gen_ms_op'):.3f} ms/op  "
              f"servers {median('server_ms_op'):.3f} ms/op  p50 {median('p50_ms'):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
