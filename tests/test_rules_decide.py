"""decide(): routes, pins, and the sticky split's promises (share, stickiness, movement)."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter

import orjson
import pytest

from router.rules import (
    NO_ROUTE_REASON,
    Decision,
    RequestView,
    Snapshot,
    decide,
    host_from_header,
    load_snapshot_text,
    split_target,
)
from router.rules.hashing import hash64, percent_bucket, prepared, unit

USERS = [str(n) for n in range(1_000_000, 1_020_000)]  # 20,000 distinct user IDs


def rules(routes: str, upstreams: str = "a b c", user_id: str = "[{header: X-User-Id}]") -> str:
    ups = "\n".join(f"  {u}: {{endpoints: ['127.0.0.1:{9000 + i}']}}"
                    for i, u in enumerate(upstreams.split()))
    return f"format: 1\nupstreams:\n{ups}\nuser_id: {user_id}\nroutes:\n{routes}"


def snap(routes: str, upstreams: str = "a b c") -> Snapshot:
    return load_snapshot_text(rules(routes, upstreams), "rules.yaml")


def req(
    user: str | None = None,
    path: str = "/",
    host: str = "h",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    client_ip: str = "",
) -> RequestView:
    h = dict(headers or {})
    if user is not None:
        h["x-user-id"] = user
    return RequestView(method, path, "", host, h, client_ip)


def split_snap(weights: str, salt: str = "") -> Snapshot:
    extra = f"\n    salt: {salt}" if salt else ""
    return snap(f"  - name: r\n    split: {{{weights}}}{extra}\n", "a b c d")


def assign(s: Snapshot, users: list[str] = USERS) -> dict[str, str]:
    return {u: decide(s, req(u)).upstream for u in users}  # type: ignore[misc]


# -- routes -------------------------------------------------------------------------------


ROUTES = """\
  - name: api-get
    match: {hosts: [api.example.com], path_prefix: /api, methods: [GET]}
    to: a
  - name: api
    match: {hosts: [api.example.com, API2.example.com], path_prefix: /api}
    to: b
  - name: static
    match: {path_prefix: /static/}
    to: c
