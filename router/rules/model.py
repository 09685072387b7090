"""The rule file as data: frozen dataclasses, built only by `validate.py`.

Everything here has already been checked: names refer to upstreams that exist, numbers are
in range, regular expressions compile. Defaults are filled in (`salt` is the route name,
`body_limit` is 64 KiB). `compile.py` turns a RuleSet into the snapshot the proxy uses;
nothing on the hot path reads these classes.

    RuleSet
    ├── upstreams: Upstream(name, endpoints, connect_timeout, read_timeout, health_check,
    │                       fallback)
    ├── user_id:   UserIdSource(kind, name) ...       the file's sources, in order
    ├── body_limit
    ├── routes:    Route(name, match, pins, to | split | split_clients | lua, salt,
    │              │       user_id, body_limit)
    │              ├── Match(hosts, path_prefix, methods)
    │              ├── Pin(to, users, user_ranges, user_suffixes, user_pattern,
    │              │       user_percent, headers, client_cidrs)
    │              ├── Split(weights, replicas)
    │              ├── SplitClientsMode(key, buckets, unmatched)     nginx split_clients
    │              └── LuaAction(file, phase, var, map, default, fallback, ...)
    └── lua_shared_dicts: (name, size) ...           nginx lua_shared_dict
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BODY_LIMIT = 64 * 1024
DEFAULT_HEALTH_PATH = "/healthz"
DEFAULT_HEALTH_INTERVAL = 5.0

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
class Upstream:
    name: str
    # (host, port); IPv6 hosts without brackets. Empty for a version scaled to zero:
    # validate.py then lets no `to`, pin or positive split weight send requests to it.
    endpoints: tuple[tuple[str, int], ...]
    connect_timeout: float | None = None  # seconds; None = the server's default
    read_timeout: float | None = None  # seconds; None = the server's default
    health_check: HealthCheck | None = None
    # Where its requests go while none of its endpoints is up (router/rules/fallback.py).
    fallback: str | None = None


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
    """Absent conditions (None) hold for every request."""

    hosts: tuple[str, ...] | None = None  # lower-case
    path_prefix: str | None = None
    methods: tuple[str, ...] | None = None  # upper-case

    @property
    def matches_everything(self) -> bool:
        return self.hosts is None and self.path_prefix in (None, "", "/") and self.methods is None


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
    replicas: bool = False  # written as `split: replicas`


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
class Route:
    name: str
    match: Match
    pins: tuple[Pin, ...]
    to: str | None  # exactly one of `to`, `split`, `split_clients` and `lua` is set
    split: Split | None
    salt: str  # defaults to the route name
    user_id: tuple[UserIdSource, ...] | None = None  # None = the file's list
    body_limit: int | None = None  # None = the file's limit
    split_clients: SplitClientsMode | None = None
    lua: LuaAction | None = None


@dataclass(frozen=True, slots=True)
class RuleSet:
    format: int
    upstreams: tuple[Upstream, ...]
    user_id: tuple[UserIdSource, ...]
    body_limit: int
    routes: tuple[Route, ...]
    lua_shared_dicts: tuple[tuple[str, int], ...] = ()  # (name, size in bytes)

    def sources_of(self, route: Route) -> tuple[UserIdSource, ...]:
        """The user-ID sources that apply to `route` (its own list replaces the file's)."""
        return self.user_id if route.user_id is None else route.user_id

    def body_limit_of(self, route: Route) -> int:
        return self.body_limit if route.body_limit is None else route.body_limit
