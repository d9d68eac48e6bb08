"""Transform rules for bus messages (pure): a small, declarative language,
replicated like everything else, applied when a message is published.

A transform has a name, a topic pattern and a rule, one statement a line
(``#`` starts a comment line)::

    when header.version == "1" and payload.userId exists
    rename payload.userId to payload.user_id
    move payload.address.city to payload.city
    copy payload.user_id to header.user
    drop payload.password
    set header.version = "2"
    set payload.tags = ["migrated"]
    route users.v2

- ``when`` (first statement only) guards the whole rule: ``PATH == LITERAL``,
  ``PATH != LITERAL``, ``PATH exists``, ``PATH missing``, joined by ``and``.
  Conditions read ``payload.…``, ``header.NAME``, ``type`` and ``source``.
- ``rename``/``move`` (the same), ``copy``, ``drop`` and ``set`` change
  ``payload.…`` (nested objects are created by ``set``, ``move``, ``copy``)
  and ``header.NAME`` (a header's value must be a string). Literals are JSON.
- ``route TOPIC`` publishes the message on another topic instead (the
  transforms of that topic apply in turn, at most ``MAX_HOPS`` times).

Every transform whose pattern matches the topic applies, in name order.
Nothing is evaluated: a rule is parsed into statements when it is defined
(a syntax error is refused with its line and column) and interpreted over a
copy of the message. A rule that cannot apply (``rename`` of a field that is
not there, a path through a non-object, a header that is not a string) sends
the message to the dead-letter queue of every consumer it was routed to,
with the reason, instead of delivering it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.topics import matches
from coordinator.commands.transforms import (  # the parser: re-exported for the tests and the state
    Condition,
    Program,
    RuleError,
    Statement,
    TransformDelete,
    TransformPut,
    check_name,
    parse,
)
from coordinator.state.base import Rejected

MAX_TRANSFORMS = 256
MAX_HOPS = 4
MAX_HEADERS = 64
MAX_HEADER_KEY = 128
MAX_HEADER_VALUE = 1024


# -- interpretation -------------------------------------------------------------------------


class Failed(Exception):
    def __init__(self, line: int, why: str) -> None:
        super().__init__(why)
        self.line = line
        self.why = why


_MISSING = object()


def _get(message: dict[str, Any], path: str) -> Any:
    if path in ("type", "source"):
        return message.get(path, _MISSING)
    root, _, rest = path.partition(".")
    if root == "header":
        return (message.get("headers") or {}).get(rest, _MISSING)
    value: Any = message.get("payload")
    for part in rest.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _parent(message: dict[str, Any], path: str, line: int, create: bool) -> tuple[dict[str, Any], str] | None:
    """The object holding the last part of a payload path, and that part."""
    parts = path.split(".")[1:]
    if message.get("payload") is None and create:
        message["payload"] = {}
    node = message.get("payload")
    for part in parts[:-1]:
        if not isinstance(node, dict):
            raise Failed(line, f"{path}: goes through a value that is not an object")
        if part not in node:
            if not create:
                return None
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise Failed(line, f"{path}: goes through a value that is not an object")
    return node, parts[-1]


def _put(message: dict[str, Any], path: str, value: Any, line: int) -> None:
    if path.startswith("header."):
        name = path[len("header."):]
        if not isinstance(value, str):
            raise Failed(line, f"{path}: a header's value must be a string")
        if len(name) > MAX_HEADER_KEY or len(value) > MAX_HEADER_VALUE:
            raise Failed(line, f"{path}: header name or value too long")
        headers = dict(message.get("headers") or {})
        if name not in headers and len(headers) >= MAX_HEADERS:
            raise Failed(line, f"{path}: a message has at most {MAX_HEADERS} headers")
        headers[name] = value
        message["headers"] = headers
        return
    parent = _parent(message, path, line, create=True)
    assert parent is not None
    node, key = parent
    node[key] = value


def _drop(message: dict[str, Any], path: str, line: int) -> None:
    if path.startswith("header."):
        headers = dict(message.get("headers") or {})
        headers.pop(path[len("header."):], None)
        message["headers"] = headers
        return
    parent = _parent(message, path, line, create=False)
    if parent is not None:
        parent[0].pop(parent[1], None)


def _holds(condition: Condition, message: dict[str, Any]) -> bool:
    value = _get(message, condition.path)
    if condition.op == "exists":
        return value is not _MISSING
    if condition.op == "missing":
        return value is _MISSING
    equal = value is not _MISSING and _json_equal(value, condition.value)
    return equal if condition.op == "==" else not equal


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value  # str, numbers, bool, None: immutable


def run(program: Program, message: dict[str, Any]) -> str | None:
    """Apply ``program`` to ``message`` in place: the topic to route to (or
    None). Raises ``Failed`` when a statement cannot apply."""
    if not all(_holds(c, message) for c in program.guard):
        return None
    route = None
    for statement in program.statements:
        if statement.op == "route":
            route = statement.target
        elif statement.op == "set":
            _put(message, statement.path, _copy_json(statement.value), statement.line)
        elif statement.op == "drop":
            _drop(message, statement.path, statement.line)
        else:
            value = _get(message, statement.path)
            if value is _MISSING:
                raise Failed(statement.line, f"{statement.path} is missing")
            if statement.op == "move":
                _drop(message, statement.path, statement.line)
            _put(message, statement.target, _copy_json(value), statement.line)
    return route


@dataclass(slots=True)
class Transform:
    name: str
    topic: str
    rule: str
    created_index: int
    program: Program = field(compare=False, repr=False, default=Program((), ()))
    applied: int = 0
    failed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "topic": self.topic, "rule": self.rule, "created_index": self.created_index,
                "applied": self.applied, "failed": self.failed}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the transforms made of one published message: the topic and the
    message to store, or the failure (then the original topic and message)."""

    topic: str
    message: dict[str, Any]
    failure: str | None = None
    applied: tuple[str, ...] = ()  # the transforms that ran (the last one failed when ``failure``)


