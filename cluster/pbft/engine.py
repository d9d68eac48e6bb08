"""The ``pbft`` ConsensusEngine: ``coordinator.ports.ConsensusEngine`` over a ``PbftNode``.

Contract
--------
Construct, start, stop and call everything on one event loop. The replica
calls the engine's ``PbftApp`` adapter synchronously while the node handles
a message, so every ``ReplicatedFSM`` call (``apply``, ``snapshot``,
``restore``) arrives on the loop thread, in execution order, one at a time.
``done`` callbacks and role listeners also run on the loop thread.

Entries: each executed client request is one entry. The adapter numbers
them 1, 2, 3, ... across batches (a batch of k requests uses k indexes; a
null request of a view change uses none; a duplicate the replica suppresses
uses none) and calls ``fsm.apply(index, operation)``, which returns the
entry's result bytes. Every correct replica executes the same requests in
the same order, so it computes the same indexes and results. The result
signed into the PBFT reply is ``entry_reply(index, operation, result)``:
the index (8 bytes, big-endian) and ``sha256(index || operation || result)``.
f+1 matching replies thus prove that at least one correct replica ordered
the entry at that index and computed that result.

Confirmed results (``coordinator.ports.ConfirmsResults``): ``done(None)``
is called only once f+1 replicas agreed *and* this node's replica computed
the same reply for the same entry. A proposer on this engine answers only
then, so a lying replica (this one or another) cannot make a caller accept
a result the correct replicas did not compute. If this replica disagrees
with the f+1, its state has diverged: the engine reports it unhealthy and
``done(Failure.UNKNOWN)``.

Roles: PBFT has one primary per view. This node reports ``"leader"`` while it
is active in a view whose primary it is, ``"follower"`` otherwise (also while
a view change is in progress: then ``leader`` is None), ``"stopped"`` when
not running. The coordinator's leader-only duties (leases, timers) thus run
on the primary. ``term`` is the view. Listeners added with
``on_role_change`` are called after every change of that role (observed by
polling the replica every ``role_poll_ms``: the node has no effect hook).
``status().role`` is the role last announced to the listeners, so the two
never disagree; ``leader`` and ``term`` are read from the replica directly.

Submissions: ``submit`` never blocks. The engine hosts ``sessions`` PBFT
client ids (``pbft-engine-<id>-<k>``, all signed with this engine's client
key); PBFT allows one outstanding request per client, so at most
``sessions`` submissions are in flight and up to ``queue_max`` more wait for
a free session. Outcomes:

- ``done(None)``: f+1 replicas sent matching signed replies and the local
  FSM applied the entry with the same result (or installed a certified
  state that includes it);
- definite (the request was never signed nor sent): ``Failure.NO_LEADER``
  when the engine is not running or stops before a session frees up, or no
  session freed up within ``queue_timeout_ms``; ``Failure.QUEUE_FULL`` when
  ``queue_max`` submissions are already waiting; ``Failure.DENIED`` for a
  blob above ``MAX_OPERATION_BYTES``;
- ``Failure.UNKNOWN`` once the request may have left this node: no f+1
  matching replies within ``request_timeout_ms`` (``SubmitTimeout``), the
  local replica did not execute the entry within that time after the f+1
  replies, its result differs from theirs, the engine stopped while it was
  in flight, or any other node error.

Durability: with ``data_dir`` the node persists the replica's view,
prepared certificates and stable checkpoint (with the state) under
``data_dir/pbft`` before it sends anything that reflects them
(``durability`` ``"fsync"`` or ``"none"``), and a restarted engine recovers
from them: the FSM is restored to the checkpoint and the entries after it
are executed again as the protocol re-orders them. Without ``data_dir`` the
state lives in memory only.

Membership is static: the n = 3f+1 replicas and their keys are configured;
``add_member``/``remove_member`` raise ``Unavailable``.

A replica that cannot apply: when ``fsm.apply`` or ``fsm.restore`` raises
(a bug; ``ReplicatedFSM`` never raises for bad input), ``FsmApp`` halts: it
hands the FSM nothing more and answers the replica with placeholder results
(an empty reply, a snapshot record no correct replica produces) so the
replica's step completes, and the engine stops its node: it leaves the
protocol (a halted replica counts against f, like a crashed one), reports
role ``stopped``, ``healthy`` false and ``problem`` "apply failed at index
N: <type>", and refuses submissions with ``NO_LEADER``. A restart recovers
from storage and executes again (a deterministic bug fails again there).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from cluster.pbft.faults import make_behaviour
from cluster.pbft.messages import MAX_OPERATION_BYTES, Request
from cluster.pbft.node import NodeError, NodeStopped, PbftNode, SubmitTimeout
from cluster.pbft.replica import Replica
from cluster.pbft.storage import PbftStorage
from cluster.pbft.wiring import engine_kwargs
from cluster.power_loss import PowerLossRecorder
from coordinator.codec import decode_record, encode_record
from coordinator.crypto import AgentKeys
from coordinator.errors import InvalidInput, InvariantError, ReplicaHalted, Unavailable
from coordinator.ports import Done, EngineStatus, Failure, ReplicatedFSM

log = logging.getLogger(__name__)

_SNAPSHOT_TAG = "pbft-engine"
_SNAPSHOT_VERSION = 1


def session_client_id(replica_id: int, session: int) -> str:
    """The PBFT client id of one of replica ``replica_id``'s submission sessions."""
    return f"pbft-engine-{replica_id}-{session}"


