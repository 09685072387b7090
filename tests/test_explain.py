"""`grayroute explain`: JSON lines in, one decision per request out, as the router decides.

The library and the command on their own first; then the differential test: a corpus of
requests drawn by hypothesis goes through a real `grayroute serve` (real upstreams that
answer with their version) and through `explain`, over a rule file that uses every rule
feature, and every decision must be the same.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lua_compat.nginx_check import ProbeRequest, ScriptSpec, nginx_unavailable, running_nginx
from lua_compat.nginx_check import send_raw as send_raw_request
from lua_compat.runtime import lua_available
from lua_compat.split_clients import SplitClients
from router.demo import DemoUpstream, start_upstream
from router.errors import RulesError
from router.explain import (
    WireRequest,
    decide_request,
    explain_line,
    read_request,
    run_explain,
    view_from_request,
)
from router.rules import Snapshot, load_snapshot
from router.rules.user_id import extract_user_id, source_outcomes

from conftest import Serve

GRAYROUTE = str(Path(sys.executable).parent / "grayroute")
needs_lua = pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")

RULES = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:18081"]}
  v1.1: {endpoints: ["127.0.0.1:18082"]}
  v2: {endpoints: ["127.0.0.1:18083"]}
user_id:
  - header: X-User-Id
  - cookie: uid
  - query: userId
  - json: user.id
  - form: userId
body_limit: 64
routes:
  - name: orders
    match: {hosts: [api.example.com], path_prefix: /orders}
    pins:
      - {to: v2, users: ["42", "张王"]}
      - {to: v2, headers: {X-App-Version: "^3\\\\."}}
      - {to: v2, client_cidrs: [192.168.0.0/16]}
    split: {v1: 90, v1.1: 10}
  - name: rest
    to: v1
"""


@pytest.fixture
def rules(tmp_path: Path) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return str(path)


def line(**request: object) -> bytes:
    return orjson.dumps(request) + b"\n"


def run(
    rules: str, tmp_path: Path, lines: list[bytes], why: bool = False
) -> tuple[int, list[dict[str, Any]]]:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"".join(lines))
    out = io.BytesIO()
    status = run_explain(rules, str(requests), out, why=why)
    return status, [orjson.loads(x) for x in out.getvalue().splitlines()]


def decision(
    route: str | None, upstream: str | None, user: str | None, source: str | None, reason: str
) -> dict[str, object]:
    return {"route": route, "upstream": upstream, "user_id": user, "user_id_source": source,
            "reason": reason}


def without_sources(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "user_id_sources"}


API = ["Host", "API.example.com:8443"]
JSON_CT = ["Content-Type", "application/json"]


def test_end_to_end(rules: str, tmp_path: Path) -> None:
    status, results = run(rules, tmp_path, [
        line(method="GET", path="/orders/1", headers=[API, ["X-User-Id", "42"]]),
        line(method="GET", path="/orders/1", headers=[API, ["x-app-version", "3.0"]]),
        line(method="GET", path="/orders", headers=[API], client_ip="192.168.7.7"),
        line(method="GET", path="/orders?userId=42", headers=[API]),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body='{"user": {"id": 42}}'),
        line(method="POST", path="/orders", headers=[API, ["Content-Type",
             "application/x-www-form-urlencoded"]], body="a=1&userId=42"),
        line(method="GET", path="/orders", headers=[API, ["Cookie", "a=b; uid=42"]]),
        line(method="GET", path="/elsewhere", headers=[API, ["X-User-Id", "7"]]),
        line(path="/", headers=[]),
    ])
    assert status == 0
    assert [without_sources(r) for r in results] == [
        decision("orders", "v2", "42", "header:X-User-Id", "pin[0] users"),
        decision("orders", "v2", None, None, "pin[1] headers"),
        decision("orders", "v2", None, None, "pin[2] client_cidrs"),
        decision("orders", "v2", "42", "query:userId", "pin[0] users"),
        decision("orders", "v2", "42", "json:user.id", "pin[0] users"),
        decision("orders", "v2", "42", "form:userId", "pin[0] users"),
        decision("orders", "v2", "42", "cookie:uid", "pin[0] users"),
        decision("rest", "v1", "7", "header:X-User-Id", "to v1"),
        decision("rest", "v1", None, None, "to v1"),
    ]
    # A result without a user ID says what each source gave; one with a user ID does not.
    assert results[1]["user_id_sources"] == {
        "header:X-User-Id": "absent: no X-User-Id header",
        "cookie:uid": "absent: no Cookie header",
        "query:userId": "absent: no userId= in the query",
        "json:user.id": "wrong content type: none (this source reads application/json or "
                        "*/*+json)",
        "form:userId": "wrong content type: none (this source reads "
                       "application/x-www-form-urlencoded)",
    }
    assert "user_id_sources" not in results[0]


