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

The client is a minimal HTTP/1.1 keep-alive client on asyncio's protocol
API, not aiohttp: the generator shares the machine's cores with the
systems it measures, and aiohttp's client cost about 0.16 ms of CPU per
request, a third of the machine at 64 clients, which pushed every ratio
towards 1. Each client owns one connection and has one request in flight;
a request is one ``transport.write`` of bytes built once per key. The
response parser (``ResponseParser``) reads exactly what the two servers
send: a status line, headers, and a body framed by Content-Length or by
chunked transfer coding (etcd's gateway answers errors chunked, with
trailers). Anything else (a body delimited by the connection's close, 1xx,
bytes nobody asked for) is a ``BadResponse``, counted like a connection
error and the connection dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

from bench.etcd import b64
from bench.report import cpu_s

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = (sys.executable, "-m", "bench.load")  # this checkout's generator, run from ROOT
VALUE = "v" * 64
MAX_OPS_PER_CLIENT = 1_000_000
REQUEST_TIMEOUT_S = 10.0
KEYS_PER_CLIENT = 100
HEAD_MAX_BYTES = 16 * 1024
BODY_MAX_BYTES = 1024 * 1024


def key_of(client: int, i: int) -> str:
    return f"bench/{client}/{i % KEYS_PER_CLIENT}"


class ResponseError(Exception):
    """The server's answer could not be read as one HTTP/1.1 response; the
    connection is unusable. Counted under the subclass's name."""


class BadResponse(ResponseError):
    """Malformed, too large, or framed in a way this client does not read."""


class ServerDisconnected(ResponseError):
    """The server closed the connection before the response was complete."""


class Target(NamedTuple):
    """Where one base URL points: ``http://127.0.0.1:PORT[/prefix]``."""

    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"not an http://HOST:PORT URL: {url}")
        return cls(parts.hostname, parts.port, parts.path.rstrip("/"))


class Requests:
    """How one system spells a put and a linearizable get, as the bytes of
    one complete HTTP/1.1 request (built once, written as they are)."""

    def __init__(self, system: str) -> None:
        if system not in ("etcd", "coord"):
            raise ValueError("system: etcd or coord")
        self.system = system

    def write(self, target: Target, client: int, i: int) -> bytes:
        key = key_of(client, i)
        if self.system == "etcd":
            return _request("POST", target, "/v3/kv/put", {"key": b64(key), "value": b64(VALUE)})
        return _request("PUT", target, f"/v1/kv/{quote(key, safe='/')}", {"value": VALUE})

    def read(self, target: Target) -> bytes:
        if self.system == "etcd":
            return _request("POST", target, "/v3/kv/range", {"key": b64(key_of(0, 0))})
        return _request("GET", target, f"/v1/kv/{quote(key_of(0, 0), safe='/')}", None)


def _request(method: str, target: Target, path: str, body: Any) -> bytes:
    head = f"{method} {target.prefix}{path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    payload = json.dumps(body).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS = range(5)


