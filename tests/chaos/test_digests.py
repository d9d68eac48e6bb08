"""The chaos run's replica check (chaos/digests.py), on fabricated statuses."""

from __future__ import annotations

import asyncio

from chaos.digests import compare_digests, describe, wait_for_digests
from chaos.run import digest_exit


def _status(*points: tuple[int, str]) -> dict:
    latest = points[-1]
    return {"role": "follower", "digest": {"index": latest[0], "value": latest[1], "points": [list(p) for p in points]}}


A, B, C, X = "a" * 64, "b" * 64, "c" * 64, "f" * 64


def test_nodes_that_agree_at_every_shared_index_pass() -> None:
    verdict = compare_digests({"n1": _status((64, A), (128, B), (130, C)), "n2": _status((64, A), (128, B), (130, C)),
                               "n3": _status((64, A), (128, B))})  # n3 behind: compared up to 128
    assert verdict == {"valid": True, "index": 128, "nodes": ["n1", "n2", "n3"]}
    assert digest_exit(verdict) == 0
    assert "3 nodes agree up to index 128" in describe(verdict)


def test_a_node_whose_digest_differs_fails_the_run_naming_the_index_and_sides() -> None:
    verdict = compare_digests({"n1": _status((64, A), (128, B)), "n2": _status((64, A), (128, B)),
                               "n3": _status((64, A), (128, X))})
    assert verdict["valid"] is False and verdict["index"] == 128
    assert verdict["groups"] == {B[:16]: ["n1", "n2"], X[:16]: ["n3"]}
    assert digest_exit(verdict) == 1
    assert "DIVERGED at index 128" in describe(verdict)
    # the first index where they split is reported, even if a later one matches again
    early = compare_digests({"n1": _status((64, A), (128, B)), "n2": _status((64, X), (128, B))})
    assert early["valid"] is False and early["index"] == 64


def test_no_shared_index_or_no_digest_cannot_be_judged() -> None:
    apart = compare_digests({"n1": _status((64, A)), "n2": _status((128, B))})
    assert apart["valid"] is None and "no index" in apart["reason"]
    missing = compare_digests({"n1": _status((64, A)), "n2": None, "n3": {"role": "leader"}})
    assert missing["valid"] is None and "n2" in missing["reason"]
    assert digest_exit(apart) == digest_exit(missing) == digest_exit(None) == 2
    assert "could not compare" in describe(apart)


async def test_waiting_polls_until_the_nodes_share_an_index() -> None:
    """A lagging node catches up on the third poll: the wait then judges them."""
    polls = {"n1": 0, "n2": 0}

    def status_of(node: str) -> dict:
        polls[node] += 1
        if node == "n2" and polls[node] < 3:
            return _status((10, C))
        return _status((10, C), (64, A)) if node == "n2" else _status((64, A))

    verdict = await asyncio.wait_for(wait_for_digests(status_of, ["n1", "n2"], timeout_s=5, every_s=0.01), 10)
    assert verdict["valid"] is True and verdict["index"] == 64 and polls["n2"] == 3
    never = await wait_for_digests(lambda node: _status((1 if node == "n1" else 2, A)), ["n1", "n2"],
                                   timeout_s=0.05, every_s=0.01)
    assert never["valid"] is None
