"""Commands of projections: ``projection.put``, ``projection.rebuild``,
``projection.delete`` (``coordinator.state.projections`` says what a
projection folds), and the checks of a definition, which stream processors
(``coordinator.commands.streams``) share.

A definition is normalized by the parse (defaults filled in, ``types``
sorted), and the log carries it normalized: the API proposed it so before
the command types. Whether a projection exists, and room for another, are
the state's to say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.base import (
    DomainCommand,
    NamedCommand,
    check_known,
    check_object,
    check_resource_name,
    check_str,
    invalid,
)
from coordinator.commands.eventstore import check_category
from coordinator.commands.topics import check_pattern

FOLDS = ("count", "sum", "min", "max", "last", "set")
NUMERIC_FOLDS = ("sum", "min", "max")
DEFINITION_FIELDS = ("source", "types", "fold", "field", "group_by")
MAX_TYPES = 64
MAX_PATH_LEN = 256
MAX_PATH_DEPTH = 16
MAX_NAME_LEN = 128


def check_name(value: Any) -> str:
    """A projection's name (one URL path segment). The API checks a path's
    name with it before reading the body, then parse again."""
    return check_resource_name(value, "name", MAX_NAME_LEN)


def normalize_definition(raw: Any) -> dict[str, Any]:
    """A checked definition with defaults, or ``Rejected`` naming the field."""
    definition = check_object(raw, "definition")
    check_known(definition, "", DEFINITION_FIELDS)
    source, types = normalize_source(definition)
    fold, path = check_fold(definition)
    group_by = definition.get("group_by")
    if group_by is not None:
        check_path(group_by, "group_by")
    return {"source": source, "types": types, "fold": fold, "field": path, "group_by": group_by}


def normalize_source(definition: dict[str, Any]) -> tuple[dict[str, str], list[str] | None]:
    """``source`` ({"category": NAME} or {"topic": PATTERN}) and ``types`` of a definition."""
    source = check_object(definition.get("source"), "source")
    if len(source) != 1 or next(iter(source)) not in ("category", "topic"):
        raise invalid("source", 'must be {"category": NAME} or {"topic": PATTERN}')
    if "category" in source:
        category = check_category(check_str(source["category"], "source.category", MAX_NAME_LEN), "source.category")
        source = {"category": category}
    else:
        source = {"topic": check_pattern(source["topic"], "source.topic")}
    types = definition.get("types")
    if types is not None:
        if "topic" in source:
            raise invalid("types", "applies to category sources (a topic source is filtered by its pattern)")
        if not isinstance(types, list) or not 1 <= len(types) <= MAX_TYPES:
            raise invalid("types", f"must be a list of 1 to {MAX_TYPES} event types")
        types = sorted({check_str(t, f"types[{i}]") for i, t in enumerate(types)})
    return source, types


def check_fold(definition: dict[str, Any]) -> tuple[str, str | None]:
    """``fold`` and its ``field`` (required by the folds that read a value)."""
    fold = definition.get("fold")
    if fold not in FOLDS:
        raise invalid("fold", f"must be one of {', '.join(FOLDS)}")
    path = definition.get("field")
    if path is not None:
        check_path(path, "field")
    elif fold in (*NUMERIC_FOLDS, "set"):
        raise invalid("field", f"is required for the {fold} fold")
    return fold, path


def check_path(value: Any, name: str) -> None:
    path = check_str(value, name, MAX_PATH_LEN)
    parts = path.split(".")
    if len(parts) > MAX_PATH_DEPTH or not all(parts):
        raise invalid(name, f"must be names separated by single dots, at most {MAX_PATH_DEPTH} deep")


@dataclass(frozen=True, slots=True)
class ProjectionPut(DomainCommand):
    """Create or replace projection ``name`` with ``definition`` (normalized
    by the parse) and fold what its source still retains."""

    op: ClassVar[str] = "projection.put"
    name: str
    definition: dict[str, Any]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        # The definition first, then the name: the order apply always checked them in.
        definition = normalize_definition(args.get("definition"))
        return cls(check_name(args.get("name")), definition)

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "definition": self.definition}


@dataclass(frozen=True, slots=True)
class ProjectionRebuild(NamedCommand):
    """Fold projection ``name`` again from what its source still retains."""

    op: ClassVar[str] = "projection.rebuild"
    check_name = staticmethod(check_name)


@dataclass(frozen=True, slots=True)
class ProjectionDelete(NamedCommand):
    """Delete projection ``name``."""

    op: ClassVar[str] = "projection.delete"
    check_name = staticmethod(check_name)
