"""The access-control commands (roles, grants, security settings, kept keys):
one parse for the API and for apply, naming the field it refuses; the log
keeps the request's own form (key order, the allow-list as written)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.codec import decode_command, encode_command
from coordinator.commands import COMMANDS
from coordinator.commands.access import (
    ACTIONS,
    MAX_PERMISSIONS,
    MAX_ROLES_PER_AGENT,
    PREFIX_ACTIONS,
    AccessUnpin,
    Permission,
    RoleDelete,
    RoleGrant,
    RolePut,
    SecurityConfigure,
    check_public_key,
)
from coordinator.commands.base import Rejected
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
token_patterns = st.sampled_from(["orders.>", "orders.*", "*.eu", "billing", ">", "a.b.c"])
permissions = st.one_of(
    st.builds(Permission, st.sampled_from([a for a in ACTIONS if a not in PREFIX_ACTIONS]), token_patterns,
              st.booleans()),
    st.builds(Permission, st.sampled_from(PREFIX_ACTIONS), names, st.booleans()),
)
allow_entries = st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8", "*.example.com", "API.Example.com.",
                                 "svc.example.com"])
allow_lists = st.lists(allow_entries, max_size=4).map(tuple)
access_commands = st.one_of(
    st.builds(RolePut, names, st.lists(permissions, max_size=4).map(tuple)),
    st.builds(RoleDelete, names),
    st.builds(RoleGrant, names, st.lists(names, max_size=4).map(tuple)),
    st.builds(SecurityConfigure, st.none() | st.integers(0, 32), st.none() | allow_lists),
    st.builds(SecurityConfigure, st.integers(0, 32), allow_lists, st.just(True)),
    st.builds(AccessUnpin, names),
)


@given(access_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


@given(access_commands)
def test_to_args_of_a_parse_gives_the_same_log_bytes(command: Any) -> None:
    """What the API proposed before the command types (the request's own
    dict) and what it proposes now encode to the same bytes."""
    given_args = command.to_args()
    as_logged = type(command).parse(given_args).to_args()
    entry = Command(op=command.op, args=given_args, now_ms=1)
    assert encode_command(Command(op=command.op, args=as_logged, now_ms=1)) == encode_command(entry)
    assert decode_command(encode_command(entry)).args == given_args


def test_the_requests_key_order_and_the_allow_list_as_written_stay_in_the_log() -> None:
    args = {"name": "r", "permissions": [{"pattern": "orders.>", "action": "send"}, {"action": "kv", "pattern": "a*"}]}
    put = RolePut.parse(args)
    assert put.permissions == (Permission("send", "orders.>", pattern_first=True), Permission("kv", "a*"))
    assert list(put.to_args()["permissions"][0]) == ["pattern", "action"]
    assert put.to_args() == args
    assert [p.to_data() for p in put.permissions] == [{"action": "send", "pattern": "orders.>"},
                                                      {"action": "kv", "pattern": "a*"}]
    settings = {"endpoint_allow": ["API.Example.com.", "127.0.0.1"], "pow_difficulty": 3}
    configure = SecurityConfigure.parse(settings)
    assert list(configure.to_args().items()) == list(settings.items())
    assert configure.allow_list() == ["127.0.0.1/32", "api.example.com"]
    assert list(SecurityConfigure.parse({"pow_difficulty": 3, "endpoint_allow": []}).to_args()) == [
        "pow_difficulty", "endpoint_allow"]
    assert SecurityConfigure.parse({}).to_args() == {}
    assert list(RoleGrant("a", ("x", "y")).to_args().items()) == [("agent", "a"), ("roles", ["x", "y"])]
    assert RoleDelete("r").to_args() == {"name": "r"} and AccessUnpin("a").to_args() == {"agent": "a"}


def _perm(action: str = "send", pattern: Any = "t") -> dict[str, Any]:
    return {"action": action, "pattern": pattern}


# (op, args, the field the refusal names): the same as the state's before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("role.put", {"permissions": []}, "name"),
    ("role.put", {"name": "", "permissions": []}, "name"),
    ("role.put", {"name": 7, "permissions": []}, "name"),
    ("role.put", {"name": "r\n", "permissions": []}, "name"),
    ("role.put", {"name": "r" * 257, "permissions": []}, "name"),
    ("role.put", {"name": "r"}, "permissions"),
    ("role.put", {"name": "r", "permissions": None}, "permissions"),
    ("role.put", {"name": "r", "permissions": {"action": "send"}}, "permissions"),
    ("role.put", {"name": "r", "permissions": [_perm()] * (MAX_PERMISSIONS + 1)}, "permissions"),
    ("role.put", {"name": "r", "permissions": ["send"]}, "permissions[0]"),
    ("role.put", {"name": "r", "permissions": [_perm(), {1: "x"}]}, "permissions[1]"),
    ("role.put", {"name": "r", "permissions": [{"action": "send", "pattern": "t", "extra": 1}]},
     "permissions[0].extra"),
    ("role.put", {"name": "r", "permissions": [{"pattern": "t"}]}, "permissions[0].action"),
    ("role.put", {"name": "r", "permissions": [_perm("admin")]}, "permissions[0].action"),
    ("role.put", {"name": "r", "permissions": [_perm("SEND")]}, "permissions[0].action"),
    ("role.put", {"name": "r", "permissions": [{"action": "send"}]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("send", "")]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("send", "a.>.b")]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("receive", "a b")]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("invoke", 3)]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("saga", "x..y")]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("kv", "")]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("kv", None)]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("lock", "k" * 1025)]}, "permissions[0].pattern"),
    ("role.put", {"name": "r", "permissions": [_perm("lock", "a\x00")]}, "permissions[0].pattern"),
    ("role.delete", {}, "name"),
    ("role.delete", {"name": 1}, "name"),
    ("role.grant", {"roles": ["r"]}, "agent"),
    ("role.grant", {"agent": "", "roles": ["r"]}, "agent"),
    ("role.grant", {"agent": ["a"], "roles": ["r"]}, "agent"),
    ("role.grant", {"agent": "a"}, "roles"),
    ("role.grant", {"agent": "a", "roles": "r"}, "roles"),
    ("role.grant", {"agent": "a", "roles": {"r": 1}}, "roles"),
    ("role.grant", {"agent": "a", "roles": ["r"] * (MAX_ROLES_PER_AGENT + 1)}, "roles"),
    ("role.grant", {"agent": "a", "roles": [1]}, "roles[0]"),
    ("role.grant", {"agent": "a", "roles": ["r", ""]}, "roles[1]"),
    ("security.configure", {"pow_difficulty": 33}, "pow_difficulty"),
    ("security.configure", {"pow_difficulty": None}, "pow_difficulty"),
    ("security.configure", {"pow_difficulty": 1.5}, "pow_difficulty"),
    ("security.configure", {"endpoint_allow": "127.0.0.1"}, "endpoint_allow"),
    ("security.configure", {"endpoint_allow": ["127.0.0.1", "not a name!"]}, "endpoint_allow[1]"),
    ("security.configure", {"endpoint_allow": ["10.0.0.0/33"]}, "endpoint_allow[0]"),
    ("security.configure", {"endpoint_allow": ["x"] * 257}, "endpoint_allow"),
    ("security.configure", {"endpoint_alow": []}, "endpoint_alow"),
    ("security.configure", {"pow_difficulty": 1, "endpoint_allow": [1]}, "endpoint_allow[0]"),
    ("access.unpin", {}, "agent"),
    ("access.unpin", {"agent": "a\x1f"}, "agent"),
]


@pytest.mark.parametrize(("op", "args", "field"), BAD, ids=[f"{op} {f}" for op, _, f in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], field: str) -> None:
    setup = [("role.put", {"name": "r", "permissions": [_perm()]}), ("role.grant", {"agent": "a", "roles": ["r"]})]
    assert refused_alike(op, args, setup=setup).startswith(f"{field}: ")


@pytest.mark.parametrize(("key", "problem"), [("not base64!", "must be base64"),
                                              (base64.b64encode(b"k" * 31).decode(), "32 bytes"),
                                              (base64.b64encode(b"k" * 33).decode(), "32 bytes")])
def test_check_public_key_names_the_field(key: str, problem: str) -> None:
    with pytest.raises(Rejected) as refused:
        check_public_key(key, "public_key")
    assert str(refused.value).startswith("public_key: ") and problem in str(refused.value)
    assert check_public_key(base64.b64encode(b"k" * 32).decode()) == base64.b64encode(b"k" * 32).decode()
