"""Transform rules as a service: trying a rule on a message without defining
it (``POST /v1/transforms/try``). Pure: nothing is proposed or stored."""

from __future__ import annotations

from typing import Any

from coordinator.commands.transforms import Program
from coordinator.state.transforms import Failed, run


def try_rule_on(program: Program, topic: str, message: dict[str, Any]) -> dict[str, Any]:
    """What ``program`` makes of ``message`` published on ``topic`` (changed in
    place): ``applied`` with the topic it goes to and the message, or the
    failure with its line."""
    try:
        route = run(program, message)
    except Failed as failed:
        return {"applied": False, "failure": f"line {failed.line}: {failed.why}"}
    return {"applied": True, "topic": route or topic, "message": message}
