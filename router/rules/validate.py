"""Checking a rule file: raw tree (load.py) -> RuleSet (model.py) plus every problem found.

The whole file is checked before anything is rejected, so a release manager sees every
mistake at once, each as `FILE:LINE:COLUMN: path.to.key: what is wrong (what to do)`.
Problems are errors (the file is rejected) or warnings (the file works, but probably not
as meant). The grammar is docs/rules.md; in short:

    format: 1                                   required
    upstreams: {NAME: {endpoints: [HOST:PORT, ...] | {dns: NAME, port: PORT, interval: DURATION},
                       connect_timeout: DURATION, read_timeout: DURATION,
                       health_check: {path: /x, interval: DURATION}, fallback: NAME,
                       max_fails: N, fail_timeout: DURATION}}
    user_id: [{header|cookie|query|json|form: NAME}, ...]     default: none
    body_limit: SIZE                             default 64KiB
    routes: [{name, match: {hosts, host_regex, default_host,
                            path_prefix | path_exact | path_regex, methods},
              pins: [...],
              to: NAME | split: {NAME: WEIGHT | replicas, ...} | split: replicas
                | split_clients: {key, buckets, unmatched} | lua: {file, phase, ...}
                | direct_response: {status, body} | redirect: {status, scheme, ...},
              prefix_rewrite | regex_rewrite, salt, user_id, body_limit,
              rollout: {canary, stable, steps, ...}}, ...]
    lua_shared_dicts: {NAME: SIZE}               default: none (lua_routes.py has the
                                                 split_clients and lua grammar, direct.py
                                                 direct_response, redirect and rewrites,
                                                 rollout_block.py the rollout's)

    DURATION  1s, 500ms, 2m, 1h, or a plain number of seconds (> 0)
    SIZE      512, 10KB, 64KiB, 1MiB, 1GB ... (KB = 1000 bytes, KiB = 1024 bytes)
    WEIGHT    a number >= 0 with at most two decimals
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import TYPE_CHECKING

from router.errors import Problem
from router.rules import direct, lua_routes, rollout_block
from router.rules.fallback import find_cycle
from router.rules.hosts import host_pattern_problem, pattern_covers
from router.rules.load import Entry, MapNode, Node, ScalarNode, SeqNode
from router.rules.model import (
    DEFAULT_BODY_LIMIT,
    DEFAULT_DNS_INTERVAL,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_PATH,
    PIN_CONDITIONS,
    SOURCE_KINDS,
    DirectResponse,
    DnsEndpoints,
    HealthCheck,
    LuaAction,
    Match,
    Pin,
    Redirect,
    Route,
    RuleSet,
    Split,
    SplitClientsMode,
    Upstream,
    UserIdSource,
)
from router.rules.user_id import parse_json_path

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

__all__ = ["parse_duration", "parse_size", "validate"]

FORMAT = 1

CORE_TOP_KEYS = ("format", "upstreams", "user_id", "body_limit", "routes")
TOP_KEYS = (*CORE_TOP_KEYS, "lua_shared_dicts")  # + the nginx-migration extension
UPSTREAM_KEYS = (
    "endpoints",
    "connect_timeout",
    "read_timeout",
    "health_check",
    "fallback",
    "max_fails",
    "fail_timeout",
)
HEALTH_KEYS = ("path", "interval")
DNS_KEYS = ("dns", "port", "interval")
CORE_ROUTE_KEYS = (
    "name",
    "match",
    "pins",
    "to",
    "split",
    "salt",
    "user_id",
    "body_limit",
    "rollout",
)
ROUTE_EXTENSION_KEYS = (
    "split_clients",  # nginx migration (lua_routes.py)
    "lua",
    "direct_response",  # routes that answer themselves, path rewrites (direct.py)
    "redirect",
    "prefix_rewrite",
    "regex_rewrite",
)
ROUTE_KEYS = (*CORE_ROUTE_KEYS, *ROUTE_EXTENSION_KEYS)
# What a route does with a request: exactly one of these (`to` and `split` are format 1).
ROUTE_ACTIONS = ("to", "split", "split_clients", "lua", "direct_response", "redirect")
CORE_MATCH_KEYS = ("hosts", "path_prefix", "methods")
MATCH_KEYS = (
    *CORE_MATCH_KEYS,
    "path_exact",
    "path_regex",
    "host_regex",
    "default_host",
    "headers",
)
PATH_CONDITIONS = ("path_prefix", "path_exact", "path_regex")
PIN_KEYS = ("to", *PIN_CONDITIONS)

# Bodies held in memory per request above this are most likely a typo (MB for KB).
LARGE_BODY_LIMIT = 16 * 1024 * 1024

# Finding routes and pins that never decide compares every earlier one with every later
# one. Past this many pairs (about 450 routes, or 450 pins in all) the search would slow
# every reload, so it stops: a missing warning is better than a slow load.
MAX_SHADOW_PAIRS = 100_000

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}
_HOST = re.compile(r"[A-Za-z0-9._\-]+|\[?[0-9A-Fa-f:.]+\]?")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# Below this a lookup would run more often than DNS servers expect to be asked.
MIN_DNS_INTERVAL = 0.1


def parse_duration(text: str) -> float:
    """'1s' -> 1.0, '500ms' -> 0.5, '2m' -> 120.0, '1.5' -> 1.5; ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


