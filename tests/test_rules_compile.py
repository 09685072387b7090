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
    path.write_text(
        RULES.replace("to: v1\n  - name: upload", "to: v9\n  - name: upload").replace(
            "split: {v1: 1, v2: 1}", "split: {v1: -1, v2: 1}"
        )
    )
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
    s = snap(
        "format: 1\nupstreams: {a: {endpoints: ['h:1']}}\n"
        "routes: [{name: r, to: a, match: {hosts: ['[::1]', '2001:db8::1']}}]\n"
    )
    for host in ("::1", "[::1]", "2001:db8::1", "[2001:db8::1]"):
        assert s.match_route(view("/", host)) is not None, host
    assert s.match_route(view("/", "[::2]")) is None


def test_no_route() -> None:
    s = snap(
        "format: 1\nupstreams: {a: {endpoints: ['h:1']}}\n"
        "routes: [{name: r, to: a, match: {hosts: [x.com]}}]\n"
    )
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


def _holds(r: dict[str, object], v: RequestView, named: list[str], regexes: list[str]) -> bool:
    """The documented meaning of every match condition, one route at a time."""
    import re

    def host_ok(pattern: str, host: str) -> bool:
        if pattern.startswith("*."):
            return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
        if pattern.endswith(".*"):
            return host.startswith(pattern[:-1]) and len(host) > len(pattern) - 1
        return host == pattern

    hosts = r.get("hosts")
    if hosts is not None and not any(host_ok(h, v.host) for h in hosts):  # type: ignore[attr-defined]
        return False
    host_regex = r.get("host_regex")
    if host_regex is not None and re.search(str(host_regex), v.host) is None:
        return False
    if r.get("default_host") and (
        any(host_ok(h, v.host) for h in named) or any(re.search(rx, v.host) for rx in regexes)
    ):
        return False
    prefix, exact, regex = r.get("path_prefix"), r.get("path_exact"), r.get("path_regex")
    if prefix is not None and not v.path.startswith(str(prefix)):
        return False
    if exact is not None and v.path != exact:
        return False
    if regex is not None and re.search(str(regex), v.path) is None:
        return False
    for name, rx in dict(r.get("headers", {})).items():  # type: ignore[call-overload]
        value = v.headers.get(name.lower())
        if value is None or re.search(rx, value) is None:
            return False
    methods = r.get("methods")
    return methods is None or v.method in methods  # type: ignore[operator]


def test_index_agrees_with_a_scan_for_every_condition() -> None:
    """Exact and regex paths, wildcard and regex hosts, default_host and headers, in any
    order (a route whose headers do not hold lets the next one that matches decide)."""
    rng = random.Random(11)
    host_patterns = ["a.com", "b.a.com", "*.a.com", "www.a.*", "*.b.a.com", "x.org"]
    host_regexes = ["^api[0-9]+\\.", "org$"]
    requests_hosts = ["a.com", "b.a.com", "c.b.a.com", "www.a.com", "www.a.co.uk", "x.org",
                      "api7.x.org", "api.a.com", "www.a", "other.net", ""]  # fmt: skip
    paths = ["/", "/a", "/ab", "/a/b", "/health", "/v1/x", "/v2/x", "/x.php", "/abc"]
    conditions = [
        ("path_prefix", ["/", "/a", "/ab", "/v1"]),
        ("path_exact", ["/", "/a", "/health", "/a/b"]),
        ("path_regex", ["^/v[0-9]/", "\\.php$", "b"]),
    ]
    for trial in range(40):
        routes: list[dict[str, object]] = []
        for i in range(rng.randint(1, 14)):
            r: dict[str, object] = {"name": f"r{i}"}
            roll = rng.random()
            if roll < 0.35:
                r["hosts"] = rng.sample(host_patterns, rng.randint(1, 2))
            elif roll < 0.5:
                r["host_regex"] = rng.choice(host_regexes)
            elif roll < 0.65:
                r["default_host"] = True
            if rng.random() < 0.8:
                key, values = rng.choice(conditions)
                r[key] = rng.choice(values)
            if rng.random() < 0.3:
                r["methods"] = rng.sample(["GET", "POST"], 1)
            if rng.random() < 0.3:
                r["headers"] = rng.choice([{"X-A": "^1$"}, {"X-B": "b"}, {"X-A": "1", "X-B": "."}])
            routes.append(r)
        lines = ["format: 1", "upstreams: {a: {endpoints: ['h:1']}}", "routes:"]
        for r in routes:
            match = {k: v for k, v in r.items() if k != "name"}
            lines.append(f"  - name: {r['name']}\n    to: a")
            if match:
                lines.append(f"    match: {match!r}".replace("'", '"').replace("True", "true"))
        s = snap("\n".join(lines) + "\n")
        named = [h for r in routes for h in r.get("hosts", [])]  # type: ignore[attr-defined]
        regexes = [str(r["host_regex"]) for r in routes if "host_regex" in r]
        for _ in range(80):
            headers = {
                k: rng.choice(["1", "2", "abc"]) for k in ("x-a", "x-b") if rng.random() < 0.6
            }
            v = view(
                rng.choice(paths), rng.choice(requests_hosts), rng.choice(["GET", "POST"]), headers
            )
            got = s.match_route(v)
            expected = next((r["name"] for r in routes if _holds(r, v, named, regexes)), None)
            assert (got.name if got else None) == expected, (trial, v.host, v.path, v.method)
            again = s.match_route(v)  # the second lookup of a name is remembered
            assert (again.name if again else None) == expected


def test_a_host_lookup_is_remembered_for_a_bounded_number_of_names() -> None:
    from router.rules.hosts import HOST_CACHE_SIZE

    s = snap(
        "format: 1\nupstreams: {a: {endpoints: ['h:1']}}\nroutes:\n"
        "  - {name: wild, match: {hosts: ['*.a.com']}, to: a}\n"
        "  - {name: other, match: {default_host: true}, to: a}\n"
    )
    assert s.host_patterns is not None
    for i in range(HOST_CACHE_SIZE + 50):
        route = s.match_route(view("/", f"h{i}.a.com" if i % 2 else f"h{i}.b.com"))
        assert route is not None and route.name == ("wild" if i % 2 else "other")
    assert len(s.host_patterns._by_host) == HOST_CACHE_SIZE
    assert len(s.host_patterns._by_signature) == 1  # every *.a.com name shares one table


def test_uses_host() -> None:
    base = "format: 1\nupstreams: {a: {endpoints: ['h:1']}}\nroutes:\n"
    assert not snap(base + "  - {name: r, to: a}\n").uses_host
    assert snap(base + "  - {name: r, match: {host_regex: x}, to: a}\n").uses_host
    assert snap(base + "  - {name: r, match: {default_host: true}, to: a}\n").uses_host
    assert snap(base + "  - {name: r, redirect: {scheme: https}}\n").uses_host
    assert not snap(base + "  - {name: r, redirect: {scheme: https, host: b.com}}\n").uses_host


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
    s = snap(
        f"format: 1\nupstreams: {{a: {{endpoints: ['h:1']}}}}\nbody_limit: {limit}\n"
        f"user_id: {sources}\nroutes: [{{name: r, to: a}}]\n"
    )
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
