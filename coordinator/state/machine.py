"""The replicated state machine: ``apply(index, command) -> Result``.

Deterministic: the same commands in the same order give the same state and
the same snapshot data on every replica. Commands that the state refuses
(a CAS that does not match, a lock held by another) are still log entries;
they produce ``Result.error`` and change nothing.

Ownership: one instance per node, touched only by the event loop thread
(``services.applier`` feeds it in log order).

Dispatch: every operation has a typed command (``coordinator.commands.COMMANDS``).
``apply`` parses the entry's args into that type (the same parse the API
ran before proposing; a refusal is ``Result.error``, as from a handler) and
calls the handler registered for the command's type. The bytes in the log
are untrusted: the parse runs on every replica.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.commands import COMMANDS
from coordinator.commands.access import AccessUnpin, RoleDelete, RoleGrant, RolePut, SecurityConfigure
from coordinator.commands.agents import (
    AgentAlive,
    AgentDeregister,
    AgentExpire,
    AgentHealth,
    AgentRegister,
    AgentSuspect,
    AgentUpdate,
)
from coordinator.commands.balancer import ServiceConfigure, ServiceRemove
from coordinator.commands.base import DomainCommand
from coordinator.commands.bus import (
    BusAck,
    BusBind,
    BusCursor,
    BusDeliver,
    BusDlqPurge,
    BusDlqRedrive,
    BusGroupDelete,
    BusNack,
    BusPublish,
    BusSubscribe,
    BusTick,
    BusTopicConfigure,
    BusTransportAck,
    BusTransportCheckpoint,
    BusTransportConfigure,
    BusUnbind,
    BusUnsubscribe,
)
from coordinator.commands.cluster import Barrier, MemberRegister, MemberRemove, Noop, SystemReport
from coordinator.commands.eventstore import EsAppend, EsDelete, EsSnapshot, category_of
from coordinator.commands.kv import Fence, KvCas, KvDelete, KvPut
from coordinator.commands.locks import LockAcquire, LockExpire, LockRelease
from coordinator.commands.messages import normalize
from coordinator.commands.projections import ProjectionDelete, ProjectionPut, ProjectionRebuild
from coordinator.commands.sagas import SagaCancel, SagaOutcome, SagaResumed, SagaRetry, SagaStart
from coordinator.commands.streams import ProcessorDelete, ProcessorPut, StreamsTick
from coordinator.commands.topics import matches
from coordinator.errors import InvariantError
from coordinator.state.access import Access
from coordinator.state.balancing import Policies
from coordinator.state.base import (
    ApplyContext,
    Rejected,
    approx_size,
    invalid,
    json_equal,
    over_quota,
    too_large,
)
from coordinator.state.bus import RESERVED_PREFIXES, Bus, BusLimits, check_publishable
from coordinator.state.events import EventLog
from coordinator.state.eventstore import EventStore, EventStoreLimits, StoredEvent
from coordinator.state.kv import KvStore, entry_size
from coordinator.state.locks import Lock, Locks
from coordinator.state.projections import Folded, ProjectionLimits, Projections
from coordinator.state.registry import Agent, Member, Members, Registry, agent_size
from coordinator.state.sagas import SagaLimits, Sagas
from coordinator.state.streams import Emission, StreamLimits, Streams
from coordinator.state.transforms import Outcome, TransformDelete, TransformPut, Transforms
from coordinator.types import COMMAND_VERSION, Command, Event, Result, build_result

SNAPSHOT_VERSION = 1
# The most committed time may move forward in one entry. A proposer whose
# clock is far ahead (set to next year, an hour off) cannot expire every TTL,
# close every window and prune every dedupe entry at once; after a long idle
# gap, committed time catches up by this much per entry (the leader's timers
# propose again while their deadline is still ahead in committed time).
CLOCK_STEP_MAX_MS = 300_000


@dataclass(frozen=True, slots=True)
class Limits:
    """What the replicated state may hold. Byte limits count ``approx_size``
    (about the JSON size) and are the same on every replica: what a caller
    can make every replica hold is bounded by them."""

    events_retained: int = 10_000
    events_bytes_max: int = 32 << 20  # the cluster's event history (/v1/events) is trimmed to it
    kv_history: int = 10_000
    dedupe_entries: int = 20_000
    dedupe_bytes_max: int = 32 << 20  # the first results kept for retries; the oldest go first
    agents_max: int = 100_000
    locks_max: int = 100_000
    kv_bytes_max: int = 256 << 20  # keys and values of the live entries
    kv_value_bytes_max: int = 1 << 20  # one key and its value (a request body is at most 1 MiB too)
    kv_history_bytes_max: int = 64 << 20  # the change history (watches) is trimmed to it
    agent_metadata_bytes_max: int = 16 << 10  # one agent's metadata
    registry_bytes_max: int = 128 << 20  # every agent's record
    # Everything one agent stored and that stays until deleted, acked or
    # expired: key/value entries it wrote last, bus messages it published,
    # events it appended. Admin and anonymous callers are held by the stores' limits only.
    principal_bytes_max: int = 64 << 20
    bus: BusLimits = field(default_factory=BusLimits)
    sagas: SagaLimits = field(default_factory=SagaLimits)
    eventstore: EventStoreLimits = field(default_factory=EventStoreLimits)
    projections: ProjectionLimits = field(default_factory=ProjectionLimits)
    streams: StreamLimits = field(default_factory=StreamLimits)


# A handler takes the parsed command of the type it is registered for.
Handler = Callable[["StateMachine", ApplyContext, Any], Any]
_HANDLERS: dict[type[DomainCommand], Handler] = {}
_TYPE_OF: dict[str, type[DomainCommand]] = dict(COMMANDS)  # op -> its command type (a plain dict: the hot path)


def _handles(command_type: type[DomainCommand]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[command_type] = fn
        return fn

    return register


class StateMachine:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.applied_index = 0
        self.kv = KvStore(self.limits.kv_history, self.limits.kv_history_bytes_max)
        self.registry = Registry()
        self.locks = Locks()
        self.members = Members()
        self.events = EventLog(self.limits.events_retained, self.limits.events_bytes_max)
        self.bus = Bus(self.limits.bus)
        self.sagas = Sagas(self.limits.sagas)
        self.policies = Policies()
        self.access = Access()
        self.store = EventStore(self.limits.eventstore)
        self.projections = Projections(self.limits.projections)
        self.transforms = Transforms()
        self.streams = Streams(self.limits.streams)
        self.now_ms = 0  # committed time: the highest time any applied entry was given
        self._dedupe: OrderedDict[str, tuple[Any, tuple[str, str] | None, str | None]] = OrderedDict()
        self._dedupe_sizes: dict[str, int] = {}
        self.dedupe_bytes = 0

    # -- applying ---------------------------------------------------------

    def apply(self, index: int, command: Command) -> Result:
        """Apply one committed command at log ``index``.

        Indexes must grow; an index at or below ``applied_index`` is a bug of
        the caller (``InvariantError``). Never raises for a bad command.

        The command's time is its proposer's clock; what the entry is given is
        committed time (``committed_now``): never below what an earlier entry
        was given, and never more than ``CLOCK_STEP_MAX_MS`` past it.

        A repeated ``request_id`` is answered with the first result when its
        ``request_digest`` matches the first one's, and refused (``conflict``,
        naming request_id) when the same id was used for something else.
        """
        if index <= self.applied_index:
            raise InvariantError(f"apply index {index} after {self.applied_index}")
        self.applied_index = index
        proposed_ms = command.now_ms
        if not self.now_ms <= proposed_ms <= self.now_ms + CLOCK_STEP_MAX_MS:  # else committed_now gives it
            proposed_ms = committed_now(self.now_ms, proposed_ms)
        self.now_ms = proposed_ms
        request_id = command.request_id
        if request_id is not None and request_id in self._dedupe:
            value, error, digest = self._dedupe[request_id]
            if digest != command.request_digest:
                return Result(index=index, error=("conflict", "request_id: already used for a different request "
                                                              "(a retry must repeat the same request)"))
            return Result(index=index, value=value, error=error)
        ctx = ApplyContext(index, self.now_ms, command.principal)
        value: Any = None
        error: tuple[str, str] | None = None
        command_type = _TYPE_OF.get(command.op)
        try:
            if command.version != COMMAND_VERSION:
                raise invalid("version", f"unsupported command version {command.version}")
            if command_type is None:
                raise invalid("op", f"unknown operation {command.op!r}")
            if not isinstance(command.args, dict):
                raise invalid("args", "must be an object")
            value = _HANDLERS[command_type](self, ctx, command_type.parse(command.args))
            if self.streams.items:
                self._run_streams(ctx)
            if ctx.events:
                self.bus.publish_events(ctx, ctx.events)
                if self.projections.has_topic_sources():
                    for event in ctx.events:
                        self.projections.feed_topic(_folded_event(event))
        except Rejected as rejected:
            error = (rejected.code, rejected.message)
            if ctx.events or ctx.changes:
                raise InvariantError(f"{command.op} changed state and then rejected") from rejected
        if request_id is not None:
            self._remember(request_id, (value, error, command.request_digest))
        return build_result(index, value, error, tuple(ctx.events), tuple(ctx.changes))

    def _remember(self, request_id: str, answer: tuple[Any, tuple[str, str] | None, str | None]) -> None:
        """Keep a request's first answer for its retries, within
        ``dedupe_entries`` and ``dedupe_bytes_max`` (the oldest go first)."""
        size = len(request_id) + approx_size(answer[0]) + 64
        self._dedupe[request_id] = answer
        self._dedupe_sizes[request_id] = size
        self.dedupe_bytes += size
        while len(self._dedupe) > self.limits.dedupe_entries or (self.dedupe_bytes > self.limits.dedupe_bytes_max
                                                                 and len(self._dedupe) > 1):
            old, _ = self._dedupe.popitem(last=False)
            self.dedupe_bytes -= self._dedupe_sizes.pop(old)

    def _run_streams(self, ctx: ApplyContext) -> None:
        """After a command: its cluster events into the stream processors, the
        windows and deadlines its time closed, then what they emitted."""
        for event in ctx.events:
            ctx.derived += self.streams.feed("topic", event.type, _folded_event(event))
        ctx.derived += self.streams.advance(ctx.now_ms)
        for n, emission in enumerate(ctx.derived):
            self._emit_derived(ctx, n, emission)
        ctx.derived.clear()

    def _emit_derived(self, ctx: ApplyContext, n: int, emission: Emission) -> None:
        processor = self.streams.items.get(emission.processor)
        if emission.topic is not None:
            message = normalize({"id": f"{emission.processor}:{ctx.index}:{n}", "type": "event",
                                 "source": "coordinator.streams", "headers": {"processor": emission.processor},
                                 "payload": emission.payload}, ctx.now_ms)
            try:
                check_publishable(emission.topic, message, lambda agent: agent in self.registry.agents)
                if emission.topic not in self.bus.topics and len(self.bus.topics) >= self.bus.limits.topics_max:
                    raise Rejected("unavailable", "too many topics")
                if not self.bus.room_for(1, approx_size(message)):
                    raise Rejected("unavailable", "the bus is full")
            except Rejected:
                if processor is not None:
                    processor.counters["dropped"] += 1
            else:
                self.bus.publish(ctx, emission.topic, [message])
                if self.projections.has_topic_sources():
                    self.projections.feed_topic(Folded(emission.topic, message["payload"], ctx.now_ms, ctx.index))
        if emission.health is not None and emission.agent is not None:
            agent = self.registry.agents.get(emission.agent)
            if agent is not None and agent.health != emission.health:
                set_health(self, ctx, agent, emission.health, f"stream processor {emission.processor!r}")

    # -- snapshots ----------------------------------------------------------

    def snapshot_data(self) -> dict[str, Any]:
        """The whole state as plain data (the codec turns it into bytes)."""
        return {
            "v": SNAPSHOT_VERSION,
            "applied_index": self.applied_index,
            "kv": self.kv.to_data(),
            "agents": self.registry.to_data(),
            "locks": self.locks.to_data(),
            "members": self.members.to_data(),
            "events": self.events.to_data(),
            "bus": self.bus.to_data(),
            "sagas": self.sagas.to_data(),
            "policies": self.policies.to_data(),
            "access": self.access.to_data(),
            "eventstore": self.store.to_data(),
            "projections": self.projections.to_data(),
            "transforms": self.transforms.to_data(),
            "streams": self.streams.to_data(),
            "now_ms": self.now_ms,
            "dedupe": [[k, v, list(e) if e else None, d] for k, (v, e, d) in self._dedupe.items()],
        }

    @classmethod
    def from_snapshot_data(cls, data: dict[str, Any], limits: Limits | None = None) -> StateMachine:
        if data.get("v") != SNAPSHOT_VERSION:
            raise InvariantError(f"unsupported snapshot version {data.get('v')!r}")
        machine = cls(limits)
        machine.applied_index = data["applied_index"]
        machine.kv = KvStore.from_data(data["kv"], machine.limits.kv_history, machine.limits.kv_history_bytes_max)
        machine.registry = Registry.from_data(data["agents"])
        machine.locks = Locks.from_data(data["locks"])
        machine.members = Members.from_data(data["members"])
        machine.events = EventLog.from_data(data["events"], machine.limits.events_retained,
                                            machine.limits.events_bytes_max)
        machine.bus = Bus.from_data(data["bus"], machine.limits.bus)
        if "sagas" in data:  # snapshots written before sagas existed have none
            machine.sagas = Sagas.from_data(data["sagas"], machine.limits.sagas)
        if "policies" in data:  # nor before balancing policies
            machine.policies = Policies.from_data(data["policies"])
        if "access" in data:  # nor before access control
            machine.access = Access.from_data(data["access"])
        if "eventstore" in data:  # nor before the event store
            machine.store = EventStore.from_data(data["eventstore"], machine.limits.eventstore)
            machine.projections = Projections.from_data(data["projections"], machine.limits.projections)
        if "transforms" in data:  # nor before transforms
            machine.transforms = Transforms.from_data(data["transforms"])
        if "streams" in data:  # nor before stream processors
            machine.streams = Streams.from_data(data["streams"], machine.limits.streams)
        # Snapshots written before committed time or request digests had neither.
        machine.now_ms = data.get("now_ms", 0)
        for row in data["dedupe"]:
            machine._remember(row[0], (row[1], tuple(row[2]) if row[2] else None, row[3] if len(row) > 3 else None))
        return machine

    # -- shared checks -------------------------------------------------------

    def projection_source(self, definition: dict[str, Any]) -> list[Folded]:
        """What a projection's source still retains, in the order it was applied."""
        category = definition["source"].get("category")
        if category is not None:
            return [_folded_stored(e) for e in self.store.category_since(category, 0, self.store.events_count)]
        pattern = definition["source"]["topic"]
        keyed: list[tuple[tuple[int, int, int], Folded]] = []
        for name, topic in self.bus.topics.items():
            if name.startswith(RESERVED_PREFIXES) or not matches(pattern, name):
                continue  # the cluster's own events come from the event log below, once
            for offset in topic.log:
                body = self.bus.bodies[(name, offset)]
                if body.message["type"] == "event" and not _from_event_log(body.message):
                    keyed.append(((body.index, 0, offset), Folded(name, body.message["payload"], body.publish_ms,
                                                                  body.index)))
        for event in self.events.since(self.events.first_seq, self.limits.events_retained):
            if matches(pattern, event.type):
                keyed.append(((event.index, 1, event.seq), _folded_event(event)))
        keyed.sort(key=lambda pair: pair[0])
        return [folded for _, folded in keyed]

    def principal_bytes(self, principal: str) -> int:
        """What ``principal`` holds in the stores that charge it."""
        return self.kv.owned.get(principal, 0) + self.bus.owned.get(principal, 0) + self.store.owned.get(principal, 0)

    def check_principal_bytes(self, principal: str | None, adding: int, releasing: int = 0) -> None:
        """Refuse (507) a command that would take an agent over
        ``principal_bytes_max``; ``releasing`` is what it frees of its own."""
        if principal is None or not principal.startswith("agent:") or adding <= releasing:
            return
        held = self.principal_bytes(principal)
        limit = self.limits.principal_bytes_max
        if held - releasing + adding > limit:
            raise over_quota("principal_bytes_max", f"{principal} holds about {held} bytes and this adds "
                                                     f"{adding - releasing}, over {limit}; delete keys, ack "
                                                     "messages or truncate streams first")

    def check_kv_put(self, principal: str | None, key: str, value: Any) -> int:
        """The size of the entry a put would store, after checking it fits."""
        size = entry_size(key, value)
        if size > self.limits.kv_value_bytes_max:
            raise too_large("value", size, "kv_value_bytes_max", self.limits.kv_value_bytes_max)
        old = self.kv.get(key)
        old_size = old.size if old is not None else 0
        if self.kv.bytes - old_size + size > self.limits.kv_bytes_max and size > old_size:
            raise over_quota("kv_bytes_max", f"the key/value store holds about {self.kv.bytes} bytes and this "
                                              f"adds {size - old_size}, over {self.limits.kv_bytes_max}")
        self.check_principal_bytes(principal, size, old_size if old is not None and old.owner == principal else 0)
        return size

    def check_agent_record(self, agent: Agent, old: Agent | None) -> None:
        """Refuse an agent record whose metadata is too large, or that would
        take the registry over ``registry_bytes_max``."""
        size = approx_size(agent.metadata)
        if size > self.limits.agent_metadata_bytes_max:
            raise too_large("metadata", size, "agent_metadata_bytes_max", self.limits.agent_metadata_bytes_max)
        grows = agent_size(agent) - (agent_size(old) if old is not None else 0)
        if grows > 0 and self.registry.bytes + grows > self.limits.registry_bytes_max:
            raise over_quota("registry_bytes_max", f"the registry holds about {self.registry.bytes} bytes, "
                                                    f"over {self.limits.registry_bytes_max} with this agent")

    def check_fence(self, fence: Fence) -> None:
        """Refuse a write whose fence is not the current grant of its lock."""
        lock = self.locks.locks.get(fence.lock)
        if lock is None:
            raise Rejected("conflict", f"fence: lock {fence.lock!r} is not held")
        if fence.token != lock.token:
            raise Rejected("conflict", f"fence: token {fence.token} is not the current grant {lock.token} "
                                       f"of lock {fence.lock!r}")

    def release_locks_of(self, ctx: ApplyContext, holder: str, reason: str) -> None:
        for lock in self.locks.held_by(holder):
            self.locks.remove(lock.name)
            self.events.emit(ctx, "lock.released", {"name": lock.name, "holder": holder,
                                                    "fencing_token": lock.token, "reason": reason})