def parse_size(text: str) -> int:
    """'64KiB' -> 65536, '10KB' -> 10000, '512' -> 512; ValueError if not whole bytes."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(text)
    value = Decimal(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if value != value.to_integral_value():
        raise ValueError(text)
    return int(value)


def validate(root: Node | None, filename: str) -> tuple[RuleSet | None, list[Problem]]:
    """Check a raw tree. Returns (RuleSet, problems) or (None, problems) if any is an error.

    Problems are sorted by position; warnings are included either way.
    """
    v = _Validator(filename)
    ruleset = v.ruleset(root)
    problems = sorted(v.problems, key=lambda p: (p.line, p.column))
    if any(p.severity == "error" for p in problems):
        return None, problems
    return ruleset, problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _looks_like_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _did_you_mean(word: str, options: Collection[str]) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(word.lower(), [o.lower() for o in options], n=1)
        if close:
            return next(o for o in options if o.lower() == close[0])
    return close[0] if close else None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _two_decimals(value: int | float) -> bool:
    if isinstance(value, int):
        return True
    return Decimal(repr(value)).as_tuple().exponent >= -2  # type: ignore[operator]


def _two_decimal_choices(node: Node, value: float) -> str:
    """'1.555' -> 'write 1.55 or 1.56': the two-decimal numbers on either side of what
    was written (not a float's rounding, which takes 1.555 down to 1.55)."""
    try:
        exact = Decimal(_written(node))
    except InvalidOperation:
        exact = Decimal(repr(value))
    step = Decimal("0.01")
    low = exact.quantize(step, rounding=ROUND_FLOOR).normalize()
    high = exact.quantize(step, rounding=ROUND_CEILING).normalize()
    return f"write {low:f} or {high:f}"


def _written(node: Node) -> str:
    return node.text if isinstance(node, ScalarNode) else node.kind


def _fmt_number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


class _Validator:
    def __init__(self, filename: str) -> None:
        self.file = filename
        self.problems: list[Problem] = []
        # Every upstream name written (None where its definition has errors); None when
        # the section itself is unusable, so references cannot be checked.
        self.known_upstreams: dict[str, Upstream | None] | None = None
        self.used_upstreams: set[str] = set()
        self.fallback_nodes: dict[str, Node] = {}  # upstream -> its `fallback:` value
        self.pairs_left = MAX_SHADOW_PAIRS  # see route_warnings

    # -- reporting ---------------------------------------------------------------------

    def error(self, node: Node, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.file, node.line, node.column, path, message, hint))

    def warn(self, node: Node, path: str, message: str, hint: str = "") -> None:
        self.problems.append(
            Problem(self.file, node.line, node.column, path, message, hint, "warning")
        )

    # -- shapes ------------------------------------------------------------------------

    def mapping(
        self,
        node: Node,
        path: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
        example: str = "",
        listed: tuple[str, ...] | None = None,
    ) -> dict[str, Entry] | None:
        """The known entries of a mapping; unknown keys and missing ones are reported.

        `listed`: the keys a hint names when nothing close was typed (default `allowed`).
        """
        if not isinstance(node, MapNode):
            self.error(
                node,
                path or "(file)",
                f"expected a mapping, found {node.kind}",
                example or f"write `key: value` lines with keys {', '.join(allowed)}",
            )
            return None
        known: dict[str, Entry] = {}
        for key, entry in node.items.items():
            if key in allowed:
                known[key] = entry
                continue
            suggestion = _did_you_mean(key, allowed)
            hint = (
                f"did you mean `{suggestion}`?"
                if suggestion
                else f"known keys here: {', '.join(allowed if listed is None else listed)}"
            )
            self.error(entry.key, _join(path, key), "unknown key", hint)
        for key in required:
            if key not in known:
                self.error(
                    node,
                    _join(path, key),
                    f"missing `{key}`",
                    f"add `{key}:` to {path or 'the file'}",
                )
        return known

    def seq(self, node: Node, path: str, example: str) -> list[Node] | None:
        if not isinstance(node, SeqNode):
            self.error(node, path, f"expected a list, found {node.kind}", f"write {example}")
            return None
        return node.items

    def text(self, node: Node, path: str, what: str, numbers_ok: bool = False) -> str | None:
        """A non-empty text value; with numbers_ok a number counts as the text written."""
        if isinstance(node, ScalarNode):
            value = node.value
            if isinstance(value, str):
                if value:
                    return value
                self.error(node, path, f"empty {what}", f"write the {what}")
                return None
            if numbers_ok and isinstance(value, int | float) and not isinstance(value, bool):
                return node.text
        found = node.kind
        self.error(
            node,
            path,
            f"expected {what} (text), found {found}",
            "put it in quotes" if isinstance(node, ScalarNode) else f"write the {what}",
        )
        return None

    def number(self, node: Node, path: str, what: str, example: str) -> int | float | None:
        if (
            isinstance(node, ScalarNode)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            if isinstance(node.value, float) and not math.isfinite(node.value):
                self.error(node, path, f"{what} must be a finite number", f"write e.g. {example}")
                return None
            return node.value
        if isinstance(node, ScalarNode) and isinstance(node.value, str) and _is_number(node.value):
            # "95" in quotes is YAML text: say so, rather than "must be a number, found 95"
            self.error(
                node,
                path,
                f'{what} must be a number, found the text "{node.value}" (it is in quotes)',
                f"write {node.value.strip()} without quotes",
            )
            return None
        shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
        self.error(node, path, f"{what} must be a number, found {shown}", f"write e.g. {example}")
        return None

    def whole_number(
        self, node: Node, path: str, low: int, high: int | None, what: str, hint: str
    ) -> int | None:
        """A whole number from `low` to `high` (None: no upper bound); else reported."""
        if (
            isinstance(node, ScalarNode)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
            and low <= node.value
            and (high is None or node.value <= high)
        ):
            return node.value
        shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
        self.error(node, path, f"expected {what}, found {shown}", hint)
        return None

    def boolean(self, node: Node, path: str, hint: str) -> bool | None:
        if isinstance(node, ScalarNode) and isinstance(node.value, bool):
            return node.value
        shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
        self.error(node, path, f"expected true or false, found {shown}", hint)
        return None

    def duration(self, node: Node, path: str) -> float | None:
        seconds: float | None = None
        if isinstance(node, ScalarNode) and not isinstance(node.value, bool):
            if isinstance(node.value, int | float):
                seconds = float(node.value)
            elif isinstance(node.value, str):
                try:
                    seconds = parse_duration(node.value)
                except ValueError:
                    seconds = None
        if seconds is None or not math.isfinite(seconds):
            shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
            self.error(
                node,
                path,
                f"not a duration: {shown}",
                "write e.g. 1s, 500ms, 2m or a number of seconds",
            )
            return None
        if seconds <= 0:
            self.error(node, path, "must be longer than 0", "write e.g. 1s or 500ms")
            return None
        return seconds

    def size(self, node: Node, path: str) -> int | None:
        size: int | None = None
        if isinstance(node, ScalarNode) and not isinstance(node.value, bool):
            if isinstance(node.value, int) and node.value >= 0:
                size = node.value
            elif isinstance(node.value, str):
                try:
                    size = parse_size(node.value)
                except (ValueError, InvalidOperation):
                    size = None
        if size is None:
            shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
            self.error(
                node,
                path,
                f"not a size: {shown}",
                "write e.g. 64KiB, 1MiB, 10KB or a number of bytes",
            )
            return None
        if size > LARGE_BODY_LIMIT:
            self.warn(
                node,
                path,
                f"{size:,} bytes may be held in memory for every request",
                "keep body_limit small (e.g. 64KiB); only the part with the user ID is needed",
            )
        return size

    # -- the file ----------------------------------------------------------------------

    def ruleset(self, root: Node | None) -> RuleSet | None:
        if root is None:
            self.problems.append(
                Problem(
                    self.file,
                    1,
                    1,
                    "(file)",
                    "the rule file is empty",
                    "start with `format: 1`, then `upstreams:` and `routes:`",
                )
            )
            return None
        top = self.mapping(
            root,
            "",
            TOP_KEYS,
            required=("upstreams", "routes"),
            example="start with `format: 1`, then `upstreams:` and `routes:`",
            listed=CORE_TOP_KEYS,  # the nginx-migration extension is not suggested
        )
        if top is None:
            return None
        assert isinstance(root, MapNode)
        fmt = self.format(root, top.get("format"))
        upstreams = self.upstreams(top["upstreams"].value) if "upstreams" in top else None
        sources: tuple[UserIdSource, ...] | None = ()
        if "user_id" in top:
            sources = self.sources(top["user_id"].value, "user_id")
        body_limit: int | None = DEFAULT_BODY_LIMIT
        if "body_limit" in top:
            body_limit = self.size(top["body_limit"].value, "body_limit")
        routes = self.routes(top["routes"].value) if "routes" in top else None
        shared_dicts: tuple[tuple[str, int], ...] | None = ()
        if "lua_shared_dicts" in top:
            shared_dicts = lua_routes.validate_shared_dicts(self, top["lua_shared_dicts"].value)

        if upstreams is not None and routes is not None:
            # Only when every route was understood: a broken route's references are unknown.
            self.unused_upstreams(top["upstreams"].value)
        if (
            fmt is None
            or upstreams is None
            or sources is None
            or body_limit is None
            or routes is None
            or shared_dicts is None
        ):
            return None
        ruleset = RuleSet(
            fmt, upstreams, sources, body_limit, tuple(r for r, _ in routes), shared_dicts
        )
        shadowed = self.route_warnings(ruleset, routes)
        return dataclasses.replace(ruleset, shadowed_by=shadowed) if shadowed else ruleset

    def format(self, root: MapNode, entry: Entry | None) -> int | None:
        if entry is None:
            self.error(
                root, "format", "missing `format`", f"add `format: {FORMAT}` as the first line"
            )
            return None
        node = entry.value
        is_int = (
            isinstance(node, ScalarNode)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        )
        if is_int and isinstance(node, ScalarNode) and node.value == FORMAT:
            return FORMAT
        if is_int and isinstance(node, ScalarNode):
            self.error(
                node,
                "format",
                f"unsupported format {node.value}",
                f"this router reads format {FORMAT}",
            )
        else:
            shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
            self.error(
                node,
                "format",
                f"format must be the number {FORMAT}, found {shown}",
                f"write `format: {FORMAT}`",
            )
        return None

    # -- upstreams ---------------------------------------------------------------------

    def upstreams(self, node: Node) -> tuple[Upstream, ...] | None:
        if not isinstance(node, MapNode):
            self.error(
                node,
                "upstreams",
                f"expected a mapping of upstreams, found {node.kind}",
                "write `NAME: {endpoints: [HOST:PORT]}` for each upstream",
            )
            return None
        if not node.items:
            self.error(node, "upstreams", "no upstreams", "name at least one upstream")
            return None
        result: dict[str, Upstream] = {}
        ok = True
        for name, entry in node.items.items():
            upstream = self.upstream(name, entry)
            if upstream is None:
                ok = False
            else:
                result[name] = upstream
        # References are checked against every name written, even ones with errors inside,
        # so one bad endpoint does not also make every route that uses it "unknown".
        known: dict[str, Upstream | None] = dict.fromkeys(node.items)
        known.update(result)
        self.known_upstreams = known
        ok = self.fallbacks(result) and ok
        return tuple(result.values()) if ok else None

    def upstream(self, name: str, entry: Entry) -> Upstream | None:
        path = _join("upstreams", name)
        fields = self.mapping(
            entry.value,
            path,
            UPSTREAM_KEYS,
            required=("endpoints",),
            example='write `endpoints: ["127.0.0.1:9001"]` under it',
        )
        if fields is None:
            return None
        ok = "endpoints" in fields  # missing: reported by mapping()
        endpoints: list[tuple[str, int]] = []
        dns: DnsEndpoints | None = None
        if "endpoints" in fields and isinstance(fields["endpoints"].value, MapNode):
            dns = self.dns_endpoints(fields["endpoints"].value, _join(path, "endpoints"))
            ok = dns is not None
        elif "endpoints" in fields:
            items = self.seq(
                fields["endpoints"].value,
                _join(path, "endpoints"),
                '["127.0.0.1:9001", "127.0.0.1:9002"], or `{dns: NAME, port: PORT}` for the '
                "addresses a DNS name has",
            )
            # An empty list is a version scaled to zero: allowed as long as nothing can
            # send it a request (checked where it is named: to, pins, split).
            if items is None:
                ok = False
            else:
                seen: dict[tuple[str, int], int] = {}
                for i, item in enumerate(items):
                    item_path = f"{path}.endpoints[{i}]"
                    endpoint = self.endpoint(item, item_path)
                    if endpoint is None:
                        ok = False
                        continue
                    if endpoint in seen:
                        self.warn(
                            item,
                            item_path,
                            "endpoint listed twice",
                            f"it is also endpoints[{seen[endpoint]}]; it will get twice "
                            "the share of requests",
                        )
                    seen.setdefault(endpoint, i)
                    endpoints.append(endpoint)
        timeouts: dict[str, float | None] = {"connect_timeout": None, "read_timeout": None}
        for key in timeouts:
            if key in fields:
                timeouts[key] = self.duration(fields[key].value, _join(path, key))
                ok = ok and timeouts[key] is not None
        health: HealthCheck | None = None
        if "health_check" in fields:
            health = self.health_check(fields["health_check"].value, _join(path, "health_check"))
            ok = ok and health is not None
        fallback: str | None = None
        if "fallback" in fields:
            node = fields["fallback"].value
            fallback = self.text(node, _join(path, "fallback"), "upstream name", numbers_ok=True)
            ok = ok and fallback is not None
            self.fallback_nodes[name] = node  # the name is checked once every one is known
        max_fails: int | None = None
        if "max_fails" in fields:
            max_fails = self.whole_number(
                fields["max_fails"].value,
                _join(path, "max_fails"),
                0,
                None,
                "a whole number of 0 or more",
                "write e.g. 3 (0: failures never take an endpoint out)",
            )
            ok = ok and max_fails is not None
        fail_timeout: float | None = None
        if "fail_timeout" in fields:
            fail_timeout = self.duration(fields["fail_timeout"].value, _join(path, "fail_timeout"))
            ok = ok and fail_timeout is not None
        if not ok:
            return None
        return Upstream(
            name,
            tuple(endpoints),
            timeouts["connect_timeout"],
            timeouts["read_timeout"],
            health,
            fallback,
            dns=dns,
            max_fails=max_fails,
            fail_timeout=fail_timeout,
        )

    def dns_endpoints(self, node: MapNode, path: str) -> DnsEndpoints | None:
        """`{dns: NAME, port: PORT, interval: DURATION}`: one endpoint per A/AAAA record."""
        fields = self.mapping(
            node,
            path,
            DNS_KEYS,
            required=("dns", "port"),
            example="write `{dns: orders-v1.shop.svc.cluster.local, port: 8080}`",
        )
        if fields is None:
            return None
        name = self.dns_name(fields["dns"].value, _join(path, "dns")) if "dns" in fields else None
        port: int | None = None
        if "port" in fields:
            port_node = fields["port"].value
            value = self.number(port_node, _join(path, "port"), "the port", "8080")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int) and 1 <= value <= 65535:
                port = value
            elif isinstance(value, float):
                self.error(port_node, _join(path, "port"), f"port {value} is not a whole number")
            elif value is not None:
                self.error(
                    port_node,
                    _join(path, "port"),
                    f"port {value} is out of range",
                    "use a port from 1 to 65535",
                )
        interval: float | None = DEFAULT_DNS_INTERVAL
        if "interval" in fields:
            interval_node = fields["interval"].value
            interval = self.duration(interval_node, _join(path, "interval"))
            if interval is not None and interval < MIN_DNS_INTERVAL:
                self.error(
                    interval_node,
                    _join(path, "interval"),
                    f"{interval * 1000:g}ms is too short to ask DNS again",
                    "use at least 100ms; 5s (the default) suits a Kubernetes headless Service",
                )
                interval = None
        if name is None or port is None or interval is None:
            return None
        return DnsEndpoints(name, port, interval)

    def dns_name(self, node: Node, path: str) -> str | None:
        text = self.text(node, path, "DNS name")
        if text is None:
            return None
        example = "write a name such as orders-v1.shop.svc.cluster.local"
        if "://" in text:
            self.error(node, path, f"`{text}` is a URL, not a DNS name", example)
            return None
        if _looks_like_address(text):
            self.error(
                node,
                path,
                f"`{text}` is an address, not a DNS name",
                'list fixed addresses as `endpoints: ["HOST:PORT"]` instead',
            )
            return None
        if ":" in text:
            self.error(
                node,
                path,
                f"`{text}`: the port does not go in the name",
                "write the name alone and the port as `port:`",
            )
            return None
        labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
        if len(text.rstrip(".")) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
            self.error(
                node,
                path,
                f"`{text}` is not a DNS name",
                "use letters, digits and hyphens in dot-separated labels of at most 63 "
                f"characters; {example}",
            )
            return None
        return text.lower()

    def endpoint(self, node: Node, path: str) -> tuple[str, int] | None:
        text = self.text(node, path, "endpoint")
        if text is None:
            return None
        hint = "write HOST:PORT, e.g. 127.0.0.1:9001 or [::1]:9001"
        if "://" in text:
            self.error(
                node,
                path,
                f"`{text}` is a URL, not HOST:PORT",
                "leave out the scheme (http://) and any path",
            )
            return None
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            self.error(node, path, f"`{text}`: an IPv6 address needs brackets", hint)
            return None
        if not sep or not host or not port.isdigit() or not port.isascii():
            self.error(node, path, f"`{text}` is not HOST:PORT", hint)
            return None
        if not 1 <= int(port) <= 65535:
            self.error(node, path, f"port {port} is out of range", "use a port from 1 to 65535")
            return None
        if not _HOST.fullmatch(host):
            self.error(node, path, f"`{host}` is not a host name or address", hint)
            return None
        return host, int(port)

    def health_check(self, node: Node, path: str) -> HealthCheck | None:
        fields = self.mapping(
            node, path, HEALTH_KEYS, example="write `{path: /healthz, interval: 5s}`"
        )
        if fields is None:
            return None
        check_path: str | None = DEFAULT_HEALTH_PATH
        interval: float | None = DEFAULT_HEALTH_INTERVAL
        if "path" in fields:
            check_path = self.text(fields["path"].value, _join(path, "path"), "path")
            if check_path is not None and not check_path.startswith("/"):
                self.error(
                    fields["path"].value,
                    _join(path, "path"),
                    f"`{check_path}` does not start with /",
                    f"write /{check_path}",
                )
                check_path = None
        if "interval" in fields:
            interval = self.duration(fields["interval"].value, _join(path, "interval"))
        if check_path is None or interval is None:
            return None
        return HealthCheck(check_path, interval)

    def fallbacks(self, upstreams: dict[str, Upstream]) -> bool:
        """Each `fallback:` names another known upstream, and no chain of them comes back."""
        ok = True
        direct: dict[str, str] = {}
        for name, upstream in upstreams.items():
            target = upstream.fallback
            if target is None:
                continue
            node = self.fallback_nodes[name]
            path = _join(_join("upstreams", name), "fallback")
            if target == name:
                self.error(
                    node,
                    path,
                    f"`{name}` falls back to itself",
                    "name another upstream, such as the stable version, or remove `fallback:`",
                )
                ok = False
            elif self.check_upstream_name(node, path, target):
                direct[name] = target
            else:
                ok = False
        reported: set[str] = set()
        for name in direct:
            cycle = find_cycle(direct, name)
            if cycle is None or cycle[0] != name or name in reported:
                continue  # no cycle, or one reported at its first member in file order
            reported.update(cycle)
            self.error(
                self.fallback_nodes[name],
                _join(_join("upstreams", name), "fallback"),
                f"fallbacks go round in a circle: {' -> '.join(cycle)}",
                "a chain of fallbacks must end somewhere; remove `fallback:` from one of "
                f"them, e.g. from upstreams.{cycle[-2]}",
            )
            ok = False
        if ok:
            for name, target in direct.items():
                if self.has_no_endpoints(target):
                    self.warn(
                        self.fallback_nodes[name],
                        _join(_join("upstreams", name), "fallback"),
                        f"`{target}` has no endpoints, so requests that fall back to it fail",
                        f"list endpoints under upstreams.{target}, or fall back to another "
                        "upstream",
                    )
        return ok

    def upstream_ref(self, node: Node, path: str) -> str | None:
        """The upstream of a `to` (route or pin): every request sent there must find one."""
        name = self.text(node, path, "upstream name", numbers_ok=True)
        if name is None or not self.check_upstream_name(node, path, name):
            return None
        if self.has_no_endpoints(name):
            self.error(
                node,
                path,
                f"upstream `{name}` has no endpoints, so the requests sent to it would fail",
                f"list its endpoints under upstreams.{name}, or send them to another upstream",
            )
            return None
        return name

    def has_no_endpoints(self, name: str) -> bool:
        """True when requests sent to `name` cannot find an endpoint: it has none, and
        neither has any upstream it falls back to. A DNS upstream's endpoints are found at
        run time, and zero of them then is no rules error."""
        known = self.known_upstreams or {}
        seen: set[str] = set()
        upstream = known.get(name)
        while (
            upstream is not None
            and not upstream.endpoints
            and upstream.dns is None
            and upstream.name not in seen
        ):
            seen.add(upstream.name)
            if upstream.fallback is None:
                return True
            upstream = known.get(upstream.fallback)
        return False

    def check_upstream_name(self, node: Node, path: str, name: str) -> bool:
        known = self.known_upstreams
        if known is None:
            return True  # the upstreams section itself is broken; reported there
        if name in known:
            self.used_upstreams.add(name)
            return True
        listing = f"known: {', '.join(known)}" if known else "no upstreams are defined"
        suggestion = _did_you_mean(name, known)
        hint = f"{listing}; did you mean {suggestion}?" if suggestion else listing
        self.error(node, path, "unknown upstream", hint)
        return False

    def unused_upstreams(self, node: Node) -> None:
        if not isinstance(node, MapNode) or self.known_upstreams is None:
            return
        for name, entry in node.items.items():
            if name not in self.used_upstreams:
                self.warn(
                    entry.key,
                    _join("upstreams", name),
                    "not used by any route",
                    "send traffic to it with `to`, a pin or a split, or remove it",
                )

    # -- user ID sources ---------------------------------------------------------------

    def sources(self, node: Node, path: str) -> tuple[UserIdSource, ...] | None:
        items = self.seq(node, path, "a list like `- header: X-User-Id`")
        if items is None:
            return None
        result: list[UserIdSource] = []
        ok = True
        for i, item in enumerate(items):
            source = self.source(item, f"{path}[{i}]")
            if source is None:
                ok = False
            else:
                result.append(source)
        return tuple(result) if ok else None

    def source(self, node: Node, path: str) -> UserIdSource | None:
        example = "write one source per item, e.g. `- header: X-User-Id` or `- json: user.id`"
        if not isinstance(node, MapNode):
            self.error(
                node,
                path,
                f"expected a source like `header: X-User-Id`, found {node.kind}",
                example,
            )
            return None
        fields = self.mapping(node, path, SOURCE_KINDS)
        if fields is None:
            return None
        if len(node.items) != 1:
            if not node.items:
                self.error(node, path, "empty source", example)
            elif len(fields) > 1:
                self.error(node, path, f"one item names {len(fields)} sources", example)
            return None
        if len(fields) != 1:
            return None  # the unknown kind was reported by mapping()
        ((kind, entry),) = fields.items()
        value_path = _join(path, kind)
        name = self.text(entry.value, value_path, f"{kind} name", numbers_ok=kind != "header")
        if name is None:
            return None
        if kind in ("header", "cookie") and not _TOKEN.fullmatch(name):
            self.error(
                entry.value,
                value_path,
                f"`{name}` is not a valid {kind} name",
                "use letters, digits and - _ . only",
            )
            return None
        if kind == "json":
            try:
                parse_json_path(name)
            except ValueError as exc:
                self.error(
                    entry.value,
                    value_path,
                    f"bad JSON path `{name}`: {exc}",
                    "write a dotted path like user.id or items[0].id",
                )
                return None
        return UserIdSource(kind, name)

    # -- routes ------------------------------------------------------------------------

    def routes(self, node: Node) -> list[tuple[Route, MapNode]] | None:
        items = self.seq(node, "routes", "a list of routes, each starting with `- name: ...`")
        if items is None:
            return None
        if not items:
            self.error(
                node,
                "routes",
                "no routes",
                "add at least one route, e.g. `- {name: all, to: UPSTREAM}`",
            )
            return None
        result: list[tuple[Route, MapNode]] = []
        names: dict[str, Node] = {}
        ok = True
        for i, item in enumerate(items):
            route = self.route(item, f"routes[{i}]", names)
            if route is None:
                ok = False
            else:
                assert isinstance(item, MapNode)
                result.append((route, item))
        return result if ok else None

    def route(self, node: Node, path: str, names: dict[str, Node]) -> Route | None:
        fields = self.mapping(
            node,
            path,
            ROUTE_KEYS,
            required=("name",),
            example="write `name:`, `match:` and `to:` or `split:` under it",
            listed=CORE_ROUTE_KEYS,  # the nginx-migration extensions are not suggested
        )
        if fields is None:
            return None
        ok = True
        name: str | None = None
        if "name" in fields:
            name_node = fields["name"].value
            name = self.text(name_node, _join(path, "name"), "route name", numbers_ok=True)
            if name is not None and name in names:
                self.error(
                    name_node,
                    _join(path, "name"),
                    f"route name `{name}` is used twice",
                    f"it is also the name at line {names[name].line}; names must be unique",
                )
                ok = False
            elif name is not None:
                names[name] = name_node
        match = Match()
        match_ok = True
        if "match" in fields:
            got = self.match(fields["match"].value, _join(path, "match"))
            match_ok = got is not None
            ok = ok and match_ok
            match = got or match
        pins: list[Pin] = []
        if "pins" in fields:
            got_pins = self.pins(fields["pins"].value, _join(path, "pins"))
            ok = ok and got_pins is not None
            pins = got_pins or []
        to: str | None = None
        split: Split | None = None
        if "to" in fields:
            to = self.upstream_ref(fields["to"].value, _join(path, "to"))
            ok = ok and to is not None
        if "split" in fields:
            # The canary of a rollout starts at weight 0 on purpose: no warning for it.
            canary = rollout_block.canary_written(fields.get("rollout"))
            split = self.split(fields["split"].value, _join(path, "split"), canary)
            ok = ok and split is not None
        split_clients: SplitClientsMode | None = None
        lua: LuaAction | None = None
        if "split_clients" in fields:
            split_clients = lua_routes.validate_split_clients(
                self, fields["split_clients"].value, _join(path, "split_clients")
            )
            ok = ok and split_clients is not None
        if "lua" in fields:
            lua = lua_routes.validate_lua(self, fields["lua"].value, _join(path, "lua"))
            ok = ok and lua is not None
        # A route whose `match` is broken has no known path to rewrite: None says so.
        known_match = match if match_ok else None
        direct_response: DirectResponse | None = None
        redirect: Redirect | None = None
        if "direct_response" in fields:
            direct_response = direct.validate_direct_response(
                self, fields["direct_response"].value, _join(path, "direct_response")
            )
            ok = ok and direct_response is not None
        if "redirect" in fields:
            redirect = direct.validate_redirect(
                self, fields["redirect"].value, _join(path, "redirect"), known_match
            )
            ok = ok and redirect is not None
        rewrite = direct.validate_rewrite(self, fields, path, known_match)
        ok = ok and rewrite is not False
        actions = [fields[k] for k in ROUTE_ACTIONS if k in fields]
        if len(actions) > 1 and not ("to" in fields and "split" in fields and len(actions) == 2):
            second = max(actions, key=lambda e: (e.key.line, e.key.column))
            self.error(
                second.key,
                _join(path, second.key.text),
                "a route has one of "
                + ", ".join(f"`{k}`" for k in ROUTE_ACTIONS[:-1])
                + f" and `{ROUTE_ACTIONS[-1]}`",
                "keep the one that decides where this route's requests go",
            )
            ok = False
        elif rewrite and (direct_response is not None or redirect is not None):
            key = "prefix_rewrite" if "prefix_rewrite" in fields else "regex_rewrite"
            self.error(
                fields[key].key,
                _join(path, key),
                "this route answers itself, so no path goes upstream to rewrite",
                "remove it; a redirect takes `prefix_rewrite` inside `redirect:`",
            )
            ok = False
        elif "to" in fields and "split" in fields:
            second = max(fields["to"], fields["split"], key=lambda e: (e.key.line, e.key.column))
            self.error(
                second.key,
                _join(path, second.key.text),
                "a route has either `to` or `split`, not both",
                "keep `to` for one upstream, `split` for weights",
            )
            ok = False
        elif not actions:
            self.error(
                node,
                path,
                "a route needs `to` or `split`",
                "add `to: UPSTREAM` for one upstream or `split:` with weights",
            )
            ok = False
        salt = name
        if "salt" in fields:
            salt = self.text(fields["salt"].value, _join(path, "salt"), "salt", numbers_ok=True)
            ok = ok and salt is not None
        sources: tuple[UserIdSource, ...] | None = None
        if "user_id" in fields:
            sources = self.sources(fields["user_id"].value, _join(path, "user_id"))
            ok = ok and sources is not None
        body_limit: int | None = None
        if "body_limit" in fields:
            body_limit = self.size(fields["body_limit"].value, _join(path, "body_limit"))
            ok = ok and body_limit is not None
        rollout = None
        if "rollout" in fields:
            action = next((k for k in ROUTE_ACTIONS if k in fields and k != "split"), None)
            rollout = rollout_block.validate_rollout(
                self, fields["rollout"].value, _join(path, "rollout"), split, action
            )
            ok = ok and rollout is not None
        if not ok or name is None or salt is None or isinstance(rewrite, bool):
            return None
        return Route(
            name,
            match,
            tuple(pins),
            to,
            split,
            salt,
            sources,
            body_limit,
            split_clients,
            lua,
            direct_response,
            redirect,
            rewrite,
            rollout,
        )

    def match(self, node: Node, path: str) -> Match | None:
        fields = self.mapping(
            node,
            path,
            MATCH_KEYS,
            example="write e.g. `{hosts: [api.example.com], path_prefix: /x}`",
            listed=CORE_MATCH_KEYS,
        )
        if fields is None:
            return None
        ok = True
        hosts: tuple[str, ...] | None = None
        if "hosts" in fields:
            hosts = self.hosts(fields["hosts"].value, _join(path, "hosts"))
            ok = ok and hosts is not None
        paths = [fields[k] for k in PATH_CONDITIONS if k in fields]
        if len(paths) > 1:
            second = max(paths, key=lambda e: (e.key.line, e.key.column))
            self.error(
                second.key,
                _join(path, second.key.text),
                "a match has one of `path_prefix`, `path_exact` and `path_regex`",
                "keep one; a route per path covers several",
            )
            ok = False
        prefix = exact = path_regex = None
        for key in ("path_prefix", "path_exact"):
            if key not in fields:
                continue
            value_node = fields[key].value
            text = self.text(value_node, _join(path, key), "path")
            if text is not None and not text.startswith("/"):
                self.error(
                    value_node,
                    _join(path, key),
                    f"`{text}` does not start with /",
                    f"write /{text}",
                )
                text = None
            ok = ok and text is not None
            if key == "path_prefix":
                prefix = text
            else:
                exact = text
        if "path_regex" in fields:
            path_regex = self.regex(fields["path_regex"].value, _join(path, "path_regex"))
            ok = ok and path_regex is not None
        host_regex: str | None = None
        if "host_regex" in fields:
            host_regex = self.regex(fields["host_regex"].value, _join(path, "host_regex"))
            ok = ok and host_regex is not None
        default_host = False
        if "default_host" in fields:
            given = self.boolean(
                fields["default_host"].value,
                _join(path, "default_host"),
                "write `default_host: true`",
            )
            ok = ok and given is not None
            default_host = bool(given)
            named = [k for k in ("hosts", "host_regex") if k in fields]
            if default_host and named:
                self.error(
                    fields["default_host"].key,
                    _join(path, "default_host"),
                    f"`default_host` holds only for hosts no route names, so it cannot go "
                    f"with `{named[0]}`",
                    "make two routes: one for the named hosts, one for the others",
                )
                ok = False
        methods: tuple[str, ...] | None = None
        if "methods" in fields:
            methods = self.methods(fields["methods"].value, _join(path, "methods"))
            ok = ok and methods is not None
        headers: tuple[tuple[str, str], ...] | None = None
        if "headers" in fields:
            headers = self.pin_headers(fields["headers"].value, _join(path, "headers"))
            ok = ok and headers is not None
        if not ok:
            return None
        return Match(hosts, prefix, methods, exact, path_regex, host_regex, default_host, headers)

    def hosts(self, node: Node, path: str) -> tuple[str, ...] | None:
        items = self.seq(node, path, "[api.example.com]")
        if items is None:
            return None
        if not items:
            self.error(
                node,
                path,
                "empty list: the route would never match",
                "list at least one host, or remove `hosts` to match every host",
            )
            return None
        result: list[str] = []
        ok = True
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]"
            host = self.text(item, item_path, "host")
            if host is None:
                ok = False
                continue
            problem = _host_problem(host)
            if problem:
                self.error(item, item_path, problem[0], problem[1])
                ok = False
                continue
            result.append(host.lower().strip("[]"))
        return tuple(dict.fromkeys(result)) if ok else None

    def methods(self, node: Node, path: str) -> tuple[str, ...] | None:
        items = self.seq(node, path, "[GET, POST]")
        if items is None:
            return None
        if not items:
            self.error(
                node,
                path,
                "empty list: the route would never match",
                "list at least one method, or remove `methods` to match every method",
            )
            return None
        result: list[str] = []
        ok = True
        for i, item in enumerate(items):
            method = self.text(item, f"{path}[{i}]", "method")
            if method is None:
                ok = False
            elif not _TOKEN.fullmatch(method):
                self.error(
                    item,
                    f"{path}[{i}]",
                    f"`{method}` is not an HTTP method",
                    "write e.g. GET, POST, PUT, DELETE",
                )
                ok = False
            else:
                result.append(method.upper())
        return tuple(dict.fromkeys(result)) if ok else None

    # -- pins --------------------------------------------------------------------------

    def pins(self, node: Node, path: str) -> list[Pin] | None:
        items = self.seq(node, path, 'a list of pins, each like `- {to: v2, users: ["42"]}`')
        if items is None:
            return None
        result: list[Pin] = []
        ok = True
        for i, item in enumerate(items):
            pin = self.pin(item, f"{path}[{i}]")
            if pin is None:
                ok = False
            else:
                result.append(pin)
        return result if ok else None

    def pin(self, node: Node, path: str) -> Pin | None:
        fields = self.mapping(
            node, path, PIN_KEYS, required=("to",), example='write e.g. `{to: v2, users: ["42"]}`'
        )
        if fields is None:
            return None
        ok = True
        to: str | None = None
        if "to" in fields:
            to = self.upstream_ref(fields["to"].value, _join(path, "to"))
            ok = to is not None
        if not any(c in fields for c in PIN_CONDITIONS):
            if isinstance(node, MapNode) and all(k in PIN_KEYS for k in node.items):
                self.error(
                    node,
                    path,
                    "a pin needs at least one condition",
                    f"add one of {', '.join(PIN_CONDITIONS)}; to send every request "
                    "to one upstream use the route's `to`",
                )
            return None
        values: dict[str, object] = {}
        for cond in PIN_CONDITIONS:
            if cond not in fields:
                continue
            value = getattr(self, f"pin_{cond}")(fields[cond].value, _join(path, cond))
            if value is None:
                ok = False
            values[cond] = value
        if not ok or to is None:
            return None
        return Pin(to, **values)  # type: ignore[arg-type]

    def _nonempty_list(self, node: Node, path: str, example: str) -> list[Node] | None:
        items = self.seq(node, path, example)
        if items is not None and not items:
            self.warn(
                node,
                path,
                "empty list: this pin never holds",
                "list at least one value, or remove the pin",
            )
        return items

    def pin_users(self, node: Node, path: str) -> frozenset[str] | None:
        items = self._nonempty_list(node, path, '["10086", "42"]')
        if items is None:
            return None
        users: list[str] = []
        ok = True
        for i, item in enumerate(items):
            user = self.text(item, f"{path}[{i}]", "user ID", numbers_ok=True)
            ok = ok and user is not None
            if user is not None:
                users.append(user)
        return frozenset(users) if ok else None

    def pin_user_ranges(self, node: Node, path: str) -> tuple[tuple[int, int], ...] | None:
        items = self._nonempty_list(node, path, "[[100000, 199999]]")
        if items is None:
            return None
        ranges: list[tuple[int, int]] = []
        ok = True
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]"
            pair = item.items if isinstance(item, SeqNode) else None
            if pair is None or len(pair) != 2:
                self.error(
                    item,
                    item_path,
                    "expected a pair [low, high]",
                    "write e.g. [100000, 199999]; both ends are included",
                )
                ok = False
                continue
            bounds: list[int] = []
            for j, bound in enumerate(pair):
                if (
                    isinstance(bound, ScalarNode)
                    and isinstance(bound.value, int)
                    and not isinstance(bound.value, bool)
                ):
                    bounds.append(bound.value)
                else:
                    shown = f"`{bound.text}`" if isinstance(bound, ScalarNode) else bound.kind
                    self.error(
                        bound,
                        f"{item_path}[{j}]",
                        f"expected a whole number, found {shown}",
                        "user ranges compare user IDs as integers",
                    )
                    ok = False
            if len(bounds) == 2:
                if bounds[0] > bounds[1]:
                    self.error(
                        item,
                        item_path,
                        f"low end {bounds[0]} is above high end {bounds[1]}",
                        f"write [{bounds[1]}, {bounds[0]}]",
                    )
                    ok = False
                else:
                    ranges.append((bounds[0], bounds[1]))
        return tuple(ranges) if ok else None

    def pin_user_suffixes(self, node: Node, path: str) -> tuple[str, ...] | None:
        items = self._nonempty_list(node, path, '["07"]')
        if items is None:
            return None
        suffixes = [
            self.text(item, f"{path}[{i}]", "suffix", numbers_ok=True)
            for i, item in enumerate(items)
        ]
        if any(s is None for s in suffixes):
            return None
        return tuple(dict.fromkeys(s for s in suffixes if s is not None))

    def pin_user_pattern(self, node: Node, path: str) -> str | None:
        return self.regex(node, path, numbers_ok=True)

    def regex(self, node: Node, path: str, numbers_ok: bool = False) -> str | None:
        pattern = self.text(node, path, "regular expression", numbers_ok=numbers_ok)
        if pattern is None:
            return None
        try:
            re.compile(pattern)
        except re.error as exc:
            where = f" at position {exc.pos}" if exc.pos is not None else ""
            self.error(
                node,
                path,
                f"bad regular expression: {exc.msg}{where}",
                "check brackets and escapes; in YAML double quotes write \\\\ for \\",
            )
            return None
        return pattern

    def pin_user_percent(self, node: Node, path: str) -> float | None:
        if (
            isinstance(node, ScalarNode)
            and isinstance(node.value, str)
            and node.value.strip().endswith("%")
        ):
            self.error(
                node,
                path,
                f"`{node.text}`: write the number without %",
                f"write {node.value.strip()[:-1].strip()}",
            )
            return None
        value = self.number(node, path, "user_percent", "5 or 0.5")
        if value is None:
            return None
        if not 0 <= value <= 100:
            self.error(
                node,
                path,
                f"{_fmt_number(value)} is not between 0 and 100",
                "write a percentage from 0 to 100",
            )
            return None
        if not _two_decimals(value):
            self.error(
                node,
                path,
                f"{_written(node)} has more than two decimals: a percentage has at most two",
                _two_decimal_choices(node, value),
            )
            return None
        return float(value)

    def pin_headers(self, node: Node, path: str) -> tuple[tuple[str, str], ...] | None:
        if not isinstance(node, MapNode):
            self.error(
                node,
                path,
                f"expected a mapping of header: regex, found {node.kind}",
                'write e.g. {X-App-Version: "^3\\\\."}',
            )
            return None
        if not node.items:
            self.warn(
                node,
                path,
                "no headers listed: this condition always holds",
                "list at least one header, or remove `headers`",
            )
        result: list[tuple[str, str]] = []
        ok = True
        seen: dict[str, str] = {}
        for name, entry in node.items.items():
            item_path = _join(path, name)
            if not _TOKEN.fullmatch(name):
                self.error(
                    entry.key,
                    item_path,
                    f"`{name}` is not a valid header name",
                    "use letters, digits and - _ . only",
                )
                ok = False
                continue
            if name.lower() in seen:
                self.error(
                    entry.key,
                    item_path,
                    f"header `{name}` is listed twice",
                    f"header names ignore case (`{seen[name.lower()]}` is the same "
                    "header); join the two regular expressions",
                )
                ok = False
                continue
            seen[name.lower()] = name
            pattern = self.regex(entry.value, item_path, numbers_ok=True)
            if pattern is None:
                ok = False
            else:
                result.append((name, pattern))
        return tuple(result) if ok else None

    def pin_client_cidrs(self, node: Node, path: str) -> tuple[str, ...] | None:
        items = self._nonempty_list(node, path, "[192.168.0.0/16]")
        if items is None:
            return None
        result: list[str] = []
        ok = True
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]"
            text = self.text(item, item_path, "network")
            if text is None:
                ok = False
                continue
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError:
                self.error(
                    item,
                    item_path,
                    f"`{text}` is not an address or CIDR",
                    "write e.g. 192.168.0.0/16, 10.1.2.3 or 2001:db8::/32",
                )
                ok = False
                continue
            try:
                ipaddress.ip_network(text, strict=True)
            except ValueError:
                self.warn(
                    item,
                    item_path,
                    f"`{text}` has host bits set; it means {network}",
                    f"write {network}",
                )
            result.append(network.with_prefixlen)
        return tuple(dict.fromkeys(result)) if ok else None

    # -- split -------------------------------------------------------------------------

    def split(self, node: Node, path: str, driven: str | None = None) -> Split | None:
        """`driven`: an upstream whose weight a rollout drives (weight 0 is its start)."""
        example = "write `UPSTREAM: WEIGHT` lines, e.g. `orders-v1: 95` and `orders-v1.1: 5`"
        if isinstance(node, ScalarNode) and node.value == "replicas":
            known = self.known_upstreams
            if known is None:
                return None
            if any(u is None for u in known.values()):
                return None  # an upstream is broken; reported there
            self.used_upstreams.update(known)
            upstreams = [u for u in known.values() if u is not None]
            if all(self.has_no_endpoints(u.name) for u in upstreams):
                self.error(
                    node,
                    path,
                    "no upstream has endpoints, so `split: replicas` has nowhere to send requests",
                    "list the endpoints of at least one upstream",
                )
                return None
            for upstream in upstreams:
                if self.has_no_endpoints(upstream.name):
                    self.warn_replicas_of_nothing(node, path, upstream.name)
            return Split(tuple((u.name, float(len(u.endpoints))) for u in upstreams), replicas=True)
        if not isinstance(node, MapNode):
            shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
            self.error(node, path, f"expected weights or `replicas`, found {shown}", example)
            return None
        if not node.items:
            self.error(node, path, "no upstreams in the split", example)
            return None
        weights: list[tuple[str, float]] = []
        follows: set[str] = set()
        total = Decimal(0)
        ok = True
        for name, entry in node.items.items():
            item_path = _join(path, name)
            known_name = self.check_upstream_name(entry.key, item_path, name)
            weight = self.weight(entry.value, item_path, name)
            if weight is None or not known_name:
                ok = False
                continue
            if weight > 0 and self.has_no_endpoints(name):
                self.error(
                    entry.value,
                    item_path,
                    f"`{name}` has no endpoints, so the requests this split gives it would fail",
                    "list its endpoints, or set its weight to 0 or `replicas` while it has none",
                )
                ok = False
                continue
            replicas = isinstance(entry.value, ScalarNode) and entry.value.value == "replicas"
            if replicas:
                follows.add(name)
            if replicas and self.is_dns(name):
                pass  # its count is known only at run time; zero is a version scaled down
            elif weight == 0 and replicas:
                self.warn_replicas_of_nothing(entry.value, item_path, name)
            elif weight == 0 and name != driven:
                self.warn(
                    entry.value,
                    item_path,
                    "weight 0: this upstream gets no requests from this split",
                    "raise the weight or remove the line",
                )
            total += Decimal(repr(weight))
            weights.append((name, weight))
        if ok and total <= 0 and not any(self.is_dns(name) for name in follows):
            self.error(
                node,
                path,
                "the weights add up to 0",
                "give at least one upstream a positive weight",
            )
            return None
        return Split(tuple(weights), follows=frozenset(follows)) if ok else None

    def is_dns(self, name: str) -> bool:
        upstream = (self.known_upstreams or {}).get(name)
        return upstream is not None and upstream.dns is not None

    def warn_replicas_of_nothing(self, node: Node, path: str, name: str) -> None:
        self.warn(
            node,
            path,
            f"`{name}` has no endpoints, so `replicas` gives it weight 0: "
            "it gets no requests from this split",
            f"fine while it is scaled to zero; list endpoints under upstreams.{name} "
            "to send it traffic",
        )

    def weight(self, node: Node, path: str, name: str) -> float | None:
        if isinstance(node, ScalarNode) and node.value == "replicas":
            upstream = (self.known_upstreams or {}).get(name)
            return float(len(upstream.endpoints)) if upstream is not None else None
        if (
            isinstance(node, ScalarNode)
            and isinstance(node.value, str)
            and node.value.strip().endswith("%")
        ):
            self.error(
                node,
                path,
                f"`{node.text}`: write the weight without %",
                f"write {node.value.strip()[:-1].strip()}",
            )
            return None
        value = self.number(node, path, "a weight", "95 (or `replicas`)")
        if value is None:
            return None
        if value < 0:
            self.error(
                node,
                path,
                f"negative weight {_fmt_number(value)}",
                "use 0 or more; 0 sends nothing",
            )
            return None
        if not _two_decimals(value):
            self.error(
                node,
                path,
                f"weight {_written(node)} has more than two decimals: a weight has at most two",
                _two_decimal_choices(node, value),
            )
            return None
        return float(value)

    # -- whole-file warnings -----------------------------------------------------------

    def route_warnings(
        self, ruleset: RuleSet, routes: list[tuple[Route, MapNode]]
    ) -> tuple[tuple[str, str], ...]:
        """Warn about what never decides; returns (route, the route shadowing it) pairs."""
        shadowed: list[tuple[str, str]] = []
        compare_routes = len(routes) * (len(routes) - 1) // 2 <= MAX_SHADOW_PAIRS
        self.pairs_left = MAX_SHADOW_PAIRS  # for pins
        catch_all: Route | None = None
        pinned_only = _pinned_only(ruleset)
        for i, (route, node) in enumerate(routes):
            path = f"routes[{i}]"
            if pinned_only and route.split is not None and route.split.replicas:
                self.replicas_reach_pinned(route.split, node, f"{path}.split", pinned_only)
            above = catch_all
            if compare_routes:
                above = next(
                    (
                        r
                        for r, _ in routes[:i]
                        if r.match.matches_everything or _match_covers(r.match, route.match)
                    ),
                    None,
                )
            if catch_all is None and route.match.matches_everything:
                catch_all = route
            if above is not None:
                shadowed.append((route.name, above.name))
            if above is not None and above.match.matches_everything:
                self.warn(
                    node,
                    path,
                    f"never used: route `{above.name}` above matches every request",
                    "move this route above it, or give that one a `match`",
                )
            elif above is not None:
                self.warn(
                    node,
                    path,
                    f"never used: route `{above.name}` above matches every request this one "
                    "matches",
                    "move this route above it, or narrow that one's `match`",
                )
            sources = ruleset.sources_of(route)
            if not sources:
                for j, pin in enumerate(route.pins):
                    if pin.needs_user:
                        self.warn(
                            node,
                            f"{path}.pins[{j}]",
                            "never holds: there is no `user_id` source for this route",
                            "add `user_id:` to the file or to the route",
                        )
            self.shadowed_pins(route, node, path, has_user=bool(sources))
            if ruleset.body_limit_of(route) == 0 and any(s.reads_body for s in sources):
                self.warn(
                    node,
                    path,
                    "body_limit is 0, so json/form sources never yield a user ID",
                    "raise body_limit, e.g. 64KiB",
                )
        return tuple(shadowed)

    def replicas_reach_pinned(
        self, split: Split, node: MapNode, path: str, pinned_only: set[str]
    ) -> None:
        """`split: replicas` takes every upstream, also one only pins send to (a major
        version for chosen users): ordinary users would reach it."""
        total = sum(w for _, w in split.weights)
        meant = [n for n, w in split.weights if w > 0 and n not in pinned_only]
        example = ", ".join(f"{n}: replicas" for n in meant) or "UPSTREAM: replicas"
        for name, weight in split.weights:
            if name not in pinned_only or (weight <= 0 and not self.is_dns(name)):
                continue
            count = int(weight)
            share = (
                f"gives `{name}` {_fmt_number(round(100 * weight / total, 2))}% of the users it "
                f"splits ({count} endpoint{'' if count == 1 else 's'})"
                if weight > 0
                else f"gives `{name}` a share as soon as its DNS name has records"
            )
            self.warn(
                node.items["split"].value,
                path,
                f"`split: replicas` {share}, but only pins send requests to it: ordinary users "
                "would reach it",
                f"name the upstreams the split is for: `split: {{{example}}}`",
            )

    def shadowed_pins(self, route: Route, node: MapNode, path: str, has_user: bool) -> None:
        """A pin that holds only where an earlier pin of the route already holds."""
        live = [(j, pin) for j, pin in enumerate(route.pins) if not _never_holds(pin, has_user)]
        self.pairs_left -= len(live) * (len(live) - 1) // 2
        if self.pairs_left < 0:
            return
        for k, (j, pin) in enumerate(live):
            above = next(((i, p) for i, p in live[:k] if _pin_covers(p, pin)), None)
            if above is None:
                continue
            i, first = above
            if first.to == pin.to:
                hint = f"both send to {pin.to}; remove this pin"
            else:
                hint = f"pins[{i}] sends them to {first.to}; move this pin above it, or remove it"
            self.warn(
                _list_item(node, "pins", j),
                f"{path}.pins[{j}]",
                f"never used: pins[{i}] above ({'+'.join(first.conditions)}) holds for every "
                "request this pin holds for",
                hint,
            )


