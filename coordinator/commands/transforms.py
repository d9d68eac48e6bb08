"""Transform rules: the rule language's parser and the commands
``transform.put`` and ``transform.delete`` (pure).

A rule is parsed into statements when it is defined: a syntax error is
refused with its line and column (``RuleError``, a ``Rejected`` naming
``rule``). The language itself, and how a parsed rule is interpreted over a
message, is described in ``coordinator/state/transforms.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from coordinator.commands.base import DomainCommand, NamedCommand, Rejected, check_resource_name, invalid
from coordinator.commands.topics import check_pattern, check_topic

MAX_RULE_LEN = 8192
MAX_STATEMENTS = 64
MAX_NAME_LEN = 128
RESERVED = ("agent.", "lock.", "system.")  # the bus's RESERVED_PREFIXES: no rule routes there

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


def check_name(value: Any) -> str:
    """A transform's name (one URL path segment). The API checks a path's
    name with it before reading the body, then parse again."""
    return check_resource_name(value, "name", MAX_NAME_LEN)


@dataclass(frozen=True, slots=True)
class TransformPut(DomainCommand):
    """Define (or redefine) transform ``name``: ``rule`` on the topics ``topic`` matches."""

    op: ClassVar[str] = "transform.put"
    name: str
    topic: str
    rule: str
    program: Program = field(default=Program((), ()), compare=False, repr=False)  # the parsed rule

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        name = check_name(args.get("name"))
        topic = check_pattern(args.get("topic"), "topic")
        rule = args.get("rule")
        return cls(name, topic, rule, parse(rule))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "topic": self.topic, "rule": self.rule}


@dataclass(frozen=True, slots=True)
class TransformDelete(NamedCommand):
    op: ClassVar[str] = "transform.delete"
    check_name = staticmethod(check_name)
