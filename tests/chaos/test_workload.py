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


async def test_a_refused_request_is_known_unsent_only_when_no_attempt_went_out() -> None:
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from chaos.workload import make_session
    from devcluster.cluster import free_base_port

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_put("/x", ok)
    async with TestServer(app, host="127.0.0.1") as server, make_session() as session:
        sent: dict[str, bool] = {}
        async with session.put(server.make_url("/x"), json={}, trace_request_ctx=sent) as response:
            assert response.status == 200
        assert sent == {"sent": True}
        refused: dict[str, bool] = {}
        closed_port = free_base_port() + 1
        try:
            async with session.put(f"http://127.0.0.1:{closed_port}/x", json={}, trace_request_ctx=refused):
                pass
        except aiohttp.ClientConnectorError:
            pass
        assert refused == {}
