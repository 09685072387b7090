"""`grayroute explain RULES [REQUESTS.jsonl]`: which upstream each request would get, and why.

Input: one JSON object per line (blank lines are skipped):

    {"method": "POST", "path": "/orders?userId=42",
     "headers": [["Host", "api.example.com"], ["Content-Type", "application/json"]],
     "body": "{\\"user\\": {\\"id\\": 42}}", "client_ip": "10.0.0.7"}

`method` defaults to GET, `path` to /, `headers` to none, `client_ip` to none (client_cidrs
pins then never hold). `body` is text (sent as UTF-8); `body_base64` may give raw bytes
instead. Output: one JSON object per request, in input order,

    {"route": ..., "upstream": ..., "user_id": ..., "user_id_source": ..., "reason": ...}

or {"line": N, "error": "..."} for a line that is not such an object. The request view is
built as the proxy builds it (Host lower-cased without port, the first of repeated
headers, only the headers the rules read, at most `body_limit` bytes of body and only
when the route wants it) and decided by the same `decide()`.
Exit status: 0, or 1 when some line could not be read as a request.
"""

from __future__ import annotations

import base64
import binascii
import sys
from typing import IO, TYPE_CHECKING

import orjson

from router.rules import (
    RequestView,
    Snapshot,
    decide,
    host_from_header,
    load_snapshot,
    split_target,
)

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import BinaryIO

__all__ = ["explain_line", "run_explain"]

_FLUSH_EVERY = 1024  # output lines per write


class BadRequestLine(ValueError):
    pass


def run_explain(rules_path: str, requests_path: str, out: BinaryIO) -> int:
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
        failed = explain_lines(snapshot, stream, out)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return 1 if failed else 0


def explain_lines(snapshot: Snapshot, lines: Iterable[bytes], out: BinaryIO) -> int:
    """Explain every line; returns how many lines were not requests."""
    pending: list[bytes] = []
    failed = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        result, ok = _explain(snapshot, line, number)
        failed += not ok
        pending.append(result)
        if len(pending) >= _FLUSH_EVERY:
            out.write(b"".join(pending))
            pending.clear()
    if pending:
        out.write(b"".join(pending))
    out.flush()
    return failed


def explain_line(snapshot: Snapshot, line: bytes, number: int = 1) -> bytes:
    """One input line -> one output line (with its newline)."""
    return _explain(snapshot, line, number)[0]


def _explain(snapshot: Snapshot, line: bytes, number: int) -> tuple[bytes, bool]:
    try:
        request = orjson.loads(line)
        view, body = view_from_request(request, snapshot.header_names)
    except orjson.JSONDecodeError as exc:
        return _error(number, f"not JSON: {exc}"), False
    except BadRequestLine as exc:
        return _error(number, str(exc)), False
    route = snapshot.match_route(view)
    if route is not None and body is not None and route.wants_body(view):
        limit = route.body_limit  # the proxy holds at most this much
        view.body = body[:limit]
        view.body_complete = len(body) <= limit
    return orjson.dumps(decide(snapshot, view, route).as_dict()) + b"\n", True


def _error(number: int, message: str) -> bytes:
    return orjson.dumps({"line": number, "error": message}) + b"\n"


def view_from_request(
    request: object, header_names: frozenset[str] | None = None
) -> tuple[RequestView, bytes | None]:
    """A request line as `explain` reads it -> (view, body), the view as the proxy builds it.

    The view keeps the first value of each header in `header_names` (lower-case), or of
    every header when None (`diff` decides one view by two rule files).
    """
    if not isinstance(request, dict):
        raise BadRequestLine('expected a JSON object like {"method": "GET", "path": "/"}')
    method = text_field(request, "method", "GET")
    path, query = split_target(text_field(request, "path", "/"))
    client_ip = text_field(request, "client_ip", "")
    headers: dict[str, str] = {}
    host = ""
    raw_headers = request.get("headers", [])
    if not isinstance(raw_headers, list):
        raise BadRequestLine('"headers" must be a list of [name, value] pairs')
    for pair in raw_headers:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise BadRequestLine(f'"headers": {pair!r} is not a [name, value] pair of strings')
        name = pair[0].lower()
        if name == "host" and not host:
            host = host_from_header(pair[1])
        if (header_names is None or name in header_names) and name not in headers:
            headers[name] = pair[1]
    body: bytes | None = None
    if "body_base64" in request:
        try:
            body = base64.b64decode(text_field(request, "body_base64", ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequestLine(f'"body_base64" is not base64: {exc}') from exc
    elif "body" in request:
        body = text_field(request, "body", "").encode("utf-8", "surrogatepass")
    return RequestView(method, path, query, host, headers, client_ip), body


def text_field(request: dict[str, object], key: str, default: str) -> str:
    value = request.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequestLine(f'"{key}" must be a string')
    return value
