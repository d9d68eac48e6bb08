"""Break a local cluster on purpose and get a verdict.

    python -m chaos.run --duration 60 --nemesis partition-halves [--unsafe-stale-reads]
    python -m chaos.run --workload bus --duration 30 --nemesis isolate-leader,kill
    python -m chaos.run --duration 30 --nemesis clock-skew
    python -m chaos.run --duration 20 --nemesis lost-fsync [--unsafe-skip-fsync]
    python -m chaos.run --engine pbft --byzantine equivocate --nemesis none --duration 20

Starts a three-node cluster whose Raft links run through an in-process
fault proxy, runs the register workload over HTTP while the nemesis acts,
heals, waits for recovery, checks the history with ``python -m chaos.check``
and writes ``history.jsonl``, ``report.txt`` and ``latency.png`` to the run
directory. Exit status: 0 linearizable, 1 an anomaly, 2 the run failed.
Every process it started is stopped by PID at the end, also on Ctrl-C.

``--engine pbft`` runs four PBFT nodes (no fault proxy: the partition
nemeses are not available, kill and pause are). ``--byzantine KIND`` makes
one replica misbehave on purpose (``silent``: receives, never sends;
``equivocate``: as the primary of view 0, sends every backup a different
pre-prepare; ``forge``: sends forged, unsigned, re-signed corrupted and
malformed messages and false replies instead of its real ones). The clients
then talk to the correct nodes only: PBFT keeps the replicated state safe
from a faulty replica, it cannot make that node's own HTTP answers honest.

``--nemesis clock-skew`` starts the nodes with ``--unsafe-test-clock-control``
and adds the lease check (``chaos.lease_workload``; ``--lease-check`` adds
it to any run): a steady agent must never expire, stopped ones must expire
within their TTL plus a bound and never before it; and, on raft, the stream
check (``chaos.stream_workload``): a windowed count over appended events
emits no window twice and accounts for every event (late ones are counted).

``--nemesis lost-fsync`` starts the nodes with ``--unsafe-test-power-loss``
(each records what a power cut would leave of its files) and cuts the power
to all of them, or to a majority, at once: their files go back to what they
had synced (``chaos.power_loss``) before they restart. No acknowledged write
may be lost: the register must stay linearizable. ``--unsafe-skip-fsync``
starts the nodes with ``--durability none`` (the journal acknowledges
without syncing): the checker must then find lost writes.

``--workload bus`` runs ``chaos.bus_workload`` instead: numbered messages
published at-least-once and exactly-once, consumed by competing consumers,
drained after the heal and judged by ``check_bus`` (exit 0: nothing
acknowledged was lost and no exactly-once message was duplicated; 1: a loss,
a duplicate or any other problem, or the cluster did not recover; 2: the
run itself failed).

Every run ends with the replica check (``chaos.digests``): after the heal,
once the nodes share an applied index, their state digests (``digest`` in
``/v1/status``) must agree. Replicas that diverged fail the run (exit 1);
digests that could not be compared within 30 s make it an error (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chaos.bus_workload import BusRunError, BusTracker, BusWorkload, check_bus
from chaos.digests import describe, wait_for_digests
from chaos.lease_workload import LeaseWorkload, check_leases
from chaos.nemesis import CHOICES, CLOCK_CONTROL_FLAG, POWER_LOSS_FLAG, Nemesis, parse_kinds
from chaos.proxy import Proxy
from chaos.report import bus_report, plot, text_report
from chaos.stream_workload import StreamWorkload, check_streams
from chaos.workload import History, check_locks, run_locks, run_register
from devcluster.cluster import LocalCluster, free_base_port
from devcluster.progress import Progress


def check_history(path: Path, timeout_s: float) -> dict[str, Any]:
    """Run the checker as a user would; its last line is a JSON verdict."""
    result = subprocess.run([sys.executable, "-m", "chaos.check", "--model", "cas-register", "--timeout",
                             str(timeout_s), str(path)], capture_output=True, text=True, timeout=timeout_s + 60)
    lines = result.stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"verdict": "error", "valid": None, "error": (result.stderr or result.stdout)[-2000:]}
    verdict["exit_code"] = result.returncode
    return verdict


async def _progress(history: History, nemesis: Nemesis, started: float, every_s: float, total_s: float) -> None:
    with Progress("workload", total_s, every_s=every_s) as progress:
        while True:
            await asyncio.sleep(min(every_s, 1.0))
            c = history.counts
            progress.update(time.monotonic() - started, f"ok {c['ok']:6d}  fail {c['fail']:5d}  unknown "
                                                        f"{c['info']:4d}  nemesis: {nemesis.active or '-'}")


async def _recover(cluster: LocalCluster, timeout_s: float) -> float:
    started = time.monotonic()
    correct = client_nodes(cluster)  # a Byzantine replica need not agree nor catch up
    leader = await asyncio.to_thread(cluster.wait_leader, timeout_s, correct)
    target = (await asyncio.to_thread(cluster.status, leader))["commit_index"]
    for node in correct:
        left = max(1.0, timeout_s - (time.monotonic() - started))
        await asyncio.to_thread(cluster.wait_caught_up, node, target, left)
    return time.monotonic() - started


async def _heal(nemesis: Nemesis, cluster: LocalCluster, history: History, then: str = "") -> float | None:
    """Heal every fault and wait for the cluster: the seconds it took, or None
    (recorded in the history) when it did not recover; the run then fails."""
    await nemesis.heal()
    try:
        recovery_s = await _recover(cluster, 60)
    except (TimeoutError, RuntimeError) as exc:
        print(f"  the cluster did not recover after the heal: {exc}", flush=True)
        history.nemesis("recovery-failed", "start", error=str(exc))
        return None
    print(f"  healed; cluster recovered in {recovery_s:.1f}s{then}", flush=True)
    return recovery_s


async def run(args: argparse.Namespace) -> int:
    # SIGTERM stops a run like Ctrl-C does: the main task is cancelled and every
    # finally below stops what this run started.
    main_task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    base = args.base_port or free_base_port(args.nodes)
    extra = ("--unsafe-stale-reads",) if args.unsafe_stale_reads else ()
    if "clock-skew" in parse_kinds(args.nemesis):
        extra += (CLOCK_CONTROL_FLAG,)
    if "lost-fsync" in parse_kinds(args.nemesis):
        extra += (POWER_LOSS_FLAG,)
    if args.compaction_entries:
        extra += ("--compaction-entries", str(args.compaction_entries))
    pbft = args.engine == "pbft"
    faults = {byzantine_node(args.byzantine, args.nodes): args.byzantine} if args.byzantine else {}
    cluster = LocalCluster(out / "cluster", base_port=base, nodes=args.nodes, proxied=not pbft, extra_args=extra,
                           engine=args.engine, pbft_fault=faults or None,
                           durability="none" if args.unsafe_skip_fsync else "fsync")
    proxy = (Proxy([(link.name, link.listen_port, link.target_port) for link in cluster.links.values()],
                   seed=args.seed) if not pbft else None)
    if args.workload == "bus":
        return await run_bus(args, out, cluster, proxy)
    return await run_register_and_locks(args, out, cluster, proxy)


def byzantine_node(kind: str, nodes: int) -> str:
    """Which node misbehaves: the equivocator must be the primary of view 0
    (replica 0, the first node id in order); the others a backup."""
    return "n1" if kind == "equivocate" else f"n{nodes}"


def final_statuses(cluster: LocalCluster) -> dict[str, Any]:
    """Each node's role, term (PBFT: view), applied index and health after the run."""
    out: dict[str, Any] = {}
    for node in cluster.members:
        status = cluster.status(node, timeout=3.0)
        out[node] = status and {k: status.get(k) for k in ("role", "term", "leader_id", "applied_index", "healthy",
                                                          "problem")}
    return out


