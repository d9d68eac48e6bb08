"""The replicated state machine against a deliberately dumb model.

``Model`` below is plain dicts and obvious rules, written from the operation
contracts (coordinator/state/machine.py docstrings, DESIGN "Rules of the
replicated state machine"), never by calling the implementation. The
hypothesis ``RuleBasedStateMachine`` drives both with the same random
commands and compares every ``Result`` and, after every step, the whole
state. It also keeps restored copies (``from_snapshot_data(snapshot_data())``)
in lock step with the original and replays the whole log into a fresh
machine at the end of each run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from coordinator.codec import decode_command, decode_snapshot, encode_command, encode_snapshot
from coordinator.errors import InvariantError
from coordinator.state import Limits, StateMachine
from coordinator.state.machine import CLOCK_STEP_MAX_MS, OPERATIONS
from coordinator.types import Command, Result

KEYS = ("a", "b", "c/d")
VALUES: tuple[Any, ...] = (None, True, False, 0, 1, 2, "1", "x", "", [], [1], [True], {"a": 1}, {"a": True})
AGENTS = ("w1", "w2", "w3")
TYPES = ("planner", "worker")
LOCK_NAMES = ("L1", "L2")
HOLDERS = ("w1", "w2", "ext")  # "ext" holds locks but is never an agent
MEMBERS = ("n1", "n2")
HEALTH = ("healthy", "unhealthy", "unknown")
TTLS = (1_000, 5_000, 86_400_000)  # both ends of the allowed range
CAS_VALUE_MODES = ("current", "look-alike", "any")
CAS_REVISION_MODES = ("current", "zero", "old", "next")
RETAINED_EVENTS = 7
KV_HISTORY = 5
LIMITS = Limits(events_retained=RETAINED_EVENTS, kv_history=KV_HISTORY)

# Commands that every state must refuse as ``invalid``: wrong types, empty
# strings, out-of-range numbers, missing fields, unknown operations.
INVALID: tuple[tuple[str, Any], ...] = (
    ("kv.put", {"key": "", "value": 1}),
    ("kv.put", {"key": 7, "value": 1}),
    ("kv.put", {"key": "a\n", "value": 1}),
    ("kv.put", {"key": "k" * 1025, "value": 1}),
    ("kv.put", {"key": "a"}),
    ("kv.put", {"key": "a", "value": 1, "fence": "L1"}),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "L1"}}),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "L1", "token": "1"}}),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "", "token": 1}}),
    ("kv.delete", {"key": "a", "fence": {"lock": "L1", "token": -1}}),
    ("kv.delete", {"key": None}),
    ("kv.cas", {"key": "a", "value": 1}),
    ("kv.cas", {"key": "a", "value": 1, "expected": 1, "expected_revision": 0}),
    ("kv.cas", {"key": "a", "value": 1, "expected_revision": -1}),
    ("kv.cas", {"key": "a", "value": 1, "expected_revision": True}),
    ("kv.cas", {"key": "a", "expected": None}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 999}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 86_400_001}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": "5000"}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": True}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 5000.0}),
    ("agent.register", {"id": "", "type": "worker", "ttl_ms": 5_000}),
    ("agent.register", {"id": "w1", "ttl_ms": 5_000}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 5_000, "metadata": [1]}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 5_000, "weight": 0}),
    ("agent.register", {"id": "w1", "type": "worker", "ttl_ms": 5_000, "endpoint": ""}),
    ("agent.deregister", {"id": 1}),
    ("agent.expire", {"id": "w1", "lease_id": "3"}),
    ("agent.expire", {"id": "w1"}),
    ("agent.health", {"id": "w1", "health": "sick"}),
    ("agent.health", {"id": "w1", "health": "healthy", "reason": ""}),
    ("lock.acquire", {"name": "L1", "holder": "w1", "ttl_ms": 999}),
    ("lock.acquire", {"name": "L1", "holder": "w1", "ttl_ms": 86_400_001}),
    ("lock.acquire", {"name": "L1", "holder": "", "ttl_ms": 5_000}),
    ("lock.acquire", {"name": None, "holder": "w1", "ttl_ms": 5_000}),
    ("lock.release", {"name": "L1"}),
    ("lock.expire", {"name": "L1", "token": None}),
    ("member.register", {"id": "n1", "raft": "", "http": "127.0.0.1:2"}),
    ("member.remove", {}),
    ("kv.frobnicate", {"key": "a"}),
    ("kv.put", ["a", 1]),  # args must be an object
)


def look_alike(value: Any) -> Any:
    """A different JSON value that Python's ``==`` may call equal (``True == 1``)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value == 1 if value in (0, 1) else str(value)
    if isinstance(value, list):
        return [look_alike(v) for v in value] if value else None
    if isinstance(value, dict):
        return {k: look_alike(v) for k, v in value.items()} if value else None
    return {None: False, "": None}.get(value, 1)


def same(a: Any, b: Any) -> bool:
    """The model's equality of JSON values: their JSON text (so ``true`` is not ``1``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def state_bytes(sm: StateMachine) -> bytes:
    """The encoded snapshot without the parts every applied entry moves:
    ``applied_index`` and the dedupe table (checked separately)."""
    data = sm.snapshot_data()
    return encode_snapshot({k: v for k, v in data.items() if k not in ("applied_index", "now_ms", "dedupe")})


def digest_of(op: str, args: Any) -> str:
    """What a proposer puts in ``request_digest``: a fingerprint of the request."""
    return hashlib.sha256(json.dumps([op, args], sort_keys=True).encode()).hexdigest()[:32]


def dedupe_ids(sm: StateMachine) -> list[str]:
    return [row[0] for row in sm.snapshot_data()["dedupe"]]


@dataclass
class Expect:
    """The model's prediction for one command."""

    value: Any = None
    code: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # type plus the data fields to check
    changes: list[tuple[int, str, str, Any]] = field(default_factory=list)
    changes_state: bool = False


