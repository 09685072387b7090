"""nginx.conf -> a Grayroute rule file, and a plain list of what could not be translated.

    result = import_nginx("nginx.conf", scripts_dir="scripts")
    result.yaml            the rule file (format 1 with Grayroute's extensions)
    result.scripts         {path: Lua source} of *_by_lua_block code to write next to it
    result.untranslated    [Note(file, line, text, why)]: everything routing-relevant that
                           was not carried over, in the words of the config

What is translated:

    upstream NAME { server HOST:PORT; ... }          -> upstreams: NAME: endpoints
    split_clients "KEY" $v { 0.5% a; * b; }           -> a route with `split_clients:`
    map $src $v { default a; "x" b; }                 -> pins (cookie/header/query) or, when
                                                         $src is a split_clients variable,
                                                         the buckets' upstreams
    set $backend ""; rewrite_by_lua_file f.lua;       -> a route with `lua:` (rewrite,
    access_by_lua_file / set_by_lua_file $v f.lua;       access or set phase)
    location @name { proxy_pass http://UP; }          -> `lua.map: {"@name": UP}` (ngx.exec)
    server_name / location PREFIX / proxy_pass        -> match hosts / path_prefix, `to:`
    lua_shared_dict NAME SIZE;                        -> lua_shared_dicts: NAME: SIZE

Directives that do not change where a request goes (logging, timeouts, buffers, TLS,
proxy_set_header ...) are listed separately as `ignored`; everything else that is left
over is `untranslated`.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lua_compat.split_clients import SplitClients, SplitClientsError

__all__ = [
    "Directive",
    "ImportResult",
    "NginxSyntaxError",
    "Note",
    "import_nginx",
    "parse_nginx",
    "run_import",
]


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


@dataclass(frozen=True)
class Note:
    file: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}  ({self.why})"


@dataclass
class ImportResult:
    yaml: str
    untranslated: list[Note] = field(default_factory=list)
    ignored: list[Note] = field(default_factory=list)
    scripts: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        lines = []
        if self.untranslated:
            lines.append(f"not translated ({len(self.untranslated)}):")
            lines += [f"  {n}" for n in self.untranslated]
        else:
            lines.append("everything that decides where requests go was translated")
        if self.ignored:
            lines.append(f"ignored, not about routing ({len(self.ignored)}):")
            lines += [f"  {n.file}:{n.line}: {n.text}" for n in self.ignored]
        return "\n".join(lines)


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


def _load(path: str, seen: set[str] | None = None) -> list[Directive]:
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
                out.extend(_load(m, seen))
            continue
        if d.block is not None and d.lua is None:
            d.block = _splice(d.block, base, seen)
        out.append(d)
    return out


# -- translation -----------------------------------------------------------------------------

# Directives that do not decide where a request goes.
_NOT_ROUTING = frozenset(
    [
        "user",
        "worker_processes",
        "worker_rlimit_nofile",
        "worker_connections",
        "pid",
        "error_log",
        "access_log",
        "events",
        "http",
        "sendfile",
        "tcp_nopush",
        "tcp_nodelay",
        "keepalive_timeout",
        "keepalive_requests",
        "types_hash_max_size",
        "server_tokens",
        "default_type",
        "log_format",
        "gzip",
        "gzip_vary",
        "gzip_proxied",
        "gzip_comp_level",
        "gzip_types",
        "gzip_min_length",
        "client_max_body_size",
        "client_body_buffer_size",
        "client_header_buffer_size",
        "large_client_header_buffers",
        "client_body_timeout",
        "client_header_timeout",
        "send_timeout",
        "proxy_connect_timeout",
        "proxy_read_timeout",
        "proxy_send_timeout",
        "proxy_buffering",
        "proxy_buffers",
        "proxy_buffer_size",
        "proxy_busy_buffers_size",
        "proxy_http_version",
        "proxy_set_header",
        "proxy_hide_header",
        "proxy_pass_header",
        "proxy_redirect",
        "proxy_next_upstream",
        "proxy_next_upstream_tries",
        "proxy_intercept_errors",
        "ssl_certificate",
        "ssl_certificate_key",
        "ssl_protocols",
        "ssl_ciphers",
        "ssl_prefer_server_ciphers",
        "ssl_session_cache",
        "ssl_session_timeout",
        "listen",
        "root",
        "index",
        "charset",
        "resolver",
        "resolver_timeout",
        "lua_package_path",
        "lua_package_cpath",
        "lua_code_cache",
        "lua_socket_log_errors",
        "lua_need_request_body",
        "real_ip_header",
        "set_real_ip_from",
        "real_ip_recursive",
        "add_header",
        "expires",
        "etag",
        "server_names_hash_bucket_size",
        "variables_hash_max_size",
        "variables_hash_bucket_size",
        "keepalive",
        "worker_cpu_affinity",
        "multi_accept",
        "use",
        "daemon",
        "master_process",
        "env",
        "load_module",
        "underscores_in_headers",
        "ignore_invalid_headers",
        "merge_slashes",
    ]
)

_LUA_HANDLERS = {
    "rewrite_by_lua_file": "rewrite",
    "access_by_lua_file": "access",
    "rewrite_by_lua_block": "rewrite",
    "access_by_lua_block": "access",
}
_SET_HANDLERS = ("set_by_lua_file", "set_by_lua_block", "set_by_lua")
_VAR = re.compile(r"^\$\{?([A-Za-z0-9_]+)\}?")
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class _Map:
    source: str  # the source text, e.g. "$cookie_gray" or "$variant"
    entries: list[tuple[str, str]]  # (key as written, value); regex keys keep their "~"
    default: str | None
    where: Directive


@dataclass
class _Split:
    key: str
    parts: list[tuple[str, str]]
    where: Directive


class _Importer:
    def __init__(self, scripts_dir: str | None) -> None:
        self.scripts_dir = scripts_dir
        self.untranslated: list[Note] = []
        self.ignored: list[Note] = []
        self.scripts: dict[str, str] = {}
        self.upstreams: dict[str, list[str]] = {}
        self.splits: dict[str, _Split] = {}
        self.maps: dict[str, _Map] = {}
        self.shared_dicts: dict[str, str] = {}
        self.routes: list[dict[str, object]] = []
        self.route_names: set[str] = set()

    def note(self, d: Directive, why: str) -> None:
        self.untranslated.append(Note(d.file, d.line, d.text(), why))

    def ignore(self, d: Directive) -> None:
        self.ignored.append(Note(d.file, d.line, d.text(), "not about routing"))

    # -- http level --------------------------------------------------------------------

    def run(self, directives: list[Directive]) -> None:
        http = [d for d in directives if d.name == "http" and d.block is not None]
        contexts = [d.block for d in http if d.block is not None] or [directives]
        for d in directives:
            if d.name != "http":
                self.other(d)
        for block in contexts:
            for d in block:
                if d.name == "upstream" and d.block is not None:
                    self.upstream(d)
                elif d.name == "split_clients" and d.block is not None:
                    self.split_clients(d)
                elif d.name == "map" and d.block is not None:
                    self.map(d)
                elif d.name == "lua_shared_dict" and len(d.args) == 2:
                    self.shared_dicts[d.args[0]] = d.args[1]
            for d in block:
                if d.name == "server" and d.block is not None:
                    self.server(d)
                elif d.name not in ("upstream", "split_clients", "map", "lua_shared_dict"):
                    self.other(d)

    def other(self, d: Directive) -> None:
        if d.name in _NOT_ROUTING or d.name in ("http", "types"):
            if d.name != "http":
                self.ignore(d)
            return
        if d.name == "include":
            self.note(d, "included file not found")
            return
        self.note(d, "no Grayroute equivalent")

    def upstream(self, d: Directive) -> None:
        name = d.args[0] if d.args else ""
        endpoints: list[str] = []
        for s in d.block or []:
            if s.name != "server":
                if s.name == "keepalive":
                    self.ignore(s)
                else:
                    self.note(
                        s, f"upstream {name}: Grayroute balances round-robin over healthy endpoints"
                    )
                continue
            addr = s.args[0] if s.args else ""
            if addr.startswith("unix:"):
                self.note(s, "unix sockets are not supported as endpoints")
                continue
            if ":" not in addr.rsplit("]", 1)[-1]:
                addr += ":80"
            params = [a for a in s.args[1:] if not a.startswith(("max_fails=", "fail_timeout="))]
            if params:
                self.note(
                    s,
                    f"server parameters {' '.join(params)} are not translated "
                    "(all endpoints of an upstream get equal shares)",
                )
                if "backup" in params or "down" in params:
                    continue
            endpoints.append(addr)
        if not endpoints:
            self.note(d, "upstream without usable servers")
            return
        self.upstreams[name] = endpoints

    def split_clients(self, d: Directive) -> None:
        if len(d.args) != 2 or not d.args[1].startswith("$"):
            self.note(d, "split_clients needs a key and a $variable")
            return
        parts = []
        for p in d.block or []:
            if p.args and len(p.args) == 1:
                parts.append((p.name, p.args[0]))
            elif not p.args:
                parts.append((p.name, ""))
            else:
                self.note(p, "a split_clients part is `PERCENT VALUE;`")
        try:
            SplitClients.build(parts)
        except SplitClientsError as exc:
            self.note(d, f"nginx would refuse it: {exc}")
            return
        self.splits[d.args[1][1:]] = _Split(d.args[0], parts, d)

    def map(self, d: Directive) -> None:
        if len(d.args) != 2 or not d.args[1].startswith("$"):
            self.note(d, "map needs a source and a $variable")
            return
        entries: list[tuple[str, str]] = []
        default: str | None = None
        for e in d.block or []:
            if e.name in ("hostnames", "volatile"):
                self.note(e, "map flags are not translated")
                continue
            if e.name == "default" and len(e.args) == 1:
                default = e.args[0]
                continue
            if len(e.args) != 1:
                self.note(e, "a map entry is `KEY VALUE;`")
                continue
            entries.append((e.name, e.args[0]))
        self.maps[d.args[1][1:]] = _Map(d.args[0], entries, default, d)

    # -- servers and locations -----------------------------------------------------------

    def server(self, d: Directive) -> None:
        hosts: list[str] = []
        locations: list[Directive] = []
        named: dict[str, Directive] = {}
        for s in d.block or []:
            if s.name == "server_name":
                for h in s.args:
                    if h in ("_", '""', ""):
                        continue
                    if h.startswith(("~", "*.")) or h.endswith(".*"):
                        self.note(s, f"server name {h}: hosts are matched exactly in Grayroute")
                        continue
                    hosts.append(h.lower())
            elif s.name == "location" and s.block is not None:
                if s.args and s.args[0].startswith("@"):
                    named[s.args[0]] = s
                else:
                    locations.append(s)
            elif s.name in _NOT_ROUTING:
                self.ignore(s)
            else:
                self.note(s, "server-level directive not translated")
        server_vars = {
            s.args[0][1:]: s.args[1] if len(s.args) > 1 else ""
            for s in d.block or []
            if s.name == "set" and s.args
        }
        for loc in locations:
            self.location(loc, hosts, named, server_vars)
        for name, loc in named.items():
            if not any(name in json.dumps(r) for r in self.routes):
                self.note(
                    loc, f"named location {name} is not the target of any translated ngx.exec"
                )

    def location(
        self,
        loc: Directive,
        hosts: list[str],
        named: dict[str, Directive],
        server_vars: dict[str, str],
    ) -> None:
        args = loc.args
        if not args:
            self.note(loc, "location without a path")
            return
        if args[0] in ("~", "~*"):
            self.note(loc, "regular-expression locations are not translated (use path_prefix)")
            return
        exact = args[0] == "="
        path = args[-1]
        if args[0] == "^~":
            path = args[1]
        name = self.route_name(hosts, path)
        route: dict[str, object] = {"name": name}
        match: dict[str, object] = {}
        if hosts:
            match["hosts"] = hosts
        if path != "/":
            match["path_prefix"] = path
        if match:
            route["match"] = match
        if exact:
            self.note(loc, f"exact location = {path} became the prefix {path}")
        variables = dict(server_vars)
        lua: dict[str, object] | None = None
        lua_lost = False
        proxy: Directive | None = None
        for s in loc.block or []:
            if s.name == "set" and len(s.args) >= 1:
                variables[s.args[0].lstrip("$")] = s.args[1] if len(s.args) > 1 else ""
            elif s.name in _LUA_HANDLERS:
                lua = self.lua_action(s, _LUA_HANDLERS[s.name], name, None)
                lua_lost = lua_lost or lua is None
            elif s.name in _SET_HANDLERS:
                var = s.args[0].lstrip("$") if s.args else ""
                lua = self.lua_action(s, "set", name, var)
                lua_lost = lua_lost or lua is None
            elif s.name == "proxy_pass":
                proxy = s
            elif s.name in _NOT_ROUTING:
                self.ignore(s)
            else:
                self.note(s, "location directive not translated")
        if lua_lost:
            self.note(loc, "not translated: its Lua routing could not be carried over")
            return
        if lua is not None:
            self.finish_lua(route, lua, proxy, variables, named, loc)
            return
        if proxy is None:
            self.note(loc, "location without proxy_pass or Lua routing")
            return
        target = self.proxy_target(proxy)
        if target is None:
            return
        kind, value = target
        if kind == "upstream":
            route["to"] = value
        else:
            if not self.variable_route(route, value, proxy):
                return
        self.add_route(route)

    def route_name(self, hosts: list[str], path: str) -> str:
        base = (hosts[0] if hosts else "") + ("" if path == "/" else path)
        name = _NAME_SAFE.sub("-", base).strip("-") or "default"
        candidate, n = name, 2
        while candidate in self.route_names:
            candidate = f"{name}-{n}"
            n += 1
        self.route_names.add(candidate)
        return candidate

    def add_route(self, route: dict[str, object]) -> None:
        self.routes.append(route)

    def proxy_target(self, proxy: Directive) -> tuple[str, str] | None:
        """("upstream", NAME) or ("variable", NAME) for a proxy_pass; None if not usable."""
        url = proxy.args[0] if proxy.args else ""
        m = re.match(r"^(https?)://([^/]+)(/.*)?$", url)
        if m is None:
            self.note(proxy, "proxy_pass target not understood")
            return None
        if m.group(1) == "https":
            self.note(proxy, "TLS to the upstream is not translated")
        if m.group(3) and m.group(3) != "/":
            self.note(proxy, f"the URI part {m.group(3)} is not translated (paths are kept)")
        host = m.group(2)
        var = _VAR.match(host)
        if var is not None:
            rest = host[var.end() :]
            if rest:
                self.note(
                    proxy,
                    f"proxy_pass http://${var.group(1)}{rest}: only a bare "
                    "variable naming an upstream is translated",
                )
                return None
            return "variable", var.group(1)
        if host in self.upstreams:
            return "upstream", host
        addr = host if ":" in host else host + ":80"
        name = _NAME_SAFE.sub("-", addr)
        self.upstreams.setdefault(name, [addr])
        return "upstream", name

    def upstream_for(self, value: str) -> str | None:
        if value in self.upstreams:
            return value
        return None

    def variable_route(self, route: dict[str, object], var: str, proxy: Directive) -> bool:
        """proxy_pass http://$var: via split_clients, map, or both."""
        if var in self.splits:
            return self.split_route(route, self.splits[var], {}, proxy)
        if var in self.maps:
            m = self.maps[var]
            source = _VAR.match(m.source)
            if source is not None and source.end() == len(m.source):
                src = source.group(1)
                if src in self.splits:
                    values = dict(m.entries)
                    return self.split_route(route, self.splits[src], values, proxy, m.default)
                return self.map_route(route, src, m, proxy)
            self.note(m.where, f"map source {m.source} is not a single variable")
            return False
        self.note(proxy, f"${var} is not set by split_clients, map or Lua in this config")
        return False

    def split_route(
        self,
        route: dict[str, object],
        split: _Split,
        through: dict[str, str],
        proxy: Directive,
        map_default: str | None = None,
    ) -> bool:
        buckets: list[dict[str, str]] = []
        unmatched: str | None = None
        for percent, value in split.parts:
            mapped = through.get(value, map_default) if through else value
            upstream = self.upstream_for(mapped or "")
            if upstream is None:
                self.note(split.where, f"split_clients value {value!r} names no upstream")
                return False
            buckets.append({percent: upstream})
        table = SplitClients.build(split.parts)
        if not table.has_star:
            fallback = map_default if through else None
            upstream = self.upstream_for(fallback or "")
            if upstream is not None:
                unmatched = upstream
            elif sum(table.percents) < 10000:
                self.note(
                    split.where,
                    "hashes above the last part get an empty value in "
                    "nginx; add `unmatched:` to the route",
                )
        spec: dict[str, object] = {"key": split.key, "buckets": buckets}
        if unmatched is not None:
            spec["unmatched"] = unmatched
        route["split_clients"] = spec
        return True

    def map_route(self, route: dict[str, object], src: str, m: _Map, proxy: Directive) -> bool:
        default = self.upstream_for(m.default or "")
        if default is None:
            self.note(m.where, f"map ${src}: the default {m.default!r} names no upstream")
            return False
        pins: list[dict[str, object]] = []
        source: dict[str, str] | None = None
        if src.startswith("cookie_"):
            source = {"cookie": src[7:]}
        elif src.startswith("arg_"):
            source = {"query": src[4:]}
            self.note(
                m.where,
                f"${src} is not URL-decoded in nginx; Grayroute's `query:` "
                "source is: values with %XX escapes may route differently",
            )
        elif src.startswith("http_"):
            source = None
        else:
            self.note(m.where, f"map on ${src} is not translated")
            return False
        for key, value in m.entries:
            upstream = self.upstream_for(value)
            if upstream is None:
                self.note(m.where, f"map value {value!r} names no upstream")
                return False
            regex = key.startswith("~")
            if src.startswith("http_"):
                header = src[5:].replace("_", "-")
                pattern = key.lstrip("~*") if regex else "^" + re.escape(key) + "$"
                if key.startswith("~*"):
                    pattern = "(?i)" + pattern
                pins.append({"to": upstream, "headers": {header: pattern}})
            elif regex:
                pattern = key.lstrip("~*")
                if key.startswith("~*"):
                    pattern = "(?i)" + pattern
                pins.append({"to": upstream, "user_pattern": f".*(?:{pattern}).*"})
            else:
                pins.append({"to": upstream, "users": [key]})
        if source is not None:
            route["user_id"] = [source]
        if pins:
            route["pins"] = pins
        route["to"] = default
        return True

    # -- Lua ---------------------------------------------------------------------------

    def lua_action(
        self, d: Directive, phase: str, route_name: str, set_var: str | None
    ) -> dict[str, object] | None:
        action: dict[str, object] = {"phase": phase}
        if d.name.endswith("_by_lua_file"):
            file_args = d.args[1:] if phase == "set" else d.args
            if not file_args:
                self.note(d, "no script file")
                return None
            action["file"] = file_args[0]
            if phase == "set" and len(file_args) > 1:
                self.note(d, "set_by_lua arguments (ngx.arg) are not translated")
        elif d.name.endswith("_by_lua_block") or d.name == "set_by_lua":
            code = d.lua if d.lua is not None else (d.args[1] if len(d.args) > 1 else "")
            if self.scripts_dir is None:
                self.note(d, "inline Lua: give --scripts-dir to write it to a file")
                return None
            path = os.path.join(self.scripts_dir, f"{route_name}-{phase}.lua")
            self.scripts[path] = _dedent(code).strip("\n") + "\n"
            action["file"] = path
        if set_var is not None:
            action["var"] = set_var
        return action

    def finish_lua(
        self,
        route: dict[str, object],
        action: dict[str, object],
        proxy: Directive | None,
        variables: dict[str, str],
        named: dict[str, Directive],
        loc: Directive,
    ) -> None:
        lua: dict[str, object] = {"file": action["file"]}
        if action["phase"] != "rewrite":
            lua["phase"] = action["phase"]
        mapping: dict[str, str] = {}
        default: str | None = None
        var = action.get("var")
        if proxy is not None:
            target = self.proxy_target(proxy)
            if target is not None and target[0] == "variable":
                var = var or target[1]
                if target[1] != var:
                    self.note(proxy, f"proxy_pass uses ${target[1]}, the script sets ${var}")
            elif target is not None:
                default = target[1]  # the script only exec's / exits; the rest goes here
        if action["phase"] != "set":
            if var is None:
                var = "backend"
            if var != "backend":
                lua["var"] = var
        extra = {k: v for k, v in variables.items() if k != var}
        if extra:
            lua["variables"] = extra
        code = self.script_text(str(lua["file"]), loc)
        for name, nl in named.items():
            if code is not None and name not in code:
                continue
            for s in nl.block or []:
                if s.name == "proxy_pass":
                    t = self.proxy_target(s)
                    if t is not None and t[0] == "upstream":
                        mapping[name] = t[1]
        if mapping:
            lua["map"] = mapping
        if default is not None:
            lua["default"] = default
        route["lua"] = lua
        self.add_route(route)

    def script_text(self, path: str, loc: Directive) -> str | None:
        """The script's code when it can be read (to see which named locations it uses)."""
        if path in self.scripts:
            return self.scripts[path]
        candidates = (
            [path]
            if os.path.isabs(path)
            else [
                os.path.join(os.path.dirname(loc.file), path),
                os.path.join(os.path.dirname(os.path.dirname(loc.file)), path),
            ]
        )
        for candidate in candidates:
            try:
                return Path(candidate).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
        if not os.path.isabs(path):
            self.untranslated.append(
                Note(
                    loc.file,
                    loc.line,
                    f"script {path}",
                    "nginx reads it relative to its prefix, Grayroute "
                    "relative to the rule file: copy it there",
                )
            )
        return None

    # -- output -------------------------------------------------------------------------

    def yaml(self, source: str) -> str:
        out = [f"# Imported from {source} by `grayroute import-nginx`.", "format: 1", ""]
        out.append("upstreams:")
        for name, endpoints in self.upstreams.items():
            out.append(f"  {_y(name)}:")
            out.append(f"    endpoints: [{', '.join(_y(e) for e in endpoints)}]")
        if self.shared_dicts:
            out.append("")
            out.append("lua_shared_dicts:")
            for name, size in self.shared_dicts.items():
                out.append(f"  {_y(name)}: {_y(_size(size))}")
        out.append("")
        out.append("routes:")
        if not self.routes:
            out.append("  []")
        for route in self.routes:
            out.extend(_route_yaml(route))
        return "\n".join(out) + "\n"