def test_split_answers_match_decide_and_are_sticky(rules: str, tmp_path: Path) -> None:
    lines = [line(path="/orders", headers=[API, ["X-User-Id", str(u)]]) for u in range(100, 300)]
    _, first = run(rules, tmp_path, lines)
    _, second = run(rules, tmp_path, lines)
    assert first == second
    assert {r["upstream"] for r in first} == {"v1", "v1.1"}
    assert all(str(r["reason"]).startswith("split by user ID -> ") for r in first)


def test_host_header_rules(rules: str, tmp_path: Path) -> None:
    _, results = run(rules, tmp_path, [
        line(path="/orders", headers=[["X-User-Id", "42"]]),  # no Host: no host match
        line(path="http://api.example.com/orders", headers=[["X-User-Id", "42"]]),
        line(path="/orders", headers=[["host", "other.com"], ["Host", "api.example.com"]]),
    ])
    assert [r.get("route") for r in results] == ["rest", "orders", None]
    # The router answers two Host headers with a 400 (RFC 9112 3.2): so does explain.
    assert results[2] == {"line": 3, "error": "the router refuses this request (400): "
                                              "more than one Host header"}


def test_only_the_first_of_repeated_headers_counts(rules: str, tmp_path: Path) -> None:
    _, results = run(rules, tmp_path, [
        line(path="/orders", headers=[API, ["X-User-Id", "7"], ["x-user-id", "42"]]),
    ])
    assert results[0]["user_id"] == "7"


def test_text_is_utf8_and_no_line_crashes(rules: str, tmp_path: Path) -> None:
    ids = ["张王", "😀", "café", "Ünïcödé", "ÿ"]
    status, results = run(rules, tmp_path, [
        line(path="/orders", headers=[API, ["X-User-Id", uid]]) for uid in ids
    ] + [line(path="/orders", headers=[API, ["X-User-Id", "42"]])])
    assert status == 0
    assert [r["user_id"] for r in results] == [*ids, "42"]
    assert results[0]["reason"] == "pin[0] users"  # 张王 in the rule file is this user


def test_raw_bytes_where_text_would_go(rules: str, tmp_path: Path) -> None:
    latin1 = base64.b64encode("é".encode("latin-1")).decode()
    utf8 = base64.b64encode("张王".encode()).decode()
    _, results = run(rules, tmp_path, [
        line(path="/orders", headers=[API, ["X-User-Id", {"base64": utf8}]]),
        line(path="/orders", headers=[API, ["X-User-Id", {"base64": latin1}]]),
        line(path={"base64": base64.b64encode(b"/orders?userId=42").decode()}, headers=[API]),
    ])
    assert results[0]["user_id"] == "张王" and results[0]["reason"] == "pin[0] users"
    # A user ID that is not UTF-8 is shown with a replacement character, and exactly.
    assert results[1]["user_id"] == "\ufffd"
    assert results[1]["user_id_base64"] == latin1
    assert results[2]["user_id"] == "42"


def test_body_over_the_limit_yields_no_id(rules: str, tmp_path: Path) -> None:
    fits = '{"user": {"id": 42}, "pad": "' + "x" * 20 + '"}'
    too_big = '{"user": {"id": 42}, "pad": "' + "x" * 60 + '"}'  # body_limit is 64 bytes
    _, results = run(rules, tmp_path, [
        line(method="POST", path="/orders", headers=[API, JSON_CT], body=fits),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body=too_big),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body="{not json"),
        line(method="POST", path="/orders", headers=[API, ["Content-Type", "text/plain"]],
             body='{"user": {"id": 42}}'),
    ])
    assert [r["user_id"] for r in results] == ["42", None, None, None]
    assert str(results[1]["reason"]).startswith("split at random")
    assert results[1]["user_id_sources"]["json:user.id"] == (
        "the body (91 bytes) is larger than body_limit (64 bytes)"
    )
    assert results[2]["user_id_sources"]["json:user.id"].startswith("not JSON: ")
    assert results[3]["user_id_sources"]["json:user.id"] == (
        "wrong content type: `text/plain` (this source reads application/json or */*+json)"
    )


def test_raw_bytes_body(rules: str, tmp_path: Path) -> None:
    good = base64.b64encode(b'{"user": {"id": "42"}}').decode()
    latin1 = base64.b64encode('{"user": {"id": "é"}}'.encode("latin-1")).decode()
    _, results = run(rules, tmp_path, [
        line(method="POST", path="/orders", headers=[API, JSON_CT], body_base64=good),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body_base64=latin1),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body={"base64": good}),
    ])
    assert [r["user_id"] for r in results] == ["42", None, "42"]
    assert results[1]["user_id_sources"]["json:user.id"].startswith("not JSON: ")


