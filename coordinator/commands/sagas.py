"""Commands of sagas: ``saga.start`` (from the API), ``saga.cancel`` (from
the API), and what the leader's orchestrator (``services.sagas``) proposes
about one attempt of a step: ``saga.outcome``, ``saga.retry``,
``saga.resumed``.

The parse checks a definition and fills its defaults
(``normalize_definition``); whether a saga or one of its steps exists, and
whether an attempt is the one in flight, is the state's to say
(``state.sagas``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from coordinator.commands.base import (
    DomainCommand,
    check_int,
    check_known,
    check_number,
    check_object,
    check_str,
    invalid,
)
from coordinator.commands.topics import check_topic

SAGA_STATES = ("running", "compensating", "completed", "compensated", "failed-stuck")
FINAL_STATES = frozenset({"completed", "compensated", "failed-stuck"})
ACTION_KINDS = ("agent", "topic")
PHASES = ("action", "compensation")
DEFINITION_FIELDS = ("id", "name", "steps", "input", "compensation_retry")

MAX_STEPS = 100
MAX_STEP_ID_LEN = 128  # a saga's id and its steps' ids
MAX_PATH_LEN = 512
MAX_ATTEMPTS = 100
MAX_COMPENSATION_ATTEMPTS = 1000
MIN_TIMEOUT_S = 0.01
MAX_TIMEOUT_S = 3600.0
MAX_BACKOFF_S = 3600.0
MAX_ERROR_LEN = 1024  # an outcome's error as kept, and a cancellation's reason
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_AGENT_PATH = "/saga"
_GENERATED_ID = re.compile(r"saga-[0-9]+")  # saga-<log index>, given to sagas started without an id


def check_saga_id(value: Any) -> str:
    """A saga's id, named ``saga``. The API checks a path's id with it before
    reading the body (and for reads), then the parse checks it again."""
    return check_str(value, "saga", MAX_STEP_ID_LEN)


# -- definitions ----------------------------------------------------------------------------


def normalize_action(value: Any, field_name: str) -> dict[str, Any]:
    """``{"kind": "agent", "agent_type" | "agent_id", "path"?, "payload"?}`` or
    ``{"kind": "topic", "topic", "reply"?, "payload"?}``, with defaults filled."""
    action = check_object(value, field_name)
    kind = action.get("kind")
    if kind not in ACTION_KINDS:
        raise invalid(f"{field_name}.kind", f"must be one of {', '.join(ACTION_KINDS)}")
    if kind == "agent":
        check_known(action, field_name, ("kind", "agent_type", "agent_id", "path", "payload"))
        if ("agent_type" in action) == ("agent_id" in action):
            raise invalid(field_name, "an agent action names exactly one of agent_type and agent_id")
        target = "agent_type" if "agent_type" in action else "agent_id"
        path = action.get("path", DEFAULT_AGENT_PATH)
        check_str(path, f"{field_name}.path", MAX_PATH_LEN)
        if not path.startswith("/"):
            raise invalid(f"{field_name}.path", "must start with /")
        return {"kind": "agent", target: check_str(action[target], f"{field_name}.{target}"), "path": path,
                "payload": action.get("payload")}
    check_known(action, field_name, ("kind", "topic", "reply", "payload"))
    reply = action.get("reply", False)
    if not isinstance(reply, bool):
        raise invalid(f"{field_name}.reply", "must be true or false")
    return {"kind": "topic", "topic": check_topic(action.get("topic"), f"{field_name}.topic"), "reply": reply,
            "payload": action.get("payload")}


def _retry(value: Any, field_name: str, max_attempts: int, default_attempts: int) -> dict[str, Any]:
    retry = check_object({} if value is None else value, field_name)
    check_known(retry, field_name, ("max_attempts", "backoff_s", "backoff_max_s", "multiplier"))
    out = {
        "max_attempts": check_int(retry.get("max_attempts", default_attempts), f"{field_name}.max_attempts",
                                  1, max_attempts),
        "backoff_s": check_number(retry.get("backoff_s", 1.0), f"{field_name}.backoff_s", 0.0, MAX_BACKOFF_S),
        "backoff_max_s": check_number(retry.get("backoff_max_s", 60.0), f"{field_name}.backoff_max_s",
                                      0.0, MAX_BACKOFF_S),
        "multiplier": check_number(retry.get("multiplier", 2.0), f"{field_name}.multiplier", 1.0, 10.0),
    }
    if out["backoff_max_s"] < out["backoff_s"]:
        raise invalid(f"{field_name}.backoff_max_s", "must not be below backoff_s")
    return out


def normalize_definition(value: Any) -> dict[str, Any]:
    """Validate a saga definition and fill its defaults; ``Rejected`` (400)
    naming the field otherwise. The check of ``SagaStart.parse``: the API's
    before proposing, and every replica's when applying."""
    definition = check_object(value, "definition")
    check_known(definition, "definition", DEFINITION_FIELDS)
    saga_id = definition.get("id")
    if saga_id is not None:
        check_str(saga_id, "id", MAX_STEP_ID_LEN)
        if _GENERATED_ID.fullmatch(saga_id):
            raise invalid("id", "names of the form saga-<number> are reserved for generated ids")
    name = check_str(definition.get("name", "saga"), "name")
    raw_steps = definition.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise invalid("steps", "must be a non-empty list")
    if len(raw_steps) > MAX_STEPS:
        raise invalid("steps", f"must have at most {MAX_STEPS} steps")
    steps: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_steps):
        where = f"steps[{i}]"
        step = check_object(raw, where)
        check_known(step, where, ("id", "action", "compensation", "timeout_s", "retry", "depends_on"))
        step_id = check_str(step.get("id"), f"{where}.id", MAX_STEP_ID_LEN)
        if step_id in seen:
            raise invalid(f"{where}.id", f"step {step_id!r} is defined twice")
        seen.add(step_id)
        if "action" not in step:
            raise invalid(f"{where}.action", "is required")
        depends = step.get("depends_on")
        if depends is None:
            depends = [steps[-1]["id"]] if steps else []
        elif not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
            raise invalid(f"{where}.depends_on", "must be a list of step ids")
        steps.append({
            "id": step_id,
            "action": normalize_action(step["action"], f"{where}.action"),
            "compensation": (None if step.get("compensation") is None
                             else normalize_action(step["compensation"], f"{where}.compensation")),
            "timeout_s": check_number(step.get("timeout_s", DEFAULT_TIMEOUT_S), f"{where}.timeout_s",
                                      MIN_TIMEOUT_S, MAX_TIMEOUT_S),
            "retry": _retry(step.get("retry"), f"{where}.retry", MAX_ATTEMPTS, 1),
            "depends_on": sorted(set(depends)),
        })
    ids = {s["id"] for s in steps}
    for i, step in enumerate(steps):
        for dep in step["depends_on"]:
            if dep not in ids:
                raise invalid(f"steps[{i}].depends_on", f"unknown step {dep!r}")
    cycle = _find_cycle({s["id"]: s["depends_on"] for s in steps})
    if cycle:
        raise invalid("steps", f"dependency cycle: {' -> '.join(cycle)}")
    return {
        "id": saga_id,
        "name": name,
        "steps": steps,
        "input": definition.get("input"),
        "compensation_retry": _retry(definition.get("compensation_retry"), "compensation_retry",
                                     MAX_COMPENSATION_ATTEMPTS, 10),
    }


