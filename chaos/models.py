"""Pure sequential specifications for the linearizability checker.

A ``Model`` says what one operation may return and how it changes the state
when operations run one at a time. The checker asks it, never the other way
round. Models hold no mutable state and do no I/O; states are hashable so the
checker can memoise them.

Semantics the checker applies to every model (so a model need not):
``fail`` operations are dropped (they certainly took no effect); ``info``
operations (unknown outcome) may take effect at any time after their invoke,
or never, so the checker may linearize them but need not.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Protocol

from chaos.history import Operation

State = Hashable


class Model(Protocol):
    """A sequential specification.

    ``step(state, op)`` returns ``(legal, new_state)``: whether ``op``, with
    what it returned, can happen in ``state`` one at a time, and the state
    after it. It is called with ``ok`` and ``info`` operations only; for an
    ``info`` operation it says whether the operation *can* take effect here
    (a no-effect outcome is the checker's business: it simply leaves the
    operation out).

    ``partition(ops)`` splits a history into independent sub-histories that
    are linearizable together iff each is on its own (P-compositionality),
    and may drop operations that cannot matter (an unknown read).

    ``effect(op)`` is a hashable summary of an operation's input: two
    ``info`` operations with equal effects are interchangeable once both are
    invoked, so the checker tries only the earliest of them.

    ``blind(op)`` is true only if ``step(state, op)`` gives the same
    ``(legal, new_state)`` whatever the state (a register write): the checker
    then knows that applying it right after another unknown operation is
    never needed. Returning false is always safe.
    """

    name: str

    def init(self) -> State: ...

    def step(self, state: State, op: Operation) -> tuple[bool, State]: ...

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]: ...

    def effect(self, op: Operation) -> Hashable: ...

    def blind(self, op: Operation) -> bool: ...

    def describe(self, op: Operation) -> str: ...

    def describe_state(self, state: State) -> str: ...


def canonical(value: Any) -> str:
    """A canonical JSON text of ``value``: equal texts iff equal JSON values.

    ``true`` is not ``1``; ``1`` is ``1.0`` (JSON has one number type); object
    key order does not matter.
    """
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _normalise(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    return value


class CasRegister:
    """One register per key, starting empty (a read of a missing key returns ``null``).

    - read → legal iff the value read equals the state;
    - write v → sets v;
    - cas [old, new], ``matched: true`` → legal iff the state equals old; sets new;
    - cas [old, new], ``matched: false`` → a read that saw something other than
      old: legal iff the state is not old; changes nothing;
    - cas [old, new] with unknown outcome → can take effect iff the state is old.

    The state is the canonical JSON text of the value (``canonical``), so it is
    hashable and ``true`` differs from ``1``.
    """

    name = "cas-register"

    def init(self) -> str:
        return "null"

    def step(self, state: State, op: Operation) -> tuple[bool, State]:
        f = op.f
        if f == "write":
            return True, canonical(op.value)
        if f == "read":
            return canonical(op.value) == state, state
        if f == "cas":
            old, new = op.value
            if op.matched is False:
                return canonical(old) != state, state
            if canonical(old) == state:
                return True, canonical(new)
            return False, state
        raise ValueError(f"cas-register has no operation {f!r}")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        by_key: dict[str, list[Operation]] = {}
        for op in ops:
            group = by_key.setdefault(op.key, [])
            if op.f == "read" and op.status != "ok":
                continue  # a read with no known result constrains nothing and changes nothing
            group.append(op)
        return [by_key[key] for key in sorted(by_key)]

    def effect(self, op: Operation) -> Hashable:
        if op.f == "cas":
            old, new = op.value
            return ("cas", canonical(old), canonical(new), op.matched)
        return (op.f, canonical(op.value))

    def blind(self, op: Operation) -> bool:
        return op.f == "write"

    def describe(self, op: Operation) -> str:
        value = json.dumps(op.value)
        if op.f == "read":
            text = f"p{op.process} read {op.key!r}" + (f" -> {value}" if op.status == "ok" else "")
        elif op.f == "write":
            text = f"p{op.process} write {op.key!r} {value}"
        else:
            old, new = op.value
            text = f"p{op.process} cas {op.key!r} {json.dumps(old)} -> {json.dumps(new)}"
            if op.matched is not None:
                text += " (applied)" if op.matched else " (not applied: value was not old)"
        if op.status == "info":
            text += " (outcome unknown)"
        elif op.status == "fail":
            text += " (failed)"
        return text

    def describe_state(self, state: State) -> str:
        return str(state)


MODELS: dict[str, type[CasRegister]] = {"cas-register": CasRegister}


def model_named(name: str) -> Model:
    """The model registered as ``name``. Raises ``KeyError`` if there is none."""
    return MODELS[name]()
