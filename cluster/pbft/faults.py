"""Replica behaviours, correct and Byzantine, shared by the simulation and the TCP node.

A behaviour (``Node``) sits between a driver and one replica: the driver
hands it every message (``on_message``), client request (``on_request``) and
timer tick (``on_tick``) and applies the effects it returns. ``CorrectNode``
passes everything to its replica unchanged; the Byzantine ones run a correct
replica and rewrite, withhold or forge what it produces. Drivers:
``cluster.pbft.sim.Simulation`` (virtual time, seeded network) and
``cluster.pbft.node.PbftNode`` (asyncio over loopback TCP), which builds a
behaviour by name with ``make_behaviour`` (kinds ``"correct"`` and
``FAULT_KINDS``) for chaos tests.

Effects are the replica's (``Send``, ``Broadcast``, ``ClientReply``,
``Execute``, ...) plus ``RawSend``: any payload put on the wire to one
replica. Drivers send an ``Envelope`` payload as a message and a ``bytes``
payload as-is (an encoded envelope, or garbage); other payloads (the
colluders' side channel of ``SplitBrainNode``) only travel in the
simulation.

Pure, like the replica: no clock, randomness, event loop or sockets (the
``pure-pbft`` import contract). Not thread-safe: a behaviour belongs to its
driver's single thread or loop, like the replica inside it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from cluster.pbft.errors import MalformedMessage
from cluster.pbft.messages import (
    SIGNING_CONTEXT,
    Envelope,
    Forward,
    PrePrepare,
    Reply,
    Request,
    batch_digest,
    decode_message,
    seal,
)
from cluster.pbft.replica import Broadcast, ClientReply, Effect, Replica, Send
from coordinator.crypto import AgentKeys


@dataclass(frozen=True, slots=True)
class RawSend:
    """Byzantine nodes only: put any payload on the wire to replica ``to``
    (see the module docstring for what drivers do with each payload type)."""

    to: int
    payload: object


NodeEffect = Effect | RawSend


@dataclass
class NodeContext:
    """What a behaviour factory gets: the replica's id, the cluster size,
    the replica's signing keys and a way to make its replica (called once
    per replica the behaviour runs; ``SplitBrainNode`` runs two)."""

    id: int
    n: int
    keys: AgentKeys
    make_replica: Callable[[], Replica]


class Node(Protocol):
    """A replica's behaviour, driven by one driver on one thread. ``src`` of
    ``on_message`` is the replica the payload came from as the driver knows
    it (the simulation: the real sender; the TCP node: the envelope's
    claimed sender, as connections are not authenticated). Never raises for
    bad input."""

    id: int

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]: ...

    def on_request(self, request: Request, now: int) -> list[NodeEffect]: ...

    def on_tick(self, now: int) -> list[NodeEffect]: ...


class CorrectNode:
    """Drives ``replica`` and returns its effects unchanged."""

    def __init__(self, replica: Replica) -> None:
        self.id = replica.id
        self.replica = replica

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]:
        if not isinstance(payload, Envelope | bytes):
            self.replica.dropped["malformed"] += 1
            return []
        return list(self.replica.receive(payload, now))

    def on_request(self, request: Request, now: int) -> list[NodeEffect]:
        return list(self.replica.submit(request, now))

    def on_tick(self, now: int) -> list[NodeEffect]:
        return list(self.replica.tick(now))


class SilentNode:
    """Byzantine: receives everything, sends nothing (a crashed or mute
    replica). It holds a replica that it never feeds, so readers of
    ``replica`` (a driver's status) see one that stays where it started."""

    def __init__(self, ctx: NodeContext) -> None:
        self.id = ctx.id
        self.replica = ctx.make_replica()

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]:
        return []

    def on_request(self, request: Request, now: int) -> list[NodeEffect]:
        return []

    def on_tick(self, now: int) -> list[NodeEffect]:
        return []


