"""Routes that answer by themselves, and the path sent to the upstream.

Three route keys, named after Envoy's route configuration; this module checks them for
validate.py and prepares them for compile.py and decide():

    direct_response:                  the route answers; nothing goes upstream
      status: 200                     200-599, or 444: close the connection unanswered
      body: "ok"                      optional text; 4xx/5xx without it get the
                                      router's short JSON error body
      content_type: text/plain        default with a body: text/plain; charset=utf-8

    redirect:                         the route answers with a Location built from the
      status: 301                     request: 301 (default), 302, 303, 307 or 308
      scheme: https                   an absolute Location (default: a relative one)
      host: www.example.com           default: the request's host (needs `scheme`)
      port: 8443                      default: none (needs `scheme`)
      path: /new | prefix_rewrite: /new/ | regex_rewrite: {pattern, substitution}
                                      default: the request's path
      strip_query: false              default: the query is kept

    prefix_rewrite: /v1/              toward the upstream: the matched path_prefix (or
    regex_rewrite:                    path_exact) replaced, or every match of `pattern`
      pattern: "^/api/(.*)$"          replaced by `substitution` (\\1 and \\g<name> for
      substitution: "/\\1"            groups); the query is kept

Everything is checked and compiled when the rules load: a request pays for one string
join, or one regex substitution where one is configured.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from router.errors import error_body
from router.rules.decide import AnswerDecision, Decision
from router.rules.load import Entry, MapNode, ScalarNode
from router.rules.model import DirectResponse, Match, PathRewrite, Redirect

if TYPE_CHECKING:
    from collections.abc import Callable

    from router.rules.compile import CompiledRoute
    from router.rules.decide import RequestView
    from router.rules.load import Node
    from router.rules.validate import _Validator

__all__ = [
    "DIRECT_RESPONSE_KEYS",
    "REDIRECT_KEYS",
    "REDIRECT_STATUSES",
    "REGEX_REWRITE_KEYS",
    "compile_answer",
    "compile_rewrite",
    "validate_direct_response",
    "validate_redirect",
    "validate_rewrite",
]

DIRECT_RESPONSE_KEYS = ("status", "body", "content_type")
REDIRECT_KEYS = (
    "status",
    "scheme",
    "host",
    "port",
    "path",
    "prefix_rewrite",
    "regex_rewrite",
    "strip_query",
)
REGEX_REWRITE_KEYS = ("pattern", "substitution")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CLOSE = 444  # nginx: close the connection without an answer
# What may be written in a path sent on: visible ASCII (percent-encode the rest).
_PATH_TEXT = re.compile(r"[!-~]*")
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- validation ----------------------------------------------------------------------------


def _status(v: _Validator, node: Node, path: str, allowed: str) -> int | None:
    if (
        isinstance(node, ScalarNode)
        and isinstance(node.value, int)
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ScalarNode) and isinstance(node.value, str) and node.value.isdigit():
        v.error(
            node,
            path,
            f"the status is quoted text `{node.text}`",
            f"write {node.value} without quotes",
        )
        return None
    shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
    v.error(node, path, f"expected an HTTP status, found {shown}", f"write {allowed}")
    return None


def validate_direct_response(v: _Validator, node: Node, path: str) -> DirectResponse | None:
    fields = v.mapping(
        node,
        path,
        DIRECT_RESPONSE_KEYS,
        required=("status",),
        example='write e.g. `{status: 200, body: "ok"}`',
    )
    if fields is None or "status" not in fields:
        return None
    status_path = _join(path, "status")
    status = _status(v, fields["status"].value, status_path, "e.g. 200, 403 or 503")
    ok = status is not None
    if status is not None and status in REDIRECT_STATUSES:
        v.error(
            fields["status"].value,
            status_path,
            f"{status} is a redirect",
            "use `redirect:` instead, which sends a Location",
        )
        ok = False
    elif status is not None and not (200 <= status <= 599 or status == _CLOSE):
        v.error(
            fields["status"].value,
            status_path,
            f"{status} is not a status a route can answer",
            "write 200-599, or 444 to close the connection without an answer",
        )
        ok = False
    body: str | None = None
    if "body" in fields:
        body_node = fields["body"].value
        if isinstance(body_node, ScalarNode) and body_node.value is not None:
            body = body_node.value if isinstance(body_node.value, str) else body_node.text
        else:
            v.error(
                body_node,
                _join(path, "body"),
                f"expected text, found {body_node.kind}",
                'write e.g. body: "ok"',
            )
            ok = False
        if status in (204, 304, _CLOSE):
            what = "closes the connection unanswered" if status == _CLOSE else "has no body"
            v.error(body_node, _join(path, "body"), f"status {status} {what}", "remove `body`")
            ok = False
    content_type: str | None = None
    if "content_type" in fields:
        content_type = v.text(
            fields["content_type"].value, _join(path, "content_type"), "content type"
        )
        if content_type is not None and not _PATH_TEXT.fullmatch(content_type.replace(" ", "")):
            v.error(
                fields["content_type"].value,
                _join(path, "content_type"),
                f"`{content_type}` is not a content type",
                "write e.g. application/json",
            )
            content_type = None
        ok = ok and content_type is not None
    if not ok or status is None:
        return None
    return DirectResponse(status, body, content_type)


def _path_text(
    v: _Validator, node: Node, path: str, what: str, absolute: bool = True
) -> str | None:
    text = v.text(node, path, what)
    if text is None:
        return None
    if absolute and not text.startswith("/"):
        v.error(node, path, f"`{text}` does not start with /", f"write /{text}")
        return None
    if not _PATH_TEXT.fullmatch(text):
        v.error(
            node,
            path,
            f"`{text}` has spaces, control or non-ASCII characters",
            "percent-encode them, e.g. %20 for a space",
        )
        return None
    return text


def _regex_rewrite(v: _Validator, node: Node, path: str) -> PathRewrite | None:
    fields = v.mapping(
        node,
        path,
        REGEX_REWRITE_KEYS,
        required=REGEX_REWRITE_KEYS,
        example='write e.g. `{pattern: "^/api/(.*)$", substitution: "/\\\\1"}`',
    )
    if fields is None or any(k not in fields for k in REGEX_REWRITE_KEYS):
        return None
    pattern = v.regex(fields["pattern"].value, _join(path, "pattern"))
    sub_node = fields["substitution"].value
    substitution = _path_text(
        v, sub_node, _join(path, "substitution"), "substitution", absolute=False
    )
    if pattern is None or substitution is None:
        return None
    problem = _substitution_problem(re.compile(pattern), substitution)
    if problem is not None:
        v.error(
            sub_node,
            _join(path, "substitution"),
            f"`{substitution}`: {problem}",
            "refer to groups of the pattern as \\1 or \\g<name>; write \\\\ for a backslash",
        )
        return None
    return PathRewrite("regex", substitution, pattern=pattern)


def _substitution_problem(pattern: re.Pattern[str], substitution: str) -> str | None:
    """Why `substitution` cannot be used with `pattern`, or None: tried on a pattern with
    the same groups that always matches."""
    names = {number: name for name, number in pattern.groupindex.items()}
    same_groups = "".join(
        f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1)
    )
    try:
        re.compile(same_groups).sub(substitution, "")
    except (re.error, IndexError) as exc:
        return str(exc)
    return None


def _prefix_rewrite(
    v: _Validator, node: Node, path: str, match: Match | None
) -> PathRewrite | None:
    """`match` None: the route's match is broken (reported there), so not checked here."""
    text = _path_text(v, node, path, "path")
    if text is None:
        return None
    if match is None:
        return PathRewrite("prefix", text, matched="")
    matched = match.path_prefix if match.path_prefix is not None else match.path_exact
    if matched is None:
        v.error(
            node,
            path,
            "there is no path_prefix or path_exact in the route's `match` to replace",
            "add `path_prefix:` to `match`, or use `regex_rewrite`",
        )
        return None
    return PathRewrite("prefix", text, matched=matched)


