"""The two route actions that come from nginx: `lua:` and `split_clients:`.

Both hand the decision to lua_compat (which knows nothing of the router): this module
checks their keys for validate.py, prepares them for compile.py, and is what decide()
calls for such a route (`CompiledRoute.action`):

    lua:                               a routing script, run on LuaJIT as nginx runs it
      file: scripts/gray.lua           relative to the rule file
      phase: rewrite                   rewrite (default) | access | set
      var: backend                     rewrite/access: the variable holding the decision
      variables: {uid_seen: ""}        more user variables (nginx `set $name "";`)
      map: {"@canary": orders-v2}      value or ngx.exec target -> upstream, where the
                                       names differ (an upstream's own name needs none)
      default: orders-v1               the script chose nothing (unset, empty, unmapped)
      fallback: orders-v1              the script failed (error, CPU budget); else 500
      cpu_budget: 10ms                 per request
      client_body_buffer_size: 8KiB    nginx's: bodies of 1.25x this or more are "in a
                                       file" (ngx.req.get_body_data() returns nil)

    split_clients:                     nginx split_clients, bit-exact
      key: "${remote_addr}AAA"         nginx variables ($http_*, $cookie_*, $arg_*, ...)
      buckets:                         in order; a percentage (two decimals) or "*"
        - "0.5%": orders-v2
        - "*": orders-v1
      unmatched: orders-v1             hashes no bucket takes (nginx: an empty value);
                                       required when the buckets add up to less than 100%
                                       and have no "*"

A script's outcome becomes a Decision: the upstream (through `map`), or an answer the
proxy gives itself (`Decision.status`): ngx.exit(N >= 200) -> N, ngx.redirect ->
301/302/303/307/308 with `location`, ngx.exit(444) -> 444 (close the connection), a
failure -> `fallback` or 500; an empty decision -> `default` or 500 (nginx's "invalid URL
prefix"); a name no upstream has -> `default` or 502 (nginx's "no resolver").
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from lua_compat.ngx import DEFAULT_BODY_BUFFER_SIZE, Effect, EffectKind, NgxRequest
from lua_compat.split_clients import KeyTemplate, SplitClients, SplitClientsError
from router.rules.decide import AnswerDecision, Decision
from router.rules.hashing import wire_bytes
from router.rules.load import MapNode, ScalarNode, SeqNode
from router.rules.model import LuaAction, SplitClientsMode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lua_compat.runtime import LuaScript
    from router.rules.compile import CompiledRoute
    from router.rules.decide import RequestView
    from router.rules.load import Node
    from router.rules.model import Route, RuleSet
    from router.rules.validate import _Validator

__all__ = [
    "LUA_KEYS",
    "SPLIT_CLIENTS_KEYS",
    "LuaDecision",
    "compile_action",
    "declare_shared_dicts",
    "validate_lua",
    "validate_shared_dicts",
    "validate_split_clients",
]

LUA_KEYS = (
    "file",
    "phase",
    "var",
    "variables",
    "map",
    "default",
    "fallback",
    "cpu_budget",
    "client_body_buffer_size",
)
SPLIT_CLIENTS_KEYS = ("key", "buckets", "unmatched")
PHASES = ("rewrite", "access", "set")
DEFAULT_CPU_BUDGET: Final = 0.010
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- validation --------------------------------------------------------------------------


def validate_shared_dicts(v: _Validator, node: Node) -> tuple[tuple[str, int], ...] | None:
    """`lua_shared_dicts: {NAME: SIZE}` (nginx `lua_shared_dict NAME SIZE;`)."""
    if not isinstance(node, MapNode):
        v.error(
            node,
            "lua_shared_dicts",
            f"expected a mapping, found {node.kind}",
            "write `NAME: SIZE` lines, e.g. `gray: 1MiB`",
        )
        return None
    result: list[tuple[str, int]] = []
    ok = True
    for name, entry in node.items.items():
        size = v.size(entry.value, _join("lua_shared_dicts", name))
        if size is None:
            ok = False
        else:
            result.append((name, size))
    return tuple(result) if ok else None


def _initial_value(node: Node) -> str:
    """A user variable's initial value as nginx's `set` would have it: the text written
    (a number as written, `~`/null as empty)."""
    if not isinstance(node, ScalarNode) or node.value is None:
        return ""
    return node.value if isinstance(node.value, str) else node.text


def validate_lua(v: _Validator, node: Node, path: str) -> LuaAction | None:
    fields = v.mapping(
        node,
        path,
        LUA_KEYS,
        required=("file",),
        example="write `file: scripts/gray.lua` under `lua:`",
    )
    if fields is None:
        return None
    ok = True
    phase = "rewrite"
    if "phase" in fields:
        got = v.text(fields["phase"].value, _join(path, "phase"), "phase")
        if got is not None and got not in PHASES:
            v.error(
                fields["phase"].value,
                _join(path, "phase"),
                f"unknown phase `{got}`",
                "write rewrite, access or set (as in rewrite_by_lua, access_by_lua, set_by_lua)",
            )
            got = None
        ok = ok and got is not None
        phase = got or phase
    var: str | None = None if phase == "set" else "backend"
    if "var" in fields:
        var_node = fields["var"].value
        got = v.text(var_node, _join(path, "var"), "variable name")
        if got is not None:
            got = got.lstrip("$")
            if not _VAR_NAME.match(got):
                v.error(
                    var_node,
                    _join(path, "var"),
                    f"`{got}` is not a variable name",
                    "letters, digits and _ , e.g. backend",
                )
                got = None
            elif phase == "set":
                v.error(
                    var_node,
                    _join(path, "var"),
                    "a set-phase script returns its decision",
                    "remove `var` (the value the script returns is the decision)",
                )
                got = None
        ok = ok and got is not None
        var = got if got is not None else var
    variables: list[tuple[str, str]] = []
    if "variables" in fields:
        vnode = fields["variables"].value
        if isinstance(vnode, MapNode):
            for name, entry in vnode.items.items():
                text = _initial_value(entry.value)
                if not _VAR_NAME.match(name.lstrip("$")):
                    v.error(
                        entry.key,
                        _join(_join(path, "variables"), name),
                        f"`{name}` is not a variable name",
                        "letters, digits and _",
                    )
                    ok = False
                    continue
                variables.append((name.lstrip("$").lower(), text))
        else:
            v.error(
                vnode,
                _join(path, "variables"),
                f"expected a mapping, found {vnode.kind}",
                'write `NAME: ""` lines, as nginx `set $NAME "";`',
            )
            ok = False
    mapping: list[tuple[str, str]] = []
    if "map" in fields:
        mnode = fields["map"].value
        if isinstance(mnode, MapNode):
            for written, entry in mnode.items.items():
                up = v.upstream_ref(entry.value, _join(_join(path, "map"), written))
                ok = ok and up is not None
                if up is not None:
                    mapping.append((written, up))
        else:
            v.error(
                mnode,
                _join(path, "map"),
                f"expected a mapping, found {mnode.kind}",
                'write `VALUE: UPSTREAM` lines, e.g. `"@canary": orders-v2`',
            )
            ok = False
    default = fallback = None
    if "default" in fields:
        default = v.upstream_ref(fields["default"].value, _join(path, "default"))
        ok = ok and default is not None
    if "fallback" in fields:
        fallback = v.upstream_ref(fields["fallback"].value, _join(path, "fallback"))
        ok = ok and fallback is not None
    budget = DEFAULT_CPU_BUDGET
    if "cpu_budget" in fields:
        got_budget = v.duration(fields["cpu_budget"].value, _join(path, "cpu_budget"))
        ok = ok and got_budget is not None
        budget = got_budget or budget
    buffer_size = DEFAULT_BODY_BUFFER_SIZE
    if "client_body_buffer_size" in fields:
        got_size = v.size(
            fields["client_body_buffer_size"].value, _join(path, "client_body_buffer_size")
        )
        ok = ok and got_size is not None
        buffer_size = got_size if got_size is not None else buffer_size
    file_node = fields["file"].value
    file = v.text(file_node, _join(path, "file"), "script file")
    if file is None:
        return None
    resolved = file if os.path.isabs(file) else os.path.join(os.path.dirname(v.file), file)
    try:
        with open(resolved, encoding="utf-8", errors="surrogateescape") as f:
            source = f.read()
    except OSError as exc:
        v.error(
            file_node,
            _join(path, "file"),
            f"cannot read {resolved}: {exc.strerror}",
            "the path is relative to the rule file",
        )
        return None
    # An upstream the script names in a string is one it may pick (`ngx.var.backend =
    # "orders-v2"`): it is used, as those of `map`, `default` and `fallback` are.
    from lua_compat.script_text import string_literals

    if v.known_upstreams is not None:
        v.used_upstreams.update(s for s in string_literals(source) if s in v.known_upstreams)
    from lua_compat.runtime import LuaCompileError, default_runtime, lua_available

    reason = lua_available()
    if reason is not None:
        v.error(
            file_node,
            _join(path, "file"),
            f"Lua routes cannot run here: {reason}",
            "pip install lupa (it brings LuaJIT 2.1)",
        )
        return None
    try:
        default_runtime().compile(
            source, file, phase=phase, decision=var, variables=dict(variables), budget=budget
        )
    except LuaCompileError as exc:
        v.error(
            file_node,
            _join(path, "file"),
            f"the script does not compile: {exc}",
            "fix the script; it must load in LuaJIT 2.1 as in nginx",
        )
        return None
    if not ok:
        return None
    return LuaAction(
        file,
        resolved,
        source,
        phase,
        var,
        tuple(variables),
        tuple(mapping),
        default,
        fallback,
        budget,
        buffer_size,
    )


def validate_split_clients(v: _Validator, node: Node, path: str) -> SplitClientsMode | None:
    fields = v.mapping(
        node,
        path,
        SPLIT_CLIENTS_KEYS,
        required=("key", "buckets"),
        example='write `key: "$cookie_uid"` and `buckets:` under it',
    )
    if fields is None:
        return None
    ok = True
    key_node = fields["key"].value
    key = v.text(key_node, _join(path, "key"), "key")
    if key is not None:
        try:
            KeyTemplate.parse(key)
        except SplitClientsError as exc:
            v.error(
                key_node,
                _join(path, "key"),
                str(exc),
                'write nginx variables, e.g. "${remote_addr}AAA" or "$cookie_uid"',
            )
            key = None
    ok = ok and key is not None
    bnode = fields["buckets"].value
    example = 'write `- "0.5%": UPSTREAM` lines and end with `- "*": UPSTREAM`'
    buckets: list[tuple[str, str]] = []
    if not isinstance(bnode, SeqNode) or not bnode.items:
        v.error(bnode, _join(path, "buckets"), "expected a list of buckets", example)
        return None
    for i, item in enumerate(bnode.items):
        ipath = f"{_join(path, 'buckets')}[{i}]"
        if not isinstance(item, MapNode) or len(item.items) != 1:
            v.error(item, ipath, "a bucket is one `PERCENT: UPSTREAM` pair", example)
            ok = False
            continue
        ((percent, entry),) = item.items.items()
        up = v.upstream_ref(entry.value, _join(ipath, percent))
        ok = ok and up is not None
        if up is not None:
            buckets.append((percent, up))
    table: SplitClients[str] | None = None
    if ok:
        try:
            table = SplitClients.build(buckets)
        except SplitClientsError as exc:
            v.error(
                bnode,
                _join(path, "buckets"),
                str(exc),
                "percentages have at most two decimals, none is 0%, together at most 100%",
            )
            ok = False
    unmatched = None
    if "unmatched" in fields:
        unmatched = v.upstream_ref(fields["unmatched"].value, _join(path, "unmatched"))
        ok = ok and unmatched is not None
    elif table is not None and not table.has_star and sum(table.percents) < 10000:
        total = Decimal(sum(table.percents)) / 100
        v.error(
            node,
            path,
            f'the buckets cover {total:g}% and have no "*": nginx gives the '
            "other users an empty value",
            'add `- "*": UPSTREAM` or `unmatched: UPSTREAM`',
        )
        ok = False
    if not ok or key is None:
        return None
    return SplitClientsMode(key, tuple(buckets), unmatched)


# -- per request ---------------------------------------------------------------------------


def _ngx_request(view: RequestView, body_buffer_size: int) -> NgxRequest:
    """The request as nginx would see it, from what the proxy (or explain) gave the rules.

    Views built by request_view carry every header as received (`raw_headers`: the
    snapshot asks for them whenever an action reads a header); a view built by hand
    without them gives its `headers`, one value each.
    """
    raw = view.raw_headers
    headers: Sequence[tuple[bytes, bytes]]
    if raw is None:
        headers = [(k.encode("latin-1"), wire_bytes(v)) for k, v in view.headers.items()]
        if view.host and "host" not in view.headers:
            headers.append((b"host", wire_bytes(view.host)))
    else:
        headers = raw
    target = view.path if not view.query else f"{view.path}?{view.query}"
    return NgxRequest(
        wire_bytes(view.method),
        wire_bytes(target),
        headers,
        view.client_ip.encode("latin-1"),
        view.body,
        body_complete=view.body_complete,
        body_buffer_size=body_buffer_size,
    )


_CACHED_VALUES = 256  # decisions per script remembered by value (reason strings built once)


@dataclass(frozen=True, slots=True)
class _LuaRoute:
    script: LuaScript
    action: LuaAction
    upstreams: frozenset[str]
    mapping: dict[str, str]
    by_value: dict[tuple[str, str | None], tuple[str | None, str, int]]

    def __call__(
        self, route: CompiledRoute, view: RequestView, user_id: str | None, source: str | None
    ) -> Decision:
        effect = self.script.run(
            _ngx_request(view, self.action.client_body_buffer_size), time.time()
        )
        kind = effect.kind
        if (kind == EffectKind.VALUE or kind == EffectKind.EXEC) and not effect.request_headers:
            key = (kind, effect.value)
            known = self.by_value.get(key)
            if known is None:
                d = self._decide(route, effect, user_id, source)
                if len(self.by_value) < _CACHED_VALUES:
                    self.by_value[key] = (d.upstream, d.reason, d.status)
                return d
            upstream, reason, status = known
            return LuaDecision(route.name, upstream, user_id, source, reason, status)
        d = self._decide(route, effect, user_id, source)
        if effect.request_headers:
            d.request_headers = effect.request_headers
        return d

    def _decide(
        self, route: CompiledRoute, effect: Effect, user_id: str | None, source: str | None
    ) -> LuaDecision:
        a = self.action
        kind = effect.kind
        name = route.name
        if kind == EffectKind.VALUE or kind == EffectKind.EXEC:
            value = effect.value
            what = f"ngx.exec({value})" if kind == EffectKind.EXEC else f"${a.var} = {value!r}"
            if a.phase == "set":
                what = f"set_by_lua returned {value!r}"
            upstream = self.mapping.get(value) if value is not None else None
            if upstream is None and value in self.upstreams:
                upstream = value
            if upstream is not None:
                return _decision(name, upstream, user_id, source, f"lua {a.file}: {what}")
            if a.default is not None:
                return _decision(
                    name, a.default, user_id, source, f"lua {a.file}: {what} -> default"
                )
            status = 500 if not value else 502
            return _decision(
                name, None, user_id, source, f"lua {a.file}: {what} names no upstream", status
            )
        if kind == EffectKind.ERROR:
            if a.fallback is not None:
                return _decision(
                    name,
                    a.fallback,
                    user_id,
                    source,
                    f"lua {a.file} failed ({effect.error}) -> fallback",
                )
            return _decision(
                name, None, user_id, source, f"lua {a.file} failed: {effect.error}", 500
            )
        if kind == EffectKind.REDIRECT:
            d = _decision(
                name,
                None,
                user_id,
                source,
                f"lua {a.file}: ngx.redirect({effect.value}, {effect.status})",
                effect.status,
            )
            d.location = effect.value
            return d
        status = 444 if kind == EffectKind.CLOSE else effect.status
        d = _decision(name, None, user_id, source, f"lua {a.file}: ngx.exit({status})", status)
        d.body = effect.body
        d.response_headers = effect.response_headers
        return d


# A Lua route's decision may answer the request itself and change request headers.
LuaDecision = AnswerDecision


def _decision(
    route: str,
    upstream: str | None,
    user_id: str | None,
    source: str | None,
    reason: str,
    status: int = 0,
) -> LuaDecision:
    return LuaDecision(route, upstream, user_id, source, reason, status)


@dataclass(frozen=True, slots=True)
class _SplitClientsRoute:
    key: KeyTemplate
    table: SplitClients[str]
    reasons: tuple[str, ...]
    unmatched: str
    unmatched_reason: str

    def __call__(
        self, route: CompiledRoute, view: RequestView, user_id: str | None, source: str | None
    ) -> Decision:
        key = self.key.evaluate(_ngx_request(view, DEFAULT_BODY_BUFFER_SIZE))
        i = self.table.index(key)
        if i is None:
            return Decision(route.name, self.unmatched, user_id, source, self.unmatched_reason)
        return Decision(route.name, self.table.values[i], user_id, source, self.reasons[i])


def compile_action(ruleset: RuleSet, route: Route) -> tuple[object, bool, frozenset[str], bool]:
    """(action, reads_body, header names it reads, wants every header) for decide()."""
    if route.split_clients is not None:
        mode = route.split_clients
        table = SplitClients.build(mode.buckets)
        key = KeyTemplate.parse(mode.key)
        shown = ", ".join(f"{p} {u}" for p, u in mode.buckets)
        reasons = tuple(f"split_clients {mode.key} -> {u} ({p}; {shown})" for p, u in mode.buckets)
        unmatched = mode.unmatched or mode.buckets[-1][1]
        action = _SplitClientsRoute(
            key,
            table,
            reasons,
            unmatched,
            f"split_clients {mode.key} -> {unmatched} (above every bucket; {shown})",
        )
        wanted: set[str] = set()
        for var in key.variables:
            wanted.update(_headers_of_variable(var))
        # $cookie_NAME and $http_cookie read every Cookie line, $http_x_forwarded_for
        # every X-Forwarded-For line: the headers as received, not one value per name.
        return action, False, frozenset(wanted), bool(wanted)
    a = route.lua
    assert a is not None
    from lua_compat.runtime import default_runtime

    script = default_runtime().compile(
        a.source,
        a.file,
        phase=a.phase,
        decision=a.var,
        variables=dict(a.variables),
        budget=a.cpu_budget,
    )
    upstreams = frozenset(u.name for u in ruleset.upstreams)
    lua_action = _LuaRoute(script, a, upstreams, dict(a.mapping), {})
    reads_body = any(
        word in a.source for word in ("read_body", "get_body_data", "get_post_args", "request_body")
    )
    # A script may read any header, repeated ones as nginx gives them (get_headers()
    # tables, $http_cookie joined with "; ", $cookie_NAME in any Cookie line): it
    # always gets the headers as received.
    return lua_action, reads_body, _headers_of_script(a.source), True


_SCRIPT_VARS = re.compile(r"\b(?:http|cookie)_[A-Za-z0-9_]+|\bcontent_(?:type|length)\b")


def _headers_of_variable(var: str) -> set[str]:
    if var.startswith("http_"):
        return {var[5:].replace("_", "-")}
    if var.startswith("cookie_") or var == "http_cookie":
        return {"cookie"}
    if var in ("content_type", "content_length"):
        return {var.replace("_", "-")}
    if var == "host":
        return {"host"}
    return set()


def _headers_of_script(source: str) -> frozenset[str]:
    """Header names a script reads through ngx.var (the route's body is held when its
    Content-Type fits; the rest reach the script as `raw_headers`)."""
    names = {"host", "content-type", "content-length"}
    for m in _SCRIPT_VARS.finditer(source):
        names.update(_headers_of_variable(m.group(0).lower()))
    return frozenset(names)


def declare_shared_dicts(ruleset: RuleSet) -> None:
    if not ruleset.lua_shared_dicts:
        return
    from lua_compat.runtime import default_runtime

    rt = default_runtime()
    for name, size in ruleset.lua_shared_dicts:
        rt.declare_shared_dict(name, size)
