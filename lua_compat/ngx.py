"""The request as nginx sees it: the data behind `ngx.var`, `ngx.req.*` and the effects.

This module owns nginx's semantics on the Python side, where they are cheapest to get
right and can be tested without Lua; `runtime.py` exposes them to scripts (the Lua half
of the ngx API lives in `prelude.py`). Nothing here knows about the proxy: a caller
builds an `NgxRequest` from what it parsed and gets an `Effect` back from the runtime.

    NgxRequest(method, target, headers, remote_addr, body=...)
        headers: EVERY request header as received, in order, as (name, value) pairs
    req.variable(b"http_x_user_id") -> bytes | None          ngx.var.NAME
    req.uri_args() / req.post_args() -> [(key, value | True)]  ngx.req.get_*_args
    req.header_pairs() -> [(lower-case name, value)]           ngx.req.get_headers

Where nginx (1.22 with lua-nginx-module 0.10) and a Python HTTP stack would differ,
this follows nginx:

- header names with characters other than letters, digits and `-` are dropped, as
  nginx does with `ignore_invalid_headers on` (its default); values lose surrounding
  spaces and tabs.
- `$http_NAME` is the FIRST header of that name (`-` and `_` and case do not matter),
  except `$http_cookie` (all Cookie headers joined with "; ") and `$http_x_forwarded_for`
  (joined with ", ").
- `$cookie_NAME` searches every Cookie header for the first `NAME=`, case-insensitive,
  and is not URL-decoded; `$arg_NAME` is the raw (NOT URL-decoded) value of the first
  `NAME=` in the query, name case-insensitive.
- `get_uri_args` / `get_post_args` decode `%XX` and `+`, keep repeated keys as lists
  (here: repeated pairs), give `true` for a key without `=`, skip empty keys, and stop
  at 100 pairs by default.
- `$uri` is the normalised path: `%XX` decoded, `//` merged, `.` and `..` resolved
  (ngx_http_parse_complex_uri); a path nginx would refuse makes the request a 400.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_BODY_BUFFER_SIZE",
    "MAX_ARGS",
    "MAX_HEADERS",
    "BodyInFile",
    "Effect",
    "EffectKind",
    "NgxRequest",
    "NoRequestBody",
    "parse_args",
    "parse_complex_uri",
    "unescape_component",
]

MAX_ARGS: Final = 100  # NGX_HTTP_LUA_MAX_ARGS: get_uri_args / get_post_args default
MAX_HEADERS: Final = 100  # NGX_HTTP_LUA_MAX_HEADERS: get_headers default
# nginx's client_body_buffer_size default on x86-64 (two memory pages). nginx reads a
# body it has not already received with the headers into one buffer of its size when
# it is shorter than 1.25 times that size; a longer body goes to a temporary file, and
# get_body_data() then returns nil. So with the default a body of up to 10239 bytes is
# held in memory. (The bytes that arrived in the same read as the headers are not
# counted by nginx; which they are depends on the network, so they are not modelled.)
DEFAULT_BODY_BUFFER_SIZE: Final = 8 * 1024


class EffectKind:
    """What a script decided (the `kind` of an Effect)."""

    VALUE = "value"  # finished: `value` is the decision variable (or set_by_lua's return)
    EXEC = "exec"  # ngx.exec(target[, args]): `value` is the target ("@name" or a URI)
    EXIT = "exit"  # ngx.exit(status >= 200) or output sent: answer with `status`
    REDIRECT = "redirect"  # ngx.redirect(uri, status): `value` is the Location
    CLOSE = "close"  # ngx.exit(444) / ngx.exit(ngx.ERROR): close without an answer
    ERROR = "error"  # the script failed (runtime error, CPU budget): nginx answers 500


class Effect(NamedTuple):
    """The outcome of running a script for one request.

    Text is UTF-8, with bytes that are not UTF-8 kept as lone surrogates (U+DC80..U+DCFF,
    "surrogateescape"), so every byte survives; `value` None for a VALUE effect
    means the variable was never set (nginx: not found). `request_headers` lists the
    ngx.req.set_header/clear_header changes in order, (name, value or None to remove);
    `response_headers` the ngx.header assignments; `body` what ngx.say/ngx.print wrote.
    """

    kind: str
    value: str | None = None
    status: int = 0
    args: str | None = None  # ngx.exec's args
    error: str | None = None  # the error message, for ERROR
    request_headers: tuple[tuple[str, str | None], ...] = ()
    response_headers: tuple[tuple[str, str | None], ...] = ()
    body: bytes = b""


class NoRequestBody(Exception):
    """get_post_args() before read_body(): nginx raises an error in the script."""


class BodyInFile(Exception):
    """get_post_args() on a body nginx keeps in a file: nil and this message."""


# -- URI ---------------------------------------------------------------------------------

# ngx_http_parse.c `usual`: characters copied as they are in every state.
_USUAL = bytearray(256)
for _c in range(0x80, 0x100):
    _USUAL[_c] = 1
for _c in range(0x20, 0x7F):
    if chr(_c) not in " #%+./?":
        _USUAL[_c] = 1
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}

_USUAL_STATE, _SLASH, _DOT, _DOT_DOT, _QUOTED, _QUOTED_SECOND = range(6)


def parse_complex_uri(path: bytes, merge_slashes: bool = True) -> tuple[bytes, int] | None:
    """nginx's normalisation of the request path; (uri, end) or None (a 400 in nginx).

    `path` is the target up to the end; parsing stops at '?' or '#', and `end` is the
    index in `path` where it stopped (len(path) when it did not).
    """
    out = bytearray()
    state = _USUAL_STATE
    quoted_state = _USUAL_STATE
    decoded = 0
    i = 0
    n = len(path)
    usual = _USUAL
    while i < n:
        ch = path[i]
        i += 1
        if state == _USUAL_STATE:
            if usual[ch]:
                out.append(ch)
            elif ch == 0x2F:  # /
                state = _SLASH
                out.append(ch)
            elif ch == 0x25:  # %
                quoted_state, state = state, _QUOTED
            elif ch == 0x3F or ch == 0x23:  # ? #
                return bytes(out), i - 1
            else:
                out.append(ch)
        elif state == _SLASH:
            if usual[ch]:
                state = _USUAL_STATE
                out.append(ch)
            elif ch == 0x2F:
                if not merge_slashes:
                    out.append(ch)
            elif ch == 0x2E:  # .
                state = _DOT
                out.append(ch)
            elif ch == 0x25:
                quoted_state, state = state, _QUOTED
            elif ch == 0x3F or ch == 0x23:
                return bytes(out), i - 1
            else:
                state = _USUAL_STATE
                out.append(ch)
        elif state == _DOT:
            if usual[ch]:
                state = _USUAL_STATE
                out.append(ch)
            elif ch == 0x2F:
                state = _SLASH
                del out[-1]
            elif ch == 0x2E:
                state = _DOT_DOT
                out.append(ch)
            elif ch == 0x25:
                quoted_state, state = state, _QUOTED
            elif ch == 0x3F or ch == 0x23:
                del out[-1]
                return bytes(out), i - 1
            else:
                state = _USUAL_STATE
                out.append(ch)
        elif state == _DOT_DOT:
            if usual[ch]:
                state = _USUAL_STATE
                out.append(ch)
            elif ch in (0x2F, 0x3F, 0x23):
                if not _up_one(out):
                    return None
                if ch != 0x2F:
                    return bytes(out), i - 1
                state = _SLASH
            elif ch == 0x25:
                quoted_state, state = state, _QUOTED
            else:
                state = _USUAL_STATE
                out.append(ch)
        elif state == _QUOTED:
            value = _HEX.get(ch)
            if value is None:
                return None
            decoded = value
            state = _QUOTED_SECOND
        else:  # _QUOTED_SECOND
            value = _HEX.get(ch)
            if value is None:
                return None
            ch = (decoded << 4) + value
            if ch in (0x25, 0x23, 0x3F):  # decoded % # ? are plain characters
                state = _USUAL_STATE
                out.append(ch)
                continue
            if ch == 0:
                return None
            # The decoded character is processed again in the state before the '%'.
            state = quoted_state
            i -= 1
            path = path[:i] + bytes((ch,)) + path[i + 1 :]
            n = len(path)
    if state in (_QUOTED, _QUOTED_SECOND):
        return None
    if state == _DOT:
        del out[-1]
    elif state == _DOT_DOT and not _up_one(out):
        return None
    return bytes(out), n


def _up_one(out: bytearray) -> bool:
    """Remove "/.." and the segment before it, as nginx does (u -= 4, back to '/')."""
    u = len(out) - 4
    while True:
        if u < 0:
            return False
        if out[u] == 0x2F:
            del out[u + 1 :]
            return True
        u -= 1


def unescape_component(data: bytes) -> bytes:
    """ngx_http_lua_unescape_uri(.., NGX_UNESCAPE_URI_COMPONENT): %XX and '+' -> ' '.

    A '%' without two hex digits after it stays as it is ("%zz" -> "%zz").
    """
    if b"%" not in data:
        return data.replace(b"+", b" ") if b"+" in data else data
    out = bytearray()
    hexval = _HEX
    i = 0
    n = len(data)
    while i < n:
        ch = data[i]
        if ch == 0x25 and i + 2 < n:
            hi = hexval.get(data[i + 1])
            lo = hexval.get(data[i + 2])
            if hi is not None and lo is not None:
                out.append((hi << 4) | lo)
                i += 3
                continue
        out.append(0x20 if ch == 0x2B else ch)
        i += 1
    return bytes(out)


def parse_args(data: bytes, limit: int = MAX_ARGS) -> list[tuple[bytes, bytes | bool]]:
    """ngx.req.get_uri_args/get_post_args: decoded (key, value) pairs, True without '='.

    Pairs whose key is empty are skipped and do not count; `limit` > 0 keeps the first
    `limit` pairs; 0 or less means no limit.
    """
    result: list[tuple[bytes, bytes | bool]] = []
    for piece in data.split(b"&"):
        if not piece:
            continue
        key, eq, value = piece.partition(b"=")
        k = unescape_component(key)
        if not k:
            continue
        if limit > 0 and len(result) >= limit:
            break
        result.append((k, unescape_component(value) if eq else True))
    return result


# -- headers -----------------------------------------------------------------------------

_NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
_VAR_NAME_TRANSLATE = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-", b"abcdefghijklmnopqrstuvwxyz_"
)


def _host_of(value: bytes) -> bytes | None:
    """ngx_http_validate_host: lower-case, port and a trailing dot removed; None if bad."""
    dot_pos = -1
    host_len = len(value)
    state_bracket = False
    for i, ch in enumerate(value):
        if ch == 0x2E:  # .
            if dot_pos == i - 1:
                return None
            dot_pos = i
        elif ch == 0x3A:  # :
            if not state_bracket:
                host_len = i
                break
        elif ch == 0x5B:  # [
            if i == 0:
                state_bracket = True
        elif ch == 0x5D:  # ]
            if state_bracket:
                dot_pos = i
                state_bracket = False
        elif ch == 0x2F or ch == 0x5C or ch == 0:  # / \
            return None
    if dot_pos == host_len - 1:
        host_len -= 1
    if host_len == 0:
        return None
    return value[:host_len].lower()


class NgxRequest:
    """One request, as the ngx API reads it. Build it once per request.

    `target` is the request target as received (nginx's `$request_uri`). `headers` are
    ALL request headers in order, as bytes pairs: `$http_x` and `get_headers()` need
    the repeated ones. `body` is the whole request body, or None when there is none;
    `body_complete=False` means only a prefix is held (the body is then treated as
    nginx treats a body in a temporary file: get_body_data() returns nil).
    """

    __slots__ = (
        "_cookies",
        "_headers",
        "_uri",
        "args",
        "body",
        "body_buffer_size",
        "body_complete",
        "body_read",
        "headers",
        "method",
        "remote_addr",
        "remote_port",
        "scheme",
        "server_addr",
        "server_name",
        "server_port",
        "server_protocol",
        "target",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        remote_addr: bytes = b"127.0.0.1",
        body: bytes | None = None,
        *,
        body_complete: bool = True,
        body_buffer_size: int = DEFAULT_BODY_BUFFER_SIZE,
        remote_port: int = 0,
        server_addr: bytes = b"127.0.0.1",
        server_port: int = 80,
        server_name: bytes = b"",
        scheme: bytes = b"http",
        server_protocol: bytes = b"HTTP/1.1",
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.body = body
        self.body_complete = body_complete
        self.body_buffer_size = body_buffer_size
        self.body_read = False
        self.server_addr = server_addr
        self.server_port = server_port
        self.server_name = server_name
        self.scheme = scheme
        self.server_protocol = server_protocol
        self._headers: list[tuple[bytes, bytes, bytes]] | None = None
        self._uri: bytes | None = None
        self._cookies: list[bytes] | None = None
        q = target.find(b"?")
        args = None if q < 0 else target[q + 1 :]
        if args is not None and b"#" in args:
            args = args.partition(b"#")[0]
        self.args: bytes | None = args

    # -- parsed views, built on first use -------------------------------------------------

    def valid_headers(self) -> list[tuple[bytes, bytes, bytes]]:
        """(name as sent, variable-style key, value) of the headers nginx keeps."""
        found = self._headers
        if found is None:
            found = []
            for name, value in self.headers:
                if not name or name.translate(None, _NAME_CHARS):
                    continue  # ignore_invalid_headers on: a name with other characters
                found.append((name, name.translate(_VAR_NAME_TRANSLATE), value.strip(b" ")))
            self._headers = found
        return found

    @property
    def uri(self) -> bytes | None:
        """nginx's $uri, or None when nginx would refuse the path (400)."""
        uri = self._uri
        if uri is None:
            path = self.target
            if path.startswith((b"http://", b"https://")):
                rest = path.partition(b"://")[2]
                slash = rest.find(b"/")
                path = b"/" if slash < 0 else rest[slash:]
            q = path.find(b"?")
            simple = path if q < 0 else path[:q]
            if (
                simple[:1] == b"/"
                and b"%" not in simple
                and b"/." not in simple
                and b"//" not in simple
                and b"#" not in simple
            ):
                uri = self._uri = simple  # nothing for nginx to decode or resolve
                return uri
            parsed = parse_complex_uri(path)
            if parsed is None or not parsed[0].startswith(b"/"):
                return None
            uri = self._uri = parsed[0]
        return uri

    def header(self, var_key: bytes) -> bytes | None:
        """$http_<var_key>: the first header whose name maps to it."""
        if self._headers is None:  # one lookup rarely needs the whole list
            size = len(var_key)
            for name, value in self.headers:
                if (
                    len(name) == size
                    and name.translate(_VAR_NAME_TRANSLATE) == var_key
                    and not name.translate(None, _NAME_CHARS)
                ):
                    return value.strip(b" ")
            return None
        for _, key, value in self._headers:
            if key == var_key:
                return value
        return None

    def header_values(self, var_key: bytes) -> list[bytes]:
        return [value for _, key, value in self.valid_headers() if key == var_key]

    def cookie(self, name: bytes) -> bytes | None:
        """$cookie_NAME: ngx_http_parse_multi_header_lines over every Cookie header.

        A name counts only at the start of a header or after ';' or ',' (and spaces);
        spaces may stand around '='; the value runs to the next ';' and is returned as
        it is (not URL-decoded, trailing spaces kept).
        """
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = self.header_values(b"cookie")
        lname = name.lower()
        size = len(name)
        for value in cookies:
            end = len(value)
            if size > end:
                continue
            start = 0
            while start < end:
                if value[start : start + size].lower() == lname:
                    p = start + size
                    while p < end and value[p] == 0x20:
                        p += 1
                    if p < end and value[p] == 0x3D:
                        p += 1
                        while p < end and value[p] == 0x20:
                            p += 1
                        last = value.find(b";", p)
                        return value[p:] if last < 0 else value[p:last]
                    start = p
                # skip to after the next ';' or ',' and the spaces that follow
                while start < end:
                    ch = value[start]
                    start += 1
                    if ch == 0x3B or ch == 0x2C:
                        break
                while start < end and value[start] == 0x20:
                    start += 1
        return None

    def arg(self, name: bytes) -> bytes | None:
        """$arg_NAME: ngx_http_arg, the raw value of the first NAME= (case-insensitive).

        NAME must start the query or follow '&'; the value is NOT URL-decoded.
        """
        args = self.args
        if not args:
            return None
        lower = args.lower()
        lname = name.lower()
        size = len(name)
        last = len(args)
        pos = 0
        while pos < last:
            found = lower.find(lname, pos, last - 1)
            if found < 0:
                return None
            end = found + size
            if (found == 0 or args[found - 1] == 0x26) and end < last and args[end] == 0x3D:
                stop = args.find(b"&", end + 1)
                return args[end + 1 :] if stop < 0 else args[end + 1 : stop]
            pos = found + 1
        return None

    def host(self) -> bytes:
        target = self.target
        if target.startswith((b"http://", b"https://")):
            authority = target.partition(b"://")[2]
            authority = authority.partition(b"/")[0].partition(b"?")[0]
            host = _host_of(authority)
            if host is not None:
                return host
        value = self.header(b"host")
        if value is not None:
            host = _host_of(value)
            if host is not None:
                return host
        return self.server_name

    def body_data(self) -> bytes | None:
        """get_body_data(): the body when it was read and is held in memory."""
        if not self.body_read or self.body is None or not self.body:
            return None
        if not self.body_in_memory():
            return None  # nginx keeps it in a temporary file
        return self.body

    def body_in_memory(self) -> bool:
        """Whether nginx would hold this body in memory (see DEFAULT_BODY_BUFFER_SIZE)."""
        body = self.body
        if body is None or not self.body_complete:
            return False
        size = self.body_buffer_size
        return len(body) < size + (size >> 2)

    def post_args(self, limit: int = MAX_ARGS) -> list[tuple[bytes, bytes | bool]]:
        if not self.body_read:
            raise NoRequestBody(
                "no request body found; maybe you should turn on lua_need_request_body?"
            )
        if self.body and not self.body_in_memory():
            raise BodyInFile("request body in temp file not supported")
        return parse_args(self.body or b"", limit)

    def uri_args(self, limit: int = MAX_ARGS) -> list[tuple[bytes, bytes | bool]]:
        return parse_args(self.args or b"", limit)

    def header_pairs(
        self, limit: int = MAX_HEADERS, raw: bool = False
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """get_headers(): ([(name, value)], truncated); names lower-case unless raw."""
        headers = self.valid_headers()
        truncated = limit > 0 and len(headers) > limit
        if truncated:
            headers = headers[:limit]
        if raw:
            return [(name, value) for name, _, value in headers], truncated
        return [(name.lower(), value) for name, _, value in headers], truncated

    # -- ngx.var --------------------------------------------------------------------------

    def variable(self, name: bytes) -> bytes | None:
        """The value of nginx variable `name` (lower-cased first, as nginx does)."""
        name = name.lower()
        getter = _SIMPLE.get(name)
        if getter is not None:
            return getter(self)
        if name.startswith(b"http_"):
            key = name[5:]
            if key == b"cookie":
                values = self.header_values(key)
                return b"; ".join(values) if values else None
            if key == b"x_forwarded_for":
                values = self.header_values(key)
                return b", ".join(values) if values else None
            return self.header(key)
        if name.startswith(b"arg_"):
            return self.arg(name[4:])
        if name.startswith(b"cookie_"):
            return self.cookie(name[7:])
        return None

    def with_args(self, args: bytes | None) -> None:
        """ngx.var.args = ...: later $args, $arg_* and get_uri_args see the new value."""
        self.args = args


def _request_uri(r: NgxRequest) -> bytes:
    return r.target


def _content_length(r: NgxRequest) -> bytes | None:
    return r.header(b"content_length")


def _request_body(r: NgxRequest) -> bytes | None:
    if not r.body_read:
        return None
    data = r.body_data()
    return data


def _is_args(r: NgxRequest) -> bytes:
    return b"?" if r.args else b""


def _request_line(r: NgxRequest) -> bytes:
    return r.method + b" " + r.target + b" " + r.server_protocol


_SIMPLE = {
    b"remote_addr": lambda r: r.remote_addr,
    b"binary_remote_addr": None,
    b"remote_port": lambda r: str(r.remote_port).encode() if r.remote_port else b"",
    b"request_method": lambda r: r.method,
    b"uri": lambda r: r.uri,
    b"document_uri": lambda r: r.uri,
    b"request_uri": _request_uri,
    b"args": lambda r: r.args,
    b"query_string": lambda r: r.args,
    b"is_args": _is_args,
    b"host": NgxRequest.host,
    b"scheme": lambda r: r.scheme,
    b"https": lambda r: b"on" if r.scheme == b"https" else b"",
    b"server_addr": lambda r: r.server_addr,
    b"server_port": lambda r: str(r.server_port).encode(),
    b"server_name": lambda r: r.server_name,
    b"server_protocol": lambda r: r.server_protocol,
    b"request": _request_line,
    b"content_length": _content_length,
    b"content_type": lambda r: r.header(b"content_type"),
    b"request_body": _request_body,
}
del _SIMPLE[b"binary_remote_addr"]


def iter_pairs(pairs: Iterable[tuple[bytes, bytes | bool]]) -> tuple[bytes | bool, ...]:
    """[(k, v), ...] flattened to (k, v, k, v, ...), the shape the Lua side unpacks."""
    flat: list[bytes | bool] = []
    for key, value in pairs:
        flat.append(key)
        flat.append(value)
    return tuple(flat)
