"""The sandboxed LuaJIT runtime: the only module that talks to Lua (through lupa).

One `LuaRuntime` per worker process holds one Lua state; scripts are compiled into it
once per rules load and run once per request:

    rt = default_runtime()                    # per process, created on first use
    script = rt.compile(source, "scripts/gray.lua", phase="rewrite", decision="backend")
    effect = script.run(NgxRequest(...))      # -> ngx.Effect

The sandbox (see prelude.py): no io/os/ffi/debug/jit/load*/dofile, `require` only of
cjson, cjson.safe (and the names of the standard tables); every script has its own
globals and its own copies of the library and ngx tables. Script code runs with the
JIT off so the count hook that enforces the CPU budget (`budget`, seconds of process
CPU time per request, checked every 1000 VM instructions) fires inside every loop; a
script that exceeds it fails like a script error. The Lua state has a memory cap
(`max_memory`). Python objects never reach script code: the callbacks below are
upvalues of the prelude, and lupa's attribute access is refused outright.

Errors (nginx's behaviour): a failing script yields Effect(kind=ERROR, error=message)
and is logged at ERROR as nginx logs it ("lua entry thread aborted: runtime error:
..."); the caller answers 500 or uses the route's fallback.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import hashlib
import hmac
import logging
import re
import time
import zlib
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final

from lua_compat.ngx import (
    MAX_ARGS,
    BodyInFile,
    Effect,
    EffectKind,
    NgxRequest,
    NoRequestBody,
    parse_args,
    unescape_component,
)
from lua_compat.prelude import PRELUDE

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_MAX_MEMORY",
    "PHASES",
    "LuaCompileError",
    "LuaRuntime",
    "LuaScript",
    "LuaUnavailable",
    "default_runtime",
    "lua_available",
]

log = logging.getLogger("grayroute.lua")

DEFAULT_BUDGET: Final = 0.010  # seconds of CPU per request
DEFAULT_MAX_MEMORY: Final = 256 * 1024 * 1024  # bytes for the whole Lua state
PHASES: Final = {"rewrite": 1, "access": 2, "set": 3}

_KINDS = (
    EffectKind.VALUE,
    EffectKind.EXEC,
    EffectKind.EXIT,
    EffectKind.REDIRECT,
    EffectKind.CLOSE,
    EffectKind.ERROR,
)

try:  # LuaJIT 2.1 is what OpenResty runs; without it the Lua route action is unavailable
    from lupa import luajit21 as _lupa

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the installed wheel
    _lupa = None
    _IMPORT_ERROR = f"lupa with LuaJIT 2.1 is not installed ({exc})"


class LuaUnavailable(RuntimeError):
    """lupa's LuaJIT 2.1 build cannot be imported."""


class LuaCompileError(ValueError):
    """A script that does not compile; the message is LuaJIT's (`file:line: ...`)."""


def lua_available() -> str | None:
    """None when LuaJIT can run scripts here, else the reason it cannot."""
    return _IMPORT_ERROR


# nginx log levels (ngx.STDERR .. ngx.DEBUG) -> Python logging levels
_LEVELS = {
    0: logging.CRITICAL,
    1: logging.CRITICAL,
    2: logging.CRITICAL,
    3: logging.CRITICAL,
    4: logging.ERROR,
    5: logging.WARNING,
    6: logging.INFO,
    7: logging.INFO,
    8: logging.DEBUG,
}


def _nginx_level(logger: logging.Logger) -> int:
    """The most verbose nginx level the logger lets through (filtering in Lua is free)."""
    level = logger.getEffectiveLevel()
    if level <= logging.DEBUG:
        return 8
    if level <= logging.INFO:
        return 7
    if level <= logging.WARNING:
        return 5
    if level <= logging.ERROR:
        return 4
    return 3


def _deny_attributes(obj: object, name: object, is_setting: bool) -> object:
    raise AttributeError("Python attributes are not reachable from Lua")


# -- PCRE -> Python regular expressions ----------------------------------------------------

_RE_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_RE_IGNORED = frozenset("jodDJuUa")
_NAMED_GROUP = re.compile(rb"\(\?<(?![=!])")