def entry_reply(index: int, blob: bytes, result: bytes) -> bytes:
    """What every correct replica replies for the entry ``blob`` executed at
    ``index`` with ``result``: the index, then a digest binding all three."""
    position = index.to_bytes(8, "big")
    return position + hashlib.sha256(position + hashlib.sha256(blob).digest() + result).digest()


def reply_index(reply: bytes) -> int | None:
    """The index an ``entry_reply`` names, or None for bytes of another shape."""
    if len(reply) != 8 + 32:
        return None
    return int.from_bytes(reply[:8], "big")


def parse_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:7001"`` -> ``("127.0.0.1", 7001)``. Raises ``InvalidInput``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"not a host:port address: {address!r}", field="address")
    return host, int(port)


class FsmApp:
    """The ``PbftApp`` the replica drives: numbers executed requests and hands
    them to the ``ReplicatedFSM``. Called on the loop thread only (from inside
    the node's calls into the replica).

    Remembers, per PBFT client, the index and reply of its last executed
    request (one entry per client: the engine's sessions and the other
    replicas' ones, a fixed set), so the engine can compare its own result
    with the f+1 replies it received."""

    def __init__(self, fsm: ReplicatedFSM, on_halt: Callable[[str], None] = lambda problem: None) -> None:
        self.fsm = fsm
        self.halted: str | None = None  # why the FSM is no longer driven (see the module docstring)
        self._on_halt = on_halt
        self.index = 0  # the last index handed to fsm.apply (or restored)
        self.last_seq = 0  # the PBFT sequence number of that entry
        self.replies: dict[str, tuple[int, bytes]] = {}
        self.restored_index = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def execute(self, seq: int, request: Request) -> bytes:
        self.index += 1
        self.last_seq = seq
        if self.halted is None:
            try:
                result = self.fsm.apply(self.index, request.operation)
            except Exception as exc:
                self._halt("apply", self.index, exc)
        if self.halted is not None:
            # No result to vouch for: an empty reply matches no correct replica's.
            self._wake()
            return b""
        reply = entry_reply(self.index, request.operation, result if isinstance(result, bytes) else b"")
        self.replies[request.client] = (self.index, reply)
        self._wake()
        return reply

    def _halt(self, kind: str, index: int, exc: Exception) -> None:
        # The type only: the exception's text may quote an entry's data.
        problem = (exc.message.removeprefix("this replica halted: ") if isinstance(exc, ReplicaHalted)
                   else f"{kind} failed at index {index}: {type(exc).__name__}")
        self.halted = problem
        log.critical("pbft engine: %s; this replica applies no later entry", problem)
        self._on_halt(problem)

    async def wait_index(self, index: int) -> None:
        """Return once an entry at ``index`` or later was executed or restored."""
        if self.index >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((index, future))
        try:
            await future
        finally:
            self._waiters = [(i, f) for i, f in self._waiters if f is not future]

    def _wake(self) -> None:
        for index, future in self._waiters:
            if index <= self.index and not future.done():
                future.set_result(None)

    def snapshot(self) -> bytes:
        if self.halted is not None:
            # A checkpoint of a half-applied state must never be certified: this
            # record's digest matches no correct replica's (a lost vote, not a lie).
            return encode_record([_SNAPSHOT_VERSION, "halted", self.index, self.last_seq, b""])
        return encode_record([_SNAPSHOT_VERSION, _SNAPSHOT_TAG, self.index, self.last_seq, self.fsm.snapshot()])

    def restore(self, blob: bytes) -> None:
        # The replica installs only a state whose digest a quorum certified, so
        # a record we cannot read means a bug or 2f+1 faulty replicas.
        try:
            version, tag, index, last_seq, state = decode_record(blob)
        except (InvalidInput, ValueError, TypeError) as exc:
            raise InvariantError(f"certified PBFT state is not an engine snapshot: {exc}") from None
        if (version != _SNAPSHOT_VERSION or tag != _SNAPSHOT_TAG or type(index) is not int or index < 0
                or type(last_seq) is not int or not isinstance(state, bytes)):
            raise InvariantError("certified PBFT state is not an engine snapshot")
        if self.halted is not None:
            return
        try:
            self.fsm.restore(state)
        except Exception as exc:
            self._halt("restore", index, exc)
            return
        self.index = index
        self.last_seq = last_seq
        self.replies.clear()
        self.restored_index = index  # entries up to here are vouched for by 2f+1 checkpoint messages
        self._wake()


