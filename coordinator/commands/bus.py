"""Commands of the message bus: publishing, topics, subscriptions,
deliveries and their acks, dead letters, transport bindings and timers.

Each parse checks the shape of its arguments and names the first bad field;
what depends on the state (a subscription that exists, a registered
destination, a topic's binding, the bus's room) is the state machine's to
say. The limits and pure checks the API and the services share live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from coordinator.commands import filters
from coordinator.commands.base import (
    ArglessCommand,
    DomainCommand,
    Rejected,
    check_int,
    check_number,
    check_str,
    invalid,
    require_int,
    require_str,
)
from coordinator.commands.messages import GUARANTEES, MAX_ID_LEN, in_batch, normalize
from coordinator.commands.topics import check_pattern, check_topic, is_pattern

RESERVED_PREFIXES = ("agent.", "lock.", "system.")
REPLY_PREFIX = "_reply."  # topics of replies to requests: not retained unless configured
TASK_STATUSES = ("started", "progress", "completed", "failed", "cancelled")
START_KINDS = ("new", "beginning", "offset", "time")
MAX_BATCH = 1000
MAX_FETCH = 1000
MAX_ACK_IDS = 10_000
MAX_DELIVERY_ID_LEN = 64
MAX_TRANSPORT_KEY_LEN = 512
MAX_DELAY_MS = 3_600_000
MIN_ACK_TIMEOUT_MS = 100
MAX_ATTEMPTS = 100
MAX_OFFSET = 2**63 - 1
MAX_BACKLOG = 1_000_000
DEFAULT_BACKLOG = 100_000
MAX_RETAINED_MESSAGES = 10_000_000  # a topic's max_messages
MIN_RETAINED_AGE_MS = 1000  # a topic's max_age_ms
MAX_RETAINED_AGE_MS = 365 * 86_400_000
MAX_TRANSPORT_NAME_LEN = 64
BINDING_MODES = ("log", "direct")  # a bound topic's messages go through the log first, or straight to the broker
MAX_CHECKPOINT_ACKED = 2**31 - 1
MAX_URL_LEN = 2048
URL_HINT = "must be a URL such as redis://127.0.0.1:6379/0"
_RANK = {g: i for i, g in enumerate(GUARANTEES)}


# -- shared checks ---------------------------------------------------------------------------

def effective_guarantee(subscription: str, message: str) -> str:
    """The weaker of a subscription's and a message's guarantee."""
    return subscription if _RANK[subscription] < _RANK[message] else message


def check_publishable_topic(topic: str) -> None:
    if topic.startswith(RESERVED_PREFIXES):
        raise invalid("topic", f"{topic!r} is reserved for the cluster's own events")


def check_key_path(value: Any) -> str:
    """An ordering key: ``payload.NAME[.NAME...]`` or ``headers.NAME``."""
    path = check_str(value, "key", 256)
    parts = path.split(".")
    if parts[0] not in ("payload", "headers") or len(parts) < 2 or not all(parts) or \
            (parts[0] == "headers" and len(parts) != 2):
        raise invalid("key", "must be payload.NAME[.NAME...] or headers.NAME")
    return path


def check_task_event(topic: str, message: dict[str, Any]) -> None:
    """``task.<status>`` topics carry typed task events (other topics: nothing to check)."""
    if not topic.startswith("task."):
        return
    status = topic[len("task."):]
    if status not in TASK_STATUSES:
        raise invalid("topic", f"task events go to task.<status>, status one of {', '.join(TASK_STATUSES)}")
    if message["type"] != "event":
        raise invalid("type", "task events have type event")
    payload = message["payload"]
    if not isinstance(payload, dict):
        raise invalid("payload", "a task event's payload is an object with taskId")
    check_str(payload.get("taskId"), "payload.taskId", MAX_ID_LEN)
    if payload.get("agentId") is not None:
        check_str(payload["agentId"], "payload.agentId", MAX_ID_LEN)
    if payload.get("progress") is not None:
        check_number(payload["progress"], "payload.progress", 0, 100)
    if payload.get("error") is not None:
        check_str(payload["error"], "payload.error", 4096)


def check_destinations(message: dict[str, Any], agent_exists: Callable[[str], bool]) -> None:
    """Every destination of a normalised message is a registered agent
    (``agent_exists`` is the caller's view of the registry)."""
    for j, agent in enumerate(message["destination"]):
        if not agent_exists(agent):
            raise Rejected("not_found", f"destination[{j}]: agent {agent!r} is not registered")


def check_publishable(topic: str, message: dict[str, Any], agent_exists: Callable[[str], bool]) -> None:
    """What a normalised message must also satisfy on ``topic``: typed task
    events, registered destinations (a message a transform routed elsewhere,
    a stream processor's emission)."""
    check_task_event(topic, message)
    check_destinations(message, agent_exists)


def _as_given(i: int, item: Any) -> Any:
    return item


def check_publication(topic: Any, raw: list[Any], now_ms: int,
                      complete: Callable[[int, Any], Any] = _as_given) -> list[dict[str, Any]]:
    """A publish request before it is proposed or routed: every message
    completed by the caller (``complete(i, item)``: its defaults, or a
    ``Rejected``) and normalised (``timestamp`` defaults to ``now_ms``), then
    the topic, then the typed task events. Refusals name the field, as
    ``messages[i].field`` in a batch. The messages may be persistent or not:
    the caller proposes the persistent ones as one ``BusPublish`` (whose
    parse is these checks again, on every replica); whether their
    destinations are registered is the state's to say (``check_destinations``)."""
    if not 1 <= len(raw) <= MAX_BATCH:
        raise invalid("messages", f"must be a list of 1 to {MAX_BATCH} messages")
    messages = []
    for i, item in enumerate(raw):
        try:
            messages.append(normalize(complete(i, item), now_ms))
        except Rejected as exc:
            raise Rejected(exc.code, in_batch(i, len(raw), exc.message)) from None
    check_topic(topic)
    check_publishable_topic(topic)
    if topic.startswith("task."):
        for i, message in enumerate(messages):
            try:
                check_task_event(topic, message)
            except Rejected as exc:
                raise Rejected(exc.code, in_batch(i, len(messages), exc.message)) from None
    return messages


# -- publishing -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusPublish(DomainCommand):
    """Store and route persistent ``messages`` (normalised) published on ``topic``.

    A message the log carries without a ``timestamp`` has ``None`` there: it
    is stamped with the entry's committed time when applied (``stamped``).
    """

    op: ClassVar[str] = "bus.publish"
    topic: str
    messages: list[dict[str, Any]]  # a list, as the log carries it (not copied on the hot path)
    unstamped: tuple[int, ...] = ()  # the messages without a timestamp in the log

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        # The hot path: every replica parses every publish, so the command is
        # built without the dataclass's __init__ (as KvPut.parse).
        topic = check_topic(args.get("topic"))
        raw = args.get("messages")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_BATCH:
            raise invalid("messages", f"must be a list of 1 to {MAX_BATCH} messages")
        if topic.startswith(RESERVED_PREFIXES):  # check_publishable_topic, inlined
            check_publishable_topic(topic)
        task = topic.startswith("task.")
        messages = []
        unstamped: tuple[int, ...] = ()
        for i, item in enumerate(raw):
            try:
                if type(item) is dict and "timestamp" not in item:
                    message = normalize(item, 0)
                    message["timestamp"] = None
                    unstamped += (i,)
                else:
                    message = normalize(item, 0)
                if not message["deliveryOptions"]["persistent"]:
                    raise invalid("deliveryOptions.persistent",
                                  "a message that is not persistent is routed by the leader, not logged")
                if task:
                    check_task_event(topic, message)
            except Rejected as exc:
                raise Rejected(exc.code, in_batch(i, len(raw), exc.message)) from None
            messages.append(message)
        command = _new(cls)
        _set_topic(command, topic)
        _set_messages(command, messages)
        _set_unstamped(command, unstamped)
        return command

    def stamped(self, now_ms: int) -> list[dict[str, Any]]:
        """The messages as stored: a message without a timestamp gets ``now_ms``."""
        if not self.unstamped:
            return self.messages
        return [{**m, "timestamp": now_ms} if i in self.unstamped else m for i, m in enumerate(self.messages)]

    def to_args(self) -> dict[str, Any]:
        if not self.unstamped:
            return {"topic": self.topic, "messages": list(self.messages)}
        return {"topic": self.topic, "messages": [{k: v for k, v in m.items() if k != "timestamp"}
                                                  if i in self.unstamped else m
                                                  for i, m in enumerate(self.messages)]}


_new = object.__new__
_set_topic, _set_messages, _set_unstamped = (BusPublish.__dict__[name].__set__
                                             for name in ("topic", "messages", "unstamped"))


def _with(args: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``args`` and the optional fields that are not None, in the order given."""
    for name, value in optional.items():
        if value is not None:
            args[name] = value
    return args


def _optional_int(args: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    """Null or absent: None; else an integer in [low, high]."""
    return require_int(args, name, low, high, optional=True)


def _flag(args: Mapping[str, Any], name: str) -> bool | None:
    """Absent: None; else true or false (null is refused, as it always was)."""
    if name not in args:
        return None
    value = args[name]
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


# -- topics -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusTopicConfigure(DomainCommand):
    """Set a topic's retention (None: the bus's default)."""

    op: ClassVar[str] = "bus.topic.configure"
    topic: str
    max_messages: int | None = None
    max_age_ms: int | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_topic(args.get("topic")),
                   _optional_int(args, "max_messages", 0, MAX_RETAINED_MESSAGES),
                   _optional_int(args, "max_age_ms", MIN_RETAINED_AGE_MS, MAX_RETAINED_AGE_MS))

    def to_args(self) -> dict[str, Any]:
        return _with({"topic": self.topic}, max_messages=self.max_messages, max_age_ms=self.max_age_ms)


# -- subscriptions ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusSubscribe(DomainCommand):
    """Subscribe to ``topic`` (a pattern), alone or in ``group``, from ``start``.

    ``start_value`` is the offset (``start`` "offset") or the publish time
    (``start`` "time"); None when the log left it out (0).
    """

    op: ClassVar[str] = "bus.subscribe"
    topic: str
    key: str | None = None
    group: str | None = None
    filter: str | None = None
    guarantee: str = "at-least-once"
    ack_timeout_ms: int | None = None
    max_attempts: int | None = None
    agent: str | None = None
    start: str = "new"
    start_value: int | None = None
    filter_tree: Any = field(default=None, compare=False, repr=False)  # the parsed filter

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        pattern = check_pattern(args.get("topic"))
        group = require_str(args, "group", MAX_ID_LEN, optional=True)
        filter_text = args.get("filter")
        tree = filters.parse(filter_text) if filter_text is not None else None
        guarantee = args.get("guarantee", "at-least-once")
        if guarantee not in GUARANTEES:
            raise invalid("guarantee", f"must be one of {', '.join(GUARANTEES)}")
        ack_timeout_ms = _optional_int(args, "ack_timeout_ms", MIN_ACK_TIMEOUT_MS, MAX_DELAY_MS)
        max_attempts = _optional_int(args, "max_attempts", 1, MAX_ATTEMPTS)
        key = args.get("key")
        if key is not None:
            check_key_path(key)
        agent = require_str(args, "agent", MAX_ID_LEN, optional=True)
        start = args.get("start", "new")
        if start not in START_KINDS:
            raise invalid("start", f"must be one of {', '.join(START_KINDS)}")
        start_value = None
        if "start_value" in args:
            start_value = check_int(args["start_value"], "start_value", 0, MAX_OFFSET)
        if start == "offset" and is_pattern(pattern):
            raise invalid("start_offset", "an offset names a position in one topic; use a topic without wildcards")
        return cls(pattern, key, group, filter_text, guarantee, ack_timeout_ms, max_attempts, agent, start,
                   start_value, tree)

    def to_args(self) -> dict[str, Any]:
        args = _with({"topic": self.topic}, key=self.key, group=self.group, filter=self.filter)
        args["guarantee"] = self.guarantee
        _with(args, ack_timeout_ms=self.ack_timeout_ms, max_attempts=self.max_attempts, agent=self.agent)
        args["start"] = self.start
        return _with(args, start_value=self.start_value)


@dataclass(frozen=True, slots=True)
class BusUnsubscribe(DomainCommand):
    op: ClassVar[str] = "bus.unsubscribe"
    sub: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(require_str(args, "sub"))

    def to_args(self) -> dict[str, Any]:
        return {"sub": self.sub}


@dataclass(frozen=True, slots=True)
class BusGroupDelete(DomainCommand):
    op: ClassVar[str] = "bus.group.delete"
    group: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(require_str(args, "group"))

    def to_args(self) -> dict[str, Any]:
        return {"group": self.group}


# -- deliveries (a subscription's, or an agent's inbox) ------------------------------------------

def _selector(args: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The consumer a command names: ``(sub, None)`` or ``(None, agent)``
    (an agent's inbox; when both are given the agent wins)."""
    if args.get("agent") is not None:
        return None, check_str(args["agent"], "agent", MAX_ID_LEN)
    return check_str(args.get("sub"), "sub", MAX_ID_LEN), None


def _selected(sub: str | None, agent: str | None) -> dict[str, Any]:
    return {"agent": agent} if agent is not None else {"sub": sub}


def check_delivery_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ACK_IDS:
        raise invalid("delivery_ids", f"must be a list of 1 to {MAX_ACK_IDS} delivery ids")
    for i, delivery_id in enumerate(value):
        if not isinstance(delivery_id, str) or not 1 <= len(delivery_id) <= MAX_DELIVERY_ID_LEN:
            raise invalid(f"delivery_ids[{i}]", "must be a delivery id string")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class BusDeliver(DomainCommand):
    """Hand out up to ``max`` ready messages of a consumer. Proposed by the
    leader only (it serves fetches), so its time stamps due times."""

    op: ClassVar[str] = "bus.deliver"
    sub: str | None
    agent: str | None
    max: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        sub, agent = _selector(args)
        return cls(sub, agent, require_int(args, "max", 1, MAX_FETCH))

    def to_args(self) -> dict[str, Any]:
        return {**_selected(self.sub, self.agent), "max": self.max}


@dataclass(frozen=True, slots=True)
class BusAck(DomainCommand):
    op: ClassVar[str] = "bus.ack"
    sub: str | None
    agent: str | None
    delivery_ids: tuple[str, ...]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        sub, agent = _selector(args)
        return cls(sub, agent, check_delivery_ids(args.get("delivery_ids")))

    def to_args(self) -> dict[str, Any]:
        return {**_selected(self.sub, self.agent), "delivery_ids": list(self.delivery_ids)}


@dataclass(frozen=True, slots=True)
class BusNack(DomainCommand):
    """Give deliveries back: after ``delay_ms`` (None: the message's backoff),
    or into the dead letters (``dead_letter``; None: false)."""

    op: ClassVar[str] = "bus.nack"
    sub: str | None
    agent: str | None
    delivery_ids: tuple[str, ...]
    delay_ms: int | None = None
    dead_letter: bool | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        sub, agent = _selector(args)
        ids = check_delivery_ids(args.get("delivery_ids"))
        return cls(sub, agent, ids, _optional_int(args, "delay_ms", 0, MAX_DELAY_MS), _flag(args, "dead_letter"))

    def to_args(self) -> dict[str, Any]:
        return _with({**_selected(self.sub, self.agent), "delivery_ids": list(self.delivery_ids)},
                     delay_ms=self.delay_ms, dead_letter=self.dead_letter)


@dataclass(frozen=True, slots=True)
class BusDlqRedrive(DomainCommand):
    """Dead letters back to the ready queue (all when ``delivery_ids`` is None)."""

    op: ClassVar[str] = "bus.dlq.redrive"
    sub: str | None
    agent: str | None
    delivery_ids: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        sub, agent = _selector(args)
        ids = args.get("delivery_ids")
        return cls(sub, agent, None if ids is None else check_delivery_ids(ids))

    def to_args(self) -> dict[str, Any]:
        args = _selected(self.sub, self.agent)
        if self.delivery_ids is not None:
            args["delivery_ids"] = list(self.delivery_ids)
        return args


@dataclass(frozen=True, slots=True)
class BusDlqPurge(BusDlqRedrive):
    """Drop dead letters (all when ``delivery_ids`` is None)."""

    op: ClassVar[str] = "bus.dlq.purge"


# -- transport bindings (issue 5) ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusBind(DomainCommand):
    """Carry ``topic``'s messages from now on through a broker transport
    (``backlog_max`` None: ``DEFAULT_BACKLOG``). ``mode`` ``"log"`` (the
    default; None in the record, so older entries keep their bytes): every
    message is committed first and the leader copies it to the broker;
    ``"direct"``: messages go from the node that took them straight to the
    broker and never enter the log."""

    op: ClassVar[str] = "bus.bind"
    topic: str
    transport: str
    backlog_max: int | None = None
    mode: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        topic = check_topic(args.get("topic"))
        check_publishable_topic(topic)
        transport = require_str(args, "transport", MAX_TRANSPORT_NAME_LEN)
        backlog_max = None
        if "backlog_max" in args:  # null too: "the default" is leaving it out
            backlog_max = check_int(args["backlog_max"], "backlog_max", 1, MAX_BACKLOG)
        mode = args.get("mode")
        if mode is not None and mode not in BINDING_MODES:
            raise invalid("mode", 'must be "log" (the default) or "direct"')
        return cls(topic, transport, backlog_max, None if mode == "log" else mode)

    def to_args(self) -> dict[str, Any]:
        return _with({"topic": self.topic, "transport": self.transport}, backlog_max=self.backlog_max,
                     mode=self.mode)


@dataclass(frozen=True, slots=True)
class BusUnbind(DomainCommand):
    """Stop sending ``topic`` to its broker (``drop_backlog`` None: false)."""

    op: ClassVar[str] = "bus.unbind"
    topic: str
    drop_backlog: bool | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_topic(args.get("topic")), _flag(args, "drop_backlog"))

    def to_args(self) -> dict[str, Any]:
        return _with({"topic": self.topic}, drop_backlog=self.drop_backlog)


