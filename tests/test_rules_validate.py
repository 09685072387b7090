"""The validator: every kind of mistake, reported at its FILE:LINE:COLUMN with a hint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from router.errors import Problem
from router.rules import check_text
from router.rules.load import load_text
from router.rules.model import DEFAULT_BODY_LIMIT, DnsEndpoints, HealthCheck, RuleSet
from router.rules.validate import parse_duration, parse_size, validate

ROOT = Path(__file__).resolve().parent.parent

# Line numbers below refer to this file.
BASE = """\
format: 1
upstreams:
  v1:
    endpoints: ["127.0.0.1:9001"]
  v2:
    endpoints: ["127.0.0.1:9002"]
user_id:
  - header: X-User-Id
routes:
  - name: main
    pins:
      - to: v2
        users: ["42"]
    split:
      v1: 90
      v2: 10
"""


def problems(text: str) -> list[str]:
    return [str(p) for p in check_text(text, "rules.yaml")]


def only(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def ruleset(text: str) -> RuleSet:
    root, load_problems = load_text(text, "rules.yaml")
    rules, found = validate(root, "rules.yaml")
    assert not load_problems
    assert rules is not None, [str(p) for p in found]
    return rules


def test_base_is_valid() -> None:
    assert problems(BASE) == []


def test_shipped_rule_files_are_valid_without_warnings() -> None:
    files = [ROOT / "rules" / "demo.yaml", *sorted((ROOT / "rules" / "examples").glob("*.yaml"))]
    assert len(files) >= 3
    for path in files:
        assert problems(path.read_text()) == [], path


def test_spec_example_builds_the_model() -> None:
    rules = ruleset((ROOT / "rules" / "examples" / "spec.yaml").read_text())
    assert [u.name for u in rules.upstreams] == ["orders-v1", "orders-v1.1", "orders-v2"]
    v2 = rules.upstreams[2]
    assert v2.endpoints == (("127.0.0.1", 9004),)
    assert (v2.connect_timeout, v2.read_timeout) == (1.0, 30.0)
    assert rules.upstreams[0].connect_timeout is None
    assert [s.label for s in rules.user_id] == [
        "header:X-User-Id", "cookie:uid", "query:userId", "json:user.id", "form:userId"
    ]
    assert rules.body_limit == 64 * 1024
    orders, rest = rules.routes
    assert orders.match.hosts == ("api.example.com",)
    assert orders.match.path_prefix == "/orders"
    assert orders.match.methods == ("GET", "POST")
    assert orders.salt == "orders"
    assert [p.conditions for p in orders.pins] == [
        ("users",), ("user_ranges",), ("user_suffixes",), ("user_pattern",),
        ("user_percent",), ("headers",), ("client_cidrs",),
    ]
    assert orders.pins[0].users == frozenset({"10086", "42"})
    assert orders.pins[1].user_ranges == ((100000, 199999),)
    assert orders.pins[5].headers == (("X-App-Version", "^3\\."),)
    assert orders.split is not None
    assert orders.split.weights == (("orders-v1", 95.0), ("orders-v1.1", 5.0))
    assert rest.to == "orders-v1" and rest.split is None and rest.pins == ()
    assert rest.match.matches_everything


def test_model_is_frozen() -> None:
    rules = ruleset(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.routes[0].name = "x"  # type: ignore[misc]


# -- unknown keys and upstreams ---------------------------------------------------------


def test_unknown_key_with_suggestion() -> None:
    assert only(edit("    pins:", "    pin:")) == (
        "rules.yaml:11:5: routes[0].pin: unknown key (did you mean `pins`?)"
    )


def test_unknown_key_without_suggestion_lists_known_keys() -> None:
    assert only(edit("format: 1\n", "format: 1\nzzz: 1\n")) == (
        "rules.yaml:2:1: zzz: unknown key "
        "(known keys here: format, upstreams, user_id, body_limit, routes)"
    )


def test_misspelt_pin_condition_is_not_ignored() -> None:
    assert only(edit("        users:", "        user:")) == (
        "rules.yaml:13:9: routes[0].pins[0].user: unknown key (did you mean `users`?)"
    )


def test_unknown_upstream_in_split_lists_known_and_suggests() -> None:
    text = edit("      v2: 10\n", "      v3: 10\n")
    assert problems(text) == [
        "rules.yaml:16:7: routes[0].split.v3: unknown upstream (known: v1, v2)"
    ]


def test_unknown_upstream_in_pin_and_to() -> None:
    text = edit("      - to: v2", "      - to: v22")
    text = edit("    split:\n      v1: 90\n      v2: 10\n", "    to: nope\n", text)
    assert problems(text) == [
        "rules.yaml:12:13: routes[0].pins[0].to: unknown upstream "
        "(known: v1, v2; did you mean v2?)",
        "rules.yaml:14:9: routes[0].to: unknown upstream (known: v1, v2)",
    ]


def test_unused_upstream_is_a_warning() -> None:
    text = edit("user_id:", '  old:\n    endpoints: ["127.0.0.1:9009"]\nuser_id:')
    found = check_text(text, "rules.yaml")
    assert [str(p) for p in found] == [
        "rules.yaml:7:3: warning: upstreams.old: not used by any route "
        "(send traffic to it with `to`, a pin or a split, or remove it)"
    ]
    assert found[0].severity == "warning"


# -- routes ---------------------------------------------------------------------------


def test_to_and_split_together() -> None:
    assert only(edit("    split:", "    to: v1\n    split:")) == (
        "rules.yaml:15:5: routes[0].split: a route has either `to` or `split`, not both "
        "(keep `to` for one upstream, `split` for weights)"
    )


def test_neither_to_nor_split() -> None:
    text = edit("    split:\n      v1: 90\n      v2: 10\n", "")
    assert only(text) == (
        "rules.yaml:10:5: routes[0]: a route needs `to` or `split` "
        "(add `to: UPSTREAM` for one upstream or `split:` with weights)"
    )


def test_route_names_present_and_unique() -> None:
    text = BASE + "  - name: main\n    to: v1\n  - to: v1\n"
    assert problems(text) == [
        "rules.yaml:17:11: routes[1].name: route name `main` is used twice "
        "(it is also the name at line 10; names must be unique)",
        "rules.yaml:19:5: routes[2].name: missing `name` (add `name:` to routes[2])",
    ]


def test_no_routes_and_no_upstreams() -> None:
    assert problems("format: 1\nupstreams: {}\nroutes: []\n") == [
        "rules.yaml:2:12: upstreams: no upstreams (name at least one upstream)",
        "rules.yaml:3:9: routes: no routes "
        "(add at least one route, e.g. `- {name: all, to: UPSTREAM}`)",
    ]


def test_missing_sections() -> None:
    assert problems("upstreams:\n  v1: {endpoints: ['a:1']}\n") == [
        "rules.yaml:1:1: routes: missing `routes` (add `routes:` to the file)",
        "rules.yaml:1:1: format: missing `format` (add `format: 1` as the first line)",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2", "rules.yaml:1:9: format: unsupported format 2 (this router reads format 1)"),
        ('"1"', "rules.yaml:1:9: format: format must be the number 1, found `1` "
                "(write `format: 1`)"),
        ("true", "rules.yaml:1:9: format: format must be the number 1, found `true` "
                 "(write `format: 1`)"),
    ],
)
def test_format(value: str, message: str) -> None:
    assert only(edit("format: 1", f"format: {value}")) == message


def test_empty_file_and_wrong_top_level() -> None:
    assert problems("") == ["rules.yaml:1:1: (file): the rule file is empty "
                            "(start with `format: 1`, then `upstreams:` and `routes:`)"]
    assert problems("- a\n") == ["rules.yaml:1:1: (file): expected a mapping, found a list "
                                 "(start with `format: 1`, then `upstreams:` and `routes:`)"]


def test_unreachable_route_is_a_warning() -> None:
    text = BASE.replace("  - name: main\n", "  - name: all\n    to: v1\n  - name: main\n")
    assert problems(text) == [
        "rules.yaml:12:5: warning: routes[1]: never used: route `all` above matches every "
        "request (move this route above it, or give that one a `match`)"
    ]


# -- match --------------------------------------------------------------------------------


def match_text(match: str) -> str:
    return edit("  - name: main\n", f"  - name: main\n    match: {match}\n")


def test_match_is_normalised() -> None:
    rules = ruleset(match_text("{hosts: [API.Example.com, '[::1]', a.b], path_prefix: /x, "
                               "methods: [get, Post, GET]}"))
    m = rules.routes[0].match
    assert m.hosts == ("api.example.com", "::1", "a.b")
    assert m.path_prefix == "/x"
    assert m.methods == ("GET", "POST")


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{hosts: [a.com:8080]}", "routes[0].match.hosts[0]: `a.com:8080` has a port "
                                  "(leave out the port; hosts are matched without it)"),
        ("{hosts: ['a.*.com']}", "routes[0].match.hosts[0]: `a.*.com`: a wildcard is a whole "
                                 "first or last label (write *.example.com (names ending in "
                                 ".example.com) or www.example.* (names starting with "
                                 "www.example.))"),
        ("{hosts: ['*']}", "routes[0].match.hosts[0]: `*` alone matches every host (remove "
                           "`hosts` to match every host)"),
        ("{path_prefix: /a, path_exact: /b}", "routes[0].match.path_exact: a match has one of "
                                              "`path_prefix`, `path_exact` and `path_regex` "
                                              "(keep one; a route per path covers several)"),
        ("{path_regex: '^/a('}", "routes[0].match.path_regex: bad regular expression: missing ), "
                                 "unterminated subpattern at position 3 (check brackets and "
                                 "escapes; in YAML double quotes write \\\\ for \\)"),
        ("{hosts: [a.com], default_host: true}", "routes[0].match.default_host: `default_host` "
                                                 "holds only for hosts no route names, so it "
                                                 "cannot go with `hosts` (make two routes: one "
                                                 "for the named hosts, one for the others)"),
        ("{default_host: yes please}", "routes[0].match.default_host: expected true or false, "
                                       "found `yes please` (write `default_host: true`)"),
        ("{path_exact: health}", "routes[0].match.path_exact: `health` does not start with / "
                                 "(write /health)"),
        ("{hosts: [http://a.com]}", "routes[0].match.hosts[0]: `http://a.com` is not a host "
                                    "name (write only the host, e.g. api.example.com)"),
        ("{hosts: []}", "routes[0].match.hosts: empty list: the route would never match "
                        "(list at least one host, or remove `hosts` to match every host)"),
        ("{hosts: a.com}", "routes[0].match.hosts: expected a list, found text "
                           "(write [api.example.com])"),
        ("{path_prefix: orders}", "routes[0].match.path_prefix: `orders` does not start "
                                  "with / (write /orders)"),
        ("{methods: [GET, 'P T']}", "routes[0].match.methods[1]: `P T` is not an HTTP method "
                                    "(write e.g. GET, POST, PUT, DELETE)"),
        ("{method: [GET]}", "routes[0].match.method: unknown key (did you mean `methods`?)"),
    ],
)
def test_match_errors(match: str, message: str) -> None:
    found = only(match_text(match))
    assert found.split(": ", 1)[1] == message, found
    assert found.startswith("rules.yaml:11:")


# -- upstreams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("localhost", "`localhost` is not HOST:PORT "
                      "(write HOST:PORT, e.g. 127.0.0.1:9001 or [::1]:9001)"),
        ("a:0", "port 0 is out of range (use a port from 1 to 65535)"),
        ("a:70000", "port 70000 is out of range (use a port from 1 to 65535)"),
        ("a:http", "`a:http` is not HOST:PORT "
                   "(write HOST:PORT, e.g. 127.0.0.1:9001 or [::1]:9001)"),
        ("http://a:80", "`http://a:80` is a URL, not HOST:PORT "
                        "(leave out the scheme (http://) and any path)"),
        ("::1:80", "`::1:80`: an IPv6 address needs brackets "
                   "(write HOST:PORT, e.g. 127.0.0.1:9001 or [::1]:9001)"),
    ],
)
def test_bad_endpoints(endpoint: str, message: str) -> None:
    assert only(edit('"127.0.0.1:9001"', f'"{endpoint}"')) == (
        f"rules.yaml:4:17: upstreams.v1.endpoints[0]: {message}"
    )


def test_endpoints_parse_hosts_and_ipv6() -> None:
    rules = ruleset(edit('"127.0.0.1:9001"', '"[::1]:9001", "backend.local:80"'))
    assert rules.upstreams[0].endpoints == (("::1", 9001), ("backend.local", 80))


def test_endpoints_missing_or_empty() -> None:
    # An empty list is allowed (a version scaled to zero), but nothing may send to it.
    assert only(edit('    endpoints: ["127.0.0.1:9001"]', "    endpoints: []")) == (
        "rules.yaml:15:11: routes[0].split.v1: `v1` has no endpoints, so the requests this "
        "split gives it would fail (list its endpoints, or set its weight to 0 or `replicas` "
        "while it has none)"
    )
    assert only(edit('    endpoints: ["127.0.0.1:9001"]', "    read_timeout: 1s")) == (
        "rules.yaml:4:5: upstreams.v1.endpoints: missing `endpoints` "
        "(add `endpoints:` to upstreams.v1)"
    )


def test_duplicate_endpoint_is_a_warning() -> None:
    found = only(edit('"127.0.0.1:9001"', '"127.0.0.1:9001", "127.0.0.1:9001"'))
    assert found.startswith("rules.yaml:4:35: warning: upstreams.v1.endpoints[1]: endpoint "
                            "listed twice")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), ("0.25s", 0.25),
     ("10 s", 10.0), ("3", 3.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("64KiB", 65536), ("1MiB", 1048576), ("512", 512), ("10KB", 10000), ("1 kib", 1024),
     ("2GB", 2 * 10**9), ("0.5KiB", 512), ("100B", 100)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5B", "ten", "64QB", "-1", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_timeouts_and_health_check() -> None:
    rules = ruleset(edit(
        '    endpoints: ["127.0.0.1:9002"]\n',
        '    endpoints: ["127.0.0.1:9002"]\n    connect_timeout: 500ms\n    read_timeout: 2\n'
        "    health_check: {path: /healthz, interval: 2s}\n",
    ))
    v2 = rules.upstreams[1]
    assert (v2.connect_timeout, v2.read_timeout) == (0.5, 2.0)
    assert v2.health_check == HealthCheck("/healthz", 2.0)
    assert rules.upstreams[0].health_check is None
    defaults = ruleset(edit('    endpoints: ["127.0.0.1:9002"]\n',
                            '    endpoints: ["127.0.0.1:9002"]\n    health_check: {}\n'))
    assert defaults.upstreams[1].health_check == HealthCheck("/healthz", 5.0)


def test_passive_health_settings() -> None:
    passive = ruleset(edit('    endpoints: ["127.0.0.1:9002"]\n',
                           '    endpoints: ["127.0.0.1:9002"]\n    max_fails: 3\n'
                           '    fail_timeout: 30s\n'))
    assert (passive.upstreams[1].max_fails, passive.upstreams[1].fail_timeout) == (3, 30.0)
    assert (passive.upstreams[0].max_fails, passive.upstreams[0].fail_timeout) == (None, None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("    connect_timeout: 1x", "rules.yaml:7:22: upstreams.v2.connect_timeout: not a "
                                    "duration: `1x` (write e.g. 1s, 500ms, 2m or a number of "
                                    "seconds)"),
        ("    read_timeout: 0s", "rules.yaml:7:19: upstreams.v2.read_timeout: must be longer "
                                 "than 0 (write e.g. 1s or 500ms)"),
        ("    conect_timeout: 1s", "rules.yaml:7:5: upstreams.v2.conect_timeout: unknown key "
                                   "(did you mean `connect_timeout`?)"),
        ("    health_check: {path: healthz}", "rules.yaml:7:26: upstreams.v2.health_check.path: "
                                              "`healthz` does not start with / "
                                              "(write /healthz)"),
        ("    health_check: {interval: soon}", "rules.yaml:7:30: upstreams.v2.health_check."
                                               "interval: not a duration: `soon` (write e.g. "
                                               "1s, 500ms, 2m or a number of seconds)"),
        ("    health_check: {path: /h, timeout: 1s}", "rules.yaml:7:30: upstreams.v2."
                                                      "health_check.timeout: unknown key "
                                                      "(known keys here: path, interval)"),
        ("    max_fails: -1", "rules.yaml:7:16: upstreams.v2.max_fails: expected a whole "
                              "number of 0 or more, found `-1` (write e.g. 3 (0: failures "
                              "never take an endpoint out))"),
        ("    max_fails: '3'", "rules.yaml:7:16: upstreams.v2.max_fails: expected a whole "
                               "number of 0 or more, found `3` (write e.g. 3 (0: failures "
                               "never take an endpoint out))"),
        ("    fail_timeout: 30 sec", "rules.yaml:7:19: upstreams.v2.fail_timeout: not a "
                                     "duration: `30 sec` (write e.g. 1s, 500ms, 2m or a "
                                     "number of seconds)"),
    ],
)
def test_upstream_setting_errors(line: str, message: str) -> None:
    assert only(edit('    endpoints: ["127.0.0.1:9002"]\n',
                     f'    endpoints: ["127.0.0.1:9002"]\n{line}\n')) == message


# -- body_limit and user_id ---------------------------------------------------------------


def test_body_limit_default_file_and_route() -> None:
    assert ruleset(BASE).body_limit == DEFAULT_BODY_LIMIT
    rules = ruleset(edit("routes:", "body_limit: 1MiB\nroutes:",
                         edit("    pins:", "    body_limit: 512\n    pins:")))
    assert rules.body_limit == 1024 * 1024
    assert rules.routes[0].body_limit == 512
    assert rules.body_limit_of(rules.routes[0]) == 512


def test_bad_body_limit() -> None:
    assert only(edit("routes:", "body_limit: 64 kilobytes\nroutes:")) == (
        "rules.yaml:9:13: body_limit: not a size: `64 kilobytes` "
        "(write e.g. 64KiB, 1MiB, 10KB or a number of bytes)"
    )


def test_huge_body_limit_is_a_warning() -> None:
    found = check_text(edit("routes:", "body_limit: 1GiB\nroutes:"), "rules.yaml")
    assert [p.severity for p in found] == ["warning"]


def test_route_user_id_replaces_the_files() -> None:
    rules = ruleset(edit("    pins:", "    user_id:\n      - cookie: sid\n    pins:"))
    route = rules.routes[0]
    assert [s.label for s in rules.sources_of(route)] == ["cookie:sid"]
    assert [s.label for s in rules.user_id] == ["header:X-User-Id"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("  - heder: X-User-Id", "rules.yaml:8:5: user_id[0].heder: unknown key "
                                 "(did you mean `header`?)"),
        ("  - header: X User", "rules.yaml:8:13: user_id[0].header: `X User` is not a valid "
                               "header name (use letters, digits and - _ . only)"),
        ("  - json: user..id", "rules.yaml:8:11: user_id[0].json: bad JSON path `user..id`: a "
                               "name is missing at position 6 (write a dotted path like "
                               "user.id or items[0].id)"),
        ("  - {header: A, cookie: b}", "rules.yaml:8:5: user_id[0]: one item names 2 sources "
                                       "(write one source per item, e.g. `- header: X-User-Id`"
                                       " or `- json: user.id`)"),
        ("  - header:X-User-Id", "rules.yaml:8:5: user_id[0]: expected a source like `header: "
                                 "X-User-Id`, found text (write one source per item, e.g. "
                                 "`- header: X-User-Id` or `- json: user.id`)"),
        ("  - header: ''", "rules.yaml:8:13: user_id[0].header: empty header name "
                           "(write the header name)"),
    ],
)
def test_user_id_errors(source: str, message: str) -> None:
    assert only(edit("  - header: X-User-Id", source)) == message


def test_user_pins_without_sources_are_a_warning() -> None:
    found = only(edit("user_id:\n  - header: X-User-Id\n", ""))
    assert found == ("rules.yaml:8:5: warning: routes[0].pins[0]: never holds: there is no "
                     "`user_id` source for this route (add `user_id:` to the file or to the "
                     "route)")


# -- pins ---------------------------------------------------------------------------------


def pin_text(condition: str) -> str:
    return edit('        users: ["42"]', f"        {condition}")


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ('user_pattern: "[0-9"', "rules.yaml:13:23: routes[0].pins[0].user_pattern: bad regular "
                                 "expression: unterminated character set at position 0 (check "
                                 "brackets and escapes; in YAML double quotes write \\\\ for \\)"),
        ('headers: {X-App: "(a"}', "rules.yaml:13:26: routes[0].pins[0].headers.X-App: bad "
                                   "regular expression: missing ), unterminated subpattern at "
                                   "position 0 (check brackets and escapes; in YAML double "
                                   "quotes write \\\\ for \\)"),
        ("user_percent: 5.555", "rules.yaml:13:23: routes[0].pins[0].user_percent: 5.555 has "
                                "more than two decimals: a percentage has at most two (write "
                                "5.55 or 5.56)"),
        ('user_percent: "5"', 'rules.yaml:13:23: routes[0].pins[0].user_percent: user_percent '
                              'must be a number, found the text "5" (it is in quotes) (write 5 '
                              "without quotes)"),
        ("user_percent: 101", "rules.yaml:13:23: routes[0].pins[0].user_percent: 101 is not "
                              "between 0 and 100 (write a percentage from 0 to 100)"),
        ("user_percent: 5%", "rules.yaml:13:23: routes[0].pins[0].user_percent: `5%`: write "
                             "the number without % (write 5)"),
        ("user_percent: lots", "rules.yaml:13:23: routes[0].pins[0].user_percent: user_percent "
                               "must be a number, found `lots` (write e.g. 5 or 0.5)"),
        ("user_ranges: [[5, 1]]", "rules.yaml:13:23: routes[0].pins[0].user_ranges[0]: low end "
                                  "5 is above high end 1 (write [1, 5])"),
        ("user_ranges: [[1, 2, 3]]", "rules.yaml:13:23: routes[0].pins[0].user_ranges[0]: "
                                     "expected a pair [low, high] (write e.g. [100000, 199999];"
                                     " both ends are included)"),
        ("user_ranges: [[a, 2]]", "rules.yaml:13:24: routes[0].pins[0].user_ranges[0][0]: "
                                  "expected a whole number, found `a` (user ranges compare "
                                  "user IDs as integers)"),
        ("client_cidrs: [10.0.0.300/8]", "rules.yaml:13:24: routes[0].pins[0].client_cidrs[0]: "
                                         "`10.0.0.300/8` is not an address or CIDR (write e.g. "
                                         "192.168.0.0/16, 10.1.2.3 or 2001:db8::/32)"),
        ("users: 42", "rules.yaml:13:16: routes[0].pins[0].users: expected a list, found a "
                      'number (write ["10086", "42"])'),
        ("users: [null]", "rules.yaml:13:17: routes[0].pins[0].users[0]: expected user ID "
                          "(text), found nothing (null) (put it in quotes)"),
        ("headers: {'X App': a}", "rules.yaml:13:19: routes[0].pins[0].headers.X App: `X App` "
                                  "is not a valid header name (use letters, digits and - _ . "
                                  "only)"),
        ("headers: {A: x, a: y}", "rules.yaml:13:25: routes[0].pins[0].headers.a: header `a` is "
                                  "listed twice (header names ignore case (`A` is the same "
                                  "header); join the two regular expressions)"),
    ],
)
def test_pin_errors(condition: str, message: str) -> None:
    assert only(pin_text(condition)) == message


def test_every_range_must_be_a_pair() -> None:
    assert problems(pin_text("user_ranges: [1, 2]")) == [
        f"rules.yaml:13:{col}: routes[0].pins[0].user_ranges[{i}]: expected a pair [low, high] "
        "(write e.g. [100000, 199999]; both ends are included)"
        for i, col in ((0, 23), (1, 26))
    ]


def test_pin_needs_a_condition_and_a_target() -> None:
    assert only(edit('        users: ["42"]\n', "")) == (
        "rules.yaml:12:9: routes[0].pins[0]: a pin needs at least one condition (add one of "
        "users, user_ranges, user_suffixes, user_pattern, user_percent, headers, client_cidrs; "
        "to send every request to one upstream use the route's `to`)"
    )
    assert only(edit("      - to: v2\n        users:", "      - users:")) == (
        "rules.yaml:12:9: routes[0].pins[0].to: missing `to` (add `to:` to routes[0].pins[0])"
    )


def test_pin_values_are_normalised() -> None:
    text = pin_text(
        "users: [42, '007', 7.50]\n"
        "        user_ranges: [[1, 5], [3, 9]]\n"
        "        user_suffixes: [07, '9']\n"
        "        user_percent: 12.5\n"
        "        client_cidrs: [10.0.0.0/8, 2001:db8::/32, 192.168.1.7]\n"
        "        headers: {X-App-Version: ^3}"
    )
    pin = ruleset(text).routes[0].pins[0]
    assert pin.users == frozenset({"42", "007", "7.50"})  # numbers as written
    assert pin.user_ranges == ((1, 5), (3, 9))
    assert pin.user_suffixes == ("07", "9")
    assert pin.user_percent == 12.5
    assert pin.client_cidrs == ("10.0.0.0/8", "2001:db8::/32", "192.168.1.7/32")
    assert pin.headers == (("X-App-Version", "^3"),)
    assert pin.conditions == ("users", "user_ranges", "user_suffixes", "user_percent",
                              "headers", "client_cidrs")


def test_cidr_with_host_bits_is_a_warning() -> None:
    found = check_text(pin_text("client_cidrs: [10.1.0.0/8]"), "rules.yaml")
    assert [str(p) for p in found] == [
        "rules.yaml:13:24: warning: routes[0].pins[0].client_cidrs[0]: `10.1.0.0/8` has host "
        "bits set; it means 10.0.0.0/8 (write 10.0.0.0/8)"
    ]


def test_empty_users_list_is_a_warning() -> None:
    found = check_text(pin_text("users: []"), "rules.yaml")
    assert [(p.severity, p.path) for p in found] == [("warning", "routes[0].pins[0].users")]


# -- split --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ("-1", "rules.yaml:16:11: routes[0].split.v2: negative weight -1 "
               "(use 0 or more; 0 sends nothing)"),
        ("10.005", "rules.yaml:16:11: routes[0].split.v2: weight 10.005 has more than two "
                   "decimals: a weight has at most two (write 10 or 10.01)"),
        # a float rounds 1.555 down to 1.55: both neighbours are named, not a "rounding"
        ("1.555", "rules.yaml:16:11: routes[0].split.v2: weight 1.555 has more than two "
                  "decimals: a weight has at most two (write 1.55 or 1.56)"),
        ('"95"', 'rules.yaml:16:11: routes[0].split.v2: a weight must be a number, found the '
                 'text "95" (it is in quotes) (write 95 without quotes)'),
        ("'0.5'", 'rules.yaml:16:11: routes[0].split.v2: a weight must be a number, found the '
                  'text "0.5" (it is in quotes) (write 0.5 without quotes)'),
        ("ten", "rules.yaml:16:11: routes[0].split.v2: a weight must be a number, found `ten` "
                "(write e.g. 95 (or `replicas`))"),
        ("10%", "rules.yaml:16:11: routes[0].split.v2: `10%`: write the weight without % "
                "(write 10)"),
        (".inf", "rules.yaml:16:11: routes[0].split.v2: a weight must be a finite number "
                 "(write e.g. 95 (or `replicas`))"),
        ("true", "rules.yaml:16:11: routes[0].split.v2: a weight must be a number, found "
                 "`true` (write e.g. 95 (or `replicas`))"),
    ],
)
def test_bad_weights(weight: str, message: str) -> None:
    assert only(edit("      v2: 10", f"      v2: {weight}")) == message


def test_weights_summing_to_zero() -> None:
    text = edit("      v1: 90\n      v2: 10", "      v1: 0\n      v2: 0")
    assert problems(text) == [
        "rules.yaml:15:7: routes[0].split: the weights add up to 0 "
        "(give at least one upstream a positive weight)",
        "rules.yaml:15:11: warning: routes[0].split.v1: weight 0: this upstream gets no "
        "requests from this split (raise the weight or remove the line)",
        "rules.yaml:16:11: warning: routes[0].split.v2: weight 0: this upstream gets no "
        "requests from this split (raise the weight or remove the line)",
    ]


def test_weight_zero_is_a_warning_only() -> None:
    found = check_text(edit("      v2: 10", "      v2: 0"), "rules.yaml")
    assert [p.severity for p in found] == ["warning"]


def test_two_decimal_weights_are_fine() -> None:
    split = ruleset(edit("      v1: 90\n      v2: 10", "      v1: 66.67\n      v2: 33.33"))
    assert split.routes[0].split is not None
    assert split.routes[0].split.weights == (("v1", 66.67), ("v2", 33.33))


def test_split_replicas() -> None:
    text = edit('"127.0.0.1:9001"', '"127.0.0.1:9001", "127.0.0.1:9003", "127.0.0.1:9004"')
    rules = ruleset(edit("    split:\n      v1: 90\n      v2: 10", "    split: replicas", text))
    split = rules.routes[0].split
    assert split is not None and split.replicas
    assert split.weights == (("v1", 3.0), ("v2", 1.0))
    per_entry = ruleset(edit("      v1: 90", "      v1: replicas", text)).routes[0].split
    assert per_entry is not None
    assert per_entry.weights == (("v1", 3.0), ("v2", 10.0))


def test_split_must_be_weights_or_replicas() -> None:
    assert only(edit("    split:\n      v1: 90\n      v2: 10", "    split: replica")) == (
        "rules.yaml:14:12: routes[0].split: expected weights or `replicas`, found `replica` "
        "(write `UPSTREAM: WEIGHT` lines, e.g. `orders-v1: 95` and `orders-v1.1: 5`)"
    )


def test_salt() -> None:
    assert ruleset(BASE).routes[0].salt == "main"
    assert ruleset(edit("    pins:", "    salt: 2024-rollout\n    pins:")).routes[0].salt == (
        "2024-rollout"
    )
    assert ruleset(edit("    pins:", "    salt: 7\n    pins:")).routes[0].salt == "7"


# -- many problems at once ----------------------------------------------------------------


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = """\
format: 1
upstreams:
  v1:
    endpoints: ["nope"]
  v2:
    endpoints: ["127.0.0.1:1"]
    read_timout: 1s
