"""The rule file as data: frozen dataclasses, built only by `validate.py`.

Everything here has already been checked: names refer to upstreams that exist, numbers are
in range, regular expressions compile. Defaults are filled in (`salt` is the route name,
`body_limit` is 64 KiB). `compile.py` turns a RuleSet into the snapshot the proxy uses;
nothing on the hot path reads these classes.

    RuleSet
    ├── upstreams: Upstream(name, endpoints, connect_timeout, read_timeout, health_check,
    │                       fallback, dns, max_fails, fail_timeout)
    │              └── DnsEndpoints(name, port, interval)      endpoints found in DNS
    ├── user_id:   UserIdSource(kind, name) ...       the file's sources, in order
    ├── body_limit
    ├── routes:    Route(name, match, pins, to | split | split_clients | lua
    │              │       | direct_response | redirect, salt, user_id, body_limit, rewrite,
    │              │       rollout)
    │              ├── Match(hosts, host_regex, default_host, path_prefix | path_exact
    │              │         | path_regex, methods, headers)
    │              ├── Pin(to, users, user_ranges, user_suffixes, user_pattern,
    │              │       user_percent, headers, client_cidrs)
    │              ├── Split(weights, replicas, follows)
    │              ├── Rollout(canary, stable, steps, interval, ..., gates, notify)
    │              ├── SplitClientsMode(key, buckets, unmatched)     nginx split_clients
    │              ├── LuaAction(file, phase, var, map, default, fallback, ...)
    │              ├── DirectResponse(status, body)        the route answers itself
    │              ├── Redirect(status, scheme, host, port, path rewrite, strip_query)
    │              └── PathRewrite(prefix | regex, substitution)   toward the upstream
    └── lua_shared_dicts: (name, size) ...           nginx lua_shared_dict
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BODY_LIMIT = 64 * 1024
DEFAULT_HEALTH_PATH = "/healthz"
DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_DNS_INTERVAL = 5.0

# The source kinds of `user_id:`, and which of them read the request body.
SOURCE_KINDS = ("header", "cookie", "query", "json", "form")
BODY_SOURCE_KINDS = frozenset({"json", "form"})

# Pin conditions in the order they are reported (e.g. "pin[1] users+headers").
PIN_CONDITIONS = (
    "users",
    "user_ranges",
    "user_suffixes",
    "user_pattern",
    "user_percent",
    "headers",
    "client_cidrs",
)
USER_CONDITIONS = frozenset(PIN_CONDITIONS[:5])


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health check of an upstream's endpoints (an extension; used by the pool)."""

    path: str = DEFAULT_HEALTH_PATH
    interval: float = DEFAULT_HEALTH_INTERVAL  # seconds


@dataclass(frozen=True, slots=True)
class DnsEndpoints:
    """`endpoints: {dns, port, interval}`: one endpoint per A/AAAA record of `name`,
    re-resolved every `interval` at run time (router/fleet/dns.py)."""

    name: str  # as written, lower-case; a trailing dot makes it absolute
    port: int
    interval: float = DEFAULT_DNS_INTERVAL  # seconds


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    # (host, port); IPv6 hosts without brackets. Empty for a version scaled to zero:
    # validate.py then lets no `to`, pin or positive split weight send requests to it.
    # Always empty in the file for a DNS upstream: its endpoints are found at run time.
    endpoints: tuple[tuple[str, int], ...]
    connect_timeout: float | None = None  # seconds; None = the server's default
    read_timeout: float | None = None  # seconds; None = the server's default
    health_check: HealthCheck | None = None
    # Where its requests go while none of its endpoints is up (router/rules/fallback.py).
    fallback: str | None = None
    # Endpoints from DNS instead of a list; zero records is zero replicas, never an error.
    dns: DnsEndpoints | None = None
    # Passive health, as nginx's server parameters: an endpoint whose connections fail
    # max_fails times within fail_timeout is skipped for fail_timeout (0: never skipped).
    max_fails: int | None = None  # None = 1
    fail_timeout: float | None = None  # seconds; None = the server's --fail-timeout


@dataclass(frozen=True, slots=True)
class UserIdSource:
    kind: str  # one of SOURCE_KINDS
    name: str  # header/cookie/query/form name or JSON path, as written

    @property
    def label(self) -> str:
        """How decisions name the source, e.g. 'header:X-User-Id'."""
        return f"{self.kind}:{self.name}"

    @property
    def reads_body(self) -> bool:
        return self.kind in BODY_SOURCE_KINDS


