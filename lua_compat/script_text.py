"""What a routing script's text says without running it: its string literals.

`grayroute check` counts an upstream as used when a Lua route's script names it in a
string (`ngx.var.backend = "orders-v2"`): scripts pick upstreams by name, and a check
that only looked at the rule file would call those upstreams unused.

    string_literals(source) -> frozenset[str]

Lua 5.1 / LuaJIT 2.1 lexing, as far as strings go: '...' and "..." with their escapes
(\\n, \\ddd, \\xXX, \\z, \\u{XXX}, a backslash before a newline), long strings [[...]] and
[==[...]==] (a first newline dropped), and comments (-- to the end of the line,
--[[...]] and --[==[...]==]), whose text is not code. A string that is not closed ends
the scan (the script does not compile; the check reports that).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["string_literals"]

_LONG_OPEN: Final = re.compile(rb"\[(=*)\[")
_SIMPLE_ESCAPES: Final = {
    ord("a"): b"\a",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
    ord("\\"): b"\\",
    ord('"'): b'"',
    ord("'"): b"'",
    ord("\n"): b"\n",
    ord("\r"): b"\n",
}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def string_literals(source: str | bytes) -> frozenset[str]:
    """Every string literal of a Lua script, as text (UTF-8; other bytes as surrogates)."""
    data = source.encode("utf-8", "surrogateescape") if isinstance(source, str) else source
    found: set[str] = set()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x2D and data[i + 1 : i + 2] == b"-":  # -- a comment
            long = _LONG_OPEN.match(data, i + 2)
            if long is not None:
                end = data.find(b"]" + long.group(1) + b"]", long.end())
                i = n if end < 0 else end + len(long.group(1)) + 2
            else:
                end = data.find(b"\n", i)
                i = n if end < 0 else end + 1
        elif c == 0x22 or c == 0x27:  # " or '
            text, i = _quoted(data, i + 1, c)
            if text is None:
                break
            found.add(text.decode("utf-8", "surrogateescape"))
        elif c == 0x5B:  # [ : a long string, or an index
            long = _LONG_OPEN.match(data, i)
            if long is None:
                i += 1
                continue
            close = b"]" + long.group(1) + b"]"
            end = data.find(close, long.end())
            if end < 0:
                break
            body = data[long.end() : end]
            if body[:2] == b"\r\n" or body[:2] == b"\n\r":
                body = body[2:]
            elif body[:1] in (b"\n", b"\r"):
                body = body[1:]
            found.add(body.decode("utf-8", "surrogateescape"))
            i = end + len(close)
        else:
            i += 1
    return frozenset(found)


def _quoted(data: bytes, i: int, quote: int) -> tuple[bytes | None, int]:
    """The string starting after its opening quote at `i`: (bytes, index after it)."""
    out = bytearray()
    n = len(data)
    while i < n:
        c = data[i]
        if c == quote:
            return bytes(out), i + 1
        if c == 0x0A or c == 0x0D:
            return None, i  # a newline inside a short string: not Lua
        if c != 0x5C:  # not a backslash
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            return None, n
        e = data[i + 1]
        i += 2
        simple = _SIMPLE_ESCAPES.get(e)
        if simple is not None:
            out += simple
            if e == 0x0D and data[i : i + 1] == b"\n":
                i += 1
        elif 0x30 <= e <= 0x39:  # \ddd, decimal, up to three digits
            j = i
            while j < n and j < i + 2 and 0x30 <= data[j] <= 0x39:
                j += 1
            out.append(int(data[i - 1 : j]) & 0xFF)
            i = j
        elif e == 0x78 and data[i : i + 2] and all(b in _HEX for b in data[i : i + 2]):  # \xXX
            out.append(int(data[i : i + 2], 16))
            i += 2
        elif e == 0x7A:  # \z: skip the whitespace that follows
            while i < n and data[i] in b" \t\r\n\v\f":
                i += 1
        elif e == 0x75 and data[i : i + 1] == b"{":  # \u{XXX}
            end = data.find(b"}", i)
            if end < 0:
                return None, n
            try:
                out += chr(int(data[i + 1 : end], 16)).encode("utf-8", "surrogatepass")
            except ValueError:
                return None, n
            i = end + 1
        else:
            out.append(e)  # LuaJIT refuses other escapes; the compile check reports it
    return None, n
