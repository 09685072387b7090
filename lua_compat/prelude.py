"""The Lua half of the ngx API, the sandbox and cjson, as Lua source text.

`runtime.py` evaluates PRELUDE once per Lua state, passing the Python callbacks of
`runtime._Bridge`; it returns two functions, `compile(name, source, options)` and
`run(script, now)`. The text is kept in a Python module (not a .lua file) so that it
ships inside every wheel without package-data configuration.

What lives in Lua and why:

- the sandbox: each script gets its own global table, its own copies of the standard
  library tables and of the `ngx` tables, so no script can change what another sees;
  `io`, `os`, `ffi`, `debug`, `jit`, `load*`, `dofile`, `getfenv`/`setfenv`,
  `string.dump` and `require` of anything but cjson/cjson.safe are absent. Script code
  runs with the JIT compiler off (jit.off(chunk, true)) so the instruction-count hook that
  enforces the CPU budget fires in every loop; `pcall`, `xpcall` and `coroutine.resume`
  cannot swallow the budget or ngx.exit/ngx.exec/ngx.redirect.
- the cheap parts of ngx: ngx.var caching and user variables, ngx.ctx, constants,
  ngx.exit/exec/redirect (recorded, then unwound with a private error value), ngx.log
  level filtering, ngx.shared.DICT (per Lua state, i.e. per worker), ngx.re result
  tables, cjson (a Lua port of lua-cjson 2.1 behaviour, including its error messages).
- everything that needs nginx's parsing rules calls back into Python (ngx.py).

Numbers become text the LuaJIT way (tostring, "%.14g") because the conversion happens
in LuaJIT itself, exactly as in nginx.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PRELUDE"]

PRELUDE: Final = r"""
local py_var, py_set_var, py_headers, py_uri_args, py_post_args, py_read_body,
      py_body_data, py_digest, py_log, py_re, py_set_header, py_clock, py_codec = ...

local type, tostring, tonumber, error, pcall, xpcall, select, next, pairs, ipairs =
      type, tostring, tonumber, error, pcall, xpcall, select, next, pairs, ipairs
local setmetatable, getmetatable, rawget, rawset, rawequal, unpack =
      setmetatable, getmetatable, rawget, rawset, rawequal, unpack
local setfenv, newproxy, assert = setfenv, newproxy, assert
local str_byte, str_char, str_sub, str_find, str_format, str_lower, str_gsub, str_rep,
      str_match =
      string.byte, string.char, string.sub, string.find, string.format, string.lower,
      string.gsub, string.rep, string.match
local tconcat, tinsert = table.concat, table.insert
local floor, huge = math.floor, math.huge
local clock = os.clock
local os_date = os.date
local sethook, getinfo = debug.sethook, debug.getinfo
local jit_off = jit.off
local co_resume, co_wrap, co_create, co_status, co_yield, co_running =
      coroutine.resume, coroutine.wrap, coroutine.create, coroutine.status,
      coroutine.yield, coroutine.running

-- Numbers as text, as nginx's LuaJIT writes them. LuaJIT formats "%.14g" itself; the
-- build in nginx (OpenResty 2.1-20230119) breaks exact decimal ties away from zero
-- (123456789012345 -> "1.2345678901235e+14") where newer LuaJIT rounds half to even
-- ("...234e+14"). Only exact ties differ; they are detected cheaply here and finished in
-- Python (exact decimal arithmetic). tostring, string.format and every conversion of the
-- ngx API go through this; the `..` operator cannot be reached from Lua (see the docs).
local native_tostring = tostring
local native_format = string.format
local function num2str(n)
  if n == floor(n) and n < 1e14 and n > -1e14 then return native_tostring(n) end
  if n ~= n or n == huge or n == -huge then return native_tostring(n) end
  local s15 = native_format("%.15g", n)
  local mant = str_match(s15, "^-?([%d%.]+)")
  local digits = str_gsub(str_gsub(mant, "%.", ""), "^0+", "")
  if #digits == 15 and str_byte(digits, 15) == 53 then
    local fixed = py_codec("g14", n)
    if fixed then return fixed end
  end
  return native_tostring(n)
end
tostring = function(v)
  if type(v) == "number" then return num2str(v) end
  return native_tostring(v)
