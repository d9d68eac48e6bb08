"""The PBFT replica: a pure, deterministic protocol core.

Castro & Liskov, "Practical Byzantine Fault Tolerance" (OSDI 1999) and
"Practical Byzantine Fault Tolerance and Proactive Recovery" (TOCS 2002),
in the signature variant of the OSDI paper (section 4): every message is
signed, so view-change and new-view messages carry their own proofs.

Contract
--------
A ``Replica`` does no I/O and reads no clock: time enters as ``now_ms``
(any monotonic millisecond count) and every output is a list of effects the
caller carries out in order. Three entry points, all called from one thread,
never concurrently:

- ``receive(envelope, now_ms)`` a signed message from another replica (an
  ``Envelope`` or its transport bytes);
- ``submit(request, now_ms)`` a client request that reached this replica;
- ``tick(now_ms)`` time passed (call it every few milliseconds).

Effects: ``Send(to, envelope)``, ``Broadcast(envelope)`` (to every other
replica), ``ClientReply(client, envelope)``, and notifications the caller may
use or ignore: ``Execute``, ``StateTransferred``, ``FetchingState``,
``ViewChanged``.

Execution: the replica calls the injected ``PbftApp`` itself, in sequence
order, while it handles a call. ``app.execute(seq, request)`` returns the
result bytes (they go into the signed reply), ``app.snapshot()`` is taken at
every checkpoint and ``app.restore(blob)`` installs a state fetched from
another replica. The ``Execute(seq, requests, results)`` effect that follows
reports what was executed: exactly one per sequence number, in order, with
no gap except where a ``StateTransferred`` jumped over it. Calling the app
synchronously (rather than handing out ``Execute`` and waiting for results)
is a deliberate choice: replies need the result and checkpoints need the
state at exactly ``seq``, and a round trip through the caller would add a
state "handed out but not yet executed" to every rule below. The app must be
deterministic and must not call back into the replica.

Checkpoint state: what is checkpointed, digested and transferred is
``app.snapshot()`` *plus* the replica's table of each client's last
timestamp and result (the paper's "last reply" table), so that duplicate
suppression survives state transfer. Its digest is SHA-256 of that record.

Drops: every incoming message is authenticated (Ed25519 against the
configured key of the claimed sender) and validated before it touches any
state; what is refused is counted in ``self.dropped[reason]``. Reasons:
``malformed``, ``unsigned``, ``bad_signature``, ``unknown_sender``,
``from_self``, ``sender_mismatch`` (the body names another replica than the
signer), ``unexpected`` (a message type replicas do not accept),
``wrong_view``, ``not_primary``, ``wrong_sender`` (a prepare from the
primary), ``out_of_watermark``, ``bad_digest``, ``conflict`` (a second,
different message for the same slot from the same sender), ``invalid_proof``
(a view change, new view or state whose certificates do not check),
``unknown_client``, ``bad_client_signature``, ``pending_full``,
``stale``.

Quorums: f = (n-1)//3; a quorum is ceil((n+f+1)/2) replicas, which is 2f+1
when n = 3f+1 and keeps any two quorums intersecting in a correct replica
for other n. "2f matching prepares" is read as quorum-1.

Liveness additions (not in the OSDI paper, in Castro's thesis, 5.2):
replicas broadcast a signed ``Status`` every ``status_interval_ms``; a
replica that is ahead answers with what the sender lacks (pre-prepares,
prepares and commits of its log from the sender's first uncommitted slot,
its stable checkpoint certificate, its new-view message, or its view-change
messages, including those for views it has already left, which a replica
still changing to such a view may need for its quorum). Messages for a view
a replica has not entered yet are buffered (bounded) and replayed when it
enters the view.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cluster.pbft.errors import MalformedMessage, PbftConfigError
from cluster.pbft.messages import (
    MAX_BATCH,
    Checkpoint,
    Commit,
    Envelope,
    FetchState,
    Forward,
    Message,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    Reply,
    Request,
    StateReply,
    Status,
    ViewChange,
    batch_digest,
    decode_envelope,
    decode_message,
    digest_of,
    seal,
    verify_envelope,
    verify_request,
)
from coordinator.codec import decode_record, encode_record
from coordinator.crypto import AgentKeys
from coordinator.errors import InvalidInput, InvariantError

GENESIS_DIGEST = bytes(32)  # the stable checkpoint at seq 0 needs no proof and names no state
NULL_DIGEST = batch_digest(())
_STATE_TAG = "pbft-state"
# How many views ahead of the current one normal-case messages are buffered.
FUTURE_VIEWS = 2
# How many view changes (the highest views) are kept per replica.
VIEW_CHANGES_KEPT = 4


def _parse_state(state: bytes) -> tuple[bytes, dict[str, tuple[int, bytes]]] | None:
    """A checkpoint state record's app state and client table, or None."""
    try:
        version, tag, app_state, clients = decode_record(state)
        if version != 1 or tag != _STATE_TAG or not isinstance(app_state, bytes):
            return None
        return app_state, {c: (ts, res) for c, ts, res in clients}
    except (InvalidInput, ValueError, TypeError):
        return None


class PbftApp(Protocol):
    """The deterministic state machine a replica drives (the caller's FSM)."""

    def execute(self, seq: int, request: Request) -> bytes:
        """Apply ``request``, ordered at ``seq``; return the result for the client."""

    def snapshot(self) -> bytes:
        """The whole state, as bytes that are equal on every replica that executed the same requests."""

    def restore(self, blob: bytes) -> None:
        """Replace the whole state with one ``snapshot()`` returned (on some replica)."""


# -- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    to: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send to every replica but this one."""

    envelope: Envelope


@dataclass(frozen=True, slots=True)
class ClientReply:
    client: str
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Execute:
    """``seq`` was executed: ``requests`` are the batch's requests that were
    new (older timestamps are skipped), with their ``results``. A null
    request or an all-duplicate batch gives empty tuples."""

    seq: int
    requests: tuple[Request, ...]
    results: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StateTransferred:
    """The app was restored to the stable checkpoint ``seq``; sequence numbers up to it were not executed here."""

    seq: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class FetchingState:
    """This replica is behind the stable checkpoint ``seq`` and asked ``source`` for it."""

    seq: int
    source: int


@dataclass(frozen=True, slots=True)
class ViewChanged:
    """``active`` False: this replica started a view change to ``view``;
    True: it entered ``view``, whose primary is ``primary``."""

    view: int
    primary: int
    active: bool


