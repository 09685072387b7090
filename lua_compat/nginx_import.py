"""nginx.conf -> a Grayroute rule file, and a plain list of what could not be translated.

    result = import_nginx("nginx.conf", scripts_dir="scripts")
    result.yaml            the rule file (format 1 with Grayroute's extensions)
    result.scripts         {path: Lua source} of *_by_lua_block code to write next to it
    result.untranslated    [Note(file, line, text, why)]: every directive that decides
                           where a request goes and was not carried over
    result.differences     [Note]: translated, but some requests may be decided otherwise
                           (each says which)
    result.ignored         [Note]: directives that do not decide where a request goes

The rule file decides as nginx does: routes are written in the order that makes "the
first route that matches" give nginx's answer.

    server selection      exact names, then `*.x` wildcards (longest first), then `x.*`
                          (longest first), then regex names in order, then the default
                          server (`listen ... default_server`, else the first) -> routes
                          with `hosts`, `host_regex`, `default_host`; a server whose
                          locations do not cover every path gets a route answering 404
                          for its hosts, so its requests never reach another server's
    location selection    `=` first (`path_exact`), then the longest prefix, where `^~`
                          stops the search, then regex locations in order
                          (`path_regex`), else the longest prefix; a prefix ending in `/`
                          with proxy_pass redirects the path without the slash (301)
    rewrite phase         `return` -> `direct_response` / `redirect`; `if (COND) {
                          return ...; }` -> a route before the location's, with COND as
                          `headers` or `methods`; `rewrite R S break` -> `regex_rewrite`,
                          `rewrite R S permanent|redirect` -> a `redirect` route
    proxy_pass            an upstream (`to`), an address (an upstream named after it),
                          or a variable set by `set`, `map`, `split_clients` or Lua; the
                          URI part -> `prefix_rewrite`
    set $v A; if (COND) { set $v B; }
                          -> pins for the `if`s, the last first (headers, a cookie or an
                          argument as the route's `user_id`, $remote_addr networks), then A
    map $cookie_/$http_/$arg_X $v { KEY UP; ~RE UP; default ...; }
                          -> `user_id` + pins (keys ignore case, as nginx's do); a default
                          that is a split_clients variable -> the route's `split_clients`
    split_clients         -> `split_clients:` (values through a map when there is one)
    Lua handlers          -> `lua:` (rewrite, access, set phase), with the `set` presets
                          as `variables`, named locations reached by ngx.exec as `map`,
                          client_body_buffer_size (http, server or location)
    upstream              servers -> endpoints; `backup` servers -> an upstream NAME-backup
                          that NAME falls back to; max_fails / fail_timeout
    lua_shared_dict       -> lua_shared_dicts

`run_import` (`grayroute import-nginx`) writes the file, prints the three lists, and
exits 1 when something that routes was not translated, unless `partial` is given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lua_compat.nginx_conf import Directive, NginxSyntaxError, load_nginx, parse_nginx
from lua_compat.ngx import DEFAULT_BODY_BUFFER_SIZE
from lua_compat.split_clients import SplitClients, SplitClientsError
from router.rules.hosts import host_matches

__all__ = [
    "Directive",
    "ImportResult",
    "NginxSyntaxError",
    "Note",
    "import_nginx",
    "parse_nginx",
    "run_import",
]


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
    differences: list[Note] = field(default_factory=list)

    def report(self) -> str:
        lines = []
        if self.untranslated:
            lines.append(f"not translated ({len(self.untranslated)}):")
            lines += [f"  {n}" for n in self.untranslated]
        else:
            lines.append("everything that decides where requests go was translated")
        if self.differences:
            lines.append(f"translated, but may decide differently ({len(self.differences)}):")
            lines += [f"  {n}" for n in self.differences]
        if self.ignored:
            lines.append(f"ignored, not about routing ({len(self.ignored)}):")
            lines += [f"  {n.file}:{n.line}: {n.text}" for n in self.ignored]
        return "\n".join(lines)


# -- translation -----------------------------------------------------------------------------

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
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
        "absolute_redirect",
        "server_name_in_redirect",
        "port_in_redirect",
        "lua_shared_dict",
        "zone",
        "keepalive_timeout",
        "proxy_cache_path",
        "proxy_cache",
        "proxy_cache_valid",
        "proxy_cache_key",
        "open_file_cache",
        "types",
        "http2",
        "aio",
        "directio",
        "output_buffers",
        "postpone_output",
        "reset_timedout_connection",
        "server_names_hash_max_size",
        "map_hash_bucket_size",
        "map_hash_max_size",
        "ssl_dhparam",
        "ssl_stapling",
        "ssl_stapling_verify",
        "ssl_trusted_certificate",
        "ssl_session_tickets",
        "ssl_ecdh_curve",
        "add_trailer",
        "more_set_headers",
        "more_clear_headers",
        "log_not_found",
        "log_subrequest",
        "lua_max_pending_timers",
        "lua_max_running_timers",
        "header_filter_by_lua_block",
        "header_filter_by_lua_file",
        "body_filter_by_lua_block",
        "body_filter_by_lua_file",
        "log_by_lua_block",
        "log_by_lua_file",
        "proxy_ssl_server_name",
        "proxy_ssl_verify",
        "proxy_ignore_headers",
        "proxy_max_temp_file_size",
        "proxy_request_buffering",
        "chunked_transfer_encoding",
        "volatile",
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
_REDIRECTS = (301, 302, 303, 307, 308)
_UPSTREAM_PARAMS = re.compile(r"(weight|max_fails|fail_timeout|max_conns|slow_start)=(.*)")
# Balancing methods: which endpoint of one upstream, never which upstream.
_BALANCING = ("least_conn", "ip_hash", "hash", "random", "least_time", "sticky")
_PROXY_PASSES = ("proxy_pass", "fastcgi_pass", "uwsgi_pass", "scgi_pass", "grpc_pass")


@dataclass
class _Map:
    source: str  # the source text, e.g. "$cookie_gray" or "$variant"
    entries: list[tuple[str, str]]  # (key as written, value); regex keys keep their "~"
    default: str  # "" when not given (nginx's default)
    hostnames: bool
    where: Directive


@dataclass
class _Split:
    key: str
    parts: list[tuple[str, str]]
    where: Directive


@dataclass
class _Server:
    d: Directive
    names: list[str] = field(default_factory=list)  # as written, lower-case
    default: bool = False
    ports: set[str] = field(default_factory=set)
    ssl: bool = False
    body_buffer: str | None = None


@dataclass
class _Group:
    """Routes of one server for some of the hosts it serves (a step of server selection)."""

    server: _Server
    kind: str  # "hosts" | "regex" | "default"
    patterns: list[str]


@dataclass
class _Context:
    """What a server or location passes on to what it contains."""

    hosts: dict[str, object]  # the host condition of the server's routes
    label: str  # route names start with it
    variables: dict[str, str]  # `set` presets, in order
    named: dict[str, Directive]  # @name -> named location
    body_buffer: str | None
    ssl: bool
    # `if (COND) { set $var VALUE; }` in order: (the if, var, value); a later plain `set`
    # of the variable makes the earlier ones moot.
    conditional: list[tuple[Directive, str, str]] = field(default_factory=list)

    def set_variable(self, d: Directive) -> None:
        name = d.args[0].lstrip("$")
        self.variables[name] = d.args[1] if len(d.args) > 1 else ""
        self.conditional = [c for c in self.conditional if c[1] != name]

    def set_if(self, d: Directive) -> bool:
        """Record `if (COND) { set $v X; }`; False when the block holds anything else."""
        inner = [s for s in d.block or [] if s.name not in _NOT_ROUTING]
        sets = [s for s in inner if s.name == "set" and len(s.args) == 2]
        if not inner or len(sets) != len(inner) or len({s.args[0] for s in sets}) != len(sets):
            return False
        for s in sets:
            self.conditional.append((d, s.args[0].lstrip("$"), s.args[1]))
        return True


Route = dict[str, object]


def _pcre(pattern: str) -> str:
    """A PCRE pattern as Python's re writes it (named groups, \\z and \\Z)."""
    pattern = re.sub(r"\(\?<(?![=!])", "(?P<", pattern)
    return pattern.replace("\\z", "\\Z")