end
local function emul_format(fmt, ...)
  if type(fmt) ~= "string" or not str_find(fmt, "%", 1, true) then
    return native_format(fmt, ...)
  end
  local args = {...}
  local nargs = select("#", ...)
  local out, i, argi, n = {}, 1, 0, #fmt
  while i <= n do
    local p = str_find(fmt, "%", i, true)
    if not p then out[#out + 1] = str_sub(fmt, i); break end
    out[#out + 1] = str_sub(fmt, i, p - 1)
    local s, e, flags, width, prec, conv = str_find(fmt, "^%%([-+ #0]*)(%d*)%.?(%d*)(.)", p)
    if not s then return native_format(fmt, ...) end
    local spec = str_sub(fmt, s, e)
    if conv == "%" then
      out[#out + 1] = "%"
    else
      argi = argi + 1
      if argi > nargs then return native_format(fmt, ...) end
      local v = args[argi]
      local done = false
      if type(v) == "number" and v == v and v ~= huge and v ~= -huge and flags == "" then
        if conv == "s" and prec == "" then
          out[#out + 1] = native_format("%" .. width .. "s", num2str(v))
          done = true
        elseif conv == "f" or conv == "e" or conv == "g" or conv == "E" or conv == "G" then
          if prec == "" and str_find(spec, ".", 1, true) then prec = "0" end
          local core = py_codec("fmt", v, conv .. prec)
          if core then
            out[#out + 1] = native_format("%" .. width .. "s", core)
            done = true
          end
        end
      end
      if not done then out[#out + 1] = native_format(spec, v) end
    end
    i = e + 1
  end
  return tconcat(out)
end

-- Private error values: they unwind a script and are never caught by its pcalls.
local EXIT = setmetatable({}, {__tostring = function() return "ngx exit" end})
local BUDGET = setmetatable({}, {__tostring = function() return "cpu budget" end})
local function is_signal(e) return e == EXIT or e == BUDGET end

-- ngx.null / cjson.null: a userdata whose tostring is nginx's ("userdata: NULL").
local NULL = newproxy(true)
getmetatable(NULL).__tostring = function() return "userdata: NULL" end
getmetatable(NULL).__metatable = false

-- ---------------------------------------------------------------------------------
-- The current request. One Lua state runs one script at a time (a worker is one
-- thread), so the state of the request in progress is kept in these upvalues.
-- ---------------------------------------------------------------------------------
local cur_now = 0
local cur_vars          -- cache of nginx variables read this request
local cur_user          -- user variables (set $x "" in nginx), name -> value or false
local cur_ctx
local cur_phase = 0     -- 1 rewrite, 2 access, 3 set
local cur_out, cur_status, cur_resp_headers, cur_req_headers
local eff_kind, eff_a, eff_b = 0, nil, nil
local deadline, cur_budget, hook_on = 0, 0, false
local log_level = 4  -- ngx.ERR: nginx's default error_log level

local K_VALUE, K_EXEC, K_EXIT, K_REDIRECT, K_CLOSE, K_ERROR = 0, 1, 2, 3, 4, 5

-- The CPU budget: a count hook every 1000 VM instructions. The deadline is set on its
-- first call, so a script that finishes within 1000 instructions (most routing scripts)
-- costs no clock reading at all; the first 1000 instructions are not counted.
local function hook()
  local now = clock()
  if deadline == 0 then
    deadline = now + cur_budget
  elseif now > deadline then
    sethook()  -- the unwinding code must not be interrupted again
    hook_on = false
    error(BUDGET, 0)
  end
end

-- Run library code (cjson) without the hook: the JIT compiles it, and its work is
-- bounded by its input (the body nginx holds in memory is at most ~10 KiB by default).
local function unhooked(f, ...)
  if not hook_on then return f(...) end
  sethook()
  local r = {pcall(f, ...)}
  sethook(hook, "", 1000)
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, table.maxn(r))
end

local function in_set_context()
  if cur_phase == 3 then
    error("API disabled in the context of set_by_lua*", 3)
  end
end

-- ---------------------------------------------------------------------------------
-- Logging
-- ---------------------------------------------------------------------------------
local function log_arg(v, i)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  if t == "nil" then return "nil" end
  if t == "boolean" then return v and "true" or "false" end
  if v == NULL then return "null" end
  if t == "table" then
    local mt = getmetatable(v)
    if type(mt) == "table" and mt.__tostring then return tostring(v) end
  end
  error("bad argument #" .. i .. " to 'log' (expected table to have __tostring metamethod)", 3)
end

local function do_log(level, depth, ...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = log_arg((select(i, ...)), i + 1) end
  local info = getinfo(depth, "Sln")
  local where = ""
  if info then
    local src = info.short_src or "?"
    where = src .. ":" .. (info.currentline or 0) .. ": "
    if info.name then where = where .. info.name .. "(): " end
  end
  py_log(level, where .. tconcat(parts))
end

local function ngx_log(level, ...)
  if type(level) ~= "number" then
    error("bad argument #1 to 'log' (number expected, got " .. type(level) .. ")", 2)
  end
  if level > log_level then return end
  do_log(level, 3, ...)
end

local function lua_print(...)
  if 6 > log_level then return end
  do_log(6, 3, ...)
end

-- ---------------------------------------------------------------------------------
-- ngx.var
-- ---------------------------------------------------------------------------------
local var_mt = {__metatable = false}
var_mt.__index = function(_, name)
  if type(name) ~= "string" then
    if type(name) == "number" then return nil end  -- regex captures: none here
    error("bad variable name", 2)
  end
  local lname = str_lower(name)
  local u = cur_user[lname]
  if u ~= nil then
    if u == false then return nil end
    return u
  end
  local v = cur_vars[lname]
  if v == nil then
    v = py_var(lname)
    if v == nil then v = false end
    cur_vars[lname] = v
  end
  if v == false then return nil end
  return v
end
var_mt.__newindex = function(_, name, value)
  if type(name) ~= "string" then error("bad variable name", 2) end
  local lname = str_lower(name)
  if value ~= nil and type(value) ~= "string" then value = tostring(value) end
  if cur_user[lname] ~= nil then
    cur_user[lname] = value or false
    return
  end
  local err = py_set_var(lname, value)
  if err then error(err, 2) end
  cur_vars = {}  -- e.g. $args changed: $arg_* must be read again
end

-- ---------------------------------------------------------------------------------
-- ngx.req
-- ---------------------------------------------------------------------------------
local function replace_underscore(k)
  return (str_gsub(str_lower(k), "_", "-"))
end
local req_headers_mt = {
  __index = function(t, key)
    return rawget(t, replace_underscore(key))
  end
}

local function add_multi(t, k, v)
  local existing = t[k]
  if existing == nil then
    t[k] = v
  elseif type(existing) == "table" then
    existing[#existing + 1] = v
  else
    t[k] = {existing, v}
  end
end

local function pairs_to_table(t, truncated, ...)
  local n = select("#", ...)
  local args = {...}
  for i = 1, n, 2 do
    local k = args[i]
    local existing = rawget(t, k)
    local v = args[i + 1]
    if existing == nil then
      rawset(t, k, v)
    elseif type(existing) == "table" then
      existing[#existing + 1] = v
    else
      rawset(t, k, {existing, v})
    end
  end
  if truncated then return t, "truncated" end
  return t
end

local function check_max(n, what)
  if n == nil then return -1 end
  if type(n) ~= "number" then
    n = tonumber(n)
    if not n then error("bad argument #1 to '" .. what .. "' (number expected)", 3) end
  end
  return floor(n)
end

local function get_headers(max_headers, raw)
  max_headers = check_max(max_headers, "get_headers")
  local t = {}
  if not raw then setmetatable(t, req_headers_mt) end
  return pairs_to_table(t, py_headers(max_headers, raw and true or false))
end

local function get_uri_args(max_args, tab)
  max_args = check_max(max_args, "get_uri_args")
  local t = tab or {}
  if tab then for k in pairs(tab) do tab[k] = nil end end
  return pairs_to_table(t, py_uri_args(max_args))
end

local function get_post_args(max_args)
  max_args = check_max(max_args, "get_post_args")
  local res = {py_post_args(max_args)}
  if res[1] == nil then
    return nil, res[2]
  end
  if type(res[1]) == "string" then error(res[1], 2) end
  return pairs_to_table({}, unpack(res))
end

local function read_body()
  in_set_context()
  py_read_body()
  cur_vars = {}
end

local function get_body_data()
  return py_body_data()
end

local function get_method()
  local v = cur_vars["request_method"]
  if v == nil then
    v = py_var("request_method") or false
    cur_vars["request_method"] = v
  end
  return v or nil
end

local function set_header(name, value)
  if name == nil then error("bad 'name' argument: string expected, got nil", 2) end
  name = tostring(name)
  if type(value) == "table" then
    local parts = {}
    for i = 1, #value do parts[i] = tostring(value[i]) end
    value = parts
  elseif value ~= nil then
    value = tostring(value)
  end
  cur_req_headers = cur_req_headers or {}
  if type(value) == "table" then
    py_set_header(name, nil)
    cur_req_headers[#cur_req_headers + 1] = {name, false}
    for i = 1, #value do
      py_set_header(name, value[i], true)
      cur_req_headers[#cur_req_headers + 1] = {name, value[i], true}
    end
  else
    py_set_header(name, value)
    cur_req_headers[#cur_req_headers + 1] = {name, value or false}
  end
  cur_vars = {}
end

local function clear_header(name)
  set_header(name, nil)
end

-- ---------------------------------------------------------------------------------
-- Control: exit, exec, redirect, say/print
-- ---------------------------------------------------------------------------------
local function ngx_exit(status)
  if cur_phase == 3 then error("API disabled in the context of set_by_lua*", 2) end
  if type(status) ~= "number" then
    local n = tonumber(status)
    if not n then
      error("bad argument #1 to 'exit' (number expected, got " .. type(status) .. ")", 2)
    end
    status = n
  end
  status = floor(status)
  if status == 0 or status == -5 then
    -- ngx.OK / ngx.DECLINED: this phase is over, the request goes on
    eff_kind = K_VALUE
  elseif status >= 200 then
    if status == 444 then eff_kind = K_CLOSE else eff_kind, eff_a = K_EXIT, status end
  else
    eff_kind = K_CLOSE  -- ngx.ERROR and 1xx: nginx closes the connection
  end
  error(EXIT, 0)
end

local function encode_args(t)
  local codec = py_codec
  local parts = {}
  for k, v in pairs(t) do
    local key = codec("escape_uri", tostring(k))
    if v == true then
      parts[#parts + 1] = key
    elseif type(v) == "table" then
      for i = 1, #v do
        local item = v[i]
        if item == true then parts[#parts + 1] = key
        elseif item ~= false then
          parts[#parts + 1] = key .. "=" .. codec("escape_uri", tostring(item))
        end
      end
    elseif v ~= false then
      parts[#parts + 1] = key .. "=" .. codec("escape_uri", tostring(v))
    end
  end
  return tconcat(parts, "&")
end

local function ngx_exec(uri, args)
  if cur_phase == 3 then error("API disabled in the context of set_by_lua*", 2) end
  if type(uri) ~= "string" then
    if type(uri) == "number" then uri = tostring(uri)
    else error("bad argument #1 to 'exec' (string expected, got " .. type(uri) .. ")", 2) end
  end
  if uri == "" then error("The uri argument is empty", 2) end
  if type(args) == "table" then args = encode_args(args)
  elseif args ~= nil then args = tostring(args) end
  if str_sub(uri, 1, 1) ~= "@" then
    local q = str_find(uri, "?", 1, true)
    if q then
      local inline = str_sub(uri, q + 1)
      uri = str_sub(uri, 1, q - 1)
      if args and args ~= "" then args = inline .. "&" .. args else args = inline end
    end
  else
    args = nil
  end
  eff_kind, eff_a, eff_b = K_EXEC, uri, args
  error(EXIT, 0)
end

local REDIRECT_OK = {[301] = true, [302] = true, [303] = true, [307] = true, [308] = true}
local function ngx_redirect(uri, status)
  if cur_phase == 3 then error("API disabled in the context of set_by_lua*", 2) end
  if status == nil then status = 302 end
  status = tonumber(status) or status
  if not REDIRECT_OK[status] then
    error("only ngx.HTTP_MOVED_TEMPORARILY, ngx.HTTP_MOVED_PERMANENTLY, " ..
          "ngx.HTTP_PERMANENT_REDIRECT, ngx.HTTP_SEE_OTHER, and " ..
          "ngx.HTTP_TEMPORARY_REDIRECT are allowed", 2)
  end
  if type(uri) ~= "string" then uri = tostring(uri) end
  eff_kind, eff_a, eff_b = K_REDIRECT, status, uri
  error(EXIT, 0)
end

local function out_arg(v, out)
  local t = type(v)
  if t == "string" then out[#out + 1] = v
  elseif t == "number" then out[#out + 1] = tostring(v)
  elseif t == "nil" then out[#out + 1] = "nil"
  elseif t == "boolean" then out[#out + 1] = v and "true" or "false"
  elseif v == NULL then out[#out + 1] = "null"
  elseif t == "table" then
    for i = 1, #v do out_arg(v[i], out) end
  else
    error("bad argument to 'print' (string, number, boolean, nil, ngx.null, or array " ..
          "table expected, got " .. t .. ")", 3)
  end
end

local function ngx_print(...)
  if cur_phase == 3 then error("API disabled in the context of set_by_lua*", 2) end
  cur_out = cur_out or {}
  for i = 1, select("#", ...) do out_arg((select(i, ...)), cur_out) end
  return 1
end

local function ngx_say(...)
  ngx_print(...)
  cur_out[#cur_out + 1] = "\n"
  return 1
end

-- ---------------------------------------------------------------------------------
-- Hashes, encodings, time
-- ---------------------------------------------------------------------------------
local function as_string(s)
  if type(s) ~= "string" then
    if not s then return "" end
    return tostring(s)
  end
  return s
end

local function md5(s) return py_digest("md5", as_string(s)) end
local function md5_bin(s) return py_digest("md5_bin", as_string(s)) end
local function sha1_bin(s) return py_digest("sha1_bin", as_string(s)) end
local function crc32_short(s) return py_digest("crc32", as_string(s)) end
local function crc32_long(s) return py_digest("crc32", as_string(s)) end
local function hmac_sha1(key, s) return py_digest("hmac_sha1", as_string(s), as_string(key)) end

local function encode_base64(s, no_padding)
  if s == nil then s = "" end
  if type(s) ~= "string" then
    if type(s) == "number" then s = tostring(s)
    else error("bad argument #1 to 'encode_base64' (string expected, got " .. type(s) .. ")", 2) end
  end
  return py_codec("b64encode", s, no_padding and true or false)
end
local function decode_base64(s)
  if type(s) ~= "string" then
    if type(s) == "number" then s = tostring(s)
    else error("string argument only", 2) end
  end
  return py_codec("b64decode", s)
end
local function escape_uri(s, t)
  if s == nil then return "" end
  return py_codec("escape_uri", as_string(s), t or 2)
end
local function unescape_uri(s)
  if s == nil then return "" end
  return py_codec("unescape_uri", as_string(s))
end
local function decode_args(s, max)
  max = check_max(max, "decode_args")
  return pairs_to_table({}, py_codec("decode_args", as_string(s), max))
end
local function quote_sql_str(s)
  return py_codec("quote_sql_str", as_string(s))
end

local function ngx_now() return cur_now end
local function ngx_time() return floor(cur_now) end
local function ngx_update_time() cur_now = floor(py_clock() * 1000) / 1000 end
local function ngx_today() return os_date("%Y-%m-%d", floor(cur_now)) end
local function ngx_localtime() return os_date("%Y-%m-%d %H:%M:%S", floor(cur_now)) end
local function ngx_utctime() return os_date("!%Y-%m-%d %H:%M:%S", floor(cur_now)) end
local function ngx_http_time(t)
  return os_date("!%a, %d %b %Y %H:%M:%S GMT", floor(tonumber(t) or 0))
end
local function ngx_cookie_time(t)
  return os_date("!%a, %d-%b-%y %H:%M:%S GMT", floor(tonumber(t) or 0))
end
local function ngx_parse_http_time(s)
  return py_codec("parse_http_time", as_string(s))
end
local function req_start_time() return cur_now end

-- ---------------------------------------------------------------------------------
-- ngx.re: Python's re with PCRE spellings translated (ngx.py/runtime.py)
-- ---------------------------------------------------------------------------------
local function re_exec(subject, regex, options, pos)
  if type(subject) ~= "string" then subject = tostring(subject) end
  if type(regex) ~= "string" then regex = tostring(regex) end
  return py_re(subject, regex, options or "", pos)
end

local function captures_table(subject, res, nstart, nend, ngroups, ...)
  local m = res or {}
  if res then for k in pairs(res) do res[k] = nil end end
  m[0] = str_sub(subject, nstart + 1, nend)
  local vals = {...}
  for i = 1, ngroups do
    local v = vals[i]
    m[i] = v
  end
  local n = select("#", ...)
  for i = ngroups + 1, n, 2 do
    local name, idx = vals[i], vals[i + 1]
    m[name] = vals[idx]
  end
  return m
end

local function re_match(subject, regex, options, ctx, res)
  local pos = ctx and ctx.pos or 1
  local r = {re_exec(subject, regex, options, pos - 1)}
  local ngroups = r[1]
  if ngroups == nil then return nil end
  if ngroups == false then return nil, r[2] end
  if ctx then ctx.pos = r[3] + 1 end
  return captures_table(subject, res, r[2], r[3], ngroups, select(4, unpack(r)))
end

local function re_find(subject, regex, options, ctx, nth)
  local pos = ctx and ctx.pos or 1
  local r = {re_exec(subject, regex, options, pos - 1)}
  local ngroups = r[1]
  if ngroups == nil then return nil end
  if ngroups == false then return nil, nil, r[2] end
  if ctx then ctx.pos = r[3] + 1 end
  if nth and nth ~= 0 then
    -- the position of a capture is not kept; find it again inside the match
    local v = r[3 + nth]
    if not v then return nil end
    local s = str_find(subject, v, r[2] + 1, true)
    return s, s + #v - 1
  end
  return r[2] + 1, r[3]
end

local function re_gmatch(subject, regex, options)
  if type(subject) ~= "string" then subject = tostring(subject) end
  local pos = 0
  local done = false
  return function()
    if done then return nil end
    local r = {re_exec(subject, regex, options, pos)}
    local ngroups = r[1]
    if ngroups == nil then done = true return nil end
    if ngroups == false then done = true return nil, r[2] end
    if r[3] == r[2] then
      pos = r[3] + 1
      if pos > #subject then done = true end
    else
      pos = r[3]
    end
    return captures_table(subject, nil, r[2], r[3], ngroups, select(4, unpack(r)))
  end
end

local function expand_template(tpl, m)
  local out, i, n = {}, 1, #tpl
  while i <= n do
    local c = str_sub(tpl, i, i)
    if c == "$" then
      local nxt = str_sub(tpl, i + 1, i + 1)
      if nxt == "$" then out[#out + 1] = "$"; i = i + 2
      elseif nxt == "{" then
        local close = str_find(tpl, "}", i + 2, true)
        if not close then error("failed to compile the replacement template", 3) end
        local key = str_sub(tpl, i + 2, close - 1)
        local v = m[tonumber(key) or key]
        out[#out + 1] = v or ""
        i = close + 1
      else
        local s, e = str_find(tpl, "^%d+", i + 1)
        if not s then error("failed to compile the replacement template", 3) end
        local v = m[tonumber(str_sub(tpl, s, e))]
        out[#out + 1] = v or ""
        i = e + 1
      end
    else
      out[#out + 1] = c
      i = i + 1
    end
  end
  return tconcat(out)
end

local function re_sub_impl(subject, regex, replace, options, global)
  if type(subject) ~= "string" then subject = tostring(subject) end
  local out, pos, count = {}, 0, 0
  local n = #subject
  while pos <= n do
    local r = {re_exec(subject, regex, options, pos)}
    local ngroups = r[1]
    if ngroups == nil then break end
    if ngroups == false then return nil, nil, r[2] end
    local s, e = r[2], r[3]
    local m = captures_table(subject, nil, s, e, ngroups, select(4, unpack(r)))
    local rep
    if type(replace) == "function" then rep = tostring(replace(m))
    else rep = expand_template(tostring(replace), m) end
    out[#out + 1] = str_sub(subject, pos + 1, s)
    out[#out + 1] = rep
    count = count + 1
    if e == s then
      out[#out + 1] = str_sub(subject, e + 1, e + 1)
      pos = e + 1
    else
      pos = e
    end
    if not global then break end
  end
  out[#out + 1] = str_sub(subject, pos + 1)
  return tconcat(out), count
end
local function re_sub(s, r, rep, o) return re_sub_impl(s, r, rep, o, false) end
local function re_gsub(s, r, rep, o) return re_sub_impl(s, r, rep, o, true) end

-- ---------------------------------------------------------------------------------
-- ngx.shared.DICT: one store per Lua state (per worker), LRU eviction by size
-- ---------------------------------------------------------------------------------
local dicts = {}          -- name -> zone {capacity, used, items, head, tail}
local ENTRY_OVERHEAD = 64

local function zone_unlink(z, it)
  if it.prev then it.prev.next = it.next else z.head = it.next end
  if it.next then it.next.prev = it.prev else z.tail = it.prev end
  it.prev, it.next = nil, nil
end
local function zone_push_front(z, it)
  it.next = z.head
  it.prev = nil
  if z.head then z.head.prev = it end
  z.head = it
  if not z.tail then z.tail = it end
end
local function item_size(key, value)
  local n = #key + ENTRY_OVERHEAD
  if type(value) == "string" then n = n + #value
  elseif type(value) == "table" then
    for i = 1, #value do n = n + #tostring(value[i]) + 16 end
  else n = n + 8 end
  return n
end
local function zone_remove(z, key, it)
  zone_unlink(z, it)
  z.items[key] = nil
  z.used = z.used - it.size
end
local function expired(it)
  return it.exptime ~= 0 and it.exptime <= cur_now
end
local function zone_make_room(z, need, forcible_ok)
  -- expired items first, then the least recently used (as nginx: up to 30)
  local forcible = false
  local it = z.tail
  local tries = 0
  while z.used + need > z.capacity and it and tries < 30 do
    local prev = it.prev
    if expired(it) then zone_remove(z, it.key, it)
    elseif forcible_ok then zone_remove(z, it.key, it); forcible = true end
    it = prev
    tries = tries + 1
  end
  return z.used + need <= z.capacity, forcible
end

local function check_key(key)
  if key == nil then return nil, "nil key" end
  if type(key) ~= "string" then key = tostring(key) end
  if #key == 0 then return nil, "empty key" end
  if #key > 65535 then return nil, "key too long" end
  return key
end

local function zone_of(self)
  if type(self) ~= "table" or not rawget(self, 1) then error('bad "zone" argument', 3) end
  return rawget(self, 1)
end

local function shdict_store(self, op, key, value, exptime, flags)
  local z = zone_of(self)
  if not exptime then exptime = 0 elseif exptime < 0 then error('bad "exptime" argument', 3) end
  flags = flags or 0
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local vt = type(value)
  if vt ~= "string" and vt ~= "number" and vt ~= "boolean" and value ~= nil then
    return nil, "bad value type"
  end
  local it = z.items[key]
  if it and expired(it) then zone_remove(z, key, it); it = nil end
  if op == "add" and it then return false, "exists", false end
  if op == "replace" and not it then return false, "not found", false end
  if value == nil then
    if it then zone_remove(z, key, it) end
    return true, nil, false
  end
  if it then zone_remove(z, key, it) end
  local size = item_size(key, value)
  local ok, forcible = zone_make_room(z, size, op ~= "safe_set" and op ~= "safe_add")
  if not ok then return false, "no memory", forcible end
  it = {key = key, value = value, flags = flags, size = size,
        exptime = exptime > 0 and cur_now + exptime or 0}
  z.items[key] = it
  z.used = z.used + size
  zone_push_front(z, it)
  return true, nil, forcible
end

local shdict = {}
function shdict.set(self, k, v, e, f) return shdict_store(self, "set", k, v, e, f) end
function shdict.safe_set(self, k, v, e, f) return shdict_store(self, "safe_set", k, v, e, f) end
function shdict.add(self, k, v, e, f) return shdict_store(self, "add", k, v, e, f) end
function shdict.safe_add(self, k, v, e, f) return shdict_store(self, "safe_add", k, v, e, f) end
function shdict.replace(self, k, v, e, f) return shdict_store(self, "replace", k, v, e, f) end
function shdict.delete(self, k) return shdict_store(self, "set", k, nil) end
function shdict.get(self, key)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local it = z.items[key]
  if not it or expired(it) then return nil end
  if type(it.value) == "table" then return nil, "value is a list" end
  zone_unlink(z, it); zone_push_front(z, it)
  if it.flags ~= 0 then return it.value, it.flags end
  return it.value
end
function shdict.get_stale(self, key)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local it = z.items[key]
  if not it then return nil end
  if type(it.value) == "table" then return nil, "value is a list" end
  local stale = expired(it)
  if it.flags ~= 0 then return it.value, it.flags, stale end
  return it.value, nil, stale
end
function shdict.incr(self, key, value, init, init_ttl)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  if type(value) ~= "number" then value = tonumber(value) end
  if init ~= nil and type(init) ~= "number" then
    local n = tonumber(init)
    if not n then error("bad init arg: number expected, got " .. type(init), 2) end
    init = n
  end
  if init_ttl ~= nil then
    if type(init_ttl) ~= "number" then
      local n = tonumber(init_ttl)
      if not n then error("bad init_ttl arg: number expected, got " .. type(init_ttl), 2) end
      init_ttl = n
    end
    if init_ttl < 0 then error('bad "init_ttl" argument', 2) end
    if not init then error('must provide "init" when providing "init_ttl"', 2) end
  end
  local it = z.items[key]
  if it and expired(it) then zone_remove(z, key, it); it = nil end
  if not it then
    if not init then return nil, "not found" end
    local ok, e2, forcible = shdict_store(self, "set", key, init + value, init_ttl or 0)
    if not ok then return nil, e2 end
    return init + value, nil, forcible
  end
  if type(it.value) ~= "number" then return nil, "not a number" end
  it.value = it.value + value
  zone_unlink(z, it); zone_push_front(z, it)
  if init then return it.value, nil, false end
  return it.value
end
local function list_push(self, key, value, front)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  if type(value) ~= "string" and type(value) ~= "number" then return nil, "bad value type" end
  local it = z.items[key]
  if it and expired(it) then zone_remove(z, key, it); it = nil end
  if it and type(it.value) ~= "table" then return nil, "value not a list" end
  if not it then
    local ok, e2 = shdict_store(self, "set", key, "", 0)
    if not ok then return nil, e2 end
    it = z.items[key]
    z.used = z.used - it.size
    it.value = {}
    it.size = item_size(key, it.value)
    z.used = z.used + it.size
  end
  local ok = zone_make_room(z, #tostring(value) + 16, true)
  if not ok then return nil, "no memory" end
  if front then tinsert(it.value, 1, value) else it.value[#it.value + 1] = value end
  z.used = z.used + #tostring(value) + 16
  it.size = it.size + #tostring(value) + 16
  return #it.value
end
local function list_pop(self, key, front)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local it = z.items[key]
  if not it or expired(it) then return nil end
  if type(it.value) ~= "table" then return nil, "value not a list" end
  local v
  if front then v = table.remove(it.value, 1) else v = table.remove(it.value) end
  if v ~= nil then
    z.used = z.used - #tostring(v) - 16
    it.size = it.size - #tostring(v) - 16
  end
  if #it.value == 0 then zone_remove(z, key, it) end
  return v
end
function shdict.lpush(self, k, v) return list_push(self, k, v, true) end
function shdict.rpush(self, k, v) return list_push(self, k, v, false) end
function shdict.lpop(self, k) return list_pop(self, k, true) end
function shdict.rpop(self, k) return list_pop(self, k, false) end
function shdict.llen(self, key)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local it = z.items[key]
  if not it or expired(it) then return 0 end
  if type(it.value) ~= "table" then return nil, "value not a list" end
  return #it.value
end
function shdict.ttl(self, key)
  local z = zone_of(self)
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local it = z.items[key]
  if not it or expired(it) then return nil, "not found" end
  if it.exptime == 0 then return 0 end
  return floor((it.exptime - cur_now) * 1000 + 0.5) / 1000
end
function shdict.expire(self, key, exptime)
  local z = zone_of(self)
  if not exptime or exptime < 0 then error('bad "exptime" argument', 2) end
  local err
  key, err = check_key(key)
  if not key then return nil, err end
  local it = z.items[key]
  if not it or expired(it) then return nil, "not found" end
  it.exptime = exptime > 0 and cur_now + exptime or 0
  return true
end
function shdict.flush_all(self)
  local z = zone_of(self)
  for _, it in pairs(z.items) do it.exptime = -1 end
end
function shdict.flush_expired(self, max_count)
  local z = zone_of(self)
  local n = 0
  max_count = max_count or 0
  for key, it in pairs(z.items) do
    if expired(it) then
      zone_remove(z, key, it)
      n = n + 1
      if max_count > 0 and n >= max_count then break end
    end
  end
  return n
end
function shdict.get_keys(self, max_count)
  local z = zone_of(self)
  if max_count == nil then max_count = 1024 end
  local keys = {}
  local it = z.head
  while it do
    if not expired(it) then
      keys[#keys + 1] = it.key
      if max_count > 0 and #keys >= max_count then break end
    end
    it = it.next
  end
  return keys
end
function shdict.capacity(self) return zone_of(self).capacity end
function shdict.free_space(self)
  local z = zone_of(self)
  local free = z.capacity - z.used
  if free < 0 then free = 0 end
  return floor(free / 4096) * 4096
end
local shdict_mt = {__index = shdict, __metatable = false}

local function declare_dict(name, capacity)
  local z = dicts[name]
  if z then
    z.capacity = capacity
  else
    dicts[name] = {capacity = capacity, used = 0, items = {}, head = nil, tail = nil}
  end
end

-- ---------------------------------------------------------------------------------
-- cjson: lua-cjson 2.1 behaviour in Lua
-- ---------------------------------------------------------------------------------
local json_decode, json_encode
do
  local STRUCTURAL = {
    [123] = "T_OBJ_BEGIN", [125] = "T_OBJ_END", [91] = "T_ARR_BEGIN", [93] = "T_ARR_END",
    [58] = "T_COLON", [44] = "T_COMMA",
  }
  -- bytes that may follow a number token (anything else: strtod's longer forms)
  local ENDS_NUMBER = {
    [32] = true, [9] = true, [10] = true, [13] = true, [44] = true, [93] = true,
    [125] = true, [58] = true, [0] = true, [123] = true, [91] = true, [34] = true,
  }
  local ESC = {
    [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n",
    [114] = "\r", [116] = "\t",
  }
  local MAX_DEPTH = 1000
  local s, pos, len

  local function fail(expected, found, at)
    error("Expected " .. expected .. " but found " .. found .. " at character " .. at, 0)
  end

  local function skip_ws()
    while pos <= len do
      local c = str_byte(s, pos)
      if c == 32 or c == 9 or c == 10 or c == 13 then pos = pos + 1 else return end
    end
  end

  local function utf8(cp)
    if cp < 0x80 then return str_char(cp) end
    if cp < 0x800 then
      return str_char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
    end
    if cp < 0x10000 then
      return str_char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return str_char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
                    0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end

  local function hex4(at)
    local h = str_sub(s, at, at + 3)
    if #h < 4 or not str_find(h, "^%x%x%x%x$") then return nil end
    return tonumber(h, 16)
  end

  -- A token scanner returning (kind, value, start): kinds as cjson names them.
  local function next_token()
    skip_ws()
    local start = pos
    if pos > len then return "T_END", nil, start end
    local c = str_byte(s, pos)
    if c == 0 then return "T_END", nil, start end  -- lua-cjson stops at a NUL byte
    local structural = STRUCTURAL[c]
    if structural then
      pos = pos + 1
      return structural, nil, start
    end
    if c == 34 then
      -- plain finds only: the JIT compiles them (character classes are not compiled)
      local quote = str_find(s, '"', pos + 1, true)
      if quote then
        local backslash = str_find(s, "\\", pos + 1, true)
        if not backslash or backslash > quote then
          local text = str_sub(s, pos + 1, quote - 1)
          pos = quote + 1
          return "T_STRING", text, start
        end
      end
      local buf, n = {}, 0
      pos = pos + 1
      while true do
        if pos > len then return "T_ERROR", "unexpected end of string", pos end
        local q = str_find(s, '"', pos, true)
        local b = str_find(s, "\\", pos, true)
        if b and (not q or b < q) then q = b end
        if not q then pos = len + 1; return "T_ERROR", "unexpected end of string", pos end
        if q > pos then n = n + 1; buf[n] = str_sub(s, pos, q - 1) end
        pos = q
        local ch = str_byte(s, pos)
        if ch == 34 then
          pos = pos + 1
          return "T_STRING", tconcat(buf), start
        end
        local e = str_byte(s, pos + 1)
        if e == nil then return "T_ERROR", "unexpected end of string", pos + 1 end
        if e == 117 then
          local cp = hex4(pos + 2)
          if not cp then return "T_ERROR", "invalid unicode escape code", pos end
          local step = 6
          if cp >= 0xD800 and cp <= 0xDBFF then
            if str_sub(s, pos + 6, pos + 7) ~= "\\u" then
              return "T_ERROR", "invalid unicode escape code", pos
            end
            local lo = hex4(pos + 8)
            if not lo or lo < 0xDC00 or lo > 0xDFFF then
              return "T_ERROR", "invalid unicode escape code", pos
            end
            cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)
            step = 12
          elseif cp >= 0xDC00 and cp <= 0xDFFF then
            return "T_ERROR", "invalid unicode escape code", pos
          end
          n = n + 1; buf[n] = utf8(cp)
          pos = pos + step
        else
          local r = ESC[e]
          if not r then return "T_ERROR", "invalid escape code", pos end
          n = n + 1; buf[n] = r
          pos = pos + 2
        end
      end
    end
    local is_num = c == 45 or (c >= 48 and c <= 57)
    if is_num then
      -- the common shapes (-)digits(.digits)(e(+-)digits), scanned byte by byte
      local p = pos
      if c == 45 then p = p + 1 end
      local d0 = p
      local b = str_byte(s, p)
      while b and b >= 48 and b <= 57 do p = p + 1; b = str_byte(s, p) end
      if p > d0 and not (p > d0 + 1 and str_byte(s, d0) == 48) then
        if b == 46 then
          p = p + 1
          local f0 = p
          b = str_byte(s, p)
          while b and b >= 48 and b <= 57 do p = p + 1; b = str_byte(s, p) end
          if p == f0 then b = -1 end
        end
        if b == 101 or b == 69 then
          local e = p + 1
          local eb = str_byte(s, e)
          if eb == 43 or eb == 45 then e = e + 1; eb = str_byte(s, e) end
          local e0 = e
          while eb and eb >= 48 and eb <= 57 do e = e + 1; eb = str_byte(s, e) end
          if e > e0 then p = e; b = eb else b = -1 end
        end
        if b == nil or ENDS_NUMBER[b] then
          local v = tonumber(str_sub(s, pos, p - 1))
          pos = p
          return "T_NUMBER", v, start
        end
      end
    end
    if not is_num then
      if str_sub(s, pos, pos + 3) == "true" then pos = pos + 4; return "T_BOOLEAN", true, start end
      if str_sub(s, pos, pos + 4) == "false" then
        pos = pos + 5
        return "T_BOOLEAN", false, start
      end
      if str_sub(s, pos, pos + 3) == "null" then pos = pos + 4; return "T_NULL", NULL, start end
      -- decode_invalid_numbers (on by default): +1, inf, nan go through strtod too
      local l3 = str_lower(str_sub(s, pos, pos + 2))
      is_num = c == 43 or l3 == "inf" or l3 == "nan"
      if not is_num then return "T_ERROR", "invalid token", start end
    end
    -- strtod: the longest prefix that is a number
    local p = pos
    local sign = 1
    local ch = str_byte(s, p)
    if ch == 43 or ch == 45 then
      if ch == 45 then sign = -1 end
      p = p + 1
    end
    local rest3 = str_lower(str_sub(s, p, p + 2))
    if rest3 == "inf" then
      local e = p + 3
      if str_lower(str_sub(s, p, p + 7)) == "infinity" then e = p + 8 end
      pos = e
      return "T_NUMBER", sign * huge, start
    elseif rest3 == "nan" then
      local e = p + 3
      if str_sub(s, e, e) == "(" then
        local close = str_find(s, "^[%w_]*%)", e + 1)
        if close then e = select(2, str_find(s, "^[%w_]*%)", e + 1)) + 1 end
      end
      pos = e
      return "T_NUMBER", 0 / 0, start
    end
    local hs, he = str_find(s, "^0[xX]%x*%.?%x*", p)
    if hs and he > hs + 1 and str_find(str_sub(s, hs + 2, he), "%x") then
      local ps, pe = str_find(s, "^[pP][+-]?%d+", he + 1)
      local mant = str_sub(s, hs + 2, he)
      local ip, fp = mant:match("^(%x*)%.?(%x*)$")
      local v = 0
      for i = 1, #ip do v = v * 16 + tonumber(str_sub(ip, i, i), 16) end
      local scale = 1 / 16
      for i = 1, #fp do v = v + tonumber(str_sub(fp, i, i), 16) * scale; scale = scale / 16 end
      if ps then
        v = v * 2 ^ tonumber(str_sub(s, ps + 1, pe))
        pos = pe + 1
      else
        pos = he + 1
      end
      return "T_NUMBER", sign * v, start
    end
    local ds, de = str_find(s, "^%d*%.?%d*", p)
    if de < ds or (de == ds and str_sub(s, ds, de) == ".") then
      return "T_ERROR", "invalid number", start
    end
    local es, ee = str_find(s, "^[eE][+-]?%d+", de + 1)
    if es then de = ee end
    local text = str_sub(s, pos, de)
    local v = tonumber(str_sub(s, p, de))
    if not v then return "T_ERROR", "invalid number", start end
    pos = de + 1
    return "T_NUMBER", sign * v, start
  end

  local parse_value

  local function found_name(kind, value)
    if kind == "T_ERROR" then return value end
    return kind
  end

  local function parse_object(depth)
    if depth > MAX_DEPTH then
      error("Found too many nested data structures (" .. depth .. ") at character " .. (pos - 1), 0)
    end
    local obj = {}
    local kind, value, at = next_token()
    if kind == "T_OBJ_END" then return obj end
    while true do
      if kind ~= "T_STRING" then fail("object key string", found_name(kind, value), at) end
      local key = value
      kind, value, at = next_token()
      if kind ~= "T_COLON" then fail("colon", found_name(kind, value), at) end
      kind, value, at = next_token()
      obj[key] = parse_value(kind, value, at, depth)
      kind, value, at = next_token()
      if kind == "T_OBJ_END" then return obj end
      if kind ~= "T_COMMA" then fail("comma or object end", found_name(kind, value), at) end
      kind, value, at = next_token()
    end
  end

  local function parse_array(depth)
    if depth > MAX_DEPTH then
      error("Found too many nested data structures (" .. depth .. ") at character " .. (pos - 1), 0)
    end
    local arr = {}
    local i = 0
    local kind, value, at = next_token()
    if kind == "T_ARR_END" then return arr end
    while true do
      i = i + 1
      arr[i] = parse_value(kind, value, at, depth)
      kind, value, at = next_token()
      if kind == "T_ARR_END" then return arr end
      if kind ~= "T_COMMA" then fail("comma or array end", found_name(kind, value), at) end
      kind, value, at = next_token()
    end
  end

  parse_value = function(kind, value, at, depth)
    if kind == "T_STRING" or kind == "T_NUMBER" or kind == "T_BOOLEAN" or kind == "T_NULL" then
      return value
    end
    if kind == "T_OBJ_BEGIN" then return parse_object(depth + 1) end
    if kind == "T_ARR_BEGIN" then return parse_array(depth + 1) end
    fail("value", found_name(kind, value), at)
  end

  json_decode = function(text)
    if type(text) ~= "string" then
      if type(text) == "number" then text = tostring(text)
      else error("bad argument #1 to 'decode' (string expected, got " .. type(text) .. ")", 0) end
    end
    s, pos, len = text, 1, #text
    local kind, value, at = next_token()
    local result = parse_value(kind, value, at, 0)
    kind, value, at = next_token()
    if kind ~= "T_END" then fail("the end", found_name(kind, value), at) end
    s = nil
    return result
  end

  local ESCAPE_OUT = {}
  for i = 0, 31 do ESCAPE_OUT[str_char(i)] = str_format("\\u%04x", i) end
  ESCAPE_OUT["\b"] = "\\b"; ESCAPE_OUT["\t"] = "\\t"; ESCAPE_OUT["\n"] = "\\n"
  ESCAPE_OUT["\f"] = "\\f"; ESCAPE_OUT["\r"] = "\\r"; ESCAPE_OUT['"'] = '\\"'
  ESCAPE_OUT["\\"] = "\\\\"; ESCAPE_OUT["/"] = "\\/"; ESCAPE_OUT["\127"] = "\\u007f"

  local function enc_string(v)
    return '"' .. str_gsub(v, '[%c"\\/\127]', ESCAPE_OUT) .. '"'
  end

  local function enc_number(v)
    if v ~= v or v == huge or v == -huge then
      error("Cannot serialise number: must not be NaN or Inf", 0)
    end
    -- lua-cjson formats with the C library's "%.14g" (ties to even), not LuaJIT's
    return native_format("%.14g", v)
  end

  local encode_value
  local function encode_table(t, depth, out)
    if depth > MAX_DEPTH then
      error("Cannot serialise, excessive nesting (" .. depth .. ")", 0)
    end
    -- array when every key is a positive integer and the array is not too sparse
    local max, items, is_array = 0, 0, true
    for k in pairs(t) do
      if type(k) == "number" and k > 0 and floor(k) == k then
        if k > max then max = k end
        items = items + 1
      else
        is_array = false
        break
      end
    end
    if is_array and max > 0 then
      if max > items * 2 and max > 10 then
        error("Cannot serialise table: excessively sparse array", 0)
      end
      out[#out + 1] = "["
      for i = 1, max do
        if i > 1 then out[#out + 1] = "," end
        encode_value(t[i], depth, out)
      end
      out[#out + 1] = "]"
      return
    end
    out[#out + 1] = "{"
    local first = true
    for k, v in pairs(t) do
      local kt = type(k)
      local key
      if kt == "string" then key = enc_string(k)
      elseif kt == "number" then key = '"' .. enc_number(k) .. '"'
      else error("Cannot serialise " .. kt .. ": table key must be a number or string", 0) end
      if not first then out[#out + 1] = "," end
      first = false
      out[#out + 1] = key
      out[#out + 1] = ":"
      encode_value(v, depth, out)
    end
    out[#out + 1] = "}"
  end

  encode_value = function(v, depth, out)
    local t = type(v)
    if t == "string" then out[#out + 1] = enc_string(v)
    elseif t == "number" then out[#out + 1] = enc_number(v)
    elseif t == "boolean" then out[#out + 1] = v and "true" or "false"
    elseif t == "nil" or v == NULL then out[#out + 1] = "null"
    elseif t == "table" then encode_table(v, depth + 1, out)
    else error("Cannot serialise " .. t .. ": type not supported", 0) end
  end

  json_encode = function(v)
    local out = {}
    encode_value(v, 0, out)
    return tconcat(out)
  end
end

local function make_cjson(safe)
  local m = {}
  m._NAME = "cjson"
  m._VERSION = "2.1.0"
  m.null = NULL
  m.empty_array = setmetatable({}, {__metatable = false})
  local function guard(f)
    if not safe then return f end
    return function(...)
      local r = {pcall(f, ...)}
      if r[1] then return select(2, unpack(r)) end
      if is_signal(r[2]) then error(r[2], 0) end
      return nil, r[2]
    end
  end
  m.decode = guard(function(text) return unhooked(json_decode, text) end)
  m.encode = guard(function(...)
    if select("#", ...) ~= 1 then error("bad argument #1 to 'encode' (expected 1 argument)", 0) end
    return unhooked(json_encode, (...))
  end)
  local function cfg(value) return function(v) return v == nil and value or v end end
  m.encode_sparse_array = function() return false, 2, 10 end
  m.encode_max_depth = cfg(1000)
  m.decode_max_depth = cfg(1000)
  m.encode_number_precision = cfg(14)
  m.encode_keep_buffer = cfg(true)
  m.encode_invalid_numbers = cfg(false)
  m.decode_invalid_numbers = cfg(true)
  m.encode_empty_table_as_object = cfg(true)
  m.new = function() return make_cjson(safe) end
  return m
end

-- ---------------------------------------------------------------------------------
-- The sandbox
-- ---------------------------------------------------------------------------------
local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- A value that is a private error passes through a script's pcall untouched.
local function safe_pcall(f, ...)
  local r = {pcall(f, ...)}
  if not r[1] and is_signal(r[2]) then error(r[2], 0) end
  return unpack(r, 1, table.maxn(r))
end
local function safe_xpcall(f, handler, ...)
  local function h(e)
    if is_signal(e) then return e end
    return handler(e)
  end
  local r = {xpcall(f, h, ...)}
  if not r[1] and is_signal(r[2]) then error(r[2], 0) end
  return unpack(r, 1, table.maxn(r))
end
local function safe_resume(co, ...)
  local r = {co_resume(co, ...)}
  if not r[1] and is_signal(r[2]) then error(r[2], 0) end
  return unpack(r, 1, table.maxn(r))
end
local function safe_wrap(f)
  local co = co_create(f)
  return function(...)
    local r = {co_resume(co, ...)}
    if not r[1] then error(r[2], 0) end
    return unpack(r, 2, table.maxn(r))
  end
end

local string_lib = copy(string)
string_lib.dump = nil
string_lib.format = emul_format
local protected = setmetatable({}, {__mode = "k"})  -- our tables scripts must not rawset

local string_mt = getmetatable("")
string_mt.__index = string_lib
string_mt.__metatable = false

local function safe_rawset(t, k, v)
  if protected[t] then error("attempt to rawset a protected table", 2) end
  return rawset(t, k, v)
end

local HTTP = {
  HTTP_CONTINUE = 100, HTTP_SWITCHING_PROTOCOLS = 101, HTTP_OK = 200, HTTP_CREATED = 201,
  HTTP_ACCEPTED = 202, HTTP_NO_CONTENT = 204, HTTP_PARTIAL_CONTENT = 206,
  HTTP_SPECIAL_RESPONSE = 300, HTTP_MOVED_PERMANENTLY = 301, HTTP_MOVED_TEMPORARILY = 302,
  HTTP_SEE_OTHER = 303, HTTP_NOT_MODIFIED = 304, HTTP_TEMPORARY_REDIRECT = 307,
  HTTP_PERMANENT_REDIRECT = 308, HTTP_BAD_REQUEST = 400, HTTP_UNAUTHORIZED = 401,
  HTTP_PAYMENT_REQUIRED = 402, HTTP_FORBIDDEN = 403, HTTP_NOT_FOUND = 404,
  HTTP_NOT_ALLOWED = 405, HTTP_NOT_ACCEPTABLE = 406, HTTP_REQUEST_TIMEOUT = 408,
  HTTP_CONFLICT = 409, HTTP_GONE = 410, HTTP_UPGRADE_REQUIRED = 426,
  HTTP_TOO_MANY_REQUESTS = 429, HTTP_CLOSE = 444, HTTP_ILLEGAL = 451,
  HTTP_INTERNAL_SERVER_ERROR = 500, HTTP_METHOD_NOT_IMPLEMENTED = 501,
  HTTP_BAD_GATEWAY = 502, HTTP_SERVICE_UNAVAILABLE = 503, HTTP_GATEWAY_TIMEOUT = 504,
  HTTP_VERSION_NOT_SUPPORTED = 505, HTTP_INSUFFICIENT_STORAGE = 507,
  HTTP_GET = 2, HTTP_HEAD = 4, HTTP_POST = 8, HTTP_PUT = 16, HTTP_DELETE = 32,
  HTTP_MKCOL = 64, HTTP_COPY = 128, HTTP_MOVE = 256, HTTP_OPTIONS = 512,
  HTTP_PROPFIND = 1024, HTTP_PROPPATCH = 2048, HTTP_LOCK = 4096, HTTP_UNLOCK = 8192,
  HTTP_PATCH = 16384, HTTP_TRACE = 32768,
  OK = 0, ERROR = -1, AGAIN = -2, DONE = -4, DECLINED = -5,
  STDERR = 0, EMERG = 1, ALERT = 2, CRIT = 3, ERR = 4, WARN = 5, NOTICE = 6, INFO = 7,
  DEBUG = 8,
}

local function resp_header_table()
  local t = {}
  local mt = {__metatable = false}
  mt.__index = function(_, k)
    if not cur_resp_headers then return nil end
    local lk = replace_underscore(tostring(k))
    for i = #cur_resp_headers, 1, -1 do
      local h = cur_resp_headers[i]
      if h[3] == lk then return h[2] or nil end
    end
    return nil
  end
  mt.__newindex = function(_, k, v)
    if cur_phase == 3 then error("API disabled in the context of set_by_lua*", 2) end
    cur_resp_headers = cur_resp_headers or {}
    local name = tostring(k)
    if str_find(name, "_", 1, true) then name = str_gsub(name, "_", "-") end
    if type(v) == "table" then v = tconcat(v, ", ") elseif v ~= nil then v = tostring(v) end
    cur_resp_headers[#cur_resp_headers + 1] = {name, v or false, replace_underscore(name)}
  end
  setmetatable(t, mt)
  protected[t] = true
  return t
end

-- A fresh ngx table for one script (its own copies; functions are shared).
local function make_ngx(script)
  local ngx = copy(HTTP)
  ngx.null = NULL
  ngx.config = {subsystem = "http", debug = false, prefix = function() return "" end,
                nginx_version = 1022001, nginx_configure = function() return "" end,
                ngx_lua_version = 10023}
  ngx.worker = {id = function() return 0 end, count = function() return 1 end,
                pid = function() return 0 end, exiting = function() return false end}
  local var = setmetatable({}, var_mt)
  protected[var] = true
  ngx.var = var
  ngx.arg = {}
  ngx.req = {
    get_headers = get_headers, get_uri_args = get_uri_args, get_query_args = get_uri_args,
    get_post_args = get_post_args, read_body = read_body, discard_body = function() end,
    get_body_data = get_body_data, get_body_file = function() return nil end,
    get_method = get_method, set_header = set_header, clear_header = clear_header,
    start_time = req_start_time, http_version = function() return 1.1 end,
    is_internal = function() return false end,
  }
  ngx.re = {match = re_match, find = re_find, gmatch = re_gmatch, sub = re_sub, gsub = re_gsub}
  ngx.exit, ngx.exec, ngx.redirect = ngx_exit, ngx_exec, ngx_redirect
  ngx.say, ngx.print = ngx_say, ngx_print
  ngx.flush = function() return 1 end
  ngx.eof = function() return 1 end
  ngx.log = ngx_log
  ngx.md5, ngx.md5_bin, ngx.sha1_bin, ngx.hmac_sha1 = md5, md5_bin, sha1_bin, hmac_sha1
  ngx.crc32_short, ngx.crc32_long = crc32_short, crc32_long
  ngx.encode_base64, ngx.decode_base64 = encode_base64, decode_base64
  ngx.escape_uri, ngx.unescape_uri = escape_uri, unescape_uri
  ngx.encode_args, ngx.decode_args = encode_args, decode_args
  ngx.quote_sql_str = quote_sql_str
  ngx.now, ngx.time, ngx.update_time, ngx.today = ngx_now, ngx_time, ngx_update_time, ngx_today
  ngx.localtime, ngx.utctime, ngx.http_time = ngx_localtime, ngx_utctime, ngx_http_time
  ngx.cookie_time, ngx.parse_http_time = ngx_cookie_time, ngx_parse_http_time
  ngx.get_phase = function()
    if cur_phase == 1 then return "rewrite" elseif cur_phase == 2 then return "access" end
    return "set"
  end
  ngx.sleep = function() error("API disabled in Grayroute routing scripts (ngx.sleep)", 2) end
  ngx.header = resp_header_table()
  local shared = setmetatable({}, {
    __metatable = false,
    __index = function(t, name)
      if not dicts[name] then return nil end
      local d = setmetatable({dicts[name]}, shdict_mt)
      rawset(t, name, d)
      return d
    end,
  })
  ngx.shared = shared
  local magic = {
    __metatable = false,
    __index = function(_, k)
      if k == "ctx" then
        if not cur_ctx then cur_ctx = {} end
        return cur_ctx
      elseif k == "status" then
        return cur_status or 0
      end
      return nil
    end,
    __newindex = function(t, k, v)
      if k == "ctx" then
        if type(v) ~= "table" then error("ctx should be a table while getting a " .. type(v), 2) end
        cur_ctx = v
      elseif k == "status" then
        cur_status = tonumber(v)
      else
        rawset(t, k, v)
      end
    end,
  }
  return setmetatable(ngx, magic)
end

-- math.randomseed would reseed the generator every script shares: it is a no-op here.
local function own_math()
  local m = copy(math)
  m.randomseed = function() end
  return m
end

local function make_env(script, chunkname)
  local ngx = make_ngx(script)
  local modules = {
    cjson = make_cjson(false),
    ["cjson.safe"] = make_cjson(true),
    ngx = ngx,
  }
  local env = {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
    pcall = safe_pcall, xpcall = safe_xpcall, print = lua_print, rawequal = rawequal,
    rawget = rawget, rawset = safe_rawset, select = select, setmetatable = setmetatable,
    getmetatable = getmetatable, tonumber = tonumber, tostring = tostring, type = type,
    unpack = unpack, _VERSION = _VERSION,
    string = copy(string_lib), table = copy(table), math = own_math(), bit = copy(bit),
    coroutine = {create = co_create, resume = safe_resume, wrap = safe_wrap,
                 status = co_status, yield = co_yield, running = co_running},
    ngx = ngx,
  }
  modules.string, modules.table, modules.math, modules.bit =
    env.string, env.table, env.math, env.bit
  env.require = function(name)
    local m = modules[name]
    if m == nil then
      error("module '" .. tostring(name) .. "' not found: Grayroute provides cjson, " ..
            "cjson.safe, ngx, string, table, math and bit to routing scripts", 2)
    end
    return m
  end
  env._G = env
  -- nginx's "_G write guard": globals live on (per script here), with one warning each
  local warned = {}
  setmetatable(env, {
    __metatable = false,
    __newindex = function(t, k, v)
      if not warned[k] then
        warned[k] = true
        if 5 <= log_level then
          local info = getinfo(2, "Sl")
          local where = info and (info.short_src .. ":" .. (info.currentline or 0) .. ": ") or ""
          py_log(5, where .. "writing a global Lua variable ('" .. tostring(k) ..
                 "') which may lead to race conditions between concurrent requests, " ..
                 "so prefer the use of 'local' variables")
        end
      end
      rawset(t, k, v)
    end,
  })
  return env
end

-- ---------------------------------------------------------------------------------
-- compile() and run()
-- ---------------------------------------------------------------------------------
-- options: phase (1 rewrite, 2 access, 3 set), budget (seconds), decision variable,
-- user variables (names, each with its initial value)
local function compile(chunkname, source, phase, budget, decision_var, ...)
  local fn, err = loadstring(source, chunkname)
  if not fn then return nil, err end
  jit_off(fn, true)
  local script = {fn = fn, phase = phase, budget = budget, decision = decision_var}
  local env = make_env(script, chunkname)
  setfenv(fn, env)
  local uservars = {}
  local n = select("#", ...)
  for i = 1, n, 2 do
    local name, value = select(i, ...)
    uservars[str_lower(name)] = value
  end
  if decision_var and uservars[decision_var] == nil then uservars[decision_var] = "" end
  script.uservars = uservars
  return script
end

local function flat_headers(list)
  if not list then return nil end
  local out = {}
  for i = 1, #list do
    local h = list[i]
    out[#out + 1] = h[1]
    out[#out + 1] = h[2] or false
  end
  return out
end

local function run(script, now)
  cur_now = now
  cur_vars = {}
  local user = {}
  for k, v in pairs(script.uservars) do user[k] = v end
  cur_user = user
  cur_ctx, cur_out, cur_status, cur_resp_headers, cur_req_headers = nil, nil, nil, nil, nil
  cur_phase = script.phase
  eff_kind, eff_a, eff_b = K_VALUE, nil, nil
  deadline, cur_budget = 0, script.budget
  sethook(hook, "", 1000)
  hook_on = true
  local ok, ret = pcall(script.fn)
  sethook()
  hook_on = false
  local body = cur_out and tconcat(cur_out) or nil
  local status = cur_status
  local rh, qh = cur_resp_headers, cur_req_headers
  cur_out, cur_resp_headers, cur_req_headers, cur_ctx = nil, nil, nil, nil
  local kind, a, b
  if ok then
    if script.phase == 3 then
      local t = type(ret)
      if t == "string" then a = ret
      elseif t == "number" then a = tostring(ret)
      else a = "" end
      kind = K_VALUE
    else
      kind = K_VALUE
    end
  elseif ret == EXIT then
    kind, a, b = eff_kind, eff_a, eff_b
  elseif ret == BUDGET then
    kind, a = K_ERROR, "CPU budget of " .. str_format("%g", script.budget * 1000) ..
                       " ms exceeded"
  else
    -- as nginx (lua_tostring): a string or a number, else "unknown reason" (a
    -- __tostring of the script's would run here, outside the CPU budget)
    local msg = ret
    if type(msg) == "number" then msg = tostring(msg)
    elseif type(msg) ~= "string" then msg = "unknown reason" end
    kind, a = K_ERROR, msg
  end
  if kind == K_VALUE and script.phase ~= 3 then
    if body then
      kind, a = K_EXIT, status or 200  -- output was sent: the script answered
    else
      local v = user[script.decision]
      if v == false then v = nil end
      a = v
    end
  end
  return kind, a, b, body, status, flat_headers(rh), flat_headers(qh)
end

return compile, run, declare_dict, function(level) log_level = level end
"""
