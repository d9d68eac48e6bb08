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

FAIL_PAUSE_S = 0.05


async def _mark_sent(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["sent"] = True


def make_session() -> aiohttp.ClientSession:
    """A session that records, per request, whether any attempt reached the
    wire. aiohttp silently re-sends an idempotent request (PUT, DELETE) when a
    pooled connection dies mid-request; if that second try is refused, the
    first may still have been applied by a node that crashed right after. A
    refused request is therefore certainly not applied only if nothing was sent."""
    tracing = aiohttp.TraceConfig()
    tracing.on_request_headers_sent.append(_mark_sent)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trace_configs=[tracing])


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
        self.seen: dict[str, Any] = {}  # the last value this client read or wrote, per key
        self.written = 0

    def _unique(self) -> int:
        """Every written value is new: an unknown write can then match only the
        reads that really saw it, which keeps the checker sharp and fast."""
        self.written += 1
        return self.process * 1_000_000 + self.written

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
            f, value = "write", self._unique()
        else:  # expect what this client last saw: right when nobody wrote since
            f, value = "cas", [self.seen.get(key), self._unique()]
        invoke = {"process": self.process, "type": "invoke", "f": f, "key": key, "value": value}
        self.history.add(invoke)
        completion = await self._perform(f, key, value)
        completion.update(process=self.process, f=f, key=key)
        self.history.add(completion)
        if completion["type"] == "ok":
            if f == "read":
                self.seen[key] = completion["value"]
            elif f == "write" or completion.get("matched"):
                self.seen[key] = value if f == "write" else value[1]
        if completion["type"] == "info":
            self.process = self.next_process()
        if completion["type"] != "ok":
            await asyncio.sleep(FAIL_PAUSE_S)  # a down node refuses at once: do not spin

    async def _perform(self, f: str, key: str, value: Any) -> dict[str, Any]:
        url = f"{self.endpoint}/v1/kv/{urllib.parse.quote(key, safe='')}"
        timeout = aiohttp.ClientTimeout(total=self.op_timeout_s)
        trace: dict[str, bool] = {}
        try:
            if f == "read":
                request = self.session.get(url, timeout=timeout, trace_request_ctx=trace)
            elif f == "write":
                request = self.session.put(url, json={"value": value, "request_id": secrets.token_hex(8)},
                                           timeout=timeout, trace_request_ctx=trace)
            else:
                request = self.session.post(url + "/cas", json={"expected": value[0], "value": value[1],
                                                                "request_id": secrets.token_hex(8)},
                                            timeout=timeout, trace_request_ctx=trace)
            async with request as response:
                status = response.status
                body = await response.json(content_type=None)
        except aiohttp.ClientConnectorError:
            # refused: certain only if no earlier attempt was sent (see make_session)
            unknown = f != "read" and trace.get("sent", False)
            return {"type": "info" if unknown else "fail", "value": value, "error": "connection refused"}
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
    async with make_session() as session:
        workers = [RegisterClient(i, endpoints[i % len(endpoints)], key_names, history, session,
                                  random.Random(rng.random()), op_timeout_s, lambda: next(counter))
                   for i in range(clients)]
        await asyncio.gather(*(w.run(stop_at, max_ops_per_client) for w in workers))


