"""A read-only view of this node's replica: the one way the HTTP layer reads
state.

``CoordinatorNode.view(consistency)`` returns it after the read barrier the
consistency asks for; ``CoordinatorNode.local_view`` returns it without one,
for what must not wait on the log (authentication, visibility, metrics).
Each method answers one question the API asks, named for the answer, so a
handler never learns where the state machine keeps it.

The view holds the ``Applier``, not a state machine: a snapshot restore
replaces the machine, and every call reads the current one. Returned
records (agents, locks, sagas, projections...) are the state's own objects,
read-only by convention and valid until the loop next runs an apply; they
are not copied. Loop thread only, synchronous: nothing here awaits, so one
handler's reads between two awaits see one state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.commands.access import RoleGrant
from coordinator.commands.eventstore import EsAppend
from coordinator.commands.locks import ELECTION_PREFIX
from coordinator.errors import Compacted
from coordinator.services import watch
from coordinator.services.applier import Applier, ApplyFailure
from coordinator.state.bus import Consumer, Subscription
from coordinator.state.digest import StateDigest
from coordinator.state.eventstore import StoredEvent
from coordinator.state.kv import KvEntry
from coordinator.state.locks import Lock
from coordinator.state.machine import StateMachine
from coordinator.state.projections import Projection
from coordinator.state.registry import Agent
from coordinator.state.sagas import Saga
from coordinator.state.streams import Processor
from coordinator.state.transforms import Transform
from coordinator.types import Event, KvChange


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    """A subscription with the consumer that holds its queue."""

    record: Subscription
    consumer: Consumer

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def owner(self) -> str | None:
        """The agent that made it (None: made by the admin or an anonymous caller)."""
        return self.record.agent

    @property
    def pattern(self) -> str | None:
        return self.consumer.pattern

    def describe(self) -> dict[str, Any]:
        sub = self.record
        return {"id": sub.id, "agent": sub.agent, "created_ms": sub.created_ms, **self.consumer.describe()}


@dataclass(frozen=True, slots=True)
class RetainedPage:
    """Messages a topic retains from an offset: ``{"offset", "index",
    "publish_ms", "message"}`` each; ``first_offset`` None when none is retained."""

    messages: list[dict[str, Any]]
    first_offset: int | None
    next_offset: int


@dataclass(frozen=True, slots=True)
class BusCounts:
    topics: int
    messages_held: int  # bodies retained or queued
    subscriptions: int
    queued: dict[str, int]  # messages in consumers' queues: ready, pending, delayed, dead
    deliveries: dict[str, int]  # live consumers' deliveries by outcome
    messages: dict[str, int]  # messages by what happened to them
    backlog: list[tuple[str, str, int]]  # (topic, transport, messages the broker has not confirmed)


@dataclass(frozen=True, slots=True)
class EventStoreCounts:
    events: int
    bytes: int
    streams: int
    position: int
    counters: dict[str, int]
    projections: int


class StateView:
    def __init__(self, applier: Applier) -> None:
        self._applier = applier

    @property
    def _state(self) -> StateMachine:
        return self._applier.machine

    # -- the replica -----------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """The log index the replica has applied: what every answer reflects."""
        return self._state.applied_index

    @property
    def failure(self) -> ApplyFailure | None:
        """Why this replica halted, or None while it applies."""
        return self._applier.failure

    @property
    def digest(self) -> StateDigest:
        return self._applier.digest

    # -- key/value ---------------------------------------------------------------------------------

    def kv_get(self, key: str) -> KvEntry | None:
        return self._state.kv.get(key)

    def kv_range(self, prefix: str, limit: int, start_after: str | None = None
                 ) -> tuple[list[tuple[str, KvEntry]], int]:
        """Up to ``limit`` keys under ``prefix`` (after ``start_after``) in
        order, and the store revision they were read at."""
        kv = self._state.kv
        return kv.range(prefix, limit, start_after), kv.revision

    @property
    def kv_revision(self) -> int:
        return self._state.kv.revision

    @property
    def kv_key_count(self) -> int:
        return len(self._state.kv)

    def watch_kv(self, prefix: str, from_revision: int | None) -> AsyncIterator[list[KvChange]]:
        """Batches of changes under ``prefix`` (``coordinator.services.watch``)."""
        return watch.watch_kv(self._applier, prefix, from_revision)

    # -- agents --------------------------------------------------------------------------------------

    def agent(self, agent_id: str) -> Agent | None:
        return self._state.registry.agents.get(agent_id)

    def is_registered(self, agent_id: str) -> bool:
        return agent_id in self._state.registry.agents

    def agents(self, agent_type: str | None = None) -> list[Agent]:
        """Registered agents (of ``agent_type``), by id."""
        return self._state.registry.by_type(agent_type)

    @property
    def agent_count(self) -> int:
        return len(self._state.registry.agents)

    def public_key(self, agent_id: str) -> str | None:
        """The key an agent id signs with: its registration's, else the one
        kept after it left (so its id cannot be claimed by another key)."""
        agent = self._state.registry.agents.get(agent_id)
        if agent is not None and agent.public_key is not None:
            return agent.public_key
        return self._state.access.keys.get(agent_id)

    # -- load balancing ------------------------------------------------------------------------------

    def service_types(self) -> list[str]:
        """Every agent type that has an agent or a committed policy, sorted."""
        state = self._state
        return sorted({a.type for a in state.registry.agents.values()} | set(state.policies.policies))

    def policy(self, agent_type: str) -> dict[str, Any]:
        """The type's balancing policy (the default when none is committed)."""
        return self._state.policies.of(agent_type)

    def has_policy(self, agent_type: str) -> bool:
        return agent_type in self._state.policies.policies

    # -- locks and elections -------------------------------------------------------------------------

    def lock(self, name: str) -> Lock | None:
        return self._state.locks.locks.get(name)

    def election_leader(self, election: str) -> Lock | None:
        """The lock that makes its holder the leader of ``election``."""
        return self._state.locks.locks.get(ELECTION_PREFIX + election)

    @property
    def lock_count(self) -> int:
        return len(self._state.locks.locks)

    # -- cluster events --------------------------------------------------------------------------------

    def events_since(self, from_seq: int, limit: int) -> list[Event]:
        """Up to ``limit`` retained events from ``from_seq`` on, oldest first.
        ``Compacted`` (with ``first_seq``) when ``from_seq`` was retained once
        and is no longer."""
        events = self._state.events
        if from_seq < events.first_seq and from_seq <= events.last_seq:
            raise Compacted(f"event {from_seq} is compacted; the oldest retained is {events.first_seq}",
                            first_seq=events.first_seq)
        return events.since(from_seq, limit)

    @property
    def last_event_seq(self) -> int:
        return self._state.events.last_seq

    def watch_events(self, from_seq: int | None, types: tuple[str, ...],
                     shown: Callable[[Event], bool] | None) -> AsyncIterator[list[Event]]:
        return watch.watch_events(self._applier, from_seq, types, shown)

    # -- bus -------------------------------------------------------------------------------------------

    def topic(self, name: str) -> dict[str, Any] | None:
        """The topic's description, None when it has no messages and no settings."""
        bus = self._state.bus
        topic = bus.topics.get(name)
        return bus.describe_topic(topic) if topic is not None else None

    def topics(self, prefix: str, shown: Callable[[str], bool]) -> list[dict[str, Any]]:
        """Descriptions of the topics named ``prefix...`` that ``shown`` accepts."""
        bus = self._state.bus
        return [bus.describe_topic(t) for name, t in bus.topics.items() if name.startswith(prefix) and shown(name)]

    def retained(self, topic: str, from_offset: int, limit: int) -> RetainedPage | None:
        """Up to ``limit`` messages the topic retains from ``from_offset`` on;
        None for a topic the bus does not know."""
        bus = self._state.bus
        known = bus.topics.get(topic)
        if known is None:
            return None
        out = []
        for offset in known.log:
            if offset >= from_offset:
                body = bus.bodies[(topic, offset)]
                out.append({"offset": offset, "index": body.index, "publish_ms": body.publish_ms,
                            "message": body.message})
                if len(out) >= limit:
                    break
        return RetainedPage(out, next(iter(known.log), None), known.next_offset)

    def cluster_transport_urls(self) -> Mapping[str, str]:
        """Broker URLs committed for the whole cluster, by transport name."""
        return self._state.bus.transport_urls

    def subscription(self, sub_id: str) -> SubscriptionView | None:
        bus = self._state.bus
        sub = bus.subscriptions.get(sub_id)
        return SubscriptionView(sub, bus.consumers[sub.consumer]) if sub is not None else None

    def subscriptions(self) -> list[SubscriptionView]:
        bus = self._state.bus
        return [SubscriptionView(sub, bus.consumers[sub.consumer]) for sub in bus.subscriptions.values()]

    def dead_letters(self, consumer_key: str, limit: int) -> tuple[list[dict[str, Any]], int] | None:
        """Up to ``limit`` of a consumer's dead letters and how many it holds;
        None when no consumer has that key (an inbox before its first message)."""
        bus = self._state.bus
        consumer = bus.consumers.get(consumer_key)
        if consumer is None:
            return None
        return bus.dead_letters(consumer, limit), len(consumer.dlq)

    def bus_counts(self) -> BusCounts:
        bus = self._state.bus
        queued = {"ready": 0, "pending": 0, "delayed": 0, "dead": 0}
        flows = dict.fromkeys(("enqueued", "delivered", "redelivered", "acked", "nacked", "dead_lettered"), 0)
        for consumer in bus.consumers.values():
            queued["ready"] += consumer.ready_count
            queued["pending"] += consumer.pending_count
            queued["delayed"] += len(consumer.entries) - consumer.ready_count - consumer.pending_count
            queued["dead"] += len(consumer.dlq)
            for name in flows:
                flows[name] += consumer.counters[name]
        backlog = [(topic, binding.transport, bus.topics[topic].next_offset - 1 - binding.cursor)
                   for topic, binding in bus.bindings.items()]
        return BusCounts(len(bus.topics), len(bus.bodies), len(bus.subscriptions), queued, flows,
                         dict(bus.counters), backlog)

    # -- transforms --------------------------------------------------------------------------------------

    def transform(self, name: str) -> Transform | None:
        return self._state.transforms.items.get(name)

    def transforms(self) -> Iterable[Transform]:
        return self._state.transforms.items.values()

    # -- event store ---------------------------------------------------------------------------------------

    def check_append(self, command: EsAppend) -> None:
        """Refuse (``Rejected``) a parsed append over this store's own limits
        on one append, which may be lower than the parse's caps, before it is proposed."""
        self._state.store.check_append(command)

    def stream_page(self, stream: str, from_version: int, limit: int, backward: bool) -> dict[str, Any] | None:
        """A page of one stream's events; None when the stream does not exist."""
        return self._state.store.read_stream(stream, from_version, limit, backward)

    def stream_list(self, category: str | None, after: str, limit: int) -> list[dict[str, Any]]:
        """Streams (of ``category``) after the id ``after``, by id."""
        return self._state.store.list_streams(category, after, limit)

    def category_page(self, category: str, from_position: int, limit: int) -> dict[str, Any]:
        return self._state.store.read_category(category, from_position, limit)

    def event_store_summary(self) -> dict[str, Any]:
        return self._state.store.describe()

    def event_store_counts(self) -> EventStoreCounts:
        state = self._state
        store = state.store
        return EventStoreCounts(store.events_count, store.bytes, len(store.streams), store.position,
                                dict(store.counters), len(state.projections.items))

    def watch_category(self, category: str, from_position: int | None) -> AsyncIterator[list[StoredEvent]]:
        return watch.watch_category(self._applier, category, from_position)

    # -- projections and stream processors ---------------------------------------------------------------

    def projection(self, name: str) -> Projection | None:
        return self._state.projections.items.get(name)

    def projections(self) -> Mapping[str, Projection]:
        return self._state.projections.items

    def processor(self, name: str) -> Processor | None:
        return self._state.streams.items.get(name)

    def processors(self) -> Mapping[str, Processor]:
        return self._state.streams.items

    # -- sagas ------------------------------------------------------------------------------------------------

    def saga(self, saga_id: str) -> Saga | None:
        return self._state.sagas.sagas.get(saga_id)

    def sagas_oldest_first(self, state: str | None, limit: int, after: int,
                           shown: Callable[[Saga], bool] | None) -> list[Saga]:
        """Up to ``limit`` sagas (in ``state``) created after log index ``after``."""
        return self._state.sagas.list(state, limit, after, shown)

    def sagas_newest_first(self, limit: int, shown: Callable[[Saga], bool] | None) -> list[Saga]:
        return self._state.sagas.newest(limit, shown)

    def saga_counts(self, shown: Callable[[Saga], bool] | None = None) -> dict[str, int]:
        """Sagas by state (of those ``shown`` accepts)."""
        return self._state.sagas.counts(shown)

    # -- access -------------------------------------------------------------------------------------------------

    def can(self, agent_id: str, action: str, resource: str, *, listing: bool = False) -> bool:
        """Whether ``agent_id``'s roles grant ``action`` on ``resource``
        (``coordinator.state.access``)."""
        return self._state.access.can(agent_id, action, resource, listing=listing)

    def roles_and_grants(self) -> dict[str, Any]:
        """``{"roles": [...], "grants": [...]}``: every role and who holds which."""
        return self._state.access.describe()

    def roles_held(self, agent_id: str) -> list[str]:
        return self._state.access.grants.get(agent_id, [])

    def check_grant(self, grant: RoleGrant) -> None:
        """Refuse a grant of a role not defined now (``Rejected``); a role
        deleted before the grant applies is still refused then."""
        self._state.access.check_roles(grant.roles)

    @property
    def pow_difficulty(self) -> int:
        """Leading zero bits a join's proof of work needs (0: none)."""
        return self._state.access.pow_difficulty

    @property
    def endpoint_allow(self) -> list[str]:
        """Networks and names agents' endpoints may use (``coordinator.commands.endpoints``)."""
        return self._state.access.endpoint_allow

    def security_settings(self) -> dict[str, Any]:
        return self._state.access.settings()
