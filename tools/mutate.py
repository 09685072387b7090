"""A bounded mutation run: one small bug at a time, the relevant tests only, at low priority.

    .venv/bin/python tools/mutate.py --list                  # count the mutants per target
    .venv/bin/python tools/mutate.py --sample 40 --seed 1    # run a reproducible sample

Each target is a module (and optionally only some of its functions) with the test files
that cover it. A mutant is one change to the source text at one node, of these kinds:

    compare     == <-> !=, < <-> <=, > <-> >=, in <-> not in, is <-> is not
    boolop      and <-> or
    not         `not x` -> `x`
    constant    an integer n -> n + 1, True <-> False
    arith       + <-> -
    call        a statement that is only a call -> `pass`

The mutant is written into a copy of the repository (never into the work tree), the
target's tests run there with `nice -n 19` and `-x` (the first failure kills it), and a
mutant that makes them time out counts as killed. The report lists every survivor with
its file, line and change, to be answered by a test or a reason.

Whole-suite runs per mutant are too slow for a shared machine: that is why each target
names its test files, and why a sample is drawn (seeded, so a run can be repeated).
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What of tests/test_proxy.py a mutant runs: not the fuzzing (minutes) and not the ones
# that start `grayroute serve` (the reload targets have those).
_FAST = "not fuzz and not every_worker and not split_proportions"
# (module, functions or () for all, pytest arguments)
TARGETS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "proxy": (
        "router/proxy.py",
        (),
        (
            *("tests/test_proxy.py", "tests/test_upstream.py", "tests/test_lua_routes.py"),
            *("tests/test_rules_fallback.py", "-m", "not slow", "-k", _FAST),
        ),
    ),
    "upstream": (
        "router/upstream.py",
        (),
        ("tests/test_upstream.py", "tests/test_proxy.py", "-m", "not slow", "-k", _FAST),
    ),
    "reload": (
        "router/worker.py",
        ("_load", "_reload"),
        ("tests/test_server.py", "-k", "reload or restarted or invalid or duplicate"),
    ),
    "supervisor-reload": (
        "router/supervisor.py",
        ("_request_reload", "_reload", "_reload_once", "_accept"),
        ("tests/test_server.py", "-k", "reload or restarted or invalid or duplicate"),
    ),
}

_SWAP_CMP = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
    ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    target: str
    path: str
    line: int
    kind: str
    old: str
    new: str
    start: tuple[int, int]  # (line, column) of the replaced text
    end: tuple[int, int]

    def label(self) -> str:
        return f"{self.path}:{self.line} {self.kind}: {self.old!r} -> {self.new!r}"


def _functions(
    tree: ast.Module, names: tuple[str, ...]
) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    found = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (not names or node.name in names)
    ]
    return found


def _mutations(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """(kind, replacement node) for one node."""
    out: list[tuple[str, ast.AST]] = []
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        swap = _SWAP_CMP.get(type(node.ops[0]))
        if swap is not None:
            out.append(("compare", ast.Compare(node.left, [swap()], node.comparators)))
    elif isinstance(node, ast.BoolOp):
        bool_op: ast.boolop = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("boolop", ast.BoolOp(bool_op, node.values)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("not", node.operand))
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            out.append(("constant", ast.Constant(not node.value)))
        elif isinstance(node.value, int):
            out.append(("constant", ast.Constant(node.value + 1)))
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
        arith: ast.operator = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
        out.append(("arith", ast.BinOp(node.left, arith, node.right)))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await):
        out.append(("call", ast.Pass()))
    return out


def mutants_of(target: str) -> list[Mutant]:
    path, names, _ = TARGETS[target]
    source = (REPO / path).read_text()
    tree = ast.parse(source)
    seen: set[tuple[int, int, str]] = set()
    out = []
    for func in _functions(tree, names):
        for node in ast.walk(func):
            if not isinstance(node, ast.expr | ast.stmt) or node.end_lineno is None:
                continue
            old = ast.get_source_segment(source, node)
            if old is None:
                continue
            for kind, replacement in _mutations(node):
                key = (node.lineno, node.col_offset, kind)
                if key in seen:
                    continue
                seen.add(key)
                new = ast.unparse(replacement)
                start = (node.lineno, node.col_offset)
                end = (node.end_lineno, node.end_col_offset or 0)
                m = Mutant(target, path, node.lineno, kind, old, new, start, end)
                try:
                    compile(apply(source, m), path, "exec")
                except SyntaxError:
                    continue  # e.g. `pass` where an expression was needed
                out.append(m)
    return out


def apply(source: str, m: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    data = source.encode()
    start = offsets[m.start[0] - 1] + m.start[1]
    end = offsets[m.end[0] - 1] + m.end[1]
    new = m.new
    if "\n" in m.old and m.kind == "call":
        new = "pass"
    return (data[:start] + new.encode() + data[end:]).decode()


def run(m: Mutant, copy: Path, timeout: float) -> tuple[str, float]:
    """'killed', 'survived' or 'timeout' (counted as killed), and the seconds it took."""
    path = copy / m.path
    original = path.read_text()
    path.write_text(apply(original, m))
    args = TARGETS[m.target][2]
    cmd = [
        "nice", "-n", "19", sys.executable, "-m", "pytest", "-q", "-x",
        "-p", "no:cacheprovider", "--timeout", "60", *args,
    ]  # fmt: skip
    began = time.monotonic()
    try:
        # A mutant is a change to the source: the copy's compiled modules (router/native.py)
        # would refuse to load as stale, and every mutant would look killed.
        env = {**os.environ, "GRAYROUTE_PURE": "1"}
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, timeout=timeout, start_new_session=True
        )
        verdict = "survived" if proc.returncode == 0 else "killed"
        if proc.returncode not in (0, 1):
            verdict = "killed"  # collection error, crash: the mutant broke something
    except subprocess.TimeoutExpired:
        verdict = "timeout"
    finally:
        path.write_text(original)
    return verdict, time.monotonic() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    p.add_argument("--sample", type=int, default=0, help="mutants per target (0: all)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    p.add_argument("--list", action="store_true", help="only count the mutants")
    p.add_argument("--match", default="", help="only mutants whose label contains this")
    args = p.parse_args(argv)
    chosen: list[Mutant] = []
    for target in args.targets.split(","):
        all_ = [m for m in mutants_of(target) if args.match in m.label()]
        pick = all_
        if args.sample and len(all_) > args.sample:
            pick = sorted(
                random.Random(f"{args.seed}:{target}").sample(all_, args.sample),
                key=lambda m: (m.line, m.start),
            )
        print(f"{target}: {len(all_)} mutants, running {len(pick)}", flush=True)
        chosen += pick
    if args.list:
        return 0
    copy = Path(tempfile.mkdtemp(prefix="grayroute-mutate-"))
    try:
        shutil.copytree(
            REPO, copy, dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "out"),
        )  # fmt: skip
        os.environ.pop("PYTHONPATH", None)
        results: dict[str, list[Mutant]] = {"killed": [], "survived": [], "timeout": []}
        for i, m in enumerate(chosen, 1):
            verdict, seconds = run(m, copy, args.timeout)
            results[verdict].append(m)
            print(f"[{i}/{len(chosen)}] {verdict:8} {seconds:5.0f}s  {m.label()}", flush=True)
        killed = len(results["killed"]) + len(results["timeout"])
        print(f"\nkilled {killed} of {len(chosen)} ({killed / max(1, len(chosen)):.0%}); "
              f"{len(results['timeout'])} by timeout")  # fmt: skip
        for m in results["survived"]:
            print(f"SURVIVED {m.label()}")
        return 0
    finally:
        shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
