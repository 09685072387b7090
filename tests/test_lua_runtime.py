"""The sandboxed LuaJIT runtime: what scripts can reach, what one script can do to
another, the CPU budget (also for loops the JIT would compile), memory, and errors."""

from __future__ import annotations

import logging
import time

import pytest

from lua_compat.ngx import Effect, EffectKind, NgxRequest
from lua_compat.runtime import LuaCompileError, LuaRuntime, lua_available

pytestmark = pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")


@pytest.fixture(scope="module")
def rt() -> LuaRuntime:
    runtime = LuaRuntime(max_memory=64 * 1024 * 1024)
    runtime.declare_shared_dict("gray", 64 * 1024)
    return runtime


def req(uid: str = "42", target: str = "/x?uid=7", body: bytes | None = None) -> NgxRequest:
    return NgxRequest(
        b"GET", target.encode(), [(b"Host", b"h"), (b"X-User-Id", uid.encode())], b"10.0.0.1", body
    )


def run(rt: LuaRuntime, source: str, phase: str = "rewrite", **kw: object) -> Effect:
    return rt.compile(source, "t.lua", phase=phase, **kw).run(req())  # type: ignore[arg-type]


def value(rt: LuaRuntime, expr: str) -> str | None:
    return run(rt, f"ngx.var.backend = tostring({expr})").value


# -- the sandbox --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "io",
        "os",
        "ffi",
        "debug",
        "jit",
        "load",
        "loadstring",
        "loadfile",
        "dofile",
        "getfenv",
        "setfenv",
        "module",
        "package",
        "collectgarbage",
        "newproxy",
        "python",
    ],
)
def test_dangerous_globals_are_absent(rt: LuaRuntime, name: str) -> None:
    assert value(rt, name) == "nil"


@pytest.mark.parametrize("module", ["ffi", "io", "os", "jit", "resty.core", "socket", "debug"])
def test_require_only_gives_the_provided_modules(rt: LuaRuntime, module: str) -> None:
    effect = run(rt, f'local m = require("{module}")')
    assert effect.kind == EffectKind.ERROR
    assert "not found" in (effect.error or "")


def test_provided_modules(rt: LuaRuntime) -> None:
    assert value(rt, 'require("cjson").encode({1})') == "[1]"
    assert value(rt, 'select(2, require("cjson.safe").decode("{"))') is not None
    assert value(rt, 'require("bit").band(6, 3)') == "2"
    assert value(rt, 'require("ngx") == ngx') == "true"


def test_no_bytecode_and_no_string_dump(rt: LuaRuntime) -> None:
    assert value(rt, "string.dump") == "nil"
    assert value(rt, '("x").dump') == "nil"


def test_python_objects_are_not_reachable(rt: LuaRuntime) -> None:
    # Every callback into Python is an upvalue of the prelude; nothing reachable from a
    # script's environment is a Python object.
    source = """
      local seen, found = {}, {}
      local function walk(t, depth)
        if depth > 4 or seen[t] then return end
        seen[t] = true
        for k, v in pairs(t) do
          if type(v) == "userdata" and v ~= ngx.null then found[#found + 1] = tostring(k) end
          if type(v) == "table" then walk(v, depth + 1) end
        end
      end
      walk(_G, 0)
      ngx.var.backend = table.concat(found, ",")
    """
    assert run(rt, source).value == ""


def test_protected_metatables(rt: LuaRuntime) -> None:
    assert value(rt, 'getmetatable("")') == "false"
    assert value(rt, "getmetatable(ngx.var)") == "false"
    assert run(rt, "setmetatable(ngx.var, {})").kind == EffectKind.ERROR
    assert run(rt, 'rawset(ngx.var, "backend", "x")').kind == EffectKind.ERROR


# -- isolation between scripts ------------------------------------------------------------


def test_one_script_cannot_change_what_another_sees(rt: LuaRuntime) -> None:
    evil = rt.compile(
        """
        string.upper = function() return "pwned" end
        table.concat = nil
        ngx.md5 = function() return "pwned" end
        ngx.req.get_headers = nil
        tostring = function() return "pwned" end
        cjson_leak = true
        math.floor = nil
        local s = ngx.shared  -- shared dicts are shared on purpose; their methods are not
        s.gray.get = function() return "pwned" end
        ngx.var.backend = "done"
        """,
        "evil.lua",
    )
    assert evil.run(req()).value == "done"
    victim = rt.compile(
        """
        local h = ngx.req.get_headers()
        ngx.shared.gray:set("k", "v")
        ngx.var.backend = table.concat({string.upper("a"), ("b"):upper(), ngx.md5("x"),
          tostring(cjson_leak), tostring(math.floor(1.5)), ngx.shared.gray:get("k"), h.host}, ",")
        """,
        "victim.lua",
    )
    assert victim.run(req()).value == "A,B,9dd4e461268c8034f5c8564e155c67a6,nil,1,v,h"


def test_globals_persist_per_script_like_nginx(rt: LuaRuntime) -> None:
    source = "count = (count or 0) + 1 ngx.var.backend = count"
    a = rt.compile(source, "a.lua")
    b = rt.compile(source, "b.lua")
    assert [a.run(req()).value for _ in range(3)] == ["1", "2", "3"]
    assert b.run(req()).value == "1"


