"""`grayroute check RULES [--strict]`: report every problem of a rule file.

Prints one line per problem, errors and warnings, in file order:

    rules.yaml:31:9: routes[0].split.orders-v9: unknown upstream (known: orders-v1, ...)
    rules.yaml:12:3: warning: upstreams.old: not used by any route (send traffic to it ...)

then one summary line, e.g. `rules.yaml: OK (3 upstreams, 2 routes, 1 warning)`.
Exit status: 0 when the router would accept the file (with --strict: and there are no
warnings), 1 otherwise. An unreadable file or a YAML syntax error is reported the same
way, with a position and a hint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.errors import Problem, RulesError
from router.rules.compile import compile_ruleset
from router.rules.load import decode_rules_bytes, load_text, read_rules_file
from router.rules.validate import validate

if TYPE_CHECKING:
    from typing import TextIO

    from router.rules.model import RuleSet

__all__ = ["run_check"]


def run_check(path: str, strict: bool, out: TextIO) -> int:
    ruleset, problems = _check(path)
    for problem in problems:
        print(problem, file=out)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    if errors or ruleset is None:
        counts = _plural(errors, "error")
        if warnings:
            counts += f", {_plural(warnings, 'warning')}"
        print(f"{path}: FAILED ({counts})", file=out)
        return 1
    summary = (
        f"{_plural(len(ruleset.upstreams), 'upstream')}, {_plural(len(ruleset.routes), 'route')}"
    )
    if warnings:
        summary += f", {_plural(warnings, 'warning')}"
    if strict and warnings:
        print(f"{path}: FAILED with --strict ({summary})", file=out)
        return 1
    print(f"{path}: OK ({summary})", file=out)
    return 0


def _check(path: str) -> tuple[RuleSet | None, list[Problem]]:
    try:
        text = decode_rules_bytes(read_rules_file(path), path)
        root, load_problems = load_text(text, path)
    except RulesError as exc:
        return None, exc.problems
    ruleset, problems = validate(root, path)
    problems = sorted(load_problems + problems, key=lambda p: (p.line, p.column))
    if any(p.severity == "error" for p in problems):
        return None, problems
    if ruleset is not None:
        compile_ruleset(ruleset, path, "")  # what the router would do next; never fails
    return ruleset, problems


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