@dataclass
class Model:
    kv: dict[str, Any] = field(default_factory=dict)
    mod_rev: dict[str, int] = field(default_factory=dict)
    revision: int = 0
    history: list[tuple[int, str, str, Any]] = field(default_factory=list)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> lease, health, type
    old_leases: dict[str, list[int]] = field(default_factory=dict)
    locks: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (holder, token)
    lock_ttl: dict[str, int] = field(default_factory=dict)
    old_tokens: dict[str, list[int]] = field(default_factory=dict)
    members: dict[str, tuple[str, str]] = field(default_factory=dict)
    event_types: list[str] = field(default_factory=list)

    # -- predictions; each mutates the model only on success ------------------------------

    def fence_refused(self, fence: dict[str, Any] | None) -> bool:
        if fence is None:
            return False
        held = self.locks.get(fence["lock"])
        return held is None or held[1] != fence["token"]

    def _kv_write(self, key: str, kind: str, value: Any, index: int) -> Expect:
        self.revision += 1
        if kind == "put":
            self.kv[key] = value
            self.mod_rev[key] = self.revision
        else:
            del self.kv[key]
            del self.mod_rev[key]
        change = (self.revision, key, kind, value)
        self.history.append(change)
        return Expect(value={"revision": self.revision}, changes=[change], changes_state=True)

    def kv_put(self, index: int, key: str, value: Any, fence: dict[str, Any] | None) -> Expect:
        if self.fence_refused(fence):
            return Expect(code="conflict")
        return self._kv_write(key, "put", value, index)

    def kv_cas_value(self, index: int, key: str, expected: Any, value: Any, fence: dict[str, Any] | None) -> Expect:
        if self.fence_refused(fence):
            return Expect(code="conflict")
        current = self.kv.get(key)  # a missing key compares as null
        if not same(current, expected):
            return Expect(code="conflict")
        return self._kv_write(key, "put", value, index)

    def kv_cas_revision(self, index: int, key: str, expected: int, value: Any, fence: dict[str, Any] | None) -> Expect:
        if self.fence_refused(fence):
            return Expect(code="conflict")
        if self.mod_rev.get(key, 0) != expected:  # 0 means absent
            return Expect(code="conflict")
        return self._kv_write(key, "put", value, index)

    def kv_delete(self, index: int, key: str, fence: dict[str, Any] | None) -> Expect:
        if self.fence_refused(fence):
            return Expect(code="conflict")
        if key not in self.kv:
            return Expect(code="not_found")
        return self._kv_write(key, "delete", None, index)

    def agent_register(self, index: int, agent_id: str, agent_type: str, ttl_ms: int) -> Expect:
        old = self.agents.get(agent_id)
        if old is not None:
            self.old_leases.setdefault(agent_id, []).append(old["lease"])
        self.agents[agent_id] = {"lease": index, "type": agent_type, "ttl": ttl_ms,
                                 "health": "unknown" if old is None else old["health"]}
        event_type = "agent.spawned" if old is None else "agent.updated"
        return Expect(value={"id": agent_id, "lease_id": index, "ttl_s": ttl_ms / 1000},
                      events=[{"type": event_type, "agentId": agent_id, "agentType": agent_type, "lease_id": index}],
                      changes_state=True)

    def _remove_agent(self, agent_id: str, reason: str) -> list[dict[str, Any]]:
        agent = self.agents.pop(agent_id)
        self.old_leases.setdefault(agent_id, []).append(agent["lease"])
        events = [{"type": "agent.terminated", "agentId": agent_id, "agentType": agent["type"],
                   "reason": reason, "lease_id": agent["lease"]}]
        for name, (holder, _token) in sorted(self.locks.items()):
            if holder == agent_id:
                events.append(self._drop_lock(name, f"agent {reason}"))
        return events

    def agent_deregister(self, index: int, agent_id: str) -> Expect:
        if agent_id not in self.agents:
            return Expect(code="not_found")
        return Expect(value={"id": agent_id}, events=self._remove_agent(agent_id, "left"), changes_state=True)

    def agent_expire(self, index: int, agent_id: str, lease_id: int) -> Expect:
        agent = self.agents.get(agent_id)
        if agent is None or agent["lease"] != lease_id:
            return Expect(value={"expired": False})
        return Expect(value={"expired": True}, events=self._remove_agent(agent_id, "expired"), changes_state=True)

    def agent_health(self, index: int, agent_id: str, health: str) -> Expect:
        agent = self.agents.get(agent_id)
        if agent is None:
            return Expect(code="not_found")
        if agent["health"] == health:
            return Expect(value={"changed": False, "health": health})
        previous, agent["health"] = agent["health"], health
        return Expect(value={"changed": True, "health": health},
                      events=[{"type": "agent.health.changed", "agentId": agent_id, "from": previous, "to": health}],
                      changes_state=True)

    def _drop_lock(self, name: str, reason: str) -> dict[str, Any]:
        holder, token = self.locks.pop(name)
        del self.lock_ttl[name]
        self.old_tokens.setdefault(name, []).append(token)
        return {"type": "lock.released", "name": name, "holder": holder, "fencing_token": token, "reason": reason}

    def lock_acquire(self, index: int, name: str, holder: str, ttl_ms: int) -> Expect:
        held = self.locks.get(name)
        if held is not None and held[0] != holder:
            return Expect(code="conflict")
        self.lock_ttl[name] = ttl_ms
        if held is not None:  # a refresh keeps the grant and its token; only the TTL changes
            return Expect(value={"fencing_token": held[1], "refreshed": True}, changes_state=True)
        self.locks[name] = (holder, index)
        return Expect(value={"fencing_token": index, "refreshed": False},
                      events=[{"type": "lock.acquired", "name": name, "holder": holder, "fencing_token": index}],
                      changes_state=True)

    def lock_release(self, index: int, name: str, holder: str) -> Expect:
        held = self.locks.get(name)
        if held is None:
            return Expect(code="not_found")
        if held[0] != holder:
            return Expect(code="conflict")
        return Expect(value={"released": True}, events=[self._drop_lock(name, "released")], changes_state=True)

    def lock_expire(self, index: int, name: str, token: int) -> Expect:
        held = self.locks.get(name)
        if held is None or held[1] != token:
            return Expect(value={"expired": False})
        return Expect(value={"expired": True}, events=[self._drop_lock(name, "expired")], changes_state=True)

    def member_register(self, index: int, node_id: str, raft: str, http: str) -> Expect:
        old = self.members.get(node_id)
        value = {"id": node_id, "raft": raft, "http": http}
        if old == (raft, http):
            return Expect(value=value)
        self.members[node_id] = (raft, http)
        event_type = "system.member.joined" if old is None else "system.member.updated"
        return Expect(value=value, events=[{"type": event_type, **value}], changes_state=True)

    def member_remove(self, index: int, node_id: str) -> Expect:
        old = self.members.pop(node_id, None)
        if old is None:
            return Expect(code="not_found")
        value = {"id": node_id, "raft": old[0], "http": old[1]}
        return Expect(value=value, events=[{"type": "system.member.left", **value}], changes_state=True)


class StateMachineRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sm = StateMachine(LIMITS)
        self.twins: list[StateMachine] = []  # restored from snapshots, fed the same commands since
        self.model = Model()
        self.index = 0
        self.now_ms = 1_700_000_000_000
        self.log: list[tuple[int, Command]] = []
        self.request_counter = 0
        self.sent_with_id: list[tuple[Command, Result]] = []
        self.max_token = 0
        self.open_lifetime: dict[str, int] = {}  # agent id -> its current lifetime
        self.lifetimes = 0
        self.terminations: Counter[int] = Counter()

    # -- the driver ---------------------------------------------------------------------

    def _command(self, op: str, args: Any, with_id: bool, version: int = 1) -> Command:
        request_id = None
        if with_id:
            self.request_counter += 1
            request_id = f"req-{self.request_counter}"
        self.now_ms += 250
        return Command(op=op, args=args, now_ms=self.now_ms, request_id=request_id, version=version,
                       request_digest=None if request_id is None else digest_of(op, args))

    def _apply(self, command: Command) -> Result:
        self.index += 1
        self.log.append((self.index, command))
        result = self.sm.apply(self.index, command)
        assert self.sm.applied_index == self.index
        for twin in self.twins:
            assert twin.apply(self.index, command) == result
        return result

    def _run(self, op: str, args: Any, with_id: bool, predict, version: int = 1) -> Result:
        """Apply a fresh command and check it against the model's prediction.

        ``predict(index)`` runs only here, once, so the model and the machine
        see the same index (fencing tokens and lease ids are log indexes).
        """
        command = self._command(op, args, with_id, version)
        before, ids_before = state_bytes(self.sm), dedupe_ids(self.sm)
        last_seq = self.sm.events.last_seq
        expect = predict(self.index + 1)
        result = self._apply(command)
        assert result.index == self.index
        if expect.code is None:
            assert result.error is None, (op, args, result.error)
            assert same(result.value, expect.value), (op, args, result.value, expect.value)
        else:
            assert result.error is not None and result.error[0] == expect.code, (op, args, result, expect)
            assert result.value is None
        self._check_events(result, expect, last_seq)
        assert [(c.revision, c.key, c.kind, c.value) for c in result.changes] == expect.changes
        assert all(c.index == self.index for c in result.changes)
        if not expect.changes_state:  # rejected, or a no-op such as a stale expiry
            assert state_bytes(self.sm) == before, (op, args, result)
        assert dedupe_ids(self.sm) == ids_before + ([command.request_id] if with_id else [])
        if with_id:
            self.sent_with_id.append((command, result))
        return result

    def _check_events(self, result: Result, expect: Expect, last_seq: int) -> None:
        assert [e.seq for e in result.events] == list(range(last_seq + 1, last_seq + 1 + len(result.events)))
        assert all(e.index == self.index and e.time_ms == self.now_ms for e in result.events)
        actual = sorted(json.dumps({"type": e.type, **{k: e.data[k] for k in want if k != "type"}}, sort_keys=True)
                        for e, want in _pair(result.events, expect.events))
        wanted = sorted(json.dumps(want, sort_keys=True) for want in expect.events)
        assert actual == wanted, (actual, wanted)
        self.model.event_types.extend(e.type for e in result.events)
        for event in result.events:
            if event.type == "agent.spawned":
                assert event.data["agentId"] not in self.open_lifetime
                self.lifetimes += 1
                self.open_lifetime[event.data["agentId"]] = self.lifetimes
            elif event.type == "agent.terminated":
                self.terminations[self.open_lifetime.pop(event.data["agentId"])] += 1
            elif event.type == "lock.acquired":
                assert event.data["fencing_token"] > self.max_token
                self.max_token = event.data["fencing_token"]

    def _live(self, choice: str, pick: int, live: dict[str, Any]) -> str:
        """Half the time aim at something that exists, so rules reach past ``not_found``."""
        if pick % 2 and live:
            return sorted(live)[pick // 2 % len(live)]
        return choice

    def _fence(self, lock_name: str, mode: int) -> dict[str, Any] | None:
        """mode 0: none, 1: the current grant, 2: an older grant, 3: a token never granted."""
        if mode == 0:
            return None
        if mode == 1:
            lock_name = self._live(lock_name, 1, self.model.locks)
        held = self.model.locks.get(lock_name)
        if mode == 1:
            return {"lock": lock_name, "token": held[1] if held else 1}
        if mode == 2:
            old = self.model.old_tokens.get(lock_name)
            return {"lock": lock_name, "token": old[-1] if old else 0}
        return {"lock": lock_name, "token": (held[1] if held else self.index) + 1}

    # -- key/value ------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), value=st.sampled_from(VALUES), with_id=st.booleans(),
          lock=st.sampled_from(LOCK_NAMES), fence_mode=st.sampled_from((0, 0, 1, 2, 3)))
    def kv_put(self, key, value, with_id, lock, fence_mode) -> None:
        fence = self._fence(lock, fence_mode)
        args = {"key": key, "value": value} | ({"fence": fence} if fence else {})
        self._run("kv.put", args, with_id, lambda i: self.model.kv_put(i, key, value, fence))

    @rule(key=st.sampled_from(KEYS), value=st.sampled_from(VALUES), mode=st.sampled_from(CAS_VALUE_MODES),
          expected=st.sampled_from(VALUES), pick=st.integers(0, 5), with_id=st.booleans(),
          lock=st.sampled_from(LOCK_NAMES), fence_mode=st.sampled_from((0, 0, 0, 1, 2)))
    def kv_cas_by_value(self, key, value, mode, expected, pick, with_id, lock, fence_mode) -> None:
        key = self._live(key, pick, self.model.kv)
        if mode == "current":  # a missing key compares as null
            expected = self.model.kv.get(key)
        elif mode == "look-alike":
            expected = look_alike(self.model.kv.get(key))
        fence = self._fence(lock, fence_mode)
        args = {"key": key, "value": value, "expected": expected} | ({"fence": fence} if fence else {})
        self._run("kv.cas", args, with_id, lambda i: self.model.kv_cas_value(i, key, expected, value, fence))

    @rule(key=st.sampled_from(KEYS), value=st.sampled_from(VALUES), mode=st.sampled_from(CAS_REVISION_MODES),
          pick=st.integers(0, 5), with_id=st.booleans(), lock=st.sampled_from(LOCK_NAMES),
          fence_mode=st.sampled_from((0, 0, 0, 1, 2)))
    def kv_cas_by_revision(self, key, value, mode, pick, with_id, lock, fence_mode) -> None:
        key = self._live(key, pick, self.model.kv)
        current = self.model.mod_rev.get(key, 0)
        expected = {"current": current, "zero": 0, "old": max(0, current - 1), "next": self.model.revision + 1}[mode]
        fence = self._fence(lock, fence_mode)
        args = {"key": key, "value": value, "expected_revision": expected} | ({"fence": fence} if fence else {})
        self._run("kv.cas", args, with_id, lambda i: self.model.kv_cas_revision(i, key, expected, value, fence))

    @rule(key=st.sampled_from(KEYS), pick=st.integers(0, 5), with_id=st.booleans(),
          lock=st.sampled_from(LOCK_NAMES), fence_mode=st.sampled_from((0, 0, 0, 1, 2, 3)))
    def kv_delete(self, key, pick, with_id, lock, fence_mode) -> None:
        key = self._live(key, pick, self.model.kv)
        fence = self._fence(lock, fence_mode)
        args = {"key": key} | ({"fence": fence} if fence else {})
        self._run("kv.delete", args, with_id, lambda i: self.model.kv_delete(i, key, fence))

    # -- agents ---------------------------------------------------------------------------

    @rule(agent=st.sampled_from(AGENTS), agent_type=st.sampled_from(TYPES), ttl_ms=st.sampled_from(TTLS),
          with_id=st.booleans())
    def agent_register(self, agent, agent_type, ttl_ms, with_id) -> None:
        args = {"id": agent, "type": agent_type, "ttl_ms": ttl_ms, "metadata": {"n": self.index}}
        self._run("agent.register", args, with_id, lambda i: self.model.agent_register(i, agent, agent_type, ttl_ms))

    @rule(agent=st.sampled_from(AGENTS), pick=st.integers(0, 5), with_id=st.booleans())
    def agent_deregister(self, agent, pick, with_id) -> None:
        agent = self._live(agent, pick, self.model.agents)
        result = self._run("agent.deregister", {"id": agent}, with_id,
                           lambda i: self.model.agent_deregister(i, agent))
        if result.ok:
            assert all(lock.holder != agent for lock in self.sm.locks.locks.values())

    @rule(agent=st.sampled_from(AGENTS), mode=st.sampled_from(("current", "current", "old", "next")),
          pick=st.integers(0, 5), with_id=st.booleans())
    def agent_expire(self, agent, mode, pick, with_id) -> None:
        agent = self._live(agent, pick, self.model.agents)
        current = self.model.agents.get(agent, {}).get("lease", 1)
        old = self.model.old_leases.get(agent)
        lease_id = {"current": current, "old": old[-1] if old else 0, "next": current + 1}[mode]
        result = self._run("agent.expire", {"id": agent, "lease_id": lease_id}, with_id,
                           lambda i: self.model.agent_expire(i, agent, lease_id))
        if result.value["expired"]:
            assert all(lock.holder != agent for lock in self.sm.locks.locks.values())

    @rule(agent=st.sampled_from(AGENTS), health=st.sampled_from(HEALTH), pick=st.integers(0, 5),
          with_id=st.booleans())
    def agent_health(self, agent, health, pick, with_id) -> None:
        agent = self._live(agent, pick, self.model.agents)
        self._run("agent.health", {"id": agent, "health": health, "reason": "probe"}, with_id,
                  lambda i: self.model.agent_health(i, agent, health))

    # -- locks ---------------------------------------------------------------------------

    @rule(name=st.sampled_from(LOCK_NAMES), holder=st.sampled_from(HOLDERS), ttl_ms=st.sampled_from(TTLS),
          with_id=st.booleans())
    def lock_acquire(self, name, holder, ttl_ms, with_id) -> None:
        args = {"name": name, "holder": holder, "ttl_ms": ttl_ms}
        self._run("lock.acquire", args, with_id, lambda i: self.model.lock_acquire(i, name, holder, ttl_ms))

    @rule(name=st.sampled_from(LOCK_NAMES), holder=st.sampled_from(HOLDERS), pick=st.integers(0, 5),
          with_id=st.booleans())
    def lock_release(self, name, holder, pick, with_id) -> None:
        name = self._live(name, pick, self.model.locks)
        if pick % 2 and name in self.model.locks:
            holder = self.model.locks[name][0]
        self._run("lock.release", {"name": name, "holder": holder}, with_id,
                  lambda i: self.model.lock_release(i, name, holder))

    @rule(name=st.sampled_from(LOCK_NAMES), mode=st.sampled_from(("current", "current", "old", "next")),
          pick=st.integers(0, 5), with_id=st.booleans())
    def lock_expire(self, name, mode, pick, with_id) -> None:
        name = self._live(name, pick, self.model.locks)
        held = self.model.locks.get(name)
        current = held[1] if held else 1
        old = self.model.old_tokens.get(name)
        token = {"current": current, "old": old[-1] if old else 0, "next": current + 1}[mode]
        self._run("lock.expire", {"name": name, "token": token}, with_id,
                  lambda i: self.model.lock_expire(i, name, token))

    # -- cluster ---------------------------------------------------------------------------

    @rule(op=st.sampled_from(("member.register", "member.register", "member.remove", "noop", "barrier")),
          node=st.sampled_from(MEMBERS), port=st.sampled_from((7101, 7102)), with_id=st.booleans())
    def cluster_op(self, op, node, port, with_id) -> None:
        if op == "member.register":
            raft, http = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1000}"
            self._run(op, {"id": node, "raft": raft, "http": http}, with_id,
                      lambda i: self.model.member_register(i, node, raft, http))
        elif op == "member.remove":
            self._run(op, {"id": node}, with_id, lambda i: self.model.member_remove(i, node))
        else:
            self._run(op, {}, with_id, lambda i: Expect(value={"index": i} if op == "barrier" else None))

    # -- refused commands, retries, snapshots ------------------------------------------------

    @rule(bad=st.sampled_from(INVALID), with_id=st.booleans(), version=st.sampled_from((1, 1, 1, 1, 2)))
    def invalid_args(self, bad, with_id, version) -> None:
        """Refused as ``invalid`` in every state; a command of another version too, however good its args."""
        op, args = ("kv.put", {"key": "a", "value": 1}) if version != 1 else bad
        result = self._run(op, args, with_id, lambda i: Expect(code="invalid"), version=version)
        assert result.events == () and result.changes == ()

    @precondition(lambda self: self.sent_with_id)
    @rule(data=st.data(), same_command=st.sampled_from((True, True, False)))
    def retry(self, data, same_command) -> None:
        """A used request_id answers the first result and applies nothing; the same
        id with another request (another digest) is a conflict naming request_id,
        and applies nothing either."""
        first_command, first = data.draw(st.sampled_from(self.sent_with_id))
        op, args = first_command.op, first_command.args
        if not same_command:
            op, args = "lock.acquire", {"name": "L1", "holder": "w1", "ttl_ms": 1_000}
        self.now_ms += 250
        command = Command(op=op, args=args, now_ms=self.now_ms, request_id=first_command.request_id,
                          request_digest=digest_of(op, args))
        before, snapshot_before = state_bytes(self.sm), self.sm.snapshot_data()
        result = self._apply(command)
        if command.request_digest == first_command.request_digest:
            assert (result.value, result.error) == (first.value, first.error)
        else:
            assert result.error is not None and result.error[0] == "conflict"
            assert result.error[1].startswith("request_id:")
        assert result.events == () and result.changes == ()
        assert state_bytes(self.sm) == before
        assert self.sm.snapshot_data()["dedupe"] == snapshot_before["dedupe"]

    @rule(gap=st.integers(min_value=-1, max_value=50))
    def index_edges(self, gap) -> None:
        """Indexes grow but need not be contiguous (entries of other kinds in the log);
        an index at or below applied_index is the caller's bug: refused, nothing changes."""
        if gap > 0 or self.sm.applied_index == 0:
            self.index += max(gap, 1)
            return
        back = -gap
        before = encode_snapshot(self.sm.snapshot_data())
        with pytest.raises(InvariantError):
            self.sm.apply(self.sm.applied_index - back, Command(op="kv.put", args={"key": "a", "value": 1},
                                                               now_ms=self.now_ms))
        assert encode_snapshot(self.sm.snapshot_data()) == before

    @rule(restart=st.booleans())
    def snapshot(self, restart) -> None:
        """Either fork a replica restored from a snapshot now, which must stay identical
        from here on, or replace the machine by one restored from its encoded snapshot,
        as a restarting node would."""
        if not restart and len(self.twins) < 3:
            self.twins.append(StateMachine.from_snapshot_data(self.sm.snapshot_data(), LIMITS))
            return
        blob = encode_snapshot(self.sm.snapshot_data())
        self.sm = StateMachine.from_snapshot_data(decode_snapshot(blob), LIMITS)
        assert encode_snapshot(self.sm.snapshot_data()) == blob

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def kv_matches_model(self) -> None:
        entries = {k: e.value for k, e in self.sm.kv.range("", 1_000)}
        assert same(entries, self.model.kv)
        assert {k: e.mod_revision for k, e in self.sm.kv.range("", 1_000)} == self.model.mod_rev
        assert len(self.sm.kv) == len(self.model.kv)

    @invariant()
    def revision_counts_successful_mutations(self) -> None:
        assert self.sm.kv.revision == self.model.revision == len(self.model.history)

    @invariant()
    def kv_history_keeps_the_last_changes(self) -> None:
        retained = [(c.revision, c.key, c.kind, c.value) for c in self.sm.kv.changes_since(0, "", 1_000)]
        assert retained == self.model.history[-KV_HISTORY:]
        assert self.sm.kv.compact_revision == max(0, self.model.revision - KV_HISTORY)

    @invariant()
    def agents_locks_members_match_model(self) -> None:
        agents = {a.id: {"lease": a.lease_id, "type": a.type, "ttl": a.ttl_ms, "health": a.health}
                  for a in self.sm.registry.agents.values()}
        assert agents == self.model.agents
        assert {n: (lk.holder, lk.token) for n, lk in self.sm.locks.locks.items()} == self.model.locks
        assert {n: lk.ttl_ms for n, lk in self.sm.locks.locks.items()} == self.model.lock_ttl
        assert {m.id: (m.raft, m.http) for m in self.sm.members.members.values()} == self.model.members

    @invariant()
    def events_keep_the_last_ones(self) -> None:
        last_seq = len(self.model.event_types)
        assert self.sm.events.last_seq == last_seq
        assert self.sm.events.first_seq == max(1, last_seq - RETAINED_EVENTS + 1)
        retained = self.sm.events.since(0, 1_000)
        assert [e.type for e in retained] == self.model.event_types[-RETAINED_EVENTS:]
        assert [e.seq for e in retained] == list(range(self.sm.events.first_seq, last_seq + 1))

    @invariant()
    def one_termination_per_lifetime(self) -> None:
        assert set(self.open_lifetime) == set(self.model.agents)
        assert all(count == 1 for count in self.terminations.values())
        assert len(self.terminations) + len(self.open_lifetime) == self.lifetimes

    @invariant()
    def restored_twins_stay_identical(self) -> None:
        blob = encode_snapshot(self.sm.snapshot_data())
        for twin in self.twins:
            assert encode_snapshot(twin.snapshot_data()) == blob

    def teardown(self) -> None:
        """Replay determinism: the whole log, fed to a fresh machine, and through the codec."""
        fresh = StateMachine(LIMITS)
        for index, command in self.log:
            fresh.apply(index, decode_command(encode_command(command)) if isinstance(command.args, dict)
                        else command)
        assert encode_snapshot(fresh.snapshot_data()) == encode_snapshot(self.sm.snapshot_data())


