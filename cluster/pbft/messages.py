"""PBFT messages, their canonical encoding, and signed envelopes.

Every protocol message is a frozen dataclass. Its wire form (the *body*) is a
``coordinator.codec`` data record (msgpack, record kind ``R``) of the list
``[PROTOCOL_VERSION, tag, *fields]``: lists only, never maps, so one message
has exactly one encoding, and decoding then re-encoding a well-formed message
gives back the same bytes. Digests and signatures are computed over these
bytes.

A replica sends every message inside an ``Envelope(sender, body, signature)``:
``signature`` is the sender's Ed25519 signature (``coordinator.crypto``) of
``SIGNING_CONTEXT + body``. A receiver checks the signature against the
sender's configured public key *before* it decodes the body. Envelopes nest:
a view change carries the signed checkpoint and prepare messages that prove
what it claims, exactly as received, so anyone can check them again.

Client requests are signed by the client (``REQUEST_CONTEXT``) and travel
with their signature inside pre-prepares, so a faulty primary cannot invent
requests, only order (or withhold) real ones.

Decoders are strict (types, lengths, ranges) and bounded; anything else
raises ``MalformedMessage``. Nothing here is stateful: every function is
pure and thread-safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.pbft.errors import MalformedMessage
from coordinator.codec import decode_record, encode_record
from coordinator.crypto import AgentKeys, verify
from coordinator.errors import InvalidInput

PROTOCOL_VERSION = 1
# Domain separation: a replica's or client's signature over a PBFT message
# can never double as its signature over anything else signed with the key.
SIGNING_CONTEXT = b"coordinator/pbft/v1/message\n"
REQUEST_CONTEXT = b"coordinator/pbft/v1/request\n"

DIGEST_BYTES = 32
MAX_CLIENT_ID_LEN = 256
MAX_OPERATION_BYTES = 1 << 20
MAX_RESULT_BYTES = 1 << 20
MAX_BATCH = 1024
MAX_REPLICAS = 1024
MAX_SIGNATURE_LEN = 128  # base64 of 64 bytes is 88 characters
MAX_PREPARED_PROOFS = 4096
MAX_SNAPSHOT_BYTES = 256 << 20
MAX_MESSAGE_BYTES = MAX_SNAPSHOT_BYTES + (1 << 20)
_U64 = 2**64


def digest_of(data: bytes) -> bytes:
    """SHA-256, the digest used everywhere in the protocol."""
    return hashlib.sha256(data).digest()


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A client's operation. ``timestamp`` orders one client's requests
    (PBFT's t): replicas execute a request only if its timestamp is above the
    last one they executed for that client, which makes retries idempotent.
    ``signature`` is the client's over ``signed_bytes()``."""

    client: str
    timestamp: int
    operation: bytes
    signature: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.client, self.timestamp)

    def signed_bytes(self) -> bytes:
        return REQUEST_CONTEXT + encode_record([PROTOCOL_VERSION, "req", self.client, self.timestamp, self.operation])


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message body signed by replica ``sender``."""

    sender: int
    body: bytes
    signature: str


@dataclass(frozen=True, slots=True)
class PrePrepare:
    """The primary of ``view`` assigns ``seq`` to ``batch``; ``digest`` is
    ``batch_digest(batch)``. An empty batch is the null request."""

    view: int
    seq: int
    digest: bytes
    batch: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class Prepare:
    view: int
    seq: int
    digest: bytes
    replica: int


@dataclass(frozen=True, slots=True)
class Commit:
    view: int
    seq: int
    digest: bytes
    replica: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The result of ``client``'s request ``timestamp``, as executed by
    ``replica``. The client compares ``result`` (its digest is
    ``result_digest``) across f+1 replicas."""

    view: int
    timestamp: int
    client: str
    replica: int
    result: bytes

    @property
    def result_digest(self) -> bytes:
        return digest_of(self.result)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """``replica``'s state after executing ``seq`` has digest ``digest``."""

    seq: int
    digest: bytes
    replica: int


@dataclass(frozen=True, slots=True)
class PreparedProof:
    """The P_m of a view change: a pre-prepare and 2f matching prepares from
    distinct backups, all as signed envelopes."""

    pre_prepare: Envelope
    prepares: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class ViewChange:
    """``replica`` asks to move to ``new_view``. It proves its last stable
    checkpoint (``stable_seq``, ``stable_digest``) with 2f+1 signed
    checkpoints (none for the initial state, ``stable_seq == 0``) and lists
    the requests prepared above it."""

    new_view: int
    stable_seq: int
    stable_digest: bytes
    checkpoint_proof: tuple[Envelope, ...]
    prepared: tuple[PreparedProof, ...]
    replica: int