Effect = Send | Broadcast | ClientReply | Execute | StateTransferred | FetchingState | ViewChanged


# -- internal records ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    """One sequence number in the current view."""

    pre_prepare: PrePrepare | None = None
    pre_prepare_env: Envelope | None = None
    prepares: dict[int, tuple[bytes, Envelope]] = field(default_factory=dict)
    commits: dict[int, tuple[bytes, Envelope]] = field(default_factory=dict)
    prepared: bool = False
    committed: bool = False


@dataclass(frozen=True, slots=True)
class _Cert:
    """The highest-view prepared certificate this replica holds for ``seq``."""

    view: int
    seq: int
    digest: bytes
    proof: PreparedProof


@dataclass(frozen=True, slots=True)
class DurableCheckpoint:
    """The stable checkpoint with this replica's own state at it."""

    seq: int
    digest: bytes
    proof: tuple[Envelope, ...]
    state: bytes


@dataclass(frozen=True, slots=True)
class Durable:
    """What a replica must not forget across a crash (``Replica.durable()``):
    the view it is in (and whether it entered it), the stable checkpoint with
    its state, and the prepared certificates above it, by sequence number."""

    view: int
    active: bool
    checkpoint: DurableCheckpoint | None
    certificates: dict[int, tuple[int, PreparedProof]]  # seq -> (view, proof)


@dataclass(slots=True)
class _Fetch:
    seq: int
    sources: tuple[int, ...]
    attempt: int
    deadline_ms: int


@dataclass(slots=True)
class _Behind:
    """A stable certificate above what this replica executed: fetch the state
    unless execution reaches it by ``deadline_ms``."""

    seq: int
    digest: bytes
    proof: tuple[Envelope, ...]
    deadline_ms: int


