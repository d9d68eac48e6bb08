"""The access log (``access_log = true``): one INFO line per HTTP request on
``coordinator.access``, with the fields of ``coordinator.logs.ACCESS_FIELDS``
as the record's extras, so the JSON format keeps them as keys. The path is
logged without its query string and no header is logged: no credential can
reach the log."""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from coordinator.api.auth import principal_of


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        principal = principal_of(request) if isinstance(request, web.Request) else None
        name = principal.header() if principal is not None else "-"
        fields = {"method": request.method, "path": request.path, "status": response.status,
                  "ms": round(time * 1000, 2), "bytes": response.body_length, "remote": request.remote or "-",
                  "principal": name}
        self.logger.info("%s %s %s %.1f ms %s", request.method, request.path, response.status, time * 1000, name,
                         extra=fields)
