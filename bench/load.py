"""One load-generator process: ``clients`` asyncio clients against etcd's v3
JSON gateway or this project's HTTP API, the same loop for both.

    python -m bench.load --system etcd|coord --urls URL[,URL...] --clients N --seconds S --kind write|read

Client ``c`` talks to ``urls[c % len(urls)]`` and, for writes, puts 64-byte
values at ``bench/<first + c>/<i % 100>``; reads get ``bench/0/0``
(linearizable on both systems). Prints one JSON line: operations,
errors by status, the latencies in microseconds, and this process's CPU
time, so the caller can merge several generator processes and tell when the
generator, not the system, was the bottleneck. Every client stops at
``seconds`` or after ``MAX_OPS_PER_CLIENT`` requests; every request has a
timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.etcd import b64
from bench.report import cpu_s

VALUE = "v" * 64
MAX_OPS_PER_CLIENT = 1_000_000
REQUEST_TIMEOUT_S = 10.0
KEYS_PER_CLIENT = 100


def key_of(client: int, i: int) -> str:
    return f"bench/{client}/{i % KEYS_PER_CLIENT}"


class Requests:
    """How one system spells a put and a linearizable get."""

    def __init__(self, system: str) -> None:
        if system not in ("etcd", "coord"):
            raise ValueError("system: etcd or coord")
        self.system = system

    def write(self, session: aiohttp.ClientSession, url: str, client: int, i: int) -> Any:
        key = key_of(client, i)
        if self.system == "etcd":
            return session.post(f"{url}/v3/kv/put", json={"key": b64(key), "value": b64(VALUE)})
        return session.put(f"{url}/v1/kv/{key}", json={"value": VALUE})

    def read(self, session: aiohttp.ClientSession, url: str) -> Any:
        if self.system == "etcd":
            return session.post(f"{url}/v3/kv/range", json={"key": b64(key_of(0, 0))})
        return session.get(f"{url}/v1/kv/{key_of(0, 0)}")


async def run_load(system: str, urls: list[str], clients: int, seconds: float, kind: str,
                   first_client: int = 0) -> dict[str, Any]:
    requests = Requests(system)
    latencies: list[int] = []
    statuses: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds

    async def client(c: int, session: aiohttp.ClientSession) -> None:
        url = urls[c % len(urls)]
        for i in range(MAX_OPS_PER_CLIENT):
            if time.monotonic() >= stop_at:
                return
            started = time.perf_counter()
            try:
                request = (requests.write(session, url, first_client + c, i) if kind == "write"
                           else requests.read(session, url))
                async with request as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
                continue
            if status != 200:
                statuses[str(status)] += 1
                continue
            latencies.append(int((time.perf_counter() - started) * 1e6))

    cpu = cpu_s()
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(c, session) for c in range(clients)))
    elapsed = time.monotonic() - started
    return {"ops": len(latencies), "errors": dict(statuses), "latencies_us": latencies,
            "elapsed_s": elapsed, "cpu_s": cpu_s() - cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("etcd", "coord"), required=True)
    parser.add_argument("--urls", required=True, help="comma-separated base URLs on 127.0.0.1")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--kind", choices=("write", "read"), required=True)
    parser.add_argument("--first-client", type=int, default=0, help="client number of this process's first client")
    args = parser.parse_args(argv)
    urls = [u.strip() for u in args.urls.split(",") if u.strip()]
    if not urls or not all(u.startswith("http://127.0.0.1:") for u in urls):
        parser.error("--urls: http://127.0.0.1:PORT addresses only")
    if not (1 <= args.clients <= 4096 and 0 < args.seconds <= 600):
        parser.error("--clients 1..4096, --seconds up to 600")
    result = asyncio.run(run_load(args.system, urls, args.clients, args.seconds, args.kind, args.first_client))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
