"""`grayroute check`: one line per problem, a summary, and the exit status."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from lua_compat.runtime import lua_available
from router.errors import Problem
from router.rules import RequestView, check_file, check_text, load_snapshot_text
from router.rules.check import run_check

ROOT = Path(__file__).resolve().parent.parent
GRAYROUTE = str(Path(sys.executable).parent / "grayroute")
VALIDATE = importlib.import_module("router.rules.validate")  # the package re-exports validate()
SHIPPED = [ROOT / "rules" / "demo.yaml", *sorted((ROOT / "rules" / "examples").glob("*.yaml"))]

VALID = """\
format: 1
upstreams:
  a: {endpoints: ["127.0.0.1:9001"]}
  b: {endpoints: ["127.0.0.1:9002"]}
  c: {endpoints: ["127.0.0.1:9003"]}
routes:
  - name: one
    match: {path_prefix: /one}
    split: {a: 90, b: 10}
  - name: two
    to: c
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def check(path: str, strict: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = run_check(path, strict=strict, out=out)
    return status, out.getvalue().splitlines()


def test_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    assert check(path) == (0, [f"{path}: OK (3 upstreams, 2 routes)"])
    assert check(path, strict=True) == (0, [f"{path}: OK (3 upstreams, 2 routes)"])


def test_warnings_pass_unless_strict(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("    to: c\n", "    to: a\n"))
    warning = (f"{path}:5:3: warning: upstreams.c: not used by any route "
               "(send traffic to it with `to`, a pin or a split, or remove it)")
    assert check(path) == (0, [warning, f"{path}: OK (3 upstreams, 2 routes, 1 warning)"])
    assert check(path, strict=True) == (
        1, [warning, f"{path}: FAILED with --strict (3 upstreams, 2 routes, 1 warning)"]
    )


def test_errors_fail(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("b: 10", "b9: 10").replace("to: c", "to: c\n    x: 1"))
    status, lines = check(path)
    assert status == 1
    assert lines == [
        f"{path}:9:20: routes[0].split.b9: unknown upstream (known: a, b, c; did you mean b?)",
        f"{path}:12:5: routes[1].x: unknown key (known keys here: name, match, pins, to, split, "
        "salt, user_id, body_limit, rollout)",
        f"{path}: FAILED (2 errors)",
    ]


def test_errors_and_warnings_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("a: 90", "a: 0").replace("to: c", "to: q"))
    status, lines = check(path)
    assert status == 1
    assert lines[-1] == f"{path}: FAILED (1 error, 1 warning)"


def test_unreadable_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    assert check(path) == (1, [
        f"{path}:1:1: file: cannot read the rule file: No such file or directory "
        "(check the path and its permissions)",
        f"{path}: FAILED (1 error)",
    ])


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "format: 1\nupstreams:\n  a: [1\n")
    status, lines = check(path)
    assert status == 1
    assert lines[0].startswith(f"{path}:4:1: yaml: not valid YAML: ")
    assert lines[0].endswith(")")  # with a hint
    assert lines[1] == f"{path}: FAILED (1 error)"