def _pinned_only(ruleset: RuleSet) -> set[str]:
    """Upstreams that pins send requests to and nothing else names: no route's `to`, no
    weight written in a split, no script's map, no split_clients bucket, no fallback."""
    pinned: set[str] = set()
    named: set[str] = {u.fallback for u in ruleset.upstreams if u.fallback is not None}
    for route in ruleset.routes:
        pinned.update(pin.to for pin in route.pins)
        if route.to is not None:
            named.add(route.to)
        if route.split is not None and not route.split.replicas:
            named.update(name for name, _ in route.split.weights)
        if route.lua is not None:
            named.update(upstream for _, upstream in route.lua.mapping)
            named.update(n for n in (route.lua.default, route.lua.fallback) if n is not None)
        if route.split_clients is not None:
            named.update(upstream for _, upstream in route.split_clients.buckets)
            if route.split_clients.unmatched is not None:
                named.add(route.split_clients.unmatched)
    return pinned - named


# -- shadowing: what surely holds wherever something later holds -------------------------
# These only feed warnings, so they must never guess: each answers True only when the
# earlier rule certainly holds for every request the later one holds for.


def _list_item(node: MapNode, key: str, index: int) -> Node:
    entry = node.items.get(key)
    if entry is not None and isinstance(entry.value, SeqNode) and index < len(entry.value.items):
        return entry.value.items[index]
    return node