def _size(text: str) -> str:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    if m is None:
        return text
    unit = {"": "", "k": "KiB", "m": "MiB", "g": "GiB"}[m.group(2).lower()]
    return m.group(1) + unit


def _y(value: object) -> str:
    """A YAML scalar: plain when safe, else double-quoted (JSON quoting is valid YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./-]*", text) and text.lower() not in (
        "true",
        "false",
        "yes",
        "no",
        "null",
        "on",
        "off",
        "y",
        "n",
        "~",
    ):
        return text
    return json.dumps(text, ensure_ascii=False)


def _route_yaml(route: dict[str, object]) -> Iterator[str]:
    first = True
    for key, value in route.items():
        prefix = "  - " if first else "    "
        first = False
        yield from _node(prefix, key, value, 4)


def _node(prefix: str, key: str, value: object, indent: int) -> Iterator[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            yield f"{prefix}{_y(key)}: {{}}"
            return
        yield f"{prefix}{_y(key)}:"
        for k, v in value.items():
            yield from _node(pad + "  ", k, v, indent + 2)
    elif isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            yield f"{prefix}{_y(key)}: [{', '.join(_y(v) for v in value)}]"
            return
        yield f"{prefix}{_y(key)}:"
        for item in value:
            if isinstance(item, dict):
                items = list(item.items())
                k0, v0 = items[0]
                yield from _node(pad + "  - ", k0, v0, indent + 4)
                for k, v in items[1:]:
                    yield from _node(pad + "    ", k, v, indent + 4)
            else:
                yield f"{pad}  - {_y(item)}"
    else:
        yield f"{prefix}{_y(key)}: {_y(value)}"


def _dedent(code: str) -> str:
    lines = code.split("\n")
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents) if indents else 0
    return "\n".join(line[cut:] for line in lines)


def import_nginx(path: str, scripts_dir: str | None = None) -> ImportResult:
    """Translate the nginx configuration at `path` (its includes followed)."""
    directives = _load(path)
    importer = _Importer(scripts_dir)
    importer.run(directives)
    return ImportResult(
        importer.yaml(path), importer.untranslated, importer.ignored, importer.scripts
    )


def run_import(conf: str, output: str = "-", scripts_dir: str = "scripts") -> int:
    """`grayroute import-nginx`: write the rule file (and extracted scripts), report the
    rest on stderr. Exit status 0, or 1 when the configuration cannot be read."""
    import sys

    try:
        result = import_nginx(conf, scripts_dir=scripts_dir)
    except (OSError, NginxSyntaxError) as exc:
        print(f"grayroute: {exc}", file=sys.stderr)
        return 1
    base = "." if output == "-" else os.path.dirname(output) or "."
    for path, code in result.scripts.items():
        target = os.path.join(base, path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        Path(target).write_text(code, encoding="utf-8")
        print(f"wrote {target}", file=sys.stderr)
    if output == "-":
        sys.stdout.write(result.yaml)
    else:
        Path(output).write_text(result.yaml, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    print(result.report(), file=sys.stderr)
    print("next: grayroute check " + ("RULES" if output == "-" else output), file=sys.stderr)
    return 0
