"""The agent's request path, compiled to C with mypyc when the machine can build it.

Everything else about the package is in pyproject.toml. The modules below are the ones every
inference request runs through (docs/benchmarks.md, "The compiled request path"): mypyc turns
their typed Python into a C extension, which made the agent's CPU per request about a quarter
smaller on the bench. The same modules stay importable as plain Python: set
OUTPOST_PURE_PYTHON=1, or build where mypy or a C compiler is missing, and the package installs
without the extension (with a warning), behaving the same, only slower.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "agent/serving/http.py",
    "agent/serving/app.py",
    "agent/serving/oip.py",
    "agent/serving/jsonrows.py",
    "agent/serving/datatypes.py",
    "agent/serving/busypoll.py",
    "agent/runtime/batcher.py",
    "agent/runtime/cache.py",
    "agent/metrics.py",
    "agent/monitor/service.py",
    "agent/monitor/summary.py",
    "agent/monitor/binning.py",
]

# mypyc type-checks what it compiles. A build environment of its own has mypy but not the
# agent's dependencies: their types are then unknown (Any), which mypyc compiles as generic
# Python operations, and the `type: ignore`s written for their stubs are unused there.
MYPY_OPTIONS = ["--ignore-missing-imports", "--no-warn-unused-ignores", "--no-warn-return-any"]


def _warn(message: str) -> None:
    print(
        f"outpost: {message}; installing the agent as plain Python (slower, same behaviour)", file=sys.stderr
    )


class _OptionalBuildExt(build_ext):
    """A failed compile installs the plain-Python modules instead of failing the install.

    All or nothing: each module's small extension loads mypyc's shared library, so one built
    without the other would not import. What did build is removed."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler or Python headers: setuptools' own errors
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            _warn(f"the compiled request path did not build ({exc})")
            return
        # Built from the sources as they are now, even where mypyc wrote the same C as before and
        # the compiler was skipped (an edit to a comment or to __slots__' order): mark them so,
        # or the tests' check (agent.buildinfo.stale_extensions) would take them for stale.
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            if built.exists():
                os.utime(built)


def _ext_modules() -> list[Any]:
    if os.environ.get("OUTPOST_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    try:
        return list(
            mypycify([*MYPY_OPTIONS, *COMPILED], opt_level="3", debug_level="0", group_name="agent._compiled")
        )
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error it cannot compile
        _warn(f"mypyc could not compile the request path ({exc!r})")
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _OptionalBuildExt})
