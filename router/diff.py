"""`grayroute diff OLD NEW`: which users would move between upstreams if NEW replaced OLD.

Input is a sample of real traffic, one JSON object per line, either

    --requests FILE     requests as `grayroute explain` reads them (method, path, headers,
                        body, client_ip), or
    --access-log FILE   the router's own access log (router.access_log): the user ID is
                        put back where the router found it (header, cookie, query, JSON
                        or form body) and the request decided again.

Every request is decided by the same `decide()` the router uses, once with OLD and once
with NEW. A user (a user ID within a route) is counted once per route, at their first
request in the sample; later requests of the same user are decided the same way and
are not counted again. For each route the result says how many users stay on each
upstream and how many move from which upstream to which.

A move between two upstreams whose split weights are both the same in OLD and NEW is a
**broken promise** of the rule format ("upstreams whose weights did not change keep
everyone else"), flagged with the users concerned. It happens when a route's `salt`
changes — including the default salt, the route's name, when a route is renamed — or
when the split code itself is wrong; both are worth stopping a rollout for.

Requests without a user ID are not users: those split at random cannot be compared and
are only counted; the others (a `to`, a pin on a header or the client network) are
counted as requests that move.

Exit status: 0; 1 with --fail-on-move when any user or request would move, or with
--fail-on-broken-promise when any broken promise was found; 2 when a rule file or the
sample cannot be read.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote_plus

import orjson

from router.errors import RulesError
from router.explain import BadRequestLine, decide_request, text_field, view_from_request
from router.rules import (
    NO_ROUTE_REASON,
    Decision,
    RequestView,
    host_from_header,
    load_snapshot,
    split_target,
)
from router.rules.user_id import parse_json_path

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from router.rules import CompiledRoute, Snapshot

__all__ = ["DiffResult", "RouteDiff", "diff_lines", "run_diff"]

NO_ROUTE = "(no route)"
EXAMPLES = 10  # user IDs shown per move
BROKEN_USERS_LISTED = 1000  # user IDs listed per broken-promise move in --json
_SKIPPED_LISTED = 10

MoveKey = tuple[str, str, str | None]  # (from upstream, to upstream, new route if different)


@dataclass(slots=True)
class RouteDiff:
    """What NEW would change for the users of one route (the route OLD chose)."""

    name: str
    requests: int = 0
    users: int = 0
    stay: Counter[str] = field(default_factory=Counter)
    moves: Counter[MoveKey] = field(default_factory=Counter)
    broken: Counter[MoveKey] = field(default_factory=Counter)  # subset of moves
    examples: dict[MoveKey, list[str]] = field(default_factory=dict)
    broken_users: dict[MoveKey, list[str]] = field(default_factory=dict)
    random_users: int = 0  # OLD or NEW split them at random (no user ID on one side)
    anonymous_requests: int = 0
    anonymous_random: int = 0
    anonymous_moves: Counter[MoveKey] = field(default_factory=Counter)
    old_split: dict[str, float] | None = None
    new_split: dict[str, float] | None = None
    old_salt: str | None = None
    new_salt: str | None = None

    @property
    def moved(self) -> int:
        return sum(self.moves.values())

    @property
    def broken_promise(self) -> int:
        return sum(self.broken.values())

    def as_json(self) -> dict[str, Any]:
        moves = []
        for key, n in sorted(self.moves.items(), key=lambda kv: (-kv[1], kv[0])):
            broken = self.broken.get(key, 0)
            row: dict[str, Any] = {
                "from": key[0],
                "to": key[1],
                "to_route": key[2],
                "users": n,
                "broken_promise": broken,
                "examples": self.examples.get(key, []),
            }
            if broken:
                row["broken_promise_users"] = self.broken_users.get(key, [])
            moves.append(row)
        return {
            "route": self.name,
            "requests": self.requests,
            "users": self.users,
            "moved": self.moved,
            "broken_promise": self.broken_promise,
            "stay": dict(sorted(self.stay.items())),
            "moves": moves,
            "random_users": self.random_users,
            "anonymous": {
                "requests": self.anonymous_requests,
                "random": self.anonymous_random,
                "moves": [
                    {"from": k[0], "to": k[1], "to_route": k[2], "requests": n}
                    for k, n in sorted(self.anonymous_moves.items(), key=lambda kv: -kv[1])
                ],
            },
            "old_split": self.old_split,
            "new_split": self.new_split,
            "salt_changed": self.salt_changed,
        }

    @property
    def salt_changed(self) -> bool:
        return (
            self.old_salt is not None
            and self.new_salt is not None
            and (self.old_salt != self.new_salt)
        )


@dataclass(slots=True)
class DiffResult:
    old_path: str
    old_digest: str
    new_path: str
    new_digest: str
    kind: str  # "requests" or "access-log"
    sample_path: str
    lines: int = 0
    requests: int = 0
    skipped: int = 0
    skipped_lines: list[str] = field(default_factory=list)
    routes: dict[str, RouteDiff] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def users(self) -> int:
        return sum(r.users for r in self.routes.values())

    @property
    def moved(self) -> int:
        return sum(r.moved for r in self.routes.values())

    @property
    def broken_promise(self) -> int:
        return sum(r.broken_promise for r in self.routes.values())

    @property
    def moved_anonymous(self) -> int:
        return sum(sum(r.anonymous_moves.values()) for r in self.routes.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "old": {"path": self.old_path, "digest": self.old_digest},
            "new": {"path": self.new_path, "digest": self.new_digest},
            "sample": {
                "kind": self.kind,
                "path": self.sample_path,
                "lines": self.lines,
                "requests": self.requests,
                "skipped": self.skipped,
                "skipped_lines": self.skipped_lines,
            },
            "users": self.users,
            "moved_users": self.moved,
            "broken_promise_users": self.broken_promise,
            "moved_anonymous_requests": self.moved_anonymous,
            "routes": [r.as_json() for r in self.routes.values()],
            "warnings": self.warnings,
        }

    def table(self) -> str:
        out: list[str] = [
            f"OLD {self.old_path} ({self.old_digest[:12]})  ->  "
            f"NEW {self.new_path} ({self.new_digest[:12]})",
            f"sample: {self.requests} requests from {self.sample_path} ({self.kind}), "
            f"{self.users} users; a user is counted once per route, at their first request",
        ]
        if self.skipped:
            out.append(
                f"skipped {self.skipped} lines that are not requests: "
                + "; ".join(self.skipped_lines)
            )
        out.extend(f"warning: {w}" for w in self.warnings)
        for rd in self.routes.values():
            out.append("")
            out.extend(_route_table(rd))
        out.append("")
        if not self.moved and not self.moved_anonymous:
            out.append("RESULT: nobody would move")
        else:
            line = f"RESULT: {self.moved} of {self.users} users would move"
            if self.broken_promise:
                line += (
                    f"; {self.broken_promise} of them between upstreams whose weights did "
                    "not change: BROKEN PROMISE"
                )
            if self.moved_anonymous:
                line += f"; {self.moved_anonymous} requests without a user ID would move"
            out.append(line)
        return "\n".join(out) + "\n"


def _fmt_split(weights: dict[str, float] | None) -> str:
    if weights is None:
        return "no split"
    return ", ".join(f"{n}={w:g}" for n, w in weights.items())


def _route_table(rd: RouteDiff) -> list[str]:
    head = f"route {rd.name}"
    if rd.old_split is not None or rd.new_split is not None:
        if rd.old_split == rd.new_split:
            head += f"  (split {_fmt_split(rd.old_split)}, unchanged)"
        else:
            head += f"  (split {_fmt_split(rd.old_split)}  ->  {_fmt_split(rd.new_split)})"
    if rd.salt_changed:
        head += f"  (salt {rd.old_salt!r} -> {rd.new_salt!r}: every user is drawn again)"
    lines = [head]
    if rd.name == NO_ROUTE:
        return [*lines, f"  {rd.anonymous_requests} requests matched no route, in OLD or NEW"]
    stay = sum(rd.stay.values())
    if rd.users:
        summary = f"  {rd.users} users: {stay} stay, {rd.moved} move"
        if rd.random_users:
            summary += f", {rd.random_users} split at random on one side (not compared)"
        lines.append(summary)
    if rd.moves:
        rows: list[tuple[str, ...]] = [("", "from", "to", "users", "share", "")]
        for key, n in sorted(rd.moves.items(), key=lambda kv: (-kv[1], kv[0])):
            broken = rd.broken.get(key, 0)
            to = key[1] if key[2] is None else f"{key[1]} (route {key[2]})"
            note = ""
            if broken:
                note = f"BROKEN PROMISE ({broken}): both weights unchanged; e.g. " + ", ".join(
                    rd.broken_users[key][:5]
                )
            elif rd.examples.get(key):
                note = "e.g. " + ", ".join(rd.examples[key][:5])
            share = f"{100.0 * n / rd.users:.2f}%" if rd.users else "-"
            rows.append(("!" if broken else "", key[0], to, str(n), share, note))
        lines.extend(_columns(rows, right={3, 4}))
    if stay:
        lines.append("  stay: " + ", ".join(f"{up} {n}" for up, n in sorted(rd.stay.items())))
    if rd.anonymous_requests:
        text = f"  requests without a user ID: {rd.anonymous_requests}"
        if rd.anonymous_random:
            text += f" ({rd.anonymous_random} split at random: not compared)"
        lines.append(text)
        for key, n in sorted(rd.anonymous_moves.items(), key=lambda kv: -kv[1]):
            to = key[1] if key[2] is None else f"{key[1]} (route {key[2]})"
            lines.append(f"    {n} requests would move {key[0]} -> {to}")
    return lines


def _columns(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


# -- the comparison ---------------------------------------------------------------------------


_NO_ROUTE_DECISION = Decision(None, None, None, None, NO_ROUTE_REASON)


def _decide(
    snapshot: Snapshot, view: RequestView, body: bytes | None
) -> tuple[Decision, CompiledRoute | None]:
    """As the proxy decides (explain.decide_request); no route: the NO_ROUTE decision."""
    decision, route = decide_request(snapshot, view, body)
    return (decision, route) if route is not None else (_NO_ROUTE_DECISION, None)


def _is_random(decision: Decision, route: CompiledRoute | None) -> bool:
    split = route.split if route is not None else None
    return (
        decision.user_id is None and split is not None and decision.reason in split.random_reasons
    )


def _by_split(decision: Decision, route: CompiledRoute | None) -> bool:
    split = route.split if route is not None else None
    return split is not None and decision.reason in split.user_reasons


def _weights(route: CompiledRoute | None) -> dict[str, float] | None:
    if route is None or route.model.split is None:
        return None
    return dict(route.model.split.weights)


class _Comparer:
    def __init__(self, old: Snapshot, new: Snapshot) -> None:
        self.old = old
        self.new = new
        self.routes: dict[str, RouteDiff] = {}
        self.seen: set[tuple[str, str]] = set()
        self.old_routes = {r.name: r for r in old.routes}
        self.new_routes = {r.name: r for r in new.routes}

    def route(self, name: str) -> RouteDiff:
        rd = self.routes.get(name)
        if rd is None:
            rd = self.routes[name] = RouteDiff(name)
            old, new = self.old_routes.get(name), self.new_routes.get(name)
            rd.old_split, rd.new_split = _weights(old), _weights(new)
            rd.old_salt = old.salt if old is not None else None
            rd.new_salt = new.salt if new is not None else None
        return rd

    def add(self, view: RequestView, body: bytes | None) -> None:
        od, oroute = _decide(self.old, view, body)
        uid = od.user_id
        if uid is not None:
            label: str = od.route or NO_ROUTE
            rd = self.route(label)
            rd.requests += 1
            key = (label, uid)
            if key in self.seen:  # the same user again: decided the same way
                return
            self.seen.add(key)
            nd, nroute = _decide(self.new, view, body)
        else:
            nd, nroute = _decide(self.new, view, body)
            label = od.route or nd.route or NO_ROUTE
            rd = self.route(label)
            rd.requests += 1
            uid = nd.user_id
            if uid is None:
                self._anonymous(rd, od, oroute, nd, nroute)
                return
            key = (label, uid)
            if key in self.seen:
                return
            self.seen.add(key)
        rd.users += 1
        if _is_random(od, oroute) or _is_random(nd, nroute):
            rd.random_users += 1
            return
        src = od.upstream if od.route is not None else NO_ROUTE
        dst = nd.upstream if nd.route is not None else NO_ROUTE
        assert src is not None and dst is not None
        if src == dst:
            rd.stay[src] += 1
            return
        move: MoveKey = (src, dst, nd.route if nd.route != od.route else None)
        rd.moves[move] += 1
        examples = rd.examples.setdefault(move, [])
        if len(examples) < EXAMPLES:
            examples.append(uid)
        if self._broken(od, oroute, nd, nroute):
            rd.broken[move] += 1
            users = rd.broken_users.setdefault(move, [])
            if len(users) < BROKEN_USERS_LISTED:
                users.append(uid)

    @staticmethod
    def _anonymous(
        rd: RouteDiff,
        od: Decision,
        oroute: CompiledRoute | None,
        nd: Decision,
        nroute: CompiledRoute | None,
    ) -> None:
        rd.anonymous_requests += 1
        if _is_random(od, oroute) or _is_random(nd, nroute):
            rd.anonymous_random += 1
            return
        src = od.upstream if od.route is not None else NO_ROUTE
        dst = nd.upstream if nd.route is not None else NO_ROUTE
        if src != dst:
            assert src is not None and dst is not None
            rd.anonymous_moves[(src, dst, nd.route if nd.route != od.route else None)] += 1

    @staticmethod
    def _broken(
        od: Decision, oroute: CompiledRoute | None, nd: Decision, nroute: CompiledRoute | None
    ) -> bool:
        """Moved by the split of the same route between two upstreams of unchanged weight."""
        if od.route != nd.route or not _by_split(od, oroute) or not _by_split(nd, nroute):
            return False
        old_w, new_w = _weights(oroute), _weights(nroute)
        assert old_w is not None and new_w is not None
        a, b = od.upstream, nd.upstream
        return (
            a in old_w
            and b in old_w
            and a in new_w
            and b in new_w
            and old_w[a] == new_w[a]
            and old_w[b] == new_w[b]
        )

    def ordered(self) -> dict[str, RouteDiff]:
        """Routes in OLD's file order, then routes only NEW has, then (no route)."""
        order = [r.name for r in self.old.routes]
        order += [r.name for r in self.new.routes if r.name not in self.old_routes]
        order.append(NO_ROUTE)
        return {name: self.routes[name] for name in order if name in self.routes}


