"""cluster/pbft/messages.py: canonical encoding, strict decoding, signatures."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.pbft.errors import MalformedMessage
from cluster.pbft.messages import (
    Checkpoint,
    Commit,
    Envelope,
    FetchState,
    Forward,
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
    encode_envelope,
    encode_message,
    seal,
    sign_request,
    verify_envelope,
    verify_request,
)
from cluster.pbft.sim import client_keys, replica_keys
from coordinator.codec import encode_record

KEYS = replica_keys(0)
ALICE = client_keys("alice")
D = digest_of(b"x")


def _request(ts: int = 1, op: bytes = b"add:1") -> Request:
    return sign_request(ALICE, "alice", ts, op)


def _examples() -> list[object]:
    env = seal(KEYS, 0, Prepare(0, 1, D, 0))
    return [
        PrePrepare(3, 7, batch_digest([_request()]), (_request(),)),
        PrePrepare(0, 1, batch_digest(()), ()),
        Prepare(1, 2, D, 3),
        Commit(1, 2, D, 3),
        Reply(0, 5, "alice", 2, b"result"),
        Checkpoint(16, D, 1),
        ViewChange(2, 16, D, (env,), (PreparedProof(env, (env, env)),), 1),
        NewView(2, (env,), (env,), 2),
        Forward(_request(), 1),
        FetchState(16, 3),
        StateReply(16, D, b"snapshot", (env,), 0),
        Status(4, False, 10, 8, 11, 2),
    ]


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_to_the_same_bytes(message: object) -> None:
    body = encode_message(message)  # type: ignore[arg-type]
    decoded = decode_message(body)
    assert decoded == message
    assert encode_message(decoded) == body


@given(view=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**64 - 1), replica=st.integers(0, 1023),
       digest=st.binary(min_size=32, max_size=32))
@settings(max_examples=50)
def test_round_trip_over_the_whole_range(view: int, seq: int, replica: int, digest: bytes) -> None:
    for message in (Prepare(view, seq, digest, replica), Commit(view, seq, digest, replica)):
        assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize("body", [
    b"",
    b"garbage",
    encode_record("not a list"),
    encode_record([2, "p", 0, 1, D, 0]),  # another protocol version
    encode_record([True, "p", 0, 1, D, 0]),  # a bool is not a version
    encode_record([1, "nope", 0]),
    encode_record([1, "p", 0, 1, D]),  # a field missing
    encode_record([1, "p", 0, 1, D, 0, 9]),  # a field too many
    encode_record([1, "p", -1, 1, D, 0]),  # negative view
    encode_record([1, "p", 0, 1, b"short", 0]),  # digest of the wrong size
    encode_record([1, "p", 0, 1, D, 5000]),  # replica id out of range
    encode_record([1, "p", "0", 1, D, 0]),  # a string for an int
    encode_record([1, "pp", 0, 1, D, [["", 1, b"op", "sig"]]]),  # empty client id
    encode_record([1, "pp", 0, 1, D, [["alice", 1, "op", "sig"]]]),  # operation not bytes
    encode_record([1, "status", 0, 1, 0, 0, 1, 0]),  # active must be a bool
])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_message(body)


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_decoding_arbitrary_bytes_only_ever_raises_malformed(data: bytes) -> None:
    for decoder in (decode_message, decode_envelope):
        try:
            decoder(data)
        except MalformedMessage:
            pass


def test_envelope_signature_covers_sender_key_and_body() -> None:
    env = seal(KEYS, 0, Prepare(0, 1, D, 0))
    assert verify_envelope(env, KEYS.public_key)
    assert not verify_envelope(env, replica_keys(1).public_key)
    assert not verify_envelope(Envelope(0, env.body + b"x", env.signature), KEYS.public_key)
    assert not verify_envelope(Envelope(0, env.body, ""), KEYS.public_key)
    assert decode_envelope(encode_envelope(env)) == env


def test_request_signature_binds_client_timestamp_and_operation() -> None:
    request = _request(3, b"add:5")
    assert verify_request(request, ALICE.public_key)
    for forged in (Request("bob", 3, b"add:5", request.signature), Request("alice", 4, b"add:5", request.signature),
                   Request("alice", 3, b"add:6", request.signature), Request("alice", 3, b"add:5")):
        assert not verify_request(forged, ALICE.public_key)


def test_a_request_signature_is_not_a_message_signature() -> None:
    """Domain separation: the two contexts never sign the same bytes."""
    request = _request()
    assert not verify_envelope(Envelope(0, request.signed_bytes(), request.signature), ALICE.public_key)


def test_batch_digest_depends_on_order_and_signatures() -> None:
    a, b = _request(1), _request(2)
    assert batch_digest([a, b]) != batch_digest([b, a])
    assert batch_digest([a]) != batch_digest([Request(a.client, a.timestamp, a.operation, "")])
    assert batch_digest([a, b]) == batch_digest((a, b))
