"""RuleSet -> Snapshot: everything a request needs, computed once when the rules load.

The snapshot is frozen and swapped whole on reload; requests in flight keep the one they
began with. What is precomputed, so a request pays only for what depends on it:

    route lookup    a dict by host, then by method, then one dict probe for exact paths
                    and one per distinct path-prefix length, then path regexes only
                    where routes have them (first route in file order still wins)
    user ID         lower-cased header names, parsed JSON paths, source labels
    pins            closures over frozensets, merged sorted ranges, compiled regexes,
                    integer networks; every `reason` string
    split           per-upstream 64-bit seeds and 1/weight (sticky, by user), cumulative
                    weights (random, without a user ID); every `reason` string
    split_clients   nginx's cumulative thresholds; lua: the script compiled into this
                    worker's LuaJIT state (lua_routes.py builds both as `action`)
    answers         direct_response bodies and redirect Locations' fixed parts, path
                    rewrites (direct.py)
    hosts           exact names in a dict; wildcards and host_regex resolved once per
                    name and remembered (hosts.py)

The proxy relies on: Snapshot.source, .digest, .upstreams (name -> UpstreamSpec),
.fallbacks (name -> the upstreams its requests fall back to, in order), .header_names,
.uses_client_ip, .uses_host, .routes, .match_route(view), .wants_raw_headers,
.header_keys;
CompiledRoute.name, .body_limit, .wants_body(view).
"""

from __future__ import annotations

import math
import re
import socket
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from random import random
from types import MappingProxyType
from typing import Final

from router.errors import Problem
from router.rules import direct, lua_routes
from router.rules.decide import Decision, RequestView, wanted_headers
from router.rules.fallback import fallback_chains, file_fallbacks
from router.rules.hashing import prepared, wire_bytes
from router.rules.hosts import HostPatterns, host_matches, is_wildcard
from router.rules.model import Match, Pin, Route, RuleSet, Split, Upstream
from router.rules.user_id import (
    COOKIE,
    FORM,
    HEADER,
    JSON,
    Source,
    body_kind,
    compile_sources,
    extract_user_id,
)

# The names in the dataclasses' annotations are imported for real, not only for type
# checking: compiled (router/native.py), dataclasses read them when the module loads.

__all__ = [
    "CompiledPin",
    "CompiledRoute",
    "Snapshot",
    "SplitTable",
    "UpstreamSpec",
    "compile_ruleset",
    "ip_number",
]

# What the proxy needs to know about an upstream is exactly the model's record.
UpstreamSpec = Upstream


@dataclass(frozen=True, slots=True)
class CompiledPin:
    index: int  # position in the route's pins (reported as pin[index])
    to: str
    needs_user: bool  # has a condition on the user ID: never holds without one
    check: Callable[[str | None, RequestView], bool]
    reason: str  # e.g. "pin[2] user_suffixes"


_2_POW_M64: Final = 2.0**-64
# A Final: compiled, a C static, where `int.from_bytes` is an attribute looked up per call.
_from_bytes: Final = int.from_bytes