@dataclass(frozen=True, slots=True)
class Match:
    """Absent conditions (None, False) hold for every request.

    `hosts` are lower-case names: exact, or wildcards `*.example.com` (any name ending
    in `.example.com`) and `www.example.*` (any name starting with `www.example.`).
    At most one of `path_prefix`, `path_exact` and `path_regex` is given.
    `default_host`: the Host matches no route's `hosts` or `host_regex` (hosts.py).
    """

    hosts: tuple[str, ...] | None = None  # lower-case
    path_prefix: str | None = None
    methods: tuple[str, ...] | None = None  # upper-case
    path_exact: str | None = None
    path_regex: str | None = None  # searched in the path
    host_regex: str | None = None  # searched in the host
    default_host: bool = False
    headers: tuple[tuple[str, str], ...] | None = None  # (name as written, regex), searched

    @property
    def matches_everything(self) -> bool:
        return (
            self.hosts is None
            and self.path_prefix in (None, "", "/")
            and self.methods is None
            and self.path_exact is None
            and self.path_regex is None
            and self.host_regex is None
            and not self.default_host
            and self.headers is None
        )

    @property
    def names_hosts(self) -> bool:
        """The route looks at the Host header."""
        return self.hosts is not None or self.host_regex is not None or self.default_host

    def written(self) -> dict[str, object]:
        """The conditions given, by their keys in the rule file."""
        pairs = (
            ("hosts", self.hosts),
            ("host_regex", self.host_regex),
            ("default_host", self.default_host or None),
            ("path_prefix", self.path_prefix),
            ("path_exact", self.path_exact),
            ("path_regex", self.path_regex),
            ("methods", self.methods),
            ("headers", None if self.headers is None else dict(self.headers)),
        )
        return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True, slots=True)
class Pin:
    """Sends a request to `to` when every condition given (not None) holds."""

    to: str
    users: frozenset[str] | None = None
    user_ranges: tuple[tuple[int, int], ...] | None = None  # inclusive
    user_suffixes: tuple[str, ...] | None = None
    user_pattern: str | None = None  # full match
    user_percent: float | None = None  # 0..100, two decimals at most
    headers: tuple[tuple[str, str], ...] | None = None  # (name as written, regex), searched
    client_cidrs: tuple[str, ...] | None = None  # normalised networks

    @property
    def conditions(self) -> tuple[str, ...]:
        return tuple(c for c in PIN_CONDITIONS if getattr(self, c) is not None)

    @property
    def needs_user(self) -> bool:
        return any(c in USER_CONDITIONS for c in self.conditions)


@dataclass(frozen=True, slots=True)
class Split:
    """Weighted, sticky choice between upstreams (file order kept)."""

    weights: tuple[tuple[str, float], ...]  # replicas already resolved to endpoint counts
    replicas: bool = False  # written as `split: replicas`: every weight is a replica count
    # Upstreams whose weight is written `replicas` in a mapping: their counts, like a
    # `split: replicas`, follow the endpoints in use (router/rules/effective.py).
    follows: frozenset[str] = frozenset()

    def counts_replicas(self, name: str) -> bool:
        """True when `name`'s weight is its number of endpoints (it follows them)."""
        return self.replicas or name in self.follows


@dataclass(frozen=True, slots=True)
class SplitClientsMode:
    """nginx split_clients on `key` (router/rules/lua_routes.py, lua_compat)."""

    key: str  # nginx complex value, e.g. "${remote_addr}AAA"
    buckets: tuple[tuple[str, str], ...]  # (percent as written or "*", upstream), in order
    unmatched: str | None  # upstream for hashes no bucket takes; None = the last bucket's