def _pair(events, wanted):
    """Pair each actual event with the expected event of its type and identity, for field selection."""
    remaining = list(wanted)
    for event in events:
        match = next((w for w in remaining if w["type"] == event.type
                      and all(event.data.get(k) == w.get(k) for k in ("name", "agentId", "id") if k in w)), None)
        if match is None:
            yield event, {"type": event.type, **event.data}
            continue
        remaining.remove(match)
        yield event, match


StateMachineRules.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStateMachine = StateMachineRules.TestCase


# -- replay determinism on arbitrary (mostly malformed) commands ---------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.sampled_from(("", "a", "L1", "w1", "x\x00")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(("lock", "token", "k")), inner,
                                                                max_size=3),
    max_leaves=8,
)
ARG_NAMES = ("key", "value", "expected", "expected_revision", "fence", "id", "type", "ttl_ms", "metadata",
             "endpoint", "weight", "lease_id", "health", "reason", "name", "holder", "token", "raft", "http")
GOOD_ARGS = {
    "key": st.sampled_from(KEYS), "value": json_values, "expected": json_values,
    "expected_revision": st.integers(0, 20), "id": st.sampled_from(AGENTS + MEMBERS), "type": st.sampled_from(TYPES),
    "ttl_ms": st.sampled_from(TTLS), "lease_id": st.integers(0, 60), "health": st.sampled_from(HEALTH),
    "name": st.sampled_from(LOCK_NAMES), "holder": st.sampled_from(HOLDERS), "token": st.integers(0, 60),
    "raft": st.just("127.0.0.1:1"), "http": st.just("127.0.0.1:2"),
    "fence": st.fixed_dictionaries({"lock": st.sampled_from(LOCK_NAMES), "token": st.integers(0, 60)}),
}
args_strategy = st.dictionaries(
    st.sampled_from(ARG_NAMES),
    st.one_of(json_values, st.sampled_from(ARG_NAMES).flatmap(lambda name: GOOD_ARGS.get(name, json_values))),
    max_size=6,
)
any_command = st.builds(
    Command,
    op=st.sampled_from(sorted(OPERATIONS)),
    args=args_strategy,
    now_ms=st.integers(0, 10**13),
    request_id=st.none() | st.sampled_from(("r1", "r2", "r3")),
)
well_formed_command = st.sampled_from(sorted(OPERATIONS)).flatmap(
    lambda op: st.builds(Command, op=st.just(op),
                         args=st.fixed_dictionaries({}, optional={n: s for n, s in GOOD_ARGS.items()}),
                         now_ms=st.integers(0, 10**13), request_id=st.none() | st.sampled_from(("r1", "r2")))
)