class StoppingNode(CorrectNode):
    """Correct until ``stop_at_ms``, silent afterwards (a primary that stops)."""

    def __init__(self, ctx: NodeContext, stop_at_ms: int) -> None:
        super().__init__(ctx.make_replica())
        self.stop_at_ms = stop_at_ms

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]:
        return [] if now >= self.stop_at_ms else super().on_message(src, payload, now)

    def on_request(self, request: Request, now: int) -> list[NodeEffect]:
        return [] if now >= self.stop_at_ms else super().on_request(request, now)

    def on_tick(self, now: int) -> list[NodeEffect]:
        return [] if now >= self.stop_at_ms else super().on_tick(now)


class EquivocatingNode(CorrectNode):
    """Byzantine primary: runs a correct replica but replaces each of its own
    pre-prepares, wherever it would go, by a different one per backup.

    ``mode="distinct"``: every backup gets its own batch (the real one with
    k extra copies of its first request for the k-th backup), so no two
    backups can prepare the same thing: nothing commits, the backups' timers
    expire and the view changes. ``mode="split"``: the first quorum-1
    backups get the real batch, the others a null request: the first group
    prepares and, with the primary's own commit, commits; the rest cannot.
    """

    def __init__(self, ctx: NodeContext, mode: str = "distinct") -> None:
        super().__init__(ctx.make_replica())
        if mode not in ("distinct", "split"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.keys = ctx.keys
        self.n = ctx.n
        self.equivocations = 0

    def _variant(self, pp: PrePrepare, to: int) -> Envelope | None:
        backups = [j for j in range(self.n) if j != self.id]
        batches: list[tuple[Request, ...] | None] = []
        used: set[bytes] = set()
        for k in range(len(backups)):
            batch: tuple[Request, ...] | None = pp.batch
            if self.mode == "split":
                batch = pp.batch if k < self.replica.quorum - 1 else ()
            elif k:
                batch = (pp.batch + pp.batch[:1] * k if len(pp.batch) + k <= self.replica.batch_max
                         else pp.batch[: len(pp.batch) - k])
                if batch_digest(batch) in used:
                    batch = None  # no distinct variant left: this backup gets nothing
            if batch is not None:
                used.add(batch_digest(batch))
            batches.append(batch)
        chosen = batches[backups.index(to)]
        if chosen is None:
            return None
        self.equivocations += 1
        return seal(self.keys, self.id, PrePrepare(pp.view, pp.seq, batch_digest(chosen), chosen))

    def _own_pre_prepare(self, env: Envelope) -> PrePrepare | None:
        if env.sender != self.id:
            return None
        message = decode_message(env.body)
        return message if isinstance(message, PrePrepare) else None

    def _rewrite(self, effects: Iterable[NodeEffect]) -> list[NodeEffect]:
        out: list[NodeEffect] = []
        for effect in effects:
            if isinstance(effect, Broadcast) and (pp := self._own_pre_prepare(effect.envelope)) is not None:
                for j in range(self.n):
                    if j != self.id and (variant := self._variant(pp, j)) is not None:
                        out.append(Send(j, variant))
            elif isinstance(effect, Send) and (pp := self._own_pre_prepare(effect.envelope)) is not None:
                if (variant := self._variant(pp, effect.to)) is not None:
                    out.append(Send(effect.to, variant))
            else:
                out.append(effect)
        return out

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]:
        return self._rewrite(super().on_message(src, payload, now))

    def on_request(self, request: Request, now: int) -> list[NodeEffect]:
        return self._rewrite(super().on_request(request, now))

    def on_tick(self, now: int) -> list[NodeEffect]:
        return self._rewrite(super().on_tick(now))


