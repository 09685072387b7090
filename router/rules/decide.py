"""The routing decision: a pure function of (snapshot, request view).

`decide()` is called by the proxy for every request and by `grayroute explain` for
every line it reads; both must get the same answer for the same input. The order is
the rule file's:

    1. the route: the first whose match holds (hosts, paths, methods)
    2. the user ID: the first of the route's sources that yields one
    3. the pins, in order: the first that holds decides
    4. the route's `to`, or its split: sticky by user ID, at random without one (a
       JudgedDecision when a rollout judges the route); or its split_clients / Lua
       script (`CompiledRoute.action`, see lua_routes.py), or the route's own answer
       (direct_response, redirect: direct.py)
    5. the path sent upstream, when the route rewrites it (prefix_rewrite, regex_rewrite)

Everything that does not depend on the request was prepared by compile.py, so this
costs a few dict probes, one hash when a split (or user_percent) needs it, and one
Decision. `host_from_header`, `split_target` and `normalize_path` are how a request's
Host header and target become the view's `host`, `path` and `query`, for the proxy and
`explain` alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from router.rules.user_id import extract_user_id

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from router.rules.compile import CompiledRoute, Snapshot

__all__ = [
    "NO_ROUTE_REASON",
    "AnswerDecision",
    "Decision",
    "JudgedDecision",
    "RequestView",
    "decide",
    "host_from_header",
    "normalize_path",
    "split_target",
]

NO_ROUTE_REASON: Final = "no route matched"


class RequestView:
    """What the rules may look at in one request.

    `headers` maps lower-case names to the first value seen; the proxy fills in only the
    names the snapshot asks for (`Snapshot.header_names`). `body` is None when the body
    was not read, else its first `body_limit` bytes; `body_complete` says whether those
    bytes are the whole body. `client_ip` is the address the pins look at (already
    resolved through trusted proxies by the caller). `raw_headers`, when the caller has
    them (`Snapshot.wants_raw_headers`), are ALL request headers in order as bytes pairs:
    Lua routes see repeated headers as nginx does; without them they see `headers`.
    """

    __slots__ = (
        "body",
        "body_complete",
        "client_ip",
        "headers",
        "host",
        "method",
        "path",
        "query",
        "raw_headers",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        host: str,
        headers: Mapping[str, str],
        client_ip: str,
        body: bytes | None = None,
        body_complete: bool = False,
        raw_headers: Sequence[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self.headers = headers
        self.client_ip = client_ip
        self.body = body
        self.body_complete = body_complete
        self.raw_headers = raw_headers


class Decision:
    """Where one request goes, and why.

    `route` is None when no route matched (the proxy answers 404). `reason` is a short
    human-readable account, e.g. ``pin[0] users``, ``to orders-v1``,
    ``split by user ID -> orders-v1 (weights orders-v1=95, orders-v1.1=5)``; every reason
    string is built when the rules load, so a decision allocates nothing else.

    `status` is 0 when the request goes to `upstream`. A route may instead answer
    itself (AnswerDecision): `status` is then the answer's status (direct_response,
    redirect, a Lua script's ngx.exit, a script failure with no fallback: 500), with
    `location` for a redirect, 444 meaning "close the connection without an answer",
    and `body`/`response_headers` for what the answer carries (direct_response, a
    script's ngx.say, ngx.header). `request_headers` are a script's
    ngx.req.set_header/clear_header changes for the upstream request (None: remove).
    `target` is the request target sent upstream when the route rewrites the path
    (prefix_rewrite, regex_rewrite), else None: the client's target is sent as it came.
    """

    __slots__ = ("reason", "route", "target", "upstream", "user_id", "user_id_source")

    # The split's choice, set only on a JudgedDecision: a rollout counts the request.
    split_pick: str = ""

    # What only an AnswerDecision carries (it has them as slots):
    # class attributes here, so that every other decision costs nothing more.
    status: int = 0
    location: str | None = None
    body: bytes = b""
    request_headers: tuple[tuple[str, str | None], ...] = ()
    response_headers: tuple[tuple[str, str | None], ...] = ()

    def __init__(
        self,
        route: str | None,
        upstream: str | None,
        user_id: str | None,
        user_id_source: str | None,
        reason: str,
    ) -> None:
        self.route = route
        self.upstream = upstream
        self.user_id = user_id
        self.user_id_source = user_id_source
        self.reason = reason
        self.target: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        d: dict[str, str | None] = {
            "route": self.route,
            "upstream": self.upstream,
            "user_id": self.user_id,
            "user_id_source": self.user_id_source,
            "reason": self.reason,
        }
        if self.status:
            d["status"] = str(self.status)
            if self.location is not None:
                d["location"] = self.location
        if self.target is not None:
            d["target"] = self.target
        return d


class AnswerDecision(Decision):
    """A decision that may answer the request itself (`status` != 0) or change the
    request's headers on the way to the upstream (see Decision)."""

    __slots__ = ("body", "location", "request_headers", "response_headers", "status")

    def __init__(
        self,
        route: str | None,
        upstream: str | None,
        user_id: str | None,
        user_id_source: str | None,
        reason: str,
        status: int = 0,
    ) -> None:
        super().__init__(route, upstream, user_id, user_id_source, reason)
        self.status = status
        self.location = None
        self.body = b""
        self.request_headers = ()
        self.response_headers = ()


class JudgedDecision(Decision):
    """A decision by the split of a route with a rollout: the rollout judges the canary
    on these requests only (router/rollout/). `split_pick` keeps the split's choice even
    when the proxy then sends the request to a fallback and rewrites `upstream`."""

    __slots__ = ("split_pick",)

    def __init__(
        self,
        route: str | None,
        upstream: str,
        user_id: str | None,
        user_id_source: str | None,
        reason: str,
    ) -> None:
        super().__init__(route, upstream, user_id, user_id_source, reason)
        self.split_pick = upstream


def decide(snapshot: Snapshot, view: RequestView, route: CompiledRoute | None = None) -> Decision:
    """Where `view` goes and why. `route`: already matched by the caller (skips matching)."""
    if route is None:
        route = snapshot.match_route(view)
        if route is None:
            return Decision(None, None, None, None, NO_ROUTE_REASON)
    d = _decide_in_route(route, view)
    rewrite = route.rewrite
    if rewrite is not None and d.upstream is not None and not d.status:
        path = rewrite(view.path)
        query = view.query
        d.target = f"{path}?{query}" if query else path
    return d


def _decide_in_route(route: CompiledRoute, view: RequestView) -> Decision:
    user_id, source = extract_user_id(route.sources, view) if route.sources else (None, None)
    if user_id is None:
        for pin in route.anon_pins:  # conditions on the user ID cannot hold
            if pin.check(None, view):
                return Decision(route.name, pin.to, None, None, pin.reason)
    else:
        for pin in route.pins:
            if pin.check(user_id, view):
                return Decision(route.name, pin.to, user_id, source, pin.reason)
    to = route.to
    if to is not None:
        return Decision(route.name, to, user_id, source, route.to_reason)
    action = route.action
    if action is not None:  # split_clients, Lua, direct_response, redirect
        return action(route, view, user_id, source)
    split = route.split
    assert split is not None  # validated: exactly one of `to`, `split` and the actions
    kind = JudgedDecision if route.judged else Decision
    if user_id is None:
        i = split.pick_random()
        return kind(route.name, split.names[i], None, None, split.random_reasons[i])
    i = split.pick(user_id)
    return kind(route.name, split.names[i], user_id, source, split.user_reasons[i])


def host_from_header(value: str) -> str:
    """The Host header as routes match it: lower-case, port and IPv6 brackets removed.

    'API.example.com:8080' -> 'api.example.com'; '[::1]:8080' -> '::1'.
    """
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and ":" not in name and (port.isdigit() or not port):
        return name
    return host


def split_target(target: str) -> tuple[str, str]:
    """'/orders?userId=42' -> ('/orders', 'userId=42'); a fragment is dropped."""
    target = target.partition("#")[0]
    path, _, query = target.partition("?")
    return path, query


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789ABCDEFabcdef")


def normalize_path(path: str) -> str | None:
    """The path as routes match it, the way nginx matches locations (RFC 3986 6.2.2):
    `%XX` of an unreserved character decoded (any other `%XX` upper-cased, so `%2F`
    stays a character of its segment), `//` merged, `.` and `..` segments resolved.

    '/static/../admin' -> '/admin'; '/a/%2e%2E/b' -> '/b'; '/a//b/./' -> '/a/b/'.
    None when it is not a path nginx would serve (a 400 there): `..` above the root, a
    `%` not followed by two hex digits. `path` starts with '/'.
    """
    if "%" in path:
        pieces = path.split("%")
        out = [pieces[0]]
        for piece in pieces[1:]:
            if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
                return None
            char = chr(int(piece[:2], 16))
            if char not in _UNRESERVED:
                char = "%" + piece[:2].upper()
            out.append(char + piece[2:])
        path = "".join(out)
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if not kept:
                return None
            kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    if not kept:
        return "/"
    trailing = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(kept) + trailing