class Transforms:
    def __init__(self) -> None:
        self.items: dict[str, Transform] = {}

    def put(self, index: int, command: TransformPut) -> dict[str, Any]:
        name = command.name
        if name not in self.items and len(self.items) >= MAX_TRANSFORMS:
            raise Rejected("unavailable", f"too many transforms ({MAX_TRANSFORMS})")
        self.items[name] = Transform(name, command.topic, command.rule, index, command.program)
        self.items = dict(sorted(self.items.items()))  # applied in name order
        return self.items[name].describe()

    def delete(self, command: TransformDelete) -> dict[str, Any]:
        name = command.name
        if self.items.pop(name, None) is None:
            raise Rejected("not_found", f"transform {name!r} does not exist")
        return {"name": name, "deleted": True}

    def apply(self, topic: str, message: dict[str, Any]) -> Outcome:
        """Run every matching transform (then those of a routed-to topic).
        Changes nothing here: ``record`` counts the outcome once it is stored."""
        if not self.items or not any(matches(t.topic, topic) for t in self.items.values()):
            return Outcome(topic, message)
        original = topic
        # statements change only the payload and the headers: copy those (JSON values), share the rest
        current = {**message, "payload": _copy_json(message.get("payload")),
                   "headers": dict(message.get("headers") or {})}
        ran: list[str] = []
        for _hop in range(MAX_HOPS + 1):
            route = None
            for transform in self.items.values():
                if not matches(transform.topic, topic):
                    continue
                ran.append(transform.name)
                try:
                    target = run(transform.program, current)
                except Failed as failed:
                    why = f"transform {transform.name!r} line {failed.line}: {failed.why}"
                    return Outcome(original, message, why, tuple(ran))
                route = target or route
            if route is None or route == topic:
                return Outcome(topic, current, None, tuple(ran))
            topic = route
        return Outcome(original, message, f"routed more than {MAX_HOPS} times (a loop of route statements?)",
                       tuple(ran))

    def record(self, outcome: Outcome) -> None:
        for i, name in enumerate(outcome.applied):
            transform = self.items[name]
            if outcome.failure is not None and i == len(outcome.applied) - 1:
                transform.failed += 1
            else:
                transform.applied += 1

    def to_data(self) -> list[Any]:
        return [[t.name, t.topic, t.rule, t.created_index, t.applied, t.failed] for t in self.items.values()]

    @classmethod
    def from_data(cls, rows: list[Any]) -> Transforms:
        transforms = cls()
        for name, topic, rule, created_index, applied, failed in rows:
            transforms.items[name] = Transform(name, topic, rule, created_index, parse(rule), applied, failed)
        return transforms


__all__ = ["Condition", "Failed", "Outcome", "Program", "RuleError", "Statement", "Transform", "Transforms",
           "check_name", "parse", "run"]
