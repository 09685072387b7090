"""The migration guarantee, against real nginx: every routing script in
tests/lua_scripts/ runs in nginx + lua-nginx-module (Debian's libnginx-mod-http-lua) and
in lua_compat, over hundreds of requests with edge cases, and the decisions must be
identical (lua_compat/nginx_check.py explains what is compared).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lua_compat.nginx_check import (
    NginxLua,
    ProbeRequest,
    ScriptSpec,
    effect_observation,
    nginx_unavailable,
    response_observation,
)
from lua_compat.runtime import LuaRuntime, LuaScript, lua_available

SCRIPTS = Path(__file__).parent / "lua_scripts"

_reason = nginx_unavailable() or lua_available()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

R = random.Random(20261127)

# -- request corpora ---------------------------------------------------------------------

EDGE_IDS = [
    "42",
    "10086",
    "7",
    "alice",
    "ALICE",
    "Alice",
    " 42",
    "42 ",
    "0042",
    "100000",
    "199999",
    "200000",
    "99999",
    "5000000",
    "5000999",
    "5001000",
    "1007",
    "12399",
    "-5",
    "-1500",
    "1e3",
    "0x10",
    "abc",
    "u-77",
    "1001",
    "1002",
    "2048",
    "1",
    "2",
    "3",
    "999",
    "1000",
    "1999",
    "2000",
    "0",
    "00",
    "07",
    "1.5",
    "12345678901234567890",
    "\u00fc".encode().decode("latin-1"),
    "a-b-c",
    "x-",
    "-",
    "101",
    "100",
    "banned",
    "old",
    "ok",
]


def _random_ids(n: int) -> list[str]:
    ids = []
    for _ in range(n):
        kind = R.random()
        if kind < 0.6:
            ids.append(str(R.randrange(0, 10 ** R.randint(1, 9))))
        elif kind < 0.8:
            ids.append(
                "".join(R.choices(string.ascii_letters + string.digits + "-_", k=R.randint(1, 12)))
            )
        else:
            ids.append(str(R.randrange(100000, 200000)))
    return ids


def _ids(n: int = 150) -> list[str]:
    return EDGE_IDS + _random_ids(n)


def header_requests() -> Iterator[ProbeRequest]:
    for uid in _ids():
        yield ProbeRequest("GET", "/orders", (("X-User-Id", uid),))
    yield ProbeRequest("GET", "/orders")
    yield ProbeRequest("GET", "/orders", (("X-User-Id", "1"), ("X-User-Id", "42")))
    yield ProbeRequest("GET", "/orders", (("X-User-Id", "42"), ("X-User-Id", "1")))
    yield ProbeRequest("GET", "/orders", (("x-user-id", "42"),))
    yield ProbeRequest("GET", "/orders", (("X_User_Id", "42"),))  # dropped by nginx
    yield ProbeRequest("GET", "/orders", (("X-User-Id", "\t42  "),))
    for version in ["3.0", "3.12.1", "2.9", "30.1", "3", "v3.1", " 3.1", "3.x"]:
        yield ProbeRequest("GET", "/", (("X-App-Version", version),))
    for channel in [("Beta",), ("beta", "stable"), ("stable", "beta"), ("BETA ",), ("",)]:
        yield ProbeRequest("GET", "/", tuple(("X-Channel", c) for c in channel))
    yield ProbeRequest("GET", "/", (("x_channel", "beta"),))


def cookie_requests() -> Iterator[ProbeRequest]:
    for uid in _ids(100):
        yield ProbeRequest("GET", "/", (("Cookie", f"sid=abc; uid={uid}"),))
    cookies = [
        "gray=1",
        "gray=true",
        "gray=0",
        "gray=2",
        "GRAY=1",
        "gray= 1",
        "gray =1",
        "xgray=1; uid=1001",
        "uid=1001",
        "uid=1001;gray=1",
        "uid=1002, gray=0",
        "uid=u-77",
        "uid = 2048",
        "uid=2048 ",
        "a=b;uid=1002",
        "uid=",
        "uid",
        ";uid=1001",
        "uid=1001; uid=9",
        "UID=1001",
        "uid=%31001",
    ]
    for c in cookies:
        yield ProbeRequest("GET", "/", (("Cookie", c),))
    yield ProbeRequest("GET", "/", (("Cookie", "a=1"), ("Cookie", "uid=1001")))
    yield ProbeRequest("GET", "/", (("Cookie", "uid=9"), ("Cookie", "gray=1")))
    yield ProbeRequest("GET", "/", (("Cookie", "gray=0"), ("Cookie", "gray=1")))


def range_requests() -> Iterator[ProbeRequest]:
    for uid in _ids():
        yield ProbeRequest("GET", "/", (("X-User-Id", uid),))
    for uid in ["100000", "199999", "5000500", "1007", "abc", "", "12%2099", "1+2"]:
        yield ProbeRequest("GET", f"/?uid={uid}")
        yield ProbeRequest("GET", f"/?UID={uid}")
        yield ProbeRequest("GET", f"/?xuid=1&uid={uid}")
    yield ProbeRequest("GET", "/?uid=1&uid=100001")
    yield ProbeRequest("GET", "/?uid")
    yield ProbeRequest("GET", "/", (("X-User-Id", ""),))


def _json_bodies() -> list[bytes]:
    bodies = [
        b'{"user_id": 42}',
        b'{"user_id": "42"}',
        b'{"user_id": 10086}',
        b'{"user_id": 42.0}',
        b'{"user_id": 4.2e1}',
        b'{"user_id": 1e20}',
        b'{"user_id": 12345678901234567890}',
        b'{"user_id": -13}',
        b'{"user_id": 0.5}',
        b'{"user_id": null}',
        b'{"user_id": true}',
        b'{"user_id": [1]}',
        b'{"user_id": {"a": 1}}',
        b'{"user_id": "x\\u00e9"}',
        b'{"user_id": "\\ud83d\\ude00"}',
        b'{"user_id": 1, "user_id": 2}',
        b"[]",
        b"{}",
        b"",
        b"null",
        b'"42"',
        b"42",
        b'{"user_id": 42',
        b'{"user_id": 42}x',
        b"{'user_id': 42}",
        b'{"user_id": 0x10}',
        b'{"user_id": 013}',
        b'{"user_id": +3}',
        b'{"user_id": NaN}',
        b'{"user_id": Infinity}',
        b'{"user_id": -inf}',
        b'{"user_id": 1.}',
        b'{"user_id": .5}',
        b' \n{"user_id" : 23 } \n',
        b'{"user_id": "\\x41"}',
        b'{"user_id": "a\\/b"}',
        # nginx holds a body of up to 10239 bytes in memory (client_body_buffer_size 8k);
        # a larger one goes to a file and get_body_data() returns nil
        b'{"user_id": 3, "pad": "' + b"x" * 10000 + b'"}',
        b'{"user_id": 3, "pad": "' + b"x" * 12000 + b'"}',
        b'{"user_id": "\xff\xfe"}',
        b'{"user_id": 1e-7}',
        b'{"user_id": 123456789012345}',
        b'{"user_id": 2e308}',
        b'{"user_id": -0}',
        b'{"user_id": 100000000000000}',
    ]
    for _ in range(120):
        n = R.choice([R.randrange(10**6), R.random() * 1000, -R.randrange(1000)])
        bodies.append(b'{"user_id": %s, "x": [1, 2]}' % repr(n).encode())
    return bodies


def json_requests() -> Iterator[ProbeRequest]:
    for body in _json_bodies():
        yield ProbeRequest("POST", "/orders", (("Content-Type", "application/json"),), body)
    yield ProbeRequest("GET", "/orders")


def _nested_bodies() -> list[bytes]:
    tiers = ['"gold"', '"platinum"', '"silver"', "null", "1", '"Gold"', "[]", "{}"]
    bodies = []
    for tier in tiers:
        bodies.append(b'{"user": {"profile": {"tier": %s}}}' % tier.encode())
        bodies.append(b'{"user": {"profile": %s}}' % tier.encode())
        bodies.append(b'{"user": %s, "items": [{"sku": "NEW-1"}]}' % tier.encode())
    skus = ['"NEW-1"', '"new-1"', '"OLD-2"', "7", "7.5", "1e3", "null", '"NEW"', '["NEW-1"]']
    for sku in skus:
        bodies.append(b'{"items": [{"sku": %s}, {"sku": "NEW-2"}]}' % sku.encode())
        bodies.append(b'{"items": [%s]}' % sku.encode())
    bodies += [
        b'{"items": []}',
        b'{"items": {}}',
        b'{"items": [null, {"sku": "NEW-3"}]}',
        b"[1, 2, 3]",
        b'"text"',
        b"nul",
        b"{",
        b'{"user": {"profile": {"tier": "gold"}}',
        b'{"a": ' * 1200 + b"1" + b"}" * 1200,
        b"[" * 999 + b"]" * 999,
        b"[" * 1001 + b"]" * 1001,
        b'{"user": {"profile": {"tier": "gold"}}} ',
        b'{"user": {"profile": {"tier": "gold"}}}]',
        b'{"items": [{"sku": 123456789012}]}',
        b'{"items": [{"sku": -0.0}]}',
        b'{"tier": "gold", "items": [1,2,3,4,5,6,7,8,9,10,11,12]}',
        b'{"user": {"profile": {"tier": "\\u0067old"}}}',
        b'{"user": {"profile": {"tier": "gol\\d"}}}',
    ]
    for _ in range(80):
        tier = R.choice(["gold", "silver", "bronze", "platinum"])
        sku = R.choice([f"NEW-{R.randrange(100)}", f"OLD-{R.randrange(100)}"])
        bodies.append(
            b'{"user": {"id": %d, "profile": {"tier": "%s"}}, "items": [{"sku": "%s"}]}'
            % (R.randrange(10**6), tier.encode(), sku.encode())
        )
    return bodies


def nested_requests() -> Iterator[ProbeRequest]:
    for body in _nested_bodies():
        yield ProbeRequest("POST", "/", (("Content-Type", "application/json"),), body)


def form_requests() -> Iterator[ProbeRequest]:
    forms = [
        b"uid=42",
        b"uid=43",
        b"uid=jo+hn",
        b"uid=jo%20hn",
        b"uid=a%26b",
        b"uid=a&b",
        b"uid",
        b"uid=",
        b"x=1&uid=42",
        b"uid=42&uid=7",
        b"uid=7&uid=42",
        b"UID=42",
        b"uid=%zz",
        b"uid=%4",
        b"uid=%e4%b8%ad",
        b"=42",
        b"&&uid=42&&",
        b"",
        b"uid=4%32",
        b"a=1&" * 120 + b"uid=42",
        b"uid=42&" + b"x" * 12000,
        b"uid=" + b"9" * 10000,
    ]
    for uid in _random_ids(120):
        forms.append(b"uid=" + uid.encode())
    for body in forms:
        yield ProbeRequest(
            "POST", "/", (("Content-Type", "application/x-www-form-urlencoded"),), body
        )
    yield ProbeRequest("GET", "/")


def query_requests() -> Iterator[ProbeRequest]:
    queries = [
        "uid=42",
        "uid=43",
        "uid=4%32",
        "uid=a+b",
        "uid=a%2Bb",
        "uid",
        "uid=",
        "gray=1",
        "gray",
        "gray=0&uid=1",
        "uid=1&uid=2",
        "uid=2&uid=1",
        "UID=2",
        "Uid=4",
        "uid=%zz",
        "&uid=8",
        "uid=8&",
        "xuid=8",
        "a=1&uid=%41%42",
        "uid=%E4%B8%AD",
        "uid=%20",
        "=1&uid=6",
        "uid=6#frag",
        "uid=6?x=1",
        "uid==6",
        "gray=1&" * 110 + "uid=7",
    ]
    for uid in _random_ids(150):
        queries.append("uid=" + uid)
    for q in queries:
        yield ProbeRequest("GET", "/search?" + q)
    yield ProbeRequest("GET", "/search")
    yield ProbeRequest("GET", "/search?")


def ip_requests() -> Iterator[ProbeRequest]:
    ips = [
        "10.0.0.1",
        "10.255.255.255",
        "11.0.0.1",
        "9.255.255.255",
        "192.168.1.1",
        "192.168.1.255",
        "192.168.2.1",
        "172.16.0.1",
        "172.31.255.255",
        "172.32.0.1",
        "172.15.255.255",
        "203.0.113.10",
        "203.0.113.20",
        "203.0.113.21",
        "203.0.113.9",
        "127.0.0.1",
        "2001:db8::1",
        "2001:db9::1",
        "::1",
        "fe80::1",
        "0.0.0.0",
        "255.255.255.255",
    ]
    for _ in range(150):
        ips.append(
            ".".join(
                str(R.choice([10, 172, 192, 203, R.randrange(256)]))
                if i == 0
                else str(R.randrange(256))
                for i in range(4)
            )
        )
    for ip in ips:
        yield ProbeRequest("GET", "/", client_ip=ip)


def percent_requests() -> Iterator[ProbeRequest]:
    for uid in _ids(400):
        yield ProbeRequest("GET", "/", (("X-User-Id", uid),))
    for uid in _random_ids(50):
        yield ProbeRequest("GET", "/", (("Cookie", f"uid={uid}"),))
    yield ProbeRequest("GET", "/")


def exec_requests() -> Iterator[ProbeRequest]:
    for uid in [*_ids(), "1", "2", "3", "1000", "1999", "2000", "-1", "-7"]:
        yield ProbeRequest("GET", "/", (("X-User-Id", uid),))
    yield ProbeRequest("GET", "/")


def set_requests() -> Iterator[ProbeRequest]:
    for uid in [*_ids(), "num", "frac", "bool", "3", "6", "9", "12", "1", "1e3", "0.1"]:
        yield ProbeRequest("GET", "/?uid=" + uid.replace(" ", "%20"))
    yield ProbeRequest("GET", "/")


def exit_requests() -> Iterator[ProbeRequest]:
    uas = ["curl/8", "BadBot/1.0", "Mozilla badbot", "BADBOT", "good"]
    uids = ["banned", "old", "ok", "42", None, "", "Banned"]
    for ua in uas:
        for uid in uids:
            for target in ["/a/b?x=1", "/?maintenance=1", "/p%20q?a=%20", "/", "/x?next=/y&z"]:
                headers = [("User-Agent", ua)]
                if uid is not None:
                    headers.append(("X-User-Id", uid))
                yield ProbeRequest("GET", target, tuple(headers))


def counter_requests() -> Iterator[ProbeRequest]:
    users = ["a", "b", "c", None]
    for i in range(200):
        uid = users[i % 3] if i % 7 else R.choice(users)
        headers = (("X-User-Id", uid),) if uid else ()
        yield ProbeRequest("GET", "/", headers)


def ua_requests() -> Iterator[ProbeRequest]:
    uas = [
        "MyApp/5.2",
        "MyApp/5.1.9",
        "MyApp/6.0.0",
        "MyApp/5.10",
        "MyApp/4.9.1",
        "MyApp/5",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 16_0)",
        "MyApp/5.1 iPhone",
        "x MyApp/1.2.3 y",
        "MyApp/05.02",
        "myapp/9.9",
        "",
        "MyApp/5.1.",
        "MyApp/5.1.x",
    ]
    for _ in range(120):
        uas.append(
            f"MyApp/{R.randrange(8)}.{R.randrange(12)}"
            + R.choice(["", f".{R.randrange(30)}"])
            + R.choice(["", " (Android)", " iPhone"])
        )
    for ua in uas:
        yield ProbeRequest("GET", "/", (("User-Agent", ua),))
    yield ProbeRequest("GET", "/")


def error_requests() -> Iterator[ProbeRequest]:
    for uid in [*_ids(100), "a-b", "a-", "-b", "101", "100", "1000000"]:
        yield ProbeRequest("GET", "/", (("X-User-Id", uid),))
    yield ProbeRequest("GET", "/")


def probe_requests() -> Iterator[ProbeRequest]:
    targets = [
        "/",
        "/a/b?uid=42",
        "/a//b/./c/../d?uid=4%2B2&UID=7",
        "/x?uid=a+b%20c",
        "/x?uid",
        "/x?uid=",
        "/x?=1&uid=1&uid=2",
        "/%41%2f?x=1",
        "/a/%2e%2e/b",
        "/a/..",
        "/a/.",
        "/..",
        "/a/b/../../..",
        "/x?uid=%zz1",
        "/x?uid=%4",
        "/x?uid=%e4%b8%ad",
        "/x?a.b=3&uid=12-abc",
        "/x?xuid=1&uid=2",
        "/x?UID=9",
        "/x?uid=1&uid=2&uid=3",
        "/p%3Fq?uid=1",
        "/p%23q",
        "/a?b?c=1",
        "/x?&&uid=5&&",
        "/%2e/x",
        "/a/.%2e/b",
        "/a/%2E%2E",
        "/x?uid=-12.5e3",
        "/x?uid=0x1F",
        "/x?uid=1e400",
        "/x?uid=%20%2042%20",
        "/x?uid=Hello-World",
        "/a/./",
        "/a/b/..",
        "/a/b/...",
        "/.a/..b/c.",
        "/x%2Fy",
        "/x?uid=%2",
        "/x?uid=aeiouAEIOU",
        "/x?uid=123-abc",
        "/x?uid=123-",
        "/x?uid=%31%32",
        "/x?uidx=1&uid=2&uid=3",
        "/x?" + "&".join(f"k{i}=v" for i in range(105)),
    ]
    headers_sets: list[tuple[tuple[str, str], ...]] = [
        (),
        (("X-User-Id", "42"), ("x-user-id", "43")),
        (("X-User-Id", "  7  "),),
        (("X_User_Id", "9"), ("X-User-Id", "10")),
        (("Cookie", "uid=1; sid=2"), ("Cookie", "uid=3")),
        (("Cookie", "a=1;uid = 5 ;b=2"),),
        (("Cookie", "xuid=1, uid=6"),),
        (("Cookie", "UID=7"),),
        (("Cookie", " uid=8"),),
        (("Cookie", "sid=; uid=x"),),
        (("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "5.6.7.8")),
        (("Host", "API.Example.COM:8080"),),
        (("Host", "example.com."),),
        (("X.Dotted", "1"), ("X-Ok", "2")),
        (("Content-Type", "application/json"), ("Content-Length", "0")),
    ]
    for i, target in enumerate(targets):
        for j, headers in enumerate(headers_sets):
            if (i + j) % 3 == 0 or i < 8:
                yield ProbeRequest("GET", target, headers)


def cjson_requests() -> Iterator[ProbeRequest]:
    bodies = _json_bodies()[:60] + _nested_bodies()[:60]
    bodies += [
        b'"\\u00e9\\u4e2d\\ud83d\\ude00"',
        b'"\\ud800"',
        b'"\\udc00x"',
        b'"\\u12"',
        b'"\\q"',
        b'"abc',
        b"tru",
        b"true false",
        b"[1,]",
        b'{"a":1,}',
        b'{"a" 1}',
        b"{1:2}",
        b"[1 2]",
        b"-",
        b"1e",
        b"01",
        b"-0",
        b"0.000001",
        b"1E+2",
        b"[-1.5e-3]",
        b"\t[]",
        b"  ",
        b"\x00",
        b'"tab\there"',
        b'["\\/"]',
        b"1.7976931348623157e308",
        b"4.9e-324",
        b'{"a":{"b":{"c":[1,{"d":null}]}}}',
        b"[[],{}]",
        b'"' + "\u00e9".encode() + b'"',
    ]
    for body in bodies:
        yield ProbeRequest("POST", "/", (("Content-Type", "application/json"),), body)


SUITE: list[tuple[ScriptSpec, object]] = [
    (ScriptSpec.from_file(SCRIPTS / "header_whitelist.lua"), header_requests),
    (ScriptSpec.from_file(SCRIPTS / "cookie_whitelist.lua"), cookie_requests),
    (ScriptSpec.from_file(SCRIPTS / "id_range_suffix.lua"), range_requests),
    (
        ScriptSpec.from_file(
            SCRIPTS / "json_body.lua", phase="access", variables=(("uid_seen", ""),)
        ),
        json_requests,
    ),
    (ScriptSpec.from_file(SCRIPTS / "nested_json_safe.lua", phase="access"), nested_requests),
    (ScriptSpec.from_file(SCRIPTS / "form_body.lua", phase="access"), form_requests),
    (ScriptSpec.from_file(SCRIPTS / "query_args.lua"), query_requests),
    (ScriptSpec.from_file(SCRIPTS / "ip_range.lua"), ip_requests),
    (ScriptSpec.from_file(SCRIPTS / "percent_hash.lua"), percent_requests),
    (ScriptSpec.from_file(SCRIPTS / "exec_named.lua"), exec_requests),
    (ScriptSpec.from_file(SCRIPTS / "set_return.lua", phase="set"), set_requests),
    (ScriptSpec.from_file(SCRIPTS / "exit_redirect.lua"), exit_requests),
    (
        ScriptSpec.from_file(SCRIPTS / "shared_counter.lua", shared_dicts=(("gray", 1 << 20),)),
        counter_requests,
    ),
    (ScriptSpec.from_file(SCRIPTS / "ua_regex.lua"), ua_requests),
    (ScriptSpec.from_file(SCRIPTS / "error_fallback.lua"), error_requests),
    (ScriptSpec.from_file(SCRIPTS / "probe_request.lua"), probe_requests),
    (ScriptSpec.from_file(SCRIPTS / "probe_cjson.lua", phase="access"), cjson_requests),
]

# scripts whose decisions depend on the order of requests run one request at a time
SEQUENTIAL = {"shared_counter"}


@pytest.fixture(scope="module")
def nginx() -> Iterator[NginxLua]:
    server = NginxLua([spec for spec, _ in SUITE])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def runtime() -> LuaRuntime:
    rt = LuaRuntime()
    rt.declare_shared_dict("gray", 1 << 20)
    return rt


def _compile(runtime: LuaRuntime, spec: ScriptSpec) -> LuaScript:
    return runtime.compile(
        Path(spec.path).read_text(encoding="utf-8"),
        spec.path,
        phase=spec.phase,
        decision=spec.decision,
        variables=dict(spec.variables),
    )


@pytest.mark.parametrize(("spec", "corpus"), SUITE, ids=[spec.name for spec, _ in SUITE])
def test_same_decisions_as_nginx(
    nginx: NginxLua, runtime: LuaRuntime, spec: ScriptSpec, corpus: object
) -> None:
    probes = list(corpus())  # type: ignore[operator]
    assert len(probes) >= 100, "each script is checked over hundreds of requests"
    script = _compile(runtime, spec)
    port = nginx.ports[spec.name]
    if spec.name in SEQUENTIAL:
        responses = [nginx.request(spec.name, p) for p in probes]
    else:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda p: nginx.request(spec.name, p), probes))
    mismatches = []
    for probe, response in zip(probes, responses, strict=True):
        expected = response_observation(response)
        got = effect_observation(script.run(probe.ngx_request(port)))
        if expected != got:
            mismatches.append((probe, expected, got))
    shown = "\n".join(
        f"{p}\n  nginx: {e[:300]}\n  lua_compat: {g[:300]}" for p, e, g in mismatches[:5]
    )
    assert not mismatches, f"{len(mismatches)} of {len(probes)} differ:\n{shown}"


def test_nginx_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lua_compat.nginx_check import main

    lines = [
        '{"path": "/", "headers": [["X-User-Id", "42"]]}',
        '{"path": "/x?a=1", "headers": [["X-App-Version", "3.1"]]}',
        '{"method": "POST", "path": "/", "body": "{}", "client_ip": "10.1.2.3"}',
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    assert main([str(SCRIPTS / "header_whitelist.lua"), str(requests)]) == 0
    assert "3 of 3 requests decided the same way" in capsys.readouterr().out