@dataclass(frozen=True, slots=True)
class SplitTable:
    """Weighted sticky choice by weighted rendezvous hashing.

    For a user, every upstream i with weight w_i > 0 gets u_i in (0, 1] from a stable hash
    of (salt, upstream name, user ID) (see hashing.py) and the score -ln(u_i) / w_i; the
    lowest score wins. Each score is an exponential variable with rate w_i, so upstream i
    wins with probability w_i / sum(w). Because u_i never depends on the weights, changing one
    weight changes one score: raising it can only make that upstream win more (users
    move only to it), lowering it can only make it win less (only its users move away),
    and the order of the other scores is untouched.
    """

    names: tuple[str, ...]  # upstreams with weight > 0, file order
    weights: tuple[float, ...]
    user_reasons: tuple[str, ...]  # reason per upstream when chosen by user ID
    random_reasons: tuple[str, ...]  # reason per upstream when chosen at random
    entries: tuple[tuple[blake2b, float], ...] = field(repr=False)  # (hasher, 1/weight)
    cumulative: tuple[float, ...] = field(repr=False)

    def pick(self, user_id: str) -> int:
        """Index into `names` for this user; the same on every machine."""
        entries = self.entries
        if len(entries) == 1:
            return 0
        data = wire_bytes(user_id)
        best, best_score = 0, -math.inf
        for i, (hasher, inv_weight) in enumerate(entries):
            # hashing.hash64() and unit() inlined: this runs per upstream per request.
            # The highest ln(u) / w wins, which is the lowest -ln(u) / w. math.log as
            # written (not a local alias): compiled, it is a C call on a C double.
            h = hasher.copy()
            h.update(data)
            score = math.log((_from_bytes(h.digest(), "little") + 0.5) * _2_POW_M64) * inv_weight
            if score > best_score:
                best, best_score = i, score
        return best

    def pick_random(self) -> int:
        cumulative = self.cumulative
        return bisect_right(cumulative, random() * cumulative[-1], 0, len(cumulative) - 1)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    body_limit: int
    to: str | None
    to_reason: str
    split: SplitTable | None
    sources: tuple[Source, ...]
    pins: tuple[CompiledPin, ...]  # every pin, in order (used with a user ID)
    anon_pins: tuple[CompiledPin, ...]  # the pins that can hold without a user ID
    salt: str
    model: Route = field(repr=False)
    # body kind (JSON/FORM) -> the head sources listed before the first source of that kind
    body_heads: Mapping[int, tuple[Source, ...]] = field(repr=False)
    # split_clients / lua: (route, view, user_id, source) -> Decision (lua_routes.py)
    action: Callable[[CompiledRoute, RequestView, str | None, str | None], Decision] | None = field(
        default=None, repr=False
    )
    action_reads_body: bool = False  # a Lua script that reads the request body
    # match.headers: checked after the lookup, only on routes that have them
    match_headers: Callable[[str | None, RequestView], bool] | None = field(
        default=None, repr=False
    )
    # prefix_rewrite / regex_rewrite: the request's path -> the path sent upstream
    rewrite: Callable[[str], str] | None = field(default=None, repr=False)
    # A rollout judges this route's split traffic: its decisions are JudgedDecisions.
    judged: bool = False

    def wants_body(self, view: RequestView) -> bool:
        """True only when holding the body could change this route's decision.

        That is: a json/form source of this route fits the request's Content-Type, and no
        header/cookie/query source listed before it already yields a user ID; or the
        route's Lua script reads the body.
        """
        if self.action_reads_body:
            return True
        heads = self.body_heads
        if not heads:
            return False
        head = heads.get(body_kind(view.headers.get("content-type")))
        if head is None:
            return False
        return not head or extract_user_id(head, view)[0] is None


# Route lookup tables. A bucket holds the routes whose host and method conditions hold
# for one (host, method) key: the prefix routes as groups of (prefix length, {prefix:
# hit}, lowest position in the group), ordered by that lowest position; the path_exact
# routes as {path: hit}; the path_regex routes as (position, search, route) in file
# order. A hit is (position, route, later routes with the same path) where the later
# ones matter only when the route has match.headers (tried in order when they fail).
# Exact paths and prefixes cost one dict probe each; regexes are searched only in
# buckets that have them.
_Hit = tuple[int, CompiledRoute, tuple[tuple[int, CompiledRoute], ...]]
_Group = tuple[int, dict[str, _Hit], int]
_Regex = tuple[int, "Callable[[str], object]", CompiledRoute]
_Bucket = tuple[tuple[_Group, ...], dict[str, _Hit], tuple[_Regex, ...]]
_MethodIndex = tuple[dict[str, _Bucket], _Bucket]  # (by method, any other method)
_NOT_FOUND: Final = 1 << 62
_EMPTY_BUCKET: Final[_Bucket] = ((), {}, ())