DIGEST_WAIT_S = 30.0


async def check_replicas(cluster: LocalCluster) -> dict[str, Any]:
    """The replica check: the correct nodes' state digests agree at an index they share."""
    verdict = await wait_for_digests(lambda node: cluster.status(node, timeout=3.0), client_nodes(cluster),
                                     DIGEST_WAIT_S)
    print(f"  {describe(verdict)}", flush=True)
    return verdict


def digest_exit(verdict: dict[str, Any] | None) -> int:
    """0 when the digests agree, 1 when they differ, 2 when they could not be compared."""
    if verdict is None or verdict["valid"] is None:
        return 2
    return 0 if verdict["valid"] else 1


def client_nodes(cluster: LocalCluster) -> list[str]:
    """The nodes the workload's clients talk to: all but a Byzantine one."""
    return [n for n in cluster.members if n not in cluster.pbft_fault]


async def run_register_and_locks(args: argparse.Namespace, out: Path, cluster: LocalCluster,
                                 proxy: Proxy | None) -> int:
    history = History()
    locks = History()
    locks.started_ns = history.started_ns
    leases = History()
    leases.started_ns = history.started_ns
    kinds = parse_kinds(args.nemesis)
    lease_check = args.lease_check or "clock-skew" in kinds
    streams = None
    stream_verdict = None
    # a nemesis that takes no node away leaves a steady heartbeat nothing to excuse a lapse
    harmless = set(kinds) <= {"clock-skew", "none"}
    rng = random.Random(args.seed)
    nemesis = Nemesis(cluster, proxy, history, rng)
    title = (f"{args.nemesis}, {args.duration:.0f}s, {args.clients} clients, seed {args.seed}"
             + (f", {args.engine} on {args.nodes} nodes" if args.engine != "raft" else "")
             + (f", one {args.byzantine} replica" if args.byzantine else "")
             + (", UNSAFE stale reads" if args.unsafe_stale_reads else "")
             + (", UNSAFE no fsync" if args.unsafe_skip_fsync else ""))
    print(f"chaos run: {title}\n  output in {out}", flush=True)
    recovery_s = None
    digests = None
    final: dict[str, Any] = {}
    if proxy is not None:
        await proxy.start()
    try:
        cluster.start_all()
        leader = await asyncio.to_thread(cluster.wait_leader, 60)
        print(f"  cluster up, leader {leader}; running the workload", flush=True)
        started = time.monotonic()
        progress = asyncio.create_task(_progress(history, nemesis, started, args.progress_s, args.duration))
        try:
            endpoints = [cluster.url(n) for n in client_nodes(cluster)]
            extra_work = []
            if lease_check and args.engine == "raft":
                streams = StreamWorkload(endpoints, op_timeout_s=args.op_timeout, run_id=str(args.seed))
                await streams.setup()
                extra_work.append(streams.run(args.duration))
            if lease_check:
                extra_work.append(LeaseWorkload(endpoints, leases, seed=args.seed, op_timeout_s=args.op_timeout,
                                                bound_s=4.0 if harmless else args.fault_s + 10.0
                                                ).run(args.duration))
            await asyncio.gather(
                *extra_work,
                run_register(endpoints, history, clients=args.clients, keys=args.keys, duration_s=args.duration,
                             seed=args.seed, op_timeout_s=args.op_timeout),
                run_locks(endpoints, locks, clients=args.lock_clients, duration_s=args.duration, seed=args.seed,
                          op_timeout_s=args.op_timeout),
                nemesis.run(args.nemesis, args.duration, fault_s=args.fault_s, quiet_s=args.quiet_s))
        finally:
            progress.cancel()
        recovery_s = await _heal(nemesis, cluster, history)
        if streams is not None and recovery_s is not None:
            stream_verdict = check_streams(await streams.drain(30.0))
        if recovery_s is not None:
            digests = await check_replicas(cluster)
        final = await asyncio.to_thread(final_statuses, cluster)
    finally:
        await asyncio.to_thread(cluster.stop_all)
        if proxy is not None:
            await proxy.stop()
    history_path = out / "history.jsonl"
    history.write_jsonl(str(history_path))
    locks.write_jsonl(str(out / "locks.jsonl"))
    print("  checking the history", flush=True)
    verdict = check_history(history_path, args.check_timeout)
    lock_verdict = check_locks(locks.events)
    lease_verdict = None
    if lease_check:
        leases.write_jsonl(str(out / "leases.jsonl"))
        lease_verdict = check_leases(leases.events, steady_must_survive=harmless)
    leases_ok = lease_verdict is None or lease_verdict["valid"] is True
    leases_ok = leases_ok and (stream_verdict is None or stream_verdict["valid"] is True)
    report = text_report(history.events, history.started_ns, verdict, title=f"chaos run: {title}",
                         recovery_s=recovery_s)
    report += (f"\nlocks: {lock_verdict['grants']} grants, {lock_verdict['fenced_writes']} fenced writes accepted; "
               f"fencing {'holds' if lock_verdict['valid'] else 'VIOLATED'}")
    for problem in lock_verdict["problems"]:
        report += f"\n  {problem}"
    if lease_verdict is not None:
        report += (f"\nleases: {lease_verdict['agents']} agents, {lease_verdict.get('renewals', 0)} renewals, "
                   f"quitters expired after {lease_verdict.get('quitter_expiry_s', [])} s, steady lapses "
                   f"{lease_verdict.get('steady_lapses', 0)}; leases {'hold' if leases_ok else 'VIOLATED'}")
        for problem in lease_verdict["problems"]:
            report += f"\n  {problem}"
    if stream_verdict is not None:
        report += (f"\nstreams: {stream_verdict['stored']} events, {stream_verdict['windows']} window results "
                   f"folding {stream_verdict['folded']}, {stream_verdict['late']} counted late (missing from the "
                   f"results); {'nothing emitted twice or lost' if stream_verdict['valid'] else 'VIOLATED'}")
        for problem in stream_verdict["problems"]:
            report += f"\n  {problem}"
    skews = [e for e in history.events if e.get("name") == "clock-skew" and e.get("phase") == "start"]
    if skews:
        report += "\nclock jumps: " + ", ".join(f"{e['nodes'][0]} {e['offset_ms'] / 1000:+.0f}s"
                                                 + (" (leader)" if e.get("leader") else "") for e in skews)
    cuts = [e for e in history.events if e.get("name") == "lost-fsync" and e.get("phase") == "start"]
    if cuts:
        report += "\npower cuts: " + "; ".join(
            f"{'all' if e['all'] else 'majority'} {','.join(e['nodes'])} lost "
            + ", ".join(f"{node} {size} B" for node, size in e["dropped_bytes"].items())
            + (f" (torn: {', '.join(e['torn'])})" if e["torn"] else "") for e in cuts)
    report += "\n" + describe(digests)
    report += "\nfinal terms (PBFT: views): " + ", ".join(
        f"{node} {status['term'] if status else '-'}" + (f" ({cluster.pbft_fault[node]})"
                                                         if node in cluster.pbft_fault else "")
        for node, status in final.items())
    (out / "report.txt").write_text(report + "\n")
    plot(history.events, history.started_ns, str(out / "latency.png"), title=title)
    (out / "verdict.json").write_text(json.dumps({"register": verdict, "locks": lock_verdict, "leases": lease_verdict,
                                                  "streams": stream_verdict, "digests": digests,
                                                  "final_status": final, "byzantine": cluster.pbft_fault},
                                                 indent=2) + "\n")
    print()
    print(report)
    print(f"\nhistory {history_path}\nplot    {out / 'latency.png'}")
    replicas = digest_exit(digests)
    if verdict.get("valid") is True and lock_verdict["valid"] and leases_ok and recovery_s is not None \
            and replicas == 0:
        return 0
    if (verdict.get("valid") is False or not lock_verdict["valid"] or not leases_ok or recovery_s is None
            or replicas == 1):
        return 1
    return 2


