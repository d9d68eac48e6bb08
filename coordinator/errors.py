"""Errors of the coordinator core.

Every error carries a stable machine-readable ``code``. Only
``coordinator.api.errors`` maps them to HTTP status codes.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error the core raises on purpose."""

    code = "internal"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(CoordinatorError):
    """The request is malformed; ``field`` names the offending field."""

    code = "invalid"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.field = field


class TooLarge(CoordinatorError):
    code = "too_large"


class QuotaExceeded(CoordinatorError):
    """A store, or the caller's share of the stores, would hold more bytes
    than its limit allows (HTTP 507); ``limit`` names it."""

    code = "quota_exceeded"


class NotFound(CoordinatorError):
    code = "not_found"


class Conflict(CoordinatorError):
    """The command was valid but lost against the current state (CAS, lock, fence)."""

    code = "conflict"


class Compacted(CoordinatorError):
    """A watch asked for history that is no longer retained."""

    code = "compacted"


class Unavailable(CoordinatorError):
    """The command certainly did not take effect; retrying later may succeed.

    ``leader`` is the HTTP address of the leader when known.
    """

    code = "unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0, leader: str | None = None, **details: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, leader=leader, **details)
        self.retry_after_s = retry_after_s
        self.leader = leader


class ReadIndexRefused(Unavailable):
    """The engine cannot confirm a read by ReadIndex now (it does not lead
    and knows no leader to ask, its leader has not committed an entry of its
    term yet, or leadership changed during the round). Nothing was decided:
    the caller may confirm the read another way (a log barrier); left
    uncaught it is a 503 like any ``Unavailable``."""


class ReplicaHalted(Unavailable):
    """This node's replica stopped applying the log: applying an entry or
    restoring a snapshot raised something other than the state machine's
    ordinary refusal (a bug). Its state may be half-applied, so the node
    serves no write and no read until it is restarted (and replays from its
    snapshot and journal). ``message`` names the index and the exception's
    type, never its text or the entry."""


class OutcomeUnknown(CoordinatorError):
    """The command was handed to consensus but no outcome came back in time.

    It may or may not take effect; a retry with the same ``request_id`` is safe.
    ``request_id``: the id the request carried, when the raiser knows it.
    """

    code = "outcome_unknown"

    @property
    def request_id(self) -> str | None:
        value = self.details.get("request_id")
        return value if isinstance(value, str) else None


class RequestTimeout(CoordinatorError):
    """A request on the bus got no response in time (HTTP 504)."""

    code = "timeout"


class Unauthenticated(CoordinatorError):
    """The request carries no credential where one is needed, or a bad one (HTTP 401)."""

    code = "unauthenticated"


class Forbidden(CoordinatorError):
    """The caller is known but lacks a permission (HTTP 403); ``permission`` and
    ``resource`` say which."""

    code = "forbidden"

    def __init__(self, message: str, permission: str | None = None, resource: str | None = None) -> None:
        super().__init__(message, permission=permission, resource=resource)
        self.permission = permission
        self.resource = resource


class RateLimited(CoordinatorError):
    """A rate limit refused the request (HTTP 429); ``retry_after_s`` says when to try again."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float = 1.0, **details: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class BadGateway(CoordinatorError):
    """The agent a request was forwarded to could not be reached or broke the
    exchange (HTTP 502)."""

    code = "bad_gateway"


class InvariantError(CoordinatorError):
    """A broken internal invariant: a bug, never the caller's fault."""

    code = "invariant"