# -- reading the sample ------------------------------------------------------------------------


def view_from_access_log(record: object) -> tuple[RequestView, bytes | None]:
    """An access-log line -> (view, body), the user ID put back where it was found."""
    if not isinstance(record, dict):
        raise BadRequestLine("expected a JSON object (a line of the router's access log)")
    path, query = split_target(text_field(record, "path", "/"))
    headers: dict[str, str] = {}
    body: bytes | None = None
    user_id = record.get("user_id")
    source = record.get("user_id_source")
    if isinstance(user_id, str) and user_id and isinstance(source, str):
        kind, _, name = source.partition(":")
        if kind == "header":
            headers[name.lower()] = user_id
        elif kind == "cookie":
            headers["cookie"] = f"{name}={user_id}"
        elif kind == "query":
            if not query:  # normally the target in the log has it already
                query = f"{quote_plus(name)}={quote_plus(user_id)}"
        elif kind == "json":
            headers["content-type"] = "application/json"
            body = orjson.dumps(_json_at(name, user_id))
        elif kind == "form":
            headers["content-type"] = "application/x-www-form-urlencoded"
            body = f"{quote_plus(name)}={quote_plus(user_id)}".encode()
    return (
        RequestView(
            text_field(record, "method", "") or "GET",
            path,
            query,
            host_from_header(text_field(record, "host", "")),
            headers,
            text_field(record, "client", ""),
        ),
        body,
    )


