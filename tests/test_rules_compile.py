"""The snapshot: what the proxy relies on, route lookup, and when a body is worth holding."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest

from router.errors import RulesError
from router.rules import (
    CompiledRoute,
    RequestView,
    Snapshot,
    load_snapshot,
    load_snapshot_text,
)
from router.rules.compile import ip_number
from router.rules.model import HealthCheck

ROOT = Path(__file__).resolve().parent.parent

RULES = """\
format: 1
upstreams:
  v1:
    endpoints: ["127.0.0.1:9001", "[::1]:9002"]
  v2:
    endpoints: ["127.0.0.1:9003"]
    connect_timeout: 1s
    read_timeout: 500ms
    health_check: {path: /ready, interval: 3s}
user_id:
  - header: X-User-Id
  - cookie: uid
routes:
  - name: api
    match: {hosts: [api.example.com], path_prefix: /api, methods: [GET, POST]}
    pins:
      - to: v2
        headers: {X-App-Version: "^3", X-Beta: "yes"}
      - to: v2
        client_cidrs: [10.0.0.0/8]
    to: v1
  - name: upload
    match: {path_prefix: /upload}
    user_id:
      - header: X-Account
      - json: account.id
      - form: account
    body_limit: 1KiB
    split: {v1: 1, v2: 1}
  - name: rest
    to: v1