@settings(max_examples=150, deadline=None)
@given(st.lists(any_command | well_formed_command, max_size=40))
def test_replay_is_deterministic_and_apply_never_raises(commands: list[Command]) -> None:
    first, second = StateMachine(LIMITS), StateMachine(LIMITS)
    for index, command in enumerate(commands, start=1):
        before = state_bytes(first)
        result = first.apply(index, command)
        # The second replica gets what the log carries: the encoded entry.
        assert second.apply(index, decode_command(encode_command(command))) == result
        if not result.ok:
            assert result.error[0] in {"invalid", "conflict", "not_found", "unavailable"}
            assert state_bytes(first) == before, (command, result)
    assert encode_snapshot(first.snapshot_data()) == encode_snapshot(second.snapshot_data())
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(first.snapshot_data())), LIMITS)
    assert encode_snapshot(restored.snapshot_data()) == encode_snapshot(first.snapshot_data())


@settings(max_examples=100, deadline=None)
@given(st.lists(well_formed_command, max_size=30), st.lists(well_formed_command, max_size=30))
def test_snapshot_then_same_commands_gives_identical_snapshots(prefix: list[Command], suffix: list[Command]) -> None:
    original = StateMachine(LIMITS)
    for index, command in enumerate(prefix, start=1):
        original.apply(index, command)
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(original.snapshot_data())), LIMITS)
    for index, command in enumerate(suffix, start=len(prefix) + 1):
        assert restored.apply(index, command) == original.apply(index, command)
    assert encode_snapshot(restored.snapshot_data()) == encode_snapshot(original.snapshot_data())


# -- focused examples ---------------------------------------------------------------------------