def validate_rewrite(
    v: _Validator, fields: dict[str, Entry], path: str, match: Match | None
) -> PathRewrite | bool | None:
    """The route's prefix_rewrite / regex_rewrite: a PathRewrite, None when there is none,
    False when it is wrong (reported)."""
    given = [fields[k] for k in ("prefix_rewrite", "regex_rewrite") if k in fields]
    if not given:
        return None
    if len(given) == 2:
        second = max(given, key=lambda e: (e.key.line, e.key.column))
        v.error(
            second.key,
            _join(path, second.key.text),
            "a route has one of `prefix_rewrite` and `regex_rewrite`",
            "keep one",
        )
        return False
    entry = given[0]
    key = entry.key.text
    if key == "prefix_rewrite":
        got = _prefix_rewrite(v, entry.value, _join(path, key), match)
    else:
        got = _regex_rewrite(v, entry.value, _join(path, key))
    return False if got is None else got


def validate_redirect(v: _Validator, node: Node, path: str, match: Match | None) -> Redirect | None:
    fields = v.mapping(
        node,
        path,
        REDIRECT_KEYS,
        example="write e.g. `{scheme: https}` or `{path: /new, status: 302}`",
    )
    if fields is None:
        return None
    ok = True
    status = 301
    if "status" in fields:
        got = _status(v, fields["status"].value, _join(path, "status"), "301, 302, 303, 307 or 308")
        if got is not None and got not in REDIRECT_STATUSES:
            v.error(
                fields["status"].value,
                _join(path, "status"),
                f"{got} is not a redirect status",
                "write 301, 302, 303, 307 or 308; for another answer use `direct_response:`",
            )
            got = None
        ok = got is not None
        status = got or status
    scheme: str | None = None
    if "scheme" in fields:
        scheme = v.text(fields["scheme"].value, _join(path, "scheme"), "scheme")
        if scheme is not None and scheme.lower() not in ("http", "https"):
            v.error(
                fields["scheme"].value,
                _join(path, "scheme"),
                f"unknown scheme `{scheme}`",
                "write http or https",
            )
            scheme = None
        ok = ok and scheme is not None
        scheme = scheme.lower() if scheme is not None else None
    host: str | None = None
    if "host" in fields:
        host = v.text(fields["host"].value, _join(path, "host"), "host")
        if host is not None and not _HOST_NAME.fullmatch(host):
            v.error(
                fields["host"].value,
                _join(path, "host"),
                f"`{host}` is not a host name",
                "write only the name, e.g. www.example.com; the port goes in `port`",
            )
            host = None
        ok = ok and host is not None
    port: int | None = None
    if "port" in fields:
        port = v.whole_number(
            fields["port"].value,
            _join(path, "port"),
            1,
            65535,
            "a port",
            "write a number from 1 to 65535",
        )
        ok = ok and port is not None
    for key in ("host", "port"):
        if key in fields and "scheme" not in fields:
            v.error(
                fields[key].key,
                _join(path, key),
                f"`{key}` makes the Location absolute, so it needs a scheme",
                "add `scheme: https` (or http)",
            )
            ok = False
    rewrites = [k for k in ("path", "prefix_rewrite", "regex_rewrite") if k in fields]
    rewrite: PathRewrite | None = None
    if len(rewrites) > 1:
        second = max((fields[k] for k in rewrites), key=lambda e: (e.key.line, e.key.column))
        v.error(
            second.key,
            _join(path, second.key.text),
            "a redirect has one of `path`, `prefix_rewrite` and `regex_rewrite`",
            "keep one",
        )
        ok = False
    elif rewrites:
        key = rewrites[0]
        rnode = fields[key].value
        if key == "path":
            text = _path_text(v, rnode, _join(path, key), "path")
            rewrite = None if text is None else PathRewrite("path", text)
        elif key == "prefix_rewrite":
            rewrite = _prefix_rewrite(v, rnode, _join(path, key), match)
        else:
            rewrite = _regex_rewrite(v, rnode, _join(path, key))
        ok = ok and rewrite is not None
    strip_query = False
    if "strip_query" in fields:
        given = v.boolean(fields["strip_query"].value, _join(path, "strip_query"), "write true")
        ok = ok and given is not None
        strip_query = bool(given)
    if not isinstance(node, MapNode) or not ok:
        return None
    return Redirect(status, scheme, host, port, rewrite, strip_query)