def _regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _matches_empty(pattern: str) -> bool:
    return re.search(pattern, "") is not None


def _disjoint(a: str, b: str) -> bool:
    """No host name matches both `hosts` patterns (only when certain)."""
    wild_a, wild_b = "*" in a, "*" in b
    if not wild_a and not wild_b:
        return a != b
    if not wild_a or not wild_b:
        exact, wild = (a, b) if not wild_a else (b, a)
        return not host_matches(wild, exact)
    if a.startswith("*.") and b.startswith("*."):
        return not (a[1:].endswith(b[1:]) or b[1:].endswith(a[1:]))
    if a.endswith(".*") and b.endswith(".*"):
        return not (a[:-1].startswith(b[:-1]) or b[:-1].startswith(a[:-1]))
    return False


def _apart(a: _Group, b: _Group) -> bool:
    """No host name is served by both groups (only when certain)."""
    if a.kind == "hosts" and b.kind == "hosts":
        return all(_disjoint(x, y) for x in a.patterns for y in b.patterns)
    if {a.kind, b.kind} == {"hosts", "regex"}:
        names, regexes = (a, b) if a.kind == "hosts" else (b, a)
        return all(
            "*" not in name and re.search(rx, name) is None
            for name in names.patterns
            for rx in regexes.patterns
        )
    return False


def _within(prefix: str, regex: str) -> str:
    """A regex that holds for paths starting with `prefix` in which `regex` is found."""
    return f"^(?={re.escape(prefix)}).*?(?:{regex})"