def _match_covers(first: Match, later: Match) -> bool:
    """Every request that `later` matches, `first` matches too."""
    return (
        (
            first.hosts is None
            or (
                later.hosts is not None
                and all(any(pattern_covers(f, h) for f in first.hosts) for h in later.hosts)
            )
        )
        and (first.host_regex is None or later.host_regex == first.host_regex)
        and (not first.default_host or later.default_host)
        and (
            first.headers is None
            or (
                later.headers is not None
                and {(n.lower(), rx) for n, rx in first.headers}
                <= {(n.lower(), rx) for n, rx in later.headers}
            )
        )
        and (
            first.methods is None
            or (later.methods is not None and set(later.methods) <= set(first.methods))
        )
        and _path_covers(first, later)
    )


def _path_covers(first: Match, later: Match) -> bool:
    """Every path `later` matches, `first` matches too (only when certain)."""
    if first.path_prefix is not None:
        written = later.path_prefix if later.path_prefix is not None else later.path_exact
        return written is not None and written.startswith(first.path_prefix)
    if first.path_exact is not None:
        return later.path_exact == first.path_exact
    if first.path_regex is not None:
        if later.path_regex == first.path_regex:
            return True
        return (
            later.path_exact is not None
            and re.search(first.path_regex, later.path_exact) is not None
        )
    return True