@dataclass(frozen=True, slots=True)
class Snapshot:
    source: str  # rule file path
    digest: str  # sha256 hex of the file's bytes
    upstreams: Mapping[str, UpstreamSpec]
    header_names: frozenset[str]  # lower-case header names the rules read
    uses_client_ip: bool  # some pin has client_cidrs
    routes: tuple[CompiledRoute, ...]
    ruleset: RuleSet = field(repr=False)
    warnings: tuple[Problem, ...] = field(default=(), repr=False)
    by_host: dict[str, _MethodIndex] = field(default_factory=dict, repr=False)
    other_host: _MethodIndex = field(default=({}, _EMPTY_BUCKET), repr=False)
    # Wildcard hosts and host_regex: the lookup of names not in by_host (None: none).
    host_patterns: HostPatterns[_MethodIndex] | None = field(default=None, repr=False)
    # A Lua script may read any header: give RequestView.raw_headers (all, in order).
    wants_raw_headers: bool = False
    # upstream -> where its requests go while it has no endpoint up, in the order tried:
    # the file's `fallback:` chains, or the control plane's (router/rules/fallback.py)
    fallbacks: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    # Some route looks at the Host (hosts, host_regex, default_host, a redirect's host).
    uses_host: bool = False
    header_keys: frozenset[bytes] = frozenset()  # header_names as request names compare

    def match_route(self, view: RequestView) -> CompiledRoute | None:
        """The first route (file order) whose match holds for the request, or None."""
        methods = self.by_host.get(view.host)
        if methods is None:
            patterns = self.host_patterns
            methods = self.other_host if patterns is None else patterns.lookup(view.host)
        bucket = methods[0].get(view.method)
        if bucket is None:
            bucket = methods[1]
        groups, exact, regexes = bucket
        path = view.path
        best: CompiledRoute | None = None
        best_pos = _NOT_FOUND
        if exact:
            hit = exact.get(path)
            if hit is not None:
                best_pos = hit[0]
                best = hit[1]
        for length, prefixes, lowest in groups:
            if lowest >= best_pos:
                break  # every later group starts after the route already found
            hit = prefixes.get(path[:length])
            if hit is not None and hit[0] < best_pos:
                best_pos = hit[0]
                best = hit[1]
        for position, search, route in regexes:
            if position >= best_pos:
                break
            if search(path) is not None:
                best = route
                break
        headers = best.match_headers if best is not None else None
        if headers is not None and not headers(None, view):
            return _first_with_headers(bucket, view)
        return best


def compile_ruleset(
    ruleset: RuleSet, source: str, digest: str, warnings: tuple[Problem, ...] = ()
) -> Snapshot:
    lua_routes.declare_shared_dicts(ruleset)
    header_names: set[str] = set()
    actions: dict[str, tuple[object, bool, frozenset[str], bool]] = {}
    for r in ruleset.routes:
        if r.lua is not None or r.split_clients is not None:
            actions[r.name] = got = lua_routes.compile_action(ruleset, r)
            header_names.update(got[2])
        elif r.answers_itself:
            answer = direct.compile_answer(r.name, r.direct_response, r.redirect)
            actions[r.name] = (answer, False, frozenset(), False)
    routes = tuple(_compile_route(ruleset, r, actions.get(r.name)) for r in ruleset.routes)
    uses_client_ip = False
    for route, compiled in zip(ruleset.routes, routes, strict=True):
        for src in compiled.sources:
            if src.kind == HEADER:
                header_names.add(src.key)
            elif src.kind == COOKIE:
                header_names.add("cookie")
            elif src.kind in (JSON, FORM):
                header_names.add("content-type")
        for name, _ in route.match.headers or ():
            header_names.add(name.lower())
        for pin in route.pins:
            for name, _ in pin.headers or ():
                header_names.add(name.lower())
            uses_client_ip = uses_client_ip or pin.client_cidrs is not None
    by_host, other_host, host_patterns = _route_index(ruleset.routes, routes)
    return Snapshot(
        source=source,
        digest=digest,
        upstreams=MappingProxyType({u.name: u for u in ruleset.upstreams}),
        header_names=frozenset(header_names),
        uses_client_ip=uses_client_ip,
        routes=routes,
        ruleset=ruleset,
        warnings=warnings,
        by_host=by_host,
        other_host=other_host,
        host_patterns=host_patterns,
        wants_raw_headers=any(a[3] for a in actions.values()),
        fallbacks=fallback_chains(file_fallbacks(ruleset)),
        uses_host=any(
            r.match.names_hosts or (r.redirect is not None and r.redirect.uses_request_host)
            for r in ruleset.routes
        ),
        header_keys=wanted_headers(header_names),
    )


def _fmt(weight: float) -> str:
    return str(int(weight)) if weight == int(weight) else f"{weight:g}"


