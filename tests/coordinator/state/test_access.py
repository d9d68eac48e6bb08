"""Roles and grants, replicated (coordinator/state/access.py): what a grant
pattern covers, the state's own refusals (a role that does not exist, too
many roles), and snapshots. The commands' validation: tests/coordinator/commands/test_access.py."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.codec import decode_snapshot, encode_snapshot
from coordinator.commands.access import RoleDelete, RoleGrant, RolePut
from coordinator.commands.topics import check_pattern, matches
from coordinator.state import StateMachine
from coordinator.state.access import MAX_ROLES, Access, covers
from coordinator.state.base import Rejected
from coordinator.types import Command

# -- covers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grant", "wanted", "expected"), [
    # a concrete topic
    ("orders.eu", "orders.eu", True),
    ("orders.eu", "orders.us", False),
    ("orders.*", "orders.eu", True),
    ("orders.*", "orders.eu.x", False),
    ("orders.*", "orders", False),
    ("orders.>", "orders.eu", True),
    ("orders.>", "orders.eu.x.y", True),
    ("orders.>", "orders", False),
    (">", "orders", True),
    (">", "a.b.c", True),
    ("*", "orders", True),
    ("*", "a.b", False),
    ("*.eu", "orders.eu", True),
    ("*.eu", "orders.us", False),
    # a pattern: covered only when every topic it can match is
    ("orders.*", "orders.*", True),
    ("orders.>", "orders.*", True),
    ("orders.>", "orders.>", True),
    ("orders.>", "orders.*.x", True),
    ("orders.>", "orders.*.>", True),
    (">", ">", True),
    (">", "*", True),
    (">", "*.>", True),
    ("orders.*", "orders.>", False),  # orders.a.b
    ("orders.eu", "orders.*", False),
    ("orders.*", "*.eu", False),  # payments.eu
    ("*.eu", "orders.*", False),
    ("*", ">", False),
    ("*.>", ">", False),  # a single token
    ("*.>", "*.*", True),
    ("*.*", "*.>", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.*.c", True),
    ("a.*.c", "a.*.d", False),
    ("a.b.>", "a.>", False),
    ("a.>", "a.b.>", True),
])
def test_covers_truth_table(grant: str, wanted: str, expected: bool) -> None:
    assert covers(grant, wanted) is expected


TOKENS = ("a", "b")
FRESH = "z"  # in no pattern: stands for "any other token"
MAX_PATTERN_TOKENS = 4


def _pattern(tokens: list[str], tail: bool) -> str:
    return ".".join([*tokens, ">"]) if tail else ".".join(tokens)


patterns = st.builds(_pattern, st.lists(st.sampled_from([*TOKENS, "*"]), min_size=0, max_size=MAX_PATTERN_TOKENS - 1),
                     st.booleans()).filter(bool)


@st.composite
def pattern_and_topic(draw: st.DrawFn) -> tuple[str, str]:
    """A pattern and a topic it matches: each ``*`` becomes one token, ``>`` one or more."""
    pattern = draw(patterns)
    words = st.sampled_from([*TOKENS, FRESH, "c-1"])
    out: list[str] = []
    for token in pattern.split("."):
        if token == "*":
            out.append(draw(words))
        elif token == ">":
            out.extend(draw(st.lists(words, min_size=1, max_size=3)))
        else:
            out.append(token)
    return pattern, ".".join(out)


@settings(max_examples=500, deadline=None)
@given(patterns, pattern_and_topic())
def test_a_covering_grant_matches_every_topic_the_wanted_pattern_matches(grant: str, wanted: tuple[str, str]) -> None:
    pattern, topic = wanted
    check_pattern(grant)
    check_pattern(pattern)
    assert matches(pattern, topic)
    if covers(grant, pattern):
        assert matches(grant, topic), f"covers({grant!r}, {pattern!r}) but {topic!r} escapes the grant"


# Every topic of up to MAX_PATTERN_TOKENS + 1 tokens over the patterns' tokens
# and one fresh token: enough to find a topic that tells two such patterns apart.
SPACE = [".".join(t) for n in range(1, MAX_PATTERN_TOKENS + 2)
         for t in itertools.product([*TOKENS, FRESH], repeat=n)]


@settings(max_examples=300, deadline=None)
@given(patterns, patterns)
def test_covers_is_exactly_inclusion_of_the_matched_topics(grant: str, wanted: str) -> None:
    """Not only safe but not stingier than it must be: when covers says no,
    some topic matches the wanted pattern and not the grant."""
    included = all(matches(grant, t) for t in SPACE if matches(wanted, t))
    assert covers(grant, wanted) is included


def _kv_access(*grants: str) -> Access:
    access = Access()
    access.put_role(RolePut.parse({"name": "r", "permissions": [{"action": "kv", "pattern": g} for g in grants]}))
    access.grant(RoleGrant.parse({"agent": "a", "roles": ["r"]}))
    return access


# Keys may hold "*" (and grants may end in "**"): both are in the alphabet.
@settings(max_examples=500, deadline=None)
@given(st.lists(st.text("ab/*", min_size=1, max_size=6), min_size=1, max_size=2), st.text("ab/*", max_size=6),
       st.text("ab/*", max_size=4))
def test_a_grant_that_allows_a_listing_allows_every_key_under_it(grants: list[str], prefix: str, rest: str) -> None:
    access = _kv_access(*grants)
    if access.can("a", "kv", prefix, listing=True):  # what GET /v1/kv?prefix= and the watch ask
        assert access.can("a", "kv", prefix + rest), f"{grants} list {prefix!r} but not read {prefix + rest!r}"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab/*", min_size=1, max_size=4), min_size=1, max_size=2), st.text("ab/*", max_size=5))
def test_a_listing_is_allowed_when_every_key_under_it_is(grants: list[str], prefix: str) -> None:
    """Exact over a small alphabet: a listing of ``prefix`` is allowed iff every
    key ``prefix + rest`` (rest up to two characters longer than any grant) is."""
    access = _kv_access(*grants)
    longest = max(len(g) for g in grants) + 2
    keys = [prefix + "".join(t) for n in range(longest + 1) for t in itertools.product("ab/*", repeat=n)]
    assert access.can("a", "kv", prefix, listing=True) is all(access.can("a", "kv", k) for k in keys)


@pytest.mark.parametrize(("grant", "resource", "listing", "expected"), [
    ("jobs/*", "jobs/1", False, True),
    ("jobs/*", "jobs/", False, True),
    ("jobs/*", "jobs/*", False, True),  # a key named jobs/*
    ("jobs/*", "jobs", False, False),
    ("jobs/*", "jobs/", True, True),  # the listing of jobs/
    ("jobs/*", "jobs/x", True, True),
    ("jobs/*", "jobs", True, False),  # the listing of jobs (also jobs2)
    ("jobs", "jobs", False, True),
    ("jobs", "jobs/1", False, False),
    ("jobs", "jobs", True, False),  # an exact grant never covers a listing
    ("*", "anything", False, True),
    ("*", "", True, True),  # the listing of everything
    ("jobs/**", "jobs/*", False, True),  # keys starting with "jobs/*"
    ("jobs/**", "jobs/*x", True, True),
    ("jobs/**", "jobs/", True, False),  # jobs/1 is not under jobs/*
    ("**", "", True, False),  # nor is every key
])
def test_kv_and_lock_patterns_are_exact_or_prefixes(grant: str, resource: str, listing: bool,
                                                    expected: bool) -> None:
    access = Access()
    access.put_role(RolePut.parse({"name": "r", "permissions": [{"action": "kv", "pattern": grant},
                                                  {"action": "lock", "pattern": grant}]}))
    access.grant(RoleGrant.parse({"agent": "a", "roles": ["r"]}))
    assert access.can("a", "kv", resource, listing=listing) is expected
    if not listing:
        assert access.can("a", "lock", resource) is expected


def test_can_needs_the_action_and_a_grant() -> None:
    access = Access()
    access.put_role(RolePut.parse({"name": "r", "permissions": [{"action": "send", "pattern": "orders.>"}]}))
    assert not access.can("a", "send", "orders.eu")  # no grant yet
    access.grant(RoleGrant.parse({"agent": "a", "roles": ["r"]}))
    assert access.can("a", "send", "orders.eu")
    assert not access.can("a", "receive", "orders.eu")
    assert not access.can("a", "subscribe", "orders.eu")
    assert not access.can("b", "send", "orders.eu")
    assert not access.can("", "send", "orders.eu")


def test_permissions_of_several_roles_add_up() -> None:
    access = Access()
    access.put_role(RolePut.parse({"name": "send", "permissions": [{"action": "send", "pattern": "t"}]}))
    access.put_role(RolePut.parse({"name": "kv", "permissions": [{"action": "kv", "pattern": "k/*"}]}))
    access.grant(RoleGrant.parse({"agent": "a", "roles": ["send", "kv"]}))
    assert access.can("a", "send", "t") and access.can("a", "kv", "k/1")


# -- role and grant operations -------------------------------------------------------------------------

def _perm(action: str = "send", pattern: Any = "t") -> dict[str, Any]:
    return {"action": action, "pattern": pattern}


def test_put_role_normalizes_and_replaces() -> None:
    access = Access()
    answer = access.put_role(RolePut.parse({"name": "r", "permissions": [_perm("send", "a.*"), _perm("kv", "jobs/*")]}))
    assert answer == {"name": "r", "permissions": [_perm("send", "a.*"), _perm("kv", "jobs/*")]}
    access.put_role(RolePut.parse({"name": "r", "permissions": [_perm("lock", "x")]}))
    assert access.roles == {"r": [_perm("lock", "x")]}
    access.put_role(RolePut.parse({"name": "empty", "permissions": []}))  # a role may allow nothing (yet)
    assert access.roles["empty"] == []


def test_a_grant_of_a_role_that_does_not_exist_is_refused_naming_it_and_changes_nothing() -> None:
    access = Access()
    access.put_role(RolePut.parse({"name": "r", "permissions": [_perm()]}))
    access.grant(RoleGrant.parse({"agent": "a", "roles": ["r"]}))
    snapshot = repr(access.to_data())
    with pytest.raises(Rejected) as refused:
        access.grant(RoleGrant.parse({"agent": "a", "roles": ["r", "missing"]}))
    assert (refused.value.code, refused.value.message) == ("invalid", "roles[1]: role 'missing' does not exist")
    assert repr(access.to_data()) == snapshot


def test_grant_sets_the_whole_list_sorted_without_duplicates() -> None:
    access = Access()
    for name in ("b", "a", "c"):
        access.put_role(RolePut.parse({"name": name, "permissions": []}))
    assert access.grant(RoleGrant("x", ("b", "a", "b"))) == {"agent": "x", "roles": ["a", "b"]}
    assert access.grant(RoleGrant.parse({"agent": "x", "roles": ["c"]})) == {"agent": "x", "roles": ["c"]}
    assert access.grant(RoleGrant.parse({"agent": "x", "roles": []})) == {"agent": "x", "roles": []}
    assert "x" not in access.grants
    # a grant may name an agent that has not joined yet
    access.grant(RoleGrant.parse({"agent": "later", "roles": ["a"]}))
    assert access.describe()["grants"] == [{"agent": "later", "roles": ["a"]}]


def test_delete_role_removes_it_from_every_grant() -> None:
    access = Access()
    access.put_role(RolePut.parse({"name": "send", "permissions": [_perm("send", ">")]}))
    access.put_role(RolePut.parse({"name": "kv", "permissions": [_perm("kv", "*")]}))
    access.grant(RoleGrant.parse({"agent": "a", "roles": ["send", "kv"]}))
    access.grant(RoleGrant.parse({"agent": "b", "roles": ["send"]}))
    assert access.delete_role(RoleDelete.parse({"name": "send"})) == {"name": "send"}
    assert access.grants == {"a": ["kv"]}  # b held nothing else: gone
    assert not access.can("a", "send", "t") and not access.can("b", "send", "t")
    assert access.can("a", "kv", "k")
    # a role made again under the same name is not granted to anyone
    access.put_role(RolePut.parse({"name": "send", "permissions": [_perm("send", ">")]}))
    assert not access.can("b", "send", "t")


def test_deleting_a_role_that_does_not_exist_is_not_found() -> None:
    with pytest.raises(Rejected) as refused:
        Access().delete_role(RoleDelete("nope"))
    assert (refused.value.code, refused.value.message) == ("not_found", "role 'nope' does not exist")


# -- through the state machine, and snapshots ----------------------------------------------------------

class Driver:
    def __init__(self) -> None:
        self.sm = StateMachine()
        self.index = 0

    def apply(self, op: str, **args: Any) -> Any:
        self.index += 1
        return self.sm.apply(self.index, Command(op=op, args=args, now_ms=1_000 * self.index))


def _restored(sm: StateMachine) -> StateMachine:
    return StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(sm.snapshot_data())))


def test_role_operations_through_the_machine_name_the_field() -> None:
    drive = Driver()
    assert drive.apply("role.put", name="r", permissions=[_perm("send", "a.>")]).error is None
    result = drive.apply("role.put", name="r", permissions=[_perm("fly")])
    assert result.error is not None and result.error[0] == "invalid"
    assert result.error[1].startswith("permissions[0].action: ")
    result = drive.apply("role.grant", agent="x", roles=["r", "s"])
    assert result.error is not None and result.error[1].startswith("roles[1]: ")
    assert drive.apply("role.grant", agent="x", roles=["r"]).value == {"agent": "x", "roles": ["r"]}
    assert drive.apply("role.delete", name="s").error[0] == "not_found"
    assert drive.sm.access.can("x", "send", "a.b")


ACTIONS_AND_PATTERNS = [("send", "orders.>"), ("receive", "orders.*"), ("subscribe", "*.eu"), ("invoke", "billing"),
                        ("saga", ">"), ("kv", "jobs/*"), ("lock", "l-1")]
PROBES = [(action, resource) for action in ("send", "receive", "subscribe", "invoke", "saga", "kv", "lock")
          for resource in ("orders.eu", "orders.eu.x", "x.eu", "billing", "jobs/1", "l-1", "anything")]

role_ops = st.one_of(
    st.tuples(st.just("role.put"), st.sampled_from(["r1", "r2", "r3"]),
              st.lists(st.sampled_from(ACTIONS_AND_PATTERNS), max_size=3)),
    st.tuples(st.just("role.delete"), st.sampled_from(["r1", "r2", "r3"]), st.none()),
    st.tuples(st.just("role.grant"), st.sampled_from(["a", "b"]),
              st.lists(st.sampled_from(["r1", "r2", "r3"]), max_size=3)),
)


def _apply(drive: Driver, op: tuple[str, str, Any]) -> Any:
    kind, name, extra = op
    if kind == "role.put":
        return drive.apply(kind, name=name, permissions=[_perm(a, p) for a, p in extra])
    if kind == "role.delete":
        return drive.apply(kind, name=name)
    return drive.apply(kind, agent=name, roles=extra)


def _decisions(access: Access) -> list[bool]:
    return [access.can(agent, action, resource) for agent in ("a", "b") for action, resource in PROBES]


@settings(max_examples=100, deadline=None)
@given(st.lists(role_ops, max_size=12), role_ops)
def test_a_snapshot_restores_roles_and_grants_exactly(ops: list[tuple[str, str, Any]],
                                                      then: tuple[str, str, Any]) -> None:
    drive = Driver()
    for op in ops:
        _apply(drive, op)
    restored = Driver()
    restored.sm, restored.index = _restored(drive.sm), drive.index
    assert restored.sm.access.to_data() == drive.sm.access.to_data()
    assert restored.sm.access.describe() == drive.sm.access.describe()
    assert _decisions(restored.sm.access) == _decisions(drive.sm.access)
    # and both go on the same way
    assert _apply(restored, then).value == _apply(drive, then).value
    assert encode_snapshot(restored.sm.snapshot_data()) == encode_snapshot(drive.sm.snapshot_data())


def test_a_snapshot_without_access_control_restores_with_none() -> None:
    """Snapshots written before access control existed hold no "access"."""
    drive = Driver()
    drive.apply("kv.put", key="k", value=1)
    data = drive.sm.snapshot_data()
    del data["access"]
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(data)))
    assert restored.access.roles == {} and restored.access.grants == {}


def test_the_number_of_roles_is_bounded() -> None:
    access = Access()
    for i in range(MAX_ROLES):
        access.put_role(RolePut.parse({"name": f"r{i}", "permissions": []}))
    with pytest.raises(Rejected) as refused:
        access.put_role(RolePut.parse({"name": "one-more", "permissions": []}))
    assert refused.value.code == "unavailable"
    access.put_role(RolePut.parse({"name": "r0", "permissions": [_perm()]}))  # replacing one is fine
    assert len(access.roles) == MAX_ROLES