# -- cluster -------------------------------------------------------------------

@_handles(Noop)
def _noop(sm: StateMachine, ctx: ApplyContext, cmd: Noop) -> Any:
    return None


@_handles(Barrier)
def _barrier(sm: StateMachine, ctx: ApplyContext, cmd: Barrier) -> Any:
    return {"index": ctx.index}


@_handles(MemberRegister)
def _member_register(sm: StateMachine, ctx: ApplyContext, cmd: MemberRegister) -> Any:
    old = sm.members.members.get(cmd.id)
    if old is not None and old.raft == cmd.raft and old.http == cmd.http:
        return old.describe()
    member = Member(cmd.id, cmd.raft, cmd.http)
    sm.members.members[cmd.id] = member
    sm.events.emit(ctx, "system.member.joined" if old is None else "system.member.updated", member.describe())
    return member.describe()


@_handles(MemberRemove)
def _member_remove(sm: StateMachine, ctx: ApplyContext, cmd: MemberRemove) -> Any:
    member = sm.members.members.pop(cmd.id, None)
    if member is None:
        raise Rejected("not_found", f"member {cmd.id!r} is not known")
    sm.events.emit(ctx, "system.member.left", member.describe())
    return member.describe()


# -- key/value -------------------------------------------------------------------

@_handles(KvPut)
def _kv_put(sm: StateMachine, ctx: ApplyContext, cmd: KvPut) -> Any:
    if cmd.fence is not None:
        sm.check_fence(cmd.fence)
    size = sm.check_kv_put(ctx.principal, cmd.key, cmd.value)
    return {"revision": sm.kv.put(ctx, cmd.key, cmd.value, size)}


