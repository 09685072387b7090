"""Reading nginx.conf: the directives as a tree, with the file and line of each.

    parse_nginx(text, filename)   -> [Directive]   one text, blocks nested
    load_nginx(path)              -> [Directive]   a file with its `include`s spliced in
                                                   (globs, relative to its folder)

Tokens follow nginx's own reader (ngx_conf_read_token): quotes, backslash escapes, `${var}`
inside words, `)` right after a closing quote (`if ($a ~ "x")`). The code of a
`*_by_lua_block` is kept whole as text (Lua strings, comments and long brackets
respected), since nginx hands it to Lua unparsed.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Directive", "NginxSyntaxError", "load_nginx", "parse_nginx"]


class NginxSyntaxError(ValueError):
    """The configuration cannot be read (unbalanced braces, unterminated quotes...)."""


@dataclass
class Directive:
    name: str
    args: list[str]
    file: str
    line: int
    block: list[Directive] | None = None
    lua: str | None = None  # the code of a *_by_lua_block

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def text(self) -> str:
        args = " ".join(self.args)
        return f"{self.name} {args}".strip() + (" { ... }" if self.block is not None else ";")


# -- reading nginx.conf ----------------------------------------------------------------------


def parse_nginx(text: str, filename: str = "nginx.conf") -> list[Directive]:
    """The directives of a configuration text, blocks nested (no include resolution)."""
    parser = _Parser(text, filename)
    directives = parser.block(top=True)
    return directives


class _Parser:
    def __init__(self, text: str, filename: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.file = filename

    def error(self, message: str) -> NginxSyntaxError:
        return NginxSyntaxError(f"{self.file}:{self.line}: {message}")

    def skip_space(self) -> None:
        s = self.s
        while self.i < len(s):
            ch = s[self.i]
            if ch == "\n":
                self.line += 1
                self.i += 1
            elif ch in " \t\r":
                self.i += 1
            elif ch == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
            else:
                return

    def word(self) -> str | None:
        """The next token; None at `;`, `{`, `}` or the end (not consumed)."""
        self.skip_space()
        s = self.s
        if self.i >= len(s) or s[self.i] in ";{}":
            return None
        ch = s[self.i]
        if ch in "\"'":
            quote = ch
            out = []
            self.i += 1
            while True:
                if self.i >= len(s):
                    raise self.error("unexpected end of file, expecting closing quote")
                ch = s[self.i]
                if ch == "\\" and self.i + 1 < len(s):
                    self.i += 2
                    out.append(_unescape(s[self.i - 1]))
                    continue
                if ch == quote:
                    self.i += 1
                    return "".join(out)
                if ch == "\n":
                    self.line += 1
                out.append(ch)
                self.i += 1
        out = []
        while self.i < len(s):
            ch = s[self.i]
            if ch in " \t\r\n;":
                break
            if ch == "{" and out and out[-1] == "$":
                end = s.find("}", self.i)
                if end < 0:
                    raise self.error("the closing bracket in variable name is missing")
                out.append(s[self.i : end + 1])
                self.i = end + 1
                continue
            if ch in "{}":
                break
            if ch == "\\" and self.i + 1 < len(s):
                self.i += 2
                out.append(_unescape(s[self.i - 1]))
                continue
            out.append(ch)
            self.i += 1
        return "".join(out)

    def block(self, top: bool = False) -> list[Directive]:
        directives: list[Directive] = []
        while True:
            self.skip_space()
            if self.i >= len(self.s):
                if not top:
                    raise self.error('unexpected end of file, expecting "}"')
                return directives
            if self.s[self.i] == "}":
                if top:
                    raise self.error('unexpected "}"')
                self.i += 1
                return directives
            line = self.line
            name = self.word()
            if name is None:
                raise self.error(f'unexpected "{self.s[self.i]}"')
            args: list[str] = []
            while True:
                w = self.word()
                if w is None:
                    break
                args.append(w)
            if self.i >= len(self.s):
                raise self.error('unexpected end of file, expecting ";" or "}"')
            ch = self.s[self.i]
            self.i += 1
            if ch == ";":
                directives.append(Directive(name, args, self.file, line))
            elif ch == "{":
                if name.endswith("_by_lua_block"):
                    directives.append(Directive(name, args, self.file, line, [], self.lua_block()))
                else:
                    directives.append(Directive(name, args, self.file, line, self.block()))
            else:
                raise self.error('unexpected "}"')

    def lua_block(self) -> str:
        """Raw Lua up to the matching `}` (Lua strings and comments respected)."""
        s = self.s
        start = self.i
        depth = 0
        while self.i < len(s):
            ch = s[self.i]
            if ch == "\n":
                self.line += 1
            if ch == "-" and s.startswith("--", self.i):
                m = re.compile(r"--\[(=*)\[").match(s, self.i)
                if m:
                    self._skip_long(m.group(1), m.end())
                else:
                    end = s.find("\n", self.i)
                    self.i = len(s) if end < 0 else end
                continue
            if ch == "[":
                m = re.compile(r"\[(=*)\[").match(s, self.i)
                if m:
                    self._skip_long(m.group(1), m.end())
                    continue
            if ch in "\"'":
                self.i += 1
                while self.i < len(s) and s[self.i] != ch:
                    if s[self.i] == "\\":
                        self.i += 1
                    elif s[self.i] == "\n":
                        self.line += 1
                    self.i += 1
                self.i += 1
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                if depth == 0:
                    code = s[start : self.i]
                    self.i += 1
                    return code
                depth -= 1
            self.i += 1
        raise self.error("unexpected end of file in a Lua block")

    def _skip_long(self, eq: str, pos: int) -> None:
        close = "]" + eq + "]"
        end = self.s.find(close, pos)
        if end < 0:
            raise self.error("unfinished long string or comment in a Lua block")
        self.line += self.s.count("\n", self.i, end)
        self.i = end + len(close)


def _unescape(ch: str) -> str:
    """ngx_conf_read_token: \\" \\' \\\\ lose the backslash, \\t \\r \\n are controls, other
    escapes keep it (a regex's \\. stays \\.)."""
    if ch in "\"'\\":
        return ch
    return {"t": "\t", "r": "\r", "n": "\n"}.get(ch, "\\" + ch)


def load_nginx(path: str, seen: set[str] | None = None) -> list[Directive]:
    """Parse a file and splice in its `include`s (globs, relative to its directory)."""
    seen = seen if seen is not None else set()
    real = os.path.realpath(path)
    if real in seen:
        raise NginxSyntaxError(f"{path}: included recursively")
    seen.add(real)
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return _splice(parse_nginx(text, path), os.path.dirname(path), seen)


def _splice(directives: list[Directive], base: str, seen: set[str]) -> list[Directive]:
    out: list[Directive] = []
    for d in directives:
        if d.name == "include" and len(d.args) == 1 and d.block is None:
            pattern = d.args[0] if os.path.isabs(d.args[0]) else os.path.join(base, d.args[0])
            matches = sorted(glob.glob(pattern))
            if not matches:
                out.append(d)  # reported as untranslated below
            for m in matches:
                if m.endswith("mime.types"):
                    continue
                out.extend(load_nginx(m, seen))
            continue
        if d.block is not None and d.lua is None:
            d.block = _splice(d.block, base, seen)
        out.append(d)
    return out
