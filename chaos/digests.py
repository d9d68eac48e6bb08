"""The end-of-run replica check: every node's state digest agrees.

Each node reports in ``GET /v1/status`` a ``digest`` with the ``points``
(``[index, hex]`` pairs: recent checkpoints and its latest index) at which its
running digest of the applied history can be compared. Replicas that applied
the same entries with the same results agree at every index they share; a
replica that diverged (applied something else, computed another result)
disagrees from that index on. After the heal, ``wait_for_digests`` polls
until the nodes share an index (they catch up and go quiet), then
``compare_digests`` judges: agreement at every shared index, or the first
index where they split and who is on which side.

Only statuses over HTTP: nothing of the service's internals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def _points(status: Any) -> dict[int, str] | None:
    digest = status.get("digest") if isinstance(status, dict) else None
    points = digest.get("points") if isinstance(digest, dict) else None
    if not isinstance(points, list):
        return None
    out: dict[int, str] = {}
    for point in points:
        if (isinstance(point, (list, tuple)) and len(point) == 2 and type(point[0]) is int
                and isinstance(point[1], str)):
            out[point[0]] = point[1]
    return out


def compare_digests(statuses: dict[str, Any]) -> dict[str, Any]:
    """Judge the nodes' digests from their statuses (node id -> status or None).

    ``valid`` True: they share an index and agree at every shared one
    (``index``: the highest); False: they differ (``index``: the first index
    where they do, ``groups``: digest prefix -> nodes); None: cannot judge
    (``reason``: a node without a status or digest, or no index shared by all)."""
    points: dict[str, dict[int, str]] = {}
    for node, status in sorted(statuses.items()):
        found = _points(status)
        if found is None:
            return {"valid": None, "index": None, "reason": f"{node}: no status or no digest"}
        points[node] = found
    if not points:
        return {"valid": None, "index": None, "reason": "no nodes"}
    shared = set.intersection(*(set(p) for p in points.values()))
    if not shared:
        return {"valid": None, "index": None, "reason": "no index all nodes can be compared at yet",
                "latest": {node: max(p) if p else None for node, p in points.items()}}
    for index in sorted(shared):
        groups: dict[str, list[str]] = {}
        for node, p in points.items():
            groups.setdefault(p[index][:16], []).append(node)
        if len(groups) > 1:
            return {"valid": False, "index": index, "groups": groups}
    return {"valid": True, "index": max(shared), "nodes": sorted(points)}


async def wait_for_digests(status_of: Callable[[str], Any], nodes: list[str], timeout_s: float,
                           every_s: float = 0.2) -> dict[str, Any]:
    """Poll ``status_of(node)`` (blocking, run in a thread) for every node until
    ``compare_digests`` can judge, or ``timeout_s`` passed: the last verdict."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {node: await asyncio.to_thread(status_of, node) for node in nodes}
        verdict = compare_digests(statuses)
        if verdict["valid"] is not None or time.monotonic() >= deadline:
            return verdict
        await asyncio.sleep(every_s)


def describe(verdict: dict[str, Any] | None) -> str:
    """One line for the report."""
    if verdict is None:
        return "replica digests: not checked (the cluster did not recover)"
    if verdict["valid"] is True:
        return f"replica digests: {len(verdict['nodes'])} nodes agree up to index {verdict['index']}"
    if verdict["valid"] is False:
        sides = "; ".join(f"{prefix}: {', '.join(nodes)}" for prefix, nodes in verdict["groups"].items())
        return f"replica digests: DIVERGED at index {verdict['index']} ({sides})"
    return f"replica digests: could not compare ({verdict['reason']})"
