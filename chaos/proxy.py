"""A TCP fault proxy: one listening port per link between two nodes.

Each link forwards byte streams between a listening port and a target port,
in both directions, and can be told to drop (both ways or one way), delay
with jitter, throttle, or reset its connections. Faults apply to streams
already open and to new ones.

Why per-link proxies on 127.0.0.1 (and not 127.0.0.2/.3 plus firewall
rules): it needs no root and no netfilter, so it runs the same on a laptop
and in CI. It fits pysyncobj because every pair of nodes shares exactly one
TCP connection, opened by the node whose address sorts higher; that node
dials the proxy (its ``--peer ID=RAFT@PROXY,HTTP``), the other node knows it
by its real address, which the handshake carries unchanged. So a link is a
pair of nodes, and the proxy needs no knowledge of the protocol.

Control: in-process through ``Proxy.set`` / ``Proxy.heal``, or over a small
HTTP API on loopback (``python -m chaos.proxy serve|set|heal|status``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
QUEUE_CHUNKS = 256  # per direction; a delayed link buffers at most this many reads


@dataclass
class Faults:
    """What a link does to its bytes. ``a`` is the dialing side, ``b`` the target."""

    drop_a_to_b: bool = False
    drop_b_to_a: bool = False
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_bps: float = 0.0  # 0 means unlimited

    def describe(self) -> str:
        parts = []
        if self.drop_a_to_b and self.drop_b_to_a:
            parts.append("drop")
        elif self.drop_a_to_b:
            parts.append("drop a->b")
        elif self.drop_b_to_a:
            parts.append("drop b->a")
        if self.delay_ms or self.jitter_ms:
            parts.append(f"delay {self.delay_ms:g}±{self.jitter_ms:g} ms")
        if self.rate_bps:
            parts.append(f"throttle {self.rate_bps:g} B/s")
        return ", ".join(parts) or "pass"


FAULT_FIELDS = {"drop_a_to_b", "drop_b_to_a", "delay_ms", "jitter_ms", "rate_bps"}


def faults_from(body: dict[str, Any]) -> Faults:
    """Build faults from a request; shortcuts ``drop`` (both ways) and ``heal``."""
    unknown = set(body) - FAULT_FIELDS - {"drop"}
    if unknown:
        raise ValueError(f"unknown fault field {sorted(unknown)[0]!r}")
    faults = Faults()
    if body.get("drop"):
        faults.drop_a_to_b = faults.drop_b_to_a = True
    for name in ("drop_a_to_b", "drop_b_to_a"):
        if name in body:
            if not isinstance(body[name], bool):
                raise ValueError(f"{name} must be true or false")
            setattr(faults, name, body[name])
    for name in ("delay_ms", "jitter_ms", "rate_bps"):
        if name in body:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3_600_000:
                raise ValueError(f"{name} must be a number between 0 and 3600000")
            setattr(faults, name, float(value))
    return faults


@dataclass(eq=False)
class _Stream:
    """One proxied connection. A direction that dropped bytes stays
    "poisoned": its byte stream has a hole, so nothing more may pass (the
    peer would misparse it); the connection is aborted at the next heal, and
    the nodes reconnect, as they would after a real partition."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    poisoned: set[str] = field(default_factory=set)


@dataclass
class Link:
    name: str
    listen_port: int
    target_port: int
    faults: Faults = field(default_factory=Faults)
    connections: int = 0
    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    dropped_bytes: int = 0
    resets: int = 0

    def state(self) -> dict[str, Any]:
        out = asdict(self)
        out["faults"] = asdict(self.faults)
        out["describe"] = self.faults.describe()
        return out


