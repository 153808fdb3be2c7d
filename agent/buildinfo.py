"""Which of the agent's modules run compiled, and which compiled modules are older than their source.

setup.py compiles the request path with mypyc when the machine can; where it cannot, the same
modules run as plain Python. Both behave the same, so the daemon says which it is running (its
start-up log, `GET /v1/status`), and the tests refuse a checkout whose compiled modules are
older than their source: Python imports the extension, not the edited file.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def compiled_modules() -> list[str]:
    """The agent's loaded modules that are extension modules (compiled), sorted."""
    found = []
    for name, module in list(sys.modules.items()):
        if name == "agent" or name.startswith("agent."):
            path = getattr(module, "__file__", None) or ""
            if path.endswith(_EXTENSION_SUFFIXES) and not name.endswith("__mypyc"):
                found.append(name)
    return sorted(found)


def stale_extensions(package_dir: Path) -> list[Path]:
    """Sources under `package_dir` changed after their compiled module was built.

    mypyc puts the code of every module in one shared library (`*__mypyc.*`) and gives each
    module a small extension that loads it, which a rebuild leaves alone when it is unchanged:
    a module was built when the newer of the two was."""
    extensions = [p for p in package_dir.rglob("*") if p.name.endswith(_EXTENSION_SUFFIXES)]
    shared = max((p.stat().st_mtime for p in extensions if "__mypyc" in p.name), default=0.0)
    stale = []
    for ext in extensions:
        source = ext.with_name(ext.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > max(ext.stat().st_mtime, shared):
            stale.append(source)
    return sorted(stale)
