"""Many registered agents heartbeating: the leader's CPU, and lease expiry
still correct under that load (issue 23, part 3).

    .venv/bin/python -m bench.agents [--agents 10000,50000,100000] [--interval-s 10] [--ttl-s 30]
        [--seconds 60] [--procs 1] [--connections 256] [--probes 100] [--via leader|all] [--register-s 120]
        [--heartbeat udp|http] [--base-port 27600] [--out agents.json] [--doc docs/benchmarks.md]

For each N, on a fresh three-node cluster (fsync on, 127.0.0.1 only, stopped
by PID at the end, also on Ctrl-C or SIGTERM):

1. Register N agents (type ``bench``; the first ``--probes`` are type
   ``bench-probe``) with a TTL of ``--ttl-s``, over ``--connections``
   keep-alive connections per generator process (the registration
   concurrency). Registering goes before heartbeating, except that a beat
   overdue by half of (TTL - interval) goes first, so the first agents do
   not expire while the last register. After ``--register-s`` the
   generators stop registering and the run measures the agents that are in
   (the table says how many): a saturated leader would otherwise never let
   the last ones in.
2. Every agent heartbeats every ``--interval-s``, its first beat at a random
   point of the interval and each next one an interval (± 10 % jitter) after
   the previous one was due, so the load is spread evenly. Over HTTP
   (``--heartbeat http``), connection ``c`` owns agents ``c, c +
   connections, ...`` and has one request in flight; when it falls behind it
   sends at once and the lateness shows. Over UDP (``--heartbeat udp``, the
   default), each generator process sends every beat as one datagram
   (``coordinator.datagram``, keyed with the lease key its registration
   answer gave; while registering, only beats overdue by half of (TTL -
   interval), as over HTTP) from one socket to the UDP port of the node the agent's
   connection would use (the HTTP port's number, the nodes' default),
   without waiting; an ack (verified) counts the beat. A beat not acked
   within ``UDP_TIMEOUT_S`` ("udp lost": the datagram or its ack), or
   answered NOT_READY ("udp not ready"), is sent once more, with a new
   counter, to the next node of ``--via`` ("udp retried"), and when that
   fails too, as an HTTP heartbeat over the agent's connection ("udp fell
   back to http"), as the client does; an UNKNOWN_LEASE ack counts as that
   error (the agent had expired). Over UDP a lost datagram or a
   lost ack is silent, so the expiry check takes as the last sure renewal
   the sending of the last acked datagram, and as the latest possible one
   the last datagram sent or ack received (``sent`` and ``acked``).
3. After one interval of warm-up, measure for ``--seconds``: the CPU (user +
   system, /proc) of the leader, of each follower and of the generators, in
   cores; RSS of every node; heartbeat latency p50/p99; errors; achieved
   against intended heartbeats per second; how late beats were sent.
4. Stop the probes' heartbeats (the others go on) and check expiry: every
   probe is gone within TTL + ``--slack-s`` of its last acknowledged
   heartbeat and none before TTL after its last sent one, and every other
   agent is still registered.

``--procs`` > 1 runs the agents in that many generator processes (this
module with ``--worker``, driven over stdin/stdout lines), each with its
share of agents and ``--connections`` connections. The generators share the
machine's cores with the nodes: their CPU is in the table, so an overloaded
generator (achieved < intended, lateness growing) is visible as such.
Every loop is bounded by a count and a time; every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import random
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.harness import add_base_port, interruptible, local_cluster, parser
from bench.load import Connection, ResponseError, Target, connect
from bench.report import cpu_s, machine, pct, processes_cpu_s, publish
from coordinator import datagram

AGENT_TYPE = "bench"
PROBE_TYPE = "bench-probe"
REQUEST_TIMEOUT_S = 10.0
REGISTER_ATTEMPTS = 5
JITTER = 0.1  # of the interval, either way
MAX_STEPS_PER_CONNECTION = 10_000_000
MAX_SAMPLES = 2_000_000  # latencies kept per window and process
COMMAND_TIMEOUT_S = 600.0
PIPE_LIMIT_BYTES = 256 * 1024 * 1024
POLL_S = 0.25
MARKER = "\n## 100k agents heartbeating: leader CPU\n"
UDP_TIMEOUT_S = 1.0  # a datagram not acked by then is lost
UDP_SEND_BATCH = 2000  # beats sent before the generator yields to the loop (acks, commands)
SOCKET_BUFFER_BYTES = 8 << 20


def agent_id(i: int) -> str:
    return f"bench-{i}"


def _post(target: Target, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {target.prefix}{path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


@dataclass(slots=True)
class Window:
    """What one generator process saw since ``Swarm.start_window``."""

    started: float = field(default_factory=time.monotonic)
    cpu: float = field(default_factory=cpu_s)
    beats: int = 0
    latencies_us: list[int] = field(default_factory=list)
    late_ms: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


class Swarm:
    """Agents ``first .. first + count - 1`` of one generator process, the
    global first ``probes`` of them probes, against ``urls`` (connection
    ``c`` uses ``urls[c % len(urls)]``).

    Loop-only. ``run`` drives every connection until ``stop``; the other
    methods are the commands a driver sends (``handle``) and may be called
    while ``run`` runs. ``seed`` makes the schedule repeatable.
    """

    def __init__(self, urls: list[str], first: int, count: int, probes: int, *, interval_s: float, ttl_s: float,
                 connections: int, seed: int = 0, heartbeat: str = "http") -> None:
        if count < 1 or connections < 1 or interval_s <= 0 or ttl_s <= interval_s or heartbeat not in ("http", "udp"):
            raise ValueError("count and connections >= 1, 0 < interval_s < ttl_s, heartbeat http or udp")
        self.heartbeat = heartbeat
        self.udp_due: list[tuple[float, int]] = []  # UDP: (when, agent) of every registered agent
        self.udp_leases: dict[int, tuple[int, bytes, tuple[str, int]]] = {}  # agent -> lease, key, address
        self.fallback: list[deque[tuple[int, float]]] = [deque() for _ in range(max(1, min(connections, count)))]
        self._udp: _Acks | None = None
        self.next_counter = 0  # the last datagram counter sent
        self.targets = [Target.parse(u) for u in urls]
        self.first, self.count, self.probes = first, count, probes
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.connections = min(connections, count)
        self.urgent_s = (ttl_s - interval_s) / 2
        self.rng = random.Random(seed * 1_000_003 + first)
        self.registered = 0
        self.register_failed = 0
        self.register_started = time.monotonic()
        self.register_s: float | None = None
        self.all_registered = asyncio.Event()
        self.registering_closed = False  # gave up on the agents not registered yet
        self.dropping = False  # the probes' heartbeats stopped
        self.window = Window()
        self.sent: dict[str, float] = {}  # probe -> wall time of its last heartbeat (or registration) sent
        self.acked: dict[str, float] = {}  # probe -> wall time of its last success acknowledged
        self._stop = asyncio.Event()

    def is_probe(self, i: int) -> bool:
        return i < self.probes

    async def run(self) -> None:
        """Until ``stop`` (or ``MAX_STEPS_PER_CONNECTION`` steps per connection)."""
        loops = [self._connection(c) for c in range(self.connections)]
        if self.heartbeat == "udp":
            loops.append(self._datagrams())
        await asyncio.gather(*loops)

    def stop(self) -> None:
        self._stop.set()

    async def _connection(self, c: int) -> None:
        target = self.targets[c % len(self.targets)]
        loop = asyncio.get_running_loop()
        pending = list(range(self.first + c, self.first + self.count, self.connections))
        pending.reverse()  # popped from the end: lowest first
        attempts: Counter[int] = Counter()
        due: list[tuple[float, int]] = []
        beats = {i: _post(target, f"/v1/agents/{agent_id(i)}/heartbeat", {}) for i in pending}
        connection: Connection | None = None
        try:
            for _ in range(MAX_STEPS_PER_CONNECTION):
                if self._stop.is_set():
                    return
                now = loop.time()
                # Registering goes first, so N agents are in before the leader
                # saturates on their heartbeats; a beat overdue by ``urgent_s``
                # goes before it, so no lease runs out while the rest register.
                if self.fallback[c]:  # a beat no node acked over UDP: over HTTP (rare, so first)
                    i, late_s = self.fallback[c].popleft()
                    if not (self.dropping and self.is_probe(i)):
                        connection, status = await self._exchange(
                            connection, target, _post(target, f"/v1/agents/{agent_id(i)}/heartbeat", {}), i, late_s)
                elif due and due[0][0] <= now and (not pending or now - due[0][0] >= self.urgent_s):
                    when, i = heapq.heappop(due)
                    if self.dropping and self.is_probe(i):
                        continue
                    connection, status = await self._exchange(connection, target, beats[i], i, now - when)
                    heapq.heappush(due, (when + self.interval_s * (1 + self.rng.uniform(-JITTER, JITTER)), i))
                elif pending and not self.registering_closed:
                    i = pending.pop()
                    body = {"id": agent_id(i), "type": PROBE_TYPE if self.is_probe(i) else AGENT_TYPE,
                            "ttl_s": self.ttl_s}
                    connection, status = await self._exchange(connection, target, _post(target, "/v1/agents", body),
                                                              i, None)
                    if status == 201 and self.heartbeat == "udp":
                        self._registered()
                        self._lease_of(i, target, connection)
                    elif status == 201:
                        self._registered()
                        heapq.heappush(due, (loop.time() + self.rng.uniform(0, self.interval_s), i))
                    else:
                        attempts[i] += 1
                        if attempts[i] < REGISTER_ATTEMPTS:
                            pending.insert(0, i)
                        else:
                            self.register_failed += 1
                            self._registered()
                else:
                    try:  # nothing due: wait for the next beat (UDP: a fallback), or the stop
                        wait_s = self.interval_s if self.heartbeat == "http" else 0.05
                        async with asyncio.timeout(max(0.0, due[0][0] - now) if due else wait_s):
                            await self._stop.wait()
                    except TimeoutError:
                        pass
        finally:
            if connection is not None:
                connection.close()

    def _registered(self) -> None:
        self.registered += 1
        if self.registered == self.count:
            self.register_s = time.monotonic() - self.register_started
            self.all_registered.set()

    async def _exchange(self, connection: Connection | None, target: Target, request: bytes, i: int,
                        late_s: float | None) -> tuple[Connection | None, int]:
        """One request (a heartbeat when ``late_s`` is given): its status, 0
        on a connection error; counted in the window."""
        loop = asyncio.get_running_loop()
        window = self.window
        probe = self.is_probe(i)
        started = time.perf_counter()
        sent_at = time.time()
        deadline = loop.time() + REQUEST_TIMEOUT_S
        try:
            if connection is None or not connection.usable:
                connection = None
                connection = await connect(target, deadline)
            if probe:
                self.sent[agent_id(i)] = sent_at
            status = await connection.exchange(request, deadline, keep_body=late_s is None and self.heartbeat == "udp")
        except (OSError, ResponseError) as exc:  # TimeoutError is an OSError
            window.errors[type(exc).__name__] += 1
            if connection is not None:
                connection.drop()
            return None, 0
        ok = 201 if late_s is None else 200
        if status != ok:
            window.errors[f"{'register' if late_s is None else 'heartbeat'} {status}"] += 1
            return connection, status
        if probe:
            self.acked[agent_id(i)] = time.time()
        if late_s is not None:
            window.beats += 1
            if len(window.latencies_us) < MAX_SAMPLES:
                window.latencies_us.append(int((time.perf_counter() - started) * 1e6))
                window.late_ms.append(int(late_s * 1000))
        return connection, status

    # -- over UDP -----------------------------------------------------------------------------

    def _lease_of(self, i: int, target: Target, connection: Connection | None) -> None:
        """Agent ``i`` registered: its lease and datagram key from the answer; its first beat in the interval."""
        try:
            answer = json.loads(connection.body if connection is not None else b"")
            grant = answer["heartbeat_udp"]
            lease = (answer["lease_id"], bytes.fromhex(grant["key"]), (target.host, target.port))
        except (ValueError, KeyError, TypeError):
            self.window.errors["register: no heartbeat_udp in the answer"] += 1
            return
        self.udp_leases[i] = lease
        heapq.heappush(self.udp_due, (asyncio.get_running_loop().time() + self.rng.uniform(0, self.interval_s), i))

    async def _datagrams(self) -> None:
        """Send every due beat as a datagram, until ``stop``; acks are counted by ``_Acks``."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        sock.bind(("127.0.0.1", 0))
        acks = _Acks(self, sock)
        # Drained by a reader: asyncio's datagram transport takes one datagram per loop iteration.
        loop.add_reader(sock.fileno(), acks.drain)
        self._udp = acks
        self.next_counter = time.time_ns() // 1000  # rises per lease: one counter for the whole process
        due = self.udp_due
        try:
            for _ in range(MAX_STEPS_PER_CONNECTION):
                if self._stop.is_set():
                    return
                now = loop.time()
                sent = 0
                # as over HTTP: while agents still register, only a beat overdue by ``urgent_s`` goes
                registering = not self.all_registered.is_set() and not self.registering_closed
                send_until = now - self.urgent_s if registering else now
                while due and due[0][0] <= send_until and sent < UDP_SEND_BATCH:
                    when, i = heapq.heappop(due)
                    heapq.heappush(due, (when + self.interval_s * (1 + self.rng.uniform(-JITTER, JITTER)), i))
                    if self.dropping and self.is_probe(i):
                        continue
                    if i not in self.udp_leases:  # told its lease is gone
                        continue
                    lease_id, key, address = self.udp_leases[i]
                    self.next_counter += 1
                    acks.send(key, datagram.Beat(lease_id, self.next_counter), address, i, now - when)
                    sent += 1
                for key, beat, address, i, late_s in acks.expire(now):  # once more, to the next node
                    self.next_counter += 1
                    acks.send(key, datagram.Beat(beat.lease_id, self.next_counter), address, i, late_s, retry=True)
                if sent >= UDP_SEND_BATCH:
                    await asyncio.sleep(0)
                    continue
                try:  # nothing due: wait for the next beat (at most 20 ms, so losses are counted), or the stop
                    async with asyncio.timeout(min(0.02, max(0.0, due[0][0] - send_until)) if due else 0.02):
                        await self._stop.wait()
                except TimeoutError:
                    pass
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()

    # -- the commands ----------------------------------------------------------------------

    def start_window(self) -> dict[str, Any]:
        self.window = Window()
        return {}

    def report(self) -> dict[str, Any]:
        w = self.window
        return {"beats": w.beats, "latencies_us": w.latencies_us, "late_ms": w.late_ms, "errors": dict(w.errors),
                "elapsed_s": time.monotonic() - w.started, "cpu_s": cpu_s() - w.cpu}

    def drop_probes(self) -> dict[str, Any]:
        self.dropping = True
        return {}

    def probe_times(self) -> dict[str, Any]:
        return {"sent": self.sent, "acked": self.acked}