@dataclass(frozen=True, slots=True)
class BusCursor(DomainCommand):
    """Proposed by the leader once the broker holds ``topic``'s messages up
    to ``offset``; ``created_index`` names the binding it sent them for."""

    op: ClassVar[str] = "bus.cursor"
    topic: str
    offset: int
    created_index: int | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        topic = check_topic(args.get("topic"))
        offset = check_int(args.get("offset"), "offset", 0, MAX_OFFSET)
        created_index = None
        if "created_index" in args:
            created_index = check_int(args["created_index"], "created_index", 0, MAX_OFFSET)
        return cls(topic, offset, created_index)

    def to_args(self) -> dict[str, Any]:
        return _with({"topic": self.topic, "offset": self.offset}, created_index=self.created_index)


@dataclass(frozen=True, slots=True)
class BusTransportAck(DomainCommand):
    """Message keys a transport consumer processed (committed before the broker ack)."""

    op: ClassVar[str] = "bus.transport.ack"
    sub: str | None
    agent: str | None
    keys: tuple[str, ...]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        sub, agent = _selector(args)
        keys = args.get("keys")
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_ACK_IDS \
                or not all(isinstance(k, str) and 0 < len(k) <= MAX_TRANSPORT_KEY_LEN for k in keys):
            raise invalid("keys", f"must be a list of 1 to {MAX_ACK_IDS} message keys")
        return cls(sub, agent, tuple(keys))

    def to_args(self) -> dict[str, Any]:
        return {**_selected(self.sub, self.agent), "keys": list(self.keys)}


