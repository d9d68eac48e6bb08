"""The apply path's constructors (``coordinator.types.build_*``) make exactly
what their frozen dataclass's own constructor makes."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.types import (
    Command,
    Event,
    KvChange,
    Result,
    build_command,
    build_kv_change,
    build_result,
)

BUILDERS = [(Command, build_command), (Result, build_result), (KvChange, build_kv_change)]
values = st.none() | st.integers() | st.text(max_size=8) | st.dictionaries(st.text(max_size=4), st.integers(),
                                                                             max_size=3)


@pytest.mark.parametrize(("cls", "build"), BUILDERS)
def test_a_builder_takes_every_field_in_order(cls: type, build: Any) -> None:
    """A field added to the class and not to its builder fails here."""
    assert list(inspect.signature(build).parameters) == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("cls", "build"), BUILDERS)
@given(data=st.data())
def test_a_built_record_is_the_frozen_record(cls: type, build: Any, data: st.DataObject) -> None:
    row = [data.draw(values) for _ in dataclasses.fields(cls)]
    built, made = build(*row), cls(*row)
    assert type(built) is cls
    assert built == made and repr(built) == repr(made)
    assert dataclasses.astuple(built) == dataclasses.astuple(made)
    try:
        expected_hash: Any = hash(made)
    except TypeError:
        expected_hash = TypeError
    if expected_hash is TypeError:
        with pytest.raises(TypeError):
            hash(built)
    else:
        assert hash(built) == expected_hash
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, name, 0)
    for record in (made, built):  # no attribute outside the fields (what it raises depends on the Python)
        with pytest.raises((AttributeError, TypeError)) as refused:
            record.extra = 1
        assert not hasattr(record, "extra")
    assert type(refused.value) is _refusal(made)
    assert dataclasses.replace(built) == made


def _refusal(record: Any) -> type:
    try:
        record.extra = 1
    except Exception as exc:
        return type(exc)
    return type(None)


def test_a_result_with_events_and_changes() -> None:
    events = (Event(1, "lock.acquired", {"name": "n"}, 5, 7),)
    changes = (build_kv_change(3, "k", "put", [1, 2], 7),)
    assert build_result(7, {"revision": 3}, None, events, changes) == Result(7, {"revision": 3}, None, events, changes)
    assert build_result(7, None, ("conflict", "no"), (), ()).ok is False
