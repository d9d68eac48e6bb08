"""Fakes for tests: ``SimEngine``, an in-memory single-replica log.

It implements ``coordinator.ports.ConsensusEngine`` without threads or
sockets: ``submit`` appends the entry and applies it on the next loop
iteration, in order. Tests can make it refuse (``no_leader``) or hold
entries without committing them (``hold``) to exercise the error paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from coordinator.errors import Unavailable
from coordinator.ports import Done, EngineStatus, Failure, ReplicatedFSM


class SimEngine:
    def __init__(self, fsm: ReplicatedFSM, address: str = "127.0.0.1:17101") -> None:
        self.fsm = fsm
        self.address = address
        self.log: list[bytes] = []
        self.role = "follower"
        self.term = 0
        self.no_leader = False  # submit fails at once with a definite failure
        self.hold = False  # submit accepts but never commits (a lost majority)
        self.members = [address]
        self.recoveries = 0
        self.halted: str | None = None  # set when fsm.apply raised (ReplicatedFSM: the engine stops)
        self.quorum_lease_s = 0.5  # coordinator.ports.KnowsQuorumContact
        self.quorum_age_s = 0.0  # what a leader reports; a test sets it to cut the leader off
        self._listeners: list[Callable[[str], None]] = []
        self._held: list[tuple[bytes, Done]] = []

    async def start(self) -> None:
        self.become_leader()

    async def stop(self) -> None:
        self.role = "stopped"

    def become_leader(self) -> None:
        self.term += 1
        self.role = "leader"
        for listener in self._listeners:
            listener("leader")

    def step_down(self) -> None:
        self.role = "follower"
        for listener in self._listeners:
            listener("follower")

    def submit(self, blob: bytes, done: Done) -> None:
        if self.no_leader or self.role == "stopped":
            asyncio.get_running_loop().call_soon(done, Failure.NO_LEADER)
            return
        if self.hold:
            self._held.append((blob, done))
            return
        self.log.append(blob)
        index = len(self.log)
        asyncio.get_running_loop().call_soon(self._commit, index, blob, done)

    def _commit(self, index: int, blob: bytes, done: Done) -> None:
        if self.halted is not None:
            done(None)  # committed; this replica just no longer applies it
            return
        try:
            self.fsm.apply(index, blob)
        except Exception as exc:  # as the real engines do: halt, leave, say why
            self.halted = f"apply failed at index {index}: {type(exc).__name__}"
            self.role = "stopped"
            for listener in self._listeners:
                listener("stopped")
        done(None)

    def release(self) -> None:
        """Commit everything held while ``hold`` was on."""
        self.hold = False
        held, self._held = self._held, []
        for blob, done in held:
            self.submit(blob, done)

    def status(self) -> EngineStatus:
        leader = self.address if self.role == "leader" else None
        return EngineStatus(node=self.address, role=self.role, leader=leader, term=self.term,
                            commit_index=len(self.log), applied_index=len(self.log), members=tuple(self.members),
                            healthy=self.halted is None, problem=self.halted, connected=())

    def quorum_contact_age_s(self) -> float | None:
        return self.quorum_age_s if self.role == "leader" else None

    def on_role_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    async def add_member(self, address: str) -> None:
        if self.role != "leader":
            raise Unavailable("not the leader")
        self.members.append(address)

    async def remove_member(self, address: str) -> None:
        self.members.remove(address)
