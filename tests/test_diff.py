"""`grayroute diff`: a 100,000-request sample with known answers, then the command itself.

The known answers come from the rules' arithmetic, not from the diff's own bookkeeping:
pins by user range (exact counts), a `to` that changes (every request moves), splits
checked with SplitTable.pick directly, and a salt change (every mover is a broken promise).
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from router.diff import NO_ROUTE, diff_lines, view_from_access_log
from router.rules import decide, load_snapshot_text

ROOT = Path(__file__).resolve().parent.parent

OLD = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9"]}
  v1.1: {endpoints: ["127.0.0.1:9"]}
  v1.2: {endpoints: ["127.0.0.1:9"]}
  v1.3: {endpoints: ["127.0.0.1:9"]}
  v2: {endpoints: ["127.0.0.1:9"]}
  a: {endpoints: ["127.0.0.1:9"]}
  b: {endpoints: ["127.0.0.1:9"]}
user_id:
  - header: X-User-Id
  - json: user.id
routes:
  - name: orders
    match: {hosts: [api.example.com], path_prefix: /orders}
    pins:
      - to: v2
        user_ranges: [[0, 999]]
    split: {v1: 70, v1.1: 10, v1.2: 10, v1.3: 10}
  - name: search
    match: {path_prefix: /search}
    split: {a: 50, b: 50}
  - name: static
    match: {path_prefix: /static}
    to: v1
  - name: profile
    match: {path_prefix: /profile}
    user_id: [{cookie: uid}]
    split: {v1: 50, v2: 50}
"""

NEW = (
    OLD.replace("[[0, 999]]", "[[0, 1999]]")  # 1000 more users pinned to v2
    # v1 falls, v1.1 rises, v1.2 and v1.3 stay
    .replace("{v1: 70, v1.1: 10, v1.2: 10, v1.3: 10}", "{v1: 60, v1.1: 20, v1.2: 10, v1.3: 10}")
    .replace("split: {a: 50, b: 50}", "split: {a: 50, b: 50}\n    salt: search-2")
    .replace("    to: v1\n", "    to: v2\n")  # static: everything moves
)

N = 100_000


def make_sample(path: Path) -> Counter[str]:
    """N requests; returns how many of each kind were written."""
    rng = random.Random(20260105)
    kinds: Counter[str] = Counter()
    with open(path, "wb") as f:
        for _ in range(N):
            r = rng.random()
            user = str(rng.randrange(50_000))
            if r < 0.30:
                req = {"path": f"/orders/{user}", "headers": [["Host", "api.example.com"],
                       ["X-User-Id", user]]}  # fmt: skip
                kinds["orders"] += 1
            elif r < 0.50:  # the user ID in a JSON body
                req = {"method": "POST", "path": "/orders", "body": f'{{"user": {{"id": {user}}}}}',
                       "headers": [["Host", "API.example.com:443"],
                                   ["Content-Type", "application/json"]]}  # fmt: skip
                kinds["orders"] += 1
            elif r < 0.55:  # anonymous: split at random, never compared
                req = {"path": "/orders", "headers": [["Host", "api.example.com"]]}
                kinds["orders-anonymous"] += 1
            elif r < 0.70:
                req = {"path": f"/search?q={user}", "headers": [["X-User-Id", user]]}
                kinds["search"] += 1
            elif r < 0.80:
                req = {"path": "/static/app.js"}
                kinds["static"] += 1
            elif r < 0.95:
                req = {"path": "/profile", "headers": [["Cookie", f"theme=dark; uid={user}"]]}
                kinds["profile"] += 1
            else:
                req = {"path": "/nothing/here", "headers": [["X-User-Id", user]]}
                kinds["none"] += 1
            f.write(orjson.dumps(req) + b"\n")
    return kinds


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter[str]]:
    path = tmp_path_factory.mktemp("diff") / "sample.jsonl"
    return path, make_sample(path)


def users_of(path: Path, prefix: str, header: str | None = None) -> set[str]:
    """Distinct user IDs of one route in the sample, read without the router's code."""
    out = set()
    for line in path.read_bytes().splitlines():
        req = orjson.loads(line)
        if not req["path"].startswith(prefix):
            continue
        for name, value in req.get("headers", []):
            if header and name == header:
                out.add(value)
            if name == "Cookie" and header == "uid":
                out.add(value.rpartition("uid=")[2])
        if "body" in req:
            out.add(str(orjson.loads(req["body"])["user"]["id"]))
    return out