async def _bus_progress(tracker: BusTracker, nemesis: Nemesis, started: float, every_s: float,
                        total_s: float) -> None:
    with Progress("bus workload", total_s, every_s=every_s) as progress:
        while True:
            await asyncio.sleep(min(every_s, 1.0))
            c = tracker.counts
            progress.update(time.monotonic() - started, f"published {c['published']:6d}  received "
                                                        f"{c['received']:6d}  redelivered {c['redelivered']:5d}  "
                                                        f"nemesis: {nemesis.active or '-'}")


async def run_bus(args: argparse.Namespace, out: Path, cluster: LocalCluster, proxy: Proxy) -> int:
    """The bus workload under the nemesis, then heal, recover, drain and check."""
    history = History()
    nemesis = Nemesis(cluster, proxy, history, random.Random(args.seed))
    title = (f"bus: {args.nemesis}, {args.duration:.0f}s, {args.publishers} publishers and {args.consumers} "
             f"consumers per topic, seed {args.seed}")
    print(f"chaos run: {title}\n  output in {out}", flush=True)
    recovery_s = drain = stats = failure = digests = None
    await proxy.start()
    workload = BusWorkload([cluster.url(n) for n in cluster.members], history, seed=args.seed,
                           publishers=args.publishers, consumers=args.consumers, ack_timeout_s=args.ack_timeout,
                           op_timeout_s=args.op_timeout, skip_ack=args.skip_ack, interval_s=args.publish_interval)
    try:
        cluster.start_all()
        try:
            try:
                leader = await asyncio.to_thread(cluster.wait_leader, 60)
            except (TimeoutError, RuntimeError) as exc:
                raise BusRunError(f"the cluster did not start: {exc}") from exc
            await workload.setup()
            workload.start_consumers()
            print(f"  cluster up, leader {leader}; running the workload", flush=True)
            started = time.monotonic()
            progress = asyncio.create_task(_bus_progress(workload.tracker, nemesis, started, args.progress_s,
                                                                   args.duration))
            try:
                await asyncio.gather(workload.publish(args.duration),
                                     nemesis.run(args.nemesis, args.duration, fault_s=args.fault_s,
                                                 quiet_s=args.quiet_s))
            finally:
                progress.cancel()
            recovery_s = await _heal(nemesis, cluster, history, then="; draining")
            drain = await workload.drain(args.drain_s)
            stats = await workload.stats()
            if recovery_s is not None:
                digests = await check_replicas(cluster)
        except BusRunError as exc:
            failure = str(exc)
            print(f"  the run failed: {failure}", flush=True)
        finally:
            await workload.close()
            if failure is None and workload.crashed():
                failure = f"consumers crashed: {workload.crashed()}"
    finally:
        await asyncio.to_thread(cluster.stop_all)
        await proxy.stop()
    history_path = out / "history.jsonl"
    history.write_jsonl(str(history_path))
    verdict = check_bus(history.events)
    if failure is not None:
        verdict = {**verdict, "valid": None, "error": failure}
    report = bus_report(history.events, history.started_ns, verdict, title=f"chaos run: {title}",
                        recovery_s=recovery_s, drain=drain, stats=stats) + "\n" + describe(digests)
    (out / "report.txt").write_text(report + "\n")
    plot(history.events, history.started_ns, str(out / "latency.png"), title=title)
    (out / "verdict.json").write_text(json.dumps({"bus": verdict, "drain": drain, "stats": stats,
                                                  "recovery_s": recovery_s, "digests": digests},
                                                 indent=2, default=str) + "\n")
    print()
    print(report)
    print(f"\nhistory {history_path}\nplot    {out / 'latency.png'}")
    if failure is not None:
        return 2
    if not verdict["valid"] or recovery_s is None or digest_exit(digests) == 1:
        return 1
    return digest_exit(digests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("register", "bus"), default="register",
                        help="register: kv register + locks, linearizability (default); bus: message loss and "
                             "duplication at-least-once and exactly-once")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of workload (default 60)")
    parser.add_argument("--nemesis", default="partition-halves",
                        help=f"one of {', '.join(CHOICES)}, or a comma-separated list taken in turn")
    parser.add_argument("--engine", choices=("raft", "pbft"), default="raft")
    parser.add_argument("--nodes", type=int, choices=(3, 4, 5, 7), default=None,
                        help="3 or 5 for raft (default 3), 4 or 7 for pbft (default 4)")
    parser.add_argument("--byzantine", choices=("silent", "equivocate", "forge"), default=None,
                        help="pbft: one replica misbehaves this way (clients then use the correct nodes)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--keys", type=int, default=3)
    parser.add_argument("--lock-clients", type=int, default=3, help="clients of the lock workload")
    parser.add_argument("--publishers", type=int, default=3, help="bus: publishers per topic")
    parser.add_argument("--consumers", type=int, default=2, help="bus: competing consumers per topic")
    parser.add_argument("--ack-timeout", type=float, default=2.0, help="bus: the subscriptions' ack timeout (s)")
    parser.add_argument("--skip-ack", type=float, default=0.05,
                        help="bus: fraction of deliveries processed but not acked while faults run")
    parser.add_argument("--publish-interval", type=float, default=0.0, help="bus: pause between publishes (s)")
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="bus: at most this long after recovery to consume what is left")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", "0")) or None)
    parser.add_argument("--fault-s", type=float, default=6.0, help="length of each fault")
    parser.add_argument("--quiet-s", type=float, default=4.0, help="healthy time between faults")
    parser.add_argument("--op-timeout", type=float, default=2.0, help="client timeout per operation")
    parser.add_argument("--check-timeout", type=float, default=120.0)
    parser.add_argument("--progress-s", type=float, default=5.0)
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("COORD_BASE_PORT", "0")) or None)
    parser.add_argument("--out", default=".chaos", help="directory for the run's files (default .chaos/)")
    parser.add_argument("--lease-check", action="store_true",
                        help="also run the lease workload (on by default with --nemesis clock-skew)")
    parser.add_argument("--unsafe-stale-reads", action="store_true",
                        help="start the nodes with reads that skip the barrier: the checker must catch them")
    parser.add_argument("--compaction-entries", type=int, default=None,
                        help="raft: nodes snapshot and compact their log beyond this many entries (default the "
                             "node's 20000; a few hundred makes snapshots, and their installs on a lagging "
                             "follower, happen within a short run)")
    parser.add_argument("--unsafe-skip-fsync", action="store_true",
                        help="start the nodes with --durability none (acknowledged before any fsync): with "
                             "--nemesis lost-fsync the checker must find lost writes")
    args = parser.parse_args(argv)
    try:
        parse_kinds(args.nemesis)
    except ValueError as exc:
        parser.error(str(exc))
    if not (1 <= args.publishers <= 50 and 1 <= args.consumers <= 20 and 0 <= args.skip_ack < 1
            and args.ack_timeout >= 0.1 and args.drain_s >= 0):
        parser.error("bus: 1-50 publishers, 1-20 consumers, --skip-ack in [0, 1), --ack-timeout >= 0.1, "
                     "--drain-s >= 0")
    if args.nodes is None:
        args.nodes = 4 if args.engine == "pbft" else 3
    if (args.engine == "pbft") != (args.nodes in (4, 7)):
        parser.error("--nodes: raft runs 3 or 5 nodes, pbft 4 or 7 (3f+1)")
    if args.byzantine and args.engine != "pbft":
        parser.error("--byzantine needs --engine pbft")
    if args.engine == "pbft" and args.workload == "bus":
        parser.error("--workload bus runs on raft only for now")
    if args.engine == "pbft" and any(k.startswith(("partition", "isolate", "bridge")) or k == "mix"
                                     for k in parse_kinds(args.nemesis)):
        parser.error("--engine pbft: the partition nemeses need the fault proxy, which PBFT links do not use yet; "
                     "use kill, kill-leader, pause, pause-leader or none")
    if args.seed is None:
        args.seed = random.randrange(1, 2**31)
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process this run started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
