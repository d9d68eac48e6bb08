"""Workloads: concurrent clients over HTTP, every operation recorded.

Each operation is an ``invoke`` event followed by exactly one completion:
``ok`` (it happened, with what it returned), ``fail`` (it certainly did not
happen: a 503, a refused connection) or ``info`` (unknown: a timeout after
the request was sent, a 504). After an ``info`` the client continues under a
new process number, as Jepsen does: the old operation may still be pending.

Clients issue no retries and carry a fresh ``request_id`` per write, so one
invoke is one attempt. Time is ``time.monotonic_ns()`` of this process.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

VALUES = range(5)
FAIL_PAUSE_S = 0.05  # a small value space makes cas meaningful (Jepsen's cas-register)


class History:
    """Operation and nemesis events in invocation order (one event loop)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.started_ns = time.monotonic_ns()

    def add(self, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("time", time.monotonic_ns())
        self.events.append(event)
        if event.get("type") in ("ok", "fail", "info"):
            self.counts[event["type"]] += 1
        return event

    def nemesis(self, name: str, phase: str, **detail: Any) -> None:
        self.add({"type": "nemesis", "name": name, "phase": phase, "wall": time.time(), **detail})

    def write_jsonl(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for event in self.events:
                f.write(json.dumps(event, separators=(",", ":")) + "\n")


class RegisterClient:
    """One client: read / write / cas on a few keys, through one node."""

    def __init__(self, process: int, endpoint: str, keys: list[str], history: History,
                 session: aiohttp.ClientSession, rng: random.Random, op_timeout_s: float,
                 next_process: Callable[[], int]) -> None:
        self.process = process
        self.endpoint = endpoint.rstrip("/")
        self.keys = keys
        self.history = history
        self.session = session
        self.rng = rng
        self.op_timeout_s = op_timeout_s
        self.next_process = next_process

    async def run(self, stop_at: float, max_ops: int) -> None:
        for _ in range(max_ops):
            if time.monotonic() >= stop_at:
                return
            await self.one()

    async def one(self) -> None:
        key = self.rng.choice(self.keys)
        roll = self.rng.random()
        if roll < 0.5:
            f, value = "read", None
        elif roll < 0.75:
            f, value = "write", self.rng.choice(VALUES)
        else:
            f, value = "cas", [self.rng.choice(VALUES), self.rng.choice(VALUES)]
        invoke = {"process": self.process, "type": "invoke", "f": f, "key": key, "value": value}
        self.history.add(invoke)
        completion = await self._perform(f, key, value)
        completion.update(process=self.process, f=f, key=key)
        self.history.add(completion)
        if completion["type"] == "info":
            self.process = self.next_process()
        if completion["type"] != "ok":
            await asyncio.sleep(FAIL_PAUSE_S)  # a down node refuses at once: do not spin

    async def _perform(self, f: str, key: str, value: Any) -> dict[str, Any]:
        url = f"{self.endpoint}/v1/kv/{urllib.parse.quote(key, safe='')}"
        timeout = aiohttp.ClientTimeout(total=self.op_timeout_s)
        try:
            if f == "read":
                request = self.session.get(url, timeout=timeout)
            elif f == "write":
                request = self.session.put(url, json={"value": value, "request_id": secrets.token_hex(8)},
                                           timeout=timeout)
            else:
                request = self.session.post(url + "/cas", json={"expected": value[0], "value": value[1],
                                                                "request_id": secrets.token_hex(8)},
                                            timeout=timeout)
            async with request as response:
                status = response.status
                body = await response.json(content_type=None)
        except aiohttp.ClientConnectorError:
            return {"type": "fail", "value": value, "error": "connection refused"}
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # sent (or maybe sent) and no answer: a read changed nothing, a write may have happened
            kind = "fail" if f == "read" else "info"
            return {"type": kind, "value": value, "error": type(exc).__name__}
        if f == "read" and status == 200:
            return {"type": "ok", "value": body["value"]}
        if f == "read" and status == 404:
            return {"type": "ok", "value": None}
        if f == "write" and status == 200:
            return {"type": "ok", "value": value}
        if f == "cas" and status in (200, 409):
            return {"type": "ok", "value": value, "matched": status == 200}
        if status in (503, 400, 404) or f == "read":
            return {"type": "fail", "value": value, "error": f"HTTP {status}"}
        return {"type": "info", "value": value, "error": f"HTTP {status}"}


async def run_register(endpoints: list[str], history: History, *, clients: int = 10, keys: int = 3,
                       duration_s: float = 30.0, seed: int = 0, op_timeout_s: float = 2.0,
                       max_ops_per_client: int = 100_000) -> None:
    """``clients`` concurrent clients, client i on ``endpoints[i % len]``."""
    rng = random.Random(seed)
    key_names = [f"chaos/r{i}" for i in range(keys)]
    counter = iter(range(clients, 10**9))
    stop_at = time.monotonic() + duration_s
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [RegisterClient(i, endpoints[i % len(endpoints)], key_names, history, session,
                                  random.Random(rng.random()), op_timeout_s, lambda: next(counter))
                   for i in range(clients)]
        await asyncio.gather(*(w.run(stop_at, max_ops_per_client) for w in workers))
