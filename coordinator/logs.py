"""How a node logs: plain text or one JSON object per line (``log_format``),
and the fields of the optional access log (``access_log``; its lines are
made by ``coordinator.api.accesslog``).

The JSON lines carry ``ts`` (RFC 3339, UTC, milliseconds), ``level``,
``logger``, ``msg`` and, for access lines, ``method``, ``path`` (without the
query string: it is not needed to tell requests apart and may carry a
caller's data), ``status``, ``ms``, ``bytes``, ``remote`` and ``principal``
(``admin``, ``agent:<id>``, ``anonymous``...). No header is ever logged, so
no credential reaches a log.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "coordinator.access"
ACCESS_FIELDS = ("method", "path", "status", "ms", "bytes", "remote", "principal")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in ACCESS_FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, log_format: str) -> None:
    """The root logger of a node process (``coordinator serve``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
