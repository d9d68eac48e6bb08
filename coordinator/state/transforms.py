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

import json
import re
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.topics import check_pattern, check_topic, matches
from coordinator.state.base import Rejected, check_resource_name, invalid

MAX_RULE_LEN = 8192
MAX_STATEMENTS = 64
MAX_TRANSFORMS = 256
MAX_HOPS = 4
MAX_NAME_LEN = 128
MAX_HEADERS = 64
MAX_HEADER_KEY = 128
MAX_HEADER_VALUE = 1024
RESERVED = ("agent.", "lock.", "system.")

_PATH = re.compile(r"(payload(?:\.[A-Za-z0-9_@:$-]+)+|header\.[A-Za-z0-9_.:@-]+|type|source)")
_WORD = re.compile(r"[a-z]+")
_SPACE = re.compile(r"\s*")
_TOPIC = re.compile(r"\S+")


class RuleError(Rejected):
    """A syntax error in a rule, at a line and column (both from 1)."""

    def __init__(self, line: int, column: int, why: str) -> None:
        super().__init__("invalid", f"rule: line {line}, column {column}: {why}")
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class Condition:
    path: str
    op: str  # == != exists missing
    value: Any = None


@dataclass(frozen=True, slots=True)
class Statement:
    line: int
    op: str  # move copy drop set route
    path: str = ""
    target: str = ""
    value: Any = None


@dataclass(frozen=True, slots=True)
class Program:
    guard: tuple[Condition, ...]
    statements: tuple[Statement, ...]


class _Line:
    """A cursor over one line of a rule, for error columns."""

    def __init__(self, text: str, number: int) -> None:
        self.text = text
        self.number = number
        self.pos = 0

    def skip(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def at_end(self) -> bool:
        self.skip()
        return self.pos >= len(self.text)

    def fail(self, why: str) -> RuleError:
        return RuleError(self.number, self.pos + 1, why)

    def word(self) -> str:
        self.skip()
        match = _WORD.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a keyword")
        self.pos = match.end()
        return match.group()

    def keyword(self, expected: str) -> None:
        start = self.pos
        self.skip()
        if self.text.startswith(expected, self.pos) and not self.text[self.pos + len(expected):][:1].isalnum():
            self.pos += len(expected)
            return
        self.pos = max(self.pos, start)
        raise self.fail(f"expected {expected!r}")

    def path(self, *, writable: bool) -> str:
        self.skip()
        match = _PATH.match(self.text, self.pos)
        if match is None or (match.end() < len(self.text) and not self.text[match.end()].isspace()
                             and self.text[match.end()] not in "=!"):
            raise self.fail("expected a path: payload.NAME[.NAME...], header.NAME, type or source")
        path = match.group()
        if writable and path in ("type", "source"):
            raise self.fail("only payload.… and header.… can be changed")
        self.pos = match.end()
        return path

    def literal(self) -> Any:
        self.skip()
        try:
            value, end = json.JSONDecoder().raw_decode(self.text, self.pos)
        except ValueError:
            raise self.fail("expected a JSON value") from None
        if isinstance(value, float) and value != value:  # NaN: JSON literals only
            raise self.fail("expected a JSON value")
        self.pos = end
        return value

    def topic(self) -> str:
        self.skip()
        match = _TOPIC.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a topic")
        try:
            check_topic(match.group(), "route")
        except Rejected as exc:
            raise self.fail(exc.message.partition(": ")[2]) from None
        if match.group().startswith(RESERVED):
            raise self.fail(f"{match.group()!r} is reserved for the cluster's own events")
        self.pos = match.end()
        return match.group()


def parse(rule: Any) -> Program:
    """The program of a rule, or ``RuleError`` with the line and column."""
    if not isinstance(rule, str) or not rule.strip() or len(rule) > MAX_RULE_LEN:
        raise invalid("rule", f"must be a text of 1 to {MAX_RULE_LEN} characters")
    text = rule
    guard: tuple[Condition, ...] = ()
    statements: list[Statement] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = _Line(raw.rstrip("\r"), number)
        if line.at_end() or raw.lstrip().startswith("#"):
            continue
        if any(ord(ch) < 0x20 and ch != "\t" for ch in line.text):
            raise line.fail("control characters are not allowed")
        op = line.word()
        if op == "when":
            if statements or guard:
                raise RuleError(number, 1, "'when' must be the first statement (one per rule)")
            guard = _conditions(line)
            continue
        statements.append(_statement(line, op))
        if len(statements) > MAX_STATEMENTS:
            raise RuleError(number, 1, f"more than {MAX_STATEMENTS} statements")
        if not line.at_end():
            raise line.fail("unexpected text after the statement")
    if not statements:
        raise RuleError(1, 1, "a rule needs at least one statement besides 'when'")
    return Program(guard, tuple(statements))


def _conditions(line: _Line) -> tuple[Condition, ...]:
    out = []
    while True:
        path = line.path(writable=False)
        line.skip()
        rest = line.text[line.pos:]
        if rest.startswith(("==", "!=")):
            op = rest[:2]
            line.pos += 2
            out.append(Condition(path, op, line.literal()))
        else:
            match = re.compile(r"(exists|missing)\b").match(line.text, line.pos)
            if match is None:
                raise line.fail("expected ==, !=, exists or missing")
            line.pos = match.end()
            out.append(Condition(path, match.group(1)))
        if line.at_end():
            return tuple(out)
        line.keyword("and")


def _statement(line: _Line, op: str) -> Statement:
    number = line.number
    if op in ("rename", "move", "copy"):
        path = line.path(writable=op != "copy")
        line.keyword("to")
        target = line.path(writable=True)
        return Statement(number, "copy" if op == "copy" else "move", path, target)
    if op == "drop":
        return Statement(number, "drop", line.path(writable=True))
    if op == "set":
        path = line.path(writable=True)
        line.skip()
        if not line.text.startswith("=", line.pos) or line.text.startswith("==", line.pos):
            raise line.fail("expected '='")
        line.pos += 1
        return Statement(number, "set", path, value=line.literal())
    if op == "route":
        return Statement(number, "route", target=line.topic())
    line.pos -= len(op)
    raise line.fail(f"unknown statement {op!r} (when, rename, move, copy, drop, set, route)")


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

    def put(self, index: int, args: dict[str, Any]) -> dict[str, Any]:
        name = check_name(args.get("name"))
        topic = check_pattern(args.get("topic"), "topic")
        rule = args.get("rule")
        program = parse(rule)
        if name not in self.items and len(self.items) >= MAX_TRANSFORMS:
            raise Rejected("unavailable", f"too many transforms ({MAX_TRANSFORMS})")
        self.items[name] = Transform(name, topic, rule, index, program)
        self.items = dict(sorted(self.items.items()))  # applied in name order
        return self.items[name].describe()

    def delete(self, args: dict[str, Any]) -> dict[str, Any]:
        name = check_name(args.get("name"))
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


def check_name(value: Any) -> str:
    return check_resource_name(value, "name", MAX_NAME_LEN)
