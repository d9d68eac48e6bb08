"""The subscription filter language: parsing, errors with positions, and
evaluation checked against a direct computation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.commands.filters import FilterError, evaluate, parse
from coordinator.state.base import Rejected

MESSAGE = {"type": "event", "priority": 5, "headers": {"region": "eu", "tier": "gold"},
           "payload": {"total": 150, "items": ["x"], "vip": True, "note": None, "order": {"id": "o-1"}}}


@pytest.mark.parametrize(("text", "expected"), [
    ('headers.region == "eu"', True),
    ("headers.region == 'us'", False),
    ('headers.region != "us"', True),
    ("payload.total >= 100 and payload.total < 200", True),
    ("payload.total > 150", False),
    ("payload.vip == true", True),
    ("payload.vip == 1", False),  # JSON equality: true is not 1
    ("payload.note == null", True),
    ("payload.missing == null", False),  # a missing field compares false
    ("payload.missing != 1", False),
    ("not exists(payload.missing)", True),
    ("exists(payload.note)", True),
    ('type in ["event", "command"]', True),
    ('type not in ["event"]', False),
    ('payload.order.id == "o-1"', True),
    ('headers.region == "eu" and (payload.total < 100 or headers.tier == "gold")', True),
    ('not headers.region == "eu" or priority >= 5', True),
    ('priority < "9"', False),  # numbers and strings are not ordered
    ('headers.tier > "aaa"', True),
    ('payload.total == 150.0', True),
    ('headers.region == "\\"eu\\""', False),  # an escaped quote is part of the string
])
def test_evaluation(text: str, expected: bool) -> None:
    assert evaluate(parse(text), MESSAGE) is expected


@pytest.mark.parametrize(("text", "position"), [
    ("payload.x ==", 12),
    ("payload.x = 3", 10),
    ("(a == 1", 7),
    ("a == 1 and", 10),
    ("a not 3", 6),
    ('eval("x")', 4),
    ("a == 1 b == 2", 7),
    ("a in []", 6),
    ('a == "\\q"', 6),
    ("and == 1", 0),
])
def test_errors_name_the_position(text: str, position: int) -> None:
    with pytest.raises(FilterError) as refused:
        parse(text)
    assert refused.value.position == position
    assert refused.value.message.startswith("filter:")


@pytest.mark.parametrize("bad", ["", "   ", 3, None, "a == 1 and " * 200])
def test_refuses_empty_long_and_non_strings(bad) -> None:
    with pytest.raises(Rejected):
        parse(bad)


def test_nesting_is_bounded() -> None:
    with pytest.raises(FilterError):
        parse("(" * 40 + "a == 1" + ")" * 40)
    with pytest.raises(FilterError):
        parse("not " * 40 + "a == 1")
    assert evaluate(parse("(" * 20 + "a == 1" + ")" * 20), {"a": 1})


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        tree = parse(text)
    except Rejected:
        return
    evaluate(tree, MESSAGE)  # a parsed filter always evaluates


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b", "eu"]))


@settings(max_examples=400, deadline=None)
@given(scalars, scalars, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), st.booleans())
def test_comparisons_agree_with_a_direct_computation(stored, literal, op, present) -> None:
    message = {"payload": {"f": stored}} if present else {"payload": {}}
    tree = parse(f"payload.f {op} {json.dumps(literal)}")
    if not present:
        expected = False
    elif op in ("==", "!="):
        same = type(stored) is type(literal) and stored == literal if isinstance(stored, bool) or isinstance(
            literal, bool) else stored == literal
        expected = same if op == "==" else not same
    else:
        numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (stored, literal))
        strings = all(isinstance(v, str) for v in (stored, literal))
        ordered = numbers or strings
        expected = ordered and {"<": stored < literal if ordered else False,
                                "<=": stored <= literal if ordered else False,
                                ">": stored > literal if ordered else False,
                                ">=": stored >= literal if ordered else False}[op]
    assert evaluate(tree, message) is expected
