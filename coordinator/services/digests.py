"""Compare this replica's state digest with every other member's.

Each node, every ``interval_s``, asks every member for ``GET /v1/status``
(public) and compares the digests (``coordinator.state.digest``) at every
index both replicas can be compared at: the checkpoints each keeps and each
one's latest. Replicas that applied the same history agree at every common
index; one that disagrees at any index diverged there (which of the two is
wrong, the other members' answers tell: the majority that agrees). A
disagreement is logged, counted (``mismatches``) and shown in this node's
status; no common index yet (a member far behind, or just restored from a
snapshot) is "unknown", not a disagreement.

Loop thread only. Never raises out of ``run``: a member that does not answer
is reported as unreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from coordinator.services.applier import Applier

log = logging.getLogger(__name__)

# (member row of /v1/status, its status or None, why not)
Answers = list[tuple[dict[str, Any], dict[str, Any] | None, str | None]]


def compare_points(own: list[tuple[int, str]], theirs: Any) -> tuple[bool | None, int | None]:
    """(agree, index) between two replicas' digest points ([index, hex] pairs):
    (True, highest common index) when they agree at every common index,
    (False, lowest index where they differ), (None, None) when they have no
    index in common or ``theirs`` is not a list of such pairs."""
    mine = dict(own)
    common: dict[int, str] = {}
    if not isinstance(theirs, list):
        return None, None
    for point in theirs:
        if (isinstance(point, (list, tuple)) and len(point) == 2 and type(point[0]) is int
                and isinstance(point[1], str) and point[0] in mine):
            common[point[0]] = point[1]
    if not common:
        return None, None
    differ = sorted(i for i, value in common.items() if value != mine[i])
    if differ:
        return False, differ[0]
    return True, max(common)


class DigestWatch:
    def __init__(self, applier: Applier, ask: Callable[[], Awaitable[Answers]], self_raft: str, *,
                 interval_s: float = 5.0) -> None:
        """``ask()`` returns every member's status (``CoordinatorNode.ask_members``);
        the row whose ``raft`` is ``self_raft`` is this node and is skipped."""
        self.applier = applier
        self.ask = ask
        self.self_raft = self_raft
        self.interval_s = interval_s
        self.checks = 0  # comparisons with a member at a common index
        self.mismatches = 0  # of those, the ones that found a different digest
        self.last: dict[str, Any] = {}  # member id -> {"agree": bool|None, "index": int|None[, "error"]}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:  # a bug here must not end the periodic check
                log.exception("digest comparison failed")

    async def check_once(self) -> dict[str, Any]:
        """Compare with every member once; returns (and keeps) the per-member outcome."""
        answers = await self.ask()
        own = self.applier.digest.points()
        outcome: dict[str, Any] = {}
        for member, status, error in answers:
            if member.get("raft") == self.self_raft:
                continue
            name = member.get("id") or member.get("raft")
            if status is None:
                outcome[name] = {"agree": None, "index": None, "error": error}
                continue
            digest = status.get("digest")
            agree, index = compare_points(own, digest.get("points") if isinstance(digest, dict) else None)
            outcome[name] = {"agree": agree, "index": index}
            if agree is None:
                continue
            self.checks += 1
            if not agree:
                self.mismatches += 1
                log.error("state digest differs from member %s's at index %d: one of the two replicas diverged "
                          "(the members that agree with each other hold the correct history)", name, index)
        self.last = outcome
        return outcome

    def status(self) -> dict[str, Any]:
        return {"checks": self.checks, "mismatches": self.mismatches, "members": self.last,
                "agree": not any(row["agree"] is False for row in self.last.values())}