class PbftEngine:
    """A ``ConsensusEngine`` over one ``PbftNode``. See the module docstring.

    ``addresses[i]`` is replica i's ``"127.0.0.1:port"`` (its engine address
    and identity), ``public_keys[i]`` its Ed25519 key, ``keys`` this replica's
    pair. ``client_public_keys[i]`` is the key replica i's engine signs its
    submissions with, ``client_keys`` this engine's own (its public key must
    be ``client_public_keys[replica_id]``). Raises ``PbftConfigError`` /
    ``NodeError`` / ``InvalidInput`` for inconsistent configuration.
    """

    def __init__(self, *, replica_id: int, addresses: Sequence[str], keys: AgentKeys, public_keys: Sequence[str],
                 client_keys: AgentKeys, client_public_keys: Sequence[str], fsm: ReplicatedFSM,
                 sessions: int = 16, queue_max: int = 1024, queue_timeout_ms: int = 10_000,
                 request_timeout_ms: int = 10_000, retry_ms: int = 500, role_poll_ms: int = 20,
                 checkpoint_interval: int = 16, batch_max: int = 16, inflight_max: int = 2,
                 view_change_timeout_ms: int = 1000,
                 status_interval_ms: int = 250, fetch_timeout_ms: int = 500, tick_interval_ms: int = 10,
                 send_queue_max: int = 1024, fault: str | None = None, data_dir: str | None = None,
                 durability: str = "fsync", power_loss: bool = False) -> None:
        n = len(addresses)
        if len(client_public_keys) != n or not 0 <= replica_id < n:
            raise InvalidInput("client_public_keys must list one key per replica", field="client_public_keys")
        if client_keys.public_key != client_public_keys[replica_id]:
            raise InvalidInput("client_keys must be this replica's client key", field="client_keys")
        if min(sessions, queue_max, queue_timeout_ms, role_poll_ms) < 1:
            raise InvalidInput("sessions, queue_max and timeouts must be positive")
        self.confirms_results = True  # coordinator.ports.ConfirmsResults
        # coordinator.ports.KnowsQuorumContact: backups suspect a primary only after
        # a request waited this long, so a primary heard by 2f within it still leads
        self.quorum_lease_s = view_change_timeout_ms / 1000
        self.replica_id = replica_id
        self.addresses = tuple(addresses)
        self.address = self.addresses[replica_id]
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_ms / 1000
        self.role_poll_s = role_poll_ms / 1000
        self.app = FsmApp(fsm, self._halt)
        self._halting: asyncio.Task[None] | None = None
        pbft_clients = {session_client_id(r, k): client_public_keys[r] for r in range(n) for k in range(sessions)}
        replica = Replica(replica_id, n, keys, public_keys, app=self.app, client_keys=pbft_clients,
                          checkpoint_interval=checkpoint_interval, batch_max=batch_max, inflight_max=inflight_max,
                          view_change_timeout_ms=view_change_timeout_ms, status_interval_ms=status_interval_ms,
                          fetch_timeout_ms=fetch_timeout_ms)
        self._sessions = [session_client_id(replica_id, k) for k in range(sessions)]
        homes = {session_client_id(r, k): r for r in range(n) for k in range(sessions)}
        self.fault = fault
        if fault is not None:
            log.warning("pbft engine: replica %d MISBEHAVES on purpose (%s): chaos demonstrations only",
                        replica_id, fault)
        behaviour = make_behaviour(fault, replica, keys) if fault is not None else None
        # UNSAFE, chaos tests only (--unsafe-test-power-loss): record what a power cut
        # would leave of data_dir for the lost-fsync nemesis, before storage opens a file
        self._power_loss = PowerLossRecorder(data_dir) if power_loss and data_dir else None
        if self._power_loss is not None:
            os.makedirs(data_dir, exist_ok=True)
            self._power_loss.start()
        storage = PbftStorage(os.path.join(data_dir, "pbft"), durability) if data_dir else None
        self.node = PbftNode(replica, [parse_address(a) for a in self.addresses], public_keys,
                             behaviour=behaviour, storage=storage,
                             client_keys={c: client_keys for c in self._sessions}, client_homes=homes,
                             request_timeout_ms=request_timeout_ms, retry_ms=retry_ms,
                             tick_interval_ms=tick_interval_ms, send_queue_max=send_queue_max)
        self._free: asyncio.Queue[str] | None = None
        self._waiting = 0  # submissions holding or waiting for a session
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._role_listeners: list[Callable[[str], None]] = []
        self._role = "stopped"
        self._running = False
        self.counters: Counter[str] = Counter()
        self.divergence: str | None = None  # set once this replica's results differed from f+1 others'

    @classmethod
    def from_config(cls, config: Any, fsm: ReplicatedFSM) -> PbftEngine:
        """Build the engine from a ``coordinator.config.NodeConfig`` (see
        ``cluster.pbft.wiring``). Raises ``InvalidInput`` naming the setting."""
        return cls(fsm=fsm, **engine_kwargs(config))

    def _halt(self, problem: str) -> None:
        """``FsmApp`` halted (inside a replica step, on the loop): stop the node
        once that step is over. See the module docstring."""
        if self._halting is None:
            self.counters["halted"] += 1
            self._halting = asyncio.get_running_loop().create_task(self.stop(), name="pbft-halt")

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the node (listen, connect, tick) and the role watcher. Idempotent."""
        if self._running:
            return
        self._free = asyncio.Queue()
        for client in self._sessions:
            self._free.put_nowait(client)
        await self.node.start()
        self._running = True
        self._watch = asyncio.get_running_loop().create_task(self._watch_role(), name="pbft-role-watch")
        self._check_role()

    async def stop(self) -> None:
        """Stop the node; in-flight submissions end with ``UNKNOWN``, waiting
        ones with ``NO_LEADER``. Idempotent."""
        halting = self._halting
        if halting is not None and halting is not asyncio.current_task():
            await asyncio.gather(halting, return_exceptions=True)
        if not self._running:
            return
        self._running = False
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.node.stop()  # in-flight node.submit calls raise NodeStopped
        if self._tasks:
            # Waiting submissions get a session as in-flight ones end, see _running False, and finish.
            _, late = await asyncio.wait(list(self._tasks), timeout=self.node.stop_timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._check_role()

    # -- submissions ---------------------------------------------------------------------------------

    def submit(self, blob: bytes, done: Done) -> None:
        if not self._running or self.app.halted is not None:
            done(Failure.NO_LEADER)
            return
        if len(blob) > MAX_OPERATION_BYTES:
            done(Failure.DENIED)
            return
        if self._waiting >= self.queue_max + len(self._sessions):
            done(Failure.QUEUE_FULL)
            return
        self._waiting += 1
        task = asyncio.get_running_loop().create_task(self._run_submit(blob, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_submit(self, blob: bytes, done: Done) -> None:
        reason: str | None = Failure.NO_LEADER  # until the request may have left this node
        free = self._free
        client: str | None = None
        try:
            if free is None:
                return
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    client = await free.get()
            except TimeoutError:
                return
            if not self._running:
                return
            reason = Failure.UNKNOWN
            try:
                agreed = await self.node.submit(blob, client)
                if await self._confirm(client, agreed):
                    reason = None
            except SubmitTimeout:
                pass
            except NodeStopped:
                pass  # stopped while in flight: it may still be ordered by the others
            except NodeError:
                log.exception("pbft engine: submit failed")
        finally:
            if client is not None and free is not None:
                free.put_nowait(client)
            self._waiting -= 1
            done(reason)

    async def _confirm(self, client: str, agreed: bytes) -> bool:
        """Whether this replica computed ``agreed`` (the f+1 replicas' reply)
        for ``client``'s request: waits up to ``request_timeout_ms`` for the
        local replica to execute it. A different reply means this replica's
        state diverged from the correct ones: reported, never answered."""
        index = reply_index(agreed)
        if index is None:
            # f+1 replicas signed something no correct engine replies: beyond the fault bound.
            self._diverged(f"f+1 replicas agreed on a reply of {len(agreed)} bytes, not an entry reply")
            return False
        try:
            async with asyncio.timeout(self.node.request_timeout_s):
                await self.app.wait_index(index)
        except TimeoutError:
            self.counters["confirm_timeout"] += 1
            return False
        if self.app.halted is not None:
            return False  # no local result to confirm with: the outcome is unknown here
        local = self.app.replies.get(client)
        if local is not None and local[0] == index:
            if local[1] == agreed:
                return True
        elif index <= self.app.restored_index:
            return True  # inside a state certified by 2f+1 checkpoints: nothing local to compare
        self._diverged(f"this replica's result at index {index} differs from f+1 replicas'")
        return False

    def _diverged(self, problem: str) -> None:
        self.counters["result_mismatch"] += 1
        if self.divergence is None:
            self.divergence = problem
        log.error("pbft engine: %s", problem)

    # -- status ---------------------------------------------------------------------------------------

    def _current_role(self) -> str:
        replica = self.node.replica
        if not self._running or self.app.halted is not None:
            return "stopped"
        return "leader" if replica.active and replica.is_primary else "follower"

    def connected_peers(self) -> tuple[str, ...]:
        """Peers whose outbound link is up (the node sends only on links it opened)."""
        return tuple(self.addresses[p] for p in self.node.connected_peers())

    def status(self) -> EngineStatus:
        replica = self.node.replica
        members = tuple(self.addresses)
        if not self._running or self.app.halted is not None:
            return EngineStatus(node=self.address, role="stopped", leader=None, term=replica.view,
                                commit_index=self.app.index, applied_index=self.app.index, members=members,
                                healthy=False, problem=self.app.halted or "stopped")
        connected = self.connected_peers()
        problem = None
        if self.divergence is not None:
            problem = f"diverged: {self.divergence}"
        elif self.node.failure is not None:
            problem = f"node task failed: {self.node.failure!r}"
        elif len(connected) < 2 * replica.f:
            problem = f"connected to {len(connected)} peers, need {2 * replica.f}"
        return EngineStatus(
            node=self.address,
            role=self._role,  # as announced to the listeners (lags the replica by <= role_poll_ms)
            leader=self.addresses[replica.primary] if replica.active else None,
            term=replica.view,
            commit_index=self.app.index,
            applied_index=self.app.index,
            members=members,
            healthy=problem is None,
            problem=problem,
            connected=connected,
        )

    def quorum_contact_age_s(self) -> float | None:
        """Seconds since 2f other replicas (with this one a 2f+1 quorum) were
        last heard from (every replica broadcasts a status at least every
        ``status_interval_ms``); None unless this node is the active primary.
        Liveness only: a Byzantine peer can make itself look alive."""
        if self._current_role() != "leader":
            return None
        needed = 2 * self.node.f
        if needed == 0:
            return 0.0
        heard = sorted(self.node.last_heard_ms.values(), reverse=True)
        if len(heard) < needed:
            return float("inf")
        return max(0.0, (self.node.now_ms() - heard[needed - 1]) / 1000)

    def event_counts(self) -> dict[str, int]:
        """``coordinator.ports.WithEventCounts``: the replica's dropped messages
        by reason (``dropped_<reason>``: unsigned, bad_signature, malformed,
        conflict...), the node's transport and storage counters
        (``node_<name>``), this engine's own (``engine_<name>``), and the
        request timers that fired while the replica was catching up."""
        replica = self.node.replica
        counts = {f"dropped_{reason}": n for reason, n in replica.dropped.items()}
        counts.update({f"node_{name}": n for name, n in self.node.counters.items()})
        counts.update({f"engine_{name}": n for name, n in self.counters.items()})
        counts["view_changes_deferred"] = replica.view_changes_deferred
        return counts

    def on_role_change(self, listener: Callable[[str], None]) -> None:
        self._role_listeners.append(listener)

    async def _watch_role(self) -> None:
        while True:
            await asyncio.sleep(self.role_poll_s)
            self._check_role()

    def _check_role(self) -> None:
        role = self._current_role()
        if role == self._role:
            return
        self._role = role
        replica = self.node.replica
        log.info("pbft engine: replica %d is %s in view %d (primary %d)", self.replica_id, role, replica.view,
                 replica.primary)
        for listener in list(self._role_listeners):
            try:
                listener(role)
            except Exception:
                log.exception("pbft engine: role listener failed")

    # -- membership ------------------------------------------------------------------------------------

    async def add_member(self, address: str) -> None:
        raise Unavailable("PBFT membership is static: the 3f+1 replicas and their keys are configured")

    async def remove_member(self, address: str) -> None:
        raise Unavailable("PBFT membership is static: the 3f+1 replicas and their keys are configured")


__all__ = ["FsmApp", "PbftEngine", "entry_reply", "parse_address", "reply_index", "session_client_id"]