def _compile_route(
    ruleset: RuleSet, route: Route, action: tuple[object, bool, frozenset[str], bool] | None
) -> CompiledRoute:
    sources = compile_sources(ruleset.sources_of(route))
    body_limit = ruleset.body_limit_of(route)
    if action is not None and action[1] and route.lua is not None:
        # nginx holds in memory a body shorter than 1.25 x client_body_buffer_size
        size = route.lua.client_body_buffer_size
        body_limit = max(body_limit, size + (size >> 2))
    percent_hasher = prepared("%", route.salt)
    pins = tuple(_compile_pin(i, p, percent_hasher) for i, p in enumerate(route.pins))
    split = _compile_split(route.split, route.salt) if route.split is not None else None
    body_heads: dict[int, tuple[Source, ...]] = {}
    if body_limit > 0:
        for i, src in enumerate(sources):
            if src.kind in (JSON, FORM) and src.kind not in body_heads:
                body_heads[src.kind] = tuple(s for s in sources[:i] if s.kind not in (JSON, FORM))
    return CompiledRoute(
        name=route.name,
        body_limit=body_limit,
        to=route.to,
        to_reason=f"to {route.to}",
        split=split,
        sources=sources,
        pins=pins,
        anon_pins=tuple(p for p in pins if not p.needs_user),
        salt=route.salt,
        model=route,
        body_heads=MappingProxyType(body_heads),
        action=None if action is None else action[0],  # type: ignore[arg-type]
        action_reads_body=action is not None and action[1],
        rewrite=None if route.rewrite is None else direct.compile_rewrite(route.rewrite),
        judged=route.rollout is not None and split is not None,
        match_headers=None
        if route.match.headers is None
        else _headers_check(tuple((n.lower(), re.compile(rx)) for n, rx in route.match.headers)),
    )


def _compile_split(split: Split, salt: str) -> SplitTable:
    positive = [(name, w) for name, w in split.weights if w > 0]
    if not positive:
        # Only a split of DNS upstreams that all have zero records gets here (validate.py
        # rejects weights that add up to 0 otherwise): share requests evenly, and each
        # gets the answer its upstream gives with no endpoints (503, or its fallback).
        positive = [(name, 1.0) for name, _ in split.weights]
    label = "replicas" if split.replicas else "weights"
    shown = f"({label} {', '.join(f'{n}={_fmt(w)}' for n, w in split.weights)})"
    cumulative: list[float] = []
    total = 0.0
    for _, w in positive:
        total += w
        cumulative.append(total)
    return SplitTable(
        names=tuple(n for n, _ in positive),
        weights=tuple(w for _, w in positive),
        user_reasons=tuple(f"split by user ID -> {n} {shown}" for n, _ in positive),
        random_reasons=tuple(f"split at random (no user ID) -> {n} {shown}" for n, _ in positive),
        entries=tuple((prepared("split", salt, n), 1.0 / w) for n, w in positive),
        cumulative=tuple(cumulative),
    )


# -- pins ------------------------------------------------------------------------------


def _compile_pin(index: int, pin: Pin, hasher: blake2b) -> CompiledPin:
    checks: list[Callable[[str | None, RequestView], bool]] = []
    # Cheapest first; the result does not depend on the order.
    if pin.users is not None:
        checks.append(_users_check(pin.users))
    if pin.user_suffixes is not None:
        checks.append(_suffix_check(pin.user_suffixes))
    if pin.user_ranges is not None:
        checks.append(_ranges_check(pin.user_ranges))
    if pin.user_pattern is not None:
        checks.append(_pattern_check(re.compile(pin.user_pattern)))
    if pin.user_percent is not None:
        checks.append(_percent_check(round(pin.user_percent * 100), hasher))
    if pin.headers is not None:
        checks.append(_headers_check(tuple((n.lower(), re.compile(rx)) for n, rx in pin.headers)))
    if pin.client_cidrs is not None:
        checks.append(_cidrs_check(pin.client_cidrs))
    check = checks[0] if len(checks) == 1 else _all_of(tuple(checks))
    return CompiledPin(
        index=index,
        to=pin.to,
        needs_user=pin.needs_user,
        check=check,
        reason=f"pin[{index}] {'+'.join(pin.conditions)}",
    )


# User conditions are only called with a user ID (decide() skips them without one).


def _all_of(
    checks: tuple[Callable[[str | None, RequestView], bool], ...],
) -> Callable[[str | None, RequestView], bool]:
    def check(user_id: str | None, view: RequestView) -> bool:
        for c in checks:  # noqa: SIM110 - a plain loop: all() with a generator is slower
            if not c(user_id, view):
                return False
        return True

    return check


