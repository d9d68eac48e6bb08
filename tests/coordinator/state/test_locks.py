"""The holder index of ``Locks``: ``held_by`` answers what a scan would, in grant order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.state.locks import Lock, Locks

NAMES = st.sampled_from([f"l{i}" for i in range(6)])
HOLDERS = st.sampled_from(["a", "b", "c"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), NAMES, HOLDERS), max_size=40))
def test_held_by_matches_a_scan_after_any_grants_and_removals(steps):
    locks = Locks()
    for n, (grant, name, holder) in enumerate(steps):
        if grant and name not in locks.locks:
            locks.grant(Lock(name, holder, n, 1000, n))
        elif not grant and name in locks.locks:
            locks.remove(name)
    restored = Locks.from_data(locks.to_data())
    for holder in ("a", "b", "c", "nobody"):
        scan = [lk for lk in locks.locks.values() if lk.holder == holder]
        assert locks.held_by(holder) == scan
        assert [lk.name for lk in restored.held_by(holder)] == [lk.name for lk in scan]