def test_shared_dicts_are_shared_between_scripts(rt: LuaRuntime) -> None:
    writer = rt.compile('ngx.shared.gray:set("flag", "on", 0)', "w.lua")
    reader = rt.compile('ngx.var.backend = ngx.shared.gray:get("flag")', "r.lua")
    writer.run(req())
    assert reader.run(req()).value == "on"
    assert value(rt, "ngx.shared.undeclared") == "nil"


def test_request_state_does_not_leak_into_the_next_request(rt: LuaRuntime) -> None:
    script = rt.compile(
        """
        local first = ngx.ctx.seen
        ngx.ctx.seen = true
        if ngx.var.http_x_user_id == "1" then ngx.var.backend = "one" end
        ngx.var.other = "x"
        ngx.var.backend = (ngx.var.backend or "") .. tostring(first)
        """,
        "s.lua",
        variables={"other": ""},
    )
    one = NgxRequest(b"GET", b"/", [(b"X-User-Id", b"1")])
    two = NgxRequest(b"GET", b"/", [(b"X-User-Id", b"2")])
    assert script.run(one).value == "onenil"
    assert script.run(two).value == "nil"


# -- the CPU budget -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "loop",
    [
        "while true do end",
        "local x = 0 for i = 1, 1e15 do x = x + i end",  # a loop the JIT would compile
        "local t = {} for i = 1, 1e15 do t[i % 100] = i * 2 end",
        "while true do pcall(function() while true do end end) end",
        "while true do xpcall(function() while true do end end, function(e) return e end) end",
        "local co = coroutine.wrap(function() while true do end end) co()",
        "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
        "local function f() return f() end f()",
        "local s = 'x' for i = 1, 1e15 do s = ('x'):rep(10) .. i end",
        "repeat local ok = pcall(error, 'x') until false",
    ],
)
def test_cpu_budget_stops_any_loop(rt: LuaRuntime, loop: str) -> None:
    script = rt.compile(loop, "loop.lua", budget=0.02)
    # warm the JIT: run a hot loop outside the budgeted script first
    started = time.process_time()
    effect = script.run(req())
    spent = time.process_time() - started
    assert effect.kind == EffectKind.ERROR
    assert "CPU budget of 20 ms exceeded" in (effect.error or "")
    assert spent < 0.5
    # the runtime is healthy afterwards
    assert value(rt, "1 + 1") == "2"


def test_budget_is_per_request(rt: LuaRuntime) -> None:
    script = rt.compile(
        "local x = 0 for i = 1, 20000 do x = x + i end ngx.var.backend = x",
        "ok.lua",
        budget=0.05,
    )
    for _ in range(50):
        assert script.run(req()).value == "200010000"


def test_memory_is_capped(rt: LuaRuntime) -> None:
    effect = run(rt, "local s = 'x' for i = 1, 40 do s = s .. s end")
    assert effect.kind == EffectKind.ERROR
    assert "memory" in (effect.error or "")
    assert value(rt, "'still' .. 'fine'") == "stillfine"


# -- errors -------------------------------------------------------------------------------


def test_script_error_is_a_500_with_the_error_logged(
    rt: LuaRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="grayroute.lua"):
        effect = rt.compile("local t = nil\nreturn t.x", "scripts/bad.lua").run(req())
    assert effect.kind == EffectKind.ERROR
    assert effect.status == 500
    assert effect.error is not None and effect.error.startswith("scripts/bad.lua:2:")
    assert "lua entry thread aborted: runtime error: scripts/bad.lua:2:" in caplog.text


def test_error_objects_that_are_not_strings(rt: LuaRuntime) -> None:
    assert run(rt, "error({code = 1})").error == "unknown reason"
    # nginx does not call __tostring either (and here it would run outside the budget)
    looping = "error(setmetatable({}, {__tostring = function() while true do end end}))"
    assert run(rt, looping).error == "unknown reason"
    assert run(rt, "error(42)").error == "t.lua:1: 42"  # Lua adds the position to numbers


def test_compile_errors(rt: LuaRuntime) -> None:
    with pytest.raises(LuaCompileError, match=r"broken\.lua:1:"):
        rt.compile("if then", "broken.lua")
    with pytest.raises(ValueError, match="phase"):
        rt.compile("return 1", "x.lua", phase="content")


def test_ngx_log_goes_to_the_router_log(rt: LuaRuntime, caplog: pytest.LogCaptureFixture) -> None:
    script = rt.compile('ngx.log(ngx.ERR, "uid=", 42, " ", nil, " ", true)', "log.lua")
    with caplog.at_level(logging.ERROR, logger="grayroute.lua"):
        script.run(req())
    assert "[lua] log.lua:1: uid=42 nil true" in caplog.text
    # below the configured level nothing crosses into Python
    script = rt.compile('ngx.log(ngx.DEBUG, "quiet")', "quiet.lua")
    with caplog.at_level(logging.ERROR, logger="grayroute.lua"):
        script.run(req())
    assert "quiet" not in caplog.text