@_handles(KvCas)
def _kv_cas(sm: StateMachine, ctx: ApplyContext, cmd: KvCas) -> Any:
    """Compare-and-set on the value (``expected``; a missing key compares as
    null) or on the revision (``expected_revision``; 0 means absent)."""
    if cmd.fence is not None:
        sm.check_fence(cmd.fence)
    entry = sm.kv.get(cmd.key)
    if cmd.expected_revision is None:
        current = entry.value if entry is not None else None
        if not json_equal(current, cmd.expected):
            raise Rejected("conflict", f"key {cmd.key!r}: current value is not the expected value")
    else:
        current_revision = entry.mod_revision if entry is not None else 0
        if current_revision != cmd.expected_revision:
            raise Rejected("conflict", f"key {cmd.key!r}: revision is {current_revision}, "
                                       f"not {cmd.expected_revision}")
    size = sm.check_kv_put(ctx.principal, cmd.key, cmd.value)
    return {"revision": sm.kv.put(ctx, cmd.key, cmd.value, size)}


@_handles(KvDelete)
def _kv_delete(sm: StateMachine, ctx: ApplyContext, cmd: KvDelete) -> Any:
    if cmd.fence is not None:
        sm.check_fence(cmd.fence)
    if sm.kv.get(cmd.key) is None:
        raise Rejected("not_found", f"key {cmd.key!r} does not exist")
    return {"revision": sm.kv.delete(ctx, cmd.key)}