class _Acks:
    """A generator process's datagram socket: sends beats, matches each
    verified ack to its beat (by lease and counter), and counts a beat not
    acked within ``UDP_TIMEOUT_S`` lost. Loop-only."""

    def __init__(self, swarm: Swarm, sock: socket.socket) -> None:
        self.swarm = swarm
        self.sock = sock
        # (lease, counter) -> (key, agent, perf_counter and wall time at sending, how late it was sent,
        # where to, whether it is the retry)
        self.inflight: dict[tuple[int, int], tuple[bytes, int, float, float, float, tuple[str, int], bool]] = {}
        self.order: deque[tuple[float, tuple[int, int]]] = deque()  # (loop time to give up, its key), in order
        self.addresses = [(t.host, t.port) for t in swarm.targets]

    def drain(self) -> None:
        for _ in range(UDP_SEND_BATCH):
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.swarm.window.errors[f"udp {type(exc).__name__}"] += 1
                return
            self.datagram_received(data, addr)

    def send(self, key: bytes, beat: datagram.Beat, address: tuple[str, int], i: int, late_s: float,
             retry: bool = False) -> None:
        handle = (beat.lease_id, beat.counter)
        sent_at = time.time()
        self.inflight[handle] = (key, i, time.perf_counter(), sent_at, late_s, address, retry)
        self.order.append((asyncio.get_running_loop().time() + UDP_TIMEOUT_S, handle))
        if self.swarm.is_probe(i):
            self.swarm.acked[agent_id(i)] = sent_at  # the latest it can have been renewed (see the module)
        try:
            self.sock.sendto(datagram.encode_beat(key, beat), address)
        except OSError as exc:  # the send buffer is full: counted lost when its time is up
            self.swarm.window.errors[f"udp send {type(exc).__name__}"] += 1

    def expire(self, now: float) -> list[tuple[bytes, datagram.Beat, tuple[str, int], int, float]]:
        """Count the beats given up on by ``now``; those to send once more (key, beat, next address, agent, late)."""
        order, inflight = self.order, self.inflight
        again = []
        while order and order[0][0] <= now:
            _, handle = order.popleft()
            sent = inflight.pop(handle, None)
            if sent is None:
                continue
            key, i, _, _, late_s, address, retry = sent
            self.swarm.window.errors["udp lost"] += 1
            again += self._again(key, handle, i, late_s, address, retry)
        return again

    def _again(self, key: bytes, handle: tuple[int, int], i: int, late_s: float, address: tuple[str, int],
               retry: bool) -> list[tuple[bytes, datagram.Beat, tuple[str, int], int, float]]:
        """A beat not acked OK: once more to the next node, then over HTTP (none for a dropped probe)."""
        swarm = self.swarm
        if swarm.dropping and swarm.is_probe(i):
            return []
        if retry:
            swarm.window.errors["udp fell back to http"] += 1
            swarm.fallback[(i - swarm.first) % len(swarm.fallback)].append((i, late_s))
            return []
        swarm.window.errors["udp retried"] += 1
        following = self.addresses[(self.addresses.index(address) + 1) % len(self.addresses)] \
            if address in self.addresses else address
        return [(key, datagram.Beat(handle[0], handle[1]), following, i, late_s)]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) != datagram.SIZE:
            return
        handle = (int.from_bytes(data[2:10], "big"), int.from_bytes(data[10:18], "big"))
        sent = self.inflight.get(handle)
        if sent is None:
            return
        key, i, started, sent_at, late_s, address, retry = sent
        ack = datagram.decode_ack(key, data)
        if ack is None:
            return
        del self.inflight[handle]
        window = self.swarm.window
        if ack.status != datagram.OK:
            window.errors[f"udp {('ok', 'unknown lease', 'not ready')[ack.status]}"] += 1
            if ack.status == datagram.UNKNOWN_LEASE:
                self.swarm.udp_leases.pop(i, None)  # expired: this agent's beats stop (it would register again)
            if ack.status == datagram.NOT_READY:
                for again in self._again(key, handle, i, late_s, address, retry):
                    self.swarm.next_counter += 1
                    self.send(again[0], datagram.Beat(again[1].lease_id, self.swarm.next_counter), again[2], again[3],
                              again[4], retry=True)
            return
        if self.swarm.is_probe(i):
            probe = agent_id(i)
            self.swarm.sent[probe] = max(self.swarm.sent.get(probe, 0.0), sent_at)  # renewed by then for sure
            self.swarm.acked[probe] = max(self.swarm.acked.get(probe, 0.0), time.time())
        window.beats += 1
        if len(window.latencies_us) < MAX_SAMPLES:
            window.latencies_us.append(int((time.perf_counter() - started) * 1e6))
            window.late_ms.append(int(late_s * 1000))


