"""The linearizability checker (chaos/checker.py, chaos/models.py) and its CLI
(chaos/check.py): a corpus of hand-built histories with known verdicts,
differential tests against a brute-force search, histories generated from a
sequential simulation (linearizable by construction, then mutated), and the
size the checker must handle."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos import checker
from chaos.check import run
from chaos.checker import check
from chaos.history import Event, Operation, pair, read_jsonl
from chaos.models import CasRegister, canonical, model_named

ROOT = Path(__file__).resolve().parents[2]
TESTDATA = Path(__file__).resolve().parent / "testdata"
CORPUS = sorted(TESTDATA.glob("*.jsonl"))
MODEL = CasRegister()


# -- helpers ------------------------------------------------------------------------------------------


def op(index: int, f: str, value: Any, status: str, invoke: int, complete: int | None, *,
       matched: bool | None = None, key: str = "k", process: int | None = None) -> Operation:
    return Operation(index=index, process=index if process is None else process, f=f, key=key, value=value,
                     status=status, invoke_time=invoke, complete_time=complete, matched=matched)  # type: ignore[arg-type]


def _same(a: Any, b: Any) -> bool:
    return canonical(a) == canonical(b)


def brute_force(ops: Sequence[Operation], *, reuse: bool = False) -> bool:
    """Is there a linearization? Tries every order of every subset, with no
    cleverness beyond memoising (used operations, value): the reference the
    checker's pruning is compared with. ``reuse``: unknown operations may take
    effect any number of times (the relaxed semantics)."""
    live = [o for o in ops if o.status == "ok" or (o.status == "info" and o.f != "read")]
    required = [i for i, o in enumerate(live) if o.status == "ok"]
    seen: set[tuple[frozenset[int], str]] = set()

    def search(used: frozenset[int], value: Any) -> bool:
        if all(i in used for i in required):
            return True
        if (used, canonical(value)) in seen:
            return False
        seen.add((used, canonical(value)))
        for c, o in enumerate(live):
            blocked = any(live[a].complete_time < o.invoke_time and a not in used for a in required)  # type: ignore[operator]
            if c in used or blocked:
                continue
            after = value
            if o.f == "read":
                if not _same(o.value, value):
                    continue
            elif o.f == "write":
                after = o.value
            elif o.matched is False:
                if _same(o.value[0], value):
                    continue
            elif _same(o.value[0], value):
                after = o.value[1]
            else:
                continue
            if search(used if reuse and o.status == "info" else used | {c}, after):
                return True
        return False

    return search(frozenset(), None)


@st.composite
def small_histories(draw: st.DrawFn) -> list[Operation]:
    """Up to seven operations on one key, anywhere in time, with small values
    (so that cas often matches), some failed and some of unknown outcome."""
    values = st.sampled_from([None, 0, 1, 2])
    ops = []
    for i in range(draw(st.integers(1, 7))):
        f = draw(st.sampled_from(["read", "write", "cas"]))
        status = draw(st.sampled_from(["ok", "ok", "ok", "info", "info", "fail"]))
        invoke = draw(st.integers(0, 20))
        complete = None if status == "info" and draw(st.booleans()) else invoke + draw(st.integers(0, 10))
        matched = draw(st.booleans()) if f == "cas" and status == "ok" else None
        value = ([draw(values), draw(values)] if f == "cas" else draw(values) if f == "write" or status == "ok"
                 else None)
        ops.append(op(i, f, value, status, invoke, complete, matched=matched))
    return ops


def simulate(rng: random.Random, *, processes: int, keys: int, duration_ns: int | None = None,
             ops_max: int | None = None, values: Sequence[int] = range(5), unique: bool = False,
             info_rate: float = 0.0, fail_rate: float = 0.0, latency_ns: tuple[int, int] = (1_000_000, 20_000_000),
             think_ns: tuple[int, int] = (0, 5_000_000), late_ns: int = 2_000_000_000,
             frozen: tuple[int, int, frozenset[int]] | None = None) -> list[Event]:
    """A history of clients on a sequential register, linearizable by construction.

    Each operation takes effect at one instant between its invoke and its
    completion. With ``info_rate`` a write or cas ends ``info``: half of those
    never take effect, half take effect at any time after the invoke (even
    after the info). With ``fail_rate`` an operation fails and takes no effect.
    ``frozen`` = (start, end, processes) breaks the history on purpose: in that
    window those processes read a snapshot taken at ``start`` (stale reads from
    a partitioned node) and their writes time out with no effect.
    Event times are distinct.
    """
    register: dict[str, Any] = {}
    snapshot: dict[str, Any] | None = None
    events: list[Event] = []
    queue: list[tuple[int, int, str, int, dict[str, Any]]] = []
    taken: set[int] = set()
    counter = itertools.count()
    invoked = 0

    def push(at: int, kind: str, process: int, state: dict[str, Any]) -> None:
        while at in taken:
            at += 1
        taken.add(at)
        heapq.heappush(queue, (at, next(counter), kind, process, state))

    for process in range(processes):
        push(rng.randrange(*think_ns) if think_ns[1] else 0, "invoke", process, {})
    while queue:
        now, _, kind, process, state = heapq.heappop(queue)
        if kind == "invoke":
            if (duration_ns is not None and now >= duration_ns) or (ops_max is not None and invoked >= ops_max):
                continue
            invoked += 1
            key = f"k{rng.randrange(keys)}"
            roll = rng.random()
            fresh = next(counter)
            if roll < 0.5:
                f, value = "read", None
            elif roll < 0.75:
                f, value = "write", fresh if unique else rng.choice(values)
            elif unique:  # expect the current value half the time, so that some cas apply
                f, value = "cas", [register.get(key) if rng.random() < 0.5 else fresh - 1, fresh]
            else:
                f, value = "cas", [rng.choice(values), rng.choice(values)]
            outcome = rng.random()
            status = "fail" if outcome < fail_rate else "info" if outcome < fail_rate + info_rate and f != "read" \
                else "ok"
            state = {"f": f, "key": key, "value": value, "status": status}
            events.append(Event(process, "invoke", f, key, value, now))
            there, back = rng.randrange(*latency_ns), rng.randrange(*latency_ns)
            if frozen is not None and frozen[0] <= now < frozen[1] and process in frozen[2]:
                if snapshot is None:
                    snapshot = dict(register)
                state["status"], state["result"] = ("ok", snapshot.get(key)) if f == "read" else ("info", None)
                push(now + there + back, "complete", process, state)
                continue
            if status == "ok" or (status == "info" and rng.random() < 0.5):
                push(now + (there if status == "ok" else rng.randrange(1, late_ns)), "apply", process, state)
            push(now + there + back, "complete", process, state)
        elif kind == "apply":
            current = register.get(state["key"])
            if state["f"] == "read":
                state["result"] = current
            elif state["f"] == "write":
                register[state["key"]] = state["value"]
            else:
                state["matched"] = _same(current, state["value"][0])
                if state["matched"]:
                    register[state["key"]] = state["value"][1]
        else:
            f, status = state["f"], state["status"]
            value = state.get("result") if f == "read" and status == "ok" else state["value"]
            matched = state.get("matched") if f == "cas" and status == "ok" else None
            events.append(Event(process, status, f, state["key"], value, now, matched=matched))
            push(now + (rng.randrange(*think_ns) if think_ns[1] else 1), "invoke", process, {})
    return events


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


# -- the model ------------------------------------------------------------------------------------------


def test_canonical_is_json_equality() -> None:
    assert canonical(True) != canonical(1)
    assert canonical(False) != canonical(0)
    assert canonical(None) == "null"
    assert canonical(1) == canonical(1.0)
    assert canonical({"a": [1, 2.0], "b": "é"}) == canonical({"b": "\u00e9", "a": [1.0, 2]})
    assert canonical("1") != canonical(1)
    assert canonical([1, [2]]) != canonical([1, 2])


@pytest.mark.parametrize(("state", "operation", "expected"), [
    (None, op(0, "read", None, "ok", 0, 1), (True, None)),
    (None, op(0, "read", 0, "ok", 0, 1), (False, None)),
    (1, op(0, "read", 1, "ok", 0, 1), (True, 1)),
    (1, op(0, "read", True, "ok", 0, 1), (False, 1)),
    (1, op(0, "write", 2, "ok", 0, 1), (True, 2)),
    (0, op(0, "cas", [0, 1], "ok", 0, 1, matched=True), (True, 1)),
    (5, op(0, "cas", [0, 1], "ok", 0, 1, matched=True), (False, 5)),
    (5, op(0, "cas", [0, 1], "ok", 0, 1, matched=False), (True, 5)),
    (0, op(0, "cas", [0, 1], "ok", 0, 1, matched=False), (False, 0)),
    (0, op(0, "cas", [0, 1], "info", 0, None), (True, 1)),
    (2, op(0, "cas", [0, 1], "info", 0, None), (False, 2)),
])
def test_cas_register_step(state: Any, operation: Operation, expected: tuple[bool, Any]) -> None:
    legal, after = MODEL.step(canonical(state), operation)
    assert (legal, after) == (expected[0], canonical(expected[1]))


def test_partition_is_per_key_and_drops_reads_of_unknown_outcome() -> None:
    ops = [op(0, "write", 1, "ok", 0, 1, key="b"), op(1, "read", None, "info", 2, None, key="a"),
           op(2, "read", 1, "ok", 3, 4, key="b"), op(3, "cas", [1, 2], "info", 5, 6, key="a")]
    assert MODEL.partition(ops) == [[ops[3]], [ops[0], ops[2]]]


def test_describe() -> None:
    assert MODEL.describe(op(0, "read", None, "ok", 0, 1, process=3)) == "p3 read 'k' -> null"
    assert MODEL.describe(op(0, "write", "v", "info", 0, 1)) == "p0 write 'k' \"v\" (outcome unknown)"
    assert MODEL.describe(op(0, "cas", [1, 2], "ok", 0, 1, matched=False)) == \
        "p0 cas 'k' 1 -> 2 (not applied: value was not old)"
    assert model_named("cas-register").name == "cas-register"
    with pytest.raises(KeyError):
        model_named("set")


# -- the corpus ------------------------------------------------------------------------------------------


def _note(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def test_the_corpus_covers_good_bad_and_malformed_histories() -> None:
    kinds = {path.name.split("-")[0] for path in CORPUS}
    assert kinds == {"good", "bad", "error"}
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kind = path.name.split("-")[0]
    note = _note(path)["corpus"] and _note(path)
    code = run(["--model", "cas-register", str(path)])
    verdict = last_json(capsys.readouterr().out)
    expected = {"good": (0, "linearizable", True), "bad": (1, "not linearizable", False),
                "error": (2, "error", None)}[kind]
    assert (code, verdict["verdict"], verdict["valid"]) == expected
    if kind == "error":
        assert note["error"] in verdict["reason"]
        return
    anomaly = verdict["anomaly"]
    assert (anomaly is None) == (kind == "good")
    if "culprit" in note:
        culprit = anomaly["op"]
        assert {k: culprit["complete_time"] if k == "time" else culprit[k] for k in note["culprit"]} == note["culprit"]
        assert culprit in anomaly["window"]


def test_an_anomaly_shows_the_state_and_the_order_that_led_to_it() -> None:
    operations, _ = pair(read_jsonl(TESTDATA / "bad-stale-read.jsonl").events)
    result = check(MODEL, operations, 5)
    anomaly = result.anomaly
    assert result.verdict == "illegal" and anomaly is not None
    assert anomaly.states == ("2",)
    assert [(o.process, o.f, o.value) for o in anomaly.linearized] == [(0, "write", 1), (1, "write", 2)]
    assert [o.index for o in anomaly.window] == [0, 1, 2]
    assert anomaly.explanation() == ("p2 read 'x' -> 1 cannot be linearized: with every operation that returned "
                                     "before it applied, the state can only be 2")


# -- differential: the checker against brute force ------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(small_histories())
def test_agrees_with_brute_force(ops: list[Operation]) -> None:
    result = check(MODEL, ops, 10)
    assert result.verdict == ("ok" if brute_force(ops) else "illegal")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(small_histories())
def test_agrees_with_brute_force_when_the_relaxed_search_runs(monkeypatch: pytest.MonkeyPatch,
                                                              ops: list[Operation]) -> None:
    """With no budget for the exact search, every history with an unknown
    operation goes through the relaxed search and back: same verdicts."""
    monkeypatch.setattr(checker, "EXACT_BUDGET_NODES", 1)
    monkeypatch.setattr(checker, "EXACT_BUDGET_NODES_PER_OP", 0)
    result = check(MODEL, ops, 10)
    assert result.verdict == ("ok" if brute_force(ops) else "illegal")


@settings(max_examples=200, deadline=None)
@given(small_histories())
def test_relaxed_search_agrees_with_brute_force_with_reuse(ops: list[Operation]) -> None:
    live = [o for group in MODEL.partition([o for o in ops if o.status != "fail"]) for o in group]
    outcome = checker._Search(MODEL, live, reuse=True).run(time.monotonic() + 10, time.monotonic)
    assert outcome.verdict == ("ok" if brute_force(ops, reuse=True) else "illegal")


# -- generated from a sequential register ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 5), st.integers(1, 2))
def test_simulated_histories_are_linearizable_and_a_changed_read_is_caught(
        rng: random.Random, processes: int, keys: int) -> None:
    events = simulate(rng, processes=processes, keys=keys, ops_max=40, values=range(3), info_rate=0.15,
                      fail_rate=0.05, latency_ns=(0, 50), think_ns=(0, 20), late_ns=400)
    operations, problems = pair(events)
    assert problems == []
    assert check(MODEL, operations, 10).verdict == "ok"

    reads = [o for o in operations if o.f == "read" and o.status == "ok"]
    if not reads:
        return
    changed = reads[rng.randrange(len(reads))]
    mutated = [dataclasses.replace(o, value=999) if o is changed else o for o in operations]
    result = check(MODEL, mutated, 10)
    assert result.verdict == "illegal"
    assert result.anomaly is not None and result.anomaly.op.index == changed.index


def _timed(label: str, fn: Callable[[], checker.Result]) -> checker.Result:
    started = time.perf_counter()
    result = fn()
    print(f"{label}: {result.verdict} in {time.perf_counter() - started:.2f}s "
          f"({', '.join(f'{k.key}: {k.operations} ops, {k.visited} states' for k in result.keys)})")
    return result


def test_a_60s_history_of_10_clients_on_5_keys() -> None:
    """The size a chaos run produces: about 25 000 operations, 5% of unknown
    outcome. The time is printed, not asserted."""
    events = simulate(random.Random(1), processes=10, keys=5, duration_ns=60_000_000_000, info_rate=0.10,
                      fail_rate=0.02)
    operations, problems = pair(events)
    assert problems == []
    unknown = sum(o.status == "info" for o in operations)
    print(f"\n{len(operations)} operations, {unknown} of unknown outcome ({unknown / len(operations):.1%})")
    assert 0.04 < unknown / len(operations) < 0.06
    assert _timed("60 s history", lambda: check(MODEL, operations, 60)).verdict == "ok"

    reads = [o for o in operations if o.f == "read" and o.status == "ok" and o.key == "k2"]
    changed = reads[len(reads) // 2]
    mutated = [dataclasses.replace(o, value=999) if o is changed else o for o in operations]
    result = _timed("with one read changed", lambda: check(MODEL, mutated, 60))
    assert result.verdict == "illegal"
    assert result.anomaly is not None and result.anomaly.op.index == changed.index


def test_stale_reads_from_a_partitioned_node_are_caught() -> None:
    """The teeth: for 5 s, 4 of 10 clients read a frozen snapshot and their
    writes time out. Written values are unique, as a workload should make them."""
    events = simulate(random.Random(5), processes=10, keys=3, duration_ns=20_000_000_000, unique=True,
                      info_rate=0.10, fail_rate=0.02, frozen=(8_000_000_000, 13_000_000_000, frozenset({0, 3, 6, 9})))
    operations, problems = pair(events)
    assert problems == []
    result = _timed("\nstale reads", lambda: check(MODEL, operations, 60))
    assert result.verdict == "illegal"
    anomaly = result.anomaly
    assert anomaly is not None and anomaly.op.f == "read" and anomaly.op.process in {0, 3, 6, 9}
    assert 8_000_000_000 <= anomaly.op.invoke_time < 13_000_000_000


# -- verdicts other than yes and no ---------------------------------------------------------------------------


def test_timeout_gives_unknown() -> None:
    ops = [op(0, "write", 1, "ok", 0, 10), op(1, "read", 1, "ok", 20, 30)]
    ticks = itertools.count()
    result = check(MODEL, ops, 0.5, clock=lambda: float(next(ticks)))
    assert result.verdict == "unknown"
    assert result.reason == "timeout"
    assert [k.reason for k in result.keys] == ["timeout"]


def test_too_many_search_states_gives_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checker, "CACHE_BYTES_MAX", 1)
    operations, _ = pair(simulate(random.Random(3), processes=3, keys=1, ops_max=3000))
    result = check(MODEL, operations, 60)
    assert (result.verdict, result.reason) == ("unknown", "memory limit")


def test_once_a_key_is_illegal_the_others_are_skipped() -> None:
    ops = [op(0, "read", 7, "ok", 0, 1, key="a"), op(1, "read", None, "ok", 0, 1, key="b")]
    result = check(MODEL, ops, 5)
    assert result.verdict == "illegal"
    assert [(k.key, k.verdict, k.reason) for k in result.keys] == [("a", "illegal", None), ("b", "unknown", "skipped")]


# -- the CLI as a user runs it -------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos.check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_linearizable() -> None:
    proc = _cli("--model", "cas-register", str(TESTDATA / "good-concurrent-writes-then-consistent-reads.jsonl"))
    assert proc.returncode == 0, proc.stderr
    verdict = last_json(proc.stdout)
    assert verdict == {**verdict, "valid": True, "verdict": "linearizable", "operations": {"ok": 4, "fail": 0,
                       "info": 0}, "keys": 1, "anomaly": None, "reason": None}
    assert "verdict: linearizable" in proc.stdout


def test_cli_not_linearizable() -> None:
    proc = _cli("--model", "cas-register", "--timeout", "30", str(TESTDATA / "bad-lost-write.jsonl"))
    assert proc.returncode == 1, proc.stderr
    verdict = last_json(proc.stdout)
    assert (verdict["valid"], verdict["verdict"]) == (False, "not linearizable")
    assert verdict["anomaly"]["op"]["text"] == "p3 read 'x' -> 1"
    assert "<-- cannot be linearized" in proc.stdout


@pytest.mark.parametrize(("args", "reason"), [
    (("--model", "cas-register", "missing.jsonl"), "cannot read missing.jsonl"),
    (("--model", "queue", str(TESTDATA / "good-sequential.jsonl")), "unknown model 'queue'"),
    (("--model", "cas-register", str(TESTDATA / "error-completion-without-invoke.jsonl")), "malformed history"),
    (("--model", "cas-register", str(TESTDATA / "error-not-json.jsonl")), "line 3: not JSON"),
    (("--timeout", "soon", str(TESTDATA / "good-sequential.jsonl")), "bad arguments"),
    ((), "bad arguments"),
])
def test_cli_errors(args: tuple[str, ...], reason: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    verdict = last_json(proc.stdout)
    assert (verdict["valid"], verdict["verdict"]) == (None, "error")
    assert reason in verdict["reason"]


def test_cli_timeout_is_unknown() -> None:
    proc = _cli("--model", "cas-register", "--timeout", "1e-9", str(TESTDATA / "good-sequential.jsonl"))
    assert proc.returncode == 2
    verdict = last_json(proc.stdout)
    assert (verdict["valid"], verdict["verdict"], verdict["reason"]) == (None, "unknown", "timeout")
