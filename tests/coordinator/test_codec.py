"""The msgpack codec: round trips, and ``InvalidInput`` for anything malformed.

Every replica decodes every log entry with ``decode_command``, and the applier
only survives ``CoordinatorError`` (it applies the entry as a no-op). Any
other exception out of a decoder would stop a replica, so the decoders are
fuzzed with arbitrary bytes here.
"""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.codec import (
    KIND_COMMAND,
    KIND_RECORD,
    KIND_SNAPSHOT,
    check_command_size,
    decode_command,
    decode_record,
    decode_snapshot,
    encode_command,
    encode_record,
    encode_snapshot,
)
from coordinator.errors import InvalidInput, TooLarge
from coordinator.state import Limits, StateMachine
from coordinator.types import COMMAND_VERSION, Command

FUZZ = settings(max_examples=300, deadline=None)

# Plain data as msgpack carries it back: lists (never tuples), str keys.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
plain = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
commands = st.builds(
    Command,
    op=st.text(max_size=30),
    args=st.dictionaries(st.text(max_size=10), plain, max_size=5),
    now_ms=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    request_id=st.none() | st.text(max_size=40),
    proposal_id=st.none() | st.text(max_size=40),
    version=st.integers(min_value=0, max_value=2**32),
)


def _raw_command(row: object) -> bytes:
    """A command record whose body is ``row``, bypassing ``encode_command``."""
    return KIND_COMMAND + msgpack.packb(row, use_bin_type=True)


def _good_row() -> list[object]:
    return [COMMAND_VERSION, "kv.put", {"key": "a", "value": 1}, 5, "r-1", "p-1"]


def _assert_well_typed(command: Command) -> None:
    """What a successful decode promises to the state machine."""
    assert type(command.version) is int
    assert type(command.now_ms) is int
    assert type(command.op) is str
    assert isinstance(command.args, dict)
    assert all(type(k) is str for k in command.args)
    assert command.request_id is None or type(command.request_id) is str
    assert command.proposal_id is None or type(command.proposal_id) is str


# -- round trips ----------------------------------------------------------------------


@FUZZ
@given(commands)
def test_command_round_trip(command: Command) -> None:
    blob = encode_command(command)
    assert blob[:1] == KIND_COMMAND
    decoded = decode_command(blob)
    assert decoded == command
    assert encode_command(decoded) == blob


def test_command_round_trip_keeps_bool_distinct_from_int() -> None:
    command = Command(op="kv.cas", args={"key": "k", "value": True, "expected": 1}, now_ms=0)
    decoded = decode_command(encode_command(command))
    assert decoded.args["value"] is True
    assert type(decoded.args["expected"]) is int


@FUZZ
@given(st.dictionaries(st.text(max_size=10), plain, max_size=6))
def test_snapshot_round_trip_of_plain_data(data: dict[str, object]) -> None:
    blob = encode_snapshot(data)
    assert blob[:1] == KIND_SNAPSHOT
    assert decode_snapshot(blob) == data


@FUZZ
@given(plain)
def test_record_round_trip(obj: object) -> None:
    blob = encode_record(obj)
    assert blob[:1] == KIND_RECORD
    assert decode_record(blob) == obj


def test_state_machine_snapshot_round_trips_through_the_codec() -> None:
    sm = StateMachine(Limits(events_retained=3, kv_history=2))
    script = [
        ("kv.put", {"key": "a", "value": {"n": [1, 2.5, None, True, "x", b"\x00"]}}),
        ("kv.put", {"key": "b", "value": "two"}),
        ("kv.delete", {"key": "a"}),
        ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 5_000, "metadata": {"zone": "a"}}),
        ("agent.health", {"id": "w1", "health": "healthy"}),
        ("lock.acquire", {"name": "L", "holder": "w1", "ttl_ms": 2_000}),
        ("member.register", {"id": "n1", "raft": "127.0.0.1:1", "http": "127.0.0.1:2"}),
        ("kv.cas", {"key": "b", "value": 3, "expected": "nope"}),  # a rejected one, deduped
    ]
    for index, (op, args) in enumerate(script, start=1):
        sm.apply(index, Command(op=op, args=args, now_ms=1000 + index, request_id=f"r{index}"))
    blob = encode_snapshot(sm.snapshot_data())
    restored = StateMachine.from_snapshot_data(decode_snapshot(blob), sm.limits)
    assert encode_snapshot(restored.snapshot_data()) == blob
    # The restored dedupe table answers a retry exactly as the original does.
    retry = Command(op="kv.cas", args={}, now_ms=0, request_id="r8")
    assert restored.apply(9, retry) == sm.apply(9, retry)
    assert restored.apply(9 + 1, retry).error[0] == "conflict"