class Proxy:
    """Runs every link on the current event loop. ``seed`` makes jitter repeatable."""

    def __init__(self, links: list[tuple[str, int, int]], *, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.host = host
        self.links = {name: Link(name, listen, target) for name, listen, target in links}
        self._rng = random.Random(seed)
        self._servers: list[asyncio.base_events.Server] = []
        self._streams: dict[str, set[_Stream]] = {name: set() for name in self.links}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for link in self.links.values():
            server = await asyncio.start_server(lambda r, w, link=link: self._accept(link, r, w),
                                                self.host, link.listen_port, reuse_address=True)
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for name in self.links:
            self.reset(name)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    # -- control -------------------------------------------------------------------

    def set(self, name: str, faults: Faults) -> None:
        self.links[name].faults = faults
        log.info("link %s: %s", name, faults.describe())
        for stream in list(self._streams[name]):
            if any(not getattr(faults, f"drop_{d}") for d in stream.poisoned):
                self._abort(name, stream)

    def heal(self) -> None:
        for name in self.links:
            self.set(name, Faults())

    def reset(self, name: str) -> int:
        """Abort every open connection of the link (TCP RST)."""
        streams = list(self._streams[name])
        for stream in streams:
            self._abort(name, stream)
        return len(streams)

    def _abort(self, name: str, stream: _Stream) -> None:
        self._streams[name].discard(stream)
        _abort(stream.client)
        _abort(stream.upstream)
        self.links[name].resets += 1

    # -- forwarding ------------------------------------------------------------------

    async def _accept(self, link: Link, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                up_r, up_w = await asyncio.open_connection(self.host, link.target_port)
        except (OSError, TimeoutError):
            _abort(client_w)
            return
        link.connections += 1
        stream = _Stream(client_w, up_w)
        self._streams[link.name].add(stream)
        pumps = [self._spawn(self._pump(link, stream, client_r, up_w, "a_to_b")),
                 self._spawn(self._pump(link, stream, up_r, client_w, "b_to_a"))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        if stream in self._streams[link.name]:
            self._streams[link.name].discard(stream)
            _abort(client_w)
            _abort(up_w)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pump(self, link: Link, stream: _Stream, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: str) -> None:
        """Read, then hand to a writer task through a bounded queue, so a delay
        does not stop reading (bytes keep their order within a direction)."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        sender = self._spawn(self._send(link, stream, writer, queue, direction))
        last_release = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                faults = link.faults
                if getattr(faults, f"drop_{direction}") or direction in stream.poisoned:
                    stream.poisoned.add(direction)
                    link.dropped_bytes += len(data)
                    continue
                delay = faults.delay_ms + (self._rng.uniform(-faults.jitter_ms, faults.jitter_ms)
                                           if faults.jitter_ms else 0.0)
                release = max(time.monotonic() + max(delay, 0.0) / 1000, last_release)
                last_release = release
                await queue.put((release, data))
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
            await asyncio.wait([sender], timeout=1)
            sender.cancel()

    async def _send(self, link: Link, stream: _Stream, writer: asyncio.StreamWriter,
                    queue: asyncio.Queue[tuple[float, bytes] | None], direction: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while (item := await queue.get()) is not None:
                release, data = item
                wait = release - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if link.faults.rate_bps:  # the time these bytes take on a link of that rate
                    await asyncio.sleep(len(data) / link.faults.rate_bps)
                if getattr(link.faults, f"drop_{direction}") or direction in stream.poisoned:
                    stream.poisoned.add(direction)
                    link.dropped_bytes += len(data)
                    continue
                writer.write(data)
                await writer.drain()
                setattr(link, f"bytes_{direction}", getattr(link, f"bytes_{direction}") + len(data))


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- control API ---------------------------------------------------------------------

def control_app(proxy: Proxy) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response({name: link.state() for name, link in proxy.links.items()})

    async def set_link(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in proxy.links:
            return web.json_response({"error": {"code": "not_found", "message": f"no link {name!r}"}}, status=404)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            proxy.set(name, faults_from(body))
        except ValueError as exc:
            return web.json_response({"error": {"code": "invalid", "message": str(exc)}}, status=400)
        return web.json_response(proxy.links[name].state())

    async def reset_link(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in proxy.links:
            return web.json_response({"error": {"code": "not_found", "message": f"no link {name!r}"}}, status=404)
        return web.json_response({"reset": proxy.reset(name)})

    async def heal(request: web.Request) -> web.Response:
        proxy.heal()
        return web.json_response({"healed": sorted(proxy.links)})

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/links", status)
    app.router.add_post("/links/{name}", set_link)
    app.router.add_post("/links/{name}/reset", reset_link)
    app.router.add_post("/heal", heal)
    return app


async def serve(links: list[tuple[str, int, int]], control_port: int) -> None:
    proxy = Proxy(links)
    await proxy.start()
    runner = web.AppRunner(control_app(proxy), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    print(f"proxy: {len(links)} links, control on 127.0.0.1:{control_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await proxy.stop()


def parse_link(text: str) -> tuple[str, int, int]:
    """``NAME=LISTEN_PORT:TARGET_PORT``."""
    name, _, ports = text.partition("=")
    listen, _, target = ports.partition(":")
    if not name or not listen.isdigit() or not target.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=LISTEN_PORT:TARGET_PORT, got {text!r}")
    return name, int(listen), int(target)


async def _call(control: str, method: str, path: str, body: Any = None) -> Any:
    async with ClientSession(timeout=ClientTimeout(total=5)) as session, \
            session.request(method, f"http://127.0.0.1:{control}{path}", json=body) as response:
        return response.status, await response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.proxy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run links until SIGTERM")
    serve_p.add_argument("--link", action="append", type=parse_link, required=True,
                         help="NAME=LISTEN_PORT:TARGET_PORT (repeat)")
    serve_p.add_argument("--control", type=int, required=True, help="control API port on 127.0.0.1")
    status_p = sub.add_parser("status", help="links, faults and byte counts")
    status_p.add_argument("--control", type=int, required=True)
    set_p = sub.add_parser("set", help="set the faults of one link (replaces the previous ones)")
    set_p.add_argument("--control", type=int, required=True)
    set_p.add_argument("link")
    set_p.add_argument("--drop", action="store_true", help="drop both ways")
    set_p.add_argument("--drop-a-to-b", action="store_true", help="drop what the dialing node sends")
    set_p.add_argument("--drop-b-to-a", action="store_true", help="drop what the dialed node sends")
    set_p.add_argument("--delay-ms", type=float, default=0.0)
    set_p.add_argument("--jitter-ms", type=float, default=0.0)
    set_p.add_argument("--rate-bps", type=float, default=0.0)
    reset_p = sub.add_parser("reset", help="abort the open connections of one link")
    reset_p.add_argument("--control", type=int, required=True)
    reset_p.add_argument("link")
    heal_p = sub.add_parser("heal", help="clear every fault")
    heal_p.add_argument("--control", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        asyncio.run(serve(args.link, args.control))
        return 0
    if args.command == "status":
        status, body = asyncio.run(_call(args.control, "GET", "/links"))
    elif args.command == "set":
        body = {"drop": args.drop, "drop_a_to_b": args.drop_a_to_b or args.drop,
                "drop_b_to_a": args.drop_b_to_a or args.drop, "delay_ms": args.delay_ms,
                "jitter_ms": args.jitter_ms, "rate_bps": args.rate_bps}
        status, body = asyncio.run(_call(args.control, "POST", f"/links/{args.link}", body))
    elif args.command == "reset":
        status, body = asyncio.run(_call(args.control, "POST", f"/links/{args.link}/reset"))
    else:
        status, body = asyncio.run(_call(args.control, "POST", "/heal"))
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