def _json_at(path: str, value: str) -> object:
    """The smallest JSON document with `value` at the dotted path (`items[0].id`)."""
    try:
        steps = parse_json_path(path)
    except ValueError:
        return {}
    doc: object = value
    for step in reversed(steps):
        doc = [None] * step + [doc] if isinstance(step, int) else {step: doc}
    return doc


def diff_lines(
    old: Snapshot,
    new: Snapshot,
    lines: Iterable[bytes],
    kind: str = "requests",
    *,
    old_path: str = "OLD",
    new_path: str = "NEW",
    sample_path: str = "-",
) -> DiffResult:
    """Compare OLD and NEW on every line of the sample (kind: "requests" or "access-log")."""
    started = time.perf_counter()
    to_view: Callable[[object], tuple[RequestView, bytes | None]] = (
        view_from_access_log if kind == "access-log" else view_from_request
    )
    result = DiffResult(old_path, old.digest, new_path, new.digest, kind, sample_path)
    comparer = _Comparer(old, new)
    loads = orjson.loads
    number = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            view, body = to_view(loads(line))
        except orjson.JSONDecodeError as exc:
            _skip(result, number, f"not JSON: {exc}")
            continue
        except BadRequestLine as exc:
            _skip(result, number, str(exc))
            continue
        result.requests += 1
        comparer.add(view, body)
    result.lines = number
    result.routes = comparer.ordered()
    result.warnings = _warnings(old, new, kind)
    result.seconds = time.perf_counter() - started
    return result