routes:
  - name: a
    match: {path_prefix: x, methods: [GET]}
    pins:
      - to: v3
        user_pattern: "("
    split: {v1: -1, v2: 1.234}
  - name: a
    to: v1
"""
    found = check_text(text, "rules.yaml")
    assert [(p.line, p.column, p.path) for p in found] == [
        (4, 17, "upstreams.v1.endpoints[0]"),
        (7, 5, "upstreams.v2.read_timout"),
        (10, 26, "routes[0].match.path_prefix"),
        (12, 13, "routes[0].pins[0].to"),
        (13, 23, "routes[0].pins[0].user_pattern"),
        (14, 17, "routes[0].split.v1"),
        (14, 25, "routes[0].split.v2"),
        (15, 11, "routes[1].name"),
    ]
    assert all(isinstance(p, Problem) and p.severity == "error" for p in found)
    assert all(p.hint for p in found)


def test_a_broken_upstream_does_not_make_its_references_unknown() -> None:
    found = problems(edit('"127.0.0.1:9002"', '"bad"'))
    assert found == ["rules.yaml:6:17: upstreams.v2.endpoints[0]: `bad` is not HOST:PORT "
                     "(write HOST:PORT, e.g. 127.0.0.1:9001 or [::1]:9001)"]


def test_load_problems_are_reported_with_validation_problems() -> None:
    text = edit("      v2: 10", "      v2: 10\n      v1: 5")
    assert problems(text) == [
        "rules.yaml:17:7: yaml: duplicate key `v1` "
        "(it was already given at line 15; keep one)"
    ]


REPLICAS = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]}
  v1.1: {endpoints: ["127.0.0.1:9004"]}
  v2: {endpoints: ["127.0.0.1:9005"]}
user_id:
  - header: X-User-Id
routes:
  - name: main
    pins: [{to: v2, users: ["42"]}]
    split: replicas
"""