def test_check_file_returns_errors_and_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("b: 10", "b: 0").replace("to: c", "to: zz"))
    assert [(p.severity, p.path) for p in check_file(path)] == [
        ("warning", "routes[0].split.b"),
        ("error", "routes[1].to"),
    ]
    assert check_file(write(tmp_path, VALID, "ok.yaml")) == []
    assert [p.path for p in check_file(str(tmp_path / "nope.yaml"))] == ["file"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_pass_strict_check(path: Path) -> None:
    status, lines = check(str(path), strict=True)
    assert status == 0, lines
    assert len(lines) == 1 and ": OK (" in lines[0]


def test_command_line(tmp_path: Path) -> None:
    good = subprocess.run([GRAYROUTE, "check", *map(str, SHIPPED[:1])], capture_output=True,
                          text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert good.stdout == f"{SHIPPED[0]}: OK (3 upstreams, 2 routes)\n"
    bad_path = write(tmp_path, VALID.replace("format: 1", "format: 3"))
    bad = subprocess.run([GRAYROUTE, "check", bad_path], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{bad_path}:1:9: format: unsupported format 3 (this router reads format 1)",
        f"{bad_path}: FAILED (1 error)",
    ]
    warn_path = write(tmp_path, VALID.replace("to: c", "to: a"), "warn.yaml")
    strict = subprocess.run([GRAYROUTE, "check", "--strict", warn_path], capture_output=True,
                            text=True, timeout=60)
    assert strict.returncode == 1
    assert "warning: upstreams.c" in strict.stdout


# -- the warnings of `check`, one by one ------------------------------------------------
# Each is shown as `check` prints it, passes without --strict and fails with it.

PINS = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001"]}
  v2: {endpoints: ["127.0.0.1:9002"]}
user_id:
  - header: X-User-Id
routes:
  - name: main
    pins:
      - to: v2
        FIRST
      - to: TO
        LATER
    to: v1
"""


def pins_text(first: str, later: str, to: str = "v2") -> str:
    """The pins' conditions, given as `cond: value; cond: value`."""
    first, later = (c.replace("; ", "\n        ") for c in (first, later))
    return PINS.replace("FIRST", first).replace("LATER", later).replace("TO", to)


def check_file_text(text: str) -> list[Problem]:
    return check_text(text, "rules.yaml")


def warnings_of(text: str) -> list[str]:
    found = check_file_text(text)
    assert all(p.severity == "warning" for p in found), [str(p) for p in found]
    return [str(p) for p in found]


# c has no endpoints (a version scaled to zero); `replicas` gives it weight 0.
SCALED_TO_ZERO = (
    VALID.replace('c: {endpoints: ["127.0.0.1:9003"]}', "c: {endpoints: []}")
    .replace("split: {a: 90, b: 10}", "split: {a: 90, b: 10, c: replicas}")
    .replace("to: c", "to: a")
)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(VALID.replace("    to: c\n", "    to: a\n"), id="unused-upstream"),
        pytest.param(VALID.replace("b: 10", "b: 0"), id="weight-0"),
        pytest.param(VALID.replace("    match: {path_prefix: /one}\n", ""), id="catch-all"),
        pytest.param(pins_text('users: ["a", "b"]', 'users: ["a"]'), id="shadowed-pin"),
        pytest.param(SCALED_TO_ZERO, id="split-upstream-without-endpoints"),
    ],
)
def test_each_warning_passes_unless_strict(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    status, lines = check(path)
    assert status == 0, lines
    assert len(lines) == 2 and ": warning: " in lines[0], lines
    assert lines[1].startswith(f"{path}: OK (") and lines[1].endswith(", 1 warning)")
    status, lines = check(path, strict=True)
    assert status == 1
    assert lines[1].startswith(f"{path}: FAILED with --strict (")


def test_weight_zero_warning() -> None:
    assert warnings_of(VALID.replace("b: 10", "b: 0")) == [
        "rules.yaml:9:23: warning: routes[0].split.b: weight 0: this upstream gets no requests "
        "from this split (raise the weight or remove the line)"
    ]


# -- routes that never match -------------------------------------------------------------

ROUTES = """\
format: 1
upstreams:
  a: {endpoints: ["127.0.0.1:9001"]}
routes:
  - name: first
    FIRST
    to: a
  - name: later
    LATER
    to: a
"""


def routes_text(first: str, later: str) -> str:
    return ROUTES.replace("FIRST", first).replace("LATER", later)


def test_shadowed_routes_are_kept_with_the_rules() -> None:
    """What the warnings say, the rules in force say too (/rules, grayroute_route_shadowed)."""
    text = routes_text("match: {path_prefix: /api}", "match: {path_prefix: /api/v2}")
    assert load_snapshot_text(text, "rules.yaml").ruleset.shadowed_by == (("later", "first"),)
    text = routes_text("match: {path_prefix: /api/v2}", "match: {path_prefix: /api}")
    assert load_snapshot_text(text, "rules.yaml").ruleset.shadowed_by == ()


def test_route_after_a_catch_all() -> None:
    assert warnings_of(routes_text("match: {}", "match: {path_prefix: /x}")) == [
        "rules.yaml:8:5: warning: routes[1]: never used: route `first` above matches every "
        "request (move this route above it, or give that one a `match`)"
    ]
    assert warnings_of(routes_text("match: {path_prefix: /}", "match: {hosts: [x.com]}")) == [
        "rules.yaml:8:5: warning: routes[1]: never used: route `first` above matches every "
        "request (move this route above it, or give that one a `match`)"
    ]


@pytest.mark.parametrize(
    ("first", "later"),
    [
        ("{path_prefix: /api}", "{path_prefix: /api/v2}"),
        ("{path_prefix: /api}", "{path_prefix: /api}"),
        ("{path_prefix: /api}", "{path_prefix: /api, hosts: [x.com], methods: [GET]}"),
        ("{hosts: [x.com, y.com]}", "{hosts: [Y.com], path_prefix: /}"),
        ("{methods: [GET, POST]}", "{methods: [get]}"),
        ("{hosts: [x.com], methods: [GET]}", "{hosts: [x.com], methods: [GET], path_prefix: /a}"),
    ],
)
def test_route_covered_by_an_earlier_route(first: str, later: str) -> None:
    assert warnings_of(routes_text(f"match: {first}", f"match: {later}")) == [
        "rules.yaml:8:5: warning: routes[1]: never used: route `first` above matches every "
        "request this one matches (move this route above it, or narrow that one's `match`)"
    ]


@pytest.mark.parametrize(
    ("first", "later"),
    [
        ("{path_prefix: /api/v2}", "{path_prefix: /api}"),
        ("{path_prefix: /api}", "{path_prefix: /API/v2}"),  # case matters in paths
        ("{path_prefix: /api}", "{hosts: [x.com]}"),
        ("{hosts: [x.com]}", "{hosts: [x.com, y.com]}"),
        ("{hosts: [x.com]}", "{path_prefix: /a}"),
        ("{methods: [GET]}", "{methods: [GET, POST]}"),
        ("{methods: [GET]}", "{hosts: [x.com]}"),
    ],
)
def test_route_not_covered(first: str, later: str) -> None:
    assert warnings_of(routes_text(f"match: {first}", f"match: {later}")) == []


# -- pins that never hold first ----------------------------------------------------------


def test_shadowed_pin_same_upstream() -> None:
    assert warnings_of(pins_text('users: ["a", "b"]', 'users: ["a"]')) == [
        "rules.yaml:12:9: warning: routes[0].pins[1]: never used: pins[0] above (users) holds "
        "for every request this pin holds for (both send to v2; remove this pin)"
    ]


def test_shadowed_pin_other_upstream() -> None:
    assert warnings_of(pins_text("user_ranges: [[100, 199]]", 'users: ["150"]', to="v1")) == [
        "rules.yaml:12:9: warning: routes[0].pins[1]: never used: pins[0] above (user_ranges) "
        "holds for every request this pin holds for (pins[0] sends them to v2; move this pin "
        "above it, or remove it)"
    ]


def test_first_shadowing_pin_is_named_and_every_shadowed_pin_reported() -> None:
    text = PINS.replace(
        "      - to: TO\n        LATER\n",
        "      - to: v2\n        users: [a]\n"
        "      - to: v1\n        user_percent: 100\n"
        "      - to: v1\n        users: [a, c]\n",
    ).replace("FIRST", "user_suffixes: [x]")
    assert [(p.line, p.path, p.message[:22]) for p in check_file_text(text)] == [
        (16, "routes[0].pins[3]", "never used: pins[2] ab"),
    ]
    text = text.replace("users: [a, c]", "users: [a]")
    assert [(p.line, p.path, p.message[:22]) for p in check_file_text(text)] == [
        (16, "routes[0].pins[3]", "never used: pins[1] ab"),
    ]


# (first pin's conditions, later pin's conditions): the later pin is shadowed.
SHADOWED = [
    ('users: ["a", "b"]', 'users: ["a"]'),
    ('users: ["a"]', 'users: ["a"]'),
    ('users: ["a"]', 'users: ["a"]; headers: {X-Beta: "1"}'),
    ('users: ["42"]', "users: [42]"),
    ("user_ranges: [[100, 199]]", "user_ranges: [[120, 130], [100, 100]]"),
    ("user_ranges: [[100, 199], [200, 299]]", "user_ranges: [[150, 250]]"),
    ("user_ranges: [[100, 199]]", 'users: ["150", "0150", "199"]'),
    ('user_suffixes: ["7"]', 'user_suffixes: ["07", "17"]'),
    ('user_suffixes: ["7", "9"]', 'users: ["107", "x9"]'),
    ('user_pattern: "qa-[0-9]+"', 'users: ["qa-1", "qa-22"]'),
    ('user_pattern: "qa-[0-9]+"', 'user_pattern: "qa-[0-9]+"; client_cidrs: [10.0.0.0/8]'),
    ("user_percent: 100", 'users: ["a"]'),
    ("user_percent: 100", "user_ranges: [[1, 2]]"),
    ("user_percent: 100", 'user_pattern: ".*"; headers: {X-A: "1"}'),
    ("user_percent: 10", "user_percent: 5"),
    ("user_percent: 10", "user_percent: 10"),
    ('headers: {X-Beta: "1"}', 'headers: {x-beta: "1", X-Other: "y"}'),
    ("headers: {}", "client_cidrs: [10.0.0.0/8]"),
    ("client_cidrs: [10.0.0.0/8]", "client_cidrs: [10.1.0.0/16, 10.2.3.4]"),
    ('client_cidrs: ["2001:db8::/32", 10.0.0.0/8]', 'client_cidrs: ["2001:db8:1::/48"]'),
    ('users: ["a"]; client_cidrs: [10.0.0.0/8]', 'users: ["a"]; client_cidrs: [10.1.0.0/16]'),
]

NOT_SHADOWED = [
    ('users: ["a"]', 'users: ["a", "b"]'),
    ('users: ["a"]; headers: {X-Beta: "1"}', 'users: ["a"]'),
    ('users: ["a"]', 'user_pattern: "a"'),  # not worked out: only users imply users
    ("user_ranges: [[100, 199], [201, 299]]", "user_ranges: [[150, 250]]"),
    ("user_ranges: [[100, 199]]", 'users: ["150", "x"]'),
    ("user_ranges: [[100, 199]]", 'users: ["+150"]'),
    ('user_suffixes: ["07"]', 'user_suffixes: ["7"]'),
    ('user_suffixes: ["7"]', 'users: ["70"]'),
    ('user_pattern: "qa-[0-9]+"', 'users: ["qa-1", "qa-x"]'),
    ('user_pattern: "qa-[0-9]+"', 'user_pattern: "qa-[0-9]"'),
    ("user_percent: 100", 'headers: {X-A: "1"}'),  # holds without a user ID
    ("user_percent: 99.99", 'users: ["a"]'),
    ("user_percent: 5", "user_percent: 10"),
    ("user_percent: 0", "user_percent: 0"),  # never holds: no shadow to report
    ('headers: {X-Beta: "1"}', 'headers: {X-Beta: "^1$"}'),
    ('headers: {X-Beta: "1"}', 'users: ["a"]'),
    ("client_cidrs: [10.0.0.0/8]", "client_cidrs: [10.1.0.0/16, 192.168.0.0/16]"),
    ("client_cidrs: [10.0.0.0/8]", 'client_cidrs: ["::ffff:10.0.0.0/104"]'),
    ("client_cidrs: [10.0.0.0/16]", "client_cidrs: [10.0.0.0/8]"),
]


@pytest.mark.parametrize(("first", "later"), SHADOWED)
def test_pin_is_shadowed(first: str, later: str) -> None:
    found = [p for p in check_file_text(pins_text(first, later)) if p.path.endswith("pins[1]")]
    assert [(p.severity, p.path) for p in found] == [("warning", "routes[0].pins[1]")]
    assert found[0].message.startswith("never used: pins[0] above")
    _assert_shadowing_holds(pins_text(first, later))


@pytest.mark.parametrize(("first", "later"), NOT_SHADOWED)
def test_pin_is_not_shadowed(first: str, later: str) -> None:
    assert not any("pins[1]" in p.path for p in check_file_text(pins_text(first, later)))


def test_pins_that_never_hold_are_not_reported_as_shadowed() -> None:
    # Empty lists and pins without a user ID source have warnings of their own.
    found = warnings_of(pins_text("users: []", "users: []"))
    assert [p.split(": warning: ")[1][:30] for p in found] == [
        "routes[0].pins[0].users: empty",
        "routes[0].pins[1].users: empty",
    ]
    no_sources = pins_text('users: ["a", "b"]', 'users: ["a"]').replace(
        "user_id:\n  - header: X-User-Id\n", ""
    )
    assert [p.split(": warning: ")[1][:40] for p in warnings_of(no_sources)] == [
        "routes[0].pins[0]: never holds: there is",
        "routes[0].pins[1]: never holds: there is",
    ]


def _assert_shadowing_holds(text: str) -> None:
    """Check the claim on real decisions: wherever pin[1] holds, pin[0] holds too."""
    route = load_snapshot_text(text, "rules.yaml").routes[0]
    first, later = route.pins
    users: list[str | None] = [None, "a", "b", "c", "1", "2", "42", "0150", "x9", "qa-1"]
    users += [str(n) for n in range(0, 320, 7)] + [f"u{n}" for n in range(200)]
    headers = [{}, {"x-beta": "1"}, {"x-beta": "11", "x-other": "y"}, {"x-a": "1"}]
    ips = ["10.1.2.3", "10.2.3.4", "192.168.1.1", "2001:db8:1::1", "::ffff:10.1.2.3"]
    held = 0
    for user in users:
        for header in headers:
            for ip in ips:
                view = RequestView("GET", "/", "", "h", header, ip)
                if (user is not None or not later.needs_user) and later.check(user, view):
                    held += 1
                    assert first.check(user, view), (user, header, ip)
    assert held > 0  # the sample exercised the later pin


# -- upstreams without endpoints -------------------------------------------------------


def test_split_leaving_an_upstream_without_endpoints() -> None:
    assert warnings_of(SCALED_TO_ZERO) == [
        "rules.yaml:9:30: warning: routes[0].split.c: `c` has no endpoints, so `replicas` "
        "gives it weight 0: it gets no requests from this split (fine while it is scaled to "
        "zero; list endpoints under upstreams.c to send it traffic)"
    ]
    whole = SCALED_TO_ZERO.replace("split: {a: 90, b: 10, c: replicas}", "split: replicas")
    assert warnings_of(whole) == [
        "rules.yaml:9:12: warning: routes[0].split: `c` has no endpoints, so `replicas` gives "
        "it weight 0: it gets no requests from this split (fine while it is scaled to zero; "
        "list endpoints under upstreams.c to send it traffic)"
    ]
    snapshot = load_snapshot_text(whole, "rules.yaml")
    split = snapshot.routes[0].split
    assert split is not None and split.names == ("a", "b")  # c is never picked


def test_sending_requests_to_an_upstream_without_endpoints_is_an_error() -> None:
    def errors(text: str) -> list[str]:
        return [str(p) for p in check_file_text(text) if p.severity == "error"]

    assert errors(SCALED_TO_ZERO.replace("c: replicas", "c: 5")) == [
        "rules.yaml:9:30: routes[0].split.c: `c` has no endpoints, so the requests this split "
        "gives it would fail (list its endpoints, or set its weight to 0 or `replicas` while "
        "it has none)"
    ]
    assert errors(SCALED_TO_ZERO.replace("to: a", "to: c")) == [
        "rules.yaml:11:9: routes[1].to: upstream `c` has no endpoints, so the requests sent to "
        "it would fail (list its endpoints under upstreams.c, or send them to another upstream)"
    ]
    pinned = SCALED_TO_ZERO.replace(
        "  - name: two\n", "  - name: two\n    pins: [{to: c, client_cidrs: [10.0.0.0/8]}]\n"
    )
    assert errors(pinned) == [
        "rules.yaml:11:17: routes[1].pins[0].to: upstream `c` has no endpoints, so the requests "
        "sent to it would fail (list its endpoints under upstreams.c, or send them to another "
        "upstream)"
    ]
    assert check_file_text(SCALED_TO_ZERO.replace("c: replicas", "c: 0"))[0].message == (
        "weight 0: this upstream gets no requests from this split"
    )


def test_split_replicas_over_upstreams_that_all_have_no_endpoints() -> None:
    text = """\
format: 1
upstreams:
  a: {endpoints: []}
  b: {endpoints: []}
routes:
  - {name: all, split: replicas}
"""
    assert [str(p) for p in check_file_text(text)] == [
        "rules.yaml:6:24: routes[0].split: no upstream has endpoints, so `split: replicas` has "
        "nowhere to send requests (list the endpoints of at least one upstream)"
    ]
    per_entry = text.replace("split: replicas", "split: {a: replicas, b: replicas}")
    assert [p.message for p in check_file_text(per_entry) if p.severity == "error"] == [
        "the weights add up to 0"
    ]


def test_very_large_files_skip_the_search_for_shadowed_routes_and_pins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = routes_text("match: {path_prefix: /api}", "match: {path_prefix: /api/v2}")
    text += "  - {name: all, to: a}\n  - {name: after, to: a}\n"
    assert len(warnings_of(text)) == 2
    monkeypatch.setattr(VALIDATE, "MAX_SHADOW_PAIRS", 5)  # 4 routes: 6 pairs
    assert [w.split(": warning: ")[1][:40] for w in warnings_of(text)] == [
        "routes[3]: never used: route `all` above",  # a catch-all is still found
    ]
    pins = pins_text('users: ["a", "b"]', 'users: ["a"]')
    monkeypatch.setattr(VALIDATE, "MAX_SHADOW_PAIRS", 0)
    assert warnings_of(pins) == []
    monkeypatch.setattr(VALIDATE, "MAX_SHADOW_PAIRS", 1)
    assert len(warnings_of(pins)) == 1


LUA_RULES = """\
format: 1
upstreams:
  orders-v1: {endpoints: ["127.0.0.1:9001"]}
  orders-v2: {endpoints: ["127.0.0.1:9002"]}
  canary: {endpoints: ["127.0.0.1:9003"]}
  fallback: {endpoints: ["127.0.0.1:9004"]}
  spare: {endpoints: ["127.0.0.1:9005"]}
routes:
  - name: orders
    lua: {file: gray.lua, map: {"@canary": canary}, fallback: fallback}
"""
SCRIPT = """
-- "spare" is named in a comment only: not a choice of the script
local uid = ngx.var.http_x_user_id
if uid == "1" then return ngx.exec("@canary") end
ngx.var.backend = (uid == "2") and 'orders-v2' or [[orders-v1]]
"""


@pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")
def test_upstreams_a_script_names_are_used(tmp_path: Path) -> None:
    (tmp_path / "gray.lua").write_text(SCRIPT)
    path = write(tmp_path, LUA_RULES)
    assert check(path, strict=True) == (1, [
        f"{path}:7:3: warning: upstreams.spare: not used by any route (send traffic to it "
        "with `to`, a pin or a split, or remove it)",
        f"{path}: FAILED with --strict (5 upstreams, 1 route, 1 warning)",
    ])
    (tmp_path / "gray.lua").write_text(SCRIPT + 'if uid == "3" then ngx.var.backend = "spare" end')
    assert check(path, strict=True) == (0, [f"{path}: OK (5 upstreams, 1 route)"])