# -- malformed input: always InvalidInput ----------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_decode_command_garbage_is_invalid_input(blob: bytes) -> None:
    for candidate in (blob, KIND_COMMAND + blob):
        try:
            command = decode_command(candidate)
        except InvalidInput:
            continue
        _assert_well_typed(command)


@FUZZ
@given(st.lists(plain, min_size=5, max_size=7))
def test_decode_command_of_well_formed_msgpack_with_random_fields(row: list[object]) -> None:
    try:
        command = decode_command(_raw_command(row))
    except InvalidInput:
        return
    _assert_well_typed(command)


@FUZZ
@given(st.binary(max_size=200))
def test_decode_snapshot_garbage_is_invalid_input(blob: bytes) -> None:
    for candidate in (blob, KIND_SNAPSHOT + blob):
        try:
            data = decode_snapshot(candidate)
        except InvalidInput:
            continue
        assert isinstance(data, dict)


@FUZZ
@given(st.binary(max_size=200))
def test_decode_record_garbage_is_invalid_input(blob: bytes) -> None:
    for candidate in (blob, KIND_RECORD + blob):
        try:
            decode_record(candidate)
        except InvalidInput:
            continue


@pytest.mark.parametrize("decode", [decode_command, decode_snapshot, decode_record])
def test_empty_input_is_invalid_input(decode) -> None:
    with pytest.raises(InvalidInput):
        decode(b"")


@pytest.mark.parametrize("kind", [KIND_SNAPSHOT, KIND_RECORD, b"X", b"\x00", b"c"])
def test_decode_command_refuses_a_wrong_kind_byte(kind: bytes) -> None:
    blob = encode_command(Command(op="noop", args={}, now_ms=1))
    with pytest.raises(InvalidInput) as info:
        decode_command(kind + blob[1:])
    assert info.value.field == "command"


