"""msgpack <-> core types. The only module that imports msgpack.

Every record starts with a one-byte record kind and carries a version, so a
reader can refuse what it does not understand instead of misreading it.
Decoding is bounded (``max_*_len``) and never constructs anything but plain
data: there is no pickle anywhere on our wire or in our files.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from coordinator.errors import InvalidInput, TooLarge
from coordinator.types import COMMAND_VERSION, Command, Result, build_command

KIND_COMMAND = b"C"
KIND_SNAPSHOT = b"S"
KIND_RECORD = b"R"
KIND_RESULT = b"Q"



def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


_packers = threading.local()


def _pack_entry(obj: Any) -> bytes:
    """``_pack`` for what every replica encodes per log entry (a command, a
    result), with a ``Packer`` kept per thread: building one per call costs
    about as much as packing a small record. Only for records bounded by the
    command size (a Packer keeps the largest buffer it ever grew), never a
    snapshot. The same bytes as ``_pack``; a Packer resets after an error."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"extension type {code} is not plain data")


def _unpack(data: bytes, field: str) -> Any:
    """Plain data only: extension types (and msgpack's Timestamp, which never reaches
    ``ext_hook`` but always has data, hence ``max_ext_len=0``) are refused."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidInput(f"undecodable {field}: {type(exc).__name__}", field=field) from exc


def pack_wire(item: Any) -> bytes:
    """One message of the Raft port (``cluster.raft_pysyncobj``): plain data,
    tuples as arrays. Raises ``InvalidInput`` for anything else."""
    try:
        return _pack(item)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"a Raft message is not plain data ({type(exc).__name__})", field="message") from None


def unpack_wire(data: bytes) -> list[Any]:
    """The messages ``pack_wire`` wrote one after another into ``data``, with
    arrays as tuples (pysyncobj compares log entries as tuples). Plain data
    only; raises ``InvalidInput`` for anything malformed."""
    try:
        unpacker = msgpack.Unpacker(raw=False, use_list=False, strict_map_key=False, ext_hook=_refuse_ext,
                                    max_ext_len=0, max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        return list(unpacker)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidInput(f"undecodable Raft frame: {type(exc).__name__}", field="message") from exc


# Values nested deeper cannot be committed: msgpack refuses ~1024 levels when
# a snapshot wraps them, and a command that applies but cannot be snapshotted
# would stop log compaction on every replica. The HTTP layer stops at 100.
MAX_ARGS_DEPTH = 128


def check_value(value: Any, field: str, max_depth: int = MAX_ARGS_DEPTH) -> None:
    """Refuse, naming ``field``, what JSON carries but the log cannot: nesting
    past ``max_depth``, integers beyond 64 bits, strings that are not UTF-8
    (lone surrogates). Iterative: any depth is safe to check."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise InvalidInput(f"{field}: nested deeper than {max_depth} levels", field=field)
        if isinstance(item, str):
            _check_utf8(item, field)
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -(2**63) <= item < 2**64:
                raise InvalidInput(f"{field}: integers must fit in 64 bits", field=field)
        elif isinstance(item, list):
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, dict):
            for key, x in item.items():
                if isinstance(key, str):
                    _check_utf8(key, field)
                stack.append((x, depth + 1))


def _check_utf8(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field}: must be valid Unicode (no lone surrogates)", field=field) from None


def encode_command(command: Command) -> bytes:
    """Raises ``InvalidInput`` for arguments the log cannot carry."""
    check_value(command.args, "args")
    try:
        row = [command.version, command.op, command.args, command.now_ms, command.request_id, command.proposal_id]
        # Trailing fields only when there are some: older rows stay as they were.
        if command.principal is not None:
            row += [command.request_digest, command.principal]
        elif command.request_digest is not None:
            row.append(command.request_digest)
        return KIND_COMMAND + _pack_entry(row)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"args: not representable in the log ({type(exc).__name__})", field="args") from None


