"""lua_compat: nginx + Lua routing semantics, for teams moving from OpenResty.

A library with no knowledge of the proxy: it takes a request (NgxRequest) and gives
back what nginx would have done (Effect), or the bucket nginx's split_clients picks.

    from lua_compat import LuaRuntime, NgxRequest
    rt = LuaRuntime()                                  # one per worker process
    script = rt.compile(source, "gray.lua", phase="rewrite", decision="backend")
    effect = script.run(NgxRequest(b"GET", b"/x?uid=42", headers, b"10.0.0.1"))
    effect.kind, effect.value                          # "value", "v2"

    from lua_compat import SplitClients, KeyTemplate
    table = SplitClients.build([("0.5%", "v2"), ("*", "v1")])
    table.pick(KeyTemplate.parse("${remote_addr}AAA").evaluate(request))

Modules:

    runtime.py        the sandboxed LuaJIT runtime (the only module that imports lupa)
    prelude.py        the Lua side of the ngx API, the sandbox and cjson (Lua source)
    ngx.py            nginx's request semantics in Python: variables, args, headers, URI
    murmur2.py        nginx's MurmurHash2, bit-exact
    split_clients.py  nginx split_clients: percent arithmetic, `*`, the key template
    nginx_import.py   nginx.conf -> rule file (`grayroute import-nginx`)
    nginx_check.py    run scripts in a real nginx and here, side by side
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lua_compat.murmur2 import murmur_hash2
from lua_compat.ngx import Effect, EffectKind, NgxRequest
from lua_compat.split_clients import KeyTemplate, SplitClients, SplitClientsError

if TYPE_CHECKING:
    from lua_compat.runtime import LuaCompileError, LuaRuntime, LuaScript, default_runtime

__all__ = [
    "Effect",
    "EffectKind",
    "KeyTemplate",
    "LuaCompileError",
    "LuaRuntime",
    "LuaScript",
    "NgxRequest",
    "SplitClients",
    "SplitClientsError",
    "default_runtime",
    "murmur_hash2",
]

_LAZY = {"LuaCompileError", "LuaRuntime", "LuaScript", "default_runtime"}


def __getattr__(name: str) -> Any:
    # The runtime (and lupa with it) is imported only by code that runs scripts.
    if name in _LAZY:
        from lua_compat import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'lua_compat' has no attribute {name!r}")