# -- agents --------------------------------------------------------------------------

@_handles(AgentRegister)
def _agent_register(sm: StateMachine, ctx: ApplyContext, cmd: AgentRegister) -> Any:
    agent_id = cmd.id
    old = sm.registry.agents.get(agent_id)
    if old is None and len(sm.registry.agents) >= sm.limits.agents_max:
        raise Rejected("unavailable", f"the registry is full ({sm.limits.agents_max} agents)")
    public_key = cmd.public_key if cmd.public_key is not None else (old.public_key if old else None)
    agent = Agent(agent_id, cmd.type, cmd.metadata, cmd.ttl_ms, cmd.endpoint, cmd.weight or 1,
                  lease_id=ctx.index, health="unknown" if old is None else old.health,
                  registered_ms=ctx.now_ms if old is None else old.registered_ms, public_key=public_key)
    sm.check_agent_record(agent, old)
    sm.registry.put(agent)
    if agent.public_key is not None:
        sm.access.pin(agent_id, agent.public_key, sm.registry.agents)
    event = "agent.spawned" if old is None else "agent.updated"
    sm.events.emit(ctx, event, {"agentId": agent_id, "agentType": cmd.type, "metadata": cmd.metadata,
                                "lease_id": agent.lease_id})
    return {"id": agent_id, "lease_id": agent.lease_id, "ttl_s": cmd.ttl_ms / 1000}