def decode_command(blob: bytes) -> Command:
    """Decode a log entry. Raises ``InvalidInput`` for anything malformed.

    Every replica runs this on every entry, so it is lean but refuses exactly
    what ``encode_command`` refuses: what msgpack decodes can only hold the
    strings and integers ``check_value`` accepts (its strings are strict
    UTF-8, so no lone surrogates; its integers fit in 64 bits), which leaves
    the nesting depth to check (``_check_args``)."""
    if blob[:1] != KIND_COMMAND:
        raise InvalidInput("not a command record", field="command")
    row = _unpack(blob[1:], "command")
    if type(row) is not list or not 6 <= len(row) <= 8:
        raise InvalidInput("command must be a list of 6 to 8 fields", field="command")
    version, op, args, now_ms, request_id, proposal_id = row[:6]
    request_digest = row[6] if len(row) > 6 else None
    principal = row[7] if len(row) > 7 else None
    if request_digest is not None and type(request_digest) is not str:
        raise InvalidInput("request_digest must be a string", field="request_digest")
    if principal is not None and type(principal) is not str:
        raise InvalidInput("principal must be a string", field="principal")
    if type(version) is not int or type(op) is not str or type(now_ms) is not int:
        raise InvalidInput("command header has wrong types", field="command")
    _check_args(args)
    if request_id is not None and type(request_id) is not str:
        raise InvalidInput("request_id must be a string", field="request_id")
    if proposal_id is not None and type(proposal_id) is not str:
        raise InvalidInput("proposal_id must be a string", field="proposal_id")
    return build_command(op, args, now_ms, request_id, proposal_id, version, request_digest, principal)


def _check_args(args: Any) -> None:
    """A command's decoded ``args``: a map with string keys, nested no
    deeper than ``MAX_ARGS_DEPTH`` (``check_value``'s limit: no item at a
    depth past it, the map itself at depth 1). Only containers are visited."""
    if type(args) is not dict:
        raise InvalidInput("args must be a map with string keys", field="args")
    nested = []
    for key, value in args.items():
        if type(key) is not str:
            raise InvalidInput("args must be a map with string keys", field="args")
        if type(value) is dict or type(value) is list:
            nested.append((value, 2))
    while nested:
        item, depth = nested.pop()
        if not item:
            continue
        if depth >= MAX_ARGS_DEPTH:  # its items would sit past the limit
            raise InvalidInput(f"args: nested deeper than {MAX_ARGS_DEPTH} levels", field="args")
        for value in item.values() if type(item) is dict else item:
            if type(value) is dict or type(value) is list:
                nested.append((value, depth + 1))


def check_command_size(blob: bytes, max_bytes: int) -> None:
    if len(blob) > max_bytes:
        raise TooLarge(f"command is {len(blob)} bytes, the limit is {max_bytes}")


def encode_snapshot(data: dict[str, Any]) -> bytes:
    return KIND_SNAPSHOT + _pack(data)


def decode_snapshot(blob: bytes) -> dict[str, Any]:
    if blob[:1] != KIND_SNAPSHOT:
        raise InvalidInput("not a snapshot record", field="snapshot")
    data = _unpack(blob[1:], "snapshot")
    if not isinstance(data, dict):
        raise InvalidInput("snapshot must be a map", field="snapshot")
    return data


def encode_record(obj: Any) -> bytes:
    """Any plain-data record we store or send (journal metadata, peer RPC)."""
    return KIND_RECORD + _pack(obj)


def encode_result(result: Result) -> bytes:
    """The bytes of what applying an entry produced (index, value, error):
    the same on every replica that applied the same history, so engines
    can compare replicas' results (``ReplicatedFSM.apply`` returns them).
    Events and changes are left out: they follow from the entry and the
    state, which the value and the index already pin down. Raises
    ``TypeError`` for a value that is not plain data (a bug in a domain)."""
    return KIND_RESULT + _pack_entry([COMMAND_VERSION, result.index, result.value,
                                list(result.error) if result.error is not None else None])


def decode_record(blob: bytes) -> Any:
    if blob[:1] != KIND_RECORD:
        raise InvalidInput("not a data record", field="record")
    return _unpack(blob[1:], "record")


__all__ = [
    "COMMAND_VERSION",
    "check_command_size",
    "check_value",
    "decode_command",
    "decode_record",
    "decode_snapshot",
    "encode_command",
    "encode_record",
    "encode_result",
    "encode_snapshot",
]
