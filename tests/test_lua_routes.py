"""The `lua:` route action and the `split_clients:` split mode in the rule engine:
validation with positions and hints, and decide() for every outcome of a script."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from test_split_clients import key_with_hash

from lua_compat.runtime import lua_available
from lua_compat.split_clients import SplitClients
from router.errors import RulesError
from router.rules import Decision, RequestView, Snapshot, check_file, decide, load_snapshot

needs_lua = pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")

HEAD = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001"]}
  v2: {endpoints: ["127.0.0.1:9002"]}
  canary: {endpoints: ["127.0.0.1:9003"]}
lua_shared_dicts:
  gray: 1MiB
routes:
"""

SCRIPT = """
local uid = ngx.var.http_x_user_id
if uid == "1" then return ngx.exec("@canary") end
if uid == "2" then return ngx.exit(403) end
if uid == "3" then return ngx.redirect("/login", 301) end
if uid == "4" then error("boom") end
if uid == "5" then ngx.var.backend = "nowhere" return end
if uid == "6" then return ngx.exit(444) end
if uid == "7" then ngx.req.set_header("X-Gray", "yes") end
if uid == "8" then ngx.var.backend = ngx.shared.gray:incr("n", 1, 0) return end
if uid then ngx.var.backend = "green" return end
"""


def write(tmp_path: Path, routes: str, script: str = SCRIPT) -> Path:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    (tmp_path / "scripts" / "gray.lua").write_text(script)
    path = tmp_path / "rules.yaml"
    path.write_text(HEAD + textwrap.dedent(routes))
    return path


def view(uid: str | None = None, client_ip: str = "10.0.0.1", **headers: str) -> RequestView:
    h = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    if uid is not None:
        h["x-user-id"] = uid
    return RequestView("GET", "/orders", "", "api.example.com", h, client_ip)


LUA_ROUTE = """\
  - name: gray
    lua:
      file: scripts/gray.lua
      map: {"@canary": canary, green: v2}
      default: v1
"""


@needs_lua
def test_lua_route_decisions(tmp_path: Path) -> None:
    snap = load_snapshot(str(write(tmp_path, LUA_ROUTE)))

    def d(uid: str | None) -> Decision:
        return decide(snap, view(uid))

    assert (d("1").upstream, d("1").reason) == ("canary", "lua scripts/gray.lua: ngx.exec(@canary)")
    assert (d("2").upstream, d("2").status) == (None, 403)
    assert (d("3").status, d("3").location) == (301, "/login")
    assert (d("4").upstream, d("4").status) == (None, 500)  # as nginx: no fallback, a 500
    assert "boom" in d("4").reason
    assert d("5").upstream == "v1"  # not an upstream: the default
    assert d("6").status == 444
    assert d("7").request_headers == (("X-Gray", "yes"),)
    assert d("9").upstream == "v2"  # "green" through the map
    assert d(None).upstream == "v1"  # nothing decided: the default
    assert d("9").as_dict()["route"] == "gray"
    assert "status" in d("2").as_dict() and "status" not in d("9").as_dict()


@needs_lua
def test_lua_fallback_and_no_default(tmp_path: Path) -> None:
    routes = """\
      - name: gray
        lua: {file: scripts/gray.lua, fallback: v1}
    """
    snap = load_snapshot(str(write(tmp_path, routes)))
    assert decide(snap, view("4")).upstream == "v1"
    assert decide(snap, view(None)).status == 500  # empty $backend: nginx's invalid URL prefix
    assert decide(snap, view("5")).status == 502  # no such upstream: nginx's no resolver
    assert decide(snap, view("1")).status == 502  # @canary is not mapped


@needs_lua
def test_set_phase_and_shared_dicts(tmp_path: Path) -> None:
    script = 'return ngx.shared.gray:incr("hits", 1, 0) % 2 == 0 and "v2" or "v1"'
    routes = """\
      - name: setter
        lua: {file: scripts/gray.lua, phase: set}
    """
    snap = load_snapshot(str(write(tmp_path, routes, script)))
    assert [decide(snap, view()).upstream for _ in range(4)] == ["v1", "v2", "v1", "v2"]


@needs_lua
def test_lua_route_reads_the_body_and_the_headers_it_names(tmp_path: Path) -> None:
    script = """
      ngx.req.read_body()
      local body = ngx.req.get_body_data() or ""
      ngx.var.backend = body:find("gray", 1, true) and "v2" or "v1"
    """
    snap = load_snapshot(
        str(write(tmp_path, "  - name: b\n    lua: {file: scripts/gray.lua}\n", script))
    )
    route = snap.routes[0]
    v = view()
    assert route.wants_body(v)
    assert route.body_limit >= 10240
    v.body, v.body_complete = b'{"gray": 1}', True
    assert decide(snap, v).upstream == "v2"
    v.body, v.body_complete = b"x" * 20000, False  # larger than nginx keeps in memory
    assert decide(snap, v).upstream == "v1"
    snap2 = load_snapshot(str(write(tmp_path, LUA_ROUTE)))
    assert "x-user-id" in snap2.header_names and "host" in snap2.header_names
    assert not snap2.routes[0].wants_body(view())


@needs_lua
def test_raw_headers_give_nginx_semantics(tmp_path: Path) -> None:
    script = 'ngx.var.backend = ngx.req.get_headers()["x-v"][2]'
    snap = load_snapshot(
        str(write(tmp_path, "  - name: h\n    lua: {file: scripts/gray.lua}\n", script))
    )
    assert snap.wants_raw_headers
    v = view()
    v.raw_headers = [(b"X-V", b"v1"), (b"X-V", b"canary")]
    assert decide(snap, v).upstream == "canary"