def _remove_agent(sm: StateMachine, ctx: ApplyContext, agent: Agent, reason: str) -> None:
    sm.registry.remove(agent.id)
    sm.events.emit(ctx, "agent.terminated", {"agentId": agent.id, "agentType": agent.type,
                                             "metadata": agent.metadata, "reason": reason,
                                             "lease_id": agent.lease_id})
    sm.release_locks_of(ctx, agent.id, f"agent {reason}")
    sm.bus.drop_agent(agent.id)


def _registered(sm: StateMachine, agent_id: str) -> Agent:
    agent = sm.registry.agents.get(agent_id)
    if agent is None:
        raise Rejected("not_found", f"agent {agent_id!r} is not registered")
    return agent


@_handles(AgentDeregister)
def _agent_deregister(sm: StateMachine, ctx: ApplyContext, cmd: AgentDeregister) -> Any:
    _remove_agent(sm, ctx, _registered(sm, cmd.id), "left")
    return {"id": cmd.id}


@_handles(AgentUpdate)
def _agent_update(sm: StateMachine, ctx: ApplyContext, cmd: AgentUpdate) -> Any:
    """Change an agent's weight, endpoint or metadata, keeping its lease."""
    agent = _registered(sm, cmd.id)
    changed = replace(agent, weight=cmd.weight if cmd.weight is not None else agent.weight,
                      endpoint=cmd.endpoint if cmd.endpoint is not None else agent.endpoint,
                      metadata=cmd.metadata if cmd.metadata is not None else agent.metadata)
    sm.check_agent_record(changed, agent)
    sm.registry.put(changed)
    agent = changed
    sm.events.emit(ctx, "agent.updated", {"agentId": cmd.id, "agentType": agent.type, "metadata": agent.metadata,
                                          "lease_id": agent.lease_id, "weight": agent.weight})
    return agent.describe()


@_handles(AgentExpire)
def _agent_expire(sm: StateMachine, ctx: ApplyContext, cmd: AgentExpire) -> Any:
    """Proposed by the leader when a lease ran out. Names the lease, so an
    expiry decided before a re-registration cannot remove the new lease."""
    agent = sm.registry.agents.get(cmd.id)
    if agent is None or agent.lease_id != cmd.lease_id:
        return {"expired": False}
    _remove_agent(sm, ctx, agent, "expired")
    return {"expired": True}


@_handles(AgentSuspect)
def _agent_suspect(sm: StateMachine, ctx: ApplyContext, cmd: AgentSuspect) -> Any:
    """The leader's detector suspects the lease ``lease_id`` (a verdict about
    another lease, or about an agent already suspected, changes nothing)."""
    return _set_liveness(sm, ctx, cmd.id, cmd.lease_id, "suspect", "agent.suspected")


@_handles(AgentAlive)
def _agent_alive(sm: StateMachine, ctx: ApplyContext, cmd: AgentAlive) -> Any:
    """A suspected lease was heard again."""
    return _set_liveness(sm, ctx, cmd.id, cmd.lease_id, "alive", "agent.recovered")


def _set_liveness(sm: StateMachine, ctx: ApplyContext, agent_id: str, lease_id: int, liveness: str,
                  event: str) -> Any:
    agent = sm.registry.agents.get(agent_id)
    if agent is None or agent.lease_id != lease_id or agent.liveness == liveness:
        return {"changed": False}
    agent.liveness = liveness
    sm.events.emit(ctx, event, {"agentId": agent.id, "agentType": agent.type, "lease_id": agent.lease_id})
    return {"changed": True, "liveness": liveness}