class LockClient:
    """Takes a lock, makes a fenced write with the token it got, releases.

    Records ``acquire`` (value: the token, or null when refused), ``fenced-write``
    (value: the token used; ok means the cluster accepted it) and ``release``.
    A paused or slow holder may lose its lease while it still believes it
    holds the lock; its fenced write must then be refused."""

    def __init__(self, process: int, endpoint: str, history: History, session: aiohttp.ClientSession,
                 rng: random.Random, op_timeout_s: float, lock: str, ttl_s: float) -> None:
        self.process = process
        self.endpoint = endpoint.rstrip("/")
        self.history = history
        self.session = session
        self.rng = rng
        self.timeout = aiohttp.ClientTimeout(total=op_timeout_s)
        self.lock = lock
        self.ttl_s = ttl_s
        self.holder = f"client-{process}"

    async def _call(self, f: str, method: str, path: str, body: dict[str, Any], value: Any,
                    ok_statuses: tuple[int, ...]) -> tuple[str, int | None, Any]:
        self.history.add({"process": self.process, "type": "invoke", "f": f, "key": self.lock, "value": value})
        status, answer, kind = None, None, "info"
        trace: dict[str, bool] = {}
        try:
            async with self.session.request(method, self.endpoint + path, json=body, timeout=self.timeout,
                                            trace_request_ctx=trace) as response:
                status = response.status
                answer = await response.json(content_type=None)
            kind = "ok" if status in ok_statuses else ("fail" if status in (409, 503, 404) else "info")
        except aiohttp.ClientConnectorError:
            kind = "info" if trace.get("sent", False) else "fail"  # see make_session
        except (TimeoutError, aiohttp.ClientError, ValueError):
            kind = "info"
        done = {"process": self.process, "type": kind, "f": f, "key": self.lock, "value": value,
                "status": status, "holder": self.holder}
        if kind == "ok" and f == "acquire":
            done["value"] = answer["fencing_token"]
        self.history.add(done)
        return kind, status, answer

    async def run(self, stop_at: float, max_rounds: int) -> None:
        lock_path = f"/v1/locks/{urllib.parse.quote(self.lock, safe='')}"
        for _ in range(max_rounds):
            if time.monotonic() >= stop_at:
                return
            kind, _, answer = await self._call("acquire", "POST", lock_path,
                                               {"holder": self.holder, "ttl_s": self.ttl_s}, None, (200,))
            if kind != "ok":
                await asyncio.sleep(0.05 + self.rng.random() * 0.1)
                continue
            token = answer["fencing_token"]
            await asyncio.sleep(self.rng.random() * 0.2)  # work while holding it
            await self._call("fenced-write", "PUT", "/v1/kv/" + urllib.parse.quote(self.lock + "/owner", safe=""),
                             {"value": {"holder": self.holder, "token": token},
                              "fence": {"lock": self.lock, "token": token}}, token, (200,))
            await self._call("release", "DELETE", lock_path, {"holder": self.holder}, token, (200,))


async def run_locks(endpoints: list[str], history: History, *, clients: int = 4, duration_s: float = 30.0,
                    seed: int = 0, op_timeout_s: float = 2.0, ttl_s: float = 2.0, max_rounds: int = 100_000) -> None:
    rng = random.Random(seed)
    stop_at = time.monotonic() + duration_s
    async with make_session() as session:
        workers = [LockClient(10_000 + i, endpoints[i % len(endpoints)], history, session,
                              random.Random(rng.random()), op_timeout_s, "chaos/lock", ttl_s)
                   for i in range(clients)]
        await asyncio.gather(*(w.run(stop_at, max_rounds) for w in workers))


def check_locks(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Fencing holds: no token is granted to two holders, and no fenced write
    with a token succeeds after a write with a larger token completed (a
    stale holder's write is refused once a newer holder has written)."""
    invokes: dict[int, dict[str, Any]] = {}
    grants: list[int] = []
    holders: dict[int, set[str]] = {}
    writes: list[tuple[int, int, int]] = []  # (invoke time, complete time, token) of ok fenced writes
    for event in events:
        process = event.get("process")
        if process is None or event.get("f") not in ("acquire", "fenced-write", "release"):
            continue
        if event["type"] == "invoke":
            invokes[process] = event
            continue
        invoke = invokes.pop(process, None)
        if invoke is None or event["type"] != "ok":
            continue
        if event["f"] == "acquire":
            grants.append(event["value"])
            holders.setdefault(event["value"], set()).add(event.get("holder", str(process)))
        elif event["f"] == "fenced-write":
            writes.append((invoke["time"], event["time"], event["value"]))
    problems = []
    shared = sorted(token for token, who in holders.items() if len(who) > 1)
    if shared:  # the same holder re-acquiring gets its own token back (a refresh); others never may
        problems.append({"kind": "token granted to two holders", "tokens": shared[:10]})
    by_completion = sorted(writes, key=lambda w: w[1])
    done_max, pointer = -1, 0  # the largest token among writes completed before the current invoke
    for invoked, _completed, token in sorted(writes, key=lambda w: w[0]):
        while pointer < len(by_completion) and by_completion[pointer][1] < invoked:
            done_max = max(done_max, by_completion[pointer][2])
            pointer += 1
        if token < done_max:
            problems.append({"kind": "stale fenced write accepted", "token": token, "after_token": done_max})
    return {"valid": not problems, "grants": len(grants), "fenced_writes": len(writes), "problems": problems[:10]}