def test_replicas_split_reaching_an_upstream_only_pins_send_to_warns() -> None:
    assert problems(REPLICAS) == [
        "rules.yaml:11:12: warning: routes[0].split: `split: replicas` gives `v2` 20% of the "
        "users it splits (1 endpoint), but only pins send requests to it: ordinary users would "
        "reach it (name the upstreams the split is for: `split: {v1: replicas, v1.1: replicas}`)"
    ]
    # Named elsewhere too (here a route's `to`): it is meant for everyone.
    also_to = REPLICAS.replace(
        "routes:\n", "routes:\n  - {name: next, match: {path_prefix: /v2}, to: v2}\n"
    )
    assert problems(also_to) == []
    # The split names its upstreams itself: fine.
    named = REPLICAS.replace("split: replicas", "split: {v1: replicas, v1.1: replicas}")
    assert problems(named) == []


# -- endpoints from DNS ----------------------------------------------------------------

V2_LIST = '    endpoints: ["127.0.0.1:9002"]'


def dns_text(endpoints: str, text: str = BASE) -> str:
    return edit(V2_LIST, f"    endpoints: {endpoints}", text)


def test_dns_endpoints_build_the_model() -> None:
    rules = ruleset(dns_text("{dns: Orders-V2.Shop.svc.cluster.local., port: 8080}"))
    v2 = rules.upstreams[1]
    assert v2.endpoints == ()  # found at run time
    assert v2.dns == DnsEndpoints("orders-v2.shop.svc.cluster.local.", 8080, 5.0)
    assert rules.upstreams[0].dns is None
    v2 = ruleset(dns_text("{dns: v2.test, port: 80, interval: 500ms}")).upstreams[1]
    assert v2.dns == DnsEndpoints("v2.test", 80, 0.5)


