"""A tiny synchronous driver for unit tests of ``Replica``: FIFO delivery,
no clock but the one the test moves, and a filter to lose messages on
purpose. The seeded, delayed network lives in ``cluster.pbft.sim``."""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable

from cluster.pbft.messages import Envelope, Message, Request, decode_message, seal, sign_request
from cluster.pbft.replica import (
    Broadcast,
    ClientReply,
    Effect,
    Execute,
    Replica,
    Send,
    StateTransferred,
    ViewChanged,
)
from cluster.pbft.sim import CounterApp, client_keys, replica_keys

CLIENT = "alice"
CLIENT_KEYS = client_keys(CLIENT)

Filter = Callable[[int, int, Envelope], bool]  # (src, dst, envelope) -> deliver?


class Harness:
    def __init__(self, n: int = 4, **options: object) -> None:
        self.n = n
        self.keys = [replica_keys(i) for i in range(n)]
        self.public_keys = [k.public_key for k in self.keys]
        self.apps = [CounterApp() for _ in range(n)]
        self.replicas = [
            Replica(i, n, self.keys[i], self.public_keys, app=self.apps[i],
                    client_keys={CLIENT: CLIENT_KEYS.public_key}, **options)  # type: ignore[arg-type]
            for i in range(n)
        ]
        self.now = 0
        self.queue: deque[tuple[int, int, Envelope]] = deque()
        self.replies: list[tuple[int, Envelope]] = []
        self.executed: list[list[Execute]] = [[] for _ in range(n)]
        self.transfers: list[list[StateTransferred]] = [[] for _ in range(n)]
        self.views: list[list[tuple[int, ViewChanged]]] = [[] for _ in range(n)]  # (now, event)
        self.down: set[int] = set()
        self.deliver: Filter = lambda src, dst, env: True
        self.timestamp = 0

    def request(self, operation: bytes, timestamp: int | None = None) -> Request:
        if timestamp is None:
            self.timestamp += 1
            timestamp = self.timestamp
        return sign_request(CLIENT_KEYS, CLIENT, timestamp, operation)

    def sign(self, sender: int, message: Message) -> Envelope:
        return seal(self.keys[sender], sender, message)

    def absorb(self, src: int, effects: list[Effect]) -> list[Effect]:
        for effect in effects:
            if isinstance(effect, Send):
                self.queue.append((src, effect.to, effect.envelope))
            elif isinstance(effect, Broadcast):
                self.queue.extend((src, j, effect.envelope) for j in range(self.n) if j != src)
            elif isinstance(effect, ClientReply):
                self.replies.append((src, effect.envelope))
            elif isinstance(effect, Execute):
                self.executed[src].append(effect)
            elif isinstance(effect, StateTransferred):
                self.transfers[src].append(effect)
            elif isinstance(effect, ViewChanged):
                self.views[src].append((self.now, effect))
        return effects

    def submit(self, replica: int, request: Request) -> list[Effect]:
        return self.absorb(replica, self.replicas[replica].submit(request, self.now))

    def run(self, max_messages: int = 100_000) -> int:
        """Deliver until quiet; returns how many messages were delivered."""
        delivered = 0
        while self.queue and delivered < max_messages:
            src, dst, env = self.queue.popleft()
            if src in self.down or dst in self.down or not self.deliver(src, dst, env):
                continue
            delivered += 1
            self.absorb(dst, self.replicas[dst].receive(env, self.now))
        return delivered

    def advance(self, ms: int, step_ms: int = 10) -> None:
        """Move the clock, ticking every replica that is up and delivering between ticks."""
        end = self.now + ms
        while self.now < end:
            self.now += step_ms
            for i, replica in enumerate(self.replicas):
                if i not in self.down:
                    self.absorb(i, replica.tick(self.now))
            self.run()

    def history(self, i: int) -> list[tuple[str, int, bytes]]:
        return self.apps[i].ordered()

    def reply_results(self, timestamp: int) -> dict[int, bytes]:
        out = {}
        for src, env in self.replies:
            reply = decode_message(env.body)
            if getattr(reply, "timestamp", None) == timestamp:
                out[src] = reply.result  # type: ignore[union-attr]
        return out


def kind(env: Envelope) -> str:
    return type(decode_message(env.body)).__name__


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free at the time of the call."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
