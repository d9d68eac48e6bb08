"""Content filters of subscriptions: a small expression language, parsed into
a tree and evaluated against a message. Never ``eval``; pure.

    expr   := or
    or     := and ("or" and)*
    and    := not ("and" not)*
    not    := "not" not | atom
    atom   := "(" expr ")" | "exists" "(" path ")"
            | path ("==" | "!=" | "<" | "<=" | ">" | ">=") value
            | path ["not"] "in" "[" value ("," value)* "]"
    path   := name ("." name)*        e.g. headers.region, payload.order.total, type
    value  := number | "string" | 'string' | true | false | null

A path that does not exist makes every comparison false (``!=`` included);
test it with ``exists(path)``. ``<`` and friends compare numbers with numbers
and strings with strings, anything else is false. ``==`` is JSON equality
(``true`` is not ``1``). Limits: 1024 characters, 32 levels of nesting, 64
values in a list.
"""

from __future__ import annotations

import re
from typing import Any

from coordinator.commands.base import Rejected, json_equal

MAX_FILTER_LEN = 1024
MAX_DEPTH = 32
MAX_LIST = 64

_TOKENS = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],])
  | (?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*)
""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "exists", "true", "false", "null"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_MISSING = object()


class FilterError(Rejected):
    def __init__(self, message: str, position: int) -> None:
        super().__init__("invalid", f"filter: {message} at position {position}")
        self.position = position


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKENS.match(text, pos)
        if match is None:
            raise FilterError(f"unexpected character {text[pos]!r}", pos)
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group(), pos))
        pos = match.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i]

    def take(self, kind: str | None = None, text: str | None = None) -> tuple[str, str, int]:
        token = self.tokens[self.i]
        if (kind is not None and token[0] != kind) or (text is not None and token[1] != text):
            wanted = text or kind
            found = token[1] or "the end"
            raise FilterError(f"expected {wanted}, found {found!r}", token[2])
        self.i += 1
        return token

    def is_word(self, word: str) -> bool:
        kind, text, _ = self.peek()
        return kind == "name" and text == word

    def parse(self) -> Any:
        tree = self.or_()
        if self.peek()[0] != "end":
            _, text, pos = self.peek()
            raise FilterError(f"unexpected {text!r}", pos)
        return tree

    def or_(self) -> Any:
        left = self.and_()
        while self.is_word("or"):
            self.take()
            left = ("or", left, self.and_())
        return left

    def and_(self) -> Any:
        left = self.not_()
        while self.is_word("and"):
            self.take()
            left = ("and", left, self.not_())
        return left

    def not_(self) -> Any:
        if self.is_word("not"):
            _, _, pos = self.take()
            self._enter(pos)
            inner = self.not_()
            self.depth -= 1
            return ("not", inner)
        return self.atom()

    def _enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"nested deeper than {MAX_DEPTH} levels", pos)

    def atom(self) -> Any:
        kind, text, pos = self.peek()
        if kind == "punct" and text == "(":
            self.take()
            self._enter(pos)
            tree = self.or_()
            self.depth -= 1
            self.take("punct", ")")
            return tree
        if self.is_word("exists"):
            self.take()
            self.take("punct", "(")
            path = self.path()
            self.take("punct", ")")
            return ("exists", path)
        path = self.path()
        kind, text, pos = self.peek()
        if kind == "op":
            self.take()
            return ("cmp", text, path, self.value())
        negate = False
        if self.is_word("not"):
            self.take()
            negate = True
            if not self.is_word("in"):
                raise FilterError("expected 'in' after 'not'", self.peek()[2])
        if self.is_word("in"):
            self.take()
            self.take("punct", "[")
            values = [self.value()]
            while self.peek()[1] == ",":
                self.take()
                values.append(self.value())
                if len(values) > MAX_LIST:
                    raise FilterError(f"more than {MAX_LIST} values in a list", self.peek()[2])
            self.take("punct", "]")
            tree = ("in", path, tuple(values))
            return ("not", tree) if negate else tree
        raise FilterError(f"expected a comparison after {'.'.join(path)!r}", pos)

    def path(self) -> tuple[str, ...]:
        kind, text, pos = self.peek()
        if kind != "name" or text.split(".")[0] in _KEYWORDS:
            raise FilterError(f"expected a field path, found {text or 'the end'!r}", pos)
        self.take()
        return tuple(text.split("."))

    def value(self) -> Any:
        kind, text, pos = self.take()
        if kind == "number":
            number = float(text)
            return int(number) if re.fullmatch(r"-?\d+", text) else number
        if kind == "string":
            return _unquote(text[1:-1], pos)
        if kind == "name" and text in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[text]
        raise FilterError(f"expected a value, found {text or 'the end'!r}", pos)


def _unquote(body: str, pos: int) -> str:
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or body[i + 1] not in _ESCAPES:
                raise FilterError("unknown escape in a string", pos + 1 + i)
            out.append(_ESCAPES[body[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse(text: object) -> Any:
    """The filter's tree (tuples of plain data); ``FilterError`` names the position."""
    if not isinstance(text, str):
        raise Rejected("invalid", "filter: must be a string")
    if not text.strip() or len(text) > MAX_FILTER_LEN:
        raise Rejected("invalid", f"filter: must have 1 to {MAX_FILTER_LEN} characters")
    return _Parser(text).parse()


def _lookup(message: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = message
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return _MISSING
        value = value[name]
    return value


def _ordered(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (isinstance(a, str) and isinstance(b, str))


def evaluate(tree: Any, message: dict[str, Any]) -> bool:
    """Whether ``message`` passes the filter. Iterative over and/or/not chains
    would not matter: depth is bounded at parse time."""
    kind = tree[0]
    if kind == "and":
        return evaluate(tree[1], message) and evaluate(tree[2], message)
    if kind == "or":
        return evaluate(tree[1], message) or evaluate(tree[2], message)
    if kind == "not":
        return not evaluate(tree[1], message)
    if kind == "exists":
        return _lookup(message, tree[1]) is not _MISSING
    if kind == "in":
        value = _lookup(message, tree[1])
        return value is not _MISSING and any(json_equal(value, v) for v in tree[2])
    _, op, path, literal = tree
    value = _lookup(message, path)
    if value is _MISSING:
        return False
    if op == "==":
        return json_equal(value, literal)
    if op == "!=":
        return not json_equal(value, literal)
    if not _ordered(value, literal):
        return False
    return {"<": value < literal, "<=": value <= literal, ">": value > literal, ">=": value >= literal}[op]