"""


def snap(text: str = RULES) -> Snapshot:
    return load_snapshot_text(text, "rules.yaml")


def view(
    path: str = "/", host: str = "", method: str = "GET", headers: dict[str, str] | None = None
) -> RequestView:
    return RequestView(method, path, "", host, headers or {}, "")


def test_upstreams() -> None:
    s = snap()
    assert list(s.upstreams) == ["v1", "v2"]
    v1, v2 = s.upstreams["v1"], s.upstreams["v2"]
    assert v1.name == "v1"
    assert v1.endpoints == (("127.0.0.1", 9001), ("::1", 9002))
    assert (v1.connect_timeout, v1.read_timeout, v1.health_check) == (None, None, None)
    assert (v2.connect_timeout, v2.read_timeout) == (1.0, 0.5)
    assert v2.health_check == HealthCheck("/ready", 3.0)
    with pytest.raises(TypeError):
        s.upstreams["v3"] = v1  # type: ignore[index]


def test_header_names_and_client_ip() -> None:
    s = snap()
    assert s.header_names == frozenset(
        {"x-user-id", "cookie", "x-app-version", "x-beta", "x-account", "content-type"}
    )
    assert s.uses_client_ip
    plain = snap("format: 1\nupstreams: {a: {endpoints: ['h:1']}}\nroutes: [{name: r, to: a}]\n")
    assert plain.header_names == frozenset()
    assert not plain.uses_client_ip


def test_file_sources_overridden_by_every_route_are_not_read() -> None:
    text = (
        "format: 1\nupstreams: {a: {endpoints: ['h:1']}}\nuser_id: [{header: X-Unused}]\n"
        "routes: [{name: r, to: a, user_id: [{query: u}]}]\n"
    )
    assert snap(text).header_names == frozenset()


def test_routes_and_defaults() -> None:
    s = snap()
    assert [r.name for r in s.routes] == ["api", "upload", "rest"]
    assert [r.body_limit for r in s.routes] == [64 * 1024, 1024, 64 * 1024]
    assert all(isinstance(r, CompiledRoute) for r in s.routes)
    assert s.source == "rules.yaml"
    assert s.digest == hashlib.sha256(RULES.encode()).hexdigest()
    assert s.warnings == ()


def test_snapshot_is_frozen() -> None:
    s = snap()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.routes = ()  # type: ignore[misc]


def test_load_snapshot_digest_of_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(RULES.encode())
    s = load_snapshot(str(path))
    assert s.source == str(path)
    assert s.digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_snapshot_raises_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RULES.replace("to: v1\n  - name: upload", "to: v9\n  - name: upload")
                    .replace("split: {v1: 1, v2: 1}", "split: {v1: -1, v2: 1}"))
    with pytest.raises(RulesError) as info:
        load_snapshot(str(path))
    assert [(p.line, p.path) for p in info.value.problems] == [
        (21, "routes[0].to"),
        (29, "routes[1].split.v1"),
    ]
    with pytest.raises(RulesError, match="cannot read"):
        load_snapshot(str(tmp_path / "missing.yaml"))


def test_warnings_are_kept_on_the_snapshot() -> None:
    s = snap(RULES.replace("split: {v1: 1, v2: 1}", "split: {v1: 1, v2: 0}"))
    assert [(w.severity, w.path) for w in s.warnings] == [("warning", "routes[1].split.v2")]


def test_shipped_files_load(tmp_path: Path) -> None:
    for path in [ROOT / "rules" / "demo.yaml", *(ROOT / "rules" / "examples").glob("*.yaml")]:
        assert load_snapshot(str(path)).routes


# -- route lookup ---------------------------------------------------------------------


def test_match_route_basics() -> None:
    s = snap()
    assert s.match_route(view("/api/x", "api.example.com")).name == "api"  # type: ignore[union-attr]
    assert s.match_route(view("/api/x", "api.example.com", "DELETE")).name == "rest"  # type: ignore[union-attr]
    assert s.match_route(view("/api/x", "other.example.com")).name == "rest"  # type: ignore[union-attr]
    assert s.match_route(view("/apix", "api.example.com")).name == "api"  # type: ignore[union-attr]
    assert s.match_route(view("/API", "api.example.com")).name == "rest"  # type: ignore[union-attr]
    assert s.match_route(view("/upload/1", "api.example.com")).name == "upload"  # type: ignore[union-attr]


def test_ipv6_hosts_match_with_or_without_brackets() -> None:
    s = snap("format: 1\nupstreams: {a: {endpoints: ['h:1']}}\n"
             "routes: [{name: r, to: a, match: {hosts: ['[::1]', '2001:db8::1']}}]\n")
    for host in ("::1", "[::1]", "2001:db8::1", "[2001:db8::1]"):
        assert s.match_route(view("/", host)) is not None, host
    assert s.match_route(view("/", "[::2]")) is None


def test_no_route() -> None:
    s = snap("format: 1\nupstreams: {a: {endpoints: ['h:1']}}\n"
             "routes: [{name: r, to: a, match: {hosts: [x.com]}}]\n")
    assert s.match_route(view("/", "y.com")) is None
    assert s.match_route(view("/", "x.com")) is not None


def _naive(routes: list[dict[str, object]], v: RequestView) -> str | None:
    for r in routes:
        hosts, prefix, methods = r.get("hosts"), r.get("path_prefix"), r.get("methods")
        if hosts is not None and v.host not in hosts:  # type: ignore[operator]
            continue
        if prefix is not None and not v.path.startswith(prefix):  # type: ignore[arg-type]
            continue
        if methods is not None and v.method not in methods:  # type: ignore[operator]
            continue
        return str(r["name"])
    return None


def test_index_agrees_with_first_match_wins_scan() -> None:
    rng = random.Random(5)
    hosts = ["a.com", "b.com", "c.com"]
    methods = ["GET", "POST", "PUT"]
    prefixes = ["/", "/a", "/ab", "/abc", "/b", "/a/b", "/ab/c"]
    for trial in range(30):
        routes: list[dict[str, object]] = []
        for i in range(rng.randint(1, 12)):
            r: dict[str, object] = {"name": f"r{i}"}
            if rng.random() < 0.5:
                r["hosts"] = rng.sample(hosts, rng.randint(1, 2))
            if rng.random() < 0.7:
                r["path_prefix"] = rng.choice(prefixes)
            if rng.random() < 0.4:
                r["methods"] = rng.sample(methods, rng.randint(1, 2))
            routes.append(r)
        lines = ["format: 1", "upstreams: {a: {endpoints: ['h:1']}}", "routes:"]
        for r in routes:
            match = {k: v for k, v in r.items() if k != "name"}
            lines.append(f"  - name: {r['name']}\n    to: a")
            if match:
                lines.append(f"    match: {match!r}".replace("'", '"'))
        s = snap("\n".join(lines) + "\n")
        for _ in range(60):
            v = view(
                rng.choice([*prefixes, "/zzz", "/abcd", ""]),
                rng.choice([*hosts, "d.com", ""]),
                rng.choice([*methods, "DELETE"]),
            )
            got = s.match_route(v)
            expected = _naive(routes, v)
            assert (got.name if got else None) == expected, (trial, v.host, v.path, v.method)


# -- wants_body -----------------------------------------------------------------------


def upload(headers: dict[str, str]) -> tuple[CompiledRoute, RequestView]:
    s = snap()
    v = view("/upload", "h", "POST", headers)
    route = s.match_route(v)
    assert route is not None and route.name == "upload"
    return route, v


@pytest.mark.parametrize(
    ("headers", "wanted"),
    [
        ({"content-type": "application/json"}, True),
        ({"content-type": "application/json; charset=utf-8"}, True),
        ({"content-type": "application/vnd.acme+json"}, True),
        ({"content-type": "application/x-www-form-urlencoded"}, True),
        ({"content-type": "text/plain"}, False),
        ({"content-type": "multipart/form-data; boundary=x"}, False),
        ({}, False),
        # a source listed before the body sources already has the ID
        ({"content-type": "application/json", "x-account": "7"}, False),
        ({"content-type": "application/json", "x-account": ""}, True),
    ],
)
def test_wants_body(headers: dict[str, str], wanted: bool) -> None:
    route, v = upload(headers)
    assert route.wants_body(v) is wanted


def test_wants_body_only_for_routes_with_body_sources() -> None:
    s = snap()
    v = view("/api", "api.example.com", "POST", {"content-type": "application/json"})
    route = s.match_route(v)
    assert route is not None and route.name == "api"
    assert not route.wants_body(v)


def body_route(sources: str, limit: str = "64KiB") -> CompiledRoute:
    s = snap(f"format: 1\nupstreams: {{a: {{endpoints: ['h:1']}}}}\nbody_limit: {limit}\n"
             f"user_id: {sources}\nroutes: [{{name: r, to: a}}]\n")
    return s.routes[0]


def test_head_sources_after_the_body_source_do_not_matter() -> None:
    route = body_route("[{json: id}, {header: X-Id}]")
    v = view(headers={"content-type": "application/json", "x-id": "1"})
    assert route.wants_body(v)


def test_only_sources_before_the_first_fitting_body_source_count() -> None:
    # For a form request the json source cannot yield, so the header decides first.
    route = body_route("[{json: id}, {header: X-Id}, {form: id}]")
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert not route.wants_body(view(headers={**form, "x-id": "1"}))
    assert route.wants_body(view(headers=form))
    assert route.wants_body(view(headers={"content-type": "application/json", "x-id": "1"}))


def test_body_limit_zero_never_wants_a_body() -> None:
    route = body_route("[{json: id}]", limit="0")
    assert not route.wants_body(view(headers={"content-type": "application/json"}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", (4, 0x0A010203)),
        ("::1", (6, 1)),
        ("::ffff:10.1.2.3", (4, 0x0A010203)),
        ("10.1.2", None),
        ("", None),
        ("fe80::1%eth0", None),
        ("not an ip", None),
        ("10.0.0.1\x00", None),
    ],
)
def test_ip_number(text: str, expected: tuple[int, int] | None) -> None:
    assert ip_number(text) == expected
