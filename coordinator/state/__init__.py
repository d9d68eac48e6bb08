"""The replicated state machine: pure, deterministic, no I/O.

Nothing in this package reads a clock, draws a random number, touches a
socket or a file, or imports an I/O library. Time arrives as ``Command.now_ms``.
"""

from coordinator.state.machine import Limits, StateMachine

__all__ = ["Limits", "StateMachine"]