def test_split_clients_route_is_nginx_exact(tmp_path: Path) -> None:
    routes = """\
      - name: checkout
        split_clients:
          key: "${remote_addr}AAA"
          buckets:
            - "0.5%": canary
            - "2.0%": v2
            - "*": v1
    """
    snap: Snapshot = load_snapshot(str(write(tmp_path, routes)))
    table = SplitClients.build([("0.5%", "canary"), ("2.0%", "v2"), ("*", "v1")])
    seen = set()
    for i in range(3000):
        ip = f"10.{i % 256}.{i // 256}.7"
        got = decide(snap, view(client_ip=ip))
        assert got.upstream == table.pick(f"{ip}AAA".encode())
        seen.add(got.upstream)
    assert seen == {"canary", "v2", "v1"}
    assert "split_clients ${remote_addr}AAA -> " in got.reason


def test_split_clients_unmatched_goes_where_the_file_says(tmp_path: Path) -> None:
    routes = """\
      - name: pay
        split_clients:
          key: "$http_x_key"
          buckets: [{"50%": v2}, {"50%": v1}]
          unmatched: canary
    """
    snap = load_snapshot(str(write(tmp_path, routes)))
    assert "x-key" in snap.header_names
    top = 2 * (5000 * 0xFFFFFFFF // 10000)  # the two highest hashes are in no bucket
    rng = random.Random(3)
    for target, expected in [(top, "canary"), (0xFFFFFFFF, "canary"), (top - 1, "v1"), (0, "v2")]:
        key = key_with_hash(target, rng).decode()
        got = decide(snap, view(x_key=key))
        assert got.upstream == expected, (target, got.reason)
    cookie = load_snapshot(str(write(tmp_path, routes.replace("$http_x_key", "$cookie_uid"))))
    assert "cookie" in cookie.header_names and cookie.wants_raw_headers
    assert decide(cookie, view(cookie="a=b; uid=42")).upstream == SplitClients.build(
        [("50%", "v2"), ("50%", "v1")]
    ).pick(b"42")


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ("  - name: x\n    lua: {file: scripts/none.lua}\n", "cannot read"),
        ("  - name: x\n    lua: {file: scripts/gray.lua, phase: content}\n", "unknown phase"),
        ("  - name: x\n    lua: {file: scripts/gray.lua, map: {a: v9}}\n", "unknown upstream"),
        (
            "  - name: x\n    lua: {file: scripts/gray.lua, phase: set, var: b}\n",
            "a set-phase script returns its decision",
        ),
        (
            "  - name: x\n    to: v1\n    lua: {file: scripts/gray.lua}\n",
            "a route has one of `to`, `split`, `split_clients`, `lua`, `direct_response` and "
            "`redirect`",
        ),
        (
            '  - name: x\n    split_clients: {key: "$arg_u",'
            ' buckets: [{"60%": v1}, {"50%": v2}]}\n',
            "percent total is greater than 100%",
        ),
        (
            '  - name: x\n    split_clients: {key: "$arg_u", buckets: [{"0.125%": v1}]}\n',
            'invalid percent value "0.125%"',
        ),
        (
            '  - name: x\n    split_clients: {key: "$arg_u", buckets: [{"10%": v1}]}\n',
            "the buckets cover 10% and have no",
        ),
        (
            '  - name: x\n    split_clients: {key: "$1", buckets: [{"*": v1}]}\n',
            "regular expression captures",
        ),
    ],
)
def test_rule_file_errors(tmp_path: Path, routes: str, message: str) -> None:
    if "lua:" in routes and lua_available() is not None:
        pytest.skip(lua_available() or "")
    with pytest.raises(RulesError) as exc:
        load_snapshot(str(write(tmp_path, routes)))
    assert message in str(exc.value)
    assert "rules.yaml:" in str(exc.value)


@needs_lua
def test_a_script_that_does_not_compile_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "  - name: x\n    lua: {file: scripts/gray.lua}\n", "if then end")
    problems = check_file(str(path))
    assert len(problems) == 1
    text = str(problems[0])
    assert "rules.yaml:10:" in text and "does not compile: scripts/gray.lua:1:" in text


@needs_lua
def test_user_variables_and_a_custom_decision_variable(tmp_path: Path) -> None:
    script = "ngx.var.target = ngx.var.start ngx.var.start = 'changed'"
    routes = """\
      - name: vars
        lua:
          file: scripts/gray.lua
          var: target
          variables: {start: v2}
    """
    snap = load_snapshot(str(write(tmp_path, routes, script)))
    assert decide(snap, view()).upstream == "v2"
    assert decide(snap, view()).upstream == "v2"  # every request starts from the file's values


@needs_lua
def test_what_a_script_says_is_utf8_text(tmp_path: Path) -> None:
    script = """
      local uid = ngx.var.http_x_user_id
      if uid == "1" then return ngx.exec("@灰度") end
      if uid == "2" then ngx.var.backend = "café" return end
      if uid == "3" then return ngx.redirect("/caf\\xe9", 302) end
      ngx.var.backend = uid
    """
    routes = """\
      - name: gray
        lua: {file: scripts/gray.lua, map: {"@灰度": canary, café: v2}, default: v1}
    """
    snap = load_snapshot(str(write(tmp_path, routes, script)))
    assert decide(snap, view("1")).upstream == "canary"
    assert decide(snap, view("2")).upstream == "v2"
    # bytes that are not UTF-8 are kept, and written back as they were (wire_bytes)
    redirect = decide(snap, view("3"))
    assert redirect.location == "/caf\udce9"
    assert redirect.location.encode("utf-8", "surrogateescape") == b"/caf\xe9"
    # the request's own UTF-8 reaches the script as bytes and comes back as the same text
    assert decide(snap, view("张王")).reason == "lua scripts/gray.lua: $backend = '张王' -> default"