class Replica:
    """One PBFT replica. See the module docstring for the contract."""

    def __init__(
        self,
        replica_id: int,
        n: int,
        keys: AgentKeys,
        public_keys: Sequence[str],
        *,
        app: PbftApp,
        client_keys: Mapping[str, str],
        checkpoint_interval: int = 16,
        watermark_window: int | None = None,
        batch_max: int = 16,
        inflight_max: int | None = None,
        view_change_timeout_ms: int = 1000,
        view_change_backoff_max: int = 6,
        status_interval_ms: int = 250,
        fetch_timeout_ms: int = 500,
        pending_max: int = 4096,
        future_max: int | None = None,
        verify_cache_max: int = 16384,
    ) -> None:
        """``public_keys[i]`` is replica i's Ed25519 key (base64), ``keys`` this
        replica's own pair; ``client_keys`` maps every client id allowed to
        submit to its key. ``checkpoint_interval`` is K, ``watermark_window``
        L (default 2K, a multiple of K), ``inflight_max`` how many sequence
        numbers the primary has ordered but not executed at once (default
        L): requests that arrive meanwhile are batched, up to ``batch_max``
        per pre-prepare. Raises ``PbftConfigError`` for impossible values."""
        if not 1 <= n <= 1024 or not 0 <= replica_id < n:
            raise PbftConfigError(f"replica {replica_id} of {n}: need 0 <= id < n <= 1024")
        if len(public_keys) != n or keys.public_key != public_keys[replica_id]:
            raise PbftConfigError("public_keys must list n keys, this replica's own at its id")
        window = 2 * checkpoint_interval if watermark_window is None else watermark_window
        if checkpoint_interval < 1 or window < checkpoint_interval or window % checkpoint_interval:
            raise PbftConfigError("need checkpoint_interval >= 1 and a watermark window that is a multiple of it")
        if not 1 <= batch_max <= MAX_BATCH:
            raise PbftConfigError(f"batch_max must be 1..{MAX_BATCH}")
        if min(view_change_timeout_ms, status_interval_ms, fetch_timeout_ms, pending_max) < 1:
            raise PbftConfigError("timeouts and limits must be positive")
        self.id = replica_id
        self.n = n
        self.f = (n - 1) // 3
        self.quorum = (n + self.f + 2) // 2
        self.K = checkpoint_interval
        self.L = window
        self.batch_max = batch_max
        self.inflight_max = window if inflight_max is None else max(1, min(inflight_max, window))
        self.view_change_timeout_ms = view_change_timeout_ms
        self.view_change_backoff_max = view_change_backoff_max
        self.status_interval_ms = status_interval_ms
        self.fetch_timeout_ms = fetch_timeout_ms
        self.pending_max = pending_max
        self._keys = keys
        self._public_keys = tuple(public_keys)
        self._client_keys = dict(client_keys)
        self.app = app

        self.view = 0
        self.active = True  # False between sending a view change and entering the new view
        self.last_executed = 0
        self.h = 0  # the last stable checkpoint: the low watermark
        self._stable_digest = GENESIS_DIGEST
        self._stable_proof: tuple[Envelope, ...] = ()
        self._next_seq = 1
        self._log: dict[int, _Slot] = {}
        self._committed: dict[int, PrePrepare] = {}  # committed-local, not executed yet; survives view changes
        self._certs: dict[int, _Cert] = {}
        self._checkpoint_votes: dict[int, dict[int, tuple[bytes, Envelope]]] = {}
        self._snapshots: dict[int, tuple[bytes, bytes]] = {}  # own checkpoints: seq -> (digest, state)
        self._clients: dict[str, tuple[int, bytes]] = {}  # client -> (last timestamp, its result)
        self._pending: dict[tuple[str, int], Request] = {}  # known, not executed; insertion (arrival) order
        self._pending_per_client: Counter[str] = Counter()
        self._assigned: set[tuple[str, int]] = set()  # requests in a pre-prepare of the current view
        self._timer_ms: int | None = None  # request timer (active) or new-view timer (view change)
        self._backoff = 0
        # Valid view changes by replica and view (the few highest views of each replica), and our own
        # for the views we passed through since the last view we entered: a replica stuck in an
        # earlier view change may still need ours to reach its quorum.
        self._view_changes: dict[int, dict[int, tuple[ViewChange, Envelope]]] = {}
        self._own_view_changes: dict[int, Envelope] = {}
        self._new_view_env: Envelope | None = None
        self._new_view_sent = -1
        self._future: deque[tuple[int, Message, Envelope]] = deque(maxlen=future_max or 4 * window * n)
        self._fetch: _Fetch | None = None
        self._behind: _Behind | None = None
        self._next_status_ms: int | None = None
        self._served: dict[tuple[str, int], int] = {}  # (what, replica) -> when we last answered it
        self._verified: dict[tuple[object, ...], bool] = {}
        self._verify_cache_max = verify_cache_max
        self.dropped: Counter[str] = Counter()
        self.view_changes_deferred = 0  # request timers that fired while we were catching up
        # Grows whenever a durable fact changes (view, stable checkpoint, prepared certificates):
        # the node persists them before it sends what the same step produced.
        self.durable_version = 0
        # A recovered replica may have voted in views up to here before it lost its memory:
        # it sends no pre-prepare, prepare or commit in them (see recover()).
        self.mute_through_view = -1
        self._arm_timer = False

    # -- read-only views ------------------------------------------------------------------------

    def primary_of(self, view: int) -> int:
        return view % self.n

    @property
    def primary(self) -> int:
        return self.primary_of(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.id

    @property
    def stable_seq(self) -> int:
        return self.h

    @property
    def high_watermark(self) -> int:
        return self.h + self.L

    @property
    def log_size(self) -> int:
        """Slots held in the message log (all above the low watermark)."""
        return len(self._log)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def fetching(self) -> bool:
        return self._fetch is not None

    # -- entry points ---------------------------------------------------------------------------

    def receive(self, envelope: Envelope | bytes, now_ms: int) -> list[Effect]:
        """Handle one message from the network. Never raises for bad input:
        what is refused is counted in ``dropped``."""
        out: list[Effect] = []
        if isinstance(envelope, bytes | bytearray):
            try:
                envelope = decode_envelope(bytes(envelope))
            except MalformedMessage:
                self.dropped["malformed"] += 1
                return out
        if not isinstance(envelope, Envelope):
            self.dropped["malformed"] += 1
            return out
        if type(envelope.sender) is int and envelope.sender == self.id:
            self.dropped["from_self"] += 1
            return out
        opened = self._open(envelope)
        if isinstance(opened, str):
            self.dropped[opened] += 1
            return out
        self._dispatch(opened, envelope, now_ms, out)
        return out

    def submit(self, request: Request, now_ms: int) -> list[Effect]:
        """A client's request reached this replica. The primary orders it; a
        backup forwards it to the primary and starts its view-change timer.
        A request already executed gets its reply again."""
        out: list[Effect] = []
        self._learn_request(request, now_ms, out, from_client=True)
        return out

    @property
    def muted(self) -> bool:
        """Whether this recovered replica stays silent in the current view."""
        return self.view <= self.mute_through_view

    def durable(self) -> Durable:
        """What the node persists (before sending what a step produced) when
        ``durable_version`` changed. The checkpoint is None until this
        replica holds the state of its stable checkpoint (at genesis, or
        while it fetches it): the previously persisted one still holds."""
        checkpoint = None
        own = self._snapshots.get(self.h)
        if self.h > 0 and own is not None and own[0] == self._stable_digest:
            checkpoint = DurableCheckpoint(self.h, self._stable_digest, self._stable_proof, own[1])
        certificates = {seq: (cert.view, cert.proof) for seq, cert in sorted(self._certs.items()) if seq > self.h}
        return Durable(self.view, self.active, checkpoint, certificates)

    def recover(self, view: int, active: bool, checkpoint: DurableCheckpoint | None,
                certificates: Sequence[PreparedProof]) -> None:
        """Restore what the node persisted before this replica crashed: call
        once on a new replica, before any other call.

        The replica resumes in ``view`` but stays *muted* there (it sends no
        pre-prepare, prepare or commit in a view up to ``view``): it may have
        voted in it before the crash and no longer knows for what. It still
        executes what the others commit (or fetches it at the next stable
        checkpoint) and votes again from the next view on. Its view changes
        carry the recovered certificates, so a request committed before a
        crash of every replica is re-proposed at its sequence number.
        Certificates and the checkpoint are checked like a view change's;
        raises ``InvariantError`` if they do not hold (a corrupted disk)."""
        if self.durable_version or self.last_executed or self._log:
            raise InvariantError("recover() on a replica that already ran")
        h, digest, proof = 0, GENESIS_DIGEST, ()
        if checkpoint is not None:
            h, digest, proof = checkpoint.seq, checkpoint.digest, checkpoint.proof
        probe = ViewChange(view + 1, h, digest, tuple(proof), tuple(certificates), self.id)
        if not self._check_view_change(probe, seal(self._keys, self.id, probe)):
            raise InvariantError("the persisted PBFT checkpoint or certificates do not check")
        if checkpoint is not None:
            parsed = _parse_state(checkpoint.state)
            if parsed is None or digest_of(checkpoint.state) != digest:
                raise InvariantError("the persisted PBFT checkpoint state does not match its digest")
            self._install_state(h, digest, checkpoint.state, *parsed)
            self.h, self._stable_digest, self._stable_proof = h, digest, tuple(proof)
        for cert in certificates:
            pp = decode_message(cert.pre_prepare.body)
            if isinstance(pp, PrePrepare):
                self._certs[pp.seq] = _Cert(pp.view, pp.seq, pp.digest, cert)
        self.view = view
        self.active = active
        self.mute_through_view = view
        self._next_seq = self.h + 1
        self._arm_timer = not active  # it was waiting for a new view: keep waiting, then move on
        self.durable_version = 0

    @property
    def catching_up(self) -> bool:
        """Whether 2f+1 replicas certified a checkpoint past our execution
        (we wait for it or fetch its state). Only a quorum can make it true,
        so a faulty replica cannot use it to keep us from a view change."""
        return self._behind is not None or self._fetch is not None

    def tick(self, now_ms: int) -> list[Effect]:
        """Time passed: fire the view-change, state-fetch and status timers."""
        out: list[Effect] = []
        if self._next_status_ms is None:
            self._next_status_ms = now_ms + self.status_interval_ms
        if self._arm_timer:
            self._arm_timer = False
            if not self.active and self._timer_ms is None:
                self._timer_ms = now_ms + self.view_change_timeout_ms
        if self._timer_ms is not None and now_ms >= self._timer_ms and self.active and self.catching_up:
            # A quorum's stable checkpoint is past what we executed: we are the
            # slow one, not the primary. Accusing it would take us alone into a
            # view the others never enter (a restarted replica did exactly that),
            # so catch up first and keep the timer running.
            self._timer_ms = now_ms + self.view_change_timeout_ms
            self.view_changes_deferred += 1
        if self._timer_ms is not None and now_ms >= self._timer_ms:
            self._timer_ms = None
            if not self.active:  # the new primary did not deliver in time: try the next one, waiting longer
                self._backoff = min(self._backoff + 1, self.view_change_backoff_max)
            self._start_view_change(self.view + 1, now_ms, out)
        behind = self._behind
        if behind is not None and now_ms >= behind.deadline_ms:
            self._behind = None
            if behind.seq > self.last_executed:
                self._advance_stable(behind.seq, behind.digest, behind.proof, now_ms, out)
        fetch = self._fetch
        if fetch is not None and now_ms >= fetch.deadline_ms:
            fetch.attempt += 1
            self._send_fetch(now_ms, out)
        if now_ms >= self._next_status_ms:
            self._next_status_ms = now_ms + self.status_interval_ms
            needs_from = min([self.last_executed + 1, *(seq for seq, slot in self._log.items() if not slot.committed)])
            status = Status(self.view, self.active, self.last_executed, self.h, max(needs_from, self.h + 1), self.id)
            out.append(Broadcast(seal(self._keys, self.id, status)))
        return out

    # -- authentication -------------------------------------------------------------------------

    def _verify(self, envelope: Envelope) -> bool:
        # Keyed by the body's digest, not the body: the cache must not keep large bodies (states) alive.
        key = ("env", envelope.sender, envelope.signature, digest_of(envelope.body))
        if key in self._verified:
            return True
        if not verify_envelope(envelope, self._public_keys[envelope.sender]):
            return False
        self._remember(key)
        return True

    def _remember(self, key: tuple[object, ...]) -> None:
        if len(self._verified) >= self._verify_cache_max:
            self._verified.clear()
        self._verified[key] = True

    def _open(self, envelope: Envelope) -> Message | str:
        """The verified message in ``envelope``, or the reason to drop it."""
        if type(envelope.sender) is not int or not 0 <= envelope.sender < self.n:
            return "unknown_sender"
        if not isinstance(envelope.body, bytes):
            return "malformed"
        if not isinstance(envelope.signature, str) or not envelope.signature:
            return "unsigned"
        if not self._verify(envelope):
            return "bad_signature"
        try:
            message = decode_message(envelope.body)
        except MalformedMessage:
            return "malformed"
        claimed = getattr(message, "replica", envelope.sender)
        if claimed != envelope.sender:
            return "sender_mismatch"
        return message

    def _open_as(self, envelope: Envelope, kind: type) -> Message | None:
        """A nested envelope (inside a proof), opened and checked to be ``kind``."""
        opened = self._open(envelope)
        return opened if isinstance(opened, kind) else None

    def _check_request(self, request: Request) -> str | None:
        public_key = self._client_keys.get(request.client)
        if public_key is None:
            return "unknown_client"
        key = ("req", request.client, request.timestamp, request.signature, digest_of(request.operation))
        if key in self._verified:
            return None
        if not verify_request(request, public_key):
            return "bad_client_signature"
        self._remember(key)
        return None

    def _check_batch(self, batch: Sequence[Request]) -> str | None:
        if len(batch) > self.batch_max:
            return "malformed"
        for request in batch:
            reason = self._check_request(request)
            if reason is not None:
                return reason
        return None

    # -- dispatch -------------------------------------------------------------------------------

    def _dispatch(self, message: Message, env: Envelope, now: int, out: list[Effect]) -> None:
        match message:
            case PrePrepare():
                self._on_pre_prepare(message, env, now, out)
            case Prepare():
                self._on_prepare(message, env, now, out)
            case Commit():
                self._on_commit(message, env, now, out)
            case Checkpoint():
                self._on_checkpoint(message, env, now, out)
            case ViewChange():
                self._on_view_change(message, env, now, out)
            case NewView():
                self._on_new_view(message, env, now, out)
            case Forward():
                self._learn_request(message.request, now, out, from_client=False)
            case FetchState():
                self._on_fetch_state(message, env, now, out)
            case StateReply():
                self._on_state_reply(message, env, now, out)
            case Status():
                self._on_status(message, env, now, out)
            case _:  # Reply: for clients only
                self.dropped["unexpected"] += 1

    def _accepts_view(self, view: int, message: Message, env: Envelope) -> bool:
        """Normal-case messages are processed only in the current, active
        view; those for a view we have not entered yet are buffered."""
        if view == self.view and self.active:
            return True
        if view < self.view:
            self.dropped["wrong_view"] += 1
        elif view <= self.view + FUTURE_VIEWS:
            self._future.append((view, message, env))
        else:
            self.dropped["wrong_view"] += 1
        return False

    def _in_window(self, seq: int) -> bool:
        return self.h < seq <= self.h + self.L

    # -- requests -------------------------------------------------------------------------------

    def _learn_request(self, request: Request, now: int, out: list[Effect], *, from_client: bool) -> None:
        if not isinstance(request, Request):
            self.dropped["malformed"] += 1
            return
        reason = self._check_request(request)
        if reason is not None:
            self.dropped[reason] += 1
            return
        last = self._clients.get(request.client)
        if last is not None and request.timestamp <= last[0]:
            if from_client and request.timestamp == last[0]:  # a retry: the reply was lost
                reply = Reply(self.view, last[0], request.client, self.id, last[1])
                out.append(ClientReply(request.client, seal(self._keys, self.id, reply)))
            return
        is_new = request.key not in self._pending
        if is_new:
            if len(self._pending) >= self.pending_max:
                self.dropped["pending_full"] += 1
                return
            self._pending[request.key] = request
            self._pending_per_client[request.client] += 1
        if not self.active:
            return
        if self.is_primary:
            self._try_propose(now, out)
            return
        # A backup passes on what is new to it, wherever it came from: a
        # faulty replica that shows a request to the backups only must not
        # be able to time them out against a correct primary that never saw
        # it. A client's retry is passed on again (the first may be lost).
        if from_client or is_new:
            out.append(Send(self.primary, seal(self._keys, self.id, Forward(request, self.id))))
        if self._timer_ms is None:
            self._timer_ms = now + self.view_change_timeout_ms

    def _try_propose(self, now: int, out: list[Effect]) -> None:
        """The primary orders pending requests, up to ``batch_max`` per
        pre-prepare, while the window and ``inflight_max`` allow."""
        if not (self.active and self.is_primary) or self._fetch is not None or self.muted:
            return
        self._next_seq = max(self._next_seq, self.h + 1)
        while self._next_seq <= self.h + self.L and self._next_seq - 1 - self.last_executed < self.inflight_max:
            batch: list[Request] = []
            for key, request in self._pending.items():
                if key not in self._assigned:
                    batch.append(request)
                    if len(batch) >= self.batch_max:
                        break
            if not batch:
                return
            seq = self._next_seq
            self._next_seq += 1
            pre_prepare = PrePrepare(self.view, seq, batch_digest(batch), tuple(batch))
            env = seal(self._keys, self.id, pre_prepare)
            slot = self._log.setdefault(seq, _Slot())
            slot.pre_prepare, slot.pre_prepare_env = pre_prepare, env
            self._assigned.update(r.key for r in batch)
            out.append(Broadcast(env))
            self._check_prepared(seq, now, out)

    # -- normal case ----------------------------------------------------------------------------

    def _on_pre_prepare(self, pp: PrePrepare, env: Envelope, now: int, out: list[Effect]) -> None:
        if not self._accepts_view(pp.view, pp, env):
            return
        if env.sender != self.primary:
            self.dropped["not_primary"] += 1
            return
        if not self._in_window(pp.seq):
            self.dropped["out_of_watermark"] += 1
            return
        if batch_digest(pp.batch) != pp.digest:
            self.dropped["bad_digest"] += 1
            return
        reason = self._check_batch(pp.batch)
        if reason is not None:
            self.dropped[reason] += 1
            return
        slot = self._log.setdefault(pp.seq, _Slot())
        if slot.pre_prepare is not None:
            if slot.pre_prepare.digest != pp.digest:
                self.dropped["conflict"] += 1
            return
        slot.pre_prepare, slot.pre_prepare_env = pp, env
        self._send_prepare(slot, pp, out)
        self._check_prepared(pp.seq, now, out)

    def _send_prepare(self, slot: _Slot, pp: PrePrepare, out: list[Effect]) -> None:
        if self.is_primary or self.id in slot.prepares or self.muted:
            return
        env = seal(self._keys, self.id, Prepare(pp.view, pp.seq, pp.digest, self.id))
        slot.prepares[self.id] = (pp.digest, env)
        out.append(Broadcast(env))

    def _on_prepare(self, p: Prepare, env: Envelope, now: int, out: list[Effect]) -> None:
        if not self._accepts_view(p.view, p, env):
            return
        if env.sender == self.primary:
            self.dropped["wrong_sender"] += 1
            return
        if not self._in_window(p.seq):
            self.dropped["out_of_watermark"] += 1
            return
        slot = self._log.setdefault(p.seq, _Slot())
        if self._add_vote(slot.prepares, env.sender, p.digest, env):
            self._check_prepared(p.seq, now, out)

    def _on_commit(self, c: Commit, env: Envelope, now: int, out: list[Effect]) -> None:
        if not self._accepts_view(c.view, c, env):
            return
        if not self._in_window(c.seq):
            self.dropped["out_of_watermark"] += 1
            return
        slot = self._log.setdefault(c.seq, _Slot())
        if self._add_vote(slot.commits, env.sender, c.digest, env):
            self._check_committed(c.seq, now, out)

    def _add_vote(self, votes: dict[int, tuple[bytes, Envelope]], sender: int, digest: bytes, env: Envelope) -> bool:
        previous = votes.get(sender)
        if previous is not None:
            if previous[0] != digest:
                self.dropped["conflict"] += 1
            return False
        votes[sender] = (digest, env)
        return True

    def _check_prepared(self, seq: int, now: int, out: list[Effect]) -> None:
        """prepared(m, v, n): the pre-prepare and quorum-1 (2f) matching
        prepares from distinct backups. Then multicast a commit."""
        slot = self._log.get(seq)
        if slot is None or slot.pre_prepare is None or slot.prepared:
            return
        pp = slot.pre_prepare
        matching = [env for _, (digest, env) in sorted(slot.prepares.items()) if digest == pp.digest]
        if len(matching) < self.quorum - 1:
            return
        slot.prepared = True
        if slot.pre_prepare_env is None:
            raise InvariantError(f"slot {seq} has a pre-prepare without its envelope")
        proof = PreparedProof(slot.pre_prepare_env, tuple(matching[: self.quorum - 1]))
        self._certs[seq] = _Cert(pp.view, seq, pp.digest, proof)
        self.durable_version += 1
        if not self.muted:
            env = seal(self._keys, self.id, Commit(pp.view, seq, pp.digest, self.id))
            slot.commits.setdefault(self.id, (pp.digest, env))
            out.append(Broadcast(env))
        self._check_committed(seq, now, out)

    def _check_committed(self, seq: int, now: int, out: list[Effect]) -> None:
        """committed-local: prepared and a quorum (2f+1) of matching commits."""
        slot = self._log.get(seq)
        if slot is None or not slot.prepared or slot.committed or slot.pre_prepare is None:
            return
        digest = slot.pre_prepare.digest
        if sum(1 for d, _ in slot.commits.values() if d == digest) < self.quorum:
            return
        slot.committed = True
        if seq > self.last_executed:
            self._committed[seq] = slot.pre_prepare
        self._execute(now, out)

    # -- execution ------------------------------------------------------------------------------

    def _execute(self, now: int, out: list[Effect]) -> None:
        progressed = False
        while self._fetch is None:
            pp = self._committed.pop(self.last_executed + 1, None)
            if pp is None:
                break
            self._execute_batch(pp.seq, pp.batch, now, out)
            progressed = True
        if not progressed:
            return
        if self.active:
            self._backoff = 0
            if not self.is_primary:
                # Progress restarts the timer; it stops when nothing is pending.
                self._timer_ms = now + self.view_change_timeout_ms if self._pending else None
        self._try_propose(now, out)

    def _execute_batch(self, seq: int, batch: Sequence[Request], now: int, out: list[Effect]) -> None:
        executed: list[Request] = []
        results: list[bytes] = []
        for request in batch:
            last = self._clients.get(request.client)
            if last is not None and request.timestamp <= last[0]:
                continue
            result = self.app.execute(seq, request)
            if not isinstance(result, bytes):
                raise InvariantError(f"app.execute returned {type(result).__name__}, not bytes")
            self._clients[request.client] = (request.timestamp, result)
            executed.append(request)
            results.append(result)
            reply = Reply(self.view, request.timestamp, request.client, self.id, result)
            out.append(ClientReply(request.client, seal(self._keys, self.id, reply)))
        self.last_executed = seq
        for request in batch:
            self._forget_pending(request.client)
        out.append(Execute(seq, tuple(executed), tuple(results)))
        if seq % self.K == 0:
            self._take_checkpoint(seq, now, out)

    def _forget_pending(self, client: str) -> None:
        """Drop the client's pending requests that are executed (or superseded)."""
        if not self._pending_per_client.get(client):
            return
        last = self._clients.get(client, (-1, b""))[0]
        for key in [k for k in self._pending if k[0] == client and k[1] <= last]:
            del self._pending[key]
            self._pending_per_client[client] -= 1
        if not self._pending_per_client[client]:
            del self._pending_per_client[client]

    # -- checkpoints ----------------------------------------------------------------------------

    def _state_record(self) -> bytes:
        clients = [[client, ts, result] for client, (ts, result) in sorted(self._clients.items())]
        return encode_record([1, _STATE_TAG, self.app.snapshot(), clients])

    def _take_checkpoint(self, seq: int, now: int, out: list[Effect]) -> None:
        state = self._state_record()
        digest = digest_of(state)
        self._snapshots[seq] = (digest, state)
        env = seal(self._keys, self.id, Checkpoint(seq, digest, self.id))
        out.append(Broadcast(env))
        self._add_checkpoint_vote(Checkpoint(seq, digest, self.id), env, now, out)

    def _on_checkpoint(self, cp: Checkpoint, env: Envelope, now: int, out: list[Effect]) -> None:
        if cp.seq == 0 or cp.seq % self.K:
            self.dropped["malformed"] += 1
            return
        if cp.seq <= self.h:
            return  # already stable here
        self._add_checkpoint_vote(cp, env, now, out)

    def _add_checkpoint_vote(self, cp: Checkpoint, env: Envelope, now: int, out: list[Effect]) -> None:
        votes = self._checkpoint_votes.setdefault(cp.seq, {})
        if not self._add_vote(votes, cp.replica, cp.digest, env):
            return
        # Bound what one replica can make us hold: its most recent few checkpoints.
        mine = [seq for seq, v in self._checkpoint_votes.items() if cp.replica in v]
        if len(mine) > self.L // self.K + 2:
            oldest = min(mine)
            del self._checkpoint_votes[oldest][cp.replica]
            if not self._checkpoint_votes[oldest]:
                del self._checkpoint_votes[oldest]
        self._check_stable(cp.seq, now, out)

    def _check_stable(self, seq: int, now: int, out: list[Effect]) -> None:
        votes = self._checkpoint_votes.get(seq)
        if not votes or seq <= self.h:
            return
        counts = Counter(digest for digest, _ in votes.values())
        digest, count = max(counts.items(), key=lambda item: (item[1], item[0]))
        if count < self.quorum:
            return
        proof = tuple(env for _, (d, env) in sorted(votes.items()) if d == digest)[: self.quorum]
        if self.last_executed >= seq:
            self._advance_stable(seq, digest, proof, now, out)
        elif self._behind is None or self._behind.seq < seq:
            # Others are past us. Execution may still get here on its own (we
            # are often just a message behind); fetch the state if it does not.
            deadline = now + self.fetch_timeout_ms
            if self._behind is not None:
                deadline = self._behind.deadline_ms
            self._behind = _Behind(seq, digest, proof, deadline)

    def _advance_stable(self, seq: int, digest: bytes, proof: tuple[Envelope, ...], now: int,
                        out: list[Effect]) -> None:
        """``seq`` is stable (proved by ``proof``): move the watermarks and
        discard the log, certificates and checkpoints below it. If we have not
        executed up to it, fetch the state."""
        if seq <= self.h:
            return
        self.h = seq
        self.durable_version += 1
        self._stable_digest = digest
        self._stable_proof = proof
        for table in (self._log, self._committed, self._certs, self._checkpoint_votes):
            for old in [s for s in table if s <= seq]:
                del table[old]
        for old in [s for s in self._snapshots if s < seq]:
            del self._snapshots[old]
        if self._behind is not None and self._behind.seq <= seq:
            self._behind = None
        if self.last_executed >= seq:
            own = self._snapshots.get(seq)
            if own is not None and own[0] != digest:
                # Our state differs from a quorum's: a non-deterministic app. Recorded, not repaired.
                self.dropped["own_checkpoint_mismatch"] += 1
        else:
            sources = tuple(env.sender for env in proof if env.sender != self.id)
            self._fetch = _Fetch(seq, sources, 0, now)
            self._send_fetch(now, out)
        self._try_propose(now, out)

    # -- state transfer -------------------------------------------------------------------------

    def _send_fetch(self, now: int, out: list[Effect]) -> None:
        fetch = self._fetch
        if fetch is None or not fetch.sources:
            return
        source = fetch.sources[fetch.attempt % len(fetch.sources)]
        fetch.deadline_ms = now + self.fetch_timeout_ms
        out.append(Send(source, seal(self._keys, self.id, FetchState(fetch.seq, self.id))))
        out.append(FetchingState(fetch.seq, source))

    def _rate_limited(self, what: str, replica: int, now: int, interval: int) -> bool:
        last = self._served.get((what, replica))
        if last is not None and now - last < interval:
            return True
        self._served[(what, replica)] = now
        return False

    def _on_fetch_state(self, fs: FetchState, env: Envelope, now: int, out: list[Effect]) -> None:
        own = self._snapshots.get(self.h)
        if self.h < fs.seq or own is None or not self._stable_proof:
            return  # we cannot prove a state that recent
        if self._rate_limited("fetch", env.sender, now, self.fetch_timeout_ms // 2):
            return
        reply = StateReply(self.h, own[0], own[1], self._stable_proof, self.id)
        out.append(Send(env.sender, seal(self._keys, self.id, reply)))

    def _valid_checkpoint_proof(self, seq: int, digest: bytes, proof: Sequence[Envelope]) -> bool:
        if seq == 0:
            return not proof and digest == GENESIS_DIGEST
        if seq % self.K:
            return False
        signers: set[int] = set()
        for env in proof:
            cp = self._open_as(env, Checkpoint)
            if not isinstance(cp, Checkpoint) or cp.seq != seq or cp.digest != digest or env.sender in signers:
                return False
            signers.add(env.sender)
        return len(signers) >= self.quorum

    def _on_state_reply(self, sr: StateReply, env: Envelope, now: int, out: list[Effect]) -> None:
        fetch = self._fetch
        if fetch is None or sr.seq < fetch.seq:
            self.dropped["stale"] += 1
            return
        if digest_of(sr.snapshot) != sr.digest:
            self.dropped["bad_digest"] += 1
            return
        if not self._valid_checkpoint_proof(sr.seq, sr.digest, sr.proof):
            self.dropped["invalid_proof"] += 1
            return
        parsed = _parse_state(sr.snapshot)
        if parsed is None:
            # The digest is certified by a quorum, so this cannot come from correct replicas.
            self.dropped["malformed"] += 1
            return
        self._install_state(sr.seq, sr.digest, sr.snapshot, *parsed)
        self._fetch = None
        self._advance_stable(sr.seq, sr.digest, sr.proof, now, out)
        for client in list(self._pending_per_client):
            self._forget_pending(client)
        if self.active and not self._pending:
            self._timer_ms = None  # what we waited for came with the state: nothing to accuse the primary of
        out.append(StateTransferred(sr.seq, sr.digest))
        self._execute(now, out)
        self._try_propose(now, out)

    def _install_state(self, seq: int, digest: bytes, state: bytes, app_state: bytes,
                       table: dict[str, tuple[int, bytes]]) -> None:
        self.app.restore(app_state)
        self._clients = table
        self.last_executed = seq
        self._snapshots[seq] = (digest, state)
        self.durable_version += 1

    # -- view change ----------------------------------------------------------------------------

    def _start_view_change(self, view: int, now: int, out: list[Effect]) -> None:
        """Stop accepting normal-case messages and multicast VIEW-CHANGE for
        ``view`` with the stable checkpoint's proof and every prepared
        certificate above it (OSDI section 4.4)."""
        if view <= self.view:
            raise InvariantError(f"view change to {view} from view {self.view}")
        self.view = view
        self.active = False
        self.durable_version += 1
        self._timer_ms = None
        self._new_view_env = None
        prepared = tuple(cert.proof for seq, cert in sorted(self._certs.items()) if seq > self.h)
        vc = ViewChange(view, self.h, self._stable_digest, self._stable_proof, prepared, self.id)
        env = seal(self._keys, self.id, vc)
        self._own_view_changes[view] = env
        self._store_view_change(vc, env)
        out.append(Broadcast(env))
        out.append(ViewChanged(view, self.primary_of(view), False))
        self._check_view_change_quorum(now, out)

    def _check_view_change(self, vc: ViewChange, env: Envelope) -> bool:
        """Whether a view change's proofs hold: the checkpoint certificate, and
        for every prepared claim a pre-prepare by that view's primary and
        quorum-1 matching prepares from distinct backups, inside the window."""
        if vc.replica != env.sender:
            return False
        if not self._valid_checkpoint_proof(vc.stable_seq, vc.stable_digest, vc.checkpoint_proof):
            return False
        seen: set[int] = set()
        for proof in vc.prepared:
            pp = self._open_as(proof.pre_prepare, PrePrepare)
            if not isinstance(pp, PrePrepare) or proof.pre_prepare.sender != self.primary_of(pp.view):
                return False
            if pp.view >= vc.new_view or not vc.stable_seq < pp.seq <= vc.stable_seq + self.L or pp.seq in seen:
                return False
            if batch_digest(pp.batch) != pp.digest or self._check_batch(pp.batch) is not None:
                return False
            seen.add(pp.seq)
            signers: set[int] = set()
            for prepare_env in proof.prepares:
                p = self._open_as(prepare_env, Prepare)
                if (not isinstance(p, Prepare) or (p.view, p.seq, p.digest) != (pp.view, pp.seq, pp.digest)
                        or prepare_env.sender == self.primary_of(pp.view) or prepare_env.sender in signers):
                    return False
                signers.add(prepare_env.sender)
            if len(signers) < self.quorum - 1:
                return False
        return True

    def _on_view_change(self, vc: ViewChange, env: Envelope, now: int, out: list[Effect]) -> None:
        if vc.new_view < self.view or (vc.new_view == self.view and self.active):
            # The sender is behind: show it the new view we are in.
            if (self.active and self._new_view_env is not None and vc.new_view == self.view
                    and not self._rate_limited("nv", env.sender, now, self.status_interval_ms // 2)):
                out.append(Send(env.sender, self._new_view_env))
            return
        if not self._check_view_change(vc, env):
            self.dropped["invalid_proof"] += 1
            return
        if vc.new_view in self._view_changes.get(env.sender, {}):
            return
        self._store_view_change(vc, env)
        # Liveness rule (OSDI 4.5.2): f+1 replicas want a later view, so at
        # least one correct one does: join the smallest such view now.
        higher = [min(v for v in views if v > self.view) for r, views in self._view_changes.items()
                  if r != self.id and max(views) > self.view]
        if len(higher) >= self.f + 1:
            self._start_view_change(min(higher), now, out)
            return
        self._check_view_change_quorum(now, out)

    def _store_view_change(self, vc: ViewChange, env: Envelope) -> None:
        views = self._view_changes.setdefault(vc.replica, {})
        views[vc.new_view] = (vc, env)
        while len(views) > VIEW_CHANGES_KEPT:
            del views[min(views)]
        while len(self._own_view_changes) > VIEW_CHANGES_KEPT:
            del self._own_view_changes[min(self._own_view_changes)]

    def _check_view_change_quorum(self, now: int, out: list[Effect]) -> None:
        if self.active:
            return
        view = self.view
        ready = sorted((r, *views[view]) for r, views in self._view_changes.items() if view in views)
        if len(ready) < self.quorum:
            return
        if self._timer_ms is None:  # wait for NEW-VIEW, longer after each failed view change
            self._timer_ms = now + self.view_change_timeout_ms * (2 ** self._backoff)
        if self.primary_of(view) != self.id or self._new_view_sent == view:
            return
        own = [item for item in ready if item[0] == self.id]
        chosen = (own + [item for item in ready if item[0] != self.id])[: self.quorum]
        vcs = [vc for _, vc, _ in chosen]
        min_s, digest, proof, plan = self._plan_new_view(vcs)
        pre_prepares = [seal(self._keys, self.id, PrePrepare(view, seq, d, batch)) for seq, d, batch in plan]
        new_view = NewView(view, tuple(env for _, _, env in chosen), tuple(pre_prepares), self.id)
        env = seal(self._keys, self.id, new_view)
        self._new_view_sent = view
        out.append(Broadcast(env))
        decoded = [(PrePrepare(view, seq, d, batch), e) for (seq, d, batch), e in zip(plan, pre_prepares, strict=True)]
        self._enter_view(view, env, min_s, digest, proof, decoded, now, out)

    def _plan_new_view(self, vcs: Sequence[ViewChange]
                       ) -> tuple[int, bytes, tuple[Envelope, ...], list[tuple[int, bytes, tuple[Request, ...]]]]:
        """The O set of NEW-VIEW (OSDI 4.4): from the latest stable checkpoint
        among the view changes (min-s) to the highest prepared seq (max-s),
        the request prepared in the highest view, or the null request."""
        best = max(vcs, key=lambda vc: vc.stable_seq)
        min_s = best.stable_seq
        chosen: dict[int, tuple[int, bytes, tuple[Request, ...]]] = {}
        for vc in vcs:
            for proof in vc.prepared:
                pp = decode_message(proof.pre_prepare.body)
                if not isinstance(pp, PrePrepare) or pp.seq <= min_s:
                    continue
                current = chosen.get(pp.seq)
                if current is None or (pp.view, pp.digest) > (current[0], current[1]):
                    chosen[pp.seq] = (pp.view, pp.digest, pp.batch)
        max_s = max(chosen, default=min_s)
        plan = []
        for seq in range(min_s + 1, max_s + 1):
            if seq in chosen:
                _, digest, batch = chosen[seq]
                plan.append((seq, digest, batch))
            else:
                plan.append((seq, NULL_DIGEST, ()))
        return min_s, best.stable_digest, best.checkpoint_proof, plan

    def _on_new_view(self, nv: NewView, env: Envelope, now: int, out: list[Effect]) -> None:
        if nv.view < self.view or (nv.view == self.view and self.active):
            return  # stale, or already in it
        if env.sender != self.primary_of(nv.view):
            self.dropped["not_primary"] += 1
            return
        vcs: list[ViewChange] = []
        signers: set[int] = set()
        for vc_env in nv.view_changes:
            vc = self._open_as(vc_env, ViewChange)
            if (not isinstance(vc, ViewChange) or vc.new_view != nv.view or vc_env.sender in signers
                    or not self._check_view_change(vc, vc_env)):
                self.dropped["invalid_proof"] += 1
                return
            signers.add(vc_env.sender)
            vcs.append(vc)
        if len(vcs) < self.quorum:
            self.dropped["invalid_proof"] += 1
            return
        min_s, digest, proof, plan = self._plan_new_view(vcs)
        decoded: list[tuple[PrePrepare, Envelope]] = []
        for pp_env in nv.pre_prepares:
            pp = self._open_as(pp_env, PrePrepare)
            if not isinstance(pp, PrePrepare) or pp_env.sender != env.sender or pp.view != nv.view:
                self.dropped["invalid_proof"] += 1
                return
            decoded.append((pp, pp_env))
        if [(pp.seq, pp.digest, pp.batch) for pp, _ in decoded] != plan:
            self.dropped["invalid_proof"] += 1
            return
        self._enter_view(nv.view, env, min_s, digest, proof, decoded, now, out)

    def _enter_view(self, view: int, nv_env: Envelope, min_s: int, digest: bytes, proof: tuple[Envelope, ...],
                    pre_prepares: Sequence[tuple[PrePrepare, Envelope]], now: int, out: list[Effect]) -> None:
        self.view = view
        self.active = True
        self.durable_version += 1
        self._new_view_env = nv_env
        self._log = {}
        self._assigned = set()
        self._timer_ms = None
        self._view_changes = {r: kept for r, views in self._view_changes.items()
                              if (kept := {v: item for v, item in views.items() if v > view})}
        self._own_view_changes = {}  # a replica still changing to an older view will accept our NEW-VIEW
        if min_s > self.h:
            self._advance_stable(min_s, digest, proof, now, out)
        max_s = min_s
        for pp, pp_env in pre_prepares:
            max_s = max(max_s, pp.seq)
            if pp.seq <= self.h:
                continue
            slot = _Slot(pp, pp_env)
            self._log[pp.seq] = slot
            self._assigned.update(r.key for r in pp.batch)
            self._send_prepare(slot, pp, out)
        self._next_seq = max(max_s, self.h) + 1
        if not self.is_primary and self._pending:
            self._timer_ms = now + self.view_change_timeout_ms
        out.append(ViewChanged(view, self.primary, True))
        buffered = list(self._future)
        self._future.clear()
        for msg_view, message, env in buffered:
            if msg_view == self.view:
                self._dispatch(message, env, now, out)
            elif msg_view > self.view:
                self._future.append((msg_view, message, env))
        for seq in sorted(self._log):
            self._check_prepared(seq, now, out)
        self._try_propose(now, out)

    # -- retransmission -------------------------------------------------------------------------

    def _on_status(self, st: Status, env: Envelope, now: int, out: list[Effect]) -> None:
        """Answer a replica that is behind with what it lacks (Castro's thesis 5.2)."""
        j = env.sender
        if self._rate_limited("status", j, now, self.status_interval_ms // 2):
            return
        relay: list[Envelope] = []
        if st.stable_seq < self.h:
            relay.extend(self._stable_proof)
        if st.view < self.view or (st.view == self.view and not st.active):
            if not st.active and st.view in self._own_view_changes:
                relay.append(self._own_view_changes[st.view])  # may complete its quorum
            if self.active and self._new_view_env is not None:
                relay.append(self._new_view_env)
            elif not self.active and st.view != self.view and self.view in self._own_view_changes:
                relay.append(self._own_view_changes[self.view])  # counts towards its f+1 rule
        elif st.view == self.view and self.active:
            for seq in sorted(self._log):
                if seq < st.needs_from:
                    continue
                slot = self._log[seq]
                if slot.pre_prepare_env is not None:
                    relay.append(slot.pre_prepare_env)
                relay.extend(e for _, (_, e) in sorted(slot.prepares.items()))
                relay.extend(e for _, (_, e) in sorted(slot.commits.items()))
            for seq, votes in sorted(self._checkpoint_votes.items()):
                if seq > st.stable_seq and self.id in votes:
                    relay.append(votes[self.id][1])
        out.extend(Send(j, e) for e in relay if e.sender != j)


__all__ = [
    "GENESIS_DIGEST",
    "NULL_DIGEST",
    "Broadcast",
    "ClientReply",
    "Durable",
    "DurableCheckpoint",
    "Effect",
    "Execute",
    "FetchingState",
    "PbftApp",
    "Replica",
    "Send",
    "StateTransferred",
    "ViewChanged",
]