def test_100k_sample_known_answers(sample: tuple[Path, Counter[str]]) -> None:
    path, kinds = sample
    old = load_snapshot_text(OLD, "old.yaml")
    new = load_snapshot_text(NEW, "new.yaml")
    started = time.perf_counter()
    with open(path, "rb") as f:
        result = diff_lines(old, new, f)
    took = time.perf_counter() - started
    print(f"diff: {N} requests in {took:.2f} s ({took / N * 1e6:.1f} us per request)")
    assert result.requests == N and result.skipped == 0
    assert list(result.routes) == ["orders", "search", "static", "profile", NO_ROUTE]

    # orders: 1000-1999 leave the split for the pin; among the rest, every move of the
    # split involves v1 (its weight fell) or v1.1 (its weight rose), never v1.2 <-> v1.3.
    orders = result.routes["orders"]
    users = users_of(path, "/orders", "X-User-Id")
    assert orders.users == len(users)
    old_split, new_split = old.routes[0].split, new.routes[0].split
    assert old_split is not None and new_split is not None
    expected: Counter[tuple[str, str, None]] = Counter()
    stay: Counter[str] = Counter()
    for u in users:
        before = "v2" if int(u) <= 999 else old_split.names[old_split.pick(u)]
        after = "v2" if int(u) <= 1999 else new_split.names[new_split.pick(u)]
        if before == after:
            stay[before] += 1
        else:
            expected[(before, after, None)] += 1
    assert orders.moves == expected
    assert orders.stay == stay
    pinned = sum(1 for u in users if 1000 <= int(u) <= 1999)
    assert sum(n for (_, to, _), n in orders.moves.items() if to == "v2") == pinned
    split_moves = {(s, d) for (s, d, _) in orders.moves if d != "v2"}
    assert ("v1", "v1.1") in split_moves
    assert all({"v1", "v1.1"} & {s, d} for s, d in split_moves)  # the promise, kept
    assert orders.broken_promise == 0
    assert orders.anonymous_requests == kinds["orders-anonymous"] == orders.anonymous_random

    # search: the same weights, a new salt: every mover is a broken promise
    search = result.routes["search"]
    s_old, s_new = old.routes[1].split, new.routes[1].split
    assert s_old is not None and s_new is not None
    searchers = users_of(path, "/search", "X-User-Id")
    movers = {u for u in searchers if s_old.names[s_old.pick(u)] != s_new.names[s_new.pick(u)]}
    assert search.users == len(searchers)
    assert search.moved == search.broken_promise == len(movers) > 0.4 * len(searchers)
    assert {(s, d) for (s, d, _) in search.moves} == {("a", "b"), ("b", "a")}
    listed = {u for users_ in search.broken_users.values() for u in users_}
    assert listed <= movers and len(listed) == min(len(movers), 2000)
    assert search.salt_changed

    # static: no user IDs; every request goes elsewhere now
    static = result.routes["static"]
    assert static.users == 0
    assert static.anonymous_moves == Counter({("v1", "v2", None): kinds["static"]})

    # profile: unchanged, nobody moves
    profile = result.routes["profile"]
    assert profile.users == len(users_of(path, "/profile", "uid")) and profile.moved == 0
    assert result.routes[NO_ROUTE].anonymous_requests == kinds["none"]

    assert result.moved == sum(expected.values()) + len(movers)
    assert result.broken_promise == len(movers)
    assert took < 30.0  # a few seconds on the development machine


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "diff", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_cli_table_json_and_exit_codes(sample: tuple[Path, Counter[str]], tmp_path: Path) -> None:
    path, _ = sample
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD)
    new.write_text(NEW)
    started = time.perf_counter()
    done = cli(str(old), str(new), "--requests", str(path), "--json", "--fail-on-move")
    took = time.perf_counter() - started
    print(f"grayroute diff --json on {N} requests: {took:.2f} s, whole command")
    assert done.returncode == 1, done.stderr
    doc = orjson.loads(done.stdout)
    assert doc["sample"]["requests"] == N
    assert doc["broken_promise_users"] > 0 and doc["moved_anonymous_requests"] > 0
    search = next(r for r in doc["routes"] if r["route"] == "search")
    assert all(m["broken_promise"] == m["users"] for m in search["moves"])
    assert search["moves"][0]["broken_promise_users"]

    # the table, on a small part of the sample
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"\n".join(path.read_bytes().splitlines()[:3000]) + b"\nnot json\n")
    done = cli(str(old), str(new), "--requests", str(small))
    assert done.returncode == 0  # without --fail-on-move, moves are not a failure
    out = done.stdout
    assert (
        "route orders  (split v1=70, v1.1=10, v1.2=10, v1.3=10  ->  "
        "v1=60, v1.1=20, v1.2=10, v1.3=10)" in out
    )
    assert "BROKEN PROMISE" in out and "salt 'search' -> 'search-2'" in out
    assert "requests would move v1 -> v2" in out
    assert out.rstrip().splitlines()[-1].startswith("RESULT: ")
    assert "line 3001: not JSON" in done.stderr
    done = cli(str(old), str(new), "--requests", str(small), "--fail-on-broken-promise")
    assert done.returncode == 1

    # the same rules on both sides: nobody moves, and CI passes
    done = cli(str(old), str(old), "--requests", str(small), "--fail-on-move")
    assert done.returncode == 0, done.stdout
    assert done.stdout.rstrip().endswith("RESULT: nobody would move")

    # an invalid NEW: its problems, exit 2
    new.write_text(NEW.replace("to: v2\n", "to: v9\n"))
    done = cli(str(old), str(new), "--requests", str(small))
    assert done.returncode == 2
    assert f"{new}:" in done.stderr and "unknown upstream" in done.stderr
    assert cli(str(old), str(old), "--requests", str(tmp_path / "missing")).returncode == 2


