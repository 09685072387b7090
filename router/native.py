"""Which build of the hot path runs: compiled with mypyc, or the same source as Python.

The modules in COMPILED are compiled with mypyc when the package is installed where a C
compiler and Python's headers are at hand (setup.py calls `plan_build` here); their
.py files stay the one source, and every other module is Python either way. The compiled
modules share one library, `grayroute__mypyc`, installed beside the packages.

    GRAYROUTE_PURE=1 when installing     no compilation: the package in pure Python
    GRAYROUTE_PURE=1 when running        the .py files are imported even where compiled
                                         modules are installed (both builds run from one
                                         checkout, side by side: benchmarks/run.py)

An editable install (`pip install -e .`, `make`) keeps the compiled modules beside their
sources, and Python prefers them: an edited source would be ignored in silence. So the
build records a digest of every source it compiled (RECORD, package data), and importing
a compiled module whose source no longer matches fails with the command that rebuilds
(`make build`), as does a compiled module without a record. `install_finder` (called by
router/__init__.py) puts both rules in front of Python's import system; they cost nothing
but for the modules in COMPILED, checked once per process.

A compiled module has the values of the `Final` names it imports built in: those live in
the compiled modules themselves (a change to one elsewhere would not be seen until the
next build, and nothing would say so).

This module uses the standard library alone: setup.py loads it by its path, before
anything else of the package can be imported.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final, NamedTuple

__all__ = [
    "COMPILED",
    "PURE_ENV",
    "BuildInfo",
    "StaleBuildError",
    "build_info",
    "check",
    "install_finder",
    "plan_build",
    "pure_requested",
    "rebuild_reason",
    "remove_compiled",
    "stale_problem",
    "write_record",
]

# The hot path: what runs per request (router/proxy.py and what it calls per request).
COMPILED: Final = (
    "router.proxy",
    "router.upstream",
    "router.rules.compile",
    "router.rules.decide",
    "router.rules.user_id",
    "router.rules.hashing",
)
PURE_ENV: Final = "GRAYROUTE_PURE"
# The shared library of the compiled modules: grayroute__mypyc.<ext suffix>, top level.
GROUP: Final = "grayroute"
# What the build made, in the router package: {"build": "compiled", "mypyc": version,
# "sources": {module: sha256 of its .py}}, or {"build": "pure", "cause": "requested" |
# "toolchain" | "mypyc", "reason": for people}.
RECORD: Final = "_native.json"
REBUILD: Final = "make build"

_PACKAGE_DIR: Final = Path(__file__).resolve().parent


class StaleBuildError(ImportError):
    """A compiled module that is not what its source says."""


class BuildInfo(NamedTuple):
    kind: str  # "compiled" or "pure"
    detail: str  # "mypyc 2.4.1", or why the build is pure

    def __str__(self) -> str:
        if self.kind == "compiled":
            return f"compiled with {self.detail}"
        return f"pure Python: {self.detail}"


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _module_file(package_dir: Path, module: str, suffix: str) -> Path:
    # "router.rules.decide" -> <package_dir>/rules/decide<suffix>
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(suffix)


def _compiled_files(package_dir: Path, module: str) -> list[Path]:
    return [
        path
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (path := _module_file(package_dir, module, suffix)).exists()
    ]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_record(package_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((package_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def build_info(package_dir: Path = _PACKAGE_DIR) -> BuildInfo:
    """The build that imports of the compiled modules get in this process."""
    if pure_requested():
        return BuildInfo("pure", f"{PURE_ENV}=1")
    record = _read_record(package_dir) or {}
    if _compiled_files(package_dir, COMPILED[0]):
        return BuildInfo("compiled", f"mypyc {record.get('mypyc', '?')}")
    if record.get("build") == "pure":
        return BuildInfo("pure", str(record.get("reason", "")))
    return BuildInfo("pure", f"not compiled: run `{REBUILD}`")


def stale_problem(package_dir: Path = _PACKAGE_DIR) -> str | None:
    """Why the compiled modules installed in `package_dir` must not be imported (None: they
    may be, or there are none)."""
    compiled = [m for m in COMPILED if _compiled_files(package_dir, m)]
    if not compiled:
        return None

    def sources(modules: list[str]) -> str:
        return ", ".join(str(_module_file(Path(package_dir.name), m, ".py")) for m in modules)

    missing = [m for m in COMPILED if m not in compiled]
    if missing:
        return f"the compiled build is incomplete: {sources(missing)} not compiled"
    record = _read_record(package_dir) or {}
    digests = record.get("sources")
    if record.get("build") != "compiled" or not isinstance(digests, dict):
        return f"compiled modules without a build record ({package_dir / RECORD})"
    changed = [
        m for m in COMPILED if digests.get(m) != _digest(_module_file(package_dir, m, ".py"))
    ]
    if not changed:
        return None
    were = "it was" if len(changed) == 1 else "they were"
    return f"{sources(changed)} changed since {were} compiled"


def check(package_dir: Path = _PACKAGE_DIR) -> None:
    """Raise StaleBuildError, saying what to run, if the compiled modules must not load."""
    problem = stale_problem(package_dir)
    if problem is not None:
        raise StaleBuildError(
            f"{problem}: run `{REBUILD}` to compile the hot path again "
            f"(`pip install -e .` does the same), or set {PURE_ENV}=1 to run the sources"
        )


def rebuild_reason(package_dir: Path = _PACKAGE_DIR) -> str | None:
    """Why an editable install should be compiled again now (None: it need not be): a
    compiled module is stale, or none is compiled although the build could be."""
    if pure_requested():
        return None
    problem = stale_problem(package_dir)
    if problem is not None:
        return problem
    if _compiled_files(package_dir, COMPILED[0]):
        return None
    record = _read_record(package_dir) or {}
    if record.get("cause") == "toolchain" and compiler_problem() is not None:
        return None  # still nothing to compile with: pure it stays
    return f"not compiled ({build_info(package_dir).detail})"


class _Finder(importlib.abc.MetaPathFinder):
    """The modules in COMPILED: from their .py files when pure is asked for; never from a
    compiled module that does not match its source."""

    def __init__(self) -> None:
        self.checked = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or path is None:
            return None
        if pure_requested():
            loaders = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
            for entry in path:
                spec = importlib.machinery.FileFinder(entry, loaders).find_spec(fullname)
                if spec is not None:
                    return spec
            return None
        if not self.checked:
            check()
            self.checked = True
        return None  # the import system's own finders: the compiled module, or the .py


def install_finder() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


# -- the build side (setup.py) ------------------------------------------------------------
def compiler_problem() -> str | None:
    """Why C extensions cannot be built for this Python here (None: they can): a test
    compile of a file that includes Python.h, with the compiler Python was built with."""
    import shlex
    import shutil
    import subprocess
    import sysconfig
    import tempfile

    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers: no {include}/Python.h (on Debian: apt-get install python3-dev)"
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler: no {' '.join(cc) or 'cc'} (on Debian: apt-get install gcc)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text("#include <Python.h>\nint probe(void) { return Py_IsInitialized(); }\n")
        done = subprocess.run(
            [*cc, "-c", f"-I{include}", str(src), "-o", str(Path(tmp, "probe.o"))],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["?"])[0]
        return f"the C compiler cannot build against Python.h: {first}"
    return None


def write_record(package_dir: Path, record: dict[str, Any]) -> None:
    path = package_dir / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def remove_compiled(root: Path) -> None:
    """Compiled modules left beside the sources under `root` by an in-place build."""
    package_dir = root / "router"
    for module in COMPILED:
        for path in _compiled_files(package_dir, module):
            path.unlink()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        root.joinpath(f"{GROUP}__mypyc{suffix}").unlink(missing_ok=True)


def plan_build(root: Path) -> tuple[list[Any], dict[str, Any]]:
    """The extensions for setup() (none: pure) and the record of that build. setup.py
    writes the record where the build goes once the build is done; a compiled record
    holds the digests of the sources as mypyc reads them, right after this."""
    import tempfile

    cause, reason = "", ""
    if pure_requested():
        cause, reason = "requested", f"{PURE_ENV}=1 when installed"
    elif (problem := compiler_problem()) is not None:
        cause, reason = "toolchain", problem
    else:
        try:
            from mypy.version import __version__ as mypy_version
            from mypyc.build import mypycify
        except ImportError:
            cause, reason = "mypyc", "mypyc was not installed when the package was built"
    if cause:
        print(f"grayroute: the hot path stays pure Python: {reason}", file=sys.stderr)
        return [], {"build": "pure", "cause": cause, "reason": reason, "sources": {}}
    package_dir = root / "router"
    record = {
        "build": "compiled",
        "mypyc": mypy_version,
        "sources": {m: _digest(_module_file(package_dir, m, ".py")) for m in COMPILED},
    }
    paths = [str(_module_file(package_dir, m, ".py").relative_to(root)) for m in COMPILED]
    with tempfile.TemporaryDirectory() as tmp:
        # Not the project's [tool.mypy]: that is `make lint`'s strict check, with every
        # library's types installed; strictness only adds errors, never changes a type
        # mypyc compiles by, and the Python version is the one being built for. No
        # installed library's types either (no_site_packages): whether httptools or
        # orjson is installed yet when the build runs would change the compiled code,
        # and where a library's stubs are wrong (httptools' URL.userinfo is None when
        # absent, not bytes) compiled code would raise where Python does not.
        config = Path(tmp, "mypy.ini")
        config.write_text("[mypy]\nignore_missing_imports = True\nno_site_packages = True\n")
        extensions: list[Any] = mypycify(["--config-file", str(config), *paths], group_name=GROUP)
    return extensions, record


def main(args: Sequence[str]) -> int:
    """For the Makefile: print the build; with --fresh, exit 1, saying why, when the
    editable install should be compiled again (`make test` and `make demo` then do)."""
    if list(args) == ["--fresh"]:
        reason = rebuild_reason()
        if reason is None:
            return 0
        print(f"grayroute: the hot path needs compiling: {reason}", file=sys.stderr)
        return 1
    if args:
        print("usage: main([--fresh])", file=sys.stderr)
        return 2
    print(build_info())
    return 0