class _Importer:
    def __init__(self, scripts_dir: str | None) -> None:
        self.scripts_dir = scripts_dir
        self.untranslated: list[Note] = []
        self.differences: list[Note] = []
        self.ignored: list[Note] = []
        self.scripts: dict[str, str] = {}
        self.upstreams: dict[str, dict[str, object]] = {}
        self.splits: dict[str, _Split] = {}
        self.maps: dict[str, _Map] = {}
        self.shared_dicts: dict[str, str] = {}
        self.routes: list[Route] = []
        self.route_names: set[str] = set()
        self.body_buffer: str | None = None  # http-level client_body_buffer_size
        self.consumed: set[int] = set()  # `if ... { set }` blocks a route was built from
        self.conditional: dict[int, Directive] = {}  # every such block

    def note(self, d: Directive, why: str) -> None:
        self.untranslated.append(Note(d.file, d.line, d.text(), why))

    def differ(self, d: Directive, why: str) -> None:
        self.differences.append(Note(d.file, d.line, d.text(), why))

    def ignore(self, d: Directive) -> None:
        self.ignored.append(Note(d.file, d.line, d.text(), "not about routing"))

    # -- http level --------------------------------------------------------------------

    def run(self, directives: list[Directive]) -> None:
        http = [d for d in directives if d.name == "http" and d.block is not None]
        contexts = [d.block for d in http if d.block is not None] or [directives]
        for d in directives:
            if d.name != "http":
                self.other(d)
        servers: list[_Server] = []
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
                elif d.name == "client_body_buffer_size" and d.args:
                    self.body_buffer = d.args[0]
            for d in block:
                if d.name == "server" and d.block is not None:
                    servers.append(self.server_of(d))
                elif d.name not in (
                    "upstream",
                    "split_clients",
                    "map",
                    "lua_shared_dict",
                    "client_body_buffer_size",
                ):
                    self.other(d)
        if not servers:
            return
        ports = {frozenset(s.ports) for s in servers}
        if len(ports) > 1:
            self.differ(
                servers[0].d,
                "servers listen on different ports; Grayroute serves all of them on its "
                "--listen address, so a name is matched whatever the port",
            )
        groups = self.server_groups(servers)
        for group in groups:
            self.server_routes(group, alone=len(groups) == 1)
        for key, d in self.conditional.items():
            if key not in self.consumed:
                self.ignore(d)  # sets a variable that decides nothing here

    def other(self, d: Directive) -> None:
        if d.name in _NOT_ROUTING or d.name == "http":
            if d.name != "http":
                self.ignore(d)
            return
        if d.name == "include":
            self.note(d, "included file not found")
            return
        if d.name == "geo":
            self.note(d, "geo blocks are not translated (pins with client_cidrs can say it)")
            return
        self.note(d, "no Grayroute equivalent")

    def upstream(self, d: Directive) -> None:
        name = d.args[0] if d.args else ""
        endpoints: list[str] = []
        backups: list[str] = []
        health: list[tuple[str, str]] = []  # (max_fails, fail_timeout) of each primary
        for s in d.block or []:
            if s.name != "server":
                if s.name in ("keepalive", "keepalive_requests", "keepalive_timeout", "zone"):
                    self.ignore(s)
                elif s.name in _BALANCING:
                    self.note(
                        s,
                        f"upstream {name}: Grayroute balances round-robin over the healthy "
                        "endpoints of an upstream",
                    )
                else:
                    self.note(s, f"upstream {name}: not translated")
                continue
            addr = s.args[0] if s.args else ""
            if addr.startswith("unix:"):
                self.note(s, "unix sockets are not supported as endpoints")
                continue
            if ":" not in addr.rsplit("]", 1)[-1]:
                addr += ":80"
            flags = {a for a in s.args[1:] if "=" not in a}
            if "down" in flags:
                continue  # nginx never sends it anything; neither does the rule file
            params: dict[str, str] = {}
            for arg in s.args[1:]:
                m = _UPSTREAM_PARAMS.match(arg)
                if m is not None:
                    params[m.group(1)] = m.group(2)
            if "backup" in flags:
                backups.append(addr)
            else:
                endpoints.append(addr)
                health.append((params.get("max_fails", "1"), params.get("fail_timeout", "10s")))
            for key in ("weight", "max_conns", "slow_start"):
                if key in params and not (key == "weight" and params[key] == "1"):
                    self.note(
                        s,
                        f"server parameter {key}={params[key]} is not translated (every "
                        "endpoint of an upstream gets an equal share)",
                    )
            unknown = flags - {"backup", "down"}
            if unknown:
                self.note(s, f"server parameters {' '.join(sorted(unknown))} are not translated")
        if not endpoints and not backups:
            self.note(d, "upstream without usable servers")
            return
        spec: dict[str, object] = {"endpoints": endpoints}
        if len(set(health)) > 1:
            self.note(
                d,
                f"upstream {name}: servers with different max_fails/fail_timeout; Grayroute "
                "has one pair per upstream (the first server's is used)",
            )
        max_fails, fail_timeout = health[0] if health else ("1", "10s")
        if max_fails != "1":
            spec["max_fails"] = int(max_fails) if max_fails.isdigit() else max_fails
        if fail_timeout != "10s":
            spec["fail_timeout"] = _duration(fail_timeout)
        self.upstreams[name] = spec
        if backups:
            backup = self.unique_upstream(f"{name}-backup")
            self.upstreams[backup] = {"endpoints": backups}
            spec["fallback"] = backup

    def unique_upstream(self, name: str) -> str:
        candidate, n = name, 2
        while candidate in self.upstreams:
            candidate = f"{name}-{n}"
            n += 1
        return candidate

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
        self.splits[d.args[1].lstrip("$")] = _Split(d.args[0], parts, d)

    def map(self, d: Directive) -> None:
        if len(d.args) != 2 or not d.args[1].startswith("$"):
            self.note(d, "map needs a source and a $variable")
            return
        entries: list[tuple[str, str]] = []
        default = ""
        hostnames = False
        for e in d.block or []:
            if e.name == "hostnames" and not e.args:
                hostnames = True
                continue
            if e.name == "volatile" and not e.args:
                continue
            if e.name == "default" and len(e.args) == 1:
                default = e.args[0]
                continue
            if len(e.args) != 1:
                self.note(e, "a map entry is `KEY VALUE;`")
                continue
            key = e.name
            if key.startswith("\\"):  # nginx: a leading backslash escapes ~ and keywords
                key = key[1:]
            entries.append((key, e.args[0]))
        self.maps[d.args[1].lstrip("$")] = _Map(d.args[0], entries, default, hostnames, d)

    # -- server selection ----------------------------------------------------------------

    def server_of(self, d: Directive) -> _Server:
        server = _Server(d)
        for s in d.block or []:
            if s.name == "listen" and s.args:
                server.ports.add(s.args[0].rsplit(":", 1)[-1])
                server.default = server.default or "default_server" in s.args[1:]
                server.default = server.default or "default" in s.args[1:]
                server.ssl = server.ssl or "ssl" in s.args[1:]
            elif s.name == "server_name":
                server.names += [n.lower() if not n.startswith("~") else n for n in s.args]
            elif s.name == "client_body_buffer_size" and s.args:
                server.body_buffer = s.args[0]
        server.ports = server.ports or {"80"}  # nginx's default: listen *:80
        return server

    def server_groups(self, servers: list[_Server]) -> list[_Group]:
        """Routes' host conditions, in the order nginx chooses a server by name."""
        default = next((s for s in servers if s.default), servers[0])
        exact: list[tuple[tuple[int, ...], _Server, str]] = []
        wild: list[tuple[tuple[int, ...], _Server, str]] = []
        regexes: list[tuple[tuple[int, ...], _Server, str]] = []
        seen: dict[str, _Server] = {}
        for si, server in enumerate(servers):
            for ni, name in enumerate(server.names):
                where = next(s for s in server.d.block or [] if s.name == "server_name")
                if name in ("", "_", '""') or name.startswith("$"):
                    if name.startswith("$"):
                        self.note(where, f"server name {name} is not translated")
                    continue
                if name.startswith("~"):
                    pattern = _pcre(name[1:])
                    if not _regex_ok(pattern):
                        self.note(where, f"server name {name}: not a regular expression")
                        continue
                    regexes.append(((3, si, ni), server, pattern))
                    continue
                forms = [name]
                if name.startswith("."):  # ".example.com": the name and its subdomains
                    forms = [name[1:], "*" + name]
                for form in forms:
                    if form in seen and seen[form] is not server:
                        self.differ(
                            where,
                            f"server name {form} is also an earlier server's: "
                            "nginx ignores it here, so does the rule file",
                        )
                        continue
                    seen[form] = server
                    if form.startswith("*."):
                        wild.append(((1, -len(form), si, ni), server, form))
                    elif form.endswith(".*"):
                        wild.append(((2, -len(form), si, ni), server, form))
                    elif "*" in form:
                        self.note(
                            where, f"server name {form}: a wildcard is a whole first or last label"
                        )
                    else:
                        exact.append(((0, si, ni), server, form))
        groups: list[_Group] = []
        for _, server, pattern in sorted(exact + wild, key=lambda e: e[0]):
            self.add_group(groups, _Group(server, "hosts", [pattern]))
        for _, server, pattern in sorted(regexes, key=lambda e: e[0]):
            self.add_group(groups, _Group(server, "regex", [pattern]))
        self.add_group(groups, _Group(default, "default", []))
        return groups

    def add_group(self, groups: list[_Group], new: _Group) -> None:
        """Append `new`, or merge it into an earlier group of the same server when no group
        between them can take one of its hosts first."""
        for j in range(len(groups) - 1, -1, -1):
            group = groups[j]
            if group.server is not new.server:
                continue
            between = groups[j + 1 :]
            if new.kind == "default":
                # The default group comes last with no host condition: a group of the same
                # server may join it if nothing after that group takes its hosts.
                if group.kind == "hosts" and all(_apart(group, g) for g in between):
                    del groups[j]
                    new.patterns = group.patterns + new.patterns
                continue
            if group.kind != new.kind:
                break
            # Regex names join only their neighbour: which name a regex takes is unknown.
            if (new.kind == "regex" and not between) or (
                new.kind == "hosts" and all(_apart(new, g) for g in between)
            ):
                group.patterns += new.patterns
                return
            break
        groups.append(new)

    # -- routes of one server ------------------------------------------------------------

    def server_routes(self, group: _Group, alone: bool) -> None:
        server = group.server
        hosts: dict[str, object] = {}
        if group.kind == "hosts":
            hosts = {"hosts": list(group.patterns)}
            label = next((p for p in group.patterns if "*" not in p), group.patterns[0])
        elif group.kind == "regex":
            pattern = (
                group.patterns[0]
                if len(group.patterns) == 1
                else "|".join(f"(?:{p})" for p in group.patterns)
            )
            hosts = {"host_regex": pattern}
            label = "regex-host"
        else:
            # Last, so without a host condition it takes what no other server's routes
            # took; `default_host` says so when it serves no names of its own.
            if not alone and not group.patterns:
                hosts = {"default_host": True}
            label = next((p for p in group.patterns if "*" not in p), "default")
        label = _NAME_SAFE.sub("-", label.replace("*", "any")).strip("-") or "default"
        ctx = _Context(hosts, label, {}, {}, server.body_buffer or self.body_buffer, server.ssl)
        locations: list[Directive] = []
        for s in server.d.block or []:
            if (
                s.name == "location"
                and s.block is not None
                and s.args[:1]
                and s.args[0].startswith("@")
            ):
                ctx.named[s.args[0]] = s
        answered = False
        for s in server.d.block or []:
            name = s.name
            if name == "location" and s.block is not None:
                if not (s.args and s.args[0].startswith("@")):
                    locations.append(s)
                continue
            if answered:
                continue
            if name == "set" and s.args:
                ctx.set_variable(s)
            elif name == "if" and s.block is not None:
                if ctx.set_if(s):
                    self.conditional[id(s)] = s
                else:
                    self.if_routes(s, ctx, {})
            elif name == "return":
                body = self.answer(s)
                if body is not None:
                    self.add(ctx, "", {}, body)
                answered = True
            elif name == "rewrite":
                self.rewrite_route(s, ctx, {})
            elif name in ("listen", "server_name", "client_body_buffer_size"):
                if name == "listen":
                    self.ignore(s)
            elif name in _NOT_ROUTING:
                self.ignore(s)
            else:
                self.note(s, "server-level directive not translated")
        if answered:
            return  # the server answers every request before choosing a location
        covered = self.location_routes(locations, ctx)
        if not covered and hosts:
            self.add(ctx, "-no-location", {}, {"direct_response": {"status": 404}})
        for name, loc in ctx.named.items():
            if not any(name in json.dumps(r) for r in self.routes):
                self.note(
                    loc, f"named location {name} is not the target of any translated ngx.exec"
                )

    def add(self, ctx: _Context, what: str, match: dict[str, object], body: Route) -> None:
        full = {**ctx.hosts, **match}
        name = self.route_name(ctx.label, what)
        route: Route = {"name": name}
        if full:
            route["match"] = full
        route.update(body)
        self.routes.append(route)

    def route_name(self, label: str, what: str) -> str:
        base = _NAME_SAFE.sub("-", f"{label}{what}").strip("-") or "default"
        candidate, n = base, 2
        while candidate in self.route_names:
            candidate = f"{base}-{n}"
            n += 1
        self.route_names.add(candidate)
        return candidate

    # -- location selection --------------------------------------------------------------

    def location_routes(self, locations: list[Directive], ctx: _Context) -> bool:
        """Every location's routes in the order that gives nginx's choice. True when
        every path has a location (a `location /`)."""
        exact: list[tuple[str, Directive]] = []
        prefixes: list[tuple[str, bool, Directive]] = []  # (path, stops regexes, loc)
        regexes: list[tuple[str, Directive]] = []
        for loc in locations:
            args = loc.args
            if not args:
                self.note(loc, "location without a path")
            elif args[0] == "=" and len(args) == 2:
                exact.append((args[1], loc))
            elif args[0] in ("~", "~*") and len(args) == 2:
                pattern = _pcre(args[1])
                if args[0] == "~*":
                    pattern = f"(?i:{pattern})"
                if not _regex_ok(pattern):
                    self.note(loc, "not a regular expression Grayroute can read")
                    continue
                regexes.append((pattern, loc))
            elif args[0] == "^~" and len(args) == 2:
                prefixes.append((args[1], True, loc))
            elif len(args) == 1:
                prefixes.append((args[0], False, loc))
            else:
                self.note(loc, "location not understood")
        for path, loc in exact:
            self.location(loc, ctx, {"path_exact": path})
        # A prefix ending in "/" whose requests are proxied redirects the path without
        # the slash, unless a location is written for that path (nginx's auto_redirect).
        written = {p for p, _ in exact} | {p for p, _, _ in prefixes}
        for path, loc in [(p, loc) for p, _, loc in prefixes] + exact:
            proxied = any(s.name in _PROXY_PASSES for s in loc.block or [])
            if proxied and len(path) > 1 and path.endswith("/") and path[:-1] not in written:
                self.add(
                    ctx,
                    path[:-1] + "-slash",
                    {"path_exact": path[:-1]},
                    {"redirect": {"path": path}},
                )
                written.add(path[:-1])
        by_length = sorted(prefixes, key=lambda p: -len(p[0]))
        stoppers = [p for p, stops, _ in prefixes if stops]
        early = [
            (p, stops, loc)
            for p, stops, loc in by_length
            if stops or any(p.startswith(s) and p != s for s in stoppers)
        ]
        for path, stops, loc in early:
            if not stops:  # its requests still try the regex locations first
                for pattern, rloc in regexes:
                    self.location(rloc, ctx, {"path_regex": _within(path, pattern)})
            self.location(loc, ctx, {"path_prefix": path})
        for pattern, loc in regexes:
            self.location(loc, ctx, {"path_regex": pattern})
        for path, stops, loc in by_length:
            if (path, stops, loc) not in early:
                self.location(loc, ctx, {"path_prefix": path} if path != "/" else {})
        return any(p == "/" for p, _, _ in prefixes)

    def location(self, loc: Directive, ctx: _Context, region: dict[str, object]) -> None:
        """The routes of one location, for the paths `region` selects."""
        variables = dict(ctx.variables)
        body_buffer = ctx.body_buffer
        lua: dict[str, object] | None = None
        lua_lost = False
        proxy: Directive | None = None
        answer: Route | None = None
        rewrite: dict[str, str] | None = None
        sub = _Context(
            ctx.hosts,
            ctx.label + _path_label(loc),
            variables,
            ctx.named,
            body_buffer,
            ctx.ssl,
            list(ctx.conditional),
        )
        internal = False
        for s in loc.block or []:
            name = s.name
            if answer is not None and name in ("set", "if", "return", "rewrite"):
                continue  # after `return` the rewrite phase has ended
            if name == "set" and s.args:
                sub.set_variable(s)
            elif name == "if" and s.block is not None:
                if sub.set_if(s):
                    self.conditional[id(s)] = s
                else:
                    self.if_routes(s, sub, region)
            elif name == "return":
                answer = self.answer(s)
                if answer is None:
                    return
            elif name == "rewrite":
                got = self.rewrite_route(s, sub, region)
                if got is not None:
                    rewrite = got
                elif _covers(region, s.args[0] if s.args else "") and s.args[-1] in (
                    "permanent",
                    "redirect",
                ):
                    return  # every request of the location is redirected
            elif name in _LUA_HANDLERS:
                lua = self.lua_action(s, _LUA_HANDLERS[name], sub.label, None)
                lua_lost = lua_lost or lua is None
            elif name in _SET_HANDLERS:
                var = s.args[0].lstrip("$") if s.args else ""
                lua = self.lua_action(s, "set", sub.label, var)
                lua_lost = lua_lost or lua is None
            elif name == "proxy_pass":
                proxy = s
            elif name == "client_body_buffer_size" and s.args:
                body_buffer = s.args[0]
            elif name == "internal":
                internal = True
            elif name == "location":
                self.note(s, "nested locations are not translated")
            elif name in _NOT_ROUTING:
                self.ignore(s)
            else:
                self.note(s, "location directive not translated")
        if internal:
            # Only nginx itself may enter it (error_page, ngx.exec): clients get 404.
            self.add(sub, "", region, {"direct_response": {"status": 404}})
            return
        if answer is not None:
            self.add(sub, "", region, answer)
            return
        if lua_lost:
            self.note(loc, "not translated: its Lua routing could not be carried over")
            return
        if lua is not None:
            for d, name, _ in sub.conditional:
                if id(d) not in self.consumed:
                    self.consumed.add(id(d))
                    self.note(d, f"`if` setting ${name} before a script is not translated")
            body = self.finish_lua(lua, proxy, variables, ctx.named, loc, body_buffer)
            if body is not None:
                self.add(sub, "", region, body)
            return
        if proxy is None:
            self.note(loc, "location without proxy_pass, return or Lua routing")
            return
        sent = self.proxy_body(proxy, variables, region, rewrite is not None, sub)
        if sent is None:
            return
        if rewrite is not None:
            sent["regex_rewrite"] = rewrite
        self.add(sub, "", region, sent)

    # -- rewrite phase ---------------------------------------------------------------------

    def answer(self, d: Directive) -> Route | None:
        """`return CODE [TEXT]` / `return URL` as a route's own answer."""
        args = d.args
        text: str | None
        if len(args) == 1 and not args[0].isdigit():
            code, text = 302, args[0]
        elif args and args[0].isdigit() and len(args) <= 2:
            code, text = int(args[0]), (args[1] if len(args) == 2 else None)
        else:
            self.note(d, "return not understood")
            return None
        if code in _REDIRECTS:
            if text is None:
                self.note(d, f"return {code} without a URL")
                return None
            redirect = self.redirect_to(d, text)
            if redirect is None:
                return None
            if code != 301:
                redirect["status"] = code
            return {"redirect": redirect}
        if text is not None and "$" in text:
            self.note(d, "a returned text with variables is not translated")
            return None
        if not (200 <= code <= 599 or code == 444):
            self.note(d, f"return {code}: Grayroute answers 200-599 or 444")
            return None
        response: dict[str, object] = {"status": code}
        if text is not None and code not in (204, 304, 444):
            response["body"] = text
        return {"direct_response": response}

    def redirect_to(self, d: Directive, url: str) -> dict[str, object] | None:
        """A Location as nginx writes it -> the `redirect` keys that build it."""
        m = re.fullmatch(r"(https?)://([^/$:]+|\$host|\$http_host)(:\d+)?(.*)", url)
        redirect: dict[str, object] = {}
        rest = url
        if m is not None:
            redirect["scheme"] = m.group(1)
            host = m.group(2)
            if host == "$http_host":
                self.differ(
                    d,
                    "$http_host keeps the port the client wrote; Grayroute's "
                    "redirect uses the host without it",
                )
            elif host != "$host":
                redirect["host"] = host
            if m.group(3):
                redirect["port"] = int(m.group(3)[1:])
            rest = m.group(4)
        elif url.startswith("$scheme://"):
            self.note(d, "a redirect keeping $scheme is not translated")
            return None
        if rest in ("$request_uri", ""):
            if not rest:
                redirect["path"] = "/"
                redirect["strip_query"] = True
            return redirect
        if rest == "$uri":
            redirect["strip_query"] = True
            self.differ(
                d,
                "$uri is the decoded, normalised path; Grayroute sends the path "
                "as the client wrote it",
            )
            return redirect
        if rest == "$uri$is_args$args":
            return redirect
        if "$" in rest or not rest.startswith("/"):
            self.note(d, "a redirect target with variables is not translated")
            return None
        redirect["path"] = rest
        redirect["strip_query"] = True
        return redirect

    def rewrite_route(
        self, d: Directive, ctx: _Context, region: dict[str, object]
    ) -> dict[str, str] | None:
        """`rewrite REGEX REPLACEMENT [flag]`: a redirect route (permanent, redirect), or
        the path toward the upstream (break; returned as `regex_rewrite`)."""
        args = d.args
        if len(args) not in (2, 3):
            self.note(d, "rewrite not understood")
            return None
        pattern, replacement = _pcre(args[0]), args[1]
        flag = args[2] if len(args) == 3 else ""
        if not _regex_ok(pattern):
            self.note(d, "not a regular expression Grayroute can read")
            return None
        absolute = replacement.startswith(("http://", "https://", "$scheme"))
        if flag == "break" and not absolute:
            if "?" in replacement:
                self.note(d, "a rewrite that sets the query is not translated")
                return None
            if "$" in re.sub(r"\$[0-9]", "", replacement):
                self.note(d, "a rewrite with variables other than $1..$9 is not translated")
                return None
            self.differ(
                d,
                "nginx rewrites the decoded, normalised path ($uri); Grayroute "
                "the path as the client wrote it",
            )
            return {
                "pattern": _whole(pattern),
                "substitution": re.sub(r"\$([0-9])", r"\\\1", replacement),
            }
        if flag in ("permanent", "redirect") or absolute:
            status = 301 if flag == "permanent" else 302
            path_condition = _region_regex(region, pattern)
            if path_condition is None:
                self.note(d, "a redirect inside a regex location is not translated")
                return None
            target = replacement
            strip = target.endswith("?")
            target = target.rstrip("?")
            scheme_host: dict[str, object] = {}
            m = re.fullmatch(r"(https?)://([^/$:]+|\$host)(:\d+)?(/.*)?", target)
            if m is not None:
                scheme_host["scheme"] = m.group(1)
                if m.group(2) != "$host":
                    scheme_host["host"] = m.group(2)
                if m.group(3):
                    scheme_host["port"] = int(m.group(3)[1:])
                target = m.group(4) or "/"
            if not target.startswith("/") or "?" in target or "$" in re.sub(r"\$[0-9]", "", target):
                self.note(d, "a rewrite to this target is not translated")
                return None
            redirect: dict[str, object] = {
                **scheme_host,
                "regex_rewrite": {
                    "pattern": _whole(pattern),
                    "substitution": re.sub(r"\$([0-9])", r"\\\1", target),
                },
            }
            if status != 301:
                redirect["status"] = status
            if strip:
                redirect["strip_query"] = True
            self.add(ctx, "-rewrite", {"path_regex": path_condition}, {"redirect": redirect})
            return None
        self.note(
            d,
            f"rewrite {'with ' + flag if flag else 'without a flag'} searches the "
            "locations again; not translated",
        )
        return None

    def if_routes(self, d: Directive, ctx: _Context, region: dict[str, object]) -> None:
        """`if (COND) { return ...; }`: a route for the requests where COND holds."""
        cond = self.condition(d, ctx)
        if cond is None:
            return
        inner = [s for s in d.block or []]
        returns = [s for s in inner if s.name == "return"]
        others = [s for s in inner if s.name not in ("return",) and s.name not in _NOT_ROUTING]
        for s in inner:
            if s.name in _NOT_ROUTING:
                self.ignore(s)
        if not returns or others:
            what = others[0] if others else d
            self.note(what, "inside `if`, only `return` is translated")
            return
        if cond is True:
            body = self.answer(returns[0])
            if body is not None:
                self.add(ctx, "-if", region, body)
            return
        if cond is False:
            return
        body = self.answer(returns[0])
        if body is not None:
            self.add(ctx, "-if", {**region, **cond}, body)

    def parse_condition(self, d: Directive) -> tuple[str, str, str] | None:
        """`if ($var OP value)` -> (var, op, value); `if ($var)` -> (var, "", "")."""
        tokens = list(d.args)
        if tokens and tokens[-1] == ")":
            tokens.pop()
        elif tokens:
            tokens[-1] = tokens[-1][:-1] if tokens[-1].endswith(")") else tokens[-1]
        if tokens and tokens[0].startswith("("):
            tokens[0] = tokens[0][1:]
        if not tokens or tokens[0] == "":
            tokens = tokens[1:]
        var_m = _VAR.match(tokens[0]) if tokens else None
        if var_m is None or var_m.end() != len(tokens[0]) or len(tokens) not in (1, 3):
            self.note(d, "this condition is not translated")
            return None
        op, value = (tokens[1], tokens[2]) if len(tokens) == 3 else ("", "")
        return var_m.group(1).lower(), op, value

    def pin_condition(self, d: Directive, ctx: _Context) -> dict[str, object] | None:
        """The condition of `if (COND) { set ...; }` as pin conditions (`user_id` for a
        cookie or an argument rides along, for the route)."""
        parsed = self.parse_condition(d)
        if parsed is None:
            return None
        var, op, value = parsed
        if var.startswith(("cookie_", "arg_")):
            source = {"cookie": var[7:]} if var.startswith("cookie_") else {"query": var[4:]}
            if op == "=":
                if value == "":
                    self.note(d, "a condition that holds without a value is not translated")
                    return None
                return {"user_id": source, "users": [value]}
            if op in ("", "~", "~*"):
                pattern = "(?!0$)(?s:.+)" if op == "" else _pcre(value)
                if op == "~*":
                    pattern = f"(?i:{pattern})"
                if not _regex_ok(pattern) or _matches_empty(pattern):
                    self.note(d, "this condition is not translated (it holds without a value)")
                    return None
                return {"user_id": source, "user_pattern": _as_fullmatch(pattern)}
            self.note(d, f"`{op}` on ${var} is not translated (an absent value would hold)")
            return None
        if var == "remote_addr":
            cidr = _cidr_of(op, value)
            if cidr is None:
                self.note(d, "this condition on $remote_addr is not translated")
                return None
            return {"client_cidrs": [cidr]}
        got = self.condition(d, ctx)
        if isinstance(got, dict) and set(got) == {"headers"}:
            return got
        if got is not None:
            self.note(d, "a pin cannot hold on this condition")
        return None

    def condition(self, d: Directive, ctx: _Context) -> dict[str, object] | bool | None:
        parsed = self.parse_condition(d)
        if parsed is None:
            return None
        var, op, value = parsed
        if var == "scheme" and op in ("=", "!="):
            if ctx.ssl:
                self.note(d, "$scheme depends on the listening port; not translated")
                return None
            return (value == "http") == (op == "=")  # Grayroute serves plain HTTP here
        if var == "request_method":
            if op == "=" and re.fullmatch(r"[A-Z]+", value):
                return {"methods": [value]}
            m = re.fullmatch(r"\^?\(?([A-Z|]+)\)?\$?", value)
            if op == "~" and m is not None and value.startswith("^") and value.endswith("$"):
                return {"methods": m.group(1).split("|")}
            self.note(d, "this condition on the method is not translated")
            return None
        if var.startswith("http_") and var != "http_host":
            header = "-".join(p.capitalize() for p in var[5:].split("_"))
            if op == "":
                regex = "^(?!0$)."  # nginx: true unless empty or "0"
            elif op == "=":
                regex = f"^{re.escape(value)}$"
            elif op in ("~", "~*"):
                regex = _pcre(value)
                if op == "~*":
                    regex = f"(?i){regex}"
                if not _regex_ok(regex):
                    self.note(d, "not a regular expression Grayroute can read")
                    return None
            else:
                self.note(d, f"`{op}` on a header is not translated (an absent header would hold)")
                return None
            if _matches_empty(regex):
                self.note(d, "a condition that holds for an absent header is not translated")
                return None
            return {"headers": {header: regex}}
        self.note(d, f"a condition on ${var} is not translated")
        return None

    # -- proxy_pass ------------------------------------------------------------------------

    def proxy_body(
        self,
        proxy: Directive,
        variables: dict[str, str],
        region: dict[str, object],
        rewritten: bool,
        ctx: _Context | None = None,
    ) -> Route | None:
        url = proxy.args[0] if proxy.args else ""
        m = re.match(r"^(https?)://([^/]+)(/.*)?$", url)
        if m is None:
            var = _VAR.match(url)
            if var is not None and var.end() == len(url):
                return self.variable_body(var.group(1), variables, proxy, ctx)
            self.note(proxy, "proxy_pass target not understood")
            return None
        if m.group(1) == "https":
            self.note(proxy, "TLS to the upstream is not translated")
            return None
        host, uri = m.group(2), m.group(3)
        var = _VAR.match(host)
        if var is not None:
            if host[var.end() :]:
                self.note(proxy, "proxy_pass with a variable and more is not translated")
                return None
            if uri not in (None, "$request_uri"):
                self.note(proxy, "a URI part after a variable upstream is not translated")
                return None
            return self.variable_body(var.group(1), variables, proxy, ctx)
        name = self.upstream_named(host)
        body: Route = {"to": name}
        if uri and not rewritten and uri != "$request_uri":
            if "$" in uri:
                self.note(proxy, "a URI part with variables is not translated")
                return None
            matched = region.get("path_prefix", region.get("path_exact"))
            if "path_regex" in region:
                self.note(proxy, "a URI part in a regex location is not translated")
                return None
            if matched is None:
                region["path_prefix"] = "/"
            body["prefix_rewrite"] = uri
            self.differ(
                proxy,
                "nginx replaces the prefix in the decoded, normalised path and "
                "escapes it again; Grayroute in the path as the client wrote it",
            )
        return body

    def upstream_named(self, host: str) -> str:
        """The upstream for `HOST[:PORT]` in a proxy_pass or a variable's value."""
        if host in self.upstreams:
            return host
        addr = host if ":" in host else host + ":80"
        name = _NAME_SAFE.sub("-", addr)
        self.upstreams.setdefault(name, {"endpoints": [addr]})
        return name

    def value_upstream(self, value: str, where: Directive) -> str | None:
        """A variable's value as proxy_pass reads it: an upstream name or an address."""
        m = re.fullmatch(r"(?:http://)?([A-Za-z0-9_.-]+(?::\d+)?)/?", value)
        if m is None:
            self.note(where, f"value {value!r} names no upstream")
            return None
        return self.upstream_named(m.group(1))

    def variable_body(
        self, var: str, variables: dict[str, str], proxy: Directive, ctx: _Context | None = None
    ) -> Route | None:
        """proxy_pass http://$var: from `set` (with `if`s around), split_clients or a map
        (chains followed)."""
        sets = [(d, value) for d, name, value in (ctx.conditional if ctx else []) if name == var]
        if sets and ctx is not None:
            return self.conditional_body(var, sets, variables, proxy, ctx)
        if var in variables:
            value = variables[var]
            if "$" in value:
                return self.variable_body(value.lstrip("$"), {}, proxy)
            if value == "":
                return {"direct_response": {"status": 500}}
            up = self.value_upstream(value, proxy)
            return None if up is None else {"to": up}
        if var in self.splits:
            return self.split_body(self.splits[var], {}, "", proxy)
        if var in self.maps:
            return self.map_body(self.maps[var], proxy)
        self.note(proxy, f"${var} is not set by set, map, split_clients or Lua in this config")
        return None

    def conditional_body(
        self,
        var: str,
        sets: list[tuple[Directive, str]],
        variables: dict[str, str],
        proxy: Directive,
        ctx: _Context,
    ) -> Route | None:
        """`set $var A; if (COND) { set $var B; } ...`: pins for the `if`s, the last one
        first (nginx runs them all, the last that holds wins), then what A gives."""
        if var in variables or var in self.maps or var in self.splits:
            base = self.variable_body(var, variables, proxy)
        else:
            base = {"direct_response": {"status": 500}}  # nginx: an empty upstream
        if base is None:
            return None
        pins: list[dict[str, object]] = []
        source: object = None
        for d, value in reversed(sets):
            self.consumed.add(id(d))
            cond = self.pin_condition(d, ctx)
            if cond is None:
                return None
            up = self.value_upstream(value, d) if value and "$" not in value else None
            if up is None:
                self.note(d, f"set ${var} {value!r} inside `if` is only translated for an upstream")
                return None
            given = cond.pop("user_id", None)
            if given is not None:
                if source is not None and given != source:
                    self.note(d, "`if`s on two different cookies or arguments are not translated")
                    return None
                source = given
            pins.append({"to": up, **cond})
        body: Route = {}
        base_source = base.get("user_id")
        if source is not None:
            if base_source is not None and base_source != [source]:
                self.note(proxy, "the `if`s and the map read different user IDs; not translated")
                return None
            body["user_id"] = [source]
        elif base_source is not None:
            body["user_id"] = base_source
        base_pins = base.get("pins", [])
        body["pins"] = pins + (base_pins if isinstance(base_pins, list) else [])
        body.update({k: v for k, v in base.items() if k not in ("pins", "user_id")})
        return body

    def split_body(
        self, split: _Split, through: dict[str, str], default: str, proxy: Directive
    ) -> Route | None:
        buckets: list[dict[str, str]] = []
        for percent, value in split.parts:
            mapped = through.get(value.lower(), default) if through else value
            upstream = self.value_upstream(mapped, split.where) if mapped else None
            if upstream is None:
                self.note(split.where, f"split_clients value {value!r} names no upstream")
                return None
            buckets.append({percent: upstream})
        spec: dict[str, object] = {"key": split.key, "buckets": buckets}
        table = SplitClients.build(split.parts)
        if not table.has_star and sum(table.percents) < 10000:
            fallback = default if through else ""
            if fallback:
                up = self.value_upstream(fallback, split.where)
                if up is None:
                    return None
                spec["unmatched"] = up
            else:
                self.note(
                    split.where,
                    "hashes above the last part get an empty value in nginx (a 500); add "
                    "`unmatched:` to the route",
                )
                return None
        return {"split_clients": spec}

    def map_body(self, m: _Map, proxy: Directive) -> Route | None:
        source = _VAR.match(m.source)
        if source is None or source.end() != len(m.source):
            self.note(m.where, f"map source {m.source} is not a single variable")
            return None
        src = source.group(1).lower()
        if src in self.splits:
            through = {k.lower(): v for k, v in m.entries if not k.startswith("~")}
            if len(through) != len(m.entries):
                self.note(m.where, "regex keys over a split_clients value are not translated")
                return None
            return self.split_body(self.splits[src], through, m.default, proxy)
        if m.hostnames:
            self.note(m.where, f"a `hostnames` map on ${src} is not translated")
            return None
        # What the requests no key takes get: an upstream, a split, or nginx's 500.
        default = m.default
        if default.startswith("$"):
            rest = self.variable_body(default.lstrip("$"), {}, proxy)
        elif default == "":
            rest = {"direct_response": {"status": 500}}
        else:
            up = self.value_upstream(default, m.where)
            rest = None if up is None else {"to": up}
        if rest is None:
            return None
        if not m.entries:
            return rest
        pins: list[dict[str, object]] = []
        user_id: dict[str, str] | None = None
        if src.startswith("cookie_"):
            user_id = {"cookie": src[7:]}
            self.differ(
                m.where,
                f"${src} keeps double quotes around a value and finds the cookie in any "
                "Cookie header; the `cookie:` source removes the quotes and reads the "
                "first Cookie header",
            )
        elif src.startswith("arg_"):
            user_id = {"query": src[4:]}
            self.differ(
                m.where,
                f"${src} is not URL-decoded in nginx, Grayroute's query "
                "source is: a value with %XX escapes may route differently",
            )
        elif not src.startswith("http_") or src == "http_host":
            self.note(m.where, f"a map on ${src} is not translated")
            return None
        header = "-".join(p.capitalize() for p in src[5:].split("_")) if user_id is None else ""
        exact_pins: list[dict[str, object]] = []
        regex_pins: list[dict[str, object]] = []
        for key, value in m.entries:
            if value.startswith("$"):
                self.note(
                    m.where, f"map value {value} (a variable) is only translated as the default"
                )
                return None
            up = self.value_upstream(value, m.where) if value else None
            if up is None:
                self.note(m.where, f"map value {value!r} names no upstream")
                return None
            if key.startswith("~"):
                pattern = _pcre(key[2:] if key.startswith("~*") else key[1:])
                if key.startswith("~*"):
                    pattern = f"(?i:{pattern})"
                if not _regex_ok(pattern):
                    self.note(
                        m.where, f"map key {key}: not a regular expression Grayroute can read"
                    )
                    return None
                if _matches_empty(pattern):
                    self.note(
                        m.where,
                        f"map key {key} holds for an empty value (an absent "
                        "cookie, header or argument): not translated",
                    )
                    return None
                if user_id is None:
                    regex_pins.append({"to": up, "headers": {header: pattern}})
                else:
                    regex_pins.append({"to": up, "user_pattern": _as_fullmatch(pattern)})
            else:
                if key == "":
                    self.note(m.where, 'map key "" (an absent value) is not translated')
                    return None
                if user_id is None:
                    exact_pins.append({"to": up, "headers": {header: f"(?i)^{re.escape(key)}$"}})
                elif key.lower() == key.upper():
                    exact_pins.append({"to": up, "users": [key]})
                else:  # nginx compares map keys without regard to case
                    exact_pins.append({"to": up, "user_pattern": f"(?i){re.escape(key)}"})
        pins = exact_pins + regex_pins  # nginx: exact keys first, then regexes in order
        body: Route = {}
        if user_id is not None:
            body["user_id"] = [user_id]
        body["pins"] = pins
        body.update(rest)
        return body

    # -- Lua ---------------------------------------------------------------------------

    def lua_action(
        self, d: Directive, phase: str, label: str, set_var: str | None
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
                return None
        elif d.name.endswith("_by_lua_block") or d.name == "set_by_lua":
            code = d.lua if d.lua is not None else (d.args[1] if len(d.args) > 1 else "")
            if self.scripts_dir is None:
                self.note(d, "inline Lua: give --scripts-dir to write it to a file")
                return None
            path = os.path.join(self.scripts_dir, f"{_NAME_SAFE.sub('-', label)}-{phase}.lua")
            self.scripts[path] = _dedent(code).strip("\n") + "\n"
            action["file"] = path
        if set_var is not None:
            action["var"] = set_var
        return action

    def finish_lua(
        self,
        action: dict[str, object],
        proxy: Directive | None,
        variables: dict[str, str],
        named: dict[str, Directive],
        loc: Directive,
        body_buffer: str | None,
    ) -> Route | None:
        lua: dict[str, object] = {"file": action["file"]}
        if action["phase"] != "rewrite":
            lua["phase"] = action["phase"]
        mapping: dict[str, str] = {}
        default: str | None = None
        var = action.get("var")
        if proxy is not None:
            url = proxy.args[0] if proxy.args else ""
            target = _VAR.match(url.removeprefix("http://"))
            if target is not None and target.end() == len(url.removeprefix("http://")):
                var = var or target.group(1)
                if target.group(1) != var:
                    self.note(proxy, f"proxy_pass uses ${target.group(1)}, the script sets ${var}")
                    return None
            else:
                body = self.proxy_body(proxy, {}, {}, False)
                if body is None or "to" not in body or len(body) != 1:
                    self.note(proxy, "only a plain upstream is translated beside a script")
                    return None
                default = str(body["to"])  # the script only exec's or exits; the rest goes here
        if action["phase"] != "set":
            if var is None:
                var = "backend"
            if var != "backend":
                lua["var"] = var
        # Every `set` before the script is a variable it may read; the decision's preset
        # is what a request keeps when the script leaves it alone.
        presets = {k: v for k, v in variables.items() if k != var or v != ""}
        if presets:
            lua["variables"] = presets
        code = self.script_text(str(lua["file"]), loc)
        for name, nl in named.items():
            if code is not None and name not in code:
                continue
            for s in nl.block or []:
                if s.name == "proxy_pass":
                    body = self.proxy_body(s, {}, {}, False)
                    if body is not None and "to" in body and len(body) == 1:
                        mapping[name] = str(body["to"])
                    else:
                        self.note(s, f"{name}: only a plain upstream is translated")
        if mapping:
            lua["map"] = mapping
        if default is not None:
            lua["default"] = default
        if body_buffer is not None:
            size = _size(body_buffer)
            if _bytes(size) != DEFAULT_BODY_BUFFER_SIZE:  # the rule file's (nginx's) default
                lua["client_body_buffer_size"] = size
        return {"lua": lua}

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
        for name, spec in self.upstreams.items():
            out.append(f"  {_y(name)}:")
            for key, value in spec.items():
                if isinstance(value, list):
                    out.append(f"    {key}: [{', '.join(_y(e) for e in value)}]")
                else:
                    out.append(f"    {key}: {_y(value)}")
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


def _path_label(loc: Directive) -> str:
    path = loc.args[-1] if loc.args else ""
    if loc.args and loc.args[0] in ("~", "~*"):
        return "-regex"
    if loc.args and loc.args[0] == "=":
        return "-exact" + ("" if path == "/" else path)
    return "" if path == "/" else path


def _whole(pattern: str) -> str:
    """nginx's rewrite replaces the whole path when `pattern` is found in it."""
    if pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern
    return f"^(?s:.*?)(?:{pattern})(?s:.*)$"


def _region_regex(region: dict[str, object], pattern: str) -> str | None:
    """A path regex for the requests of `region` in which `pattern` is found."""
    if "path_prefix" in region:
        return _within(str(region["path_prefix"]), pattern)
    if "path_exact" in region:
        exact = str(region["path_exact"])
        return f"^{re.escape(exact)}$" if re.search(pattern, exact) else "(?!)"
    if "path_regex" in region:
        return f"^(?=.*?(?:{region['path_regex']})).*?(?:{pattern})"
    return pattern


def _cidr_of(op: str, value: str) -> str | None:
    """`$remote_addr = 10.1.2.3` or `~ ^10\\.1\\.` as a network (only these forms)."""
    if op == "=" and re.fullmatch(r"\d+\.\d+\.\d+\.\d+", value):
        return value + "/32"
    m = re.fullmatch(r"\^((?:\d{1,3}\\\.){1,3})", value)
    if op == "~" and m is not None:
        octets = m.group(1).split("\\.")[:-1]
        return ".".join(octets + ["0"] * (4 - len(octets))) + f"/{8 * len(octets)}"
    return None


def _as_fullmatch(pattern: str) -> str:
    """A `user_pattern` (matched whole) for a map's regex key (searched, as nginx does)."""
    if pattern.startswith("^") and "|" not in pattern:
        body = pattern[1:]
        if body.endswith("$") and not body.endswith("\\$"):
            return body[:-1]
        return body + "(?s:.*)"
    return f"(?s:.*?)(?:{pattern})(?s:.*)"


def _covers(region: dict[str, object], pattern: str) -> bool:
    """A rewrite `pattern` certainly holds for every path of `region` (`^/p/(.*)$` in
    `location /p/`, `^` or `.*` anywhere)."""
    rest = pattern[1:] if pattern.startswith("^") else pattern
    prefix = str(region.get("path_prefix", ""))
    if "path_exact" in region or "path_regex" in region:
        return False
    if rest.startswith(re.escape(prefix)):
        rest = rest[len(re.escape(prefix)) :]
    elif rest.startswith(prefix):
        rest = rest[len(prefix) :]
    else:
        return False
    return rest in ("", "$", ".*", ".*$", "(.*)", "(.*)$")


def _duration(text: str) -> str:
    """nginx's `30s`, `1m`, `500ms`, `10` (seconds) as a rule-file duration."""
    return text if re.fullmatch(r"\d+(ms|s|m|h)", text) else f"{text}s" if text.isdigit() else text


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)(KiB|MiB|GiB)?", size)
    if m is None:
        return -1
    return int(m.group(1)) * {None: 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[m.group(2)]


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
    directives = load_nginx(path)
    importer = _Importer(scripts_dir)
    importer.run(directives)
    return ImportResult(
        importer.yaml(path),
        importer.untranslated,
        importer.ignored,
        importer.scripts,
        importer.differences,
    )


def run_import(
    conf: str, output: str = "-", scripts_dir: str = "scripts", partial: bool = False
) -> int:
    """`grayroute import-nginx`: write the rule file (and extracted scripts), report the
    rest on stderr. Exit status 0; 1 when the configuration cannot be read, or when
    something that routes was not translated and `partial` is not given."""
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
    if result.untranslated and not partial:
        print(
            f"grayroute import-nginx: {len(result.untranslated)} directive(s) that decide where "
            "requests go were not translated (listed above); the rule file would route "
            "those requests otherwise. Translate them by hand, or pass --partial to accept "
            "the file as it is.",
            file=sys.stderr,
        )
        return 1
    print("next: grayroute check " + ("RULES" if output == "-" else output), file=sys.stderr)
    return 0
