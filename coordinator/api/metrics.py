"""Prometheus metrics of one node, in a registry of its own (no globals)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.ports import WithEventCounts
from coordinator.services.node import CoordinatorNode

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _NodeCollector(Collector):
    """Reads the node's numbers at scrape time."""

    def __init__(self, node: CoordinatorNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        node = self.node
        view = node.local_view  # metrics never wait on the log
        st = node.engine.status()
        applied = view.applied_index
        gauges = {
            "coord_raft_term": ("Current Raft term", st.term),
            "coord_raft_commit_index": ("Raft commit index", st.commit_index),
            "coord_raft_applied_index": ("Index applied to the state machine", applied),
            "coord_raft_apply_lag": ("Committed entries not yet applied", max(0, st.commit_index - applied)),
            "coord_raft_is_leader": ("1 when this node is the leader", int(st.role == "leader")),
            "coord_node_healthy": ("1 when the consensus engine is healthy and the replica has not halted",
                                   int(st.healthy and view.failure is None)),
            "coord_replica_halted": ("1 when applying an entry or restoring a snapshot failed: the replica "
                                     "stopped applying and the node refuses reads and writes",
                                     int(view.failure is not None)),
            "coord_proposals_inflight": ("Proposals waiting for their outcome", node.proposer.inflight),
            "coord_agents": ("Registered agents", view.agent_count),
            "coord_locks_held": ("Locks currently held", view.lock_count),
            "coord_kv_keys": ("Keys in the key/value store", view.kv_key_count),
            "coord_kv_revision": ("Store revision", view.kv_revision),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        proposals = CounterMetricFamily("coord_proposals", "Proposals by outcome", labels=["outcome"])
        for outcome, count in sorted(node.proposer.outcomes.items()):
            proposals.add_metric([outcome], count)
        yield proposals
        yield CounterMetricFamily("coord_read_barriers", "Read barriers committed", value=node.reads.barriers)
        yield CounterMetricFamily("coord_read_index_reads", "Linearizable reads the engine confirmed without a "
                                  "log entry (ReadIndex)", value=node.reads.read_index_reads)
        yield CounterMetricFamily("coord_read_index_refused", "Linearizable reads the engine could not confirm "
                                  "by ReadIndex, confirmed by a barrier instead", value=node.reads.read_index_refused)
        yield _expired(node)
        yield CounterMetricFamily("coord_leader_changes", "Role changes seen by this node",
                                  value=node.leader_changes)
        yield from _digest(node)
        yield from _bus(node)
        yield from _sagas(node)
        yield from _event_store(node)
        yield from _balancer(node)
        snapshots = node.snapshots
        yield CounterMetricFamily("coord_backup_snapshots", "Snapshots served by GET /v1/snapshot",
                                  value=snapshots.taken)
        yield CounterMetricFamily("coord_backup_snapshots_refused", "GET /v1/snapshot refused (429) while "
                                  "another was being taken", value=snapshots.refused_busy)
        yield GaugeMetricFamily("coord_backup_snapshot_last_seconds", "How long the last served snapshot held "
                                "this node's event loop", value=snapshots.last_snapshot_ms / 1000)
        yield GaugeMetricFamily("coord_backup_snapshot_last_bytes", "Size of the last served snapshot file",
                                value=snapshots.last_bytes)
        recoveries = getattr(node.engine, "recoveries", 0)
        yield CounterMetricFamily("coord_engine_recoveries", "Rebuilds of a stalled engine", value=recoveries)
        if isinstance(node.engine, WithEventCounts):
            events = CounterMetricFamily("coord_engine_events", "What the consensus engine counted (PBFT: "
                                         "messages dropped by reason, frames, view changes...)", labels=["event"])
            for event, count in sorted(node.engine.event_counts().items()):
                events.add_metric([event], count)
            yield events


def _digest(node: CoordinatorNode) -> Iterator[Any]:
    """The state digest as numbers: the latest checkpoint's index and its
    first 48 bits (exact in a float), comparable across nodes at equal index."""
    digest = node.local_view.digest
    yield GaugeMetricFamily("coord_state_digest_index", "Index the state digest covers", value=digest.index)
    index, value = digest.checkpoints[-1] if digest.checkpoints else (digest.index, digest.value)
    yield GaugeMetricFamily("coord_state_digest_checkpoint_index", "Index of the latest state digest checkpoint",
                            value=index)
    yield GaugeMetricFamily("coord_state_digest_checkpoint_prefix", "First 48 bits of the state digest at "
                            "coord_state_digest_checkpoint_index", value=int.from_bytes(value[:6], "big"))
    yield CounterMetricFamily("coord_digest_checks", "Comparisons of this node's state digest with a member's "
                              "at a common index", value=node.digests.checks)
    yield CounterMetricFamily("coord_digest_mismatches", "Comparisons that found a member's state digest "
                              "different from this node's (a replica diverged)", value=node.digests.mismatches)


def _bus(node: CoordinatorNode) -> Iterator[Any]:
    counts = node.local_view.bus_counts()
    yield GaugeMetricFamily("coord_bus_topics", "Topics known to the bus", value=counts.topics)
    yield GaugeMetricFamily("coord_bus_messages_held", "Message bodies held (retained or queued)",
                            value=counts.messages_held)
    yield GaugeMetricFamily("coord_bus_subscriptions", "Subscriptions", value=counts.subscriptions)
    states = GaugeMetricFamily("coord_bus_queue_messages", "Messages in consumers' queues by state",
                               labels=["state"])
    for state, value in counts.queued.items():
        states.add_metric([state], value)
    yield states
    deliveries = CounterMetricFamily("coord_bus_deliveries", "Deliveries of live consumers by outcome",
                                     labels=["outcome"])
    for name, value in counts.deliveries.items():
        deliveries.add_metric([name], value)
    yield deliveries
    published = CounterMetricFamily("coord_bus_messages", "Messages by what happened to them", labels=["kind"])
    for name, value in counts.messages.items():
        published.add_metric([name], value)
    published.add_metric(["volatile_routed"], node.bus.volatile.routed)
    published.add_metric(["volatile_dropped"], node.bus.volatile.dropped)
    yield published
    backlog = GaugeMetricFamily("coord_transport_backlog", "Messages of a bound topic the broker has not confirmed",
                                labels=["topic", "transport"])
    for topic, transport, unconfirmed in counts.backlog:
        backlog.add_metric([topic, transport], unconfirmed)
    yield backlog
    healthy = GaugeMetricFamily("coord_transport_healthy", "1 unless the last use of the transport failed",
                                labels=["transport"])
    for name in node.transports.transports:
        healthy.add_metric([name], int(name not in node.transports.errors))
    yield healthy
    yield CounterMetricFamily("coord_transport_sent", "Messages brokers confirmed while this node led",
                              value=node.transports.sent)


def _event_store(node: CoordinatorNode) -> Iterator[Any]:
    store = node.local_view.event_store_counts()
    yield GaugeMetricFamily("coord_eventstore_events", "Events retained in the event store", value=store.events)
    yield GaugeMetricFamily("coord_eventstore_bytes", "Approximate bytes of the retained events' data",
                            value=store.bytes)
    yield GaugeMetricFamily("coord_eventstore_streams", "Streams in the event store", value=store.streams)
    yield GaugeMetricFamily("coord_eventstore_position", "The last global position given", value=store.position)
    counted = CounterMetricFamily("coord_eventstore", "Event store events by what happened to them",
                                  labels=["kind"])
    for kind, value in sorted(store.counters.items()):
        counted.add_metric([kind], value)
    yield counted
    yield GaugeMetricFamily("coord_projections", "Projections defined", value=store.projections)


def _sagas(node: CoordinatorNode) -> Iterator[Any]:
    states = GaugeMetricFamily("coord_sagas", "Sagas by state (final ones as long as they are retained)",
                               labels=["state"])
    for state, count in node.local_view.saga_counts().items():
        states.add_metric([state], count)
    yield states
    status = node.sagas.status()
    yield GaugeMetricFamily("coord_saga_attempts_running", "Saga attempts this node is performing as leader",
                            value=status["invoking"])
    attempts = CounterMetricFamily("coord_saga_attempts", "Saga attempts this node performed as leader",
                                   labels=["kind"])
    attempts.add_metric(["invoked"], status["invoked"])
    attempts.add_metric(["resumed"], status["resumed"])
    yield attempts


BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


def _balancer(node: CoordinatorNode) -> Iterator[Any]:
    status = node.balancer.status()
    invocations = CounterMetricFamily("coord_invocations", "Requests to agents through this node by outcome",
                                      labels=["outcome"])
    for outcome in ("invoked", "succeeded", "failed", "retried", "rate_limited", "unavailable"):
        invocations.add_metric([outcome], status[outcome])
    yield invocations
    breakers = GaugeMetricFamily("coord_breaker_state", "This node's circuit breaker per agent: "
                                 "0 closed, 1 half-open, 2 open", labels=["agent"])
    for agent_id, row in status["agents"].items():
        breakers.add_metric([agent_id], BREAKER_LEVEL.get(row["breaker"]["state"], 0))
    yield breakers
    yield CounterMetricFamily("coord_health_checks", "Health checks run by this node as leader",
                              value=node.health.checks)


def _expired(node: CoordinatorNode) -> CounterMetricFamily:
    family = CounterMetricFamily("coord_leases_expired", "Leases expired by this node as leader", labels=["kind"])
    family.add_metric(["agent"], node.leases.expired_agents)
    family.add_metric(["lock"], node.leases.expired_locks)
    return family


class _AuthCollector(Collector):
    """Counts of refused requests; ``auth`` is the app's ``AuthState`` (its
    ``denied`` and ``refused`` counters), not imported here to keep the
    metrics below the auth module."""

    def __init__(self, auth: Any) -> None:
        self.auth = auth

    def collect(self) -> Iterator[Any]:
        denied = CounterMetricFamily("coord_auth_denied", "Requests refused with 403, by missing permission",
                                     labels=["permission"])
        for permission, count in sorted(self.auth.denied.items()):
            denied.add_metric([permission], count)
        yield denied
        refused = CounterMetricFamily("coord_auth_refused", "Requests refused with 401", value=sum(
            self.auth.refused.values()))
        yield refused


class _OpenCollector(Collector):
    """What callers hold open; ``open_requests`` is the app's ``OpenRequests``."""

    def __init__(self, open_requests: Any) -> None:
        self.open = open_requests

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("coord_http_long_requests", "SSE streams and long polls held open",
                                value=self.open.total)
        refused = CounterMetricFamily("coord_http_open_refused", "Streams, long polls and connections refused "
                                      "by a limit", labels=["limit"])
        for limit, count in sorted(self.open.refused.items()):
            refused.add_metric([limit], count)
        yield refused


class HttpMetrics:
    def __init__(self, node: CoordinatorNode, auth: Any = None, open_requests: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_NodeCollector(node))
        if auth is not None:
            self.registry.register(_AuthCollector(auth))
        if open_requests is not None:
            self.registry.register(_OpenCollector(open_requests))
        self.latency = Histogram(
            "coord_http_request_seconds", "HTTP request latency", ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.errors = Counter("coord_http_errors", "HTTP error responses", ["code"], registry=self.registry)
        # labels() takes a lock and builds the key on every call; the children are
        # kept here instead (methods are the parser's fixed set, routes the
        # router's, statuses HTTP's: a bounded set).
        self._latency_of: dict[tuple[str, str, int], Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request: its latency, and an error count when ``status`` >= 400."""
        child = self._latency_of.get((method, route, status))
        if child is None:
            child = self._latency_of[(method, route, status)] = self.latency.labels(method, route, str(status))
        child.observe(seconds)
        if status >= 400:
            self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
