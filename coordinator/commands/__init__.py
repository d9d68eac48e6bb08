"""Typed commands: one frozen type per operation, with the one parse that
validates its arguments, used by the API before proposing and by
``StateMachine.apply`` on every replica (``base.DomainCommand``).

Migration goes domain by domain: ``COMMANDS`` lists the operations that have
a type; the others still travel and are validated as dicts by their handlers.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from coordinator.commands import bus
from coordinator.commands.base import DomainCommand
from coordinator.commands.kv import KvCas, KvDelete, KvPut
from coordinator.commands.locks import LockAcquire, LockExpire, LockRelease
from coordinator.commands.transforms import TransformDelete, TransformPut

_TYPES: tuple[type[DomainCommand], ...] = (
    KvPut, KvCas, KvDelete, LockAcquire, LockRelease, LockExpire,
    *bus.COMMAND_TYPES, TransformPut, TransformDelete,
)

COMMANDS: Mapping[str, type[DomainCommand]] = MappingProxyType({t.op: t for t in _TYPES})