@dataclass(frozen=True, slots=True)
class LuaAction:
    """A routing script decides (router/rules/lua_routes.py, lua_compat)."""

    file: str  # as written
    path: str  # resolved against the rule file's directory
    source: str  # the script as read when the rules were checked
    phase: str  # rewrite | access | set
    var: str | None  # rewrite/access: the variable with the decision; None for set
    variables: tuple[tuple[str, str], ...]  # more user variables and their initial values
    mapping: tuple[tuple[str, str], ...]  # value or "@location" -> upstream
    default: str | None
    fallback: str | None
    cpu_budget: float  # seconds
    client_body_buffer_size: int


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """The route answers itself (Envoy's direct_response, nginx's `return CODE TEXT`)."""

    status: int  # 200-599, or 444: close the connection without an answer (nginx)
    body: str | None = None  # None: no body (or the router's JSON error body for 4xx/5xx)
    content_type: str | None = None  # None: text/plain; charset=utf-8 when there is a body


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """A new path, from the matched `path_prefix` (or `path_exact`) or a regex.

    prefix: the route's matched prefix is replaced by `replacement`.
    regex: every match of `pattern` in the path is replaced by `replacement`
    (`\\1`, `\\g<name>` refer to groups), as Envoy's regex_rewrite.
    path: the whole path becomes `replacement`.
    """

    kind: str  # "prefix" | "regex" | "path"
    replacement: str
    pattern: str | None = None  # regex only
    matched: str | None = None  # prefix only: the route's path_prefix or path_exact


@dataclass(frozen=True, slots=True)
class Redirect:
    """The route answers with a redirect built from the request (Envoy's redirect)."""

    status: int = 301  # 301, 302, 303, 307 or 308
    scheme: str | None = None  # None: a relative Location unless host/port are given
    host: str | None = None  # None: the request's host
    port: int | None = None
    path: PathRewrite | None = None  # None: the request's path
    strip_query: bool = False

    @property
    def uses_request_host(self) -> bool:
        """The Location names the request's own host (a scheme is given, no host)."""
        return self.scheme is not None and self.host is None


@dataclass(frozen=True, slots=True)
class ErrorRateGate:
    """The canary's failure rate against the stable version's (router/rollout/gates.py)."""

    max_increase: float = 0.01  # a fraction: canary minus stable above this may fail
    confidence: float = 0.99  # of the one-sided test that the canary fails more


@dataclass(frozen=True, slots=True)
class LatencyGate:
    """A latency quantile of the canary against the stable version's."""

    quantile: float = 0.99
    max_ratio: float = 1.2  # canary above this times stable's ...
    min_increase: float = 0.05  # ... and above stable's plus this many seconds may fail
    confidence: float = 0.99  # of the one-sided test that the canary's tail is slower


@dataclass(frozen=True, slots=True)
class Rollout:
    """A route's `rollout:` block: the router drives `canary`'s weight step by step,
    judging it against `stable` on the route's split traffic (router/rollout/)."""

    canary: str
    stable: str
    steps: tuple[float, ...] | None  # canary weight per step (percent); None: guard only
    interval: float = 30.0  # seconds between two analyses
    min_requests: int = 200  # per version per interval; fewer is NODATA
    max_nodata: int = 10  # NODATA intervals in a row, then Paused
    failures: int = 2  # FAIL verdicts within one step, then rolled back
    error_rate: ErrorRateGate = ErrorRateGate()
    latency: LatencyGate = LatencyGate()
    max_error_rate: float = 0.5  # hard guard: the canary above this is rolled back at once
    notify: tuple[str, ...] = ()  # URLs told of every phase change (JSON POST)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: Match
    pins: tuple[Pin, ...]
    to: str | None  # exactly one of to, split, split_clients, lua, direct_response, redirect
    split: Split | None
    salt: str  # defaults to the route name
    user_id: tuple[UserIdSource, ...] | None = None  # None = the file's list
    body_limit: int | None = None  # None = the file's limit
    split_clients: SplitClientsMode | None = None
    lua: LuaAction | None = None
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    rewrite: PathRewrite | None = None  # prefix_rewrite / regex_rewrite toward the upstream
    rollout: Rollout | None = None  # only with a split

    @property
    def answers_itself(self) -> bool:
        return self.direct_response is not None or self.redirect is not None


@dataclass(frozen=True, slots=True)
class RuleSet:
    format: int
    upstreams: tuple[Upstream, ...]
    user_id: tuple[UserIdSource, ...]
    body_limit: int
    routes: tuple[Route, ...]
    lua_shared_dicts: tuple[tuple[str, int], ...] = ()  # (name, size in bytes)
    # (route, the earlier route that matches every request it matches): never used
    shadowed_by: tuple[tuple[str, str], ...] = ()

    def sources_of(self, route: Route) -> tuple[UserIdSource, ...]:
        """The user-ID sources that apply to `route` (its own list replaces the file's)."""
        return self.user_id if route.user_id is None else route.user_id

    def body_limit_of(self, route: Route) -> int:
        return self.body_limit if route.body_limit is None else route.body_limit
