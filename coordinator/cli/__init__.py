"""The ``coordinator`` command line: ``serve`` runs a node; every other
command is a client of a running cluster (see ``coordinator --help``).

``main`` is the entry point; ``python -m coordinator.cli`` runs it too."""

from __future__ import annotations

from coordinator.cli.main import DISTRIBUTION, main, version

__all__ = ["DISTRIBUTION", "main", "version"]
