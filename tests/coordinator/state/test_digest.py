"""The state digest (coordinator/state/digest.py): a running hash that every
replica applying the same history computes identically (issue 20, item 10)."""

from __future__ import annotations

import pytest

from coordinator.errors import InvariantError
from coordinator.state.digest import GENESIS, StateDigest, summary_bytes


def _chain(entries: list[tuple[int, bytes, bytes]], every: int = 4) -> StateDigest:
    digest = StateDigest(every=every)
    for index, entry, result in entries:
        digest.advance(index, entry, result, summary_bytes(index))
    return digest


ENTRIES = [(i, b"entry-%d" % i, b"result-%d" % i) for i in (1, 2, 3, 5, 6, 9, 10, 12, 13)]  # gaps as in Raft


def test_the_same_entries_give_the_same_digest_and_checkpoints() -> None:
    a, b = _chain(ENTRIES), _chain(ENTRIES)
    assert a.index == b.index == 13 and a.value == b.value != GENESIS
    assert a.points() == b.points()
    # the first applied index at or past each multiple of 4 (4 and 8 are gaps)
    assert [i for i, _ in a.checkpoints] == [5, 9, 12]
    assert a.points()[-1] == (13, a.value.hex())


def test_a_different_result_entry_or_summary_gives_a_different_digest_from_there_on() -> None:
    base = _chain(ENTRIES)
    other_result = _chain([(i, e, b"other" if i == 5 else r) for i, e, r in ENTRIES])
    other_entry = _chain([(i, b"other" if i == 5 else e, r) for i, e, r in ENTRIES])
    assert other_result.value != base.value and other_entry.value != base.value
    # before index 5 they agree, from 5 on they differ
    assert dict(other_result.points())[13] != dict(base.points())[13]
    a, b = StateDigest(), StateDigest()
    a.advance(1, b"e", b"r", summary_bytes(1, 2))
    b.advance(1, b"e", b"r", summary_bytes(1, 3))
    assert a.value != b.value
    # the fields are hashed separately: moving bytes across the seam changes the digest
    c, d = StateDigest(), StateDigest()
    c.advance(1, b"ab", b"c")
    d.advance(1, b"a", b"bc")
    assert c.value != d.value


def test_restoring_the_digest_then_continuing_equals_the_uninterrupted_chain() -> None:
    full = _chain(ENTRIES)
    first = _chain(ENTRIES[:5])
    restored = StateDigest.from_data(first.to_data(), first.index, b"ignored")
    for index, entry, result in ENTRIES[5:]:
        restored.advance(index, entry, result, summary_bytes(index))
    assert (restored.index, restored.value) == (full.index, full.value)


def test_indexes_must_grow_and_snapshot_data_is_checked() -> None:
    digest = _chain(ENTRIES[:2])
    with pytest.raises(InvariantError):
        digest.advance(2, b"x", b"y")
    with pytest.raises(InvariantError):
        StateDigest.from_data([1, 3, b"short"], 3, b"")
    with pytest.raises(InvariantError):
        StateDigest.from_data(digest.to_data(), 7, b"")  # the state is at another index
    # a snapshot from before digests: a new chain, the same for every replica restoring it
    old_a = StateDigest.from_data(None, 7, b"snapshot-bytes")
    old_b = StateDigest.from_data(None, 7, b"snapshot-bytes")
    assert old_a.index == 7 and old_a.value == old_b.value != GENESIS


def test_the_chain_is_pinned() -> None:
    """Snapshots carry the value, and replicas of different versions compare
    theirs: a change of how it is computed must be a new ``DIGEST_VERSION``,
    never a silent change of the bytes."""
    digest = StateDigest(every=4)
    for i in (1, 2, 3, 5, 6, 9, 10, 12, 13):
        digest.advance(i, b"entry-%d" % i, b"result-%d" % i, summary_bytes(i, -i, 2**62, 0, 7, 1))
    assert summary_bytes(1, -1).hex() == "0000000000000001ffffffffffffffff"
    assert digest.points() == [
        (5, "5fccad19a17d6da107725c865992abe19aeb1139ef643b72d5c95d2273ba2799"),
        (9, "a1c24e1f61e6e36ce85f1453274c1fd79719329fa64be442b5dc0a1e2c89c588"),
        (12, "e52fb4886301f4dc5a03b9750f6b05aff0928b5d77efcbf8f357c34f436de8f6"),
        (13, "169d898ccfd1abf74852101bdafbb8b5fd4983234a5161d4d264e2c20f1f39c4"),
    ]
