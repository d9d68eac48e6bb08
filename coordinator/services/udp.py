"""Heartbeats over UDP (issue 23, part 3): one datagram per heartbeat, no
connection, no HTTP parsing, answered from memory by any node exactly as an
HTTP heartbeat is (``CoordinatorNode.renew_here``).

The datagram and its MAC are ``coordinator.datagram``'s. Per datagram, in
this order, each step dropping what fails it *without a reply*:

1. the global rate bound (``rate_max`` per second, a token bucket of one
   second's worth): a flood costs bounded CPU;
2. size, version and health byte (``datagram.peek_lease``);
3. the MAC under the lease's key, derived from the heartbeat key of the
   cluster secret and of every accepted secret (``accept_secret_file``): a
   stranger learns nothing, not even whether the lease exists;
4. the counter: not above the highest this node saw for the lease (here or
   by gossip, ``HeardTable.counter_fresh``) is a replay.

What passes gets a reply of the request's size: ``OK`` (renewed, or
recorded by a follower that may vouch for the lease), ``UNKNOWN_LEASE`` (the
lease is not the agent's current one, or no agent holds it: register
again), ``NOT_READY`` (this node cannot vouch now: a follower without fresh
word from the leader, a leader taking over: try another node). A datagram
cannot be forwarded to the leader as an HTTP heartbeat is; the client moves
on instead. A health byte that differs from the agent's recorded health
proposes ``agent.health`` in the background (one in flight per agent, at
most ``HEALTH_INFLIGHT_MAX`` in all; the ack does not wait for it).

Loop thread only: the socket is read by a reader callback on the loop, up
to ``DRAIN_MAX`` datagrams per wakeup (``datagram_received`` takes one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from coordinator import datagram
from coordinator.ports import Clock
from coordinator.services.liveness import HeardTable

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 4 << 20  # asked of the kernel (capped by net.core.rmem_max)
HEALTH_INFLIGHT_MAX = 256
# Datagrams read per wakeup of the loop. asyncio's datagram transport reads one per
# loop iteration: on a busy loop (registrations, gossip, Raft callbacks) that capped a
# node at about a thousand a second while the kernel dropped the rest
# (RcvbufErrors); draining the socket takes what is there, a bounded batch at a time.
DRAIN_MAX = 512
DATAGRAM_READ_BYTES = 2048  # anything longer is cut to this, and then refused for its size


class ReplySender(Protocol):
    """Where replies go: the socket (``_SocketSender``) or, in tests, a recorder."""

    def sendto(self, data: bytes, addr: Any) -> None: ...

    def close(self) -> None: ...


class _SocketSender:
    """Replies straight on the socket (non-blocking; a reply the kernel cannot take now is dropped)."""

    def __init__(self, sock: socket.socket, counts: Counter[str]) -> None:
        self.sock = sock
        self.counts = counts

    def sendto(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.counts["replies_dropped"] += 1

    def close(self) -> None:
        self.sock.close()


class HeartbeatDatagrams:
    def __init__(self, heartbeat_key: bytes, clock: Clock, table: HeardTable, *,
                 agent_by_lease: Callable[[int], Any], renew: Callable[[Any, int], int],
                 report_health: Callable[[str, str], Awaitable[Any]],
                 accepted_keys: tuple[bytes, ...] = (), rate_max: int = 30_000) -> None:
        """``heartbeat_key``: ``crypto.KEY_HEARTBEAT`` of the cluster secret
        (``accepted_keys``: of the secrets also accepted). ``agent_by_lease``:
        the agent whose current lease has that id, or None. ``renew(agent,
        counter)``: answer the heartbeat from memory, a ``datagram`` status.
        ``report_health(agent id, health)``: propose the agent's reported health."""
        self.keys = (heartbeat_key, *accepted_keys)
        self.clock = clock
        self.table = table
        self.agent_by_lease = agent_by_lease
        self.renew = renew
        self.report_health = report_health
        self.rate_max = rate_max
        self.address: str | None = None  # host:port it listens on, once started
        self.counts: Counter[str] = Counter()
        self._tokens = float(rate_max)
        self._refilled = clock.monotonic()
        self._sender: ReplySender | None = None
        self._sock: socket.socket | None = None
        self._health: dict[str, asyncio.Task[Any]] = {}

    def lease_key(self, lease_id: int) -> bytes:
        """The key given to whoever registered ``lease_id`` (the current secret's)."""
        return datagram.lease_key(self.keys[0], lease_id)

    async def start(self, host: str, port: int) -> None:
        """Bind ``host:port`` (``OSError`` when it cannot) and read it on the running loop."""
        loop = asyncio.get_running_loop()
        family, _, _, _, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM))[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
            except OSError as exc:
                log.debug("heartbeat datagrams: receive buffer not set: %s", exc)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.attach(_SocketSender(sock, self.counts))
        loop.add_reader(sock.fileno(), self._drain)
        self.address = f"{host}:{sock.getsockname()[1]}"

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(DRAIN_MAX):
            try:
                data, addr = sock.recvfrom(DATAGRAM_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counts["socket_errors"] += 1
                return
            self.datagram_received(data, addr)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # the loop may be closing
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        for task in self._health.values():
            task.cancel()

    def attach(self, sender: ReplySender) -> None:
        """Send replies through ``sender`` (``start`` attaches the socket)."""
        self._sender = sender

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.counts["received"] += 1
        if not self._take_token():
            self.counts["rate_dropped"] += 1
            return
        lease_id = datagram.peek_lease(data)
        if lease_id is None:
            self.counts["refused"] += 1
            return
        keys = tuple(datagram.lease_key(k, lease_id) for k in self.keys)
        beat = datagram.decode_beat(keys, data)
        if beat is None:
            self.counts["refused"] += 1
            return
        key = keys[0]
        agent = self.agent_by_lease(lease_id)
        if agent is None:
            self._reply(key, beat, datagram.UNKNOWN_LEASE, addr)
            return
        if not self.table.counter_fresh(agent.id, lease_id, beat.counter):
            self.counts["replayed"] += 1
            return
        status = self.renew(agent, beat.counter)
        self.table.note_counter(agent.id, lease_id, beat.counter)
        if status == datagram.OK and beat.health is not None and beat.health != agent.health:
            self._report_health(agent.id, beat.health)
        self._reply(key, beat, status, addr)

    def _reply(self, key: bytes, beat: datagram.Beat, status: int, addr: Any) -> None:
        self.counts[("ok", "unknown_lease", "not_ready")[status]] += 1
        if self._sender is not None:
            self._sender.sendto(datagram.encode_ack(key, datagram.Ack(beat.lease_id, beat.counter, status)), addr)

    def _take_token(self) -> bool:
        now = self.clock.monotonic()
        self._tokens = min(float(self.rate_max), self._tokens + (now - self._refilled) * self.rate_max)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _report_health(self, agent_id: str, health: str) -> None:
        if agent_id in self._health or len(self._health) >= HEALTH_INFLIGHT_MAX:
            return
        task = asyncio.get_running_loop().create_task(self._propose_health(agent_id, health))
        self._health[agent_id] = task

    async def _propose_health(self, agent_id: str, health: str) -> None:
        try:
            await self.report_health(agent_id, health)
        except Exception as exc:  # no leader, a timeout: the agent's next datagram says it again
            log.debug("reported health of an agent not proposed: %s", type(exc).__name__)
        finally:
            self._health.pop(agent_id, None)

    def status(self) -> dict[str, Any]:
        return {"address": self.address, "rate_max": self.rate_max, **{k: self.counts[k] for k in (
            "received", "ok", "unknown_lease", "not_ready", "refused", "replayed", "rate_dropped", "socket_errors",
            "replies_dropped")}}