# -- per request ---------------------------------------------------------------------------


def compile_rewrite(rewrite: PathRewrite) -> Callable[[str], str]:
    """The new path for a request's path."""
    replacement = rewrite.replacement
    if rewrite.kind == "path":
        return lambda path: replacement
    if rewrite.kind == "prefix":
        cut = len(rewrite.matched or "")
        return lambda path: replacement + path[cut:]
    assert rewrite.pattern is not None
    sub = re.compile(rewrite.pattern).sub
    return lambda path: sub(replacement, path)


def compile_answer(
    name: str, direct: DirectResponse | None, redirect: Redirect | None
) -> Callable[[CompiledRoute, RequestView, str | None, str | None], Decision]:
    """The route action (CompiledRoute.action) of a route that answers itself."""
    if direct is not None:
        return _DirectAnswer(name, direct)
    assert redirect is not None
    return _RedirectAnswer(redirect)


class _DirectAnswer:
    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, name: str, direct: DirectResponse) -> None:
        self.status = direct.status
        self.reason = f"direct_response {direct.status}"
        if direct.body is not None:
            self.body = direct.body.encode("utf-8")
            self.headers: tuple[tuple[str, str | None], ...] = (
                ("Content-Type", direct.content_type or "text/plain; charset=utf-8"),
            )
        elif direct.status >= 400 and direct.status != _CLOSE:
            self.body = error_body("route_answer", f"route {name} answers {direct.status}")
            self.headers = (("Content-Type", "application/json"),)
        else:
            self.body = b""
            self.headers = (("Content-Type", direct.content_type),) if direct.content_type else ()

    def __call__(
        self, route: CompiledRoute, view: RequestView, user_id: str | None, source: str | None
    ) -> Decision:
        d = AnswerDecision(route.name, None, user_id, source, self.reason, self.status)
        d.body = self.body
        d.response_headers = self.headers
        return d