class Driver:
    """Applies commands at growing indexes; ``last`` is the index of the last one."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.sm = StateMachine(limits)
        self.last = 0

    def __call__(self, op: str, request_id: str | None = None, **args: Any) -> Result:
        self.last += 1
        return self.sm.apply(self.last, Command(op=op, args=args, now_ms=1_000 * self.last, request_id=request_id))

    def ok(self, op: str, **args: Any) -> Any:
        result = self(op, **args)
        assert result.error is None, result.error
        return result.value

    def refused(self, code: str, op: str, **args: Any) -> Result:
        before = state_bytes(self.sm)
        result = self(op, **args)
        assert result.error is not None and result.error[0] == code, result
        assert result.events == () and result.changes == ()
        assert state_bytes(self.sm) == before
        return result

    def value(self, key: str) -> Any:
        entry = self.sm.kv.get(key)
        return None if entry is None else entry.value


@pytest.fixture
def drive() -> Driver:
    return Driver()


def test_cas_on_a_missing_key_compares_as_null(drive: Driver) -> None:
    drive.refused("conflict", "kv.cas", key="k", value=1, expected=False)
    drive.refused("conflict", "kv.cas", key="k", value=1, expected=0)
    drive.refused("conflict", "kv.cas", key="k", value=1, expected="")
    assert drive.ok("kv.cas", key="k", value=1, expected=None) == {"revision": 1}
    assert drive.value("k") == 1
    drive.refused("conflict", "kv.cas", key="k", value=2, expected=None)


def test_cas_on_a_stored_null_matches_null(drive: Driver) -> None:
    drive.ok("kv.put", key="k", value=None)
    assert drive.ok("kv.cas", key="k", value="set", expected=None) == {"revision": 2}


@pytest.mark.parametrize(("stored", "expected"), [
    (True, 1), (1, True), (False, 0), (0, False), ([True], [1]), ({"a": 1}, {"a": True}), ("1", 1), (None, False),
])
def test_cas_tells_json_values_apart_that_python_calls_equal(drive: Driver, stored: Any, expected: Any) -> None:
    drive.ok("kv.put", key="k", value=stored)
    drive.refused("conflict", "kv.cas", key="k", value="new", expected=expected)
    assert same(drive.value("k"), stored)
    assert drive.ok("kv.cas", key="k", value="new", expected=stored) == {"revision": 2}


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize("depth", [10, 120, 450, 1_000])
def test_cas_on_deeply_nested_values_never_raises(drive: Driver, depth: int) -> None:
    """apply never raises, however deep the values (the codec stops at 128
    levels, but apply must not depend on it; Python's recursion limit is 1000)."""
    put = Command(op="kv.put", args={"key": "k", "value": _nested(depth, True)}, now_ms=0)
    drive.sm.apply(1, decode_command(encode_command(put)) if depth < 127 else put)
    drive.last = 1
    drive.refused("conflict", "kv.cas", key="k", value=0, expected=_nested(depth, 1))
    drive.refused("conflict", "kv.cas", key="k", value=0, expected=_nested(depth - 1, True))
    assert drive.ok("kv.cas", key="k", value=0, expected=_nested(depth, True)) == {"revision": 2}


json_without_floats = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2) | st.sampled_from(("", "1", "a")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(("a", "b")), inner, max_size=2),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(json_without_floats, json_without_floats)
def test_cas_equality_is_equality_of_json_text(stored: Any, expected: Any) -> None:
    drive = Driver()
    drive.ok("kv.put", key="k", value=stored)
    result = drive("kv.cas", key="k", value="new", expected=expected)
    assert result.ok == same(stored, expected), (stored, expected, result.error)
    if not result.ok:
        drive.refused("conflict", "kv.cas", key="k", value="again", expected=look_alike(stored))


def test_cas_by_revision_zero_means_absent(drive: Driver) -> None:
    assert drive.ok("kv.cas", key="k", value="v1", expected_revision=0) == {"revision": 1}
    drive.refused("conflict", "kv.cas", key="k", value="v2", expected_revision=0)
    drive.ok("kv.delete", key="k")
    assert drive.ok("kv.cas", key="k", value="v3", expected_revision=0) == {"revision": 3}


def test_cas_by_revision_compares_the_keys_last_modification(drive: Driver) -> None:
    drive.ok("kv.put", key="k", value=1)  # revision 1
    drive.ok("kv.put", key="other", value=1)  # revision 2: the store moves, k does not
    drive.refused("conflict", "kv.cas", key="k", value=2, expected_revision=2)
    assert drive.ok("kv.cas", key="k", value=2, expected_revision=1) == {"revision": 3}
    drive.refused("conflict", "kv.cas", key="k", value=3, expected_revision=1)
    entry = drive.sm.kv.get("k")
    assert (entry.create_revision, entry.mod_revision, entry.version) == (1, 3, 2)


def test_cas_needs_exactly_one_expectation(drive: Driver) -> None:
    drive.refused("invalid", "kv.cas", key="k", value=1)
    drive.refused("invalid", "kv.cas", key="k", value=1, expected=None, expected_revision=0)


def test_fenced_write_needs_the_current_grant(drive: Driver) -> None:
    drive.refused("conflict", "kv.put", key="k", value=1, fence={"lock": "L", "token": 1})  # not held
    first = drive.ok("lock.acquire", name="L", holder="a", ttl_ms=1_000)["fencing_token"]
    drive.ok("kv.put", key="k", value="by-a", fence={"lock": "L", "token": first})
    drive.ok("lock.expire", name="L", token=first)
    second = drive.ok("lock.acquire", name="L", holder="b", ttl_ms=1_000)["fencing_token"]
    assert second > first
    # The old holder, paused past its expiry, is fenced off on every kind of write.
    drive.refused("conflict", "kv.put", key="k", value="late", fence={"lock": "L", "token": first})
    drive.refused("conflict", "kv.cas", key="k", value="late", expected="by-a", fence={"lock": "L", "token": first})
    drive.refused("conflict", "kv.delete", key="k", fence={"lock": "L", "token": first})
    drive.refused("conflict", "kv.put", key="k", value="ahead", fence={"lock": "L", "token": second + 1})
    drive.refused("conflict", "kv.put", key="k", value="other", fence={"lock": "M", "token": second})
    assert drive.value("k") == "by-a"
    drive.ok("kv.delete", key="k", fence={"lock": "L", "token": second})
    assert drive.value("k") is None


def test_lock_refresh_by_the_holder_keeps_the_token(drive: Driver) -> None:
    grant = drive.ok("lock.acquire", name="L", holder="a", ttl_ms=1_000)
    assert grant == {"fencing_token": 1, "refreshed": False}
    drive.ok("kv.put", key="x", value=1)
    result = drive("lock.acquire", name="L", holder="a", ttl_ms=9_000)
    assert result.value == {"fencing_token": 1, "refreshed": True}
    assert result.events == ()
    lock = drive.sm.locks.locks["L"]
    assert (lock.holder, lock.token, lock.ttl_ms) == ("a", 1, 9_000)
    drive.refused("conflict", "lock.acquire", name="L", holder="b", ttl_ms=1_000)
    drive.refused("conflict", "lock.release", name="L", holder="b")


def test_fencing_tokens_grow_across_grants(drive: Driver) -> None:
    tokens = []
    for holder in ("a", "b", "a", "c"):
        tokens.append(drive.ok("lock.acquire", name="L", holder=holder, ttl_ms=1_000)["fencing_token"])
        drive.ok("lock.release", name="L", holder=holder)
    assert tokens == sorted(set(tokens))