def _never_holds(pin: Pin, has_user: bool) -> bool:
    """An empty list, user_percent 0, or a user condition without user ID sources."""
    lists = (pin.users, pin.user_ranges, pin.user_suffixes, pin.client_cidrs)
    return (
        any(v is not None and not v for v in lists)
        or pin.user_percent == 0
        or (pin.needs_user and not has_user)
    )


def _pin_covers(first: Pin, later: Pin) -> bool:
    """`first` holds wherever `later` holds: each of its conditions follows from `later`'s.

    Both pins are of one route (one salt, one user ID), and neither is empty (see
    _never_holds). A condition on the user ID follows only from one on the user ID, so a
    pin that can hold without a user ID is never shadowed by one that cannot.
    """
    return all(_COVERED[c](first, later) for c in first.conditions)


def _users_covered(first: Pin, later: Pin) -> bool:
    assert first.users is not None
    return later.users is not None and later.users <= first.users


def _ranges_covered(first: Pin, later: Pin) -> bool:
    assert first.user_ranges is not None
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(first.user_ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))

    def inside(lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in merged)

    if later.user_ranges is not None:
        return all(inside(lo, hi) for lo, hi in later.user_ranges)
    if later.users is not None:
        numbers = [_id_number(u) for u in later.users]
        return all(n is not None and inside(n, n) for n in numbers)
    return False


