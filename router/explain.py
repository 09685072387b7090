"""`grayroute explain RULES [REQUESTS.jsonl] [--why]`: which upstream each request would
get, and why.

Input: one JSON object per line (blank lines are skipped):

    {"method": "POST", "path": "/orders?userId=42",
     "headers": [["Host", "api.example.com"], ["Content-Type", "application/json"]],
     "body": "{\\"user\\": {\\"id\\": 42}}", "client_ip": "10.0.0.7"}

`method` defaults to GET, `path` to /, `headers` to none, `client_ip` to none (client_cidrs
pins then never hold). Text is sent as UTF-8: a header value `café` is the bytes
`63 61 66 c3 a9`, as a client sends it. Where raw bytes are meant, `{"base64": "..."}`
stands for them in place of the text (a header value, `path`, `body`); `body_base64`
is the older spelling for the body.

The line becomes the request a client would send (request line, the headers in order,
`Content-Length` added after them when a body has none), and that request is read by
the router's own HTTP parser (httptools) and made into a view by the proxy's own
functions (router.rules.request_view and friends), so repeated headers, their order,
their bytes and what is hashed are the router's. What the router refuses (a path with a
space or a non-ASCII character, an unknown method, a control character in a header,
two Host headers) is reported as the line's error instead, with the status the router
would answer.

Output: one JSON object per request, in input order,

    {"route": ..., "upstream": ..., "user_id": ..., "user_id_source": ..., "reason": ...}

plus `status` (and `location`) when a Lua route answers itself, `user_id_sources` (each
source of the route and what it gave: found, absent, wrong content type, ...) when no
user ID was found or with --why, and `user_id_base64` when the user ID is not UTF-8;
or {"line": N, "error": "..."} for a line that is not such a request.
Exit status: 0, or 1 when some line could not be read as a request.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple

import httptools
import orjson

from router.config import Settings
from router.rules import (
    CompiledRoute,
    Decision,
    RequestView,
    Snapshot,
    decide,
    keep_header,
    load_snapshot,
    parse_target,
    request_view,
    route_host,
)
from router.rules.user_id import source_outcomes

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import BinaryIO

__all__ = [
    "BadRequestLine",
    "WireRequest",
    "decide_request",
    "explain_line",
    "read_request",
    "run_explain",
    "text_field",
    "view_from_request",
]

_FLUSH_EVERY = 1024  # output lines per write
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LINE_BREAK: Final = re.compile(rb"[\r\n\x00]")
_NOT_IN_TARGET: Final = re.compile(rb"[ \t\r\n\x00]")
_REFUSED: Final = "the router refuses this request"
_SERVE: Final = Settings()  # explain decides as `grayroute serve` does by default
# As router.proxy.Router.refused_methods with serve's default settings.
_REFUSED_METHODS: Final = {
    b"CONNECT": "400: CONNECT is not supported: this is a reverse proxy",
    **({} if _SERVE.allow_trace else {b"TRACE": "405: TRACE is not allowed"}),
}


class BadRequestLine(ValueError):
    pass


def run_explain(rules_path: str, requests_path: str, out: BinaryIO, why: bool = False) -> int:
    snapshot = load_snapshot(rules_path)  # RulesError -> the CLI prints it, exit 1
    try:
        stream: IO[bytes] = (
            sys.stdin.buffer
            if requests_path == "-"
            else open(  # noqa: SIM115
                requests_path, "rb"
            )
        )
    except OSError as exc:
        print(
            f"grayroute explain: cannot read {requests_path}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    try:
        failed = explain_lines(snapshot, stream, out, why)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return 1 if failed else 0


def explain_lines(
    snapshot: Snapshot, lines: Iterable[bytes], out: BinaryIO, why: bool = False
) -> int:
    """Explain every line; returns how many lines were not requests."""
    pending: list[bytes] = []
    failed = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        result, ok = _explain(snapshot, line, number, why)
        failed += not ok
        pending.append(result)
        if len(pending) >= _FLUSH_EVERY:
            out.write(b"".join(pending))
            pending.clear()
    if pending:
        out.write(b"".join(pending))
    out.flush()
    return failed


def explain_line(snapshot: Snapshot, line: bytes, number: int = 1, why: bool = False) -> bytes:
    """One input line -> one output line (with its newline)."""
    return _explain(snapshot, line, number, why)[0]


def _explain(snapshot: Snapshot, line: bytes, number: int, why: bool) -> tuple[bytes, bool]:
    try:
        view, body = view_from_request(orjson.loads(line), snapshot)
    except orjson.JSONDecodeError as exc:
        return _error(number, f"not JSON: {exc}"), False
    except BadRequestLine as exc:
        return _error(number, str(exc)), False
    decision, route = decide_request(snapshot, view, body)
    result: dict[str, Any] = dict(decision.as_dict())
    uid = decision.user_id
    if uid is not None and not _is_utf8(uid):
        raw = uid.encode("utf-8", "surrogateescape")
        result["user_id"] = raw.decode("utf-8", "replace")
        result["user_id_base64"] = base64.b64encode(raw).decode()
    if route is not None and route.sources and (why or uid is None):
        size = len(body) if body is not None else 0
        result["user_id_sources"] = dict(source_outcomes(route.sources, view, size))
    try:
        return orjson.dumps(result) + b"\n", True
    except TypeError:  # a script's redirect that is not UTF-8: its bytes escaped (\\xff)
        shown = {k: _escaped(v) if isinstance(v, str) else v for k, v in result.items()}
        return orjson.dumps(shown) + b"\n", True


def _escaped(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _error(number: int, message: str) -> bytes:
    return orjson.dumps({"line": number, "error": message}) + b"\n"


def decide_request(
    snapshot: Snapshot, view: RequestView, body: bytes | None
) -> tuple[Decision, CompiledRoute | None]:
    """Decide as the proxy does: the body is held (up to the route's body_limit) only
    when the matched route wants it. Sets view.body and view.body_complete."""
    route = snapshot.match_route(view)
    if route is None:
        return decide(snapshot, view), None
    if body and route.wants_body(view):
        limit = route.body_limit  # the proxy holds at most this much
        view.body = body[:limit]
        view.body_complete = len(body) <= limit
    else:
        view.body = None
        view.body_complete = False
    return decide(snapshot, view, route), route


# -- a request line -> the request the router would see -----------------------------------


class _Head:
    """httptools callbacks: what the parser read of one request head."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


class WireRequest(NamedTuple):
    """A request line as the router's parser reads it: every field as bytes received."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # every header, in order, as the parser gives it
    body: bytes | None  # None: no body
    client_ip: str
    version: bytes = b"HTTP/1.1"  # HTTP/1.0 for a line without Host (see read_request)


def read_request(request: object) -> WireRequest:
    """A request line (already JSON-decoded) -> the request the router would read.

    A line without a Host header (and an origin-form path) is the request an HTTP/1.0
    client sends: HTTP/1.1 requires Host (the router answers 400 without one), and such
    a request has no host to route by. Raises BadRequestLine for what is not a request,
    or what cannot be written as an HTTP request.
    """
    if not isinstance(request, dict):
        raise BadRequestLine('expected a JSON object like {"method": "GET", "path": "/"}')
    method = _bytes_field(request, "method", b"GET")
    target = _bytes_field(request, "path", b"/")
    client_ip = text_field(request, "client_ip", "")
    pairs = _header_pairs(request)
    body: bytes | None = None
    if "body_base64" in request:
        body = _base64(text_field(request, "body_base64", ""), '"body_base64"')
    elif "body" in request:
        body = _bytes_field(request, "body", b"")
    version = b"HTTP/1.1"
    if target[:1] == b"/" and not any(n.lower() == b"host" for n, _ in pairs):
        version = b"HTTP/1.0"
    head = _parse_head(method, target, version, pairs, body)
    return WireRequest(method, head.url, head.headers, body or None, client_ip, version)


def view_from_request(
    request: object, snapshot: Snapshot | None = None
) -> tuple[RequestView, bytes | None]:
    """A request line as `explain` reads it -> (view, body), the view as the proxy builds
    it for `snapshot` (the headers its rules read, every header when a Lua route or a
    split_clients key reads them, the host when a route looks at it), with the settings
    `grayroute serve` has by default (paths normalised, header names with `_` dropped,
    TRACE refused). What the router refuses is a BadRequestLine saying so.

    With no snapshot (`diff` decides one view by two rule files) the view has all of
    these.
    """
    wire = read_request(request)
    # As the proxy's on_headers_complete and _target_and_host.
    refused = _REFUSED_METHODS.get(wire.method)
    if refused is not None:
        raise BadRequestLine(f"{_REFUSED} ({refused})")
    try:
        path, query, authority, _ = parse_target(wire.target, _SERVE.normalize_paths)
    except ValueError as exc:
        raise BadRequestLine(f"{_REFUSED} (400): {exc}") from exc
    # As the proxy's on_header: the first value of each header the rules read, every
    # header as received when the rules want them, one Host header at most.
    wanted = snapshot.header_keys if snapshot is not None else None
    raw = snapshot is None or snapshot.wants_raw_headers
    headers: dict[str, str] = {}
    kept: list[tuple[bytes, bytes]] = []
    host: bytes | None = None
    for name, value in wire.headers:
        if b"_" in name and not _SERVE.underscores_in_headers:
            continue  # not a header at all for the router, as for nginx
        lname = name.lower()
        if lname == b"host":
            if host is not None:
                raise BadRequestLine(f"{_REFUSED} (400): more than one Host header")
            host = value
        if wanted is None or lname in wanted:
            keep_header(headers, lname.decode("latin-1"), value)
        if raw:
            kept.append((name, value))
    if authority is not None:
        host = authority  # the target's authority is the Host (RFC 9112 3.2.2)
    match_host = ""
    if host is not None:
        checked = route_host(host)
        if checked is None:
            raise BadRequestLine(f"{_REFUSED} (400): invalid Host {host.decode('latin-1')!r}")
        if snapshot is None or snapshot.uses_host:
            match_host = checked
    view = request_view(
        wire.method, path, query, match_host, headers, wire.client_ip, kept if raw else None
    )
    return view, wire.body


def _parse_head(
    method: bytes,
    target: bytes,
    version: bytes,
    pairs: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> _Head:
    """The request head a client would send, read by the router's parser.

    The parser must read back exactly the request line and the headers given: a line
    break or a colon where it does not belong would make it read another request, which
    is refused here (with what was wrong) instead of explained.
    """
    lines = [method, b" ", target, b" ", version, b"\r\n"]
    framed = False
    for name, value in pairs:
        lines += (name, b": ", value, b"\r\n")
        if len(name) in (14, 17):  # Content-Length, Transfer-Encoding
            lname = name.lower()
            if lname == b"content-length":
                framed = True
                if body is None or value.strip() != b"%d" % len(body):
                    size = "no body" if body is None else f"a body of {len(body)} bytes"
                    raise BadRequestLine(
                        f'"headers": Content-Length is {value.decode("latin-1")!r} but the '
                        f"line has {size} (leave Content-Length out: it is added)"
                    )
            elif lname == b"transfer-encoding":
                framed = True
    written = len(pairs)
    if body and not framed:
        lines.append(b"Content-Length: %d\r\n" % len(body))
        written += 1
    lines.append(b"\r\n")
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(b"".join(lines))
    except httptools.HttpParserUpgrade:
        pass  # the proxy serves an Upgrade request as plain HTTP/1.1
    except httptools.HttpParserError as exc:
        _refuse_what_was_written(method, target, pairs)
        reason = str(exc).split(":", 1)[-1].strip() or type(exc).__name__
        raise BadRequestLine(f"{_REFUSED} (400): {reason}{_hint(reason)}") from exc
    if (
        not head.done
        or head.url != target
        or len(head.headers) != written
        or [n for n, _ in head.headers[: len(pairs)]] != [n for n, _ in pairs]
    ):
        _refuse_what_was_written(method, target, pairs)
        raise BadRequestLine(f"{_REFUSED} (400): the request head is not what the line says")
    return head


def _refuse_what_was_written(
    method: bytes, target: bytes, pairs: list[tuple[bytes, bytes]]
) -> None:
    """Raise BadRequestLine for the first field that cannot be written as it was given."""
    if not _TOKEN.fullmatch(method):
        raise BadRequestLine(f'"method": {method!r} is not an HTTP method')
    if not target or _NOT_IN_TARGET.search(target) is not None:
        raise BadRequestLine(
            f'"path": {target!r} has a space or a control character '
            "(percent-encode it, e.g. %20)"
        )
    for name, value in pairs:
        shown = name.decode("utf-8", "replace")
        if not _TOKEN.fullmatch(name):
            raise BadRequestLine(
                f'"headers": {shown!r} is not a header name (letters, digits and '
                "!#$%&'*+-.^_`|~ only)"
            )
        if _LINE_BREAK.search(value) is not None:
            raise BadRequestLine(
                f'"headers": the value of {shown} has a line break or NUL; {_REFUSED} (400)'
            )


def _hint(reason: str) -> str:
    if "url" in reason.lower():
        return " (percent-encode other characters, e.g. /caf%C3%A9)"
    if "method" in reason.lower():
        return " (write GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH or TRACE)"
    return ""


def _header_pairs(request: dict[str, object]) -> list[tuple[bytes, bytes]]:
    raw_headers = request.get("headers", [])
    if raw_headers is None:
        return []
    if not isinstance(raw_headers, list):
        raise BadRequestLine('"headers" must be a list of [name, value] pairs')
    pairs: list[tuple[bytes, bytes]] = []
    for pair in raw_headers:
        if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
            raise _not_a_pair(pair)
        name, value = pair
        if isinstance(value, str):
            pairs.append((name.encode("utf-8"), value.encode("utf-8")))
        elif isinstance(value, dict):
            pairs.append((name.encode("utf-8"), _to_bytes(value, f'"headers": {name}')))
        else:
            raise _not_a_pair(pair)
    return pairs


def _not_a_pair(pair: object) -> BadRequestLine:
    return BadRequestLine(
        f'"headers": {pair!r} is not a [name, value] pair '
        '(value: a string, or {"base64": "..."} for raw bytes)'
    )


def _bytes_field(request: dict[str, object], key: str, default: bytes) -> bytes:
    value = request.get(key)
    if type(value) is str:
        return value.encode("utf-8")
    if value is None:
        return default
    if not isinstance(value, str | dict):
        raise BadRequestLine(f'"{key}" must be a string (or {{"base64": "..."}} for raw bytes)')
    return _to_bytes(value, f'"{key}"')


def _to_bytes(value: str | dict[str, Any], where: str) -> bytes:
    """Text as UTF-8, or {"base64": "..."} as the bytes it stands for."""
    if isinstance(value, str):
        return value.encode("utf-8")  # orjson has refused lone surrogates already
    if set(value) != {"base64"} or not isinstance(value["base64"], str):
        raise BadRequestLine(f'{where}: expected a string or {{"base64": "..."}}')
    return _base64(value["base64"], where)


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestLine(f"{where} is not base64: {exc}") from exc


def text_field(request: dict[str, object], key: str, default: str) -> str:
    value = request.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequestLine(f'"{key}" must be a string')
    return value