@pytest.mark.parametrize(
    ("endpoints", "where", "message"),
    [
        ("{dns: v2.test}", "6:16: upstreams.v2.endpoints.port",
         "missing `port` (add `port:` to upstreams.v2.endpoints)"),
        ("{port: 80}", "6:16: upstreams.v2.endpoints.dns",
         "missing `dns` (add `dns:` to upstreams.v2.endpoints)"),
        ("{dns: v2.test, port: 8080, intervall: 1s}", "6:43: upstreams.v2.endpoints.intervall",
         "unknown key (did you mean `interval`?)"),
        ("{dns: v2.test, port: 0}", "6:37: upstreams.v2.endpoints.port",
         "port 0 is out of range (use a port from 1 to 65535)"),
        ("{dns: v2.test, port: 80.5}", "6:37: upstreams.v2.endpoints.port",
         "port 80.5 is not a whole number"),
        ("{dns: v2.test, port: http}", "6:37: upstreams.v2.endpoints.port",
         "the port must be a number, found `http` (write e.g. 8080)"),
        ("{dns: v2.test, port: 80, interval: 10ms}", "6:51: upstreams.v2.endpoints.interval",
         "10ms is too short to ask DNS again (use at least 100ms; 5s (the default) suits a "
         "Kubernetes headless Service)"),
        ("{dns: 10.0.0.1, port: 80}", "6:22: upstreams.v2.endpoints.dns",
         '`10.0.0.1` is an address, not a DNS name (list fixed addresses as '
         '`endpoints: ["HOST:PORT"]` instead)'),
        ("{dns: 'v2.test:80', port: 80}", "6:22: upstreams.v2.endpoints.dns",
         "`v2.test:80`: the port does not go in the name (write the name alone and the port "
         "as `port:`)"),
        ("{dns: 'http://v2.test', port: 80}", "6:22: upstreams.v2.endpoints.dns",
         "`http://v2.test` is a URL, not a DNS name (write a name such as "
         "orders-v1.shop.svc.cluster.local)"),
        ("{dns: v2..test, port: 80}", "6:22: upstreams.v2.endpoints.dns",
         "`v2..test` is not a DNS name (use letters, digits and hyphens in dot-separated "
         "labels of at most 63 characters; write a name such as "
         "orders-v1.shop.svc.cluster.local)"),
        ("{dns: v2-.test, port: 80}", "6:22: upstreams.v2.endpoints.dns",
         "`v2-.test` is not a DNS name (use letters, digits and hyphens in dot-separated "
         "labels of at most 63 characters; write a name such as "
         "orders-v1.shop.svc.cluster.local)"),
        ("v2.test", "6:16: upstreams.v2.endpoints",
         'expected a list, found text (write ["127.0.0.1:9001", "127.0.0.1:9002"], or '
         "`{dns: NAME, port: PORT}` for the addresses a DNS name has)"),
    ],
)  # fmt: skip
def test_dns_endpoint_errors(endpoints: str, where: str, message: str) -> None:
    assert only(dns_text(endpoints)) == f"rules.yaml:{where}: {message}"