@_handles(AgentHealth)
def _agent_health(sm: StateMachine, ctx: ApplyContext, cmd: AgentHealth) -> Any:
    agent = _registered(sm, cmd.id)
    if agent.health == cmd.health:
        return {"changed": False, "health": cmd.health}
    set_health(sm, ctx, agent, cmd.health, cmd.reason)
    return {"changed": True, "health": cmd.health}


def set_health(sm: StateMachine, ctx: ApplyContext, agent: Agent, health: str, reason: str | None) -> None:
    previous, agent.health = agent.health, health
    sm.events.emit(ctx, "agent.health.changed", {"agentId": agent.id, "agentType": agent.type,
                                                 "from": previous, "to": health, "reason": reason})


# -- locks -----------------------------------------------------------------------------

@_handles(LockAcquire)
def _lock_acquire(sm: StateMachine, ctx: ApplyContext, cmd: LockAcquire) -> Any:
    """Grant a free lock, or refresh it for its holder (same token)."""
    name, holder = cmd.name, cmd.holder
    lock = sm.locks.locks.get(name)
    if lock is not None:
        if lock.holder != holder:
            raise Rejected("conflict", f"lock {name!r} is held by {lock.holder!r}")
        lock.ttl_ms = cmd.ttl_ms
        return {"fencing_token": lock.token, "refreshed": True}
    if len(sm.locks.locks) >= sm.limits.locks_max:
        raise Rejected("unavailable", f"too many locks ({sm.limits.locks_max})")
    lock = Lock(name, holder, ctx.index, cmd.ttl_ms, ctx.now_ms)
    sm.locks.grant(lock)
    sm.events.emit(ctx, "lock.acquired", {"name": name, "holder": holder, "fencing_token": lock.token})
    return {"fencing_token": lock.token, "refreshed": False}


@_handles(LockRelease)
def _lock_release(sm: StateMachine, ctx: ApplyContext, cmd: LockRelease) -> Any:
    name, holder = cmd.name, cmd.holder
    lock = sm.locks.locks.get(name)
    if lock is None:
        raise Rejected("not_found", f"lock {name!r} is not held")
    if lock.holder != holder:
        raise Rejected("conflict", f"lock {name!r} is held by {lock.holder!r}")
    sm.locks.remove(name)
    sm.events.emit(ctx, "lock.released", {"name": name, "holder": holder, "fencing_token": lock.token,
                                          "reason": "released"})
    return {"released": True}


@_handles(LockExpire)
def _lock_expire(sm: StateMachine, ctx: ApplyContext, cmd: LockExpire) -> Any:
    name, token = cmd.name, cmd.token
    lock = sm.locks.locks.get(name)
    if lock is None or lock.token != token:
        return {"expired": False}
    sm.locks.remove(name)
    sm.events.emit(ctx, "lock.released", {"name": name, "holder": lock.holder, "fencing_token": token,
                                          "reason": "expired"})
    return {"expired": True}


# -- system events ----------------------------------------------------------------------

@_handles(SystemReport)
def _system_report(sm: StateMachine, ctx: ApplyContext, cmd: SystemReport) -> Any:
    """What the leader observed about the cluster (a member unreachable or back,
    its own election), committed so every node and the bus see it."""
    event = sm.events.emit(ctx, cmd.type, cmd.data)
    return {"seq": event.seq}


# -- bus -----------------------------------------------------------------------------------

def _agent_exists(sm: StateMachine) -> Callable[[str], bool]:
    return lambda agent_id: agent_id in sm.registry.agents


@_handles(BusPublish)
def _bus_publish(sm: StateMachine, ctx: ApplyContext, command: BusPublish) -> Any:
    agent_exists = sm.registry.agents.__contains__  # the registry does not change during a publish
    topic = command.topic
    messages = command.stamped(ctx.now_ms) if command.unstamped else command.messages
    sizes = sm.bus.check_publish(topic, messages, agent_exists)
    sm.check_principal_bytes(ctx.principal, sum(sizes))
    outcomes: list[Outcome] | None = None
    if sm.transforms.items:
        outcomes = [_routable(sm.transforms.apply(topic, m), topic, m, agent_exists) for m in messages]
        sm.bus.check_routes(topic, [o.topic for o in outcomes])
    result = sm.bus.publish(ctx, topic, messages, outcomes, sizes)
    to_projections = sm.projections.has_topic_sources()
    for i, out in enumerate(result["messages"]):
        if out.get("duplicate"):
            continue
        outcome = outcomes[i] if outcomes is not None else None
        if outcome is not None:
            sm.transforms.record(outcome)
            if outcome.failure is not None:
                continue
        stored = outcome.message if outcome is not None else messages[i]
        if stored["type"] != "event":
            continue
        folded = Folded(out.get("topic", topic), stored["payload"], ctx.now_ms, ctx.index)
        if to_projections:
            sm.projections.feed_topic(folded)
        if sm.streams.items:
            ctx.derived += sm.streams.feed("topic", folded.type, folded)
    return result


def _routable(outcome: Outcome, topic: str, message: dict[str, Any], agent_exists: Any) -> Outcome:
    """A message routed to another topic must be publishable there too (typed task events...)."""
    if outcome.failure is not None or outcome.topic == topic:
        return outcome
    try:
        check_publishable(outcome.topic, outcome.message, agent_exists)
    except Rejected as exc:
        return Outcome(topic, message, f"routed to {outcome.topic!r}, where it is not valid: {exc.message}",
                       outcome.applied)
    return outcome


