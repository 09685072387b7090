"""The console's "where does user X go?": a request per route, answered by explain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from router.console.where import request_line, where
from router.rules import load_snapshot_text

RULES = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001"]}
  v2: {endpoints: ["127.0.0.1:9002"]}
user_id:
  - header: X-User-Id
routes:
  - name: by-header
    match: {path_prefix: /h, hosts: ["*.example.com"]}
    pins: [{to: v2, users: ["42"]}]
    split: {v1: 50, v2: 50}
  - name: by-cookie
    match: {path_exact: /c, hosts: ["www.example.*"]}
    user_id: [{cookie: uid}]
    pins: [{to: v2, users: ["42"]}]
    to: v1
  - name: by-query
    match: {path_prefix: /q}
    user_id: [{query: "user id"}]
    pins: [{to: v2, users: ["4 2"]}]
    to: v1
  - name: by-json
    match: {path_prefix: /j, methods: [POST]}
    user_id: [{json: "items[1].owner.id"}]
    pins: [{to: v2, users: ["42"]}]
    to: v1
  - name: by-form
    match: {path_prefix: /f}
    user_id: [{form: uid}]
    pins: [{to: v2, users: ["42"]}]
    to: v1
  - name: by-regex
    match: {path_regex: "^/r/[0-9]+$"}
    pins: [{to: v2, users: ["42"]}]
    to: v1
  - name: by-host-regex
    match: {host_regex: "^api[0-9]\\\\.internal$"}
    to: v1
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("where") / "rules.yaml"
    path.write_text(RULES)
    return path


def test_each_source_carries_the_user_where_the_route_looks(rules: Path) -> None:
    snapshot = load_snapshot_text(rules.read_text(), str(rules))
    answers = {a["route"]: a for a in where(snapshot, "42")}
    assert answers["by-header"]["request"] == {
        "method": "GET",
        "path": "/h",
        "headers": [["Host", "www.example.com"], ["X-User-Id", "42"]],
    }
    assert answers["by-cookie"]["request"]["headers"] == [
        ["Host", "www.example.com"],
        ["Cookie", "uid=42"],
    ]
    assert answers["by-json"]["request"] == {
        "method": "POST",
        "path": "/j",
        "headers": [["Content-Type", "application/json"]],
        "body": '{"items":[null,{"owner":{"id":"42"}}]}',
    }
    assert answers["by-form"]["request"]["body"] == "uid=42"
    for name in ("by-header", "by-cookie", "by-json", "by-form"):
        answer = answers[name]["answer"]
        assert (answer["route"], answer["upstream"], answer["user_id"]) == (name, "v2", "42")
        assert answer["reason"] == "pin[0] users"
    # a user ID with a space, in a query parameter whose name has one too
    [query] = where(snapshot, "4 2", route="by-query")
    assert query["request"]["path"] == "/q?user%20id=4%202"
    assert query["answer"]["upstream"] == "v2" and query["answer"]["user_id"] == "4 2"
    # routes that match by a regex need the caller's path or host
    assert "give a path" in answers["by-regex"]["error"]
    assert "give a host" in answers["by-host-regex"]["error"]


def test_a_path_picks_the_route_as_any_request_would(rules: Path) -> None:
    snapshot = load_snapshot_text(rules.read_text(), str(rules))
    [answer] = where(snapshot, "42", path="/r/17")
    assert answer["route"] == "by-regex" and answer["answer"]["upstream"] == "v2"
    [host] = where(snapshot, "7", path="/", host="api3.internal")
    assert host["route"] == "by-host-regex" and host["answer"]["reason"] == "to v1"
    [nothing] = where(snapshot, "42", path="/nowhere/at/all", host="elsewhere.org")
    assert nothing["route"] is None and nothing["answer"]["upstream"] is None
    # what the router refuses is said, as explain says it
    [refused] = where(snapshot, "42", path="/a b")
    assert refused["route"] is None and "space" in refused["error"]
    [bad_host] = where(snapshot, "42", path="/", host="a/b")
    assert bad_host["error"] == "the router refuses this request (400): invalid Host 'a/b'"


def test_the_answers_are_what_grayroute_explain_says(rules: Path) -> None:
    snapshot = load_snapshot_text(rules.read_text(), str(rules))
    answers = [a for user in ("42", "7", "1001") for a in where(snapshot, user) if "request" in a]
    lines = b"".join(orjson.dumps(a["request"]) + b"\n" for a in answers)
    cli = subprocess.run(
        [sys.executable, "-m", "router.cli", "explain", "--why", str(rules)],
        input=lines,
        capture_output=True,
        check=True,
        timeout=60,
    )
    said = [orjson.loads(line) for line in cli.stdout.splitlines()]
    assert said == [a["answer"] for a in answers]
    assert {a["answer"]["upstream"] for a in answers} == {"v1", "v2"}


def test_methods_and_hosts_of_the_route_are_respected(rules: Path) -> None:
    snapshot = load_snapshot_text(rules.read_text(), str(rules))
    by_name = {r.model.name: r.model for r in snapshot.routes}
    # a JSON source on a POST-only route: the request is a POST with the body
    json_route = by_name["by-json"]
    line = request_line(snapshot, json_route, "5", path="/j/x")
    assert line["method"] == "POST" and line["path"] == "/j/x"
    line = request_line(snapshot, by_name["by-header"], "5", host="a.example.com")
    assert line["headers"][0] == ["Host", "a.example.com"]