def test_why_shows_every_source(rules: str, tmp_path: Path) -> None:
    form_ct = ["Content-Type", "application/x-www-form-urlencoded"]
    _, results = run(rules, tmp_path, [
        line(path="/orders?userId=7", headers=[API, ["Cookie", "a=1"]]),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body='{"user": {"id": 4.5}}'),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body='{"user": {"id": true}}'),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body='{"user": [1]}'),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body='{"user": {"id": ""}}'),
        line(method="POST", path="/orders", headers=[API, JSON_CT], body='{"user": {}}'),
        line(method="POST", path="/orders", headers=[API, form_ct], body={"base64": "/w=="}),
        line(path="/orders?userId=%FF", headers=[API, ["X-User-Id", ""]]),
        line(method="POST", path="/orders", headers=[API, form_ct]),
    ], why=True)
    assert results[0]["user_id_sources"] == {
        "header:X-User-Id": "absent: no X-User-Id header",
        "cookie:uid": "absent: no uid= in the Cookie header",
        "query:userId": "found",
        "json:user.id": "not tried: an earlier source gave the user ID",
        "form:userId": "not tried: an earlier source gave the user ID",
    }
    json_outcomes = [r["user_id_sources"]["json:user.id"] for r in results[1:6]]
    assert json_outcomes == [
        "a float (4.5) where a string or an integer was expected",
        "true/false where a string or an integer was expected",
        "absent: user is a list, not an object",
        "empty",
        "absent: no user.id in the body",
    ]
    assert results[6]["user_id_sources"]["form:userId"] == (
        "the body is not UTF-8 (invalid start byte at byte 0)"
    )
    assert results[7]["user_id_sources"]["header:X-User-Id"] == "empty"
    assert results[7]["user_id_sources"]["query:userId"] == (
        "percent-encoded bytes that are not UTF-8"
    )
    assert results[8]["user_id_sources"]["form:userId"] == "absent: no body"


def test_bad_lines_are_reported_in_place(rules: str, tmp_path: Path) -> None:
    status, results = run(rules, tmp_path, [
        b"not json\n",
        b"\n",
        b"[1, 2]\n",
        line(path=5),
        line(path="/orders", headers=[["X-User-Id"]]),
        line(path="/orders", headers={"X-User-Id": "1"}),
        line(path="/orders", body_base64="%%%"),
        line(path="/orders", headers=[["X User", "1"]]),
        line(path="/orders", headers=[["X-User-Id", "1\r\nX-Evil: 2"]]),
        line(path="/a b"),
        line(path="/café"),
        line(method="FETCH", path="/"),
        line(method="POST", path="/", headers=[["Content-Length", "9"]], body="12"),
        line(path="/orders", headers=[["X-User-Id", {"hex": "00"}]]),
        b'{"path": "/orders", "headers": [["X-User-Id", "\\ud800"]]}\n',
        "{\"path\": \"/orders\", \"headers\": [[\"X-User-Id\", \"张王\"]]}\n".encode(),
    ])
    assert status == 1
    assert [r.get("line") for r in results] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                                None]
    errors = [r["error"] for r in results[:-1]]
    assert errors[0].startswith("not JSON: ")
    assert errors[1] == 'expected a JSON object like {"method": "GET", "path": "/"}'
    assert errors[2] == '"path" must be a string (or {"base64": "..."} for raw bytes)'
    assert errors[3].startswith("\"headers\": ['X-User-Id'] is not a [name, value] pair")
    assert errors[4] == '"headers" must be a list of [name, value] pairs'
    assert errors[5].startswith('"body_base64" is not base64')
    assert errors[6].startswith("\"headers\": 'X User' is not a header name")
    assert errors[7] == ('"headers": the value of X-User-Id has a line break or NUL; '
                         "the router refuses this request (400)")
    assert errors[8].startswith("\"path\": b'/a b' has a space or a control character")
    assert errors[9] == ("the router refuses this request (400): Invalid char in url path "
                         "(percent-encode other characters, e.g. /caf%C3%A9)")
    assert errors[10].startswith("the router refuses this request (400): Invalid method")
    assert errors[11] == ('"headers": Content-Length is \'9\' but the line has a body of 2 '
                          "bytes (leave Content-Length out: it is added)")
    assert errors[12] == '"headers": X-User-Id: expected a string or {"base64": "..."}'
    assert errors[13].startswith("not JSON: ")  # a lone surrogate is not text
    assert results[-1]["user_id"] == "张王"


def test_explain_line_matches_decide(rules: str) -> None:
    snapshot = load_snapshot(rules)
    out = explain_line(snapshot, line(path="/orders", headers=[API, ["X-User-Id", "42"]]))
    assert orjson.loads(out) == decision("orders", "v2", "42", "header:X-User-Id",
                                         "pin[0] users")
    assert out.endswith(b"\n")


