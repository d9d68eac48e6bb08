"""Guards on the shape of the code (STYLE.md section 5, DESIGN "Rules of the
replicated state machine"): what each part may import, and that every module
imports on its own in a fresh interpreter (aiohttp's test_circular_imports).

The import checks read the source with ``ast``, so they also see imports
inside functions and ``importlib.import_module("name")`` calls, which
import-linter does not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "cluster", "transports", "chaos")
STATE_DIR = ROOT / "coordinator" / "state"
COMMANDS_DIR = ROOT / "coordinator" / "commands"  # parsed by apply on every replica: as pure as the state

# Rule 1: the state machine is pure. No clock, no randomness, no I/O, no threads,
# no wire format, no engine.
STATE_FORBIDDEN = frozenset({
    "time", "random", "asyncio", "socket", "os", "threading", "datetime", "secrets", "uuid",
    "msgpack", "aiohttp", "pysyncobj",
})
# STYLE.md: the PBFT replica's decision code obeys the same core rule, once it exists.
PBFT_REPLICA = ROOT / "cluster" / "pbft" / "replica.py"
PBFT_FORBIDDEN = frozenset({"time", "random", "asyncio", "socket"})
# Rule 2: our code never unpickles anything.
UNPICKLERS = frozenset({"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle"})


def _python_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``path`` imports, absolute, with its line: import statements
    anywhere in the file, and ``importlib.import_module`` / ``__import__`` of a literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module, node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value, node.lineno


def _violations(path: Path, forbidden: frozenset[str]) -> list[str]:
    found = set()
    for module, line in _imports(path):
        top = module.split(".")[0]
        if top in forbidden:
            found.add(f"{path.relative_to(ROOT)}:{line} imports {top} ({module})")
    return sorted(found)


# -- the guard itself ------------------------------------------------------------------------


def test_the_import_scanner_sees_every_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    source = pkg / "mod.py"
    source.write_text(
        "import os.path\n"
        "import json, time as clock\n"
        "from datetime import datetime\n"
        "from . import sibling\n"
        "from .. import codec\n"
        "def late():\n"
        "    import random\n"
        "    importlib.import_module('socket')\n"
        "    return __import__('pickle')\n",
        encoding="utf-8",
    )
    modules = {module for module, _ in _imports(source)}
    assert modules == {"os.path", "json", "time", "datetime", "pkg.sub", "pkg", "random", "socket", "pickle"}
    assert _violations(source, frozenset({"os", "time", "datetime", "random", "socket", "pickle"})) == [
        "pkg/sub/mod.py:1 imports os (os.path)",
        "pkg/sub/mod.py:2 imports time (time)",
        "pkg/sub/mod.py:3 imports datetime (datetime)",
        "pkg/sub/mod.py:7 imports random (random)",
        "pkg/sub/mod.py:8 imports socket (socket)",
        "pkg/sub/mod.py:9 imports pickle (pickle)",
    ]
    assert _violations(source, frozenset({"json"})) == ["pkg/sub/mod.py:2 imports json (json)"]


# -- rule 1: a pure state machine ---------------------------------------------------------------


STATE_FILES = _python_files(STATE_DIR, COMMANDS_DIR)


def test_state_package_is_found() -> None:
    assert {p.name for p in STATE_FILES} >= {"__init__.py", "machine.py", "kv.py", "locks.py", "registry.py",
                                             "base.py"}
    assert any(p.parent == COMMANDS_DIR for p in STATE_FILES)


@pytest.mark.parametrize("path", STATE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_state_machine_imports_no_clock_randomness_or_io(path: Path) -> None:
    assert _violations(path, STATE_FORBIDDEN) == []


@pytest.mark.parametrize("name", ["replica.py", "messages.py", "faults.py"])
def test_the_pbft_protocol_core_imports_no_clock_randomness_or_io(name: str) -> None:
    """The replica, its messages and the Byzantine behaviours the simulator
    replays from a seed: no clock, no randomness, no I/O."""
    path = PBFT_REPLICA.parent / name
    assert path.exists()
    assert _violations(path, PBFT_FORBIDDEN) == []


# -- who may import the wire format and the engine -------------------------------------------------


def test_only_the_codec_imports_msgpack_in_the_core() -> None:
    codec = ROOT / "coordinator" / "codec.py"
    offenders = [v for p in _python_files(ROOT / "coordinator") if p != codec
                 for v in _violations(p, frozenset({"msgpack"}))]
    assert offenders == []
    assert _violations(codec, frozenset({"msgpack"})), "the codec is expected to be the msgpack user"


def test_only_the_raft_engine_imports_pysyncobj() -> None:
    engine = ROOT / "cluster" / "raft_pysyncobj.py"
    offenders = [v for p in _python_files(*(ROOT / pkg for pkg in PACKAGES)) if p != engine
                 for v in _violations(p, frozenset({"pysyncobj"}))]
    assert offenders == []


def test_nothing_unpickles() -> None:
    offenders = [v for p in _python_files(*(ROOT / pkg for pkg in PACKAGES)) for v in _violations(p, UNPICKLERS)]
    assert offenders == []


# -- the HTTP layer reads state through the view ------------------------------------------------------


def test_the_api_reads_state_only_through_the_view() -> None:
    """Handlers read through ``coordinator.services.view.StateView``
    (``node.view(consistency)``, ``node.local_view``), never by walking
    ``node.applier.machine``: import-linter cannot see attribute access."""
    offenders = [f"{p.relative_to(ROOT)}:{n.lineno} reads .{n.attr}"
                 for p in _python_files(ROOT / "coordinator" / "api")
                 for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                 if isinstance(n, ast.Attribute) and n.attr in ("applier", "machine")]
    assert offenders == []


# -- every module imports on its own ----------------------------------------------------------------


MODULES = [_module_name(p) for p in _python_files(*(ROOT / pkg for pkg in PACKAGES))]


def test_modules_are_discovered() -> None:
    assert {"coordinator", "coordinator.state.machine", "coordinator.codec", "cluster.raft_pysyncobj",
            "transports", "chaos"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_in_a_fresh_interpreter(module: str) -> None:
    """Catches import cycles and import-order dependencies that a test session,
    which has imported everything already, hides."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr}"
