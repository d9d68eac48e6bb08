"""Nemeses: faults injected into a running local cluster, Jepsen's menu.

Each fault is a start/end pair recorded in the history (``type: nemesis``)
with monotonic and wall-clock times. Faults act only from outside the
service: proxy links (partitions), signals to node processes by their PID
(kill, pause), restarts through the ``coordinator`` command line.

  partition-halves         one side of a random split cannot reach the other
  partition-majority-ring  every node sees a majority, no two the same one
  isolate-leader           the current leader alone on its side
  bridge                   two halves joined only through one node (5 nodes)
  kill                     SIGKILL a random node, restart it at the heal
  kill-all                 SIGKILL every node, restart them at the heal
  pause                    SIGSTOP a random node, SIGCONT at the heal
  kill-leader              SIGKILL the current leader (PBFT: the primary), restart it at the heal
  pause-leader             SIGSTOP the current leader (PBFT: a primary that stops), SIGCONT at the heal
  clock-skew               one node's wall clock (the leader half the time) jumps seconds to minutes
                           forward or back, and back to true time at the heal; needs nodes started
                           with --unsafe-test-clock-control (monotonic timers stay real)
  lost-fsync               cut the power to every node (the first time, then to every node or to a
                           random majority): SIGKILL them at once, put each one's files back to what
                           it had synced (chaos.power_loss; half the time a journal keeps a torn
                           part of its unsynced tail), restart them at the heal; needs nodes started
                           with --unsafe-test-power-loss
  mix                      a random one of the above at each round
  none                     no faults (when the fault is elsewhere: a Byzantine PBFT replica)
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterable

from chaos.power_loss import cut_power
from chaos.proxy import Faults, Proxy
from chaos.workload import History
from coordinator.clock import CLOCK_OFFSET_FILE
from devcluster.cluster import LocalCluster

KINDS = ("partition-halves", "partition-majority-ring", "isolate-leader", "bridge", "kill", "kill-all", "pause",
         "kill-leader", "pause-leader", "clock-skew", "lost-fsync")
CLOCK_CONTROL_FLAG = "--unsafe-test-clock-control"  # the node flag clock-skew needs
POWER_LOSS_FLAG = "--unsafe-test-power-loss"  # the node flag lost-fsync needs
CLOCK_JUMPS_S = (3, 10, 30, 90, 300)  # how far a skewed clock jumps, either way
CHOICES = (*KINDS, "mix", "none")


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CHOICES]
    if not kinds or unknown:
        raise ValueError(f"unknown nemesis {text!r}; choose from {', '.join(CHOICES)} (or a comma-separated list)")
    if "none" in kinds and len(kinds) > 1:
        raise ValueError("nemesis none cannot be combined with others")
    return kinds


class Nemesis:
    def __init__(self, cluster: LocalCluster, proxy: Proxy | None, history: History, rng: random.Random) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.history = history
        self.rng = rng
        self.active: str | None = None
        self._killed: list[str] = []
        self._paused: list[str] = []
        self._skewed: list[str] = []
        self._power_cuts = 0

    async def run(self, kind: str, duration_s: float, *, fault_s: float = 6.0, quiet_s: float = 4.0) -> None:
        """Alternate faults and quiet periods until ``duration_s`` is spent; heals at the end.

        ``kind`` is one nemesis, ``mix`` (a random one each round) or a comma-separated
        list taken in turn (``partition-halves,kill``)."""
        kinds = parse_kinds(kind)
        if kinds == ["none"]:
            await asyncio.sleep(duration_s)
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + duration_s
        rounds = 0
        try:
            await asyncio.sleep(min(quiet_s, duration_s / 4))
            while loop.time() + fault_s / 2 < end:
                turn = kinds[rounds % len(kinds)]
                rounds += 1
                chosen = self.rng.choice(self._usable()) if turn == "mix" else turn
                await self.start(chosen)
                await asyncio.sleep(max(0.0, min(fault_s, end - loop.time())))
                await self.heal()
                await asyncio.sleep(max(0.0, min(quiet_s, end - loop.time())))
        finally:
            await self.heal()

    def _usable(self) -> list[str]:  # what mix may pick
        kinds = [k for k in KINDS if k != "bridge" or len(self.cluster.members) >= 5]
        if CLOCK_CONTROL_FLAG not in self.cluster.extra_args:
            kinds = [k for k in kinds if k != "clock-skew"]
        if POWER_LOSS_FLAG not in self.cluster.extra_args:
            kinds = [k for k in kinds if k != "lost-fsync"]
        return kinds if self.proxy is not None else [k for k in kinds if not k.startswith(("partition", "isolate",
                                                                                           "bridge"))]

    # -- faults ---------------------------------------------------------------------------

    async def start(self, kind: str) -> None:
        nodes = list(self.cluster.members)
        detail: dict[str, object] = {}
        if kind in ("partition-halves", "isolate-leader", "partition-majority-ring", "bridge"):
            self._require_proxy(kind)
            if kind == "partition-halves":
                shuffled = self.rng.sample(nodes, len(nodes))
                small = shuffled[: len(nodes) // 2]
                cut = self._cut_between(small, [n for n in nodes if n not in small])
                detail = {"minority": sorted(small)}
            elif kind == "isolate-leader":
                leader = await asyncio.to_thread(self._leader_or_random)
                cut = self._cut_between([leader], [n for n in nodes if n != leader])
                detail = {"isolated": leader}
            elif kind == "partition-majority-ring":
                cut = self._ring_cut(nodes)
            else:
                cut = self._bridge_cut(nodes)
            for link in cut:
                self.proxy.set(link, Faults(drop_a_to_b=True, drop_b_to_a=True))
            detail["links"] = sorted(cut)
        elif kind in ("kill", "kill-leader"):
            victim = self.rng.choice(nodes) if kind == "kill" else await asyncio.to_thread(self._leader_or_random)
            self._killed = [victim]
            await asyncio.to_thread(self.cluster.kill, victim)
            detail = {"nodes": [victim]}
        elif kind == "kill-all":
            self._killed = list(nodes)
            for node in nodes:
                self.cluster.signal(node, signal.SIGKILL)
            await asyncio.to_thread(lambda: [self.cluster._wait_gone(n, 10) for n in nodes])
            detail = {"nodes": nodes}
        elif kind in ("pause", "pause-leader"):
            victim = self.rng.choice(nodes) if kind == "pause" else await asyncio.to_thread(self._leader_or_random)
            self._paused = [victim]
            self.cluster.signal(victim, signal.SIGSTOP)
            detail = {"nodes": [victim]}
        elif kind == "clock-skew":
            detail = await self._skew_clock(nodes)
        elif kind == "lost-fsync":
            detail = await asyncio.to_thread(self._cut_power, nodes)
        else:
            raise ValueError(f"unknown nemesis {kind!r}")
        self.active = kind
        self.history.nemesis(kind, "start", **detail)

    async def heal(self) -> None:
        if self.active is None and not self._killed and not self._paused and not self._skewed:
            return
        if self.proxy is not None:
            self.proxy.heal()
        for node in self._skewed:  # the clock jumps back to true time
            self._set_clock_offset(node, 0)
        for node in self._paused:
            self.cluster.signal(node, signal.SIGCONT)
        for node in self._killed:
            self.cluster.start(node)
        kind, self.active = self.active, None
        self._paused, self._killed, self._skewed = [], [], []
        self.history.nemesis(kind or "heal", "end")

    # -- clocks ---------------------------------------------------------------------------------

    async def _skew_clock(self, nodes: list[str]) -> dict[str, object]:
        """Jump one node's wall clock (the leader's half the time) by a seeded
        amount, forward or back. The node reads the offset from its control
        file within 50 ms; only its wall clock moves, as in a real clock step."""
        if CLOCK_CONTROL_FLAG not in self.cluster.extra_args:
            raise ValueError(f"clock-skew needs nodes started with {CLOCK_CONTROL_FLAG}")
        pick_leader = self.rng.random() < 0.5
        victim = await asyncio.to_thread(self._leader_or_random) if pick_leader else self.rng.choice(nodes)
        offset_ms = self.rng.choice((-1, 1)) * self.rng.choice(CLOCK_JUMPS_S) * 1000
        self._skewed = [victim]
        self._set_clock_offset(victim, offset_ms)
        return {"nodes": [victim], "offset_ms": offset_ms, "leader": pick_leader}

    def _set_clock_offset(self, node: str, offset_ms: int) -> None:
        """Write the offset atomically (a node never reads half a number)."""
        path = self.cluster.dir / node / CLOCK_OFFSET_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{offset_ms}\n")
        os.replace(tmp, path)

    # -- power ----------------------------------------------------------------------------------

    def _cut_power(self, nodes: list[str]) -> dict[str, object]:
        """Cut the power to every node (the first cut of a run; later ones
        half the time) or to a random majority: SIGKILL them all at once (no
        node gets to sync anything after the first dies), wait until they are
        gone, then put each one's files back to what it had synced. Losing a
        minority's unsynced writes never loses an acknowledged write in Raft;
        a majority or all at once is what can. The nodes restart at the heal."""
        if POWER_LOSS_FLAG not in self.cluster.extra_args:
            raise ValueError(f"lost-fsync needs nodes started with {POWER_LOSS_FLAG}")
        whole = self._power_cuts == 0 or self.rng.random() < 0.5
        self._power_cuts += 1
        victims = sorted(nodes if whole else self.rng.sample(nodes, len(nodes) // 2 + 1))
        self._killed = victims  # restarted at the heal, whatever happens below
        for node in victims:
            self.cluster.signal(node, signal.SIGKILL)
        stuck = [node for node in victims if not self.cluster._wait_gone(node, 10)]
        if stuck:
            raise RuntimeError(f"lost-fsync: {stuck} still running 10 s after SIGKILL")
        dropped: dict[str, int] = {}
        reverted: list[str] = []
        removed: list[str] = []
        torn: list[str] = []
        for node in victims:
            lost = cut_power(str(self.cluster.dir / node), self.rng, torn_tail=True)
            dropped[node] = lost["dropped_bytes"]
            reverted += [f"{node}:{rel}" for rel in lost["reverted"]]
            removed += [f"{node}:{rel}" for rel in lost["removed"]]
            torn += [f"{node}:{rel}" for rel in lost["torn"]]
        return {"nodes": victims, "all": whole, "dropped_bytes": dropped, "reverted": reverted, "removed": removed,
                "torn": torn}

    # -- topology helpers -----------------------------------------------------------------------

    def _require_proxy(self, kind: str) -> None:
        if self.proxy is None or not self.cluster.links:
            raise ValueError(f"{kind} needs a cluster wired through the chaos proxy")

    def _leader_or_random(self) -> str:
        try:
            return self.cluster.wait_leader(3)
        except (TimeoutError, RuntimeError):
            return self.rng.choice(self.cluster.members)

    def _cut_between(self, side: Iterable[str], other: Iterable[str]) -> set[str]:
        cut = set()
        for a in side:
            for b in other:
                link = self.cluster.link_between(a, b)
                if link is not None:
                    cut.add(link.name)
        return cut

    def _ring_cut(self, nodes: list[str]) -> set[str]:
        """Keep only the links between ring neighbours (each node plus its two
        neighbours is a majority for 3 and 5 nodes); with 3 nodes the ring is
        complete, so cut one random link: each node still sees a majority,
        and the two ends of the cut link see different majorities."""
        order = self.rng.sample(nodes, len(nodes))
        if len(nodes) <= 3:
            a, b = order[0], order[1]
            return {self.cluster.link_between(a, b).name}
        keep = {frozenset((order[i], order[(i + 1) % len(order)])) for i in range(len(order))}
        return {link.name for link in self.cluster.links.values()
                if frozenset((link.dialer, link.target)) not in keep}

    def _bridge_cut(self, nodes: list[str]) -> set[str]:
        """Two halves that talk only through one bridge node."""
        order = self.rng.sample(nodes, len(nodes))
        bridge, rest = order[0], order[1:]
        left, right = rest[: len(rest) // 2], rest[len(rest) // 2:]
        return self._cut_between(left, right) - self._cut_between([bridge], nodes)
