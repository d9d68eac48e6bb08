"""The chaos runs the dashboard shows: the run directories ``python -m
chaos.run --out DIR`` writes (``verdict.json``, ``report.txt``,
``latency.png``), read from the node's chaos directory (``--chaos-dir``,
default ``<data-dir>/chaos``). Read off the event loop; run names are checked
against the directory listing, so no path from a request reaches the file
system."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from coordinator.api.keys import CHAOS_DIR
from coordinator.api.routes import ok
from coordinator.api.spec import Op
from coordinator.errors import NotFound

chaos_routes = web.RouteTableDef()

RUN_NAME = re.compile(r"[0-9]{8}-[0-9]{6}\Z")  # chaos.run names its runs by their start time
LIST_MAX = 20
REPORT_MAX_BYTES = 64 << 10
PLOT_MAX_BYTES = 8 << 20


def _runs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    runs = [p for p in directory.iterdir() if RUN_NAME.match(p.name) and (p / "verdict.json").is_file()]
    return sorted(runs, key=lambda p: p.name, reverse=True)[:LIST_MAX]


def _summary(run: Path) -> dict[str, Any]:
    try:
        verdict = json.loads((run / "verdict.json").read_text())
    except (OSError, ValueError):
        verdict = {}
    checks = {name: part for name, part in verdict.items() if isinstance(part, dict) and "valid" in part}
    valid = [part["valid"] for part in checks.values()]
    return {"run": run.name, "checks": {name: part["valid"] for name, part in checks.items()},
            "valid": all(v is True for v in valid) if valid else None,
            "has_plot": (run / "latency.png").is_file()}


def _read(run: Path, name: str, limit: int) -> bytes | None:
    path = run / name
    if not path.is_file() or path.stat().st_size > limit:
        return None
    return path.read_bytes()


def _run_of(request: web.Request) -> Path:
    directory = request.app[CHAOS_DIR]
    name = request.match_info["run"]
    if directory is None or not RUN_NAME.match(name):
        raise NotFound(f"no chaos run {name!r}")
    return directory / name


@chaos_routes.get("/v1/chaos/runs")
@Op("Chaos runs of this host (admin)", tags=("chaos",))
async def list_runs(request: web.Request) -> web.Response:
    directory = request.app[CHAOS_DIR]
    if directory is None:
        return ok({"directory": None, "runs": []})
    runs = await asyncio.to_thread(lambda: [_summary(run) for run in _runs(directory)])
    return ok({"directory": str(directory), "runs": runs})


@chaos_routes.get("/v1/chaos/runs/{run}")
@Op("One chaos run's summary (admin)", tags=("chaos",))
async def get_run(request: web.Request) -> web.Response:
    run = _run_of(request)

    def load() -> dict[str, Any] | None:
        if not (run / "verdict.json").is_file():
            return None
        report = _read(run, "report.txt", REPORT_MAX_BYTES)
        return {**_summary(run), "report": report.decode(errors="replace") if report is not None else None}

    found = await asyncio.to_thread(load)
    if found is None:
        raise NotFound(f"no chaos run {run.name!r}")
    return ok(found)


@chaos_routes.get("/v1/chaos/runs/{run}/latency.png")
@Op("One chaos run's latency plot (admin)", tags=("chaos",), content="image/png")
async def get_plot(request: web.Request) -> web.Response:
    run = _run_of(request)
    body = await asyncio.to_thread(_read, run, "latency.png", PLOT_MAX_BYTES)
    if body is None:
        raise NotFound(f"chaos run {run.name!r} has no plot")
    return web.Response(body=body, content_type="image/png", headers={"Cache-Control": "no-cache"})