"""


@pytest.mark.parametrize(
    ("host", "path", "method", "route"),
    [
        ("api.example.com", "/api/orders", "GET", "api-get"),
        ("api.example.com", "/api/orders", "POST", "api"),
        ("api2.example.com", "/api", "GET", "api"),  # hosts compare lower-case
        ("api.example.com", "/apiary", "GET", "api-get"),  # a plain prefix, not a segment
        ("api.example.com", "/static/x.js", "GET", "static"),
        ("other.example.com", "/static/", "GET", "static"),
        ("other.example.com", "/static", "GET", None),
        ("other.example.com", "/api", "GET", None),
    ],
)
def test_route_matching(host: str, path: str, method: str, route: str | None) -> None:
    d = decide(snap(ROUTES), req(path=path, host=host, method=method))
    assert d.route == route


def test_no_route_decision() -> None:
    d = decide(snap(ROUTES), req(path="/nothing", host="x"))
    assert isinstance(d, Decision)
    assert d.as_dict() == {"route": None, "upstream": None, "user_id": None,
                           "user_id_source": None, "reason": NO_ROUTE_REASON}
    assert NO_ROUTE_REASON == "no route matched"


def test_first_route_wins_in_file_order() -> None:
    s = snap("  - {name: one, match: {path_prefix: /x}, to: a}\n"
             "  - {name: two, match: {path_prefix: /x/y}, to: b}\n"
             "  - {name: three, to: c}\n")
    assert decide(s, req(path="/x/y/z")).route == "one"
    s = snap("  - {name: two, match: {path_prefix: /x/y}, to: b}\n"
             "  - {name: one, match: {path_prefix: /x}, to: a}\n")
    assert decide(s, req(path="/x/y/z")).route == "two"
    assert decide(s, req(path="/x/z")).route == "one"


def test_given_route_skips_matching() -> None:
    s = snap(ROUTES)
    d = decide(s, req(path="/nothing", host="x"), s.routes[2])
    assert (d.route, d.upstream, d.reason) == ("static", "c", "to c")


def test_to_decision_carries_the_user() -> None:
    s = snap("  - {name: r, to: b}\n")
    d = decide(s, req("42"))
    assert d.as_dict() == {"route": "r", "upstream": "b", "user_id": "42",
                           "user_id_source": "header:X-User-Id", "reason": "to b"}


# -- pins ---------------------------------------------------------------------------------


def pinned(condition: str) -> Snapshot:
    return snap(f"  - name: r\n    pins:\n      - {{to: b, {condition}}}\n    to: a\n")


@pytest.mark.parametrize(
    ("condition", "user", "holds"),
    [
        ('users: ["42", "10086"]', "42", True),
        ('users: ["42", "10086"]', "4", False),
        ('users: ["42", "10086"]', "420", False),
        ("user_ranges: [[100000, 199999]]", "100000", True),
        ("user_ranges: [[100000, 199999]]", "199999", True),
        ("user_ranges: [[100000, 199999]]", "200000", False),
        ("user_ranges: [[100000, 199999]]", "99999", False),
        ("user_ranges: [[100000, 199999]]", "000150000", True),  # read as a base-10 integer
        ("user_ranges: [[100000, 199999]]", "15000a", False),
        ("user_ranges: [[100000, 199999]]", "-150000", False),
        ("user_ranges: [[100000, 199999]]", "+150000", False),
        ("user_ranges: [[100000, 199999]]", " 150000", False),
        ("user_ranges: [[100000, 199999]]", "\u0661\u0665" + "\u0660" * 4, False),  # Arabic digits
        ("user_ranges: [[100000, 199999]]", "1" * 5000, False),  # huge numbers are fine
        ("user_ranges: [[100000, 199999]]", "0" * 5000 + "150000", True),
        ("user_ranges: [[1, 5], [10, 20], [3, 7]]", "6", True),
        ("user_ranges: [[1, 5], [10, 20], [3, 7]]", "8", False),
        ("user_ranges: [[1, 5], [10, 20], [3, 7]]", "20", True),
        ("user_ranges: [[0, 0]]", "0", True),
        ('user_suffixes: ["07", "99"]', "12307", True),
        ('user_suffixes: ["07", "99"]', "07", True),
        ('user_suffixes: ["07", "99"]', "0708", False),
        ('user_pattern: "[0-9]*0[0-9]"', "1203", True),
        ('user_pattern: "[0-9]*0[0-9]"', "12034", False),  # a full match, not a search
        ('user_pattern: "[0-9]*0[0-9]"', "x03", False),
    ],
)
def test_user_pins(condition: str, user: str, holds: bool) -> None:
    d = decide(pinned(condition), req(user))
    assert d.upstream == ("b" if holds else "a")
    if holds:
        assert d.reason == f"pin[0] {condition.split(':')[0]}"


@pytest.mark.parametrize(
    "condition",
    ['users: ["42"]', "user_ranges: [[0, 99]]", 'user_suffixes: ["2"]', 'user_pattern: ".*"',
     "user_percent: 100"],
)
def test_user_conditions_never_hold_without_a_user_id(condition: str) -> None:
    s = pinned(condition)
    assert decide(s, req()).upstream == "a"
    assert decide(s, req("")).upstream == "a"  # empty is no ID
    assert decide(s, req("42")).upstream == "b"


@pytest.mark.parametrize(
    ("headers", "holds"),
    [
        ({"x-app-version": "3.1.0"}, True),
        ({"x-app-version": "v3.1"}, False),
        ({"x-app-version": "2.9"}, False),
        ({}, False),  # an absent header never holds
    ],
)
def test_header_pin(headers: dict[str, str], holds: bool) -> None:
    d = decide(pinned(r'headers: {X-App-Version: "^3\\."}'), req(headers=headers))
    assert (d.upstream, d.reason) == (("b", "pin[0] headers") if holds else ("a", "to a"))


def test_header_pin_searches_and_needs_every_header() -> None:
    s = pinned('headers: {X-A: "beta", X-B: "."}')
    assert decide(s, req(headers={"x-a": "is-beta-user", "x-b": "1"})).upstream == "b"
    assert decide(s, req(headers={"x-a": "is-beta-user"})).upstream == "a"
    assert decide(s, req(headers={"x-a": "", "x-b": "1"})).upstream == "a"


@pytest.mark.parametrize(
    ("ip", "holds"),
    [
        ("192.168.3.4", True),
        ("192.169.0.1", False),
        ("10.0.0.1", True),
        ("::ffff:192.168.1.1", True),  # IPv4-mapped IPv6 counts as IPv4
        ("2001:db8::7", True),
        ("2001:db9::7", False),
        ("", False),
        ("not-an-ip", False),
        ("192.168.1", False),
    ],
)
def test_client_cidrs_pin(ip: str, holds: bool) -> None:
    s = pinned("client_cidrs: [192.168.0.0/16, 10.0.0.1, 2001:db8::/32]")
    assert decide(s, req(client_ip=ip)).upstream == ("b" if holds else "a")


def test_a_pin_holds_only_when_all_its_conditions_hold() -> None:
    s = pinned('users: ["42", "43"], headers: {X-Beta: "1"}, client_cidrs: [10.0.0.0/8]')
    ok = {"headers": {"x-beta": "1"}, "client_ip": "10.1.1.1"}
    assert decide(s, req("42", **ok)).reason == "pin[0] users+headers+client_cidrs"  # type: ignore[arg-type]
    assert decide(s, req("44", **ok)).upstream == "a"  # type: ignore[arg-type]
    assert decide(s, req("42", client_ip="10.1.1.1")).upstream == "a"
    assert decide(s, req("42", headers={"x-beta": "1"}, client_ip="11.0.0.1")).upstream == "a"


def test_first_pin_wins() -> None:
    s = snap(
        "  - name: r\n    pins:\n"
        '      - {to: b, users: ["42"]}\n'
        '      - {to: c, user_suffixes: ["2"]}\n'
        "      - {to: b, headers: {X-Beta: .}}\n"
        "    to: a\n"
    )
    assert decide(s, req("42")).reason == "pin[0] users"
    d = decide(s, req("52", headers={"x-beta": "1"}))
    assert (d.upstream, d.reason) == ("c", "pin[1] user_suffixes")
    d = decide(s, req(headers={"x-beta": "1"}))
    assert (d.upstream, d.reason, d.user_id) == ("b", "pin[2] headers", None)


def test_pins_come_before_the_split() -> None:
    s = snap('  - name: r\n    pins: [{to: c, users: ["7"]}]\n    split: {a: 1, b: 1}\n')
    assert decide(s, req("7")).upstream == "c"
    assert {decide(s, req(u)).upstream for u in USERS[:200]} == {"a", "b"}


# -- user_percent -------------------------------------------------------------------------


def percent_members(percent: str, salt: str = "") -> set[str]:
    extra = f"\n    salt: {salt}" if salt else ""
    s = snap(f"  - name: r\n    pins: [{{to: b, user_percent: {percent}}}]\n    to: a{extra}\n")
    return {u for u in USERS if decide(s, req(u)).upstream == "b"}


def test_user_percent_share_and_monotonic() -> None:
    five, ten = percent_members("5"), percent_members("10")
    assert abs(len(five) / len(USERS) - 0.05) < 0.01
    assert abs(len(ten) / len(USERS) - 0.10) < 0.01
    assert five < ten  # raising the percent only adds users
    assert percent_members("0") == set()
    assert percent_members("100") == set(USERS)
    small = percent_members("0.05")
    assert small < five
    assert len(small) < 40


def test_user_percent_bucket_is_the_documented_hash() -> None:
    hasher = prepared("%", "r")
    members = percent_members("12.34")
    expected = {u for u in USERS if percent_bucket(hasher, u) < 1234}
    assert members == expected


def test_salt_changes_the_sample() -> None:
    a, b = percent_members("10"), percent_members("10", salt="fresh")
    assert len(a & b) < len(a) * 0.2  # about 10 % overlap, as for independent samples


# -- split --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [{"a": 90, "b": 10}, {"a": 50, "b": 30, "c": 20}, {"a": 1, "b": 1, "c": 1, "d": 1},
     {"a": 99.5, "b": 0.5}],
)
def test_split_shares_within_one_point(weights: dict[str, float]) -> None:
    s = split_snap(", ".join(f"{k}: {v}" for k, v in weights.items()))
    counts = Counter(assign(s).values())
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(counts[name] / len(USERS) - w / total) < 0.01, (name, counts)


def test_split_is_sticky_and_reports_why() -> None:
    s = split_snap("a: 90, b: 10")
    first = assign(s, USERS[:500])
    again = assign(split_snap("a: 90, b: 10"), USERS[:500])  # a reload
    assert first == again
    d = decide(s, req(USERS[0]))
    assert d.reason == f"split by user ID -> {d.upstream} (weights a=90, b=10)"
    assert d.user_id == USERS[0] and d.user_id_source == "header:X-User-Id"


def test_raising_a_weight_moves_users_only_to_it() -> None:
    before = assign(split_snap("a: 90, b: 10"))
    after = assign(split_snap("a: 80, b: 20"))
    moved = [u for u in USERS if before[u] != after[u]]
    assert abs(len(moved) / len(USERS) - 0.10) < 0.01
    assert all(before[u] == "a" and after[u] == "b" for u in moved)


def members(assignment: dict[str, str], name: str) -> set[str]:
    return {u for u, upstream in assignment.items() if upstream == name}


def test_three_way_lowering_one_keeps_every_user_of_the_unchanged() -> None:
    before = assign(split_snap("a: 50, b: 30, c: 20"))
    after = assign(split_snap("a: 50, b: 10, c: 20"))
    # a and c did not change: they keep every one of their users (and share b's)
    assert members(before, "a") <= members(after, "a")
    assert members(before, "c") <= members(after, "c")
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(before[u] == "b" for u in moved)
    assert abs(len(moved) / len(USERS) - (0.30 - 10 / 80)) < 0.01  # b: 30 % -> 12.5 %
    to_a = sum(after[u] == "a" for u in moved)
    assert 0.6 < to_a / len(moved) < 0.82  # in proportion 50 : 20


def test_three_way_raising_one_takes_users_only_for_itself() -> None:
    before = assign(split_snap("a: 50, b: 30, c: 20"))
    after = assign(split_snap("a: 50, b: 30, c: 40"))
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(after[u] == "c" for u in moved)  # a and b lose users only to c, gain none
    assert members(after, "a") <= members(before, "a")
    assert members(after, "b") <= members(before, "b")
    assert abs(len(moved) / len(USERS) - (40 / 120 - 20 / 100)) < 0.01


def test_two_changes_at_once_equal_the_changes_one_after_the_other() -> None:
    # Moving 10 points from a to c in one edit: the result is that of lowering a, then
    # raising c (in either order). Users move to c from a and b, and from a to b and c;
    # b's share stays 30 %.
    before = assign(split_snap("a: 50, b: 30, c: 20"))
    after = assign(split_snap("a: 40, b: 30, c: 30"))
    assert after == assign(split_snap("a: 40, b: 30, c: 30"))
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(before[u] != "c" and after[u] != "a" for u in moved)
    assert abs(len(members(after, "b")) / len(USERS) - 0.30) < 0.01


def test_adding_an_upstream_takes_users_only_for_itself() -> None:
    before = assign(split_snap("a: 90, b: 10"))
    after = assign(split_snap("a: 90, b: 10, c: 10"))
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(after[u] == "c" for u in moved)
    assert abs(len(moved) / len(USERS) - 10 / 110) < 0.01


def test_weight_zero_is_never_chosen_and_moves_no_one() -> None:
    base = assign(split_snap("a: 70, b: 30"))
    with_zero = assign(split_snap("a: 70, b: 30, c: 0"))
    assert with_zero == base
    assert "c" not in set(with_zero.values())
    only = split_snap("a: 0, b: 5")
    assert set(assign(only, USERS[:300]).values()) == {"b"}
    random.seed(3)
    assert {decide(only, req()).upstream for _ in range(300)} == {"b"}


def test_salt_reassigns_users_but_keeps_shares() -> None:
    base = assign(split_snap("a: 50, b: 50"))
    salted = assign(split_snap("a: 50, b: 50", salt="take-2"))
    same = sum(base[u] == salted[u] for u in USERS) / len(USERS)
    assert 0.45 < same < 0.55  # independent of the old assignment
    assert abs(Counter(salted.values())["a"] / len(USERS) - 0.5) < 0.01


def test_split_without_user_id_is_random_by_weight() -> None:
    s = split_snap("a: 75, b: 25")
    random.seed(11)
    decisions = [decide(s, req()) for _ in range(20_000)]
    share = sum(d.upstream == "b" for d in decisions) / len(decisions)
    assert abs(share - 0.25) < 0.015
    d = decisions[0]
    assert d.user_id is None and d.user_id_source is None
    assert d.reason == f"split at random (no user ID) -> {d.upstream} (weights a=75, b=25)"


def test_split_replicas_uses_endpoint_counts() -> None:
    text = (
        "format: 1\nupstreams:\n"
        "  a: {endpoints: ['h:1', 'h:2', 'h:3']}\n  b: {endpoints: ['h:4']}\n"
        "user_id: [{header: X-User-Id}]\nroutes: [{name: r, split: replicas}]\n"
    )
    s = load_snapshot_text(text, "r.yaml")
    counts = Counter(assign(s).values())
    assert abs(counts["b"] / len(USERS) - 0.25) < 0.01
    assert decide(s, req("1")).reason.endswith("(replicas a=3, b=1)")


def test_split_is_the_documented_weighted_rendezvous() -> None:
    weights = {"a": 70.0, "b": 20.0, "c": 10.0}
    s = split_snap("a: 70, b: 20, c: 10")
    hashers = {name: prepared("split", "r", name) for name in weights}
    for user in USERS[:300]:
        scores = {name: -math.log(unit(hash64(hashers[name], user.encode()))) / w
                  for name, w in weights.items()}
        assert decide(s, req(user)).upstream == min(scores, key=scores.__getitem__)


# The assignment must never change between releases: users would move on upgrade.
GOLDEN = {"1": "a", "42": "b", "10086": "a", "alice": "b", "用户": "a", "1000000": "b"}


def test_assignment_is_stable_across_releases() -> None:
    s = split_snap("a: 50, b: 50")
    assert {u: decide(s, req(u)).upstream for u in GOLDEN} == GOLDEN
    hasher = prepared("%", "r")
    assert [percent_bucket(hasher, u) for u in ("1", "42", "alice")] == [2543, 4723, 9219]


_CHILD = """
import sys, orjson
from router.rules import RequestView, decide, load_snapshot_text
s = load_snapshot_text(sys.stdin.read(), "rules.yaml")
users = [str(n) for n in range(5000, 6000)]
out = [decide(s, RequestView("GET", "/", "", "h", {"x-user-id": u}, "")).upstream for u in users]
sys.stdout.write(orjson.dumps(out).decode())
"""


def test_decisions_are_the_same_in_another_process() -> None:
    text = rules("  - name: r\n    pins: [{to: d, user_percent: 10}]\n"
                 "    split: {a: 60, b: 30, c: 10}\n", "a b c d")
    s = load_snapshot_text(text, "rules.yaml")
    here = [decide(s, req(str(n))).upstream for n in range(5000, 6000)]
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run([sys.executable, "-c", _CHILD], input=text, env=env,
                               capture_output=True, text=True, check=True, timeout=60)
        assert orjson.loads(child.stdout) == here
    assert set(here) == {"a", "b", "c", "d"}


# -- helpers for building views -----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("API.Example.com", "api.example.com"),
        ("api.example.com:8080", "api.example.com"),
        ("api.example.com:", "api.example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        (" h ", "h"),
        ("", ""),
    ],
)
def test_host_from_header(header: str, host: str) -> None:
    assert host_from_header(header) == host


@pytest.mark.parametrize(
    ("target", "parts"),
    [
        ("/a/b?x=1&y=2", ("/a/b", "x=1&y=2")),
        ("/a", ("/a", "")),
        ("/a?", ("/a", "")),
        ("/a?x=1#frag", ("/a", "x=1")),
        ("/a?x=?", ("/a", "x=?")),
    ],
)
def test_split_target(target: str, parts: tuple[str, str]) -> None:
    assert split_target(target) == parts