class ResponseParser:
    """Reads HTTP/1.1 responses, one at a time, from the bytes a connection
    receives. No I/O: the caller feeds what arrived.

    ``feed`` returns True when a response is complete; ``status`` and
    ``keep_alive`` then describe it and the parser is ready for the next.
    It raises ``BadResponse`` on anything it does not read (the connection
    must then be dropped): a malformed head, a head over ``HEAD_MAX_BYTES``,
    a body over ``BODY_MAX_BYTES``, a 1xx status, a body framed neither by
    Content-Length nor chunked, or bytes left over after the response (one
    request is in flight at a time, so there is no next response yet). The
    body itself is checked for framing and discarded, unless ``keep_body``
    is set: then ``body`` holds it once the response is complete.
    """

    __slots__ = ("_body", "_buf", "_need", "_state", "body", "keep_alive", "keep_body", "status")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._need = 0  # bytes of body, or of chunk data and its CRLF, still to come
        self._body = 0  # body bytes so far (chunked)
        self.status = 0
        self.keep_alive = True
        self.keep_body = False
        self.body = bytearray()

    def feed(self, data: bytes) -> bool:
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > HEAD_MAX_BYTES:
                        raise BadResponse("response head too large")
                    return False
                self._parse_head(bytes(buf[:end]))
                del buf[:end + 4]
            elif state == _BODY:
                if len(buf) < self._need:
                    self._need -= len(buf)
                    if self.keep_body:
                        self.body += buf
                    buf.clear()
                    return False
                if self.keep_body:
                    self.body += buf[:self._need]
                del buf[:self._need]
                return self._complete()
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise BadResponse("chunk size line too long")
                    return False
                size = self._chunk_size(bytes(buf[:end]))
                del buf[:end + 2]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._body += size
                    if self._body > BODY_MAX_BYTES:
                        raise BadResponse("response body too large")
                    self._need, self._state = size + 2, _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buf) < self._need:
                    return False
                if buf[self._need - 2:self._need] != b"\r\n":
                    raise BadResponse("chunk not followed by CRLF")
                if self.keep_body:
                    self.body += buf[:self._need - 2]
                del buf[:self._need]
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS: none, or header lines up to a blank line
                if buf.startswith(b"\r\n"):
                    del buf[:2]
                    return self._complete()
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > HEAD_MAX_BYTES:
                        raise BadResponse("trailers too large")
                    return False
                del buf[:end + 4]
                return self._complete()

    def _complete(self) -> bool:
        if self._buf:
            raise BadResponse("bytes after the response")
        self._state = _HEAD
        return True

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit() or rest[3:4] not in (
                b"", b" "):
            raise BadResponse(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        self.body = bytearray()
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise BadResponse(f"bad header line {line[:80]!r}")
            name = name.lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise BadResponse(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                codings = [c.strip() for c in value.lower().split(b",")]
                if codings[-1] != b"chunked":
                    raise BadResponse(f"unsupported Transfer-Encoding {value[:40]!r}")
                chunked = True
            elif name == b"connection":
                tokens = [t.strip() for t in value.lower().split(b",")]
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if status < 200:
            raise BadResponse(f"unexpected {status} response")  # never sends Expect or Upgrade
        self.status, self.keep_alive = status, keep_alive
        if status in (204, 304):  # no body, whatever the headers say
            self._need, self._state = 0, _BODY
        elif chunked:  # wins over Content-Length (RFC 9112 6.3)
            self._body, self._state = 0, _CHUNK_SIZE
        elif length is not None:
            if length > BODY_MAX_BYTES:
                raise BadResponse("response body too large")
            self._need, self._state = length, _BODY
        else:
            raise BadResponse("body framed by closing the connection: not supported")

    @staticmethod
    def _chunk_size(line: bytes) -> int:
        digits = line.partition(b";")[0].strip()  # a chunk extension may follow the size
        if not 0 < len(digits) <= 8 or digits.translate(None, b"0123456789abcdefABCDEF"):
            raise BadResponse(f"bad chunk size {line[:40]!r}")
        return int(digits, 16)


class Connection(asyncio.Protocol):
    """One keep-alive connection to one server, at most one request in flight.

    Loop-only; made by ``connect``. ``exchange`` sends a request and returns
    the response's status. After any error, or a response that did not keep
    the connection alive, ``usable`` is False and the caller connects anew.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = ResponseParser()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self.usable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.usable = True

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        try:
            if waiter is None:
                raise BadResponse("bytes while no request was in flight")
            if not self._parser.feed(data):
                return
        except BadResponse as exc:
            self._fail(exc)
            return
        self._waiter = None
        if not self._parser.keep_alive:
            self.close()
        if not waiter.done():
            waiter.set_result(self._parser.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if exc is not None else ServerDisconnected("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.drop()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    @property
    def body(self) -> bytes:
        """The last response's body, when ``exchange`` was asked to keep it."""
        return bytes(self._parser.body)

    async def exchange(self, request: bytes, deadline: float, keep_body: bool = False) -> int:
        """Write ``request`` (a whole HTTP request) and wait for its response's
        status until ``deadline`` (loop time); ``keep_body``: keep the
        response's body (``body``). Raises ``TimeoutError``,
        ``ResponseError`` or the connection's ``OSError``; the connection is
        then no longer usable."""
        if self._waiter is not None or not self.usable or self._transport is None:
            raise RuntimeError("exchange on a busy or closed connection")
        self._parser.keep_body = keep_body
        self._waiter = waiter = self._loop.create_future()
        # A timer handle rather than asyncio.timeout(): the same deadline
        # without cancelling and uncancelling the task on every request.
        timer = self._loop.call_at(deadline, _expire, waiter)
        self._transport.write(request)
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        """Close gracefully (no request in flight is answered any more)."""
        self.usable = False
        if self._transport is not None:
            self._transport.close()

    def drop(self) -> None:
        """Close at once, discarding whatever is buffered."""
        self.usable = False
        if self._transport is not None:
            self._transport.abort()


def _expire(waiter: asyncio.Future[int]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no response within REQUEST_TIMEOUT_S"))


async def connect(target: Target, deadline: float) -> Connection:
    """A new connection to ``target``, made before ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(deadline):
        _, connection = await loop.create_connection(Connection, target.host, target.port)
    return connection


async def run_load(system: str, urls: list[str], clients: int, seconds: float, kind: str,
                   first_client: int = 0) -> dict[str, Any]:
    requests = Requests(system)
    targets = [Target.parse(url) for url in urls]
    latencies: list[int] = []
    statuses: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    stop_at = time.monotonic() + seconds
    cycle = KEYS_PER_CLIENT if kind == "write" else 1

    async def client(c: int) -> None:
        target = targets[c % len(targets)]
        made: list[bytes] = []  # the request for each key, built on first use
        connection: Connection | None = None
        try:
            for i in range(MAX_OPS_PER_CLIENT):
                if time.monotonic() >= stop_at:
                    return
                slot = i % cycle
                if slot == len(made):
                    made.append(requests.write(target, first_client + c, i) if kind == "write"
                                else requests.read(target))
                started = time.perf_counter()
                deadline = loop.time() + REQUEST_TIMEOUT_S
                try:
                    if connection is None or not connection.usable:
                        connection = None
                        connection = await connect(target, deadline)
                    status = await connection.exchange(made[slot], deadline)
                except (OSError, ResponseError) as exc:  # TimeoutError is an OSError
                    statuses[type(exc).__name__] += 1
                    if connection is not None:
                        connection.drop()
                        connection = None
                    continue
                if status != 200:
                    statuses[str(status)] += 1
                    continue
                latencies.append(int((time.perf_counter() - started) * 1e6))
        finally:
            if connection is not None:
                connection.close()

    cpu = cpu_s()
    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.monotonic() - started
    return {"ops": len(latencies), "errors": dict(statuses), "latencies_us": latencies,
            "elapsed_s": elapsed, "cpu_s": cpu_s() - cpu}


def run_generators(system: str, urls: list[str], clients: int, procs: int, seconds: float, kind: str, *,
                   command: tuple[str, ...] | list[str] = GENERATOR,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """``clients`` spread over ``procs`` generator processes (``command``:
    this module, or an older ``load.py`` run by path), their client numbers
    consecutive, each for ``seconds``; blocks until they end. Returns their
    JSON lines merged into one shaped like one process's: ``ops``,
    ``errors`` by kind summed, ``latencies_us`` together, ``elapsed_s`` the
    longest, ``cpu_s`` summed (the generators' own CPU).

    Each process is waited for at most ``seconds + 60``; raises
    ``RuntimeError`` when one fails, and kills by PID any still running on
    the way out. Runs from this checkout's root, so ``-m bench.load`` is this
    checkout's generator whichever cluster it drives."""
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    children: list[subprocess.Popen[str]] = []
    results = []
    try:
        first = 0
        for share in shares:
            children.append(subprocess.Popen(
                [*command, "--system", system, "--urls", ",".join(urls), "--clients", str(share),
                 "--seconds", str(seconds), "--kind", kind, "--first-client", str(first)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            first += share
        for child in children:
            out, err = child.communicate(timeout=seconds + 60)
            if child.returncode != 0:
                raise RuntimeError(f"generator failed ({child.returncode}): {err[-500:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    return {"ops": sum(r["ops"] for r in results), "errors": dict(errors),
            "latencies_us": [v for r in results for v in r["latencies_us"]],
            "elapsed_s": max(r["elapsed_s"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results)}


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
    try:
        for url in urls:
            Target.parse(url)
    except ValueError as exc:
        parser.error(f"--urls: {exc}")
    result = asyncio.run(run_load(args.system, urls, args.clients, args.seconds, args.kind, args.first_client))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