def _id_number(user: str) -> int | None:
    """The number user_ranges read from an ID: ASCII digits only (leading zeros allowed)."""
    if not (user.isdigit() and user.isascii()) or len(user.lstrip("0")) > 4000:
        return None  # 4000: below int()'s digit limit; no range bound is that long
    return int(user)


def _suffixes_covered(first: Pin, later: Pin) -> bool:
    assert first.user_suffixes is not None
    ends = first.user_suffixes
    if later.user_suffixes is not None:
        return all(s.endswith(ends) for s in later.user_suffixes)
    return later.users is not None and all(u.endswith(ends) for u in later.users)


def _pattern_covered(first: Pin, later: Pin) -> bool:
    assert first.user_pattern is not None
    if later.user_pattern == first.user_pattern:
        return True
    if later.users is None:
        return False
    fullmatch = re.compile(first.user_pattern).fullmatch
    return all(fullmatch(u) is not None for u in later.users)


def _percent_covered(first: Pin, later: Pin) -> bool:
    assert first.user_percent is not None
    if first.user_percent >= 100:  # every bucket: holds for any user ID
        return later.needs_user
    return later.user_percent is not None and later.user_percent <= first.user_percent


def _headers_covered(first: Pin, later: Pin) -> bool:
    assert first.headers is not None
    written = {name.lower(): regex for name, regex in later.headers or ()}
    return all(written.get(name.lower()) == regex for name, regex in first.headers)