@dataclass(frozen=True, slots=True)
class BusTransportCheckpoint(DomainCommand):
    """How many deliveries a direct-mode transport consumer acked at its broker
    since the node serving it last said so (``acked``), and the broker's
    position it acked through where the broker has one (``position``).
    Progress for status and other nodes; correctness never depends on it
    (the broker's consumer group is the cursor)."""

    op: ClassVar[str] = "bus.transport.checkpoint"
    sub: str | None
    agent: str | None
    acked: int
    position: int | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        sub, agent = _selector(args)
        acked = check_int(args.get("acked"), "acked", 0, MAX_CHECKPOINT_ACKED)
        return cls(sub, agent, acked, _optional_int(args, "position", 0, MAX_OFFSET))

    def to_args(self) -> dict[str, Any]:
        return _with({**_selected(self.sub, self.agent), "acked": self.acked}, position=self.position)


def check_url(value: Any) -> str:
    """A broker URL: ``scheme://...``, at most ``MAX_URL_LEN`` characters."""
    if not isinstance(value, str) or "://" not in value or len(value) > MAX_URL_LEN:
        raise invalid("url", URL_HINT)
    return check_str(value, "url", MAX_URL_LEN)


@dataclass(frozen=True, slots=True)
class BusTransportConfigure(DomainCommand):
    """Set (``url``) or remove (``url`` None) the cluster-wide URL of a broker transport."""

    op: ClassVar[str] = "bus.transport.configure"
    name: str
    url: str | None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        name = require_str(args, "name", MAX_TRANSPORT_NAME_LEN)
        url = args.get("url")
        return cls(name, None if url is None else check_url(url))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url}

    def __repr__(self) -> str:  # the URL may hold a password
        return f"BusTransportConfigure(name={self.name!r}, url={'<set>' if self.url else None})"


# -- timers -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BusTick(ArglessCommand):
    """Proposed by the leader when a bus timer is due by its clock."""

    op: ClassVar[str] = "bus.tick"


COMMAND_TYPES: tuple[type[DomainCommand], ...] = (
    BusPublish, BusTopicConfigure, BusSubscribe, BusUnsubscribe, BusGroupDelete, BusDeliver, BusAck, BusNack,
    BusDlqRedrive, BusDlqPurge, BusBind, BusUnbind, BusCursor, BusTransportAck, BusTransportConfigure, BusTick,
    BusTransportCheckpoint,
)