def _find_cycle(depends: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path that ends where it starts, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in depends:
        if state.get(root):
            continue
        path: list[str] = [root]
        iters = [iter(depends[root])]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(depends[nxt]))
    return None


# -- commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SagaStart(DomainCommand):
    """Start a saga. The log carries the definition as the caller wrote it
    (``definition``); the state keeps it checked, with its defaults filled
    (``normalized``, which follows from it and is left out of ``==``)."""

    op: ClassVar[str] = "saga.start"
    definition: dict[str, Any]
    normalized: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        definition = args.get("definition")
        return cls(definition, normalize_definition(definition))

    @classmethod
    def of(cls, definition: Any) -> Self:
        """The command starting ``definition``; ``Rejected`` naming its first bad field."""
        return cls.parse({"definition": definition})

    def to_args(self) -> dict[str, Any]:
        return {"definition": self.definition}


def _attempt(args: Mapping[str, Any]) -> tuple[str, str, str, int]:
    """saga, step, phase and attempt: what names one attempt of a step."""
    saga = check_saga_id(args.get("saga"))
    step = check_str(args.get("step"), "step", MAX_STEP_ID_LEN)
    phase = args.get("phase")
    if phase not in PHASES:
        raise invalid("phase", f"must be one of {', '.join(PHASES)}")
    return saga, step, phase, check_int(args.get("attempt"), "attempt", 1, MAX_COMPENSATION_ATTEMPTS)