@dataclass(frozen=True, slots=True)
class NewView:
    """The primary of ``view`` starts it: 2f+1 view changes (V) and the
    pre-prepares (O) recomputed from them, which every replica checks."""

    view: int
    view_changes: tuple[Envelope, ...]
    pre_prepares: tuple[Envelope, ...]
    replica: int


@dataclass(frozen=True, slots=True)
class Forward:
    """A backup passes a client's request on to the primary."""

    request: Request
    replica: int


@dataclass(frozen=True, slots=True)
class FetchState:
    """``replica`` is behind the stable checkpoint ``seq`` and asks for the state."""

    seq: int
    replica: int


@dataclass(frozen=True, slots=True)
class StateReply:
    """The checkpointed state at ``seq`` (``snapshot``, whose digest is
    ``digest``) with the 2f+1 signed checkpoints that make it stable."""

    seq: int
    digest: bytes
    snapshot: bytes
    proof: tuple[Envelope, ...]
    replica: int


@dataclass(frozen=True, slots=True)
class Status:
    """Periodic summary a replica broadcasts so that others can retransmit
    what it misses (Castro's thesis, section 5.2: status messages).
    ``needs_from`` is the lowest sequence number it lacks messages for in
    ``view``: its first slot that is not committed there, or the one after
    the last it executed. (A slot executed in an earlier view is not
    committed in this one until this replica's own prepare and commit
    count, so "executed" alone would not do.)"""

    view: int
    active: bool
    last_executed: int
    stable_seq: int
    needs_from: int
    replica: int


Message = (PrePrepare | Prepare | Commit | Reply | Checkpoint | ViewChange | NewView | Forward | FetchState
           | StateReply | Status)


# -- encoding -----------------------------------------------------------------------------------


def _request_row(r: Request) -> list[Any]:
    return [r.client, r.timestamp, r.operation, r.signature]


def _envelope_row(e: Envelope) -> list[Any]:
    return [e.sender, e.body, e.signature]


def _rows(message: Message) -> list[Any]:
    match message:
        case PrePrepare(view, seq, digest, batch):
            return ["pp", view, seq, digest, [_request_row(r) for r in batch]]
        case Prepare(view, seq, digest, replica):
            return ["p", view, seq, digest, replica]
        case Commit(view, seq, digest, replica):
            return ["c", view, seq, digest, replica]
        case Reply(view, timestamp, client, replica, result):
            return ["reply", view, timestamp, client, replica, result]
        case Checkpoint(seq, digest, replica):
            return ["cp", seq, digest, replica]
        case ViewChange(new_view, stable_seq, stable_digest, proof, prepared, replica):
            return ["vc", new_view, stable_seq, stable_digest, [_envelope_row(e) for e in proof],
                    [[_envelope_row(p.pre_prepare), [_envelope_row(e) for e in p.prepares]] for p in prepared],
                    replica]
        case NewView(view, vcs, pps, replica):
            return ["nv", view, [_envelope_row(e) for e in vcs], [_envelope_row(e) for e in pps], replica]
        case Forward(request, replica):
            return ["fwd", _request_row(request), replica]
        case FetchState(seq, replica):
            return ["fetch", seq, replica]
        case StateReply(seq, digest, snapshot, proof, replica):
            return ["state", seq, digest, snapshot, [_envelope_row(e) for e in proof], replica]
        case Status(view, active, last_executed, stable_seq, needs_from, replica):
            return ["status", view, active, last_executed, stable_seq, needs_from, replica]
    raise TypeError(f"not a PBFT message: {type(message).__name__}")


def encode_message(message: Message) -> bytes:
    """The canonical body bytes of ``message``."""
    return encode_record([PROTOCOL_VERSION, *_rows(message)])


def batch_digest(batch: Sequence[Request]) -> bytes:
    """The digest a pre-prepare carries: over the requests *with* their
    client signatures, so two batches that differ in any bit differ here."""
    return digest_of(encode_record([PROTOCOL_VERSION, "batch", [_request_row(r) for r in batch]]))


def _fail(what: str) -> MalformedMessage:
    return MalformedMessage(f"malformed PBFT message: {what}")


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _U64:
        raise _fail(f"{what} must be an unsigned 64-bit integer")
    return value