def _cidrs_covered(first: Pin, later: Pin) -> bool:
    assert first.client_cidrs is not None
    if later.client_cidrs is None:
        return False
    outer = [ipaddress.ip_network(c) for c in first.client_cidrs]
    return all(
        any(_subnet(ipaddress.ip_network(c), net) for net in outer) for c in later.client_cidrs
    )


def _subnet(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


_COVERED: dict[str, Callable[[Pin, Pin], bool]] = {
    "users": _users_covered,
    "user_ranges": _ranges_covered,
    "user_suffixes": _suffixes_covered,
    "user_pattern": _pattern_covered,
    "user_percent": _percent_covered,
    "headers": _headers_covered,
    "client_cidrs": _cidrs_covered,
}
assert set(_COVERED) == set(PIN_CONDITIONS)


def _host_problem(host: str) -> tuple[str, str] | None:
    if "://" in host or "/" in host:
        return f"`{host}` is not a host name", "write only the host, e.g. api.example.com"
    if "*" in host:
        return host_pattern_problem(host)
    port = f"`{host}` has a port", "leave out the port; hosts are matched without it"
    if host.startswith("["):
        if not host.endswith("]"):
            return port
    elif host.count(":") == 1:
        return port
    if not _HOST.fullmatch(host):
        return f"`{host}` is not a host name or address", "write e.g. api.example.com"
    return None
