"""lua_compat.script_text: the string literals of a Lua script, as LuaJIT reads them."""

from __future__ import annotations

import pytest

from lua_compat.ngx import NgxRequest
from lua_compat.runtime import LuaRuntime, lua_available
from lua_compat.script_text import string_literals

SCRIPT = r"""
-- ngx.var.backend = "in-a-comment"
--[[ "in a long comment" ]] local a = "orders-v2"
--[==[ nested ]] "still comment" ]==]
local x = {1, 2}
local t = {["key"] = 'single', [1] = x[2]}
local s = "esc\"aped\n\65\066\x43\z
           d\u{4E2D}"
local l = [[
long
one]]
local m = [==[with ]] inside]==]
local u = "张王"
ngx.exec("@canary") -- "after code"
"""


def test_literals_and_nothing_else() -> None:
    assert string_literals(SCRIPT) == {
        "orders-v2", "key", "single", 'esc"aped\nABCd中', "long\none", "with ]] inside",
        "张王", "@canary",
    }


def test_broken_and_empty_scripts() -> None:
    assert string_literals("") == frozenset()
    assert string_literals('local a = "open') == frozenset()
    assert string_literals('local a = "ok" local b = [[open') == {"ok"}
    assert string_literals("a = b[c] - d -- e") == frozenset()
    assert string_literals(b'x = "\xff"') == {"\udcff"}  # bytes that are not UTF-8 kept


@pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")
def test_the_same_strings_luajit_sees() -> None:
    """Every literal, turned back into a script that returns it, comes back from LuaJIT."""
    runtime = LuaRuntime()
    request = NgxRequest(b"GET", b"/", [])
    for text in sorted(string_literals(SCRIPT)):
        quoted = "[====[\n" + text + "]====]"
        script = runtime.compile(f"return {quoted}", "t.lua", phase="set", decision=None)
        assert script.run(request).value == text
    script = runtime.compile(SCRIPT.replace('ngx.exec("@canary")', "return s"), "t.lua",
                             phase="set", decision=None)
    assert script.run(request).value == 'esc"aped\nABCd中'
