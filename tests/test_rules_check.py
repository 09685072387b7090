"""`grayroute check`: one line per problem, a summary, and the exit status."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from router.rules import check_file
from router.rules.check import run_check

ROOT = Path(__file__).resolve().parent.parent
GRAYROUTE = str(Path(sys.executable).parent / "grayroute")
SHIPPED = [ROOT / "rules" / "demo.yaml", *sorted((ROOT / "rules" / "examples").glob("*.yaml"))]

VALID = """\
format: 1
upstreams:
  a: {endpoints: ["127.0.0.1:9001"]}
  b: {endpoints: ["127.0.0.1:9002"]}
  c: {endpoints: ["127.0.0.1:9003"]}
routes:
  - name: one
    match: {path_prefix: /one}
    split: {a: 90, b: 10}
  - name: two
    to: c
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def check(path: str, strict: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = run_check(path, strict=strict, out=out)
    return status, out.getvalue().splitlines()


def test_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    assert check(path) == (0, [f"{path}: OK (3 upstreams, 2 routes)"])
    assert check(path, strict=True) == (0, [f"{path}: OK (3 upstreams, 2 routes)"])


def test_warnings_pass_unless_strict(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("    to: c\n", "    to: a\n"))
    warning = (f"{path}:5:3: warning: upstreams.c: not used by any route "
               "(send traffic to it with `to`, a pin or a split, or remove it)")
    assert check(path) == (0, [warning, f"{path}: OK (3 upstreams, 2 routes, 1 warning)"])
    assert check(path, strict=True) == (
        1, [warning, f"{path}: FAILED with --strict (3 upstreams, 2 routes, 1 warning)"]
    )


def test_errors_fail(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("b: 10", "b9: 10").replace("to: c", "to: c\n    x: 1"))
    status, lines = check(path)
    assert status == 1
    assert lines == [
        f"{path}:9:20: routes[0].split.b9: unknown upstream (known: a, b, c; did you mean b?)",
        f"{path}:12:5: routes[1].x: unknown key (known keys here: name, match, pins, to, split, "
        "salt, user_id, body_limit)",
        f"{path}: FAILED (2 errors)",
    ]


def test_errors_and_warnings_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("a: 90", "a: 0").replace("to: c", "to: q"))
    status, lines = check(path)
    assert status == 1
    assert lines[-1] == f"{path}: FAILED (1 error, 1 warning)"


def test_unreadable_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    assert check(path) == (1, [
        f"{path}:1:1: file: cannot read the rule file: No such file or directory "
        "(check the path and its permissions)",
        f"{path}: FAILED (1 error)",
    ])


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "format: 1\nupstreams:\n  a: [1\n")
    status, lines = check(path)
    assert status == 1
    assert lines[0].startswith(f"{path}:4:1: yaml: not valid YAML: ")
    assert lines[0].endswith(")")  # with a hint
    assert lines[1] == f"{path}: FAILED (1 error)"


def test_check_file_returns_errors_and_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("b: 10", "b: 0").replace("to: c", "to: zz"))
    assert [(p.severity, p.path) for p in check_file(path)] == [
        ("warning", "routes[0].split.b"),
        ("error", "routes[1].to"),
    ]
    assert check_file(write(tmp_path, VALID, "ok.yaml")) == []
    assert [p.path for p in check_file(str(tmp_path / "nope.yaml"))] == ["file"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_pass_strict_check(path: Path) -> None:
    status, lines = check(str(path), strict=True)
    assert status == 0, lines
    assert len(lines) == 1 and ": OK (" in lines[0]


def test_command_line(tmp_path: Path) -> None:
    good = subprocess.run([GRAYROUTE, "check", *map(str, SHIPPED[:1])], capture_output=True,
                          text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert good.stdout == f"{SHIPPED[0]}: OK (3 upstreams, 2 routes)\n"
    bad_path = write(tmp_path, VALID.replace("format: 1", "format: 3"))
    bad = subprocess.run([GRAYROUTE, "check", bad_path], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{bad_path}:1:9: format: unsupported format 3 (this router reads format 1)",
        f"{bad_path}: FAILED (1 error)",
    ]
    warn_path = write(tmp_path, VALID.replace("to: c", "to: a"), "warn.yaml")
    strict = subprocess.run([GRAYROUTE, "check", "--strict", warn_path], capture_output=True,
                            text=True, timeout=60)
    assert strict.returncode == 1
    assert "warning: upstreams.c" in strict.stdout
