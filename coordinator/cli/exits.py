"""Exit codes of every client command, and the one line said on stderr.

The same for every command, so a script can branch on them:

- ``OK`` 0: done.
- ``ABSENT`` 1: the thing asked about is absent or the condition failed (a
  key not found, a lock held by another, no leader elected, a member
  unreachable in ``status``, fewer deliveries than ``--count`` in time).
- ``REFUSED`` 2: usage or input refused (argparse errors, a 4xx naming a
  field, a missing credential or a credential refused, an unreadable file).
- ``UNAVAILABLE`` 3: the cluster could not answer (no quorum, unreachable,
  timed out, outcome unknown), or an unexpected error.
- ``INTERRUPTED`` 130: Ctrl-C or SIGTERM (a held lock or leadership is
  released first).
"""

from __future__ import annotations

from coordinator.errors import (
    BadGateway,
    Compacted,
    Conflict,
    CoordinatorError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    RequestTimeout,
    Unavailable,
)

OK = 0
ABSENT = 1
REFUSED = 2
UNAVAILABLE = 3
INTERRUPTED = 130

EPILOG = """\
environment (a flag wins over its variable):
  COORD_ENDPOINTS       --endpoints, comma-separated (default 127.0.0.1:7001)
  COORD_TOKEN           the admin token itself (never a flag: it would show in ps)
  COORD_TOKEN_FILE      --token-file, a file holding the admin token
  COORD_AGENT_ID        --agent-id, sign requests as this agent ...
  COORD_AGENT_KEY_FILE  --agent-key-file ... with this key file (coordinator agent-key new)
  COORD_TLS_CA          --tls-ca, the CA of an HTTPS cluster
  COORD_TIMEOUT         --timeout, seconds per command (default 10)
  COORD_WRITE_OUT       -w/--write-out, table (default) or json

exit codes (every command):
  0    success
  1    absent or the condition failed: key not found, lock held by another, no leader,
       a member unreachable in status, fewer deliveries than --count in time
  2    usage or input refused: bad flags, a 4xx naming a field, credentials missing or refused
  3    the cluster could not answer: unavailable, timed out, rate limited, outcome unknown
  130  interrupted (Ctrl-C, SIGTERM); a held lock or leadership is released first
"""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached a command that was waiting."""


class Failed(Exception):
    """The command ran and the answer is no: ``message`` goes to stderr and
    the command exits with ``code`` (``ABSENT`` unless said otherwise)."""

    def __init__(self, message: str, code: int = ABSENT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def exit_code(exc: CoordinatorError) -> int:
    """The exit code of an error the client raised."""
    if isinstance(exc, NotFound | Conflict | Compacted):
        return ABSENT
    if isinstance(exc, Unavailable | OutcomeUnknown | RequestTimeout | BadGateway | RateLimited):
        return UNAVAILABLE
    status = exc.details.get("status")
    if isinstance(status, int) and status >= 500:
        return UNAVAILABLE
    return REFUSED  # InvalidInput, TooLarge, Unauthenticated, Forbidden, QuotaExceeded, other 4xx


def message(exc: CoordinatorError) -> str:
    """The line said for ``exc`` (after ``coordinator: ``): the node's message,
    the field it names, and what an unknown outcome means for a retry."""
    text = exc.message
    field = exc.details.get("field")
    if field and not text.startswith(f"{field}:"):
        text = f"{field}: {text}"
    if isinstance(exc, OutcomeUnknown):
        request = f" {exc.request_id}" if exc.request_id else ""
        text += (f" (outcome unknown: the write may or may not have applied; the client retried it under one "
                 f"request id{request} until --timeout, which cannot apply it twice, but running the command "
                 f"again is a new request: read first)")
    elif isinstance(exc, Unavailable | RateLimited):
        text += " (the cluster could not answer; nothing was applied, a retry later is safe)"
    return " ".join(text.split())  # one line