def _translate_pcre(pattern: bytes) -> bytes:
    """The few PCRE spellings Python's re writes differently."""
    pattern = _NAMED_GROUP.sub(rb"(?P<", pattern)
    if b"\\" not in pattern:
        return pattern
    out = bytearray()
    i = 0
    n = len(pattern)
    in_class = False
    while i < n:
        ch = pattern[i]
        if ch == 0x5C and i + 1 < n:  # backslash
            nxt = pattern[i + 1]
            if not in_class and nxt == 0x7A:  # \z: the very end
                out += rb"\Z"
            elif not in_class and nxt == 0x5A:  # \Z: the end or before a final newline
                out += rb"(?=\n?\Z)"
            elif nxt == 0x68:  # \h: horizontal space
                out += rb"[ \t]" if not in_class else rb" \t"
            else:
                out += pattern[i : i + 2]
            i += 2
            continue
        if ch == 0x5B and not in_class:
            in_class = True
            out.append(ch)
            i += 1
            if i < n and pattern[i] == 0x5E:
                out.append(0x5E)
                i += 1
            if i < n and pattern[i] == 0x5D:
                out.append(0x5D)
                i += 1
            continue
        if ch == 0x5D and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return bytes(out)


class _Regexes:
    """Compiled patterns by (pattern, options); nginx caches with "o", we always do."""

    def __init__(self, limit: int = 1024) -> None:
        self._cache: dict[tuple[bytes, bytes], tuple[re.Pattern[bytes], bool]] = {}
        self._limit = limit

    def get(self, pattern: bytes, options: bytes) -> tuple[re.Pattern[bytes], bool] | str:
        key = (pattern, options)
        found = self._cache.get(key)
        if found is not None:
            return found
        flags = 0
        anchored = False
        for opt in options.decode("latin-1"):
            if opt in _RE_FLAGS:
                flags |= _RE_FLAGS[opt]
            elif opt == "a":
                anchored = True
            elif opt not in _RE_IGNORED:
                return f'unknown flag "{opt}" (flags "{options.decode("latin-1")}")'
        try:
            compiled = re.compile(_translate_pcre(pattern), flags)
        except re.error as exc:
            text = pattern.decode("latin-1")
            return f'failed to compile regex "{text}": {exc.msg} in "{text}"'
        if len(self._cache) >= self._limit:
            self._cache.clear()
        found = self._cache[key] = (compiled, anchored)
        return found


# -- escape_uri (NGX_ESCAPE_URI_COMPONENT) ----------------------------------------------

_SAFE_COMPONENT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPED = tuple(bytes((c,)) if c in _SAFE_COMPONENT else b"%%%02X" % c for c in range(256))


def _escape_uri(data: bytes) -> bytes:
    return b"".join(_ESCAPED[c] for c in data)


# -- numbers as nginx's LuaJIT writes them ------------------------------------------------

_HALF_UP = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_UP)