def _replica_id(value: Any, what: str = "replica") -> int:
    if type(value) is not int or not 0 <= value < MAX_REPLICAS:
        raise _fail(f"{what} must be a replica id")
    return value


def _bytes(value: Any, what: str, max_len: int) -> bytes:
    if not isinstance(value, bytes) or len(value) > max_len:
        raise _fail(f"{what} must be at most {max_len} bytes")
    return value


def _digest(value: Any, what: str = "digest") -> bytes:
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise _fail(f"{what} must be {DIGEST_BYTES} bytes")
    return value


def _text(value: Any, what: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise _fail(f"{what} must be a string of at most {max_len} characters")
    return value


def _list(value: Any, what: str, max_len: int, exact: int | None = None) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_len or (exact is not None and len(value) != exact):
        raise _fail(f"{what} must be a list" + (f" of {exact}" if exact is not None else f" of at most {max_len}"))
    return value


def _request(row: Any) -> Request:
    client, timestamp, operation, signature = _list(row, "request", 4, exact=4)
    client = _text(client, "client", MAX_CLIENT_ID_LEN)
    if not client:
        raise _fail("client must not be empty")
    return Request(client, _uint(timestamp, "timestamp"), _bytes(operation, "operation", MAX_OPERATION_BYTES),
                   _text(signature, "request signature", MAX_SIGNATURE_LEN))


def _envelope(row: Any) -> Envelope:
    sender, body, signature = _list(row, "envelope", 3, exact=3)
    return Envelope(_replica_id(sender, "sender"), _bytes(body, "body", MAX_MESSAGE_BYTES),
                    _text(signature, "signature", MAX_SIGNATURE_LEN))


def _envelopes(value: Any, what: str, max_len: int = MAX_REPLICAS) -> tuple[Envelope, ...]:
    return tuple(_envelope(row) for row in _list(value, what, max_len))


def decode_message(body: bytes) -> Message:
    """Parse a body. Raises ``MalformedMessage`` for anything but a
    well-formed message of this protocol version."""
    if not isinstance(body, bytes) or len(body) > MAX_MESSAGE_BYTES:
        raise _fail("body too large or not bytes")
    try:
        row = decode_record(body)
    except InvalidInput:
        raise _fail("undecodable") from None
    if not isinstance(row, list) or len(row) < 2:
        raise _fail("not a list")
    if row[0] != PROTOCOL_VERSION or type(row[0]) is not int:
        raise _fail(f"unsupported protocol version {row[0]!r}")
    tag, fields = row[1], row[2:]
    try:
        return _DECODERS[tag](fields)
    except (KeyError, TypeError):
        raise _fail(f"unknown tag {tag!r}") from None
    except ValueError:  # wrong number of fields to unpack
        raise _fail(f"{tag!r} has {len(fields)} fields") from None


def _dec_pre_prepare(f: list[Any]) -> PrePrepare:
    view, seq, digest, batch = f
    return PrePrepare(_uint(view, "view"), _uint(seq, "seq"), _digest(digest),
                      tuple(_request(r) for r in _list(batch, "batch", MAX_BATCH)))


def _dec_prepare(f: list[Any]) -> Prepare:
    view, seq, digest, replica = f
    return Prepare(_uint(view, "view"), _uint(seq, "seq"), _digest(digest), _replica_id(replica))


def _dec_commit(f: list[Any]) -> Commit:
    view, seq, digest, replica = f
    return Commit(_uint(view, "view"), _uint(seq, "seq"), _digest(digest), _replica_id(replica))


def _dec_reply(f: list[Any]) -> Reply:
    view, timestamp, client, replica, result = f
    return Reply(_uint(view, "view"), _uint(timestamp, "timestamp"), _text(client, "client", MAX_CLIENT_ID_LEN),
                 _replica_id(replica), _bytes(result, "result", MAX_RESULT_BYTES))


def _dec_checkpoint(f: list[Any]) -> Checkpoint:
    seq, digest, replica = f
    return Checkpoint(_uint(seq, "seq"), _digest(digest), _replica_id(replica))


def _dec_view_change(f: list[Any]) -> ViewChange:
    new_view, stable_seq, stable_digest, proof, prepared, replica = f
    proofs = []
    for row in _list(prepared, "prepared", MAX_PREPARED_PROOFS):
        pre_prepare, prepares = _list(row, "prepared proof", 2, exact=2)
        proofs.append(PreparedProof(_envelope(pre_prepare), _envelopes(prepares, "prepares")))
    return ViewChange(_uint(new_view, "new_view"), _uint(stable_seq, "stable_seq"),
                      _digest(stable_digest, "stable_digest"), _envelopes(proof, "checkpoint_proof"),
                      tuple(proofs), _replica_id(replica))


def _dec_new_view(f: list[Any]) -> NewView:
    view, vcs, pps, replica = f
    return NewView(_uint(view, "view"), _envelopes(vcs, "view_changes"),
                   _envelopes(pps, "pre_prepares", MAX_PREPARED_PROOFS), _replica_id(replica))


def _dec_forward(f: list[Any]) -> Forward:
    request, replica = f
    return Forward(_request(request), _replica_id(replica))


def _dec_fetch(f: list[Any]) -> FetchState:
    seq, replica = f
    return FetchState(_uint(seq, "seq"), _replica_id(replica))


def _dec_state(f: list[Any]) -> StateReply:
    seq, digest, snapshot, proof, replica = f
    return StateReply(_uint(seq, "seq"), _digest(digest), _bytes(snapshot, "snapshot", MAX_SNAPSHOT_BYTES),
                      _envelopes(proof, "proof"), _replica_id(replica))


def _dec_status(f: list[Any]) -> Status:
    view, active, last_executed, stable_seq, needs_from, replica = f
    if not isinstance(active, bool):
        raise _fail("active must be a boolean")
    return Status(_uint(view, "view"), active, _uint(last_executed, "last_executed"),
                  _uint(stable_seq, "stable_seq"), _uint(needs_from, "needs_from"), _replica_id(replica))


_DECODERS = {
    "pp": _dec_pre_prepare, "p": _dec_prepare, "c": _dec_commit, "reply": _dec_reply, "cp": _dec_checkpoint,
    "vc": _dec_view_change, "nv": _dec_new_view, "fwd": _dec_forward, "fetch": _dec_fetch,
    "state": _dec_state, "status": _dec_status,
}


# -- envelopes and signatures -------------------------------------------------------------------


def seal(keys: AgentKeys, sender: int, message: Message) -> Envelope:
    """Encode ``message`` and sign it as replica ``sender``."""
    body = encode_message(message)
    return Envelope(sender, body, keys.sign(SIGNING_CONTEXT + body))


def verify_envelope(envelope: Envelope, public_key: str) -> bool:
    """Whether ``envelope.signature`` is ``public_key``'s over its body. Never raises."""
    if not isinstance(envelope.body, bytes) or not isinstance(envelope.signature, str):
        return False
    return verify(public_key, SIGNING_CONTEXT + envelope.body, envelope.signature)


def encode_envelope(envelope: Envelope) -> bytes:
    """The bytes a transport carries for ``envelope``."""
    return encode_record([PROTOCOL_VERSION, "env", *_envelope_row(envelope)])


def decode_envelope(data: bytes) -> Envelope:
    """Parse transport bytes; raises ``MalformedMessage``. Does not check the signature."""
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES + 1024:
        raise _fail("envelope too large or not bytes")
    try:
        row = decode_record(data)
    except InvalidInput:
        raise _fail("undecodable envelope") from None
    if not isinstance(row, list) or len(row) != 5 or row[0] != PROTOCOL_VERSION or row[1] != "env":
        raise _fail("not an envelope")
    return _envelope(row[2:])


def sign_request(keys: AgentKeys, client: str, timestamp: int, operation: bytes) -> Request:
    """A request signed by the client that owns ``keys``."""
    unsigned = Request(client, timestamp, operation)
    return Request(client, timestamp, operation, keys.sign(unsigned.signed_bytes()))


def verify_request(request: Request, public_key: str) -> bool:
    """Whether the request carries its client's valid signature. Never raises."""
    if not request.signature:
        return False
    return verify(public_key, request.signed_bytes(), request.signature)


__all__ = [
    "DIGEST_BYTES",
    "PROTOCOL_VERSION",
    "Checkpoint",
    "Commit",
    "Envelope",
    "FetchState",
    "Forward",
    "Message",
    "NewView",
    "PrePrepare",
    "Prepare",
    "PreparedProof",
    "Reply",
    "Request",
    "StateReply",
    "Status",
    "ViewChange",
    "batch_digest",
    "decode_envelope",
    "decode_message",
    "digest_of",
    "encode_envelope",
    "encode_message",
    "seal",
    "sign_request",
    "verify_envelope",
    "verify_request",
]