def test_expire_with_a_stale_lease_id_is_a_no_op(drive: Driver) -> None:
    old_lease = drive.ok("agent.register", id="w", type="t", ttl_ms=1_000)["lease_id"]
    new_lease = drive.ok("agent.register", id="w", type="t", ttl_ms=1_000)["lease_id"]
    assert new_lease > old_lease
    drive.ok("lock.acquire", name="L", holder="w", ttl_ms=1_000)
    before = state_bytes(drive.sm)
    result = drive("agent.expire", id="w", lease_id=old_lease)
    assert result.value == {"expired": False} and result.events == ()
    assert state_bytes(drive.sm) == before
    assert drive("agent.expire", id="ghost", lease_id=new_lease).value == {"expired": False}
    assert drive.ok("agent.expire", id="w", lease_id=new_lease) == {"expired": True}
    assert "w" not in drive.sm.registry.agents and "L" not in drive.sm.locks.locks


def test_lock_expire_with_a_stale_token_is_a_no_op(drive: Driver) -> None:
    first = drive.ok("lock.acquire", name="L", holder="a", ttl_ms=1_000)["fencing_token"]
    drive.ok("lock.release", name="L", holder="a")
    drive.ok("lock.acquire", name="L", holder="b", ttl_ms=1_000)
    before = state_bytes(drive.sm)
    assert drive.ok("lock.expire", name="L", token=first) == {"expired": False}
    assert state_bytes(drive.sm) == before
    assert drive.sm.locks.locks["L"].holder == "b"


@pytest.mark.parametrize("how", ["deregister", "expire"])
def test_leaving_agent_releases_its_locks_and_terminates_once(drive: Driver, how: str) -> None:
    lease = drive.ok("agent.register", id="w", type="t", ttl_ms=1_000)["lease_id"]
    drive.ok("lock.acquire", name="L1", holder="w", ttl_ms=1_000)
    drive.ok("lock.acquire", name="L2", holder="w", ttl_ms=1_000)
    drive.ok("lock.acquire", name="L3", holder="other", ttl_ms=1_000)
    if how == "deregister":
        result, reason = drive("agent.deregister", id="w"), "agent left"
    else:
        result, reason = drive("agent.expire", id="w", lease_id=lease), "agent expired"
    assert result.ok
    assert [e.type for e in result.events].count("agent.terminated") == 1
    released = sorted((e.data["name"], e.data["reason"]) for e in result.events if e.type == "lock.released")
    assert released == [("L1", reason), ("L2", reason)]
    assert set(drive.sm.locks.locks) == {"L3"}
    # Gone is gone: no second termination, whichever way it is asked.
    drive.refused("not_found", "agent.deregister", id="w")
    assert drive("agent.expire", id="w", lease_id=lease).events == ()
    terminated = [e for e in drive.sm.events.since(1, 100) if e.type == "agent.terminated"]
    assert len(terminated) == 1 and terminated[0].data["lease_id"] == lease


def test_events_retention_moves_first_seq() -> None:
    drive = Driver(Limits(events_retained=5))
    assert drive.sm.events.first_seq == 1 and drive.sm.events.since(1, 10) == []
    for i in range(7):
        drive.ok("lock.acquire", name=f"L{i}", holder="a", ttl_ms=1_000)
    events = drive.sm.events
    assert (events.first_seq, events.last_seq) == (3, 7)
    assert [e.seq for e in events.since(1, 100)] == [3, 4, 5, 6, 7]
    assert [e.seq for e in events.since(6, 100)] == [6, 7]
    assert [e.seq for e in events.since(3, 2)] == [3, 4]
    assert events.since(8, 100) == []
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(drive.sm.snapshot_data())),
                                               drive.sm.limits)
    assert (restored.events.first_seq, restored.events.last_seq) == (3, 7)


def test_kv_history_compaction() -> None:
    drive = Driver(Limits(kv_history=3))
    assert drive.sm.kv.compact_revision == 0
    for i in range(4):
        drive.ok("kv.put", key=f"k{i}", value=i)
    drive.ok("kv.delete", key="k0")
    kv = drive.sm.kv
    assert (kv.revision, kv.compact_revision) == (5, 2)
    assert [(c.revision, c.key, c.kind) for c in kv.changes_since(1, "", 100)] == [
        (3, "k2", "put"), (4, "k3", "put"), (5, "k0", "delete")]
    assert [c.revision for c in kv.changes_since(4, "", 100)] == [4, 5]
    assert [c.key for c in kv.changes_since(0, "k3", 100)] == ["k3"]
    assert kv.changes_since(6, "", 100) == []
    assert len(kv) == 3


def test_a_repeated_request_id_returns_the_first_result_without_applying(drive: Driver) -> None:
    first = drive("kv.put", request_id="r1", key="k", value=1)
    drive.ok("kv.put", key="k", value=2)
    again = drive("kv.put", request_id="r1", key="k", value=1)
    assert (again.value, again.error, again.events, again.changes) == (first.value, None, (), ())
    assert drive.value("k") == 2 and drive.sm.kv.revision == 2
    refused = drive("kv.delete", request_id="r2", key="missing")
    drive.ok("kv.put", key="missing", value=0)
    assert drive("kv.delete", request_id="r2", key="missing").error == refused.error
    assert drive.value("missing") == 0


def test_a_request_id_reused_for_another_request_is_a_conflict_and_applies_nothing() -> None:
    sm = StateMachine()
    put = Command("kv.put", {"key": "k", "value": 1}, 1_000, request_id="agent:a/r1",
                  request_digest=digest_of("kv.put", {"key": "k", "value": 1}))
    assert sm.apply(1, put).ok
    delete = Command("kv.delete", {"key": "k"}, 2_000, request_id="agent:a/r1",
                     request_digest=digest_of("kv.delete", {"key": "k"}))
    refused = sm.apply(2, delete)
    assert refused.error is not None and refused.error[0] == "conflict" and refused.error[1].startswith("request_id:")
    assert sm.kv.get("k") is not None and sm.kv.get("k").value == 1
    # Another principal's r1 is another key: applied.
    other = Command("kv.delete", {"key": "k"}, 3_000, request_id="agent:b/r1",
                    request_digest=digest_of("kv.delete", {"key": "k"}))
    assert sm.apply(3, other).ok and sm.kv.get("k") is None
    # Digests survive a snapshot: the restored replica refuses the same reuse.
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(sm.snapshot_data())))
    assert restored.apply(4, delete).error == refused.error


