"""Tools some tests need that are not Python packages (a browser, etcd):
installed from Debian's package registry when missing, never downloaded
from elsewhere. Used by test fixtures only."""

from __future__ import annotations

import os
import shutil
import subprocess


def install(packages: list[str], *paths: str) -> str | None:
    """Make sure every file in ``paths`` exists, installing ``packages`` with
    apt-get when one is missing (an ``apt-get update`` and a retry when the
    package lists were never fetched). None when they are there; else why not,
    for a skip."""
    if all(os.path.exists(p) for p in paths):
        return None
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (prefix and not shutil.which("sudo")):
        return f"{', '.join(packages)}: not installed, and apt-get (as root) is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_command = ["apt-get", "install", "-y", *packages]
    for command in (install_command, ["apt-get", "update"], install_command):
        done = subprocess.run(prefix + command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and command is install_command and all(os.path.exists(p) for p in paths):
            return None
    return f"installing {', '.join(packages)} failed: {done.stderr[-300:]}"
