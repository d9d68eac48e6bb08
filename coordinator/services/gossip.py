"""Gossip of heard heartbeats between the nodes (issue 23, part 3).

Any node answers an agent's heartbeat from memory and records it in its
``HeardTable`` (``coordinator.services.liveness``). Every ``interval_s`` a
node sends each peer (full fan-out: a cluster has 3 to 5 nodes) what it heard
itself since that peer last took a batch, as one signed JSON message to
``POST /v1/internal/gossip``:

    {"v": 1, "from": <node id>, "to": <peer id>, "seq": <int>, "ts_ms": <wall ms>,
     "entries": [[<agent id>, <lease id>, <age ms>(, <counter>)], ...](, "udp": "<host:port>")}

(an entry's ``counter``, the highest heartbeat datagram counter the sender
saw of that lease, only when there was one, so a datagram replayed to
another node is refused there after a round; ``udp``, where the sender takes
heartbeat datagrams, only when it does: ``coordinator.services.udp``).
A receiver answers ``{"leader": <bool>, "counters": true}``. A node from
before UDP heartbeats answers 400 to an entry with a counter and leaves
``counters`` out: during a rolling upgrade the sender sends it entries
without counters (the refused batch goes again) until an answer says
``counters``, so the old node keeps receiving what was heard.

with ``X-Coord-Gossip-Sig: <hex HMAC-SHA-256 of the body>`` under a key
derived from the cluster secret (``crypto.KEY_GOSSIP``). The receiver
refuses (401, one message whatever the reason, so a stranger learns nothing)
a body without a valid signature, for another node (``to``), with a
timestamp more than ``clock_skew_s`` from its clock, or with a ``seq`` not
above the last it took from that sender (a replay); a body over
``BODY_MAX_BYTES`` is a 413 before it is read. Only *ages* cross machines:
the receiver's heard time is its own clock minus the age (late by the
one-way transit, milliseconds).

A batch that was not answered 200 stays pending for that peer and goes with
the next round (merging is idempotent: only a newer heard time moves
anything), so a lost message delays heartbeats by a round and loses none.
The answer says whether the receiver is an active leader with quorum
contact: a follower answers heartbeats from memory only while such an answer
from the current leader is younger than the lease's vouching window
(``leader_contact_fresh``, ``CoordinatorNode._may_answer``; else it forwards
them to the leader), so no agent is told "renewed" of a lease the leader
may have let go.

``loss`` (tests only, set from the ``COORD_UNSAFE_TEST_GOSSIP_LOSS``
environment variable by the composition root; never from the API) drops that
share of outgoing messages before they are sent.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from coordinator.commands.agents import check_agent_id
from coordinator.commands.base import MAX_TOKEN, Rejected
from coordinator.errors import InvalidInput, Unauthenticated
from coordinator.ports import Clock
from coordinator.services.liveness import Heard, HeardTable

log = logging.getLogger(__name__)

PATH = "/v1/internal/gossip"
SIG_HEADER = "X-Coord-Gossip-Sig"
VERSION = 1
BODY_MAX_BYTES = 512 * 1024
BATCH_BYTES = 400 * 1024  # a sender stops adding entries here (each counted as its id + 32)
ENTRIES_MAX = 20_000  # per message
AGE_MAX_MS = 3_600_000
SENDERS_MAX = 64  # last sequence numbers kept, one per sender
REFUSED = "gossip: not a valid message of this cluster"


@dataclass(frozen=True, slots=True)
class Peer:
    id: str
    raft: str
    http: str


@dataclass(slots=True)
class _PeerState:
    pending: dict[str, Heard] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    contact_s: float | None = None  # when the last round it answered 200 started (our monotonic clock)
    leader_ok: bool = False  # that answer said: an active leader with quorum contact
    # it refused entries that carry a datagram counter (a node from before UDP heartbeats answers 400):
    # send it [agent, lease, age] until an answer says it takes counters (``"counters": true``)
    plain: bool = False
    sent: int = 0
    failed: int = 0


def sign(key: bytes, body: bytes) -> str:
    return hmac.new(key, b"COORD-GOSSIP-V1\n" + body, hashlib.sha256).hexdigest()


def encode(node_id: str, to: str, seq: int, ts_ms: int, entries: list[list[Any]], udp: str | None = None) -> bytes:
    message: dict[str, Any] = {"v": VERSION, "from": node_id, "to": to, "seq": seq, "ts_ms": ts_ms,
                               "entries": entries}
    if udp is not None:
        message["udp"] = udp
    return json.dumps(message, separators=(",", ":")).encode()


class Gossip:
    def __init__(self, node_id: str, table: HeardTable, clock: Clock, key: bytes | None, *,
                 peers: Callable[[], list[Peer]], leader_raft: Callable[[], str | None],
                 leader_ok: Callable[[], bool], known: Callable[[str], bool],
                 session: Callable[[], aiohttp.ClientSession | None], quorum_lease_s: float,
                 interval_s: float = 0.1, scheme: str = "http", clock_skew_s: float = 30.0,
                 loss: float = 0.0, rng: random.Random | None = None,
                 accepted_keys: tuple[bytes, ...] = ()) -> None:
        """``accepted_keys``: keys of secrets this node also accepts while
        the cluster changes its secret (``accept_secret_file``); it signs
        with ``key`` only. ``key``: None switches gossip off (no cluster secret, or
        ``gossip_interval_s`` 0): followers then forward every heartbeat to
        the leader, as before. ``peers``: the other members now;
        ``leader_raft``: the engine's leader; ``leader_ok``: whether this node
        is an active leader with quorum contact (the answer to a sender);
        ``known``: whether an agent is registered in this replica (others'
        entries are not merged)."""
        self.node_id = node_id
        self.table = table
        self.clock = clock
        self.key = key
        self.accepted_keys = accepted_keys
        self.peers = peers
        self.leader_raft = leader_raft
        self.leader_ok = leader_ok
        self.known = known
        self.session = session
        self.quorum_lease_s = quorum_lease_s
        self.interval_s = interval_s
        self.scheme = scheme
        self.clock_skew_s = clock_skew_s
        self.loss = loss
        self.rng = rng or random.Random()
        self.received = 0
        self.refused = 0
        self.dropped = 0  # by the test knob
        self._peers: dict[str, _PeerState] = {}
        self._round_peers: list[Peer] = []  # the peers of the last round
        self._seq = int(clock.now_ms()) * 1000  # above what this node sent before a restart
        self._last_seq: dict[str, int] = {}
        self.udp: str | None = None  # where this node takes heartbeat datagrams (told to the peers)
        self.peer_udp: dict[str, str] = {}  # node id -> where it takes them, as it said

    @property
    def enabled(self) -> bool:
        return self.key is not None

    # -- sending ----------------------------------------------------------------------------

    async def run(self) -> None:
        if not self.enabled:
            return
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.round()
        finally:
            tasks = [p.task for p in self._peers.values() if p.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def round(self) -> None:
        """Hand what was heard here since the last round to every peer, and
        start a send to each peer that has none in flight."""
        dirty = self.table.take_dirty()
        peers = self._round_peers = self.peers()
        for peer in peers:
            state = self._peers.setdefault(peer.id, _PeerState())
            state.pending.update(dirty)
            if state.task is None or state.task.done():
                state.task = asyncio.get_running_loop().create_task(self._send(peer, state))
        current = {p.id for p in peers}
        for gone in [pid for pid in self._peers if pid not in current]:
            state = self._peers.pop(gone)
            if state.task is not None:
                state.task.cancel()

    def _batch(self, state: _PeerState, now_s: float) -> tuple[list[list[Any]], dict[str, Heard]]:
        entries: list[list[Any]] = []
        taken: dict[str, Heard] = {}
        size = 0
        for agent_id, heard in state.pending.items():
            if len(entries) >= ENTRIES_MAX or size >= BATCH_BYTES:
                break
            entry = [agent_id, heard.lease_id, max(0, int((now_s - heard.at_s) * 1000))]
            if heard.counter and not state.plain:
                entry.append(heard.counter)
            entries.append(entry)
            taken[agent_id] = heard
            size += len(agent_id) + 32
        for agent_id in taken:
            del state.pending[agent_id]
        return entries, taken

    async def _send(self, peer: Peer, state: _PeerState) -> None:
        started = self.clock.monotonic()
        entries, taken = self._batch(state, started)
        self._seq += 1
        body = encode(self.node_id, peer.id, self._seq, int(self.clock.now_ms()), entries, self.udp)
        ok = False
        try:
            if self.loss > 0 and self.rng.random() < self.loss:
                self.dropped += 1
                return
            session = self.session()
            if session is None or self.key is None:
                return
            headers = {SIG_HEADER: sign(self.key, body), "Content-Type": "application/json"}
            async with session.post(f"{self.scheme}://{peer.http}{PATH}", data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=max(1.0, 2 * self.interval_s))) as response:
                answer = await response.json() if response.status == 200 else None
                if response.status == 400 and any(len(e) > 3 for e in entries) and not state.plain:
                    state.plain = True
                    log.info("gossip to %s: it refused datagram counters (an older version); sending without",
                             peer.id)
            if isinstance(answer, dict):
                ok = True
                state.contact_s = started
                state.leader_ok = answer.get("leader") is True
                state.plain = answer.get("counters") is not True
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("gossip to %s failed: %s", peer.id, type(exc).__name__)
        finally:
            if ok:
                state.sent += 1
            else:
                state.failed += 1
                for agent_id, heard in taken.items():  # again with the next round (unless newer is pending)
                    state.pending.setdefault(agent_id, heard)

    def leader_contact_fresh(self, leader: str | None = None, within_s: float | None = None) -> bool:
        """Whether the current leader (``leader``, its Raft address; asked of
        the engine when not given) answered this node's gossip, as an active
        leader with quorum contact, within ``within_s`` (default
        ``quorum_lease_s``). Per heartbeat: it looks only at the peers of the
        last round."""
        if leader is None:
            leader = self.leader_raft()
        if leader is None:
            return False
        for peer in self._round_peers:
            if peer.raft == leader:
                state = self._peers.get(peer.id)
                return (state is not None and state.leader_ok and state.contact_s is not None
                        and self.clock.monotonic() - state.contact_s
                        <= (self.quorum_lease_s if within_s is None else within_s))
        return False

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, body: bytes, signature: str) -> dict[str, Any]:
        """Check and merge one message (the handler read at most
        ``BODY_MAX_BYTES``). ``Unauthenticated`` for anything that is not a
        fresh message of this cluster for this node; ``InvalidInput`` naming
        the field for a signed message of a bad shape (a bug of the sender)."""
        given = signature.encode("ascii", "replace")
        if self.key is None or not any(hmac.compare_digest(given, sign(key, body).encode())
                                       for key in (self.key, *self.accepted_keys)):
            return self._refuse()
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidInput("body: not JSON", field="body") from None
        if not isinstance(message, dict) or message.get("v") != VERSION:
            raise InvalidInput("v: must be 1", field="v")
        sender, seq, ts_ms = message.get("from"), message.get("seq"), message.get("ts_ms")
        if message.get("to") != self.node_id or not isinstance(sender, str) or not _is_int(seq) \
                or not _is_int(ts_ms) or abs(self.clock.now_ms() - ts_ms) > self.clock_skew_s * 1000:
            return self._refuse()
        if seq <= self._last_seq.get(sender, -1):
            return self._refuse()
        entries = message.get("entries")
        if not isinstance(entries, list) or len(entries) > ENTRIES_MAX:
            raise InvalidInput(f"entries: must be a list of at most {ENTRIES_MAX}", field="entries")
        parsed = [_entry(e) for e in entries]
        if sender not in self._last_seq and len(self._last_seq) >= SENDERS_MAX:
            self._last_seq.pop(next(iter(self._last_seq)))
        self._last_seq[sender] = seq
        udp = message.get("udp")
        if isinstance(udp, str) and _is_address(udp):
            if sender not in self.peer_udp and len(self.peer_udp) >= SENDERS_MAX:
                self.peer_udp.pop(next(iter(self.peer_udp)))
            self.peer_udp[sender] = udp
        now_s = self.clock.monotonic()
        for agent_id, lease_id, age_ms, counter in parsed:
            if self.known(agent_id):
                self.table.merge(agent_id, lease_id, age_ms / 1000, now_s, counter)
        self.received += 1
        return {"leader": self.leader_ok(), "counters": True}

    def _refuse(self) -> dict[str, Any]:
        self.refused += 1
        raise Unauthenticated(REFUSED)

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        return {
            "enabled": self.enabled,
            "interval_s": self.interval_s,
            "received": self.received,
            "refused": self.refused,
            "dropped_by_test_loss": self.dropped,
            "leader_contact_fresh": self.leader_contact_fresh() if self.enabled else None,
            "peers": {pid: {"sent": p.sent, "failed": p.failed, "pending": len(p.pending),
                            "contact_age_s": None if p.contact_s is None else round(now - p.contact_s, 3),
                            "leader_ok": p.leader_ok, "udp": self.peer_udp.get(pid)}
                      for pid, p in sorted(self._peers.items())},
        }


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_address(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return 0 < len(text) <= 300 and bool(host) and port.isdigit() and 0 < int(port) < 65536


def _entry(entry: Any) -> tuple[str, int, int, int]:
    if not isinstance(entry, list) or len(entry) not in (3, 4):
        raise InvalidInput("entries: each must be [agent id, lease id, age ms(, counter)]", field="entries")
    agent_id, lease_id, age_ms = entry[:3]
    counter = entry[3] if len(entry) == 4 else 0
    if not _is_int(counter) or not 0 <= counter < 2**64:
        raise InvalidInput("entries: a counter must be an integer in range", field="entries")
    try:
        check_agent_id(agent_id)
    except Rejected:
        raise InvalidInput("entries: an agent id is not valid", field="entries") from None
    if not _is_int(lease_id) or not 0 <= lease_id <= MAX_TOKEN or not _is_int(age_ms) \
            or not 0 <= age_ms <= AGE_MAX_MS:
        raise InvalidInput("entries: lease id and age must be integers in range", field="entries")
    return agent_id, lease_id, age_ms, counter