ONE_RISES = {("v1", "v1.1"), ("v1.2", "v1.1"), ("v1.3", "v1.1")}
ONE_FALLS = {("v1", "v1.1"), ("v1", "v1.2"), ("v1", "v1.3")}


@pytest.mark.parametrize(
    ("new_split", "allowed"),
    [
        ("{v1: 70, v1.1: 30, v1.2: 10, v1.3: 10}", ONE_RISES),  # users move only to it
        ("{v1: 30, v1.1: 10, v1.2: 10, v1.3: 10}", ONE_FALLS),  # only its users move away
    ],
)
def test_one_weight_changes_and_only_its_users_move(
    new_split: str, allowed: set[tuple[str, str]]
) -> None:
    old = load_snapshot_text(OLD, "old.yaml")
    new = load_snapshot_text(
        OLD.replace("{v1: 70, v1.1: 10, v1.2: 10, v1.3: 10}", new_split), "new.yaml"
    )
    headers = [["Host", "api.example.com"]]
    lines = [
        orjson.dumps({"path": "/orders", "headers": [*headers, ["X-User-Id", f"u{i}"]]})
        for i in range(20_000)
    ]
    result = diff_lines(old, new, lines)
    orders = result.routes["orders"]
    assert {(s, d) for (s, d, _) in orders.moves} == allowed
    assert orders.users == 20_000 and orders.broken_promise == 0


@pytest.mark.parametrize(
    ("source", "user"),
    [
        ("header:X-User-Id", "u1"),
        ("json:user.id", "42"),
        ("query:userId", "q 7"),
        ("cookie:uid", "c-9"),
        ("form:userId", "f&1"),
        ("json:items[1].id", "deep"),
    ],
)
def test_access_log_lines_are_decided_with_the_user_id_where_it_was(source: str, user: str) -> None:
    rules = f"""\
format: 1
upstreams:
  v1: {{endpoints: ["127.0.0.1:9"]}}
user_id:
  - {source.replace(":", ": ", 1)}
routes:
  - name: all
    to: v1
"""
    snap = load_snapshot_text(rules, "r.yaml")
    path = "/x?userId=q+7" if source.startswith("query") else "/x"
    record = {"method": "POST", "path": path, "host": "h", "client": "10.0.0.1",
              "user_id": user, "user_id_source": source}  # fmt: skip
    view, body = view_from_access_log(record)
    view.body, view.body_complete = body, True
    decision = decide(snap, view)
    assert (decision.user_id, decision.user_id_source) == (user, source)
