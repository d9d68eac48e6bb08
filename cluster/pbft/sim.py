"""A deterministic, single-threaded simulation of a PBFT cluster.

Everything that varies comes from ``SimConfig.seed``: one ``random.Random``
chooses each message's delay, whether it is dropped or duplicated (until
``heal_at_ms``), and nothing else. Time is virtual (milliseconds); events run
in (time, insertion order), so a run replays exactly from its seed. Keys are
derived from fixed seeds and Ed25519 signatures are deterministic, so the
bytes on the wire replay too (``Simulation.trace_digest``).

Pieces:

- ``CounterApp``: the toy state machine (a counter with its whole history).
- ``SimClient``: sends a request to the primary it believes in, broadcasts it
  to every replica on each retry (OSDI 4.1), and accepts a result only when
  f+1 replicas sent the same one in validly signed replies.
- Nodes (``cluster.pbft.faults``, re-exported here): ``CorrectNode`` and
  the Byzantine ones, ``SilentNode``, ``StoppingNode``, ``EquivocatingNode``,
  ``ForgerNode`` and, beyond the promise of PBFT (it needs f+1 colluders),
  ``SplitBrainNode``.
- ``Simulation``: wires n nodes, clients and a faulty network; checks
  safety (identical prefixes of correct replicas' histories, ``Execute``
  without gaps) and the clients' answers.

Not thread-safe; meant for tests and experiments.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.pbft.errors import MalformedMessage
from cluster.pbft.faults import (
    CorrectNode,
    EquivocatingNode,
    ForgerNode,
    Node,
    NodeContext,
    NodeEffect,
    RawSend,
    SilentNode,
    SplitBrainNode,
    StoppingNode,
    seal_raw,
)
from cluster.pbft.messages import (
    Envelope,
    Reply,
    Request,
    decode_message,
    sign_request,
    verify_envelope,
)
from cluster.pbft.replica import (
    Broadcast,
    ClientReply,
    Execute,
    FetchingState,
    Replica,
    Send,
    StateTransferred,
    ViewChanged,
)
from coordinator.codec import decode_record, encode_record
from coordinator.crypto import AgentKeys

# -- the toy state machine ----------------------------------------------------------------------


class CounterApp:
    """A counter. Operations: ``add:<int>`` (returns the new value), ``get``;
    anything else returns ``error``. Its state is the value and the whole
    history ``(seq, client, timestamp, operation, result)``, so its digest
    is a digest of everything it executed, and comparing histories compares
    executed sequences, across state transfers too."""

    def __init__(self) -> None:
        self.value = 0
        self.history: list[tuple[int, str, int, bytes, bytes]] = []

    def execute(self, seq: int, request: Request) -> bytes:
        op = request.operation
        if op.startswith(b"add:"):
            try:
                self.value += int(op[4:])
                result = str(self.value).encode()
            except ValueError:
                result = b"error"
        elif op == b"get":
            result = str(self.value).encode()
        else:
            result = b"error"
        self.history.append((seq, request.client, request.timestamp, op, result))
        return result

    def snapshot(self) -> bytes:
        return encode_record([self.value, [list(row) for row in self.history]])

    def restore(self, blob: bytes) -> None:
        value, rows = decode_record(blob)
        self.value = value
        self.history = [(s, c, t, o, r) for s, c, t, o, r in rows]

    def ordered(self) -> list[tuple[str, int, bytes]]:
        """The executed requests in order, without sequence numbers (which differ only by null requests)."""
        return [(c, t, o) for _, c, t, o, _ in self.history]


# -- clients ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    client: str
    timestamp: int
    operation: bytes
    result: bytes
    invoked_ms: int
    completed_ms: int


class SimClient:
    """A PBFT client with one outstanding request at a time (OSDI 4.1)."""

    def __init__(self, name: str, keys: AgentKeys, public_keys: tuple[str, ...], retry_ms: int) -> None:
        self.name = name
        self.keys = keys
        self.public_keys = public_keys
        self.n = len(public_keys)
        self.f = (self.n - 1) // 3
        self.retry_ms = retry_ms
        self.queue: deque[bytes] = deque()
        self.outstanding: Request | None = None
        self.invoked_ms = 0
        self.replies: dict[int, bytes] = {}
        self.view_hint = 0
        self.timestamp = 0
        self.completed: list[Completed] = []
        self.dropped: Counter[str] = Counter()

    def next_request(self, now: int) -> Request | None:
        if self.outstanding is not None or not self.queue:
            return None
        self.timestamp += 1
        self.outstanding = sign_request(self.keys, self.name, self.timestamp, self.queue.popleft())
        self.invoked_ms = now
        self.replies = {}
        return self.outstanding

    def on_reply(self, payload: object, now: int) -> bool:
        """Count a reply; True when it completes the outstanding request."""
        if not isinstance(payload, Envelope) or type(payload.sender) is not int or not 0 <= payload.sender < self.n:
            self.dropped["malformed"] += 1
            return False
        if not verify_envelope(payload, self.public_keys[payload.sender]):
            self.dropped["bad_signature"] += 1
            return False
        try:
            reply = decode_message(payload.body)
        except MalformedMessage:
            self.dropped["malformed"] += 1
            return False
        if not isinstance(reply, Reply) or reply.replica != payload.sender or reply.client != self.name:
            self.dropped["malformed"] += 1
            return False
        request = self.outstanding
        if request is None or reply.timestamp != request.timestamp:
            return False  # late or duplicate
        self.replies[reply.replica] = reply.result
        votes = Counter(self.replies.values())
        result, count = max(votes.items(), key=lambda item: (item[1], item[0]))
        if count < self.f + 1:
            return False
        self.view_hint = max(self.view_hint, reply.view)
        self.completed.append(Completed(self.name, request.timestamp, request.operation, result,
                                        self.invoked_ms, now))
        self.outstanding = None
        return True


# -- the simulation -----------------------------------------------------------------------------


@dataclass
class SimConfig:
    n: int = 4
    seed: int = 0
    clients: int = 1
    checkpoint_interval: int = 8
    watermark_window: int | None = None
    batch_max: int = 8
    inflight_max: int | None = None
    view_change_timeout_ms: int = 400
    status_interval_ms: int = 100
    fetch_timeout_ms: int = 200
    tick_ms: int = 10
    min_delay_ms: int = 1
    max_delay_ms: int = 10
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    heal_at_ms: int | None = None  # from then on nothing is dropped or duplicated
    client_retry_ms: int = 600


NodeFactory = Callable[[NodeContext], Node]


@dataclass
class ReplicaRecord:
    """What one replica's effects reported, in order."""

    executed: list[Execute] = field(default_factory=list)
    transfers: list[StateTransferred] = field(default_factory=list)
    views: list[tuple[int, ViewChanged]] = field(default_factory=list)  # (at_ms, event)
    fetches: list[FetchingState] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)  # Execute out of order: must stay empty
    next_seq: int = 1


