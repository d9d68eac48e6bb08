"""Typed keys of the aiohttp application."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from coordinator.api.metrics import HttpMetrics
    from coordinator.services.node import CoordinatorNode

NODE: web.AppKey[CoordinatorNode] = web.AppKey("node")
METRICS: web.AppKey[HttpMetrics] = web.AppKey("metrics")
CHAOS_DIR: web.AppKey[Path | None] = web.AppKey("chaos_dir")
# The request id a signed write is deduplicated by when its caller gave none:
# derived from the signature's nonce (set by the auth middleware, read by
# ``schemas.origin``), so a replayed write applies nothing twice.
IMPLIED_REQUEST_ID: web.RequestKey[str] = web.RequestKey("implied_request_id", str)
