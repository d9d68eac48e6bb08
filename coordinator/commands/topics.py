"""Topic names and subscription patterns (NATS-style), pure.

A topic is dot-separated tokens: ``agents.a17.status``. A pattern may use
``*`` for exactly one token and ``>`` as the last token for one or more
tokens: ``agents.*.status``, ``tasks.>``. Tokens are 1-64 characters of
letters, digits, ``-``, ``_``, ``:`` and ``@``; at most 16 tokens, 256
characters in all.
"""

from __future__ import annotations

import re

from coordinator.commands.base import Rejected, invalid

MAX_TOPIC_LEN = 256
MAX_TOKENS = 16
_TOKEN = re.compile(r"[A-Za-z0-9_\-:@]{1,64}\Z")


def _tokens(text: object, field: str, *, pattern: bool) -> list[str]:
    if not isinstance(text, str):
        raise invalid(field, "must be a string")
    if not text or len(text) > MAX_TOPIC_LEN:
        raise invalid(field, f"must have 1 to {MAX_TOPIC_LEN} characters")
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        raise invalid(field, f"has more than {MAX_TOKENS} tokens")
    for i, token in enumerate(tokens):
        if pattern and token == "*":
            continue
        if pattern and token == ">":
            if i != len(tokens) - 1:
                raise invalid(field, "'>' may only be the last token")
            continue
        if not _TOKEN.match(token):
            what = "a pattern" if pattern else "a topic (no wildcards)"
            raise invalid(field, f"token {i + 1} ({token!r}) is not valid in {what}")
    return tokens


def check_topic(text: object, field: str = "topic") -> str:
    """A concrete topic (no wildcards); raises ``Rejected`` naming ``field``."""
    _tokens(text, field, pattern=False)
    return text  # type: ignore[return-value]


def check_pattern(text: object, field: str = "topic") -> str:
    _tokens(text, field, pattern=True)
    return text  # type: ignore[return-value]


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` (concrete) matches ``pattern``."""
    p_tokens = pattern.split(".")
    t_tokens = topic.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(t_tokens) > i
        if i >= len(t_tokens):
            return False
        if p != "*" and p != t_tokens[i]:
            return False
    return len(p_tokens) == len(t_tokens)


def is_pattern(text: str) -> bool:
    return any(token in ("*", ">") for token in text.split("."))


__all__ = ["Rejected", "check_pattern", "check_topic", "is_pattern", "matches"]
