"""Topic names, wildcard patterns and matching."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.commands.topics import check_pattern, check_topic, is_pattern, matches
from coordinator.state.base import Rejected


@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("agents.*.status", "agents.a17.status", True),
    ("agents.*.status", "agents.a17.health", False),
    ("agents.*.status", "agents.status", False),
    ("agents.*.status", "agents.a.b.status", False),
    ("tasks.>", "tasks.t1", True),
    ("tasks.>", "tasks.t1.done", True),
    ("tasks.>", "tasks", False),
    (">", "anything.at.all", True),
    ("*", "one", True),
    ("*", "one.two", False),
    ("a.b", "a.b", True),
    ("a.b", "a.b.c", False),
])
def test_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a b", "a.>.b", "a.*", "a.>", "é", "a" * 65,
                                 ".".join(["a"] * 17), 3, None])
def test_bad_topics_name_the_field(bad) -> None:
    with pytest.raises(Rejected) as refused:
        check_topic(bad, "topic")
    assert refused.value.code == "invalid" and refused.value.message.startswith("topic:")


@pytest.mark.parametrize("bad", ["a.>.b", "a..*", "*.", "a.b c"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(Rejected):
        check_pattern(bad, "pattern")


def test_patterns_and_topics() -> None:
    assert check_pattern("agents.*.status") == "agents.*.status"
    assert is_pattern("tasks.>") and not is_pattern("tasks.t1")


tokens = st.sampled_from(["a", "b", "c1", "x-y"])
topics = st.lists(tokens, min_size=1, max_size=5).map(".".join)
patterns = st.lists(st.sampled_from(["a", "b", "c1", "x-y", "*"]), min_size=1, max_size=5).flatmap(
    lambda ts: st.sampled_from([".".join(ts), ".".join([*ts, ">"])]))


def _reference(pattern: str, topic: str) -> bool:
    parts = []
    for token in pattern.split("."):
        parts.append({"*": r"[^.]+", ">": r"[^.]+(?:\.[^.]+)*"}.get(token, re.escape(token)))
    return re.fullmatch(r"\.".join(parts), topic) is not None


@settings(max_examples=500, deadline=None)
@given(patterns, topics)
def test_matching_agrees_with_a_regex(pattern: str, topic: str) -> None:
    check_pattern(pattern)
    assert matches(pattern, topic) == _reference(pattern, topic)