def test_global_write_warns_once(rt: LuaRuntime, caplog: pytest.LogCaptureFixture) -> None:
    rt.refresh_log_level()
    script = rt.compile("counter = 1", "g.lua")
    with caplog.at_level(logging.WARNING, logger="grayroute.lua"):
        rt.refresh_log_level()
        script.run(req())
        script.run(req())
    assert caplog.text.count("writing a global Lua variable ('counter')") == 1


# -- phases ---------------------------------------------------------------------------------


def test_set_phase_returns_the_value_as_nginx_converts_it(rt: LuaRuntime) -> None:
    cases = {
        "return 'v2'": "v2",
        "return 10 / 3": "3.3333333333333",
        "return nil": "",
        "return true": "",
        "return {}": "",
        "": "",
        "return 123456789012345": "1.2345678901235e+14",
    }
    for source, expected in cases.items():
        effect = rt.compile(source, "set.lua", phase="set").run(req())
        assert (effect.kind, effect.value) == (EffectKind.VALUE, expected), source


@pytest.mark.parametrize(
    "call",
    ["ngx.exit(403)", "ngx.exec('@x')", "ngx.redirect('/')", "ngx.say('x')", "ngx.req.read_body()"],
)
def test_set_phase_refuses_what_nginx_refuses(rt: LuaRuntime, call: str) -> None:
    effect = rt.compile(call + " return 'x'", "set.lua", phase="set").run(req())
    assert effect.kind == EffectKind.ERROR
    assert "API disabled in the context of set_by_lua*" in (effect.error or "")


def test_effects(rt: LuaRuntime) -> None:
    assert run(rt, "ngx.exec('@v2')") == Effect(EffectKind.EXEC, value="@v2")
    assert run(rt, "ngx.exec('/a?b=1', 'c=2')") == Effect(
        EffectKind.EXEC, value="/a", args="b=1&c=2"
    )
    assert run(rt, "ngx.exit(503)") == Effect(EffectKind.EXIT, status=503)
    assert run(rt, "ngx.exit(444)").kind == EffectKind.CLOSE
    assert run(rt, "ngx.exit(ngx.ERROR)").kind == EffectKind.CLOSE
    assert run(rt, "ngx.var.backend = 'x' ngx.exit(ngx.OK) ngx.var.backend = 'y'").value == "x"
    assert run(rt, "ngx.redirect('/login')") == Effect(
        EffectKind.REDIRECT, value="/login", status=302
    )
    assert run(rt, "ngx.redirect('/x', 200)").kind == EffectKind.ERROR
    said = run(rt, "ngx.status = 403 ngx.header['X-Why'] = 'no' ngx.say('denied') ngx.exit(403)")
    assert said.kind == EffectKind.EXIT and said.status == 403 and said.body == b"denied\n"
    assert said.response_headers == (("X-Why", "no"),)
    assert run(rt, "ngx.print('hi')") == Effect(EffectKind.EXIT, status=200, body=b"hi")


def test_unset_and_unknown_variables(rt: LuaRuntime) -> None:
    assert run(rt, "").kind == EffectKind.VALUE
    assert run(rt, "").value == ""  # declared like `set $backend "";`
    assert run(rt, "ngx.var.backend = nil").value is None
    effect = run(rt, "ngx.var.nope = 1")
    assert effect.kind == EffectKind.ERROR
    assert 'variable "nope" not found for writing' in (effect.error or "")
    assert 'variable "uri" not changeable' in (run(rt, "ngx.var.uri = 1").error or "")


def test_set_header_is_seen_by_later_reads_and_reported(rt: LuaRuntime) -> None:
    effect = run(
        rt,
        """
        ngx.req.set_header("X-Gray", "1")
        ngx.req.clear_header("X-User-Id")
        ngx.var.backend = tostring(ngx.var.http_x_gray) .. tostring(ngx.var.http_x_user_id)
        """,
    )
    assert effect.value == "1nil"
    assert effect.request_headers == (("X-Gray", "1"), ("X-User-Id", None))


def test_bad_request_line_is_a_400_before_the_script(rt: LuaRuntime) -> None:
    script = rt.compile("ngx.var.backend = 'x'", "s.lua")
    effect = script.run(NgxRequest(b"GET", b"/../etc", []))
    assert (effect.kind, effect.status) == (EffectKind.EXIT, 400)


def test_time_is_the_cached_time_of_the_request(rt: LuaRuntime) -> None:
    script = rt.compile("ngx.var.backend = ngx.time() .. ' ' .. ngx.now()", "t.lua")
    assert script.run(req(), now=1700000000.1234).value == "1700000000 1700000000.123"


def test_per_request_cost_is_small(rt: LuaRuntime) -> None:
    script = rt.compile(
        "local uid = ngx.var.http_x_user_id if uid == '42' then ngx.var.backend = 'v2' end",
        "fast.lua",
    )
    request = req()
    script.run(request)
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        script.run(req())
    per_run = (time.perf_counter() - started) / n
    assert per_run < 200e-6  # generous for a noisy machine; the benchmark measures µs