async def handle(swarm: Swarm, command: str) -> dict[str, Any]:
    """One driver command on ``swarm``: ``registered SECONDS`` (waits for
    every registration, at most SECONDS; then stops registering, and the
    answer says how many are in), ``window``, ``report``,
    ``drop``, ``probes``, ``stop``."""
    if command.startswith("registered"):
        try:
            async with asyncio.timeout(float(command.partition(" ")[2] or COMMAND_TIMEOUT_S)):
                await swarm.all_registered.wait()
        except TimeoutError:
            swarm.registering_closed = True
            swarm.register_s = time.monotonic() - swarm.register_started
            return {"registered": swarm.registered - swarm.register_failed, "failed": swarm.register_failed,
                    "seconds": swarm.register_s}
        return {"registered": swarm.registered - swarm.register_failed, "failed": swarm.register_failed,
                "seconds": swarm.register_s}
    if command == "window":
        return swarm.start_window()
    if command == "report":
        return swarm.report()
    if command == "drop":
        return swarm.drop_probes()
    if command == "probes":
        return swarm.probe_times()
    if command == "stop":
        swarm.stop()
        return {}
    raise ValueError(f"unknown command {command!r}")


class Driver(Protocol):
    async def call(self, command: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class LocalDriver:
    """A ``Swarm`` on this process's loop."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.task = asyncio.get_running_loop().create_task(swarm.run())

    async def call(self, command: str) -> dict[str, Any]:
        return await handle(self.swarm, command)

    async def close(self) -> None:
        self.swarm.stop()
        async with asyncio.timeout(REQUEST_TIMEOUT_S + 5):
            await self.task


class ProcessDriver:
    """A ``Swarm`` in a child process (``python -m bench.agents --worker``),
    one command line in, one JSON line out."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        self.child = child

    @classmethod
    async def start(cls, urls: list[str], first: int, count: int, args: argparse.Namespace) -> ProcessDriver:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.agents", "--worker", "--urls", ",".join(urls), "--first", str(first),
            "--count", str(count), "--probes", str(args.probes), "--interval-s", str(args.interval_s),
            "--ttl-s", str(args.ttl_s), "--connections", str(args.connections), "--seed", str(args.seed),
            "--heartbeat", args.heartbeat,
            cwd=Path(__file__).resolve().parent.parent, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=PIPE_LIMIT_BYTES)
        return cls(child)

    @property
    def pid(self) -> int:
        return self.child.pid

    async def call(self, command: str) -> dict[str, Any]:
        if self.child.stdin is None or self.child.stdout is None:
            raise RuntimeError("the generator's pipes are closed")
        self.child.stdin.write(command.encode() + b"\n")
        async with asyncio.timeout(COMMAND_TIMEOUT_S + 5):
            await self.child.stdin.drain()
            line = await self.child.stdout.readline()
        if not line:
            raise RuntimeError(f"generator {self.child.pid} ended (status {self.child.returncode})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"generator {self.child.pid}: {answer['error']}")
        return answer

    async def close(self) -> None:
        """SIGTERM to the child by its PID (it may be busy with a command and
        not read ``stop``); SIGKILL when it is still there after 10 s."""
        if self.child.returncode is not None:
            return
        self.child.terminate()
        try:
            async with asyncio.timeout(10):
                await self.child.wait()
        except TimeoutError:
            self.child.kill()
            await self.child.wait()


async def worker(args: argparse.Namespace) -> None:
    """The child's side of ``ProcessDriver``: commands from stdin until ``stop`` or EOF."""
    loop = asyncio.get_running_loop()
    swarm = Swarm(args.urls.split(","), args.first, args.count, args.probes, interval_s=args.interval_s,
                  ttl_s=args.ttl_s, connections=args.connections, seed=args.seed, heartbeat=args.heartbeat)
    task = loop.create_task(swarm.run())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(1000):
        line = (await reader.readline()).decode().strip()
        command = line or "stop"
        try:
            answer = await handle(swarm, command)
        except (ValueError, TimeoutError) as exc:
            answer = {"error": f"{command}: {exc!r}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if command == "stop":
            break
    swarm.stop()
    async with asyncio.timeout(REQUEST_TIMEOUT_S + 5):
        await task


# -- one N -----------------------------------------------------------------------------------------

def rss_mb(pid: int | None) -> float:
    """Resident memory of ``pid`` in MiB (nan when it is gone)."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


READ_ATTEMPTS = 40  # a 503 or 504 (a busy leader's read barrier, an election) is asked again, 0.5 s apart


async def agents_of(session: aiohttp.ClientSession, url: str, agent_type: str) -> set[str]:
    """The ids of the registered agents of ``agent_type`` (a linearizable
    read; a 503 or 504 is retried, at most ``READ_ATTEMPTS`` times)."""
    status = 0
    for _ in range(READ_ATTEMPTS):
        async with session.get(f"{url}/v1/agents", params={"type": agent_type},
                               timeout=aiohttp.ClientTimeout(total=60)) as response:
            status = response.status
            if status == 200:
                return {a["id"] for a in (await response.json())["agents"]}
        if status not in (503, 504):
            break
        await asyncio.sleep(0.5)
    raise RuntimeError(f"GET /v1/agents?type={agent_type}: {status}")


async def start_drivers(urls: list[str], n: int, args: argparse.Namespace) -> list[Any]:
    """``args.procs`` generators sharing agents 0 .. n-1 in consecutive slices; 1: on this loop."""
    if args.procs == 1:
        return [LocalDriver(Swarm(urls, 0, n, args.probes, interval_s=args.interval_s, ttl_s=args.ttl_s,
                                  connections=args.connections, seed=args.seed, heartbeat=args.heartbeat))]
    shares = [n // args.procs + (1 if i < n % args.procs else 0) for i in range(args.procs)]
    drivers: list[Any] = []
    first = 0
    for share in shares:
        drivers.append(await ProcessDriver.start(urls, first, share, args))
        first += share
    return drivers


async def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One N on a fresh cluster: the row of the table (see the module's steps)."""
    with local_cluster("coord-bench-agents-", args.base_port) as cluster:
        leader = cluster.wait_leader(30)
        followers = [m for m in cluster.members if m != leader]
        url = cluster.url(leader)
        urls = {"leader": [url], "all": [cluster.url(m) for m in [leader, *followers]],
                "followers": [cluster.url(m) for m in followers]}[args.via]
        pids = {m: cluster.pid(m) for m in cluster.members}
        drivers = await start_drivers(urls, n, args)
        try:
            node_urls = [cluster.url(m) for m in cluster.members]
            return await _measure(n, args, drivers, url, leader, followers, pids, node_urls)
        finally:
            await asyncio.gather(*(d.close() for d in drivers), return_exceptions=True)


async def _measure(n: int, args: argparse.Namespace, drivers: list[Any], url: str, leader: str,
                   followers: list[str], pids: dict[str, int | None], node_urls: list[str]) -> dict[str, Any]:
    local = args.procs == 1
    registered = await asyncio.gather(*(d.call(f"registered {args.register_s}") for d in drivers))
    row: dict[str, Any] = {"agents": n, "heartbeat": args.heartbeat, "procs": args.procs,
                           "connections": args.connections * args.procs,
                           "registered": sum(r["registered"] for r in registered),
                           "register_failed": sum(r["failed"] for r in registered),
                           "register_s": max(r["seconds"] or 0.0 for r in registered)}
    await asyncio.sleep(args.interval_s)  # warm-up: every agent is on its schedule
    for d in drivers:
        await d.call("window")
    node_cpu = {m: processes_cpu_s([pids[m]]) for m in pids}
    own_cpu = cpu_s()
    heard_before = await liveness_of(url)
    udp_before = [(await liveness_of(u)).get("udp") or {} for u in node_urls]
    started = time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - started
    heard_after = await liveness_of(url)
    udp_after = [(await liveness_of(u)).get("udp") or {} for u in node_urls]
    cpu = {m: (processes_cpu_s([pids[m]]) - node_cpu[m]) / elapsed for m in pids}
    own = (cpu_s() - own_cpu) / elapsed
    reports = [await d.call("report") for d in drivers]
    latencies = [v for r in reports for v in r["latencies_us"]]
    late = [v for r in reports for v in r["late_ms"]]
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    row.update({
        "seconds": elapsed, "intended_per_s": row["registered"] / args.interval_s,
        "achieved_per_s": sum(r["beats"] for r in reports) / elapsed,
        "p50_ms": pct(latencies, 0.5) / 1000, "p99_ms": pct(latencies, 0.99) / 1000,
        "late_p99_ms": pct(late, 0.99), "late_max_ms": max(late, default=0),
        "errors": dict(errors),
        "leader_cpu": cpu[leader], "follower_cpu": [cpu[m] for m in followers],
        # A local generator is this process (its CPU includes the parent's bookkeeping).
        "generator_cpu": own if local else sum(r["cpu_s"] for r in reports) / elapsed,
        "leader_rss_mb": rss_mb(pids[leader]), "follower_rss_mb": [rss_mb(pids[m]) for m in followers],
        # what the leader answered itself, and the newer heard times it merged from gossip, per second
        "leader_answered_per_s": (heard_after.get("heartbeats_answered", 0)
                                  - heard_before.get("heartbeats_answered", 0)) / elapsed,
        "leader_merged_per_s": (heard_after.get("heard_gossip", 0) - heard_before.get("heard_gossip", 0)) / elapsed,
        "leader_suspected": heard_after.get("suspected", 0),
    })
    # what the nodes' UDP listeners saw, per second, all nodes together (received: every datagram that
    # reached the process, so the generator's sent minus this was lost in the kernel's buffers)
    row["nodes_udp_per_s"] = {k: sum(a.get(k, 0) - b.get(k, 0) for a, b in zip(udp_after, udp_before, strict=True))
                              / elapsed for k in ("received", "ok", "not_ready", "unknown_lease", "refused",
                                                  "replayed", "rate_dropped")}
    # what one heartbeat costs the cluster: every node's CPU over the beats acknowledged
    row["node_cpu_us_per_beat"] = (sum(cpu.values()) / row["achieved_per_s"] * 1e6 if row["achieved_per_s"]
                                   else float("nan"))
    row["expiry"] = await check_expiry(n, row["registered"], args, drivers, url)
    return row


async def leases_of(session: aiohttp.ClientSession, url: str, agent_type: str) -> dict[str, float | None]:
    """``lease_remaining_s`` of every agent of ``agent_type`` as the node (the leader) keeps it; {} on failure."""
    try:
        async with session.get(f"{url}/v1/agents", params={"type": agent_type, "consistency": "stale"},
                               timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as r:
            return {a["id"]: a.get("lease_remaining_s") for a in (await r.json())["agents"]}
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return {}


async def status_of(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The node's ``/v1/status``; {} if it does not answer."""
    try:
        async with session.get(f"{url}/v1/status", timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as r:
            return await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def liveness_of(url: str) -> dict[str, Any]:
    """The node's heartbeat counters (``/v1/status`` ``liveness``); {} if it does not answer."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session, \
                session.get(f"{url}/v1/status") as response:
            return (await response.json()).get("liveness") or {}
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def check_expiry(n: int, registered: int, args: argparse.Namespace, drivers: list[Any], url: str
                       ) -> dict[str, Any]:
    """Stop the probes' heartbeats; every probe must be gone within TTL +
    slack of its last acknowledged heartbeat (and not before TTL after its
    last sent one) while every other agent stays registered."""
    async with aiohttp.ClientSession() as session:
        before = await status_of(session, url)
        for d in drivers:
            await d.call("drop")
        dropped = time.time()
        remaining = await leases_of(session, url, PROBE_TYPE)  # the leader's lease of each probe at the drop
        gone_at: dict[str, float] = {}
        probes = {agent_id(i) for i in range(min(args.probes, n))}
        deadline = time.monotonic() + args.ttl_s + args.slack_s + 5
        polls = 0
        while time.monotonic() < deadline and len(gone_at) < len(probes):
            polls += 1
            left = await agents_of(session, url, PROBE_TYPE)
            now = time.time()
            for probe in probes - left - gone_at.keys():
                gone_at[probe] = now
            await asyncio.sleep(POLL_S)
        others = await agents_of(session, url, AGENT_TYPE)
        after = await status_of(session, url)
    times: dict[str, dict[str, float]] = {"sent": {}, "acked": {}}
    for d in drivers:
        answer = await d.call("probes")
        times["sent"].update(answer["sent"])
        times["acked"].update(answer["acked"])
    after_ack = [gone_at[p] - times["acked"][p] for p in gone_at if p in times["acked"]]
    early = [p for p in gone_at if gone_at[p] < times["sent"].get(p, dropped) + args.ttl_s]
    late = [p for p in gone_at if gone_at[p] > times["acked"].get(p, dropped) + args.ttl_s + args.slack_s]
    expected_others = registered - len(probes)
    # How much longer the leader's lease ran at the drop than the TTL after the probe's last
    # acknowledged heartbeat (about 0; more means something renewed it after that heartbeat).
    excess = [remaining[p] - (args.ttl_s - (dropped - times["acked"][p])) for p in remaining
              if p in times["acked"] and remaining[p] is not None]
    return {"probes": len(probes), "expired": len(gone_at), "never_expired": len(probes) - len(gone_at),
            "early": len(early), "late": len(late), "polls": polls,
            "after_last_ack_s": {"min": min(after_ack, default=float("nan")),
                                 "max": max(after_ack, default=float("nan"))},
            "others_registered": len(others), "others_expected": expected_others,
            # an election while probes wait gives every lease a fresh TTL from the takeover
            "lease_excess_at_drop_s": {"min": min(excess, default=float("nan")),
                                       "max": max(excess, default=float("nan"))},
            "terms": [before.get("term"), after.get("term")],
            "leaders": [before.get("leader_id"), after.get("leader_id")],
            "correct": (len(gone_at) == len(probes) and not early and not late
                        and len(others) == expected_others)}


# -- the report ---------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| agents | over | generators x connections | heartbeats/s intended | achieved | p50 ms | p99 ms "
             "| sent late p99 ms | errors | leader CPU | followers CPU | node CPU µs per heartbeat | generator CPU "
             "| RSS leader / followers MiB | leader answered / merged from gossip per s "
             "| probes expired in TTL + slack |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["expiry"]
        errors = sum(r["errors"].values())
        count = f"{r['agents']:,}" if r["registered"] == r["agents"] else f"{r['agents']:,} ({r['registered']:,} in)"
        stayed = "all stayed" if e["others_registered"] == e["others_expected"] else "NOT all stayed"
        expiry = (f"{e['expired']}/{e['probes']}, {e['after_last_ack_s']['min']:.1f} to "
                  f"{e['after_last_ack_s']['max']:.1f} s after the last ack; others "
                  f"{e['others_registered']}/{e['others_expected']} {stayed}")
        error_kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items()))
        lines.append(
            f"| {count} | {r.get('heartbeat', 'http')} | {r['procs']} x {r['connections'] // r['procs']} "
            f"| {r['intended_per_s']:.0f} "
            f"| {r['achieved_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['late_p99_ms']:.0f} "
            f"| {errors}{f' ({error_kinds})' if errors else ''} | {r['leader_cpu']:.2f} "
            f"| {' / '.join(f'{c:.2f}' for c in r['follower_cpu'])} "
            f"| {r.get('node_cpu_us_per_beat', float('nan')):.0f} "
            f"| {r['generator_cpu']:.2f} | {r['leader_rss_mb']:.0f} / "
            f"{' / '.join(f'{m:.0f}' for m in r['follower_rss_mb'])} "
            f"| {r.get('leader_answered_per_s', 0):.0f} / {r.get('leader_merged_per_s', 0):.0f} | {expiry} |")
    top = max(rows, key=lambda r: r["agents"])
    if top["agents"] < 100_000:
        verdict = "not measured (no run at 100,000)"
    else:
        verdict = ("met" if top["registered"] == top["agents"] and top["leader_cpu"] < 1.0 and top["expiry"]["correct"]
                   else "not met")
    lines += ["", f"Goal (leader < 1 core at 100,000 agents, expiry correct): **{verdict}** "
                  f"(leader {top['leader_cpu']:.2f} cores at {top['agents']:,} agents, "
                  f"{top['achieved_per_s']:.0f} of {top['intended_per_s']:.0f} heartbeats/s delivered)."]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.agents:
        row = await measure(n, args)
        print(json.dumps({k: v for k, v in row.items()}), file=sys.stderr)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    cli = parser("agents", __doc__)
    cli.add_argument("--agents", default="10000,50000,100000", help="comma-separated counts, one cluster each")
    cli.add_argument("--interval-s", type=float, default=10.0)
    cli.add_argument("--ttl-s", type=float, default=30.0)
    cli.add_argument("--seconds", type=float, default=60.0, help="the measured window per count")
    cli.add_argument("--procs", type=int, default=1, help="generator processes (1: in this process)")
    cli.add_argument("--connections", type=int, default=256, help="connections per generator process")
    cli.add_argument("--probes", type=int, default=100, help="agents whose heartbeats stop to check expiry")
    cli.add_argument("--slack-s", type=float, default=5.0, help="how long after TTL a probe may take to expire")
    cli.add_argument("--via", choices=("leader", "all", "followers"), default="leader",
                     help="heartbeat the leader, or spread the connections over all nodes or over the followers "
                          "(which answer from memory and gossip to the leader)")
    cli.add_argument("--register-s", type=float, default=120.0,
                     help="stop registering after this long and measure the agents that are in")
    cli.add_argument("--heartbeat", choices=("udp", "http"), default="udp",
                     help="heartbeat with datagrams to the nodes' UDP ports (default) or HTTP requests; "
                          "registering is HTTP either way")
    cli.add_argument("--seed", type=int, default=1)
    add_base_port(cli, 27600)
    cli.add_argument("--out", help="write the rows as JSON to this file")
    cli.add_argument("--doc", help="also write the table into this markdown file")
    cli.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    cli.add_argument("--urls", help=argparse.SUPPRESS)
    cli.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    cli.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = cli.parse_args(argv)
    if args.worker:
        asyncio.run(worker(args))
        return 0
    try:
        args.agents = [int(a) for a in args.agents.split(",") if a.strip()]
    except ValueError:
        cli.error("--agents: comma-separated integers")
    if not args.agents or not all(1 <= a <= 100_000 for a in args.agents):
        cli.error("--agents: 1..100000 each (the registry holds at most 100,000)")
    if not (0 < args.interval_s < args.ttl_s <= 600 and 0 < args.seconds <= 600 and 1 <= args.procs <= 8
            and 1 <= args.connections <= 2048 and 0 <= args.probes <= min(args.agents) and args.slack_s > 0
            and 0 < args.register_s <= COMMAND_TIMEOUT_S):
        cli.error("need 0 < interval < ttl <= 600, seconds <= 600, procs 1..8, connections 1..2048, "
                  "probes <= the smallest count")
    with interruptible("the nodes and generators"):
        rows = asyncio.run(run(args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python -m bench.agents", *(argv if argv is not None else sys.argv[1:])])
    header = (f"Three nodes and {args.procs} generator process(es) on one machine ({machine()}), durability fsync, "
              f"heartbeat over {args.heartbeat.upper()} every {args.interval_s:g} s (± {JITTER:.0%}), "
              f"TTL {args.ttl_s:g} s, "
              f"{args.seconds:g} s measured after one interval of warm-up, heartbeats to "
              f"{ {'leader': 'the leader', 'all': 'all nodes', 'followers': 'the followers'}[args.via]}, "
              "CPU in cores (user + system from /proc), "
              f"`{command}`, {time.strftime('%Y-%m-%d')}.\n\n")
    publish(header + table(rows, args), args.doc, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
