"""What a replica spends applying one committed ``kv.put``: the time per
entry through ``Applier.apply`` (decode, state machine, result bytes,
digest, waiters, listeners), in process (no network, no disk).

    .venv/bin/python -m bench.apply [--commands 20000] [--warmup 12000] [--rounds 5]
    .venv/bin/python -m bench.apply --trees /tmp/base . [--rounds 5] [--instructions]

Every replica applies every write, so this is paid three times per write in
a three-node cluster. The entries are the blobs a node gets: kv.put of a
64-byte string value under ``bench/{client}/{i % 100}`` (as bench/load.py
writes them) encoded by ``codec.encode_command`` from a ``Command`` built
as ``services.proposals.Proposer`` builds it, cycling through an anonymous
caller without a request id, one with a request id and digest, and a
command without principal (a node's own entries of older versions).

Modes, measured interleaved in every round on a fresh applier that first
applies ``--warmup`` entries untimed (the store full of keys, the change
history and the dedupe table at their steady size):

- ``follower``: ``Applier.apply`` alone (no proposal waits here);
- ``leader``: ``expect`` before and ``forget`` after each entry, as the
  proposer does, so the waiter is set on the loop;
- ``bridge``: the entries cross ``cluster.raft_pysyncobj._Bridge`` from a
  thread (pysyncobj's tick thread) to the loop, which applies them; CPU of
  the whole process per entry;
- ``decode``: ``codec.decode_command`` of each entry alone;
- ``machine``: ``StateMachine.apply`` of each entry decoded beforehand;
- ``result``: ``codec.encode_result`` of a kv.put's result, per entry;
- ``digest``: ``StateDigest.advance`` with ``summary_bytes`` of six counters
  alone, for each entry;
- ``handoff``: the same crossing with an FSM that does nothing (the
  bridge's own cost);
- ``snapshot``: ``Applier.snapshot()`` after the run, µs per live key.

``cpu`` is the CPU time of the process over the timed part (the machine is
shared and noisy: CPU time is what to compare), ``wall`` the elapsed time.
With ``--trees A B ...`` each round runs every mode once per tree, each in a
fresh interpreter with that tree's ``coordinator`` first on ``sys.path``,
alternating trees, and the medians are printed side by side: a before/after
of one change measured in one run (export the base with ``git archive``).
A tree may be of any commit, from before this file moved into ``bench/``
too: the fresh interpreter runs this file (``_RUN_THIS``), not the tree's
copy, and this file imports nothing from ``bench``, so the measuring code is
the same for every tree and only ``coordinator`` and ``cluster`` are the
tree's. The loops are bounded by ``--commands`` and ``--rounds``.

``--instructions`` (with ``--trees``) counts instead of timing: valgrind's
callgrind runs the follower mode of each tree twice, on ``--warmup``
entries and then ``--commands`` more (the same blobs made in both runs),
and the difference divided by ``--commands`` is the instructions one entry
costs: deterministic (PYTHONHASHSEED=0), so small changes show through the
noise of a shared machine. About 50 times slower: use a few thousand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
# How a tree's fresh interpreter runs this file: by its path, as __main__,
# without putting bench/ on sys.path (its cluster.py would hide the tree's
# cluster package) and without importing the tree's bench package (a tree
# may have none, or another bench/apply.py). sys.path[0] is the working
# directory, the tree, and PYTHONPATH names the tree too.
_RUN_THIS = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"
MODES = ("follower", "leader", "bridge", "handoff", "decode", "machine", "result", "digest", "snapshot")
CLIENTS = 64
KEYS_PER_CLIENT = 100
VALUE = "v" * 64
T0 = 1_800_000_000_000


def blobs(start: int, count: int) -> list[bytes]:
    """``count`` encoded kv.put entries numbered from ``start``."""
    from coordinator.codec import encode_command
    from coordinator.services.proposals import request_key
    from coordinator.types import Command

    out = []
    for n in range(start, start + count):
        client, i = n % CLIENTS, n // CLIENTS
        key = f"bench/{client}/{i % KEYS_PER_CLIENT}"
        args = {"key": key, "value": VALUE}
        kind = n % 3
        if kind == 0:
            request = request_key("anonymous", None)
        elif kind == 1:
            request = request_key("anonymous", f"r-{n}", "PUT", f"/v1/kv/{key}", json.dumps({"value": VALUE}))
        else:
            request = None
        command = Command(op="kv.put", args=args, now_ms=T0 + n, proposal_id=f"0123456789ab-{n}",
                          request_id=None if request is None else request.id,
                          request_digest=None if request is None else request.digest,
                          principal=None if request is None else request.principal)
        out.append(encode_command(command))
    return out


def fresh_applier(warmup: list[bytes]) -> Any:
    from coordinator.services.applier import Applier

    applier = Applier()
    applier.on_apply(lambda command, result: None)  # the node registers listeners (leases, bus)
    for index, blob in enumerate(warmup, 1):
        applier.apply(index, blob)
    return applier


def run_follower(applier: Any, entries: list[tuple[int, bytes]]) -> None:
    apply = applier.apply
    for index, blob in entries:
        apply(index, blob)


def run_digest(entries: list[tuple[int, bytes]]) -> None:
    from coordinator.state.digest import StateDigest, summary_bytes

    digest = StateDigest()
    result = b"Q\x94\x01\xcd\x30\x39\x81\xa8revision\xcd\x30\x39\xc0"
    for index, blob in entries:
        digest.advance(index, blob, result, summary_bytes(index, index, 6400, 0, 0, 0))


async def run_leader(applier: Any, entries: list[tuple[int, bytes]], ids: list[str]) -> None:
    apply, expect, forget = applier.apply, applier.expect, applier.forget
    for (index, blob), proposal_id in zip(entries, ids, strict=True):
        future = expect(proposal_id)
        apply(index, blob)
        forget(proposal_id)
        if not future.done():
            raise RuntimeError("the proposal's waiter was not settled")


class _NoFsm:
    def apply(self, index: int, blob: bytes) -> bytes:
        return b""


async def run_bridge(applier: Any, entries: list[tuple[int, bytes]]) -> None:
    from cluster.raft_pysyncobj import _Bridge

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    bridge = _Bridge(loop, applier, on_role=lambda role: None)
    last = entries[-1][0]

    def tick_thread() -> None:
        for index, blob in entries:
            bridge.post(("apply", index, blob))
        bridge.post(("done", lambda _: None if done.done() else done.set_result(None), None))

    thread = threading.Thread(target=tick_thread)
    thread.start()
    await done
    thread.join()
    if bridge.applied_index != last or bridge.halted is not None:
        raise RuntimeError(f"bridge stopped at {bridge.applied_index} ({bridge.halted})")


def one_round(commands: int, warmup_count: int) -> dict[str, dict[str, float]]:
    """Every mode once, on fresh appliers: {mode: {"cpu": µs, "wall": µs}}."""
    warmup = blobs(0, warmup_count)
    timed = list(enumerate(blobs(warmup_count, commands), warmup_count + 1))
    ids = [f"0123456789ab-{n}" for n in range(warmup_count, warmup_count + commands)]
    out: dict[str, dict[str, float]] = {}

    def measure(mode: str, fn: Any, per: int) -> None:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn()
        cpu1, wall1 = time.process_time(), time.perf_counter()
        out[mode] = {"cpu": (cpu1 - cpu0) / per * 1e6, "wall": (wall1 - wall0) / per * 1e6}

    import cluster.raft_pysyncobj  # noqa: F401 - imported before anything is timed
    from coordinator.codec import decode_command, encode_result
    from coordinator.types import Result

    measure("decode", lambda: [decode_command(blob) for _, blob in timed], commands)
    measure("digest", lambda: run_digest(timed), commands)
    measure("result", lambda: [encode_result(Result(index, {"revision": index})) for index, _ in timed], commands)
    decoded = [(index, decode_command(blob)) for index, blob in timed]
    machine = fresh_applier(warmup).machine
    measure("machine", lambda: [machine.apply(index, command) for index, command in decoded], commands)
    applier = fresh_applier(warmup)
    measure("follower", lambda: run_follower(applier, timed), commands)
    keys = len(applier.machine.kv)
    measure("snapshot", applier.snapshot, keys)
    digest = applier.digest.value.hex()

    applier = fresh_applier(warmup)
    loop = asyncio.new_event_loop()
    try:
        measure("leader", lambda: loop.run_until_complete(run_leader(applier, timed, ids)), commands)
        leader_digest = applier.digest.value.hex()
        applier = fresh_applier(warmup)
        measure("bridge", lambda: loop.run_until_complete(run_bridge(applier, timed)), commands)
        bridge_digest = applier.digest.value.hex()
        measure("handoff", lambda: loop.run_until_complete(run_bridge(_NoFsm(), timed)), commands)
    finally:
        loop.close()
    if not digest == leader_digest == bridge_digest:
        raise RuntimeError("the modes reached different digests")
    out["final"] = {"digest": digest}  # type: ignore[dict-item]
    return out


def apply_only(warmup_count: int, commands: int, extra: bool) -> None:
    """The follower mode untimed (for ``--instructions``): the same blobs
    made either way, the last ``commands`` applied only when ``extra``."""
    entries = blobs(0, warmup_count + commands)
    applier = fresh_applier(entries[:warmup_count])
    if extra:
        run_follower(applier, list(enumerate(entries[warmup_count:], warmup_count + 1)))


def count_instructions(tree: Path, commands: int, warmup_count: int) -> float:
    """Instructions per applied entry in ``tree`` (valgrind callgrind)."""
    counts = []
    for extra in (False, True):
        env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "PYTHONHASHSEED": "0"}
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                   _RUN_THIS, str(HERE), "--apply-only", "--commands", str(commands), "--warmup", str(warmup_count)]
        done = subprocess.run(command + (["--extra"] if extra else []), env=env, check=True, capture_output=True,
                              text=True, timeout=3600, cwd=tree)
        refs = [line for line in done.stderr.splitlines() if "Collected :" in line]
        if not refs:
            raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-500:]}")
        counts.append(int(refs[-1].split(":")[-1].strip()))
    return (counts[1] - counts[0]) / commands


def report(label: str, rounds: list[dict[str, Any]]) -> None:
    for mode in MODES:
        cpu = [r[mode]["cpu"] for r in rounds]
        wall = [r[mode]["wall"] for r in rounds]
        unit = "µs/key" if mode == "snapshot" else "µs/entry"
        print(f"{label:24s} {mode:9s} cpu median {statistics.median(cpu):7.2f} {unit} "
              f"(min {min(cpu):.2f}, max {max(cpu):.2f})  wall median {statistics.median(wall):7.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apply", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=12_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trees", nargs="+", type=Path, help="source trees to compare, interleaved")
    parser.add_argument("--instructions", action="store_true", help="count instructions (valgrind) per entry")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--apply-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.commands <= 1_000_000 or not 0 <= args.warmup <= 1_000_000 or not 1 <= args.rounds <= 50:
        parser.error("--commands 1..1000000, --warmup 0..1000000, --rounds 1..50")
    if args.one_round:
        print(json.dumps(one_round(args.commands, args.warmup)))
        return 0
    if args.apply_only:
        apply_only(args.warmup, args.commands, args.extra)
        return 0
    if args.instructions:
        if not args.trees:
            parser.error("--instructions compares --trees")
        for tree in args.trees:
            per_entry = count_instructions(tree, args.commands, args.warmup)
            print(f"{tree!s:24s} follower {per_entry:10.0f} instructions/entry", flush=True)
        return 0
    if not args.trees:
        rounds = []
        for _ in range(args.rounds):
            rounds.append(one_round(args.commands, args.warmup))
            print(" ".join(f"{m}={rounds[-1][m]['cpu']:.2f}" for m in MODES), flush=True)
        report(str(ROOT), rounds)
        return 0
    results: dict[Path, list[dict[str, Any]]] = {tree: [] for tree in args.trees}
    for n in range(args.rounds):
        order = args.trees if n % 2 == 0 else list(reversed(args.trees))
        for tree in order:
            env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
            done = subprocess.run([sys.executable, "-c", _RUN_THIS, str(HERE), "--one-round", "--commands",
                                   str(args.commands), "--warmup", str(args.warmup)], env=env, check=True,
                                  capture_output=True, text=True, timeout=600, cwd=tree)
            results[tree].append(json.loads(done.stdout.splitlines()[-1]))
            r = results[tree][-1]
            print(f"round {n + 1} {tree!s:24s} " + " ".join(f"{m}={r[m]['cpu']:.2f}" for m in MODES),
                  flush=True)
    for tree, rounds in results.items():
        report(str(tree), rounds)
    digests = {tree: {r["final"]["digest"] for r in rounds} for tree, rounds in results.items()}
    print("digests equal across trees" if len({d for ds in digests.values() for d in ds}) == 1
          else f"digests differ across trees: {digests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
