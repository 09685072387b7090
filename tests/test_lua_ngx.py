"""nginx's request semantics in Python (lua_compat/ngx.py) and the ngx.* API as scripts
see it. The same behaviours are checked against a real nginx by test_lua_nginx.py (the
probe scripts); these tests pin them down case by case and run without nginx."""

from __future__ import annotations

import pytest

from lua_compat.ngx import NgxRequest, parse_args, parse_complex_uri, unescape_component
from lua_compat.runtime import LuaRuntime, lua_available


def request(
    target: str = "/", headers: list[tuple[str, str]] | None = None, body: bytes | None = None
) -> NgxRequest:
    return NgxRequest(
        b"POST" if body is not None else b"GET",
        target.encode(),
        [(n.encode(), v.encode()) for n, v in headers or []],
        b"192.0.2.1",
        body,
    )


# -- $uri ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "uri"),
    [
        ("/a/b", "/a/b"),
        ("/a//b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/%2e%2e/b", "/b"),
        ("/%41%2f", "/A/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/p%3Fq", "/p?q"),
        ("/x?y", "/x"),
        ("/x#frag", "/x"),
        ("/a+b", "/a+b"),
    ],
)
def test_uri_is_normalised_like_nginx(path: str, uri: str) -> None:
    assert request(path).uri == uri.encode()


@pytest.mark.parametrize("path", ["/..", "/a/../..", "/%zz", "/%4", "/%00"])
def test_uri_nginx_refuses(path: str) -> None:
    assert parse_complex_uri(path.encode()) is None or not request(path).uri


# -- arguments ----------------------------------------------------------------------------


def test_arg_is_raw_and_case_insensitive() -> None:
    r = request("/x?a=1&UID=4%2B2&uid=9")
    assert r.variable(b"arg_uid") == b"4%2B2"  # not decoded; the first, any case
    assert r.variable(b"arg_a") == b"1"
    assert r.variable(b"arg_b") is None
    assert request("/x?xuid=1&uid=2").variable(b"arg_uid") == b"2"
    assert request("/x?uid").variable(b"arg_uid") is None
    assert request("/x?uid=").variable(b"arg_uid") == b""
    assert request("/x").variable(b"args") is None
    assert request("/x?").variable(b"args") == b""


def test_uri_args_are_decoded() -> None:
    assert parse_args(b"a=1&b=x+y%20z&c&=v&&a=2&d=%zz") == [
        (b"a", b"1"),
        (b"b", b"x y z"),
        (b"c", True),
        (b"a", b"2"),
        (b"d", b"%zz"),
    ]
    assert parse_args(b"a=1&b=2&c=3", 2) == [(b"a", b"1"), (b"b", b"2")]
    assert unescape_component(b"%e4%b8%ad+%") == "\u4e2d %".encode()


# -- headers and cookies ------------------------------------------------------------------


def test_http_variables_take_the_first_header() -> None:
    r = request("/", [("X-User-Id", "1"), ("x-user-id", "2"), ("X_User_Id", "3")])
    assert r.variable(b"http_x_user_id") == b"1"
    pairs, truncated = r.header_pairs()
    assert pairs == [(b"x-user-id", b"1"), (b"x-user-id", b"2")]  # X_User_Id is dropped
    assert not truncated


def test_joined_headers() -> None:
    r = request(
        "/",
        [
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("X-Forwarded-For", "2.2.2.2"),
        ],
    )
    assert r.variable(b"http_cookie") == b"a=1; b=2"
    assert r.variable(b"http_x_forwarded_for") == b"1.1.1.1, 2.2.2.2"


@pytest.mark.parametrize(
    ("cookie", "uid"),
    [
        ("uid=7", "7"),
        ("a=1; uid=7", "7"),
        ("a=1;uid=7", "7"),
        ("UID=7", "7"),
        ("uid = 7 ;", "7 "),
        ("uid = 7 ", "7"),
        ("xuid=1; uid=2", "2"),
        ("x=uid=3", None),
        ("uid=1, uid=2", "1, uid=2"),  # the value runs to ';' only
        ("a=1, uid=4", "4"),
        ("uid=", ""),
        ("uid", None),
        ("uid=%31", "%31"),
    ],
)
def test_cookie_variable(cookie: str, uid: str | None) -> None:
    got = request("/", [("Cookie", cookie)]).variable(b"cookie_uid")
    assert got == (None if uid is None else uid.encode())


