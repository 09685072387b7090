"""Where does user X go, and why? The console's search, answered by `grayroute explain`.

For each route the search writes the request a client of that route would send with
the user ID where the route looks first (its first `user_id` source: a header, a
cookie, the query, a JSON or a form body), as one `explain` input line, and hands it to
router.explain: the answer is explain's own (`--why`: with what each user-ID source
gave), line for line, and the line is shown so that anyone can ask `grayroute explain
--why` the same question.

The request's path and host come from the route's match (its exact path or prefix, its
first host, a wildcard filled in); a route that matches only by `path_regex` or
`host_regex` needs the caller to give a path or host. When a path is given, the route
is the one that path matches, as for any request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from router.explain import BadRequestLine, explain_line, view_from_request
from router.rules.user_id import parse_json_path

if TYPE_CHECKING:
    from router.rules import Snapshot
    from router.rules.model import Route, UserIdSource

__all__ = ["request_line", "where"]

# A host for a route that takes hosts no other route names: .invalid never resolves
# (RFC 6761), so it names no real route's host by accident.
_DEFAULT_HOST = "default.invalid"


def where(
    snapshot: Snapshot,
    user: str,
    route: str | None = None,
    path: str | None = None,
    host: str | None = None,
) -> list[dict[str, Any]]:
    """One answer per route (only `route`'s when given; only the route `path` and `host`
    reach when a path is given): {"route", "request", "answer"} or {"route", "error"}."""
    routes = [r.model for r in snapshot.routes]
    if route is not None:
        routes = [r for r in routes if r.name == route]
    elif path is not None:
        probe = {"path": path, "headers": [["Host", host]] if host else []}
        try:
            view, _ = view_from_request(probe)
        except BadRequestLine as exc:  # a path or host the router refuses: say so
            return [{"route": None, "error": str(exc)}]
        matched = snapshot.match_route(view)
        if matched is None:
            request = {
                "method": "GET",
                "path": path,
                **({"headers": [["Host", host]]} if host else {}),
            }
            return [{"route": None, "request": request, "answer": _explain(snapshot, request)}]
        routes = [matched.model]
    out: list[dict[str, Any]] = []
    for model in routes:
        try:
            request = request_line(snapshot, model, user, path, host)
        except ValueError as exc:
            out.append({"route": model.name, "error": str(exc)})
            continue
        out.append({"route": model.name, "request": request, "answer": _explain(snapshot, request)})
    return out


def _explain(snapshot: Snapshot, request: dict[str, Any]) -> dict[str, Any]:
    # why=True: what each user-ID source of the route gave, found or not (explain --why)
    line = explain_line(snapshot, orjson.dumps(request), why=True)
    answer: dict[str, Any] = orjson.loads(line)
    return answer


def request_line(
    snapshot: Snapshot,
    route: Route,
    user: str,
    path: str | None = None,
    host: str | None = None,
) -> dict[str, Any]:
    """The `explain` input line of a request to `route` carrying `user` where the route
    looks for the user ID first; ValueError when no path or host can be made for it."""
    match = route.match
    if path is None:
        if match.path_exact is not None:
            path = match.path_exact
        elif match.path_regex is not None:
            raise ValueError(
                f"the route matches paths by the regex {match.path_regex!r}: give a path"
            )
        else:
            path = match.path_prefix or "/"
    if host is None:
        if match.hosts:
            host = _example_host(match.hosts[0])
        elif match.host_regex is not None:
            raise ValueError(
                f"the route matches hosts by the regex {match.host_regex!r}: give a host"
            )
        elif match.default_host:
            host = _DEFAULT_HOST
    headers: list[list[str]] = [["Host", host]] if host else []
    request: dict[str, Any] = {}
    sources = snapshot.ruleset.sources_of(route)
    method = "GET"
    if sources:
        source = sources[0]
        path, body, content_type = _carry(source, user, path, headers)
        if body is not None:
            method = "POST"
            headers.append(["Content-Type", content_type])
            request["body"] = body
    if match.methods and method not in match.methods:
        method = match.methods[0]
    return {"method": method, "path": path, "headers": headers, **request}


def _carry(
    source: UserIdSource, user: str, path: str, headers: list[list[str]]
) -> tuple[str, str | None, str]:
    """Put `user` where `source` reads it: (path, body or None, body's content type)."""
    if source.kind == "header":
        headers.append([source.name, user])
    elif source.kind == "cookie":
        headers.append(["Cookie", f"{source.name}={user}"])
    elif source.kind == "query":
        sep = "&" if "?" in path else "?"
        path = f"{path}{sep}{quote(source.name, safe='')}={quote(user, safe='')}"
    elif source.kind == "json":
        doc: Any = user
        for step in reversed(parse_json_path(source.name)):
            doc = [None] * step + [doc] if isinstance(step, int) else {step: doc}
        return path, orjson.dumps(doc).decode(), "application/json"
    else:  # form
        body = f"{quote(source.name, safe='')}={quote(user, safe='')}"
        return path, body, "application/x-www-form-urlencoded"
    return path, None, ""


def _example_host(pattern: str) -> str:
    """A name a `hosts` entry takes: itself, or a wildcard with its `*` filled in."""
    if pattern.startswith("*."):
        return "www" + pattern[1:]
    if pattern.endswith(".*"):
        return pattern[:-1] + "com"
    return pattern
