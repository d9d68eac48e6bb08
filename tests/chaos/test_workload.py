"""The lock workload's own check: fencing tokens only grow and no stale
fenced write is accepted after a newer one."""

from __future__ import annotations

from chaos.workload import check_locks


def _op(process: int, f: str, kind: str, value, start: int, end: int) -> list[dict]:
    return [{"process": process, "type": "invoke", "f": f, "key": "l", "value": None, "time": start},
            {"process": process, "type": kind, "f": f, "key": "l", "value": value, "time": end,
             "holder": f"client-{process}"}]


def test_a_clean_lock_history_passes() -> None:
    events = (_op(1, "acquire", "ok", 5, 0, 1) + _op(1, "fenced-write", "ok", 5, 2, 3)
              + _op(2, "acquire", "ok", 9, 4, 5) + _op(2, "fenced-write", "ok", 9, 6, 7)
              + _op(1, "fenced-write", "fail", 5, 8, 9))  # the old holder's late write was refused
    verdict = check_locks(events)
    assert verdict["valid"] and verdict["grants"] == 2 and verdict["fenced_writes"] == 2


def test_a_stale_fenced_write_accepted_after_a_newer_one_is_caught() -> None:
    events = (_op(1, "acquire", "ok", 5, 0, 1) + _op(2, "acquire", "ok", 9, 2, 3)
              + _op(2, "fenced-write", "ok", 9, 4, 5) + _op(1, "fenced-write", "ok", 5, 6, 7))
    verdict = check_locks(events)
    assert not verdict["valid"]
    assert verdict["problems"][0] == {"kind": "stale fenced write accepted", "token": 5, "after_token": 9}


def test_overlapping_writes_are_not_ordered() -> None:
    events = (_op(2, "fenced-write", "ok", 9, 0, 10) + _op(1, "fenced-write", "ok", 5, 2, 3))
    assert check_locks(events)["valid"]


def test_a_token_granted_to_two_holders_is_caught() -> None:
    events = _op(1, "acquire", "ok", 5, 0, 1) + _op(2, "acquire", "ok", 5, 2, 3)
    assert check_locks(events)["problems"][0] == {"kind": "token granted to two holders", "tokens": [5]}


def test_a_holder_refreshing_its_own_lock_gets_its_token_again() -> None:
    events = _op(1, "acquire", "ok", 5, 0, 1) + _op(1, "acquire", "ok", 5, 2, 3)
    assert check_locks(events)["valid"]