def test_committed_time_never_goes_back_and_moves_forward_by_a_bounded_step() -> None:
    sm = StateMachine()
    times = []
    for index, proposed in enumerate((10_000, 5_000, 12_000, 12_000 + 3_600_000, 0, 20_000), start=1):
        sm.apply(index, Command("noop", {}, proposed))
        times.append(sm.now_ms)
    assert times == [10_000, 10_000, 12_000, 12_000 + CLOCK_STEP_MAX_MS, 12_000 + CLOCK_STEP_MAX_MS,
                     12_000 + CLOCK_STEP_MAX_MS]
    # Committed time is what a TTL is measured by: a proposer an hour ahead expires nothing early.
    sm = StateMachine()
    sm.apply(1, Command("agent.register", {"id": "a", "type": "t", "ttl_ms": 600_000}, 1_000_000))
    sm.apply(2, Command("bus.tick", {}, 1_000_000 + 3_600_000))
    assert sm.now_ms == 1_000_000 + CLOCK_STEP_MAX_MS
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(sm.snapshot_data())))
    assert restored.now_ms == sm.now_ms
    restored.apply(3, Command("noop", {}, 0))
    assert restored.now_ms == sm.now_ms


def test_dedupe_forgets_the_oldest_ids_beyond_its_limit() -> None:
    drive = Driver(Limits(dedupe_entries=2))
    for rid in ("r1", "r2", "r3"):
        drive("kv.put", request_id=rid, key="k", value=rid)
    assert [row[0] for row in drive.sm.snapshot_data()["dedupe"]] == ["r2", "r3"]
    assert drive("kv.put", request_id="r1", key="k", value="r1").value == {"revision": 4}  # applied again
    assert drive("kv.put", request_id="r3", key="k", value="r3").value == {"revision": 3}  # remembered


def test_dedupe_is_bounded_in_bytes_too() -> None:
    drive = Driver(Limits(dedupe_bytes_max=1_000))
    for i in range(5):  # each first answer is about 400 bytes: only the newest two fit
        messages = [{"id": f"{i}-{n}-" + "m" * 100, "type": "event", "source": "s"} for n in range(2)]
        assert drive("bus.publish", request_id=f"r{i}", topic="t", messages=messages).ok
    kept = [row[0] for row in drive.sm.snapshot_data()["dedupe"]]
    assert kept == ["r3", "r4"] and drive.sm.dedupe_bytes <= 1_000
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(drive.sm.snapshot_data())),
                                               drive.sm.limits)
    assert restored.dedupe_bytes == drive.sm.dedupe_bytes


def test_full_registry_and_lock_table_refuse_new_entries_only() -> None:
    drive = Driver(Limits(agents_max=1, locks_max=1))
    drive.ok("agent.register", id="a", type="t", ttl_ms=1_000)
    drive.refused("unavailable", "agent.register", id="b", type="t", ttl_ms=1_000)
    drive.ok("agent.register", id="a", type="t2", ttl_ms=2_000)  # an update is not a new entry
    drive.ok("lock.acquire", name="L", holder="a", ttl_ms=1_000)
    drive.refused("unavailable", "lock.acquire", name="M", holder="a", ttl_ms=1_000)
    assert drive.ok("lock.acquire", name="L", holder="a", ttl_ms=1_000)["refreshed"] is True


def test_reregistration_keeps_health_and_birth_but_renews_the_lease(drive: Driver) -> None:
    first = drive.ok("agent.register", id="w", type="t", ttl_ms=1_000, metadata={"v": 1})
    drive.ok("agent.health", id="w", health="healthy")
    result = drive("agent.register", id="w", type="t", ttl_ms=2_000, metadata={"v": 2})
    assert [e.type for e in result.events] == ["agent.updated"]
    agent = drive.sm.registry.agents["w"]
    assert agent.health == "healthy" and agent.registered_ms == 1_000
    assert agent.lease_id == result.value["lease_id"] > first["lease_id"]
    assert (agent.ttl_ms, agent.metadata) == (2_000, {"v": 2})


def test_health_change_to_the_same_state_emits_nothing(drive: Driver) -> None:
    drive.ok("agent.register", id="w", type="t", ttl_ms=1_000)
    assert drive("agent.health", id="w", health="unknown").events == ()
    result = drive("agent.health", id="w", health="unhealthy", reason="probe failed")
    assert [(e.type, e.data["from"], e.data["to"]) for e in result.events] == [
        ("agent.health.changed", "unknown", "unhealthy")]
    drive.refused("not_found", "agent.health", id="ghost", health="healthy")


def test_apply_refuses_an_index_that_does_not_grow(drive: Driver) -> None:
    drive.ok("kv.put", key="k", value=1)
    before = encode_snapshot(drive.sm.snapshot_data())
    for index in (drive.last, drive.last - 1):
        with pytest.raises(InvariantError):
            drive.sm.apply(index, Command(op="kv.put", args={"key": "k", "value": 2}, now_ms=0))
    assert encode_snapshot(drive.sm.snapshot_data()) == before


def test_barrier_answers_its_index_and_changes_nothing(drive: Driver) -> None:
    drive.ok("kv.put", key="k", value=1)
    before = state_bytes(drive.sm)
    assert drive.ok("barrier") == {"index": drive.last}
    assert drive.ok("noop") is None
    assert state_bytes(drive.sm) == before


# -- the reads the services serve from the state: range, changes_since, since -------------------

READ_KEYS = ("", "a", "a/", "a/b", "a/c", "ab", "b", "b/a", "c")
kv_ops = st.lists(st.tuples(st.sampled_from(("put", "put", "delete")), st.sampled_from(READ_KEYS[1:])), max_size=30)


@settings(max_examples=150, deadline=None)
@given(ops=kv_ops, history=st.integers(0, 6), prefix=st.sampled_from(READ_KEYS),
       start_after=st.none() | st.sampled_from(READ_KEYS[1:]), limit=st.integers(0, 5),
       since=st.integers(-1, 35))
def test_kv_reads_match_a_list_model(ops, history, prefix, start_after, limit, since) -> None:
    drive = Driver(Limits(kv_history=history))
    live: dict[str, int] = {}
    changes: list[tuple[int, str, str]] = []
    for kind, key in ops:
        if kind == "put":
            drive.ok("kv.put", key=key, value=len(changes))
            live[key] = len(changes)
        elif key in live:
            drive.ok("kv.delete", key=key)
            del live[key]
        else:
            continue
        changes.append((len(changes) + 1, key, kind))
    kv = drive.sm.kv
    wanted = [k for k in sorted(live) if k.startswith(prefix) and (start_after is None or k > start_after)]
    assert [k for k, _ in kv.range(prefix, limit, start_after)] == wanted[:limit]
    retained = changes[max(0, len(changes) - history):] if history else []
    assert kv.compact_revision == len(changes) - len(retained)
    wanted_changes = [c for c in retained if c[0] >= since and c[1].startswith(prefix)][:limit]
    assert [(c.revision, c.key, c.kind) for c in kv.changes_since(since, prefix, limit)] == wanted_changes


@settings(max_examples=100, deadline=None)
@given(count=st.integers(0, 12), retained=st.integers(1, 5), since=st.integers(-1, 14), limit=st.integers(0, 6))
def test_event_reads_match_a_list_model(count, retained, since, limit) -> None:
    drive = Driver(Limits(events_retained=retained))
    for i in range(count):
        drive.ok("member.register", id=f"n{i}", raft=f"h:{i}", http=f"h:{i + 100}")
    kept = list(range(1, count + 1))[-retained:]
    events = drive.sm.events
    assert events.first_seq == (kept[0] if kept else count + 1)
    assert [e.seq for e in events.since(since, limit)] == [s for s in kept if s >= since][:limit]
