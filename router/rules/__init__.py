"""The rule engine: a rule file in, a frozen Snapshot out, and decide() per request.

    load_snapshot(path) -> Snapshot          read, parse, validate, compile; RulesError
                                             with every problem if the file is rejected
    load_snapshot_text(text, filename)       the same for text already in memory
    load_snapshot_bytes(data, filename)      the same for bytes (etcd values): the digest is
                                             of the bytes, as for a file
    check_file(path) -> list[Problem]        every error and warning, nothing raised
    decide(snapshot, view, route=None)       -> Decision (route, upstream, user ID, reason)

Pipeline (each step its own module, pure but for reading the file):

    load.py      YAML -> raw tree with line/column for every node
    validate.py  raw tree -> model.RuleSet, every problem with FILE:LINE:COLUMN and a hint
    compile.py   RuleSet -> Snapshot: lookup tables, compiled regexes, split tables
    user_id.py   the user ID from headers, cookies, query, a capped JSON/form body
    decide.py    RequestView, Decision, decide()
"""

from __future__ import annotations

import hashlib

from router.errors import Problem, RulesError
from router.rules.compile import CompiledRoute, Snapshot, UpstreamSpec, compile_ruleset
from router.rules.decide import (
    NO_ROUTE_REASON,
    Decision,
    RequestView,
    decide,
    header_text,
    host_from_header,
    keep_header,
    normalize_path,
    parse_target,
    request_view,
    route_host,
    split_target,
    wanted_headers,
    wire_bytes,
)
from router.rules.load import decode_rules_bytes, load_text, read_rules_file
from router.rules.validate import validate

__all__ = [
    "NO_ROUTE_REASON",
    "CompiledRoute",
    "Decision",
    "Problem",
    "RequestView",
    "RulesError",
    "Snapshot",
    "UpstreamSpec",
    "check_file",
    "check_text",
    "decide",
    "header_text",
    "host_from_header",
    "keep_header",
    "load_snapshot",
    "load_snapshot_bytes",
    "load_snapshot_text",
    "normalize_path",
    "parse_target",
    "request_view",
    "route_host",
    "split_target",
    "wanted_headers",
    "wire_bytes",
]


def load_snapshot(path: str) -> Snapshot:
    """The compiled rules of the file at `path`. Raises RulesError listing every problem
    (errors and warnings) when the file has an error; warnings alone are kept in
    `Snapshot.warnings`."""
    data = read_rules_file(path)
    return _snapshot(decode_rules_bytes(data, path), path, hashlib.sha256(data).hexdigest())


def load_snapshot_text(text: str, filename: str) -> Snapshot:
    """Like load_snapshot for text in memory; the digest is of its UTF-8 bytes."""
    return _snapshot(text, filename, hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_snapshot_bytes(data: bytes, filename: str) -> Snapshot:
    """Like load_snapshot for a file's bytes in memory (same digest, same checks)."""
    return _snapshot(decode_rules_bytes(data, filename), filename, hashlib.sha256(data).hexdigest())


def check_file(path: str) -> list[Problem]:
    """Every error and warning of the file at `path`, sorted by position; never raises."""
    try:
        return check_text(decode_rules_bytes(read_rules_file(path), path), path)
    except RulesError as exc:
        return exc.problems


def check_text(text: str, filename: str) -> list[Problem]:
    try:
        root, load_problems = load_text(text, filename)
    except RulesError as exc:
        return exc.problems
    _, problems = validate(root, filename)
    return _merge(load_problems, problems)


def _snapshot(text: str, filename: str, digest: str) -> Snapshot:
    root, load_problems = load_text(text, filename)
    ruleset, problems = validate(root, filename)
    problems = _merge(load_problems, problems)
    if ruleset is None or any(p.severity == "error" for p in problems):
        raise RulesError(problems)
    return compile_ruleset(ruleset, filename, digest, tuple(problems))


def _merge(first: list[Problem], second: list[Problem]) -> list[Problem]:
    return sorted(first + second, key=lambda p: (p.line, p.column))