def test_host() -> None:
    assert request("/", [("Host", "API.Example.com:8080")]).variable(b"host") == b"api.example.com"
    assert request("/", [("Host", "example.com.")]).variable(b"host") == b"example.com"
    assert request("http://Other.org/x").variable(b"host") == b"other.org"


def test_body_in_memory_follows_client_body_buffer_size() -> None:
    small = request("/", body=b"x" * 10239)
    large = request("/", body=b"x" * 10240)
    for r in (small, large):
        r.body_read = True
    assert small.body_data() == b"x" * 10239
    assert large.body_data() is None


# -- the ngx API in Lua -------------------------------------------------------------------

needs_lua = pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")


@pytest.fixture(scope="module")
def rt() -> LuaRuntime:
    runtime = LuaRuntime()
    runtime.declare_shared_dict("d", 4096)
    return runtime


def lua(rt: LuaRuntime, source: str, r: NgxRequest | None = None) -> str | None:
    return rt.compile(source, "t.lua").run(r or request("/x?uid=42")).value


@needs_lua
def test_numbers_become_text_as_in_nginx(rt: LuaRuntime) -> None:
    # LuaJIT's "%.14g" as in nginx's LuaJIT: exact ties round away from zero
    assert lua(rt, "ngx.var.backend = 123456789012345") == "1.2345678901235e+14"
    assert lua(rt, "ngx.var.backend = tostring(12345678901234.5)") == "12345678901235"
    assert lua(rt, "ngx.var.backend = string.format('%.2f', 0.125)") == "0.13"
    assert lua(rt, "ngx.var.backend = 1/3") == "0.33333333333333"
    assert lua(rt, "ngx.var.backend = 2^53") == "9.007199254741e+15"
    assert lua(rt, "ngx.var.backend = string.format('%d|%5s|%x', 42.9, 7, 255)") == "42|    7|ff"


@needs_lua
def test_get_headers_table(rt: LuaRuntime) -> None:
    r = request("/", [("X-A", "1"), ("x-a", "2"), ("Content-Type", "text/plain")])
    src = """
      local h = ngx.req.get_headers()
      ngx.var.backend = table.concat({h["x-a"][1], h.x_a[2], h["Content-Type"],
        tostring(h.missing), tostring(select(2, ngx.req.get_headers(1)))}, ",")
    """
    assert lua(rt, src, r) == "1,2,text/plain,nil,truncated"


@needs_lua
def test_uri_args_table(rt: LuaRuntime) -> None:
    src = """
      local a = ngx.req.get_uri_args()
      ngx.var.backend = table.concat({type(a.uid), a.uid[1], a.uid[2], tostring(a.flag),
        a.sp}, ",")
    """
    assert lua(rt, src, request("/x?uid=1&flag&uid=2&sp=a+b")) == "table,1,2,true,a b"


@needs_lua
def test_post_args_need_read_body(rt: LuaRuntime) -> None:
    r = request("/", [("Content-Type", "application/x-www-form-urlencoded")], body=b"uid=42")
    src = """
      local ok, err = pcall(ngx.req.get_post_args)
      ngx.req.read_body()
      ngx.var.backend = tostring(ok) .. ":" .. ngx.req.get_post_args().uid .. ":" ..
        ngx.req.get_body_data() .. ":" .. ngx.var.request_body
    """
    assert lua(rt, src, r) == "false:42:uid=42:uid=42"


