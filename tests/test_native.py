"""router/native.py: which build runs, the refusal of stale compiled modules, the pure
fallback end to end.

The pure build is proven the way it runs in production: `grayroute serve` started with
GRAYROUTE_PURE=1, its worker routing real requests to real upstreams, and the worker's
memory map showing that no compiled module was loaded. The rest of the suite runs
against whatever build is installed (`make test`: the compiled one where a C compiler
is at hand; the header of the pytest run says which).
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from router import native
from router.demo import DemoUpstream, RouterProcess

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
REPO = Path(native.__file__).resolve().parent.parent


def fake_package(root: Path, compiled: bool = True) -> Path:
    """router/ with the finder and sources of COMPILED (each `VALUE = 1`), compiled files
    (not loadable: the finder decides before anything is loaded) and a record that
    matches the sources."""
    package = root / "router"
    package.mkdir(parents=True)
    for name in ("__init__.py", "native.py"):
        shutil.copy(REPO / "router" / name, package / name)
    digests = {}
    for module in native.COMPILED:
        source = package.joinpath(*module.split(".")[1:]).with_suffix(".py")
        source.parent.mkdir(exist_ok=True)
        source.write_text("VALUE = 1\n")
        digests[module] = native._digest(source)
        if compiled:
            source.with_suffix(SUFFIX).write_bytes(b"not a shared object")
    (package / "rules" / "__init__.py").touch()
    record = {"build": "compiled", "mypyc": "9.9", "sources": digests}
    native.write_record(package, record if compiled else {"build": "pure", "reason": "r"})
    return package


def test_a_fresh_compiled_build_may_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)  # the suite may run with it set
    package = fake_package(tmp_path)
    assert native.stale_problem(package) is None
    native.check(package)
    assert native.build_info(package) == native.BuildInfo("compiled", "mypyc 9.9")
    assert str(native.build_info(package)) == "compiled with mypyc 9.9"


def test_an_edited_source_makes_its_compiled_module_stale(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    (package / "proxy.py").write_text("VALUE = 2\n")
    assert native.stale_problem(package) == "router/proxy.py changed since it was compiled"
    (package / "rules" / "decide.py").write_text("VALUE = 2\n")
    assert native.stale_problem(package) == (
        "router/proxy.py, router/rules/decide.py changed since they were compiled"
    )
    with pytest.raises(native.StaleBuildError, match=r"run `make build`.*GRAYROUTE_PURE=1"):
        native.check(package)


def test_compiled_modules_without_a_record_or_incomplete_are_refused(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    (package / native.RECORD).unlink()
    assert native.stale_problem(package) == (
        f"compiled modules without a build record ({package / native.RECORD})"
    )
    package.joinpath("upstream").with_suffix(SUFFIX).unlink()
    assert native.stale_problem(package) == (
        "the compiled build is incomplete: router/upstream.py not compiled"
    )


def test_a_pure_build_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    package = fake_package(tmp_path, compiled=False)
    assert native.stale_problem(package) is None
    assert str(native.build_info(package)) == "pure Python: r"
    (package / native.RECORD).unlink()
    assert native.build_info(package) == native.BuildInfo("pure", "not compiled: run `make build`")
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert str(native.build_info(fake_package(tmp_path / "c"))) == "pure Python: GRAYROUTE_PURE=1"
    monkeypatch.setenv(native.PURE_ENV, "0")
    assert native.build_info(fake_package(tmp_path / "d")).kind == "compiled"


def test_importing_a_stale_compiled_module_fails_saying_what_to_run(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    (package / "upstream.py").write_text("VALUE = 2\n")
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    code = "import router.upstream; print(router.upstream.VALUE)"
    run = [sys.executable, "-c", code]
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "router.native.StaleBuildError: router/upstream.py changed since it was compiled: "
        "run `make build` to compile the hot path again (`pip install -e .` does the same), "
        "or set GRAYROUTE_PURE=1 to run the sources"
    )
    # GRAYROUTE_PURE=1: the sources as they are, compiled modules or not.
    env[native.PURE_ENV] = "1"
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "2\n"), done.stderr


def test_rebuild_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make test` and `make demo` compile again for (`python -m router.native --fresh`)."""
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    package = fake_package(tmp_path)
    assert native.rebuild_reason(package) is None
    (package / "proxy.py").write_text("VALUE = 2\n")
    assert native.rebuild_reason(package) == "router/proxy.py changed since it was compiled"
    monkeypatch.setenv(native.PURE_ENV, "1")  # the sources run: nothing to compile
    assert native.rebuild_reason(package) is None
    monkeypatch.delenv(native.PURE_ENV)
    pure = fake_package(tmp_path / "pure", compiled=False)
    native.write_record(pure, {"build": "pure", "cause": "requested", "reason": "asked"})
    assert native.rebuild_reason(pure) == "not compiled (asked)"
    native.write_record(pure, {"build": "pure", "cause": "toolchain", "reason": "no cc"})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.rebuild_reason(pure) is None  # still nothing to compile with


