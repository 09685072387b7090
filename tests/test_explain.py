"""`grayroute explain`: JSON lines in, one decision per request out, as the proxy decides."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from router.errors import RulesError
from router.explain import explain_line, run_explain
from router.rules import load_snapshot

GRAYROUTE = str(Path(sys.executable).parent / "grayroute")

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
      - {to: v2, users: ["42"]}
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


def run(rules: str, tmp_path: Path, lines: list[bytes]) -> tuple[int, list[dict[str, object]]]:
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"".join(lines))
    out = io.BytesIO()
    status = run_explain(rules, str(requests), out)
    return status, [orjson.loads(x) for x in out.getvalue().splitlines()]


def decision(
    route: str | None, upstream: str | None, user: str | None, source: str | None, reason: str
) -> dict[str, object]:
    return {"route": route, "upstream": upstream, "user_id": user, "user_id_source": source,
            "reason": reason}


API = ["Host", "API.example.com:8443"]


def test_end_to_end(rules: str, tmp_path: Path) -> None:
    status, results = run(rules, tmp_path, [
        line(method="GET", path="/orders/1", headers=[API, ["X-User-Id", "42"]]),
        line(method="GET", path="/orders/1", headers=[API, ["x-app-version", "3.0"]]),
        line(method="GET", path="/orders", headers=[API], client_ip="192.168.7.7"),
        line(method="GET", path="/orders?userId=42", headers=[API]),
        line(method="POST", path="/orders", headers=[API, ["Content-Type", "application/json"]],
             body='{"user": {"id": 42}}'),
        line(method="POST", path="/orders", headers=[API, ["Content-Type",
             "application/x-www-form-urlencoded"]], body="a=1&userId=42"),
        line(method="GET", path="/orders", headers=[API, ["Cookie", "a=b; uid=42"]]),
        line(method="GET", path="/elsewhere", headers=[API, ["X-User-Id", "7"]]),
        line(path="/", headers=[]),
    ])
    assert status == 0
    assert results == [
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


def test_split_answers_match_decide_and_are_sticky(rules: str, tmp_path: Path) -> None:
    lines = [line(path="/orders", headers=[API, ["X-User-Id", str(u)]]) for u in range(100, 300)]
    _, first = run(rules, tmp_path, lines)
    _, second = run(rules, tmp_path, lines)
    assert first == second
    assert {r["upstream"] for r in first} == {"v1", "v1.1"}
    assert all(str(r["reason"]).startswith("split by user ID -> ") for r in first)


def test_host_header_rules(rules: str, tmp_path: Path) -> None:
    _, results = run(rules, tmp_path, [
        line(path="/orders", headers=[["host", "other.com"], ["Host", "api.example.com"]]),
        line(path="/orders", headers=[["X-User-Id", "42"]]),  # no Host: no host match
    ])
    assert [r["route"] for r in results] == ["rest", "rest"]


def test_only_the_first_of_repeated_headers_counts(rules: str, tmp_path: Path) -> None:
    _, results = run(rules, tmp_path, [
        line(path="/orders", headers=[API, ["X-User-Id", "7"], ["x-user-id", "42"]]),
    ])
    assert results[0]["user_id"] == "7"


def test_body_over_the_limit_yields_no_id(rules: str, tmp_path: Path) -> None:
    json_ct = ["Content-Type", "application/json"]
    fits = '{"user": {"id": 42}, "pad": "' + "x" * 20 + '"}'
    too_big = '{"user": {"id": 42}, "pad": "' + "x" * 60 + '"}'  # body_limit is 64 bytes
    _, results = run(rules, tmp_path, [
        line(method="POST", path="/orders", headers=[API, json_ct], body=fits),
        line(method="POST", path="/orders", headers=[API, json_ct], body=too_big),
        line(method="POST", path="/orders", headers=[API, json_ct], body="{not json"),
        line(method="POST", path="/orders", headers=[API, ["Content-Type", "text/plain"]],
             body='{"user": {"id": 42}}'),
    ])
    assert [r["user_id"] for r in results] == ["42", None, None, None]
    assert str(results[1]["reason"]).startswith("split at random")


def test_raw_bytes_body(rules: str, tmp_path: Path) -> None:
    json_ct = ["Content-Type", "application/json"]
    good = base64.b64encode(b'{"user": {"id": "42"}}').decode()
    latin1 = base64.b64encode('{"user": {"id": "é"}}'.encode("latin-1")).decode()
    _, results = run(rules, tmp_path, [
        line(method="POST", path="/orders", headers=[API, json_ct], body_base64=good),
        line(method="POST", path="/orders", headers=[API, json_ct], body_base64=latin1),
    ])
    assert [r["user_id"] for r in results] == ["42", None]


def test_bad_lines_are_reported_in_place(rules: str, tmp_path: Path) -> None:
    status, results = run(rules, tmp_path, [
        b"not json\n",
        b"\n",
        b"[1, 2]\n",
        line(path=5),
        line(path="/orders", headers=[["X-User-Id"]]),
        line(path="/orders", headers={"X-User-Id": "1"}),
        line(path="/orders", body_base64="%%%"),
        line(path="/orders", headers=[API, ["X-User-Id", "42"]]),
    ])
    assert status == 1
    assert [r.get("line") for r in results] == [1, 3, 4, 5, 6, 7, None]
    assert str(results[0]["error"]).startswith("not JSON: ")
    assert results[1]["error"] == 'expected a JSON object like {"method": "GET", "path": "/"}'
    assert results[2]["error"] == '"path" must be a string'
    assert results[3]["error"] == (
        "\"headers\": ['X-User-Id'] is not a [name, value] pair of strings"
    )
    assert results[4]["error"] == '"headers" must be a list of [name, value] pairs'
    assert str(results[5]["error"]).startswith('"body_base64" is not base64')
    assert results[6]["upstream"] == "v2"


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
    result = subprocess.run([GRAYROUTE, "explain", rules], input=requests, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(x)["upstream"] for x in result.stdout.splitlines()] == ["v2", "v1"]


def test_many_lines(rules: str, tmp_path: Path) -> None:
    lines = [line(method="GET", path=f"/orders/{i}?userId={i}", headers=[API])
             for i in range(20_000)]
    status, results = run(rules, tmp_path, lines)
    assert status == 0
    assert len(results) == 20_000
    share = sum(r["upstream"] == "v1.1" for r in results) / len(results)
    assert abs(share - 0.10) < 0.01