@needs_lua
def test_regex(rt: LuaRuntime) -> None:
    src = r"""
      local m = ngx.re.match("MyApp/5.2 x", [[MyApp/(?<major>\d+)\.(\d+)(\.\d+)?]], "jo")
      local from, to = ngx.re.find("abc123", "[0-9]+", "jo")
      local s, n = ngx.re.gsub("a-b-c", "-", "+")
      local bad, err = ngx.re.match("x", "(", "jo")
      local parts = {}
      for m2 in ngx.re.gmatch("a1b22c333", [[\d+]]) do parts[#parts + 1] = m2[0] end
      ngx.var.backend = table.concat({m[0], m.major, m[2], tostring(m[3]), from, to, s, n,
        tostring(bad), tostring(err ~= nil), table.concat(parts, ";"),
        tostring(ngx.re.find("ABC", "b", "i")), tostring(ngx.re.match("xab", "ab", "a"))}, ",")
    """
    assert lua(rt, src) == "MyApp/5.2,5,2,false,4,6,a+b+c,2,nil,true,1;22;333,2,nil"


@needs_lua
def test_hashes_and_encodings(rt: LuaRuntime) -> None:
    src = """
      ngx.var.backend = table.concat({ngx.md5("hello"), ngx.crc32_short("hello"),
        ngx.crc32_long("hello"), ngx.encode_base64("hi?"), ngx.decode_base64("aGk/"),
        ngx.escape_uri("a b/c?"), ngx.unescape_uri("a%20b+c"), ngx.md5(nil), #ngx.md5_bin("x"),
        #ngx.sha1_bin("x"), ngx.quote_sql_str("it's")}, ",")
    """
    assert lua(rt, src) == (
        "5d41402abc4b2a76b9719d911017c592,907060870,907060870,aGk/,hi?,a%20b%2Fc%3F,a b c,"
        "d41d8cd98f00b204e9800998ecf8427e,16,20,'it\\'s'"
    )


@needs_lua
def test_shared_dict_methods(rt: LuaRuntime) -> None:
    src = """
      local d = ngx.shared.d
      d:flush_all() d:flush_expired()
      local r = {}
      local function add(...)
        for i = 1, select("#", ...) do r[#r + 1] = tostring((select(i, ...))) end
      end
      add(d:set("a", 1))
      add(d:add("a", 2))
      add(d:replace("b", 1))
      add(d:incr("a", 5))
      add(d:incr("n", 1))
      add(d:incr("n", 1, 10))
      add(d:get("a"))
      add(d:set("f", "x", 0, 7))
      add(d:get("f"))
      add(d:set("t", true))
      add(d:get("t"))
      add(d:rpush("l", "x"), d:lpush("l", "y"), d:llen("l"), d:lpop("l"), d:rpop("l"), d:llen("l"))
      add(d:get({}))
      add(d:set("", 1))
      add(d:delete("a"), d:get("a"))
      add(d:set("e", 1, 0.001))
      ngx.var.backend = table.concat(r, ",")
    """
    assert lua(rt, src) == (
        "true,nil,false,false,exists,false,false,not found,false,6,nil,not found,11,nil,false,"
        "6,true,nil,false,x,7,true,nil,false,true,1,2,2,y,x,0,nil,nil,empty key,true,nil,"
        "true,nil,false"
    )


@needs_lua
def test_shared_dict_evicts_least_recently_used(rt: LuaRuntime) -> None:
    src = """
      local d = ngx.shared.d
      d:flush_all() d:flush_expired()
      local forcible_seen = false
      for i = 1, 100 do
        local ok, err, forcible = d:set("k" .. i, string.rep("v", 50))
        forcible_seen = forcible_seen or forcible
      end
      local ok, err = d:safe_set("big", string.rep("x", 8000))
      ngx.var.backend = tostring(forcible_seen) .. "," .. tostring(d:get("k1")) .. "," ..
        tostring(d:get("k100") ~= nil) .. "," .. tostring(ok) .. "," .. tostring(err)
    """
    assert lua(rt, src) == "true,nil,true,false,no memory"


@needs_lua
def test_null_is_shared_by_ngx_and_cjson(rt: LuaRuntime) -> None:
    src = """
      local cjson = require "cjson"
      local v = cjson.decode('[null]')[1]
      ngx.var.backend = tostring(v == ngx.null) .. tostring(v == cjson.null) .. tostring(ngx.null)
        .. type(ngx.null)
    """
    assert lua(rt, src) == "truetrueuserdata: NULLuserdata"