class ForgerNode(CorrectNode):
    """Byzantine: runs a correct replica but never sends what it produces.
    Instead, for every message and recipient it sends forgeries: a flipped
    signature, no signature, another replica's name on its own signature, a
    body naming another replica, a corrupted digest (re-signed), garbage
    signed properly, and bytes that are not an envelope at all. Its replies
    to clients carry a false result (validly signed) or a bad signature. It
    also forwards requests whose operation it changed (the client's signature
    no longer matches)."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.make_replica())
        self.keys = ctx.keys
        self.n = ctx.n
        self.forged: Counter[str] = Counter()

    def _forgeries(self, env: Envelope) -> list[tuple[str, object]]:
        other = (self.id + 1) % self.n
        sig = env.signature
        flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
        out: list[tuple[str, object]] = [
            ("bad_signature", Envelope(env.sender, env.body, flipped)),
            ("unsigned", Envelope(env.sender, env.body, "")),
            ("impersonation", Envelope(other, env.body, sig)),
            ("malformed", seal_raw(self.keys, self.id, b"\x00not a message")),
            ("not_an_envelope", b"\x93garbage"),
        ]
        message = decode_message(env.body)
        if hasattr(message, "replica"):
            renamed = replace(message, replica=other)
            out.append(("sender_mismatch", seal(self.keys, self.id, renamed)))
        if hasattr(message, "digest"):
            corrupted = replace(message, digest=hashlib.sha256(b"corrupt" + env.body).digest())
            out.append(("corrupt_digest", seal(self.keys, self.id, corrupted)))
        return out

    def _rewrite(self, effects: Iterable[NodeEffect]) -> list[NodeEffect]:
        out: list[NodeEffect] = []
        for effect in effects:
            if isinstance(effect, Broadcast | Send):
                targets = [effect.to] if isinstance(effect, Send) else [j for j in range(self.n) if j != self.id]
                for kind, payload in self._forgeries(effect.envelope):
                    self.forged[kind] += len(targets)
                    out.extend(RawSend(j, payload) for j in targets)
            elif isinstance(effect, ClientReply):
                reply = decode_message(effect.envelope.body)
                if isinstance(reply, Reply):
                    lie = Reply(reply.view, reply.timestamp, reply.client, self.id, b"forged:" + reply.result)
                    out.append(ClientReply(effect.client, seal(self.keys, self.id, lie)))
                    bad = Envelope(self.id, effect.envelope.body, "A" * 86 + "==")
                    out.append(ClientReply(effect.client, bad))
                    self.forged["client_lie"] += 1
            else:
                out.append(effect)
        return out

    def _tamper(self, request: Request) -> list[NodeEffect]:
        tampered = Request(request.client, request.timestamp, request.operation + b"0", request.signature)
        forward = seal(self.keys, self.id, Forward(tampered, self.id))
        self.forged["tampered_request"] += self.n - 1
        return [RawSend(j, forward) for j in range(self.n) if j != self.id]

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]:
        out = self._rewrite(super().on_message(src, payload, now))
        if isinstance(payload, Envelope) and payload.sender == src:
            try:
                message = decode_message(payload.body)
            except MalformedMessage:
                return out
            if isinstance(message, PrePrepare):
                for request in message.batch:
                    out.extend(self._tamper(request))
        return out

    def on_request(self, request: Request, now: int) -> list[NodeEffect]:
        return self._rewrite(super().on_request(request, now)) + self._tamper(request)

    def on_tick(self, now: int) -> list[NodeEffect]:
        return self._rewrite(super().on_tick(now))


def seal_raw(keys: AgentKeys, sender: int, body: bytes) -> Envelope:
    """A validly signed envelope around arbitrary bytes (for forgers)."""
    return Envelope(sender, body, keys.sign(SIGNING_CONTEXT + body))


class SplitBrainNode:
    """Byzantine and colluding, beyond PBFT's promise: two correct replicas
    with the same identity, one talking only to ``group_a`` (and serving
    ``clients_a``), the other only to ``group_b``. With the other colluders
    (f+1 in all) each half forms quorums with a different group of correct
    replicas, so the groups commit different requests at the same sequence
    number. Colluders reach each other's matching half through tagged
    payloads, a side channel correct replicas never see."""

    def __init__(self, ctx: NodeContext, group_a: Iterable[int], group_b: Iterable[int],
                 colluders: Iterable[int], clients_a: Iterable[str]) -> None:
        self.id = ctx.id
        self.n = ctx.n
        self.halves = {"a": ctx.make_replica(), "b": ctx.make_replica()}
        self.groups = {"a": frozenset(group_a), "b": frozenset(group_b)}
        self.colluders = frozenset(colluders) - {ctx.id}
        self.clients_a = frozenset(clients_a)

    def _out(self, half: str, effects: Iterable[Effect]) -> list[NodeEffect]:
        out: list[NodeEffect] = []
        for effect in effects:
            if isinstance(effect, Send | Broadcast):
                targets = [effect.to] if isinstance(effect, Send) else [j for j in range(self.n) if j != self.id]
                for j in targets:
                    if j in self.groups[half]:
                        out.append(Send(j, effect.envelope))
                    elif j in self.colluders:
                        out.append(RawSend(j, ("collude", half, effect.envelope)))
            elif isinstance(effect, ClientReply):
                if (effect.client in self.clients_a) == (half == "a"):
                    out.append(effect)
            else:
                out.append(effect)
        return out

    def on_message(self, src: int, payload: object, now: int) -> list[NodeEffect]:
        if isinstance(payload, tuple) and len(payload) == 3 and payload[0] == "collude":
            half, envelope = payload[1], payload[2]
            return self._out(half, self.halves[half].receive(envelope, now))
        for half, group in self.groups.items():
            if src in group and isinstance(payload, Envelope | bytes):
                return self._out(half, self.halves[half].receive(payload, now))
        return []

    def on_request(self, request: Request, now: int) -> list[NodeEffect]:
        half = "a" if request.client in self.clients_a else "b"
        return self._out(half, self.halves[half].submit(request, now))

    def on_tick(self, now: int) -> list[NodeEffect]:
        out: list[NodeEffect] = []
        for half, replica in self.halves.items():
            out.extend(self._out(half, replica.tick(now)))
        return out


# -- by name ------------------------------------------------------------------------------------

FAULT_KINDS = ("silent", "equivocate", "forge")
BEHAVIOUR_KINDS = ("correct", *FAULT_KINDS)


def make_behaviour(kind: str, replica: Replica, keys: AgentKeys) -> Node:
    """The behaviour ``kind`` around ``replica``, whose signing keys are
    ``keys`` (the Byzantine kinds sign their own messages). Kinds:
    ``"correct"``; ``"silent"`` (holds the replica but never feeds it, so it
    stays where it started); ``"equivocate"`` (a different pre-prepare per
    backup whenever it is primary, ``EquivocatingNode`` mode ``"distinct"``);
    ``"forge"`` (``ForgerNode``). The replica must not be driven by anything
    else. Raises ``ValueError`` for any other kind."""
    ctx = NodeContext(replica.id, replica.n, keys, lambda: replica)
    if kind == "correct":
        return CorrectNode(replica)
    if kind == "silent":
        return SilentNode(ctx)
    if kind == "equivocate":
        return EquivocatingNode(ctx, "distinct")
    if kind == "forge":
        return ForgerNode(ctx)
    raise ValueError(f"unknown behaviour {kind!r}: expected one of {', '.join(BEHAVIOUR_KINDS)}")


__all__ = [
    "BEHAVIOUR_KINDS",
    "FAULT_KINDS",
    "CorrectNode",
    "EquivocatingNode",
    "ForgerNode",
    "Node",
    "NodeContext",
    "NodeEffect",
    "RawSend",
    "SilentNode",
    "SplitBrainNode",
    "StoppingNode",
    "make_behaviour",
    "seal_raw",
]