@_handles(TransformPut)
def _transform_put(sm: StateMachine, ctx: ApplyContext, command: TransformPut) -> Any:
    return sm.transforms.put(ctx.index, command)


@_handles(TransformDelete)
def _transform_delete(sm: StateMachine, ctx: ApplyContext, command: TransformDelete) -> Any:
    return sm.transforms.delete(command)


@_handles(BusTopicConfigure)
def _bus_topic_configure(sm: StateMachine, ctx: ApplyContext, command: BusTopicConfigure) -> Any:
    return sm.bus.configure_topic(ctx, command)


@_handles(BusSubscribe)
def _bus_subscribe(sm: StateMachine, ctx: ApplyContext, command: BusSubscribe) -> Any:
    return sm.bus.subscribe(ctx, command, _agent_exists(sm))


@_handles(BusUnsubscribe)
def _bus_unsubscribe(sm: StateMachine, ctx: ApplyContext, command: BusUnsubscribe) -> Any:
    return sm.bus.unsubscribe(ctx, command.sub)


@_handles(BusGroupDelete)
def _bus_group_delete(sm: StateMachine, ctx: ApplyContext, command: BusGroupDelete) -> Any:
    return sm.bus.delete_group(ctx, command.group)


@_handles(BusDeliver)
def _bus_deliver(sm: StateMachine, ctx: ApplyContext, command: BusDeliver) -> Any:
    """Proposed by the leader only (it serves fetches), so its time stamps due times."""
    consumer = sm.bus.consumer_of(command.sub, command.agent)
    return sm.bus.deliver(ctx, consumer, command.sub, command.max)


@_handles(BusAck)
def _bus_ack(sm: StateMachine, ctx: ApplyContext, command: BusAck) -> Any:
    return sm.bus.ack(ctx, sm.bus.consumer_of(command.sub, command.agent), command.delivery_ids)


@_handles(BusNack)
def _bus_nack(sm: StateMachine, ctx: ApplyContext, command: BusNack) -> Any:
    return sm.bus.nack(ctx, sm.bus.consumer_of(command.sub, command.agent), command)


@_handles(BusDlqRedrive)
def _bus_redrive(sm: StateMachine, ctx: ApplyContext, command: BusDlqRedrive) -> Any:
    return sm.bus.redrive(ctx, sm.bus.consumer_of(command.sub, command.agent), command.delivery_ids)


@_handles(BusDlqPurge)
def _bus_purge(sm: StateMachine, ctx: ApplyContext, command: BusDlqPurge) -> Any:
    return sm.bus.purge(ctx, sm.bus.consumer_of(command.sub, command.agent), command.delivery_ids)


@_handles(BusBind)
def _bus_bind(sm: StateMachine, ctx: ApplyContext, command: BusBind) -> Any:
    return sm.bus.bind(ctx, command)


@_handles(BusUnbind)
def _bus_unbind(sm: StateMachine, ctx: ApplyContext, command: BusUnbind) -> Any:
    return sm.bus.unbind(ctx, command)


@_handles(BusCursor)
def _bus_cursor(sm: StateMachine, ctx: ApplyContext, command: BusCursor) -> Any:
    """Proposed by the leader once the broker confirmed the messages up to ``offset``."""
    return sm.bus.advance_cursor(ctx, command)


@_handles(BusTransportAck)
def _bus_transport_ack(sm: StateMachine, ctx: ApplyContext, command: BusTransportAck) -> Any:
    return sm.bus.transport_acked(ctx, sm.bus.consumer_of(command.sub, command.agent), command.keys)


@_handles(BusTransportCheckpoint)
def _bus_transport_checkpoint(sm: StateMachine, ctx: ApplyContext, command: BusTransportCheckpoint) -> Any:
    return sm.bus.brokers.transport_checkpoint(ctx, sm.bus.consumer_of(command.sub, command.agent), command.acked,
                                               command.position)


@_handles(BusTransportConfigure)
def _bus_transport_configure(sm: StateMachine, ctx: ApplyContext, command: BusTransportConfigure) -> Any:
    return sm.bus.configure_transport(ctx, command)


# -- access control --------------------------------------------------------------------------

@_handles(RolePut)
def _role_put(sm: StateMachine, ctx: ApplyContext, cmd: RolePut) -> Any:
    return sm.access.put_role(cmd)


@_handles(RoleDelete)
def _role_delete(sm: StateMachine, ctx: ApplyContext, cmd: RoleDelete) -> Any:
    return sm.access.delete_role(cmd)


@_handles(SecurityConfigure)
def _security_configure(sm: StateMachine, ctx: ApplyContext, cmd: SecurityConfigure) -> Any:
    return sm.access.configure(cmd)


@_handles(AccessUnpin)
def _access_unpin(sm: StateMachine, ctx: ApplyContext, cmd: AccessUnpin) -> Any:
    return sm.access.unpin(cmd)


@_handles(RoleGrant)
def _role_grant(sm: StateMachine, ctx: ApplyContext, cmd: RoleGrant) -> Any:
    return sm.access.grant(cmd)


# -- balancing ---------------------------------------------------------------------------

@_handles(ServiceConfigure)
def _service_configure(sm: StateMachine, ctx: ApplyContext, cmd: ServiceConfigure) -> Any:
    return sm.policies.configure(cmd)