def test_a_dns_upstream_with_no_records_yet_is_never_a_rules_error() -> None:
    # v2 is named by a pin and by a split weight above 0: how many pods it has is known
    # only at run time, so nothing about it is a problem now.
    dns = "{dns: v2.test, port: 80}"
    assert problems(dns_text(dns)) == []
    to_v2 = edit("    split:\n      v1: 90\n      v2: 10", "    to: v2")
    assert problems(dns_text(dns, edit("      - to: v2\n", "      - to: v1\n", to_v2))) == []
    # Every upstream from DNS: `split: replicas` and `replicas` weights have nowhere to send
    # requests at load time, and that is not an error either (nor a warning).
    both = edit('    endpoints: ["127.0.0.1:9001"]', "    endpoints: {dns: v1.test, port: 80}",
                dns_text(dns))  # fmt: skip
    whole_text = edit("    split:\n      v1: 90\n      v2: 10", "    split: replicas", both)
    whole_text = edit('    pins:\n      - to: v2\n        users: ["42"]\n', "", whole_text)
    assert problems(whole_text) == []
    whole = ruleset(whole_text)
    split = whole.routes[0].split
    assert split is not None and split.replicas and split.weights == (("v1", 0.0), ("v2", 0.0))
    per_entry_text = edit("v1: 90\n      v2: 10", "v1: replicas\n      v2: replicas", both)
    assert problems(per_entry_text) == []
    per_entry = ruleset(per_entry_text).routes[0].split
    assert per_entry is not None and not per_entry.replicas
    assert per_entry.follows == frozenset({"v1", "v2"})


def test_replicas_weights_follow_their_upstreams() -> None:
    text = edit("      v1: 90", "      v1: replicas")
    split = ruleset(text).routes[0].split
    assert split is not None and split.follows == frozenset({"v1"})
    assert split.counts_replicas("v1") and not split.counts_replicas("v2")


def test_replicas_split_reaching_a_dns_upstream_only_pins_send_to_warns() -> None:
    # No records yet at load, but once its pods are ready the split gives it users.
    dns = REPLICAS.replace(
        'v2: {endpoints: ["127.0.0.1:9005"]}', "v2: {endpoints: {dns: v2.test, port: 80}}"
    )
    assert problems(dns) == [
        "rules.yaml:11:12: warning: routes[0].split: `split: replicas` gives `v2` a share as "
        "soon as its DNS name has records, but only pins send requests to it: ordinary users "
        "would reach it (name the upstreams the split is for: `split: {v1: replicas, v1.1: "
        "replicas}`)"
    ]