def _skip(result: DiffResult, number: int, why: str) -> None:
    result.skipped += 1
    if len(result.skipped_lines) < _SKIPPED_LISTED:
        result.skipped_lines.append(f"line {number}: {why}")


def _warnings(old: Snapshot, new: Snapshot, kind: str) -> list[str]:
    if kind != "access-log":
        return []
    out = []
    for label, snap in (("OLD", old), ("NEW", new)):
        names = [r.name for r in snap.routes if any(p.headers for p in r.model.pins)]
        if names:
            out.append(
                f"{label} pins on request headers (routes {', '.join(names)}); an access log "
                "records no headers, so those pins never hold here (use --requests)"
            )
    old_sources = {r.name: [s.label for s in r.sources] for r in old.routes}
    changed = [
        r.name
        for r in new.routes
        if r.name in old_sources and old_sources[r.name] != [s.label for s in r.sources]
    ]
    if changed:
        out.append(
            f"routes {', '.join(changed)} read the user ID from other sources in NEW; an "
            "access log knows only the source OLD used (use --requests)"
        )
    return out


# -- the command ---------------------------------------------------------------------------------


def run_diff(
    old_path: str,
    new_path: str,
    *,
    requests: str | None,
    access_log: str | None,
    as_json: bool = False,
    fail_on_move: bool = False,
    fail_on_broken_promise: bool = False,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    snapshots = []
    for path in (old_path, new_path):
        try:
            snapshots.append(load_snapshot(path))
        except RulesError as exc:
            for problem in exc.problems:
                print(problem, file=err)
            if not exc.problems:
                print(f"{path}: {exc}", file=err)
            print(f"grayroute diff: {path} is not a valid rule file", file=err)
            return 2
    kind, sample = ("access-log", access_log) if access_log else ("requests", requests or "-")
    try:
        stream: IO[bytes] = (
            sys.stdin.buffer if sample == "-" else open(sample, "rb")  # noqa: SIM115
        )
    except OSError as exc:
        print(f"grayroute diff: cannot read {sample}: {exc.strerror or exc}", file=err)
        return 2
    try:
        result = diff_lines(
            snapshots[0],
            snapshots[1],
            stream,
            kind,
            old_path=old_path,
            new_path=new_path,
            sample_path=sample,
        )
    except OSError as exc:
        print(f"grayroute diff: reading {sample}: {exc.strerror or exc}", file=err)
        return 2
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if as_json:
        out.write(orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(result.table())
    for line in result.skipped_lines:
        print(f"grayroute diff: {sample}: skipped {line}", file=err)
    if fail_on_move and (result.moved or result.moved_anonymous):
        return 1
    if fail_on_broken_promise and result.broken_promise:
        return 1
    return 0