@pytest.mark.parametrize(
    ("decode", "blob"),
    [
        (decode_snapshot, encode_command(Command(op="noop", args={}, now_ms=1))),
        (decode_snapshot, encode_record({"a": 1})),
        (decode_record, encode_snapshot({"a": 1})),
        (decode_command, encode_snapshot({"a": 1})),
        (decode_command, encode_record(_good_row())),
    ],
    ids=["command-as-snapshot", "record-as-snapshot", "snapshot-as-record", "snapshot-as-command",
         "record-as-command"],
)
def test_records_of_another_kind_are_refused(decode, blob: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode(blob)


def test_raw_good_row_decodes() -> None:
    # The baseline for the wrong-type cases below: only the named field differs.
    command = decode_command(_raw_command(_good_row()))
    assert command == Command(op="kv.put", args={"key": "a", "value": 1}, now_ms=5, request_id="r-1",
                              proposal_id="p-1")


@pytest.mark.parametrize(
    ("position", "value"),
    [
        (0, "1"),  # version
        (0, None),
        (0, 1.0),
        (0, True),  # a bool is not a version
        (1, 5),  # op
        (1, None),
        (1, b"kv.put"),
        (2, [1, 2]),  # args
        (2, "args"),
        (2, None),
        (3, "5"),  # now_ms
        (3, 5.0),
        (3, None),
        (3, True),  # a bool is not a time
        (4, 7),  # request_id
        (4, b"r-1"),
        (5, ["p"]),  # proposal_id
        (5, 1),
    ],
)
def test_decode_command_refuses_wrong_field_types(position: int, value: object) -> None:
    row = _good_row()
    row[position] = value
    with pytest.raises(InvalidInput):
        decode_command(_raw_command(row))


@pytest.mark.parametrize(
    "body",
    [
        None,
        5,
        "command",
        {"op": "noop"},
        [],
        _good_row()[:5],
        [*_good_row(), None, None, None],
        [*_good_row(), None, 7],  # principal
        [*_good_row(), 7],  # request_digest
    ],
)
def test_decode_command_refuses_wrong_shapes(body: object) -> None:
    with pytest.raises(InvalidInput):
        decode_command(_raw_command(body))


@pytest.mark.parametrize(
    "value",
    [
        msgpack.ExtType(5, b"xx"),
        msgpack.Timestamp(1, 0),
        [1, {"deep": msgpack.ExtType(0, b"")}],
    ],
    ids=["ext", "timestamp", "nested-ext"],
)
def test_decode_command_refuses_extension_types(value: object) -> None:
    # Decoding never constructs anything but plain data (codec docstring).
    row = _good_row()
    row[2] = {"key": "a", "value": value}
    with pytest.raises(InvalidInput):
        decode_command(_raw_command(row))


def test_decode_command_refuses_non_string_keys_in_args() -> None:
    row = _good_row()
    row[2] = {1: "a"}
    with pytest.raises(InvalidInput):
        decode_command(_raw_command(row))


def test_decode_command_refuses_bytes_keys_in_args() -> None:
    row = _good_row()
    row[2] = {b"key": "a", "value": 1}
    with pytest.raises(InvalidInput):
        decode_command(_raw_command(row))


def test_decode_command_refuses_invalid_utf8() -> None:
    blob = _raw_command(_good_row())
    needle = msgpack.packb("kv.put")
    broken = needle[:1] + b"\xff" + needle[2:]
    assert needle in blob
    with pytest.raises(InvalidInput):
        decode_command(blob.replace(needle, broken, 1))


@pytest.mark.parametrize("depth", [100, 5_000])
def test_deep_nesting_never_escapes_as_another_error(depth: int) -> None:
    # Built by hand: packb itself refuses such depth. [1, "kv.put", {"key": [[...1...]]}, 5, nil, nil]
    blob = (KIND_COMMAND + b"\x96\x01" + msgpack.packb("kv.put") + b"\x81" + msgpack.packb("key")
            + b"\x91" * depth + b"\x01" + b"\x05\xc0\xc0")
    try:
        command = decode_command(blob)
    except InvalidInput:
        return
    _assert_well_typed(command)


@pytest.mark.parametrize("decode, encoded", [
    (decode_command, encode_command(Command(op="kv.put", args={"key": "k", "value": "v" * 40}, now_ms=1,
                                            request_id="r", proposal_id="p"))),
    (decode_snapshot, encode_snapshot(StateMachine().snapshot_data())),
    (decode_record, encode_record({"term": 3, "vote": "n1", "peers": ["a", "b"]})),
], ids=["command", "snapshot", "record"])
def test_every_truncation_is_invalid_input(decode, encoded: bytes) -> None:
    for cut in range(len(encoded)):
        with pytest.raises(InvalidInput):
            decode(encoded[:cut])


@pytest.mark.parametrize("decode, encoded", [
    (decode_command, encode_command(Command(op="noop", args={}, now_ms=1))),
    (decode_snapshot, encode_snapshot({"v": 1})),
    (decode_record, encode_record([1, 2])),
], ids=["command", "snapshot", "record"])
def test_trailing_bytes_are_invalid_input(decode, encoded: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode(encoded + b"\x00")


@pytest.mark.parametrize("body", [[1, 2], "snapshot", None, 3])
def test_decode_snapshot_requires_a_map(body: object) -> None:
    with pytest.raises(InvalidInput):
        decode_snapshot(KIND_SNAPSHOT + msgpack.packb(body))


def test_float_fields_survive_exactly() -> None:
    command = Command(op="kv.put", args={"key": "k", "value": [0.1, -0.0, 1e308, math.pi]}, now_ms=1)
    value = decode_command(encode_command(command)).args["value"]
    assert value == [0.1, -0.0, 1e308, math.pi]
    assert math.copysign(1.0, value[1]) == -1.0


def test_check_command_size() -> None:
    check_command_size(b"x" * 10, 10)
    with pytest.raises(TooLarge):
        check_command_size(b"x" * 11, 10)


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return value


def test_encode_refuses_what_msgpack_cannot_carry() -> None:
    from coordinator.errors import InvalidInput

    for bad in ({"value": 2**70}, {"value": "\ud800"}, {"value": object()}):
        with pytest.raises(InvalidInput):
            encode_command(Command(op="kv.put", args=bad, now_ms=1))


def test_args_nested_past_the_limit_are_refused_both_ways() -> None:
    from coordinator.codec import MAX_ARGS_DEPTH, _pack
    from coordinator.errors import InvalidInput

    ok = Command(op="kv.put", args={"key": "k", "value": _nested(MAX_ARGS_DEPTH - 1)}, now_ms=1)
    assert decode_command(encode_command(ok)) == ok
    deep = {"key": "k", "value": _nested(MAX_ARGS_DEPTH)}
    with pytest.raises(InvalidInput):
        encode_command(Command(op="kv.put", args=deep, now_ms=1))
    forged = b"C" + _pack([1, "kv.put", deep, 1, None, None])  # a peer that skipped the check
    with pytest.raises(InvalidInput):
        decode_command(forged)


def _deep(depth: int, shape: int) -> object:
    """A value ``depth`` levels deep (itself at level 1): lists, maps or both,
    possibly empty at the bottom, so every kind of container meets the limit."""
    value: object = [] if shape == 3 else ({} if shape == 4 else "leaf")
    for level in range(depth - 1):
        value = {"k": value, "x": 1} if (shape == 1 or (shape == 2 and level % 2)) else [0, value]
    return value


@FUZZ
@given(st.dictionaries(st.text(max_size=4), plain | st.builds(_deep, st.integers(1, 140), st.integers(0, 4)),
                       max_size=3),
       st.integers(-2, 3), st.integers(0, 4))
def test_decode_command_refuses_exactly_what_check_value_refuses(args: dict[str, object], extra: int,
                                                                shape: int) -> None:
    """The decoder checks only the depth of what msgpack gave back (whose
    strings and integers always pass ``check_value``): its verdict must be
    ``check_value``'s on the same decoded args, for every depth near the limit."""
    from coordinator.codec import MAX_ARGS_DEPTH, check_value

    args = {**args, "deep": _deep(MAX_ARGS_DEPTH - 1 + extra, shape)}
    blob = _raw_command([COMMAND_VERSION, "kv.put", args, 5, None, None])
    decoded_args = msgpack.unpackb(blob[1:], raw=False)[2]
    try:
        check_value(decoded_args, "args")
        expected = True
    except InvalidInput:
        expected = False
    try:
        command = decode_command(blob)
    except InvalidInput:
        assert not expected
    else:
        assert expected
        assert command.args == decoded_args


def test_a_command_carries_its_principal_and_request_digest() -> None:
    for command in (Command("kv.put", {"key": "k"}, 5, "agent:a/r", "p-1", request_digest="d", principal="agent:a"),
                    Command("kv.put", {"key": "k"}, 5, None, "p-1", principal="admin"),
                    Command("kv.put", {"key": "k"}, 5, "admin/r", "p-1", request_digest="d")):
        assert decode_command(encode_command(command)) == command


@FUZZ
@given(plain)
def test_the_per_thread_packer_writes_the_same_bytes_as_packb(value: object) -> None:
    """Commands and results go through a Packer kept per thread: the bytes
    every replica hashes must not depend on it, nor on an earlier failure."""
    from coordinator.codec import _pack, _pack_entry

    with pytest.raises(TypeError):
        _pack_entry([value, object()])
    assert _pack_entry(value) == _pack(value)
    assert _pack_entry([value, 2]) == _pack([value, 2])


def test_each_thread_has_its_own_packer() -> None:
    import threading

    from coordinator.codec import _pack, _pack_entry

    rows = [[n, "k" * n, {"v": [n] * 50}] for n in range(200)]
    out: dict[int, list[bytes]] = {}

    def pack_all(slot: int) -> None:
        out[slot] = [_pack_entry(row) for _ in range(20) for row in rows]

    threads = [threading.Thread(target=pack_all, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [_pack(row) for _ in range(20) for row in rows]
    assert all(packed == expected for packed in out.values())
