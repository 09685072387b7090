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
Decision.

The request view is built in one place for the proxy and `grayroute explain` alike:
`parse_target` splits the request target (and normalises the path), `route_host` checks
the Host, `keep_header` keeps the first value of a header the rules read, and
`request_view` makes the view, with every byte turned into
text the same way (`header_text`: UTF-8, as nginx and the rule file spell values; bytes
that are not UTF-8 are kept as lone surrogates, so `wire_bytes` gives back the very bytes
received, for hashing and for Lua scripts).
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Final

import httptools

from router.rules.hashing import wire_bytes
from router.rules.user_id import extract_user_id

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from router.rules.compile import CompiledRoute, Snapshot

__all__ = [
    "NO_ROUTE_REASON",
    "AnswerDecision",
    "Decision",
    "JudgedDecision",
    "RequestView",
    "decide",
    "header_text",
    "host_from_header",
    "keep_header",
    "normalize_path",
    "parse_target",
    "request_view",
    "route_host",
    "split_target",
    "wanted_headers",
    "wire_bytes",
]

NO_ROUTE_REASON: Final = "no route matched"

# `#` as an int: `in` then looks for that byte (memchr), where a bytes needle is first
# tried as an int and fails, and bytes.find parses its arguments as a tuple.
_FRAGMENT: Final = ord("#")


class RequestView:
    """What the rules may look at in one request.

    `headers` maps lower-case names to the first value seen (as `header_text`); the proxy
    fills in only the names the snapshot asks for (`Snapshot.header_names`). `body` is
    None when the body was not read, else its first `body_limit` bytes; `body_complete`
    says whether those bytes are the whole body. `client_ip` is the address the pins
    look at (already resolved through trusted proxies by the caller). `raw_headers`, when
    the snapshot wants them (`Snapshot.wants_raw_headers`), are ALL request headers in
    order as bytes pairs: Lua routes see repeated headers as nginx does; a view built by
    hand without them gives Lua its `headers`, one value each.
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
        headers: dict[str, str],
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
    if user_id is None:
        i = split.pick_random()
        reason = split.random_reasons[i]
    else:
        i = split.pick(user_id)
        reason = split.user_reasons[i]
    # Each class named where it is made (compiled, a class held in a variable is called
    # like any Python object).
    if route.judged:
        return JudgedDecision(route.name, split.names[i], user_id, source, reason)
    return Decision(route.name, split.names[i], user_id, source, reason)


# Methods as str without a decode per request (httptools accepts only known methods).
_METHODS: Final = {
    m.encode(): m
    for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT")
}


def header_text(value: bytes) -> str:
    """Header bytes as the rules read them: UTF-8 (`café` is the user ID `café`, as the
    rule file writes it and as nginx hashes it); a byte that is not part of valid UTF-8
    becomes a lone surrogate U+DC80..U+DCFF, so nothing is lost (see wire_bytes)."""
    return value.decode("utf-8", "surrogateescape")


def wanted_headers(names: Iterable[str]) -> frozenset[bytes]:
    """`Snapshot.header_names` as the lower-case bytes a request's header names are
    compared with (`name.lower() in wanted`)."""
    return frozenset(n.lower().encode("latin-1") for n in names)


def keep_header(headers: dict[str, str], key: str, value: bytes) -> None:
    """Keep a header the rules read: the first of repeated ones counts (as nginx's
    $http_NAME). `key` is the lower-case name."""
    if key not in headers:
        headers[key] = header_text(value)


# Host per RFC 9112 3.2 / RFC 3986 3.2.2: an IP literal, or a reg-name or IPv4 address
# (unreserved, pct-encoded, sub-delims), and an optional port.
_HOST_SYNTAX: Final = re.compile(
    rb"(?:\[([0-9A-Fa-f:.]+)\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?"
)


def parse_target(target: bytes, normalize: bool = True) -> tuple[str, str, bytes | None, bytes]:
    """A request target -> (path as routes match it, query, the authority of an
    absolute-form target or None, the origin-form target to forward).

    b'/orders?id=1' -> ('/orders', 'id=1', None, b'/orders?id=1'); a fragment is not part
    of the path; b'http://api.example.com:8080/o?x' -> ('/o', 'x',
    b'api.example.com:8080', b'/o?x'): its authority is the request's Host (RFC 9112
    3.2.2). With `normalize` the path is what nginx matches locations with
    (normalize_path). Raises ValueError, saying why, where the router answers 400.
    """
    authority: bytes | None
    if target[:1] == b"/":
        forward = target
        path, _, query = target.partition(b"?")
        if _FRAGMENT in target:
            path = path.partition(b"#")[0]
            query = query.partition(b"#")[0]
        authority = None
    elif target == b"*":
        return "*", "", None, target
    else:
        try:
            parsed = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError as exc:
            raise ValueError("invalid request target") from exc
        if parsed.schema is None or parsed.schema.lower() not in (b"http", b"https"):
            raise ValueError("request target is neither origin-form nor an http(s) URI")
        if parsed.userinfo is not None:
            raise ValueError("userinfo in the request target")
        host = parsed.host
        if not host:
            raise ValueError("request target without a host")
        if host.find(b":") >= 0:
            host = b"[" + host + b"]"
        authority = host if parsed.port is None else b"%b:%d" % (host, parsed.port)
        path = parsed.path or b"/"
        query = parsed.query or b""
        forward = path + b"?" + query if query else path
    text = header_text(path)
    if normalize and ("%" in text or "/." in text or "//" in text):
        normal = normalize_path(text) if text[:1] == "/" else text
        if normal is None:
            raise ValueError(f"invalid path {text!r}")
        text = normal
    return text, header_text(query), authority, forward


def route_host(value: bytes) -> str | None:
    """A Host value as routes match it (host_from_header), or None when it is not
    `host[:port]` (the router answers 400)."""
    match = _HOST_SYNTAX.fullmatch(value)
    if match is None:
        return None
    literal = match.group(1)
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode())
        except ValueError:
            return None
    return host_from_header(value.decode("latin-1"))


def request_view(
    method: bytes,
    path: str,
    query: str,
    host: str,
    headers: dict[str, str],
    client_ip: str,
    raw_headers: Sequence[tuple[bytes, bytes]] | None = None,
) -> RequestView:
    """The view of a parsed request head: `path` and `query` from parse_target, `host`
    from route_host ("" for none, or when no route looks at it), `headers` kept with
    keep_header, `raw_headers` all headers as received when the snapshot wants them
    (`Snapshot.wants_raw_headers`)."""
    return RequestView(
        _METHODS.get(method) or method.decode("latin-1"),
        path,
        query,
        host,
        headers,
        client_ip,
        raw_headers=raw_headers,
    )


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


_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789ABCDEFabcdef")


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