class _RedirectAnswer:
    __slots__ = ("new_path", "origin", "port", "query", "reason", "request_host", "status")

    def __init__(self, redirect: Redirect) -> None:
        self.status = redirect.status
        self.new_path = None if redirect.path is None else compile_rewrite(redirect.path)
        self.query = not redirect.strip_query
        self.port = "" if redirect.port is None else f":{redirect.port}"
        # With a scheme and no host, the Location names the request's own host.
        self.request_host = redirect.uses_request_host
        if redirect.scheme is None:
            self.origin = ""
        elif redirect.host is None:
            self.origin = f"{redirect.scheme}://"
        else:
            self.origin = f"{redirect.scheme}://{redirect.host}{self.port}"
        self.reason = f"redirect {redirect.status}"

    def __call__(
        self, route: CompiledRoute, view: RequestView, user_id: str | None, source: str | None
    ) -> Decision:
        path = view.path if self.new_path is None else self.new_path(view.path)
        if self.query and view.query:
            path = f"{path}?{view.query}"
        origin = self.origin
        if self.request_host:
            host = view.host
            if ":" in host:
                host = f"[{host}]"
            # Without a Host header there is no name to give: a relative Location.
            origin = f"{origin}{host}{self.port}" if host else ""
        d = AnswerDecision(route.name, None, user_id, source, self.reason, self.status)
        d.location = origin + path
        return d