def test_bad_rules_raise(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("format: 1\n")
    with pytest.raises(RulesError):
        run_explain(str(path), "-", io.BytesIO())


def test_missing_requests_file(rules: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                               ) -> None:
    assert run_explain(rules, str(tmp_path / "none.jsonl"), io.BytesIO()) == 1
    assert "cannot read" in capsys.readouterr().err


def test_command_line_reads_stdin(rules: str) -> None:
    requests = line(path="/orders", headers=[API, ["X-User-Id", "42"]]) + line(path="/x")
    result = subprocess.run([GRAYROUTE, "explain", rules, "--why"], input=requests,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = [orjson.loads(x) for x in result.stdout.splitlines()]
    assert [r["upstream"] for r in out] == ["v2", "v1"]
    assert out[0]["user_id_sources"]["header:X-User-Id"] == "found"


def test_many_lines(rules: str, tmp_path: Path) -> None:
    lines = [line(method="GET", path=f"/orders/{i}?userId={i}", headers=[API])
             for i in range(20_000)]
    status, results = run(rules, tmp_path, lines)
    assert status == 0
    assert len(results) == 20_000
    share = sum(r["upstream"] == "v1.1" for r in results) / len(results)
    assert abs(share - 0.10) < 0.01


# -- Lua routes see the request as nginx does ----------------------------------------------

LUA_RULES = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:18081"]}
  v2: {endpoints: ["127.0.0.1:18083"]}
routes:
  - name: lua
    lua: {file: seen.lua}
"""

SEEN = """
local h = ngx.req.get_headers()
local tag = h.x_tag
ngx.var.backend = table.concat({
  type(tag) == "table" and table.concat(tag, "+") or tostring(tag),
  tostring(h["X-USER-ID"]), tostring(ngx.var.http_cookie), tostring(ngx.var.cookie_uid),
}, "|")
"""


@needs_lua
def test_lua_routes_see_every_header_as_nginx(tmp_path: Path) -> None:
    (tmp_path / "seen.lua").write_text(SEEN)
    (tmp_path / "rules.yaml").write_text(LUA_RULES)
    snapshot = load_snapshot(str(tmp_path / "rules.yaml"))
    out = orjson.loads(explain_line(snapshot, line(path="/", headers=[
        ["X-Tag", "a"], ["x-tag", "b"], ["X-User-Id", "张王"], ["Cookie", "a=1"],
        ["Cookie", "uid=10"],
    ])))
    # The value names no upstream: the reason shows what the script saw. As nginx does:
    # repeated headers are a table, lookups ignore case and take _ for -, Cookie lines
    # are joined with "; " for $http_cookie, and $cookie_uid is found in the second line.
    seen = "a+b|张王|a=1; uid=10|10"
    assert out["reason"] == f"lua seen.lua: $backend = {seen!r} names no upstream"
    assert out["status"] == "502"


# -- the same split_clients bucket in serve, explain and nginx ---------------------------

SC_RULES = """\
format: 1
upstreams:
  a: {endpoints: ["{a}"]}
  b: {endpoints: ["{b}"]}
  c: {endpoints: ["{c}"]}
routes:
  - name: sc
    split_clients:
      key: "$http_x_user_id"
      buckets: [{"33.33%": a}, {"33.33%": b}, {"*": c}]
"""
SC_IDS = ["café", "张王", "😀", "Ünïcödé", "ß", "naïve", "日本語", "ÿ", "€", "Ω"] + [
    f"用户{i}" for i in range(30)
]


@needs_lua
async def test_one_split_clients_bucket_in_serve_explain_and_nginx(
    serve_router: Serve, tmp_path: Path
) -> None:
    reason = nginx_unavailable()
    if reason is not None:
        pytest.skip(reason)
    ups = {name: await start_upstream(name) for name in "abc"}
    try:
        rules = tmp_path / "rules.yaml"
        rules.write_text(SC_RULES.replace("{a}", ups["a"].endpoint)
                         .replace("{b}", ups["b"].endpoint).replace("{c}", ups["c"].endpoint))
        router = await serve_router(rules, workers=1)
        port = int(router.ready["listen"].rpartition(":")[2])
        snapshot = load_snapshot(str(rules))
        table = SplitClients.build([("33.33%", "a"), ("33.33%", "b"), ("*", "c")])
        requests = [line(path="/", headers=[["Host", "t"], ["X-User-Id", uid],
                                            ["Connection", "close"]]) for uid in SC_IDS]
        explained = [orjson.loads(explain_line(snapshot, r))["upstream"] for r in requests]
        wires = [read_request(orjson.loads(r)) for r in requests]
        served = await asyncio.to_thread(lambda: [_served(port, w)[1].split()[0] for w in wires])
        spec = ScriptSpec("sc", str(tmp_path / "sc.lua"))
        (tmp_path / "sc.lua").write_text("ngx.var.backend = ngx.var.variant")
        http = 'split_clients "$http_x_user_id" $variant { 33.33% a; 33.33% b; * c; }'

        def through_nginx() -> list[str]:
            with running_nginx([spec], extra_http=http) as nginx:
                return [nginx.request("sc", ProbeRequest.from_bytes(w)).body.decode()
                        for w in wires]

        by_nginx = await asyncio.to_thread(through_nginx)
    finally:
        for up in ups.values():
            await up.close()
    assert by_nginx == [f"value:{u}" for u in explained]
    assert served == explained
    # nginx hashes the UTF-8 bytes, not Latin-1 or anything else
    assert explained == [table.pick(uid.encode()) for uid in SC_IDS]
    assert set(explained) == {"a", "b", "c"}


# -- the differential test: serve and explain decide every request the same way ------------

DIFF_RULES = """\
format: 1
upstreams:
  v1: {endpoints: ["{v1}"]}
  v1.1: {endpoints: ["{v1.1}"]}
  v2: {endpoints: ["{v2}"]}
  v3: {endpoints: ["{v3}"]}
user_id:
  - header: X-User-Id
  - cookie: uid
  - query: userId
  - json: user.id
  - form: userId
body_limit: 256
routes:
  - name: orders
    match: {hosts: [api.example.com], path_prefix: /orders}
    pins:
      - {to: v2, users: ["42", "café", "张王"]}
      - {to: v3, user_ranges: [[1000, 1999]]}
      - {to: v2, user_suffixes: ["77"]}
      - {to: v3, user_pattern: "qa-.*"}
      - {to: v2, user_percent: 20}
      - {to: v3, headers: {X-App-Version: "^3\\\\."}}
      - {to: v2, client_cidrs: [10.9.0.0/16]}
    split: {v1: 70, v1.1: 30}
  - name: orders-get
    match: {path_prefix: /orders, methods: [GET]}
    pins:
      - {to: v3, user_pattern: "[0-9]+"}
    to: v1.1
  - name: split
    match: {path_prefix: /split}
    user_id: [{json: user.id}, {form: userId}, {header: X-User-Id}]
    body_limit: 64
    split: {v1: 50, v1.1: 30, v2: 20}
  - name: split-clients
    match: {path_prefix: /sc}
    split_clients:
      key: "${http_x_user_id}-${cookie_uid}-${arg_userId}"
      buckets: [{"33.33%": v1}, {"33.33%": v1.1}, {"*": v2}]
  - name: split-clients-ip
    match: {path_prefix: /ip}
    split_clients:
      key: "${remote_addr}AAA"
      buckets: [{"50%": v1}, {"*": v2}]
  - name: lua-headers
    match: {path_prefix: /lua/headers}
    lua: {file: headers.lua, map: {"@canary": v3}, default: v1}
  - name: lua-cookies
    match: {path_prefix: /lua/cookies}
    lua: {file: cookies.lua, default: v1, fallback: v1}
  - name: lua-args
    match: {path_prefix: /lua/args}
    lua: {file: args.lua, default: v1}
  - name: lua-body
    match: {path_prefix: /lua/body}
    lua: {file: body.lua, phase: access, default: v1, client_body_buffer_size: 1KiB}
  - name: health
    match: {path_exact: /health}
    direct_response: {status: 200, body: "ok"}
  - name: maintenance
    match: {path_prefix: /maint}
    pins: [{to: v2, users: ["42", "张王"]}]
    direct_response: {status: 503, body: "down for maintenance"}
  - name: old-api
    match: {path_prefix: /v1/}
    redirect: {status: 302, prefix_rewrite: /v2/}
  - name: to-https
    match: {hosts: ["*.shop.example"]}
    redirect: {scheme: https}
  - name: items
    match: {host_regex: "^api[0-9]+\\\\.example\\\\.com$", path_regex: "^/items/[0-9]+$"}
    regex_rewrite: {pattern: "^/items/([0-9]+)$", substitution: "/v2/items/\\\\1"}
    to: v2
  - name: api
    match: {path_prefix: /api/}
    prefix_rewrite: /v1/
    split: {v1: 50, v1.1: 50}
  - name: default-server
    match: {default_host: true, path_prefix: /dflt}
    to: v3
  - name: canary-header
    match: {path_prefix: /other, headers: {X-Tag: "^canary$"}}
    to: v2
  - name: rest
    to: v1
"""

SCRIPTS = {
    "headers.lua": """
local h = ngx.req.get_headers()
local tag = h.x_tag
if type(tag) == "table" then ngx.var.backend = "v2" return end
if tag == "canary" then return ngx.exec("@canary") end
local version = h["X-APP-VERSION"]
if version and version:sub(1, 1) == "3" then ngx.var.backend = "v1.1" return end
if ngx.var.http_x_user_id == "张王" then ngx.var.backend = "v3" return end
ngx.var.backend = "v1"
""",
    "cookies.lua": """
local uid = ngx.var.cookie_uid
if uid == nil then ngx.var.backend = "v1" return end
local all = ngx.var.http_cookie or ""
if all:find("; beta=1", 1, true) then ngx.var.backend = "v3" return end
if uid:find("^qa") then return ngx.exit(403) end
local n = tonumber(uid)
if n and n % 4 == 0 then ngx.var.backend = "v1.1" return end
if n and n % 4 == 1 then error("no luck for " .. uid) end
ngx.var.backend = "v2"
""",
    "args.lua": """
local args = ngx.req.get_uri_args()
local uid = args.userId
if type(uid) == "table" then ngx.var.backend = "v2" return end
if ngx.var.arg_go then return ngx.redirect("/moved?from=" .. ngx.escape_uri(ngx.var.arg_go)) end
local n = tonumber(uid)
if n and n < 500 then ngx.var.backend = "v1.1" return end
if uid == "café" then ngx.var.backend = "v3" return end
ngx.var.backend = "v1"
""",
    "body.lua": """
local cjson = require "cjson.safe"
ngx.req.read_body()
local data = ngx.req.get_body_data()
if not data then ngx.var.backend = "v1" return end
local ctype = ngx.var.content_type or ""
if ctype:find("x-www-form-urlencoded", 1, true) then
  local args = ngx.req.get_post_args()
  ngx.var.backend = args.userId == "42" and "v2" or "v1.1"
  return
end
local doc = cjson.decode(data)
if type(doc) ~= "table" or type(doc.user) ~= "table" then ngx.var.backend = "v1" return end
local id = doc.user.id
if type(id) == "number" then ngx.var.backend = (id % 2 == 0) and "v2" or "v3" return end
ngx.var.backend = "v1.1"
""",
}

PATHS = ["/orders", "/orders/7", "/split", "/sc", "/ip", "/lua/headers", "/lua/cookies",
         "/lua/args", "/lua/body", "/health", "/health/x", "/maint", "/v1/orders", "/items/12",
         "/items/x", "/api/orders", "/dflt", "/other", "/"]
IDS = st.one_of(
    st.integers(0, 2500).map(str),
    st.sampled_from(["42", "qa-bob", "café", "张王", "😀", "1077", "0042", "Ünïcödé", "a b"]),
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
            max_size=6),
)
# Header bytes the router's parser takes (RFC 9110 5.5: visible ASCII, SP, HTAB, obs-text)
# that are not always UTF-8.
NOT_UTF8 = st.lists(
    st.one_of(st.integers(0x21, 0x7E), st.integers(0x80, 0xFF)), min_size=1, max_size=6
).map(bytes)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """One request line as `explain` reads it, of every kind the rules look at."""
    path = draw(st.sampled_from(PATHS))
    query = []
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["userId", "go", "x"]))
        query.append(f"{key}={quote(draw(IDS), safe='')}")
    if query:
        path += "?" + "&".join(query)
    headers: list[list[Any]] = []
    host = draw(st.sampled_from([None, "api.example.com", "API.example.com:8443", "other",
                                 "a.shop.example", "api7.example.com", "api7.example.com:81"]))
    if host is not None:
        headers.append(["Host", host])
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["id", "raw-id", "cookie", "version", "tag", "underscore"]))
        if kind == "id":
            name = draw(st.sampled_from(["X-User-Id", "x-user-id", "X-USER-ID"]))
            headers.append([name, draw(IDS)])
        elif kind == "raw-id":
            raw = base64.b64encode(draw(NOT_UTF8)).decode()
            headers.append(["X-User-Id", {"base64": raw}])
        elif kind == "cookie":
            pairs = draw(st.lists(st.tuples(st.sampled_from(["uid", "a", "beta", "sid"]),
                                            IDS.map(lambda v: quote(v, safe=""))),
                                  min_size=1, max_size=3))
            headers.append(["Cookie", "; ".join(f"{k}={v}" for k, v in pairs)])
        elif kind == "version":
            headers.append(["X-App-Version", draw(st.sampled_from(["3.1", "2.9", "30"]))])
        elif kind == "tag":
            headers.append(["X-Tag", draw(st.sampled_from(["canary", "stable"]))])
        else:
            headers.append(["X_User_Id", draw(IDS)])
    client_ip = draw(st.sampled_from(["", "10.9.1.2", "10.8.0.1", "192.168.3.4", "2001:db8::9"]))
    if client_ip:
        headers.append(["X-Forwarded-For", client_ip])
    method = draw(st.sampled_from(["GET", "GET", "POST", "PUT"]))
    request: dict[str, Any] = {"method": method, "path": path}
    if method != "GET":
        ctype = draw(st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                                      "text/plain", "application/vnd.app+json", None]))
        if ctype is not None:
            headers.append(["Content-Type", ctype])
        uid: Any = draw(st.one_of(IDS, st.integers(-5, 3000), st.floats(allow_nan=False,
                                                                        allow_infinity=False),
                                  st.booleans(), st.none()))
        body = draw(st.sampled_from(["json", "form", "broken", "big", "empty"]))
        if body == "json":
            request["body"] = orjson.dumps({"user": {"id": uid}}).decode()
        elif body == "form":
            request["body"] = f"a=1&userId={quote(str(uid), safe='')}"
        elif body == "broken":
            request["body"] = '{"user": {"id": '
        elif body == "big":
            request["body"] = orjson.dumps({"user": {"id": uid}, "pad": "x" * 1400}).decode()
    headers.append(["Connection", "close"])
    request["headers"] = draw(st.permutations(headers))
    request["client_ip"] = client_ip or "127.0.0.1"
    return request


def _headers(*pairs: tuple[str, Any]) -> list[list[Any]]:
    return [[n, v] for n, v in pairs] + [["Connection", "close"]]


API_HOST = ("Host", "api.example.com")
EXACT_LIMIT_BODY = '{"user": {"id": 12345}, "p": "' + "x" * 32 + '"}'  # 64 bytes: body_limit
# Cases from the field, always in the corpus besides what hypothesis draws.
EXAMPLES: list[dict[str, Any]] = [
    {"path": "/orders", "headers": _headers(API_HOST, ("X-User-Id", "café"))},
    {"path": "/orders", "headers": _headers(API_HOST, ("X-User-Id", "😀"))},
    {"path": "/lua/headers", "headers": _headers(("X-User-Id", "张王"))},
    {"path": "/sc?userId=%E5%BC%A0", "headers": _headers(("X-User-Id", "café"),
                                                          ("Cookie", "uid=张王"))},
    {"path": "/lua/cookies", "headers": _headers(("Cookie", "a=1"), ("Cookie", "uid=10"))},
    {"path": "/lua/cookies", "headers": _headers(("Cookie", "uid=8"), ("Cookie", "beta=1"))},
    {"path": "/lua/cookies", "headers": _headers(("Cookie", "a=2; uid=qa-1"))},
    {"path": "/lua/headers", "headers": _headers(("X-Tag", "a"), ("x-tag", "b"))},
    {"path": "/lua/headers", "headers": _headers(("x-app-version", "3.1"))},
    {"path": "/lua/headers", "headers": _headers(("X-Tag", "canary"))},
    {"path": "/lua/args?go=home%20page", "headers": _headers()},
    {"path": "/lua/args?userId=1&userId=2", "headers": _headers()},
    {"method": "POST", "path": "/split", "body": EXACT_LIMIT_BODY,
     "headers": _headers(("Content-Type", "application/json"))},
    {"method": "POST", "path": "/lua/body", "body": orjson.dumps({"user": {"id": 4},
                                                                  "pad": "x" * 1400}).decode(),
     "headers": _headers(("Content-Type", "application/json"))},
    {"method": "POST", "path": "/lua/body", "body": "a=1&userId=42",
     "headers": _headers(("Content-Type", "application/x-www-form-urlencoded"))},
    {"path": "/orders", "headers": _headers(API_HOST, ("X-User-Id", {"base64": "6XTp"}))},
    {"path": "/orders", "headers": _headers(API_HOST, ("X-Forwarded-For", "10.9.1.2")),
     "client_ip": "10.9.1.2"},
    {"path": "/ip", "headers": _headers(("X-Forwarded-For", "2001:db8::9")),
     "client_ip": "2001:db8::9"},
    {"method": "POST", "path": "/orders", "body": '{"user": {"id": 42.5}}',
     "headers": _headers(API_HOST, ("Content-Type", "application/json"))},
    {"path": "/health", "headers": _headers()},
    {"path": "/maint", "headers": _headers(("X-User-Id", "张王"))},
    {"path": "/maint?userId=7", "headers": _headers()},
    {"path": "/v1/orders?id=7", "headers": _headers()},
    {"path": "/x?y=1", "headers": _headers(("Host", "a.shop.example"))},
    {"path": "/items/12?q=1", "headers": _headers(("Host", "api7.example.com:81"))},
    {"path": "/api/orders?id=7", "headers": _headers(("X-User-Id", "café"))},
    {"path": "/dflt", "headers": _headers(("Host", "nobody.example"))},
    {"path": "/dflt", "headers": _headers(API_HOST)},
    {"path": "/other", "headers": _headers(("X-Tag", "canary"), ("X-Tag", "stable"))},
    {"path": "/other", "headers": _headers(("X-Tag", "stable"), ("X-Tag", "canary"))},
]


def _wire(request: WireRequest) -> bytes:
    head = [request.method, b" ", request.target, b" ", request.version, b"\r\n"]
    for name, value in request.headers:
        head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    return b"".join(head) + (request.body or b"")


def _served(port: int, request: WireRequest) -> tuple[str, str]:
    """("upstream", "VERSION TARGET") when an upstream answered (the version and the
    target it was asked for), else ("status", "403 LOCATION") for an answer of the
    router's own (a route's, a script's, a 404)."""
    answer = send_raw_request(port, _wire(request), timeout=10)
    if answer.status == 200 and answer.body.startswith(b"{"):
        seen = orjson.loads(answer.body)
        target = seen["path"] + (f"?{seen['query']}" if seen["query"] else "")
        return "upstream", f"{seen['version']} {target}"
    return "status", f"{answer.status} {answer.header('location')}"


def _explained(result: dict[str, Any], target: str) -> tuple[str, str]:
    if result["route"] is None:
        return "status", "404 None"
    if "status" in result:
        return "status", f"{result['status']} {result.get('location')}"
    return "upstream", f"{result['upstream']} {result.get('target') or target}"


DIFFERENTIAL_EXAMPLES = 300


@needs_lua
async def test_serve_and_explain_decide_every_request_the_same(
    serve_router: Serve, tmp_path: Path
) -> None:
    ups: dict[str, DemoUpstream] = {}
    try:
        for name in ("v1", "v1.1", "v2", "v3"):
            ups[name] = await start_upstream(name)
        text = DIFF_RULES
        for name, up in ups.items():
            text = text.replace("{" + name + "}", up.endpoint)
        for script, source in SCRIPTS.items():
            (tmp_path / script).write_text(source)
        rules = tmp_path / "rules.yaml"
        rules.write_text(text)
        router = await serve_router(rules, workers=1, args=("--trusted-proxy", "127.0.0.1"))
        port = int(router.ready["listen"].rpartition(":")[2])
        snapshot = load_snapshot(str(rules))
        random_splits = {r.name: set(r.split.names) for r in snapshot.routes if r.split}
        corpus: list[bytes] = []
        outcomes: Counter[str] = Counter()

        def same_decision(request: dict[str, Any]) -> None:
            text = orjson.dumps(request)
            explained = orjson.loads(explain_line(snapshot, text))
            assert "error" not in explained, (request, explained)
            wire = read_request(request)
            served = _served(port, wire)
            if str(explained["reason"]).startswith("split at random"):
                # No user ID: either side picks at random, by weight.
                assert served[0] == "upstream", (request, served)
                version, _, target = served[1].partition(" ")
                assert version in random_splits[explained["route"]], (request, served)
                assert target == explained.get("target", request["path"]), (request, served)
                outcomes["random"] += 1
            else:
                assert served == _explained(explained, request["path"]), (request, explained)
                outcomes[f"{explained['route']} {served[0]}"] += 1
            corpus.append(text + b"\n")

        for case in EXAMPLES:
            same_decision = example(request=case)(same_decision)
        check = settings(
            max_examples=DIFFERENTIAL_EXAMPLES, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )(given(request=requests())(same_decision))
        await asyncio.to_thread(check)
    finally:
        for up in ups.values():
            await up.close()
    print(f"differential: {len(corpus)} requests decided the same way: {dict(outcomes)}")
    # The corpus reached every route, with and without answers of the scripts' own.
    routes = {key.split()[0] for key in outcomes}
    assert {r.name for r in snapshot.routes} <= routes | {"split"}, outcomes
    assert outcomes["lua-cookies status"] and outcomes["lua-args status"], outcomes
    # And `grayroute explain` (the command) says what explain_line said, line for line.
    (tmp_path / "corpus.jsonl").write_bytes(b"".join(corpus))
    command = subprocess.run([GRAYROUTE, "explain", str(rules), str(tmp_path / "corpus.jsonl")],
                             capture_output=True, timeout=120, check=True)
    by_command = [orjson.loads(x) for x in command.stdout.splitlines()]
    again = [orjson.loads(explain_line(snapshot, x)) for x in corpus]
    assert len(by_command) == len(corpus) == DIFFERENTIAL_EXAMPLES + len(EXAMPLES)
    assert [_explained(r, "") for r in by_command if "random" not in r["reason"]] == [
        _explained(r, "") for r in again if "random" not in r["reason"]
    ]


@pytest.fixture(scope="module")
def diff_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    folder = tmp_path_factory.mktemp("diff-rules")
    text = DIFF_RULES
    for name in ("v1", "v1.1", "v2", "v3"):
        text = text.replace("{" + name + "}", "127.0.0.1:9")
    for script, source in SCRIPTS.items():
        (folder / script).write_text(source)
    (folder / "rules.yaml").write_text(text)
    return load_snapshot(str(folder / "rules.yaml"))


@needs_lua
@given(request=requests())
@settings(max_examples=200, deadline=None)
def test_why_agrees_with_the_user_id_found(
    diff_snapshot: Snapshot, request: dict[str, Any]
) -> None:
    """--why says `found` for the very source the decision took its user ID from, and
    for none when the decision has no user ID."""
    view, body = view_from_request(request, diff_snapshot)
    decision, route = decide_request(diff_snapshot, view, body)
    if route is None or not route.sources:
        return
    outcomes = source_outcomes(route.sources, view, len(body or b""))
    found = [label for label, outcome in outcomes if outcome == "found"]
    assert found == ([] if decision.user_id is None else [decision.user_id_source])
    uid, label = extract_user_id(route.sources, view)
    assert (uid, label) == (decision.user_id, decision.user_id_source)