def replica_keys(i: int) -> AgentKeys:
    return AgentKeys.from_seed(hashlib.sha256(b"pbft-sim-replica-%d" % i).digest())


def client_keys(name: str) -> AgentKeys:
    return AgentKeys.from_seed(hashlib.sha256(b"pbft-sim-client-" + name.encode()).digest())


class Simulation:
    """n replicas, ``config.clients`` clients and a seeded network.

    ``faulty`` maps replica ids to node factories (``SilentNode``,
    ``lambda ctx: StoppingNode(ctx, 500)``, ...); the others are correct.
    """

    def __init__(self, config: SimConfig, faulty: Mapping[int, NodeFactory] | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.now_ms = 0
        self._queue: list[tuple[int, int, str, tuple[Any, ...]]] = []
        self._counter = 0
        self._trace = hashlib.sha256()
        self.keys = [replica_keys(i) for i in range(config.n)]
        self.public_keys = tuple(k.public_key for k in self.keys)
        self.client_names = [f"c{i}" for i in range(config.clients)]
        self.clients = [SimClient(name, client_keys(name), self.public_keys, config.client_retry_ms)
                        for name in self.client_names]
        self._client_index = {c.name: i for i, c in enumerate(self.clients)}
        self._client_public = {c.name: c.keys.public_key for c in self.clients}
        self.apps: dict[int, list[CounterApp]] = {i: [] for i in range(config.n)}
        faulty = dict(faulty or {})
        self.faulty_ids = frozenset(faulty)
        self.nodes: list[Node] = []
        for i in range(config.n):
            ctx = NodeContext(i, config.n, self.keys[i], self._replica_maker(i))
            self.nodes.append(faulty[i](ctx) if i in faulty else CorrectNode(ctx.make_replica()))
        self.records = [ReplicaRecord() for _ in range(config.n)]
        self._cuts: list[tuple[frozenset[object], frozenset[object], int, int]] = []
        self.messages_sent = 0
        self.messages_dropped = 0
        for i in range(config.n):
            self._schedule(0, "tick", (i,))

    def _replica_maker(self, i: int) -> Callable[[], Replica]:
        c = self.config

        def make() -> Replica:
            app = CounterApp()
            self.apps[i].append(app)
            return Replica(i, c.n, self.keys[i], self.public_keys, app=app, client_keys=self._client_public,
                           checkpoint_interval=c.checkpoint_interval, watermark_window=c.watermark_window,
                           batch_max=c.batch_max, inflight_max=c.inflight_max,
                           view_change_timeout_ms=c.view_change_timeout_ms,
                           status_interval_ms=c.status_interval_ms, fetch_timeout_ms=c.fetch_timeout_ms)

        return make

    # -- accessors ------------------------------------------------------------------------------

    @property
    def correct_ids(self) -> list[int]:
        return [i for i in range(self.config.n) if i not in self.faulty_ids]

    def replica(self, i: int) -> Replica:
        node = self.nodes[i]
        if not isinstance(node, CorrectNode):
            raise TypeError(f"replica {i} has no single correct replica inside")
        return node.replica

    def app(self, i: int) -> CounterApp:
        return self.apps[i][0]

    @property
    def trace_digest(self) -> str:
        """A digest of every delivery so far: equal for equal seeds."""
        return self._trace.hexdigest()

    # -- scenario -------------------------------------------------------------------------------

    def submit(self, client: int, *operations: bytes, at_ms: int | None = None) -> None:
        """Queue operations for a client; it sends them one at a time."""
        self.clients[client].queue.extend(operations)
        self._schedule(self.now_ms if at_ms is None else at_ms, "client", (client,))

    def cut(self, side_a: Iterable[object], side_b: Iterable[object], start_ms: int, end_ms: int) -> None:
        """Drop everything between the two sides (replica ids, client names) in [start, end)."""
        self._cuts.append((frozenset(side_a), frozenset(side_b), start_ms, end_ms))

    def isolate(self, replica: int, start_ms: int, end_ms: int) -> None:
        others: list[object] = [j for j in range(self.config.n) if j != replica]
        self.cut({replica}, [*others, *self.client_names], start_ms, end_ms)

    def run(self, until_ms: int) -> None:
        while self._queue and self._queue[0][0] <= until_ms:
            self._step()
        self.now_ms = max(self.now_ms, until_ms)

    def run_until(self, done: Callable[[], bool], limit_ms: int) -> bool:
        """Run until ``done()`` (checked after every event) or ``limit_ms``."""
        while not done():
            if not self._queue or self._queue[0][0] > limit_ms:
                self.now_ms = max(self.now_ms, limit_ms)
                return done()
            self._step()
        return True

    def all_done(self) -> bool:
        return all(not c.queue and c.outstanding is None for c in self.clients)

    def completed(self) -> list[Completed]:
        return [done for c in self.clients for done in c.completed]

    # -- checks ---------------------------------------------------------------------------------

    def check_safety(self, ids: Iterable[int] | None = None) -> list[str]:
        """Violations of safety among correct replicas: histories that are not
        prefixes of each other, and ``Execute`` effects out of order."""
        ids = sorted(self.correct_ids if ids is None else ids)
        problems: list[str] = []
        histories = {i: self.app(i).ordered() for i in ids}
        for x in ids:
            for y in ids:
                if x >= y:
                    continue
                a, b = histories[x], histories[y]
                for k in range(min(len(a), len(b))):
                    if a[k] != b[k]:
                        problems.append(f"replicas {x} and {y} diverge at position {k}: {a[k]} != {b[k]}")
                        break
        for i in ids:
            problems.extend(f"replica {i}: {gap}" for gap in self.records[i].gaps)
        return problems

    def check_clients(self) -> list[str]:
        """Every accepted result must be what the correct replicas computed for that request."""
        ids = self.correct_ids
        if not ids:
            return []
        longest = max((self.app(i) for i in ids), key=lambda app: len(app.history))
        results = {(c, t): (o, r) for _, c, t, o, r in longest.history}
        problems = []
        for done in self.completed():
            expected = results.get((done.client, done.timestamp))
            if expected is None:
                problems.append(f"{done.client}#{done.timestamp} accepted but not executed by correct replicas")
            elif expected != (done.operation, done.result):
                problems.append(f"{done.client}#{done.timestamp} accepted {done.result!r}, correct is {expected[1]!r}")
        return problems

    # -- engine ---------------------------------------------------------------------------------

    def _schedule(self, at: int, kind: str, args: tuple[Any, ...]) -> None:
        self._counter += 1
        heapq.heappush(self._queue, (at, self._counter, kind, args))

    def _blocked(self, src: object, dst: object) -> bool:
        for a, b, start, end in self._cuts:
            if start <= self.now_ms < end and ((src in a and dst in b) or (src in b and dst in a)):
                return True
        return False

    def _transmit(self, src: object, dst: object, kind: str, args: tuple[Any, ...]) -> None:
        self.messages_sent += 1
        c = self.config
        if self._blocked(src, dst):
            self.messages_dropped += 1
            return
        faulty_net = c.heal_at_ms is None or self.now_ms < c.heal_at_ms
        if faulty_net and c.drop_rate and self.rng.random() < c.drop_rate:
            self.messages_dropped += 1
            return
        copies = 2 if faulty_net and c.duplicate_rate and self.rng.random() < c.duplicate_rate else 1
        for _ in range(copies):
            self._schedule(self.now_ms + self.rng.randint(c.min_delay_ms, c.max_delay_ms), kind, args)

    def _step(self) -> None:
        at, _, kind, args = heapq.heappop(self._queue)
        self.now_ms = at
        self._trace.update(repr((at, kind, _describe(args))).encode())
        if kind == "tick":
            (i,) = args
            self._apply(i, self.nodes[i].on_tick(at))
            self._schedule(at + self.config.tick_ms, "tick", (i,))
        elif kind == "msg":
            src, dst, payload = args
            self._apply(dst, self.nodes[dst].on_message(src, payload, at))
        elif kind == "req":
            dst, request = args
            self._apply(dst, self.nodes[dst].on_request(request, at))
        elif kind == "reply":
            client, payload = args
            if self.clients[client].on_reply(payload, at):
                self._client_next(client)
        elif kind == "client":
            self._client_next(args[0])
        elif kind == "retry":
            client, timestamp = args
            c = self.clients[client]
            if c.outstanding is not None and c.outstanding.timestamp == timestamp:
                for j in range(self.config.n):
                    self._transmit(c.name, j, "req", (j, c.outstanding))
                self._schedule(at + c.retry_ms, "retry", (client, timestamp))

    def _client_next(self, client: int) -> None:
        c = self.clients[client]
        request = c.next_request(self.now_ms)
        if request is None:
            return
        primary = c.view_hint % self.config.n
        self._transmit(c.name, primary, "req", (primary, request))
        self._schedule(self.now_ms + c.retry_ms, "retry", (client, request.timestamp))

    def _apply(self, i: int, effects: list[NodeEffect]) -> None:
        record = self.records[i]
        for effect in effects:
            if isinstance(effect, Send):
                self._transmit(i, effect.to, "msg", (i, effect.to, effect.envelope))
            elif isinstance(effect, Broadcast):
                for j in range(self.config.n):
                    if j != i:
                        self._transmit(i, j, "msg", (i, j, effect.envelope))
            elif isinstance(effect, RawSend):
                self._transmit(i, effect.to, "msg", (i, effect.to, effect.payload))
            elif isinstance(effect, ClientReply):
                index = self._client_index.get(effect.client)
                if index is not None:
                    self._transmit(i, effect.client, "reply", (index, effect.envelope))
            elif isinstance(effect, Execute):
                if effect.seq != record.next_seq:
                    record.gaps.append(f"executed {effect.seq}, expected {record.next_seq}")
                record.next_seq = effect.seq + 1
                record.executed.append(effect)
            elif isinstance(effect, StateTransferred):
                if effect.seq < record.next_seq - 1:
                    record.gaps.append(f"state transfer back to {effect.seq} after {record.next_seq - 1}")
                record.next_seq = effect.seq + 1
                record.transfers.append(effect)
            elif isinstance(effect, ViewChanged):
                record.views.append((self.now_ms, effect))
            elif isinstance(effect, FetchingState):
                record.fetches.append(effect)


def _describe(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A stable description of an event's arguments for the trace digest."""
    out: list[Any] = []
    for arg in args:
        if isinstance(arg, Envelope):
            out.append((arg.sender, hashlib.sha256(arg.body).hexdigest(), arg.signature))
        elif isinstance(arg, Request):
            out.append((arg.client, arg.timestamp, arg.operation))
        elif isinstance(arg, bytes | int | str):
            out.append(arg)
        else:
            out.append(type(arg).__name__)
    return tuple(out)


# The nodes are re-exported from cluster.pbft.faults for the tests and tools that import them here.
__all__ = [
    "Completed",
    "CorrectNode",
    "CounterApp",
    "EquivocatingNode",
    "ForgerNode",
    "Node",
    "NodeContext",
    "NodeEffect",
    "NodeFactory",
    "RawSend",
    "SilentNode",
    "SimClient",
    "SimConfig",
    "Simulation",
    "SplitBrainNode",
    "StoppingNode",
    "client_keys",
    "replica_keys",
    "seal_raw",
]
