"""Typed commands: one frozen type per operation, with the one parse that
validates its arguments, used by the API before proposing and by
``StateMachine.apply`` on every replica (``base.DomainCommand``).

``COMMANDS`` maps every operation the log may carry to its type; one module
per domain. ``to_args()`` gives the exact dict that goes in the log (its
bytes and the state digest chain depend on it), and
``parse(c.to_args()) == c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from coordinator.commands import bus
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
from coordinator.commands.cluster import Barrier, MemberRegister, MemberRemove, Noop, SystemReport
from coordinator.commands.eventstore import EsAppend, EsDelete, EsSnapshot
from coordinator.commands.kv import KvCas, KvDelete, KvPut
from coordinator.commands.locks import LockAcquire, LockExpire, LockRelease
from coordinator.commands.projections import ProjectionDelete, ProjectionPut, ProjectionRebuild
from coordinator.commands.sagas import SagaCancel, SagaOutcome, SagaResumed, SagaRetry, SagaStart
from coordinator.commands.streams import ProcessorDelete, ProcessorPut, StreamsTick
from coordinator.commands.transforms import TransformDelete, TransformPut

_TYPES: tuple[type[DomainCommand], ...] = (
    KvPut, KvCas, KvDelete,
    LockAcquire, LockRelease, LockExpire,
    Noop, Barrier, MemberRegister, MemberRemove, SystemReport,
    AgentRegister, AgentUpdate, AgentDeregister, AgentExpire, AgentHealth, AgentSuspect, AgentAlive,
    RolePut, RoleDelete, RoleGrant, SecurityConfigure, AccessUnpin,
    SagaStart, SagaOutcome, SagaRetry, SagaResumed, SagaCancel,
    ServiceConfigure, ServiceRemove,
    EsAppend, EsSnapshot, EsDelete,
    ProjectionPut, ProjectionRebuild, ProjectionDelete,
    ProcessorPut, ProcessorDelete, StreamsTick,
    *bus.COMMAND_TYPES, TransformPut, TransformDelete,
)

COMMANDS: Mapping[str, type[DomainCommand]] = MappingProxyType({t.op: t for t in _TYPES})
