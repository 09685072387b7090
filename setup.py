"""The build: the hot path compiled with mypyc where a C compiler and Python's headers are
at hand, else the same package in pure Python (and with GRAYROUTE_PURE=1). Which modules,
and how a build is recorded and checked: router/native.py. Everything else: pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent

# router/native.py by its path: the package's dependencies need not be installed yet.
_spec = importlib.util.spec_from_file_location("_grayroute_native", ROOT / "router" / "native.py")
assert _spec is not None and _spec.loader is not None
native: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = native
_spec.loader.exec_module(native)

EXTENSIONS, RECORD = native.plan_build(ROOT)


class BuildPy(build_py):
    """A pure build's record goes into the package (a compiled one: BuildExt)."""

    def run(self) -> None:
        super().run()
        if not EXTENSIONS:
            native.write_record(Path(self.build_lib) / "router", RECORD)


class BuildExt(build_ext):
    """The compiled modules, then their record: only once all of them are built, so that
    an in-place build that fails leaves compiled modules without a record, which refuse
    to load, never stale ones that look fresh."""

    def run(self) -> None:
        where = (ROOT if self.inplace else Path(self.build_lib)) / "router"
        where.joinpath(native.RECORD).unlink(missing_ok=True)
        super().run()
        native.write_record(where, RECORD)


class EditableWheel(editable_wheel):
    """An editable install imports from the sources: a pure one must not leave compiled
    modules of an earlier build there to shadow them."""

    def run(self) -> None:
        if not EXTENSIONS:
            native.remove_compiled(ROOT)
            native.write_record(ROOT / "router", RECORD)
        super().run()


setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_py": BuildPy, "build_ext": BuildExt, "editable_wheel": EditableWheel},
)