def test_the_build_goes_pure_without_a_compiler_or_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    cc = tmp_path / "no-such-cc"
    monkeypatch.setenv("CC", str(cc))
    assert native.plan_build(tmp_path) == (
        [],
        {
            "build": "pure",
            "cause": "toolchain",
            "reason": f"no C compiler: no {cc} (on Debian: apt-get install gcc)",
            "sources": {},
        },
    )
    monkeypatch.setenv(native.PURE_ENV, "1")
    extensions, record = native.plan_build(tmp_path)
    assert extensions == []
    assert (record["cause"], record["reason"]) == ("requested", "GRAYROUTE_PURE=1 when installed")


def test_a_pure_editable_install_removes_compiled_modules_beside_the_sources(
    tmp_path: Path,
) -> None:
    package = fake_package(tmp_path)
    shared = tmp_path / f"{native.GROUP}__mypyc{SUFFIX}"
    shared.write_bytes(b"")
    native.remove_compiled(tmp_path)
    assert not shared.exists() and not list(package.rglob(f"*{SUFFIX}"))
    assert (package / "proxy.py").exists()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler here")
def test_compiler_probe_builds_against_python_h(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    assert native.compiler_problem() is None
    monkeypatch.setenv("CC", "gcc -DPy_IsInitialized=")  # breaks the probe's one call
    problem = native.compiler_problem()
    assert problem is not None and problem.startswith("the C compiler cannot build against")


def test_version_says_which_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)  # the suite may run with it set
    exe = [sys.executable, "-m", "router.cli", "--version"]
    env = {**os.environ, native.PURE_ENV: "1"}
    done = subprocess.run(exe, env=env, capture_output=True, text=True, check=True)
    release = version("grayroute")
    assert done.stdout == f"grayroute {release} (pure Python: GRAYROUTE_PURE=1)\n"
    env.pop(native.PURE_ENV)
    done = subprocess.run(exe, env=env, capture_output=True, text=True, check=True)
    assert done.stdout == f"grayroute {release} ({native.build_info()})\n"


RULES = """\
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
user_id:
  - header: X-User-Id
  - json: user.id
routes:
  - name: all
    pins:
      - to: v2
        users: ["42"]
    split: {{v1: 50, v2: 50}}
"""


def _worker_maps(router: RouterProcess) -> str:
    (child,) = Path(f"/proc/{router.pid}/task/{router.pid}/children").read_text().split()
    return Path(f"/proc/{child}/maps").read_text()


@pytest.mark.parametrize("build", ["pure", "compiled"])
async def test_each_build_imports_and_routes(
    build: str, tmp_path: Path, upstreams: dict[str, DemoUpstream]
) -> None:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if build == "pure":
        env[native.PURE_ENV] = "1"
    elif native.build_info().kind != "compiled":
        pytest.skip(f"the installed build is {native.build_info()}")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(v1=upstreams["v1"].endpoint, v2=upstreams["v2"].endpoint))
    router = await RouterProcess.start(
        rules, workers=1, env=env, args=("--log-level", "warning"), stderr=subprocess.DEVNULL
    )
    try:
        assert router.ready["build"] == build
        if build == "pure":
            assert router.ready["build_detail"] == "GRAYROUTE_PURE=1"
        async with httpx.AsyncClient(base_url=router.url, timeout=10.0) as client:
            seen = []
            for user in ("42", "1", "2", "3", "4", "5"):
                resp = await client.get("/orders?x=1", headers={"X-User-Id": user})
                assert resp.status_code == 200, resp.text
                seen.append(resp.json()["version"])
            again = await client.get("/orders", headers={"X-User-Id": "1"})
            body = await client.post("/orders", json={"user": {"id": "42"}})
        assert seen[0] == "v2" and set(seen[1:]) <= {"v1", "v2"}
        assert again.json()["version"] == seen[1]  # sticky
        assert body.json()["version"] == "v2" and body.json()["body_bytes"] > 0
        assert body.json()["headers"]["X-Forwarded-For"] == "127.0.0.1"
        assert (f"{native.GROUP}__mypyc" in _worker_maps(router)) == (build == "compiled")
    finally:
        await router.stop()