def _flag(args: Mapping[str, Any], name: str, default: bool | None = None) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


@dataclass(frozen=True, slots=True)
class SagaOutcome(DomainCommand):
    """How one attempt ended: ``ok`` with the agent's ``result``, or not, with
    an ``error`` and whether it is ``permanent`` (no retry). The state applies
    it only if that attempt is the one in flight.

    The parse cuts ``error`` to ``MAX_ERROR_LEN`` characters (the orchestrator
    proposes it whole, as it always did); it keeps ``result`` only when
    ``ok``, and ``error`` and ``permanent`` only when not: the others change
    nothing and are not in the log the orchestrator writes."""

    op: ClassVar[str] = "saga.outcome"
    saga: str
    step: str
    phase: str
    attempt: int
    ok: bool
    result: Any = None
    error: str | None = None
    permanent: bool = False

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        saga, step, phase, attempt = _attempt(args)
        ok = _flag(args, "ok")
        permanent = _flag(args, "permanent", False)
        if ok:
            return cls(saga, step, phase, attempt, True, args.get("result"))
        error = args.get("error")
        return cls(saga, step, phase, attempt, False, None,
                   None if error is None else str(error)[:MAX_ERROR_LEN], permanent)

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"saga": self.saga, "step": self.step, "phase": self.phase,
                                "attempt": self.attempt, "ok": self.ok}
        if self.ok:
            args["result"] = self.result
        else:
            args["error"] = self.error
            args["permanent"] = self.permanent
        return args


@dataclass(frozen=True, slots=True)
class SagaRetry(DomainCommand):
    """Start ``attempt`` of a waiting step, once its time came by the
    proposer's clock (the command's time)."""

    op: ClassVar[str] = "saga.retry"
    saga: str
    step: str
    phase: str
    attempt: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(*_attempt(args))

    def to_args(self) -> dict[str, Any]:
        return {"saga": self.saga, "step": self.step, "phase": self.phase, "attempt": self.attempt}


@dataclass(frozen=True, slots=True)
class SagaResumed(DomainCommand):
    """A new leader (``node``) re-drives an attempt in flight whose outcome
    was never committed: history only."""

    op: ClassVar[str] = "saga.resumed"
    saga: str
    step: str
    phase: str
    attempt: int
    node: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(*_attempt(args), check_str(args.get("node"), "node"))

    def to_args(self) -> dict[str, Any]:
        return {"saga": self.saga, "step": self.step, "phase": self.phase, "attempt": self.attempt,
                "node": self.node}


@dataclass(frozen=True, slots=True)
class SagaCancel(DomainCommand):
    """Cancel a running saga: it compensates what succeeded. Without a
    ``reason`` the saga's history says ``cancelled``."""

    op: ClassVar[str] = "saga.cancel"
    saga: str
    reason: str | None = None  # None: left out of the log

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        saga = check_saga_id(args.get("saga"))
        # A reason given as null is refused (it was never "cancelled" by default).
        return cls(saga, check_str(args["reason"], "reason", MAX_ERROR_LEN) if "reason" in args else None)

    def to_args(self) -> dict[str, Any]:
        return {"saga": self.saga} if self.reason is None else {"saga": self.saga, "reason": self.reason}