@_handles(ServiceRemove)
def _service_remove(sm: StateMachine, ctx: ApplyContext, cmd: ServiceRemove) -> Any:
    return sm.policies.remove(cmd)


# -- sagas -------------------------------------------------------------------------------

@_handles(SagaStart)
def _saga_start(sm: StateMachine, ctx: ApplyContext, cmd: SagaStart) -> Any:
    return sm.sagas.start(ctx, sm.events, cmd)


@_handles(SagaOutcome)
def _saga_outcome(sm: StateMachine, ctx: ApplyContext, cmd: SagaOutcome) -> Any:
    """Proposed by the leader's orchestrator when an attempt finished."""
    return sm.sagas.outcome(ctx, sm.events, cmd)


@_handles(SagaRetry)
def _saga_retry(sm: StateMachine, ctx: ApplyContext, cmd: SagaRetry) -> Any:
    """Proposed by the leader's orchestrator when a waiting attempt is due by its clock."""
    return sm.sagas.retry(ctx, sm.events, cmd)


@_handles(SagaResumed)
def _saga_resumed(sm: StateMachine, ctx: ApplyContext, cmd: SagaResumed) -> Any:
    return sm.sagas.resumed(ctx, sm.events, cmd)


@_handles(SagaCancel)
def _saga_cancel(sm: StateMachine, ctx: ApplyContext, cmd: SagaCancel) -> Any:
    return sm.sagas.cancel(ctx, sm.events, cmd)


# -- event store and projections -----------------------------------------------------------

def committed_now(last_ms: int, proposed_ms: int) -> int:
    """The time an entry is given: its proposer's ``proposed_ms`` clamped to
    ``[last_ms, last_ms + CLOCK_STEP_MAX_MS]`` (the first entry takes its own)."""
    if last_ms == 0:
        return max(proposed_ms, 0)
    return min(max(proposed_ms, last_ms), last_ms + CLOCK_STEP_MAX_MS)


def _folded_event(event: Event) -> Folded:
    """A cluster event as projections and stream processors see it."""
    return Folded(event.type, event.data, event.time_ms, event.index)


def _folded_stored(event: StoredEvent) -> Folded:
    """An event of the store as projections and stream processors see it (with its position)."""
    return Folded(event.type, event.data, event.time_ms, event.index, event.position)


def _from_event_log(message: dict[str, Any]) -> bool:
    """A cluster event the bus carried (``Bus.publish_events``): projections take it from the event log."""
    return message["source"] == "coordinator" and message["id"] == f"event-{message['headers'].get('seq')}"


@_handles(EsAppend)
def _es_append(sm: StateMachine, ctx: ApplyContext, cmd: EsAppend) -> Any:
    result, stored = sm.store.append(ctx, cmd, lambda size: sm.check_principal_bytes(ctx.principal, size))
    category = category_of(result["stream"])
    if stored and category is not None:
        folded = [_folded_stored(e) for e in stored]
        sm.projections.feed_category(category, folded)
        if sm.streams.items:
            for event in folded:
                ctx.derived += sm.streams.feed("category", category, event)
    return result


@_handles(EsSnapshot)
def _es_snapshot(sm: StateMachine, ctx: ApplyContext, cmd: EsSnapshot) -> Any:
    return sm.store.snapshot(ctx, cmd)


@_handles(EsDelete)
def _es_delete(sm: StateMachine, ctx: ApplyContext, cmd: EsDelete) -> Any:
    return sm.store.delete(ctx, cmd)


@_handles(ProjectionPut)
def _projection_put(sm: StateMachine, ctx: ApplyContext, cmd: ProjectionPut) -> Any:
    return sm.projections.put(ctx.index, cmd.name, cmd.definition, sm.projection_source(cmd.definition))


@_handles(ProjectionRebuild)
def _projection_rebuild(sm: StateMachine, ctx: ApplyContext, cmd: ProjectionRebuild) -> Any:
    projection = sm.projections.get(cmd.name)
    return sm.projections.rebuild(ctx.index, projection.name, sm.projection_source(projection.definition))


@_handles(ProjectionDelete)
def _projection_delete(sm: StateMachine, ctx: ApplyContext, cmd: ProjectionDelete) -> Any:
    return sm.projections.delete(cmd.name)


@_handles(ProcessorPut)
def _processor_put(sm: StateMachine, ctx: ApplyContext, cmd: ProcessorPut) -> Any:
    return sm.streams.put(ctx.index, cmd)


@_handles(ProcessorDelete)
def _processor_delete(sm: StateMachine, ctx: ApplyContext, cmd: ProcessorDelete) -> Any:
    return sm.streams.delete(cmd)


@_handles(StreamsTick)
def _streams_tick(sm: StateMachine, ctx: ApplyContext, cmd: StreamsTick) -> Any:
    """Proposed by the leader when a window or deadline is due by its clock:
    the command's committed time closes them (``StateMachine._run_streams``)."""
    return {"processors": len(sm.streams.items)}


@_handles(BusTick)
def _bus_tick(sm: StateMachine, ctx: ApplyContext, command: BusTick) -> Any:
    """Proposed by the leader when a bus timer is due by its clock."""
    return sm.bus.tick(ctx)


OPERATIONS = frozenset(COMMANDS)
if _HANDLERS.keys() != set(COMMANDS.values()):
    raise InvariantError("command types and handlers differ: "
                         f"{sorted(t.op for t in _HANDLERS.keys() ^ set(COMMANDS.values()))}")
