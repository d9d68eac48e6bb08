"""The bus message (the seed's schema), validated and normalised, pure.

    {id, type, source, destination[], timestamp, correlationId, replyTo,
     priority, ttl, headers, payload,
     deliveryOptions: {guarantee, retry: {max_attempts, backoff_ms,
                       backoff_multiplier, max_backoff_ms}, timeout, persistent}}

``normalize(raw, now_ms)`` returns the message with every default filled in,
or raises ``Rejected("invalid", "<dotted.field>: why")`` — so a bad message
is refused before anything is stored. ``ttl`` and ``timeout`` are in
milliseconds; ``priority`` is 0 (lowest) to 9, or low/normal/high/critical.
"""

from __future__ import annotations

from typing import Any

from coordinator.commands.base import Rejected, check_int, check_number, check_str, invalid
from coordinator.commands.topics import check_topic

TYPES = ("command", "event", "request", "response", "notification")
GUARANTEES = ("at-most-once", "at-least-once", "exactly-once")
PRIORITY_NAMES = {"low": 2, "normal": 5, "high": 7, "critical": 9}
MAX_ID_LEN = 128
MAX_DESTINATIONS = 64
MAX_HEADERS = 64
MAX_HEADER_KEY = 128
MAX_HEADER_VALUE = 1024
MAX_TTL_MS = 7 * 86_400_000
MAX_TIMEOUT_MS = 3_600_000
FIELDS = {"id", "type", "source", "destination", "timestamp", "correlationId", "replyTo", "priority", "ttl",
          "headers", "payload", "deliveryOptions"}
DELIVERY_FIELDS = {"guarantee", "retry", "timeout", "persistent"}
RETRY_FIELDS = {"max_attempts", "backoff_ms", "backoff_multiplier", "max_backoff_ms"}


def _object(value: Any, field: str, allowed: set[str]) -> dict[str, Any]:
    """``field`` is the dotted path of the object; "message" is the top level,
    whose own fields are named bare (``bogus``, not ``message.bogus``)."""
    if not isinstance(value, dict):
        raise invalid(field, "must be an object")
    if value.keys() <= allowed:  # the usual case, without a generator per object
        return value
    unknown = sorted(k for k in value if k not in allowed)
    if unknown:
        raise invalid(unknown[0] if field == "message" else f"{field}.{unknown[0]}", "unknown field")
    return value


def in_batch(i: int, n: int, message: str) -> str:
    """An error about message ``i`` of a batch of ``n``: ``messages[i].field: why``
    (``messages[i]: why`` when it is about the whole message)."""
    if n == 1:
        return message
    if message.startswith("message:"):
        return f"messages[{i}]" + message[len("message"):]
    return f"messages[{i}].{message}"


def _priority(value: Any) -> int:
    if isinstance(value, str):
        if value not in PRIORITY_NAMES:
            raise invalid("priority", f"must be 0-9 or one of {', '.join(PRIORITY_NAMES)}")
        return PRIORITY_NAMES[value]
    return check_int(value, "priority", 0, 9)


def _delivery(value: Any) -> dict[str, Any]:
    if value is None:  # most messages: the defaults below, without checking each (a fifth of normalize)
        return {"guarantee": "at-least-once",
                "retry": {"max_attempts": 5, "backoff_ms": 1000, "backoff_multiplier": 2.0, "max_backoff_ms": 60_000},
                "timeout": 30_000, "persistent": True}
    options = _object(value, "deliveryOptions", DELIVERY_FIELDS)
    guarantee = options.get("guarantee", "at-least-once")
    if guarantee not in GUARANTEES:
        raise invalid("deliveryOptions.guarantee", f"must be one of {', '.join(GUARANTEES)}")
    retry = _object(options.get("retry") or {}, "deliveryOptions.retry", RETRY_FIELDS)
    max_attempts = check_int(retry.get("max_attempts", 5), "deliveryOptions.retry.max_attempts", 1, 100)
    backoff_ms = check_int(retry.get("backoff_ms", 1000), "deliveryOptions.retry.backoff_ms", 0, MAX_TIMEOUT_MS)
    multiplier = check_number(retry.get("backoff_multiplier", 2.0), "deliveryOptions.retry.backoff_multiplier",
                              1.0, 10.0)
    max_backoff = check_int(retry.get("max_backoff_ms", 60_000), "deliveryOptions.retry.max_backoff_ms", backoff_ms,
                            MAX_TIMEOUT_MS)
    timeout = check_int(options.get("timeout", 30_000), "deliveryOptions.timeout", 100, MAX_TIMEOUT_MS)
    persistent = options.get("persistent", guarantee != "at-most-once")
    if not isinstance(persistent, bool):
        raise invalid("deliveryOptions.persistent", "must be true or false")
    if guarantee != "at-most-once" and not persistent:
        raise invalid("deliveryOptions.persistent", f"{guarantee} needs a persistent message")
    return {"guarantee": guarantee,
            "retry": {"max_attempts": max_attempts, "backoff_ms": backoff_ms, "backoff_multiplier": multiplier,
                      "max_backoff_ms": max_backoff},
            "timeout": timeout, "persistent": persistent}


def normalize(raw: Any, now_ms: int) -> dict[str, Any]:
    """A complete, checked message; ``Rejected`` naming the first bad field."""
    message = _object(raw, "message", FIELDS)
    if "id" not in message:
        raise invalid("id", "is required")
    destination = message.get("destination") or []
    if not isinstance(destination, list) or len(destination) > MAX_DESTINATIONS:
        raise invalid("destination", f"must be a list of at most {MAX_DESTINATIONS} agent ids")
    headers = message.get("headers") or {}
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise invalid("headers", f"must be an object of at most {MAX_HEADERS} string values")
    for key, value in headers.items():
        check_str(key, "headers", MAX_HEADER_KEY)
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE:
            raise invalid(f"headers.{key}", f"must be a string of at most {MAX_HEADER_VALUE} characters")
    if message.get("type") not in TYPES:
        raise invalid("type", f"must be one of {', '.join(TYPES)}")
    out = {
        "id": check_str(message["id"], "id", MAX_ID_LEN),
        "type": message["type"],
        "source": check_str(message.get("source"), "source", MAX_ID_LEN),
        "destination": [check_str(d, f"destination[{i}]", MAX_ID_LEN) for i, d in enumerate(destination)],
        "timestamp": check_int(message.get("timestamp", now_ms), "timestamp", 0, 2**53),
        "correlationId": None if message.get("correlationId") is None
        else check_str(message["correlationId"], "correlationId", MAX_ID_LEN),
        "replyTo": None if message.get("replyTo") is None else check_topic(message["replyTo"], "replyTo"),
        "priority": _priority(message.get("priority", 5)),
        "ttl": None if message.get("ttl") is None else check_int(message["ttl"], "ttl", 1, MAX_TTL_MS),
        "headers": dict(headers),
        "payload": message.get("payload"),
        "deliveryOptions": _delivery(message.get("deliveryOptions")),
    }
    if out["type"] == "request" and out["replyTo"] is None:
        raise invalid("replyTo", "a request needs a topic to answer on")
    if out["type"] == "response" and out["correlationId"] is None:
        raise invalid("correlationId", "a response names the request it answers")
    return out


__all__ = ["GUARANTEES", "TYPES", "Rejected", "in_batch", "normalize"]