def _c_format(value: float, conv: str, prec: int) -> str:
    """C printf %e/%f/%g of `value`, breaking exact ties away from zero (LuaJIT 2.1 of
    2016-2024, as in OpenResty's nginx)."""
    d = decimal.Decimal(value)  # exact
    upper = conv.isupper()
    conv = conv.lower()
    if conv == "f":
        q = d.quantize(decimal.Decimal(1).scaleb(-prec), rounding=decimal.ROUND_HALF_UP)
        text = f"{q:f}"
        if q.is_zero() and d.is_signed() and not text.startswith("-"):
            text = "-" + text
        return text
    if conv == "e":
        return _e_format(d, prec, upper)
    # %g
    p = prec if prec > 0 else 1
    if d.is_zero():
        return "-0" if d.is_signed() else "0"
    r = decimal.Context(prec=p, rounding=decimal.ROUND_HALF_UP).plus(d)
    x = r.adjusted()
    if x < -4 or x >= p:
        text = _e_format(r, p - 1, upper)
        mant, _, exp = text.partition("E" if upper else "e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        return f"{mant}{'E' if upper else 'e'}{exp}"
    text = f"{r.quantize(decimal.Decimal(1).scaleb(-(p - 1 - x))):f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _e_format(d: decimal.Decimal, prec: int, upper: bool) -> str:
    if d.is_zero():
        digits = "0" * (prec + 1)
        exp = 0
    else:
        r = decimal.Context(prec=prec + 1, rounding=decimal.ROUND_HALF_UP).plus(d)
        tup = r.as_tuple().digits
        digits = "".join(map(str, tup)).ljust(prec + 1, "0")[: prec + 1]
        exp = r.adjusted()
    mant = digits[0] + ("." + digits[1:] if prec > 0 else "")
    sign_text = "-" if d.is_signed() else ""
    e = "E" if upper else "e"
    return f"{sign_text}{mant}{e}{'-' if exp < 0 else '+'}{abs(exp):02d}"


def _g14_tie(value: float) -> bytes | None:
    """tostring() of a number whose 15th significant digit is an exact 5, else None."""
    d = decimal.Decimal(value)
    digits = d.normalize().as_tuple().digits
    if len(digits) != 15 or digits[-1] != 5:
        return None
    return _c_format(value, "g", 14).encode()


# -- the bridge: Python callbacks the prelude calls ----------------------------------------


class _Bridge:
    """The callbacks behind the ngx API; `request` is the request being run."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.request: NgxRequest | None = None
        self.regexes = _Regexes()
        self.log_lines: list[str] | None = None
        self.clock = clock
        self.header_changes = False

    def _req(self) -> NgxRequest:
        request = self.request
        if request is None:
            raise RuntimeError("no request found")
        return request

    def var(self, name: bytes) -> bytes | None:
        return self._req().variable(name)

    def set_var(self, name: bytes, value: bytes | None) -> bytes | None:
        request = self._req()
        if name == b"args":
            request.with_args(value)
            return None
        text = name.decode("latin-1")
        if name in _CHANGE_REFUSED:
            return f'variable "{text}" not changeable'.encode()
        return (
            f'variable "{text}" not found for writing; maybe it is a built-in variable '
            f"that is not changeable or you forgot to use \"set ${text} '';\" in the "
            "config file to define it first"
        ).encode()

    def headers(self, limit: int, raw: bool) -> tuple[object, ...]:
        pairs, truncated = self._req().header_pairs(limit if limit >= 0 else 100, raw)
        flat: list[object] = [truncated]
        for name, value in pairs:
            flat.append(name)
            flat.append(value)
        return tuple(flat)

    def uri_args(self, limit: int) -> tuple[object, ...]:
        request = self._req()
        limit = MAX_ARGS if limit < 0 else limit
        pairs = request.uri_args(limit)
        return self._flat(pairs, request.args or b"", limit)

    def post_args(self, limit: int) -> tuple[object, ...]:
        request = self._req()
        limit = MAX_ARGS if limit < 0 else limit
        try:
            pairs = request.post_args(limit)
        except NoRequestBody as exc:
            return (str(exc).encode(),)
        except BodyInFile as exc:
            return (None, str(exc).encode())
        return self._flat(pairs, request.body or b"", limit)

    @staticmethod
    def _flat(
        pairs: list[tuple[bytes, bytes | bool]], data: bytes, limit: int
    ) -> tuple[object, ...]:
        truncated = limit > 0 and data.count(b"&") + 1 > limit
        flat: list[object] = [truncated]
        for key, value in pairs:
            flat.append(key)
            flat.append(value)
        return tuple(flat)

    def read_body(self) -> None:
        self._req().body_read = True

    def body_data(self) -> bytes | None:
        return self._req().body_data()

    def digest(self, kind: bytes, data: bytes, key: bytes | None = None) -> object:
        if kind == b"md5":
            return hashlib.md5(data, usedforsecurity=False).hexdigest().encode()
        if kind == b"crc32":
            return zlib.crc32(data)
        if kind == b"md5_bin":
            return hashlib.md5(data, usedforsecurity=False).digest()
        if kind == b"sha1_bin":
            return hashlib.sha1(data, usedforsecurity=False).digest()
        if kind == b"hmac_sha1":
            return hmac.new(key or b"", data, hashlib.sha1).digest()
        raise ValueError(kind)

    def log(self, level: int, message: bytes) -> None:
        text = message.decode("utf-8", "replace")
        lines = self.log_lines
        if lines is not None:
            lines.append(text)
        log.log(_LEVELS.get(level, logging.ERROR), "[lua] %s", text)

    def regex(self, subject: bytes, pattern: bytes, options: bytes, pos: int) -> object:
        found = self.regexes.get(pattern, options)
        if isinstance(found, str):
            return (False, found.encode())
        compiled, anchored = found
        if pos < 0:
            pos = 0
        if pos > len(subject):
            return None
        m = compiled.match(subject, pos) if anchored else compiled.search(subject, pos)
        if m is None:
            return None
        groups = m.groups()
        result: list[object] = [len(groups), m.start(), m.end()]
        result.extend(False if g is None else g for g in groups)
        for name, index in compiled.groupindex.items():
            result.append(name.encode())
            result.append(index)
        return tuple(result)

    def set_header(self, name: bytes, value: bytes | None, append: bool = False) -> None:
        request = self._req()
        lname = name.lower()
        kept = [(n, v) for n, v in request.headers if append or n.lower() != lname]
        if value is not None:
            kept.append((name, value))
        request.headers = kept
        request._headers = None
        request._cookies = None

    def now(self) -> float:
        return self.clock()

    def codec(self, op: bytes, data: Any, extra: object = None) -> object:
        if op == b"g14":
            return _g14_tie(float(data))
        if op == b"fmt":
            spec = extra.decode() if isinstance(extra, bytes) else "g"
            conv = spec[0]
            prec = int(spec[1:]) if len(spec) > 1 else 6
            return _c_format(float(data), conv, prec).encode()
        if op == b"escape_uri":
            return _escape_uri(data)
        if op == b"unescape_uri":
            return unescape_component(data)
        if op == b"b64encode":
            out = base64.b64encode(data)
            return out.rstrip(b"=") if extra else out
        if op == b"b64decode":
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                return None
        if op == b"decode_args":
            limit = MAX_ARGS if not isinstance(extra, int) or extra < 0 else extra
            flat: list[object] = [False]
            for key, value in parse_args(data, limit):
                flat.append(key)
                flat.append(value)
            return tuple(flat)
        if op == b"quote_sql_str":
            escaped = (
                data.replace(b"\\", b"\\\\")
                .replace(b"\x00", b"\\0")
                .replace(b"\n", b"\\n")
                .replace(b"\r", b"\\r")
                .replace(b"\t", b"\\t")
                .replace(b"\x1a", b"\\Z")
                .replace(b"\b", b"\\b")
                .replace(b"'", b"\\'")
                .replace(b'"', b'\\"')
            )
            return b"'" + escaped + b"'"
        if op == b"parse_http_time":
            try:
                return int(parsedate_to_datetime(data.decode("latin-1")).timestamp())
            except (TypeError, ValueError, IndexError):
                return None
        raise ValueError(op)


_CHANGE_REFUSED = frozenset(
    {
        b"uri",
        b"document_uri",
        b"request_uri",
        b"remote_addr",
        b"remote_port",
        b"request_method",
        b"host",
        b"scheme",
        b"server_addr",
        b"server_port",
        b"server_name",
        b"server_protocol",
        b"query_string",
        b"is_args",
        b"request",
        b"request_body",
        b"content_length",
        b"content_type",
        b"https",
    }
)


class LuaScript:
    """One compiled script; `run()` it once per request."""

    __slots__ = ("_handle", "_runtime", "decision", "name", "phase")

    def __init__(
        self, runtime: LuaRuntime, handle: Any, name: str, phase: str, decision: str | None
    ) -> None:
        self._runtime = runtime
        self._handle = handle
        self.name = name
        self.phase = phase
        self.decision = decision

    def run(self, request: NgxRequest, now: float | None = None) -> Effect:
        """Run for one request. `now` is nginx's cached time (default: the clock)."""
        return self._runtime.run(self, request, now)


class LuaRuntime:
    """One sandboxed LuaJIT state (per worker process)."""

    def __init__(
        self,
        max_memory: int = DEFAULT_MAX_MEMORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if _lupa is None:
            raise LuaUnavailable(_IMPORT_ERROR)
        self._lua = _lupa.LuaRuntime(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attributes,
            max_memory=max_memory,
        )
        self._clock = clock
        bridge = self._bridge = _Bridge(clock)
        setup = self._lua.execute(PRELUDE_WRAPPER)
        self._compile, self._run, self._declare, self._set_level = setup(
            PRELUDE.encode("utf-8"),
            bridge.var,
            bridge.set_var,
            bridge.headers,
            bridge.uri_args,
            bridge.post_args,
            bridge.read_body,
            bridge.body_data,
            bridge.digest,
            bridge.log,
            bridge.regex,
            bridge.set_header,
            bridge.now,
            bridge.codec,
        )
        self._level = -1
        self.refresh_log_level()

    def refresh_log_level(self) -> None:
        """Pick up the logger's level (ngx.log filters in Lua, without a callback)."""
        level = _nginx_level(log)
        if level != self._level:
            self._set_level(level)
            self._level = level

    def declare_shared_dict(self, name: str, size: int) -> None:
        """lua_shared_dict NAME SIZE: kept across reloads of the same process."""
        self._declare(name.encode("utf-8"), size)

    def compile(
        self,
        source: str | bytes,
        name: str,
        phase: str = "rewrite",
        decision: str | None = "backend",
        variables: Mapping[str, str] | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> LuaScript:
        """Compile a script. `decision`: the user variable whose value is the decision
        (rewrite/access); `variables`: more user variables with their initial values
        (nginx `set $name value;`). Raises LuaCompileError."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, not {phase!r}")
        code = source.encode("utf-8") if isinstance(source, str) else source
        flat: list[bytes] = []
        for var_name, value in (variables or {}).items():
            flat.append(var_name.lower().encode("utf-8"))
            flat.append(value.encode("utf-8"))
        decision_var = None if phase == "set" or decision is None else decision.lower()
        result = self._compile(
            b"@" + name.encode("utf-8"),
            code,
            PHASES[phase],
            float(budget),
            None if decision_var is None else decision_var.encode("utf-8"),
            *flat,
        )
        handle, error = result if isinstance(result, tuple) else (result, None)
        if handle is None:
            message = error.decode("utf-8", "replace") if isinstance(error, bytes) else "?"
            raise LuaCompileError(message)
        self.refresh_log_level()
        return LuaScript(self, handle, name, phase, decision_var)

    def run(self, script: LuaScript, request: NgxRequest, now: float | None = None) -> Effect:
        if request.uri is None:
            # nginx refuses such a request line before any phase runs
            return Effect(EffectKind.EXIT, status=400)
        bridge = self._bridge
        bridge.request = request
        if now is None:
            now = self._clock()
        try:
            result = self._run(script._handle, int(now * 1000) / 1000.0)
        except _lupa.LuaMemoryError:
            self._lua.execute("collectgarbage()")
            return self._failed(script, "not enough memory")
        except _lupa.LuaError as exc:
            return self._failed(script, str(exc))
        finally:
            bridge.request = None
        kind, a, b, body, _status, resp_headers, req_headers = result
        if kind == 0 and body is None and req_headers is None and resp_headers is None:
            # the common case: the script set the decision variable and nothing else
            return Effect(EffectKind.VALUE, None if a is None else _text(a))
        kind_name = _KINDS[kind]
        if kind_name == EffectKind.ERROR:
            return self._failed(script, a.decode("utf-8", "replace"))
        value: str | None = None
        code = 0
        args: str | None = None
        if kind_name == EffectKind.VALUE:
            value = None if a is None else _text(a)
        elif kind_name == EffectKind.EXEC:
            value = _text(a)
            args = None if b is None else _text(b)
        elif kind_name == EffectKind.EXIT:
            code = int(a)
        elif kind_name == EffectKind.REDIRECT:
            code = int(a)
            value = _text(b)
        return Effect(
            kind_name,
            value=value,
            status=code,
            args=args,
            request_headers=_header_list(req_headers),
            response_headers=_header_list(resp_headers),
            body=body or b"",
        )

    def _failed(self, script: LuaScript, message: str) -> Effect:
        context = "set_by_lua" if script.phase == "set" else f"{script.phase}_by_lua"
        log.error(
            "%s %s: lua entry thread aborted: runtime error: %s", context, script.name, message
        )
        return Effect(EffectKind.ERROR, status=500, error=message)


def _text(data: bytes) -> str:
    """What a script produced, as text: UTF-8 as the rule file is written (a `map` key
    "@灰度" is the script's ngx.exec("@灰度")); other bytes kept as lone surrogates, so
    the router writes back exactly the bytes the script gave (router.rules.wire_bytes)."""
    return data.decode("utf-8", "surrogateescape")


def _header_list(table: Any) -> tuple[tuple[str, str | None], ...]:
    if table is None:
        return ()
    items = list(table.values())
    pairs: list[tuple[str, str | None]] = []
    for i in range(0, len(items) - 1, 2):
        name, value = items[i], items[i + 1]
        pairs.append((_text(name), None if value is False else _text(value)))
    return tuple(pairs)


# The prelude is loaded by a tiny wrapper so that its own globals (loadstring, jit,
# debug, os ...) stay in this Lua state's real _G, which no script can reach.
PRELUDE_WRAPPER: Final = """
return function(source, ...)
  local chunk = assert(loadstring(source, "=grayroute-prelude"))
  return chunk(...)
end
"""

_default: LuaRuntime | None = None


def default_runtime() -> LuaRuntime:
    """This process's runtime (one Lua state per worker), created on first use."""
    global _default
    if _default is None:
        _default = LuaRuntime()
    return _default