def _users_check(users: frozenset[str]) -> Callable[[str | None, RequestView], bool]:
    def check(user_id: str | None, view: RequestView) -> bool:
        return user_id in users

    return check


def _suffix_check(suffixes: tuple[str, ...]) -> Callable[[str | None, RequestView], bool]:
    def check(user_id: str | None, view: RequestView) -> bool:
        return user_id is not None and user_id.endswith(suffixes)

    return check


def _ranges_check(
    ranges: tuple[tuple[int, int], ...],
) -> Callable[[str | None, RequestView], bool]:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    lows = tuple(lo for lo, _ in merged)
    highs = tuple(hi for _, hi in merged)
    # An ID with more digits than the highest bound is above every range; checking the
    # length first also keeps int() away from huge digit strings.
    max_digits = len(str(abs(highs[-1])))

    def check(user_id: str | None, view: RequestView) -> bool:
        if user_id is None or not (user_id.isdigit() and user_id.isascii()):
            return False  # isascii: isdigit() alone accepts other scripts' digits
        if len(user_id) > max_digits:
            user_id = user_id.lstrip("0") or "0"  # leading zeros do not change the number
            if len(user_id) > max_digits:
                return False
        n = int(user_id)
        i = bisect_right(lows, n) - 1
        return i >= 0 and n <= highs[i]

    return check


def _pattern_check(pattern: re.Pattern[str]) -> Callable[[str | None, RequestView], bool]:
    fullmatch = pattern.fullmatch

    def check(user_id: str | None, view: RequestView) -> bool:
        return user_id is not None and fullmatch(user_id) is not None

    return check


def _percent_check(threshold: int, hasher: blake2b) -> Callable[[str | None, RequestView], bool]:
    from_bytes = int.from_bytes

    def check(user_id: str | None, view: RequestView) -> bool:
        if user_id is None:
            return False
        # hashing.percent_bucket(hasher, user_id) < threshold, inlined
        h = hasher.copy()
        h.update(wire_bytes(user_id))
        return from_bytes(h.digest(), "little") % 10000 < threshold

    return check


def _headers_check(
    items: tuple[tuple[str, re.Pattern[str]], ...],
) -> Callable[[str | None, RequestView], bool]:
    def check(user_id: str | None, view: RequestView) -> bool:
        headers = view.headers
        for name, pattern in items:
            value = headers.get(name)
            if value is None or pattern.search(value) is None:
                return False
        return True

    return check


def _cidrs_check(cidrs: tuple[str, ...]) -> Callable[[str | None, RequestView], bool]:
    import ipaddress

    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for text in cidrs:
        net = ipaddress.ip_network(text, strict=False)
        pair = (int(net.network_address), int(net.netmask))
        (v4 if net.version == 4 else v6).append(pair)
    nets4, nets6 = tuple(v4), tuple(v6)

    def check(user_id: str | None, view: RequestView) -> bool:
        parsed = ip_number(view.client_ip)
        if parsed is None:
            return False
        version, n = parsed
        for network, mask in nets4 if version == 4 else nets6:  # noqa: SIM110 - as above
            if n & mask == network:
                return True
        return False

    return check


def ip_number(text: str) -> tuple[int, int] | None:
    """'10.1.2.3' -> (4, int); '2001:db8::1' -> (6, int); '::ffff:10.1.2.3' counts as IPv4."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        pass
    try:
        n = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        return None
    if n >> 32 == 0xFFFF:
        return 4, n & 0xFFFF_FFFF
    return 6, n


# -- route lookup ----------------------------------------------------------------------


def _route_index(
    models: tuple[Route, ...], routes: tuple[CompiledRoute, ...]
) -> tuple[dict[str, _MethodIndex], _MethodIndex, HostPatterns[_MethodIndex] | None]:
    named_hosts = {h for r in models for h in r.match.hosts or () if not is_wildcard(h)}
    wildcards = sorted({h for r in models for h in r.match.hosts or () if is_wildcard(h)})
    regexes = sorted({r.match.host_regex for r in models if r.match.host_regex is not None})
    searches = {rx: re.compile(rx).search for rx in regexes}
    # An IPv6 host is stored without brackets; index it with them too, so a view whose
    # host kept the brackets of the Host header ("[::1]") finds it as well.
    keys = sorted(named_hosts | {f"[{h}]" for h in named_hosts if ":" in h})
    named_methods = sorted({m for r in models for m in r.match.methods or ()})
    shared: dict[tuple[int, ...], _Bucket] = {}  # identical candidate lists share a bucket

    def host_holds(match: Match, host: str | None) -> bool:
        """The host conditions of `match` hold for `host` (None: a name no route names)."""
        if match.default_host:
            return host is None
        if match.hosts is not None and (
            host is None or not any(host_matches(p, host) for p in match.hosts)
        ):
            return False
        return match.host_regex is None or (
            host is not None and searches[match.host_regex](host) is not None
        )

    def bucket(host: str | None, method: str | None) -> _Bucket:
        positions = tuple(
            i
            for i, r in enumerate(models)
            if host_holds(r.match, host) and (r.match.methods is None or method in r.match.methods)
        )
        found = shared.get(positions)
        if found is None:
            found = shared[positions] = _bucket(positions, models, routes)
        return found

    def method_index(host: str | None) -> _MethodIndex:
        return {m: bucket(host, m) for m in named_methods}, bucket(host, None)

    def by_key(key: str) -> _MethodIndex:
        return method_index(key[1:-1] if key.startswith("[") else key)

    by_host = {k: by_key(k) for k in keys}
    other = method_index(None)
    if not wildcards and not regexes:
        return by_host, other, None
    ids = [*wildcards, *regexes]

    def for_signature(signature: tuple[int, ...]) -> _MethodIndex:
        # Any name with this signature decides the same way: the patterns that match it
        # are the ones listed, and no exact name does (those are in by_host).
        held = {ids[i] for i in signature}

        def holds(match: Match) -> bool:
            if match.default_host:
                return False
            if match.hosts is not None and not any(p in held for p in match.hosts):
                return False
            return match.host_regex is None or match.host_regex in held

        def sig_bucket(method: str | None) -> _Bucket:
            positions = tuple(
                i
                for i, r in enumerate(models)
                if holds(r.match) and (r.match.methods is None or method in r.match.methods)
            )
            found = shared.get(positions)
            if found is None:
                found = shared[positions] = _bucket(positions, models, routes)
            return found

        return {m: sig_bucket(m) for m in named_methods}, sig_bucket(None)

    return by_host, other, HostPatterns(wildcards, regexes, for_signature, other)


def _first_with_headers(bucket: _Bucket, view: RequestView) -> CompiledRoute | None:
    """The first route whose path and match.headers hold: the lookup's pick had headers
    that did not (rare: only files with match.headers get here)."""
    groups, exact, regexes = bucket
    path = view.path
    found: list[tuple[int, CompiledRoute]] = []
    hits = [exact.get(path)] + [prefixes.get(path[:length]) for length, prefixes, _ in groups]
    for hit in hits:
        if hit is not None:
            found.append((hit[0], hit[1]))
            found += hit[2]
    found += [(position, route) for position, search, route in regexes if search(path)]
    for _, route in sorted(found, key=lambda f: f[0]):
        if route.match_headers is None or route.match_headers(None, view):
            return route
    return None


def _add_hit(table: dict[str, _Hit], key: str, position: int, route: CompiledRoute) -> None:
    """The first route for `key`, and the later ones while every route before has headers."""
    hit = table.get(key)
    if hit is None:
        table[key] = (position, route, ())
        return
    first, rest = hit[1], hit[2]
    if first.match_headers is not None and all(r.match_headers is not None for _, r in rest):
        table[key] = (hit[0], first, (*rest, (position, route)))


def _bucket(
    positions: tuple[int, ...], models: tuple[Route, ...], routes: tuple[CompiledRoute, ...]
) -> _Bucket:
    groups: dict[int, dict[str, _Hit]] = {}
    exact: dict[str, _Hit] = {}
    regexes: list[_Regex] = []
    for i in positions:
        match = models[i].match
        if match.path_exact is not None:
            _add_hit(exact, match.path_exact, i, routes[i])
        elif match.path_regex is not None:
            regexes.append((i, re.compile(match.path_regex).search, routes[i]))
        else:
            prefix = match.path_prefix or ""
            _add_hit(groups.setdefault(len(prefix), {}), prefix, i, routes[i])
    ordered = sorted(
        (
            (length, table, min(hit[0] for hit in table.values()))
            for length, table in groups.items()
        ),
        key=lambda g: g[2],
    )
    return tuple(ordered), exact, tuple(regexes)
