"""The console's JSON, built from a real supervisor's state (its rules, effective state
and summed worker totals) without starting workers: numbers in, numbers out."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import Settings
from router.console import Console
from router.console.status import pin_kinds
from router.fleet.source import FileSource
from router.metrics import WorkerMetrics
from router.rules import load_snapshot_text
from router.supervisor import Supervisor

RULES = """\
format: 1
upstreams:
  v1:   {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
  v1.1: {endpoints: ["127.0.0.1:9003"], fallback: v1}
  v2:   {endpoints: ["127.0.0.1:9004"]}
user_id:
  - header: X-User-Id
routes:
  - name: orders
    match: {path_prefix: /orders}
    pins:
      - {to: v2, users: ["1", "2", "3"], headers: {X-Beta: "yes"}}
      - {to: v2, user_ranges: [[100, 199], [300, 309]]}
      - {to: v2, client_cidrs: ["10.0.0.0/8"], user_percent: 2.5}
    split: {v1: 90, v1.1: 10}
    rollout: {canary: v1.1, stable: v1, steps: [10, 50, 100]}
  - name: static
    match: {path_prefix: /static}
    to: v1
  - name: hello
    match: {path_exact: /hello}
    direct_response: {status: 200, body: hi}
  - name: hello-again
    match: {path_exact: /hello}
    to: v1
"""


@pytest.fixture
async def supervisor(tmp_path: Path) -> Supervisor:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    settings = Settings(rules_path=str(rules), state_dir=str(tmp_path / "state"))
    source = FileSource(str(rules), 0)
    return Supervisor(settings, await source.initial(), 0, str(tmp_path / "state"), source)


def traffic(w: WorkerMetrics, route: str, upstream: str, n: int, status: int, secs: float) -> None:
    for _ in range(n):
        w.request_done(route, upstream, status, secs)


def test_versions_side_by_side_over_the_window(supervisor: Supervisor) -> None:
    console: Console = supervisor.console()
    w = WorkerMetrics()
    console.sample(1000.0)  # the baseline
    traffic(w, "orders", "v1", 170, 200, 0.004)
    traffic(w, "orders", "v1", 10, 503, 0.004)
    traffic(w, "orders", "v1.1", 18, 200, 0.040)
    traffic(w, "orders", "v1.1", 2, 500, 0.040)
    traffic(w, "static", "v1", 100, 200, 0.004)
    traffic(w, "hello", "", 5, 200, 0.0001)
    traffic(w, "", "", 7, 404, 0.0001)
    w.fell_back("v1.1", "v1")
    supervisor.metrics.aggregator.update("w0", w.snapshot())
    console.sample(1010.0)

    status = console.status(300.0)
    window = {"seconds": 300.0, "covered": 10.0, "samples": 1, "sample_every": 2.0}
    assert status["window"] == window
    orders, static, hello, again = status["routes"]
    assert orders["name"] == "orders" and orders["decides"] == "split"
    assert orders["match"] == {"path_prefix": "/orders"}
    assert orders["user_id"] == ["header:X-User-Id"]
    assert (orders["requests"], orders["rps"], orders["errors"]) == (200, 20.0, 12)
    assert orders["error_rate"] == 6.0
    v1, v11, v2 = orders["versions"]
    assert v1 == {
        "upstream": "v1",
        "configured": 90.0,
        "effective": 90.0,
        "observed": 90.0,
        "requests": 180,
        "rps": 18.0,
        "errors": 10,
        "error_rate": 5.56,
        # the upstream's latency: its 280 requests of both routes, all between 2.5 and 5 ms
        "p50_ms": pytest.approx(3.75, abs=0.01),
        "p99_ms": pytest.approx(4.975, abs=0.01),
        "latency_samples": 280,
        "role": "stable",
    }
    assert (v11["configured"], v11["observed"], v11["error_rate"]) == (10.0, 10.0, 10.0)
    assert v11["p50_ms"] == pytest.approx(37.5, abs=0.01) and v11["latency_samples"] == 20
    assert v2["upstream"] == "v2" and v2["configured"] is None and v2["observed"] == 0.0
    assert (v1["role"], v11["role"]) == ("stable", "canary") and "role" not in v2
    assert v2["p50_ms"] is None and v2["latency_samples"] == 0
    assert [(v["upstream"], v["configured"]) for v in static["versions"]] == [("v1", 100.0)]
    assert hello["decides"] == "direct_response"
    assert [(v["upstream"], v["requests"]) for v in hello["versions"]] == [("", 5)]
    assert status["unrouted"] == {"requests": 7, "rps": 0.7}

    ups = status["upstreams"]
    assert ups["v1.1"]["fallback"] == "v1"
    assert ups["v1.1"]["fallback_use"] == {"window": 1, "total": 1}
    assert ups["v1"]["requests"] == 280 and ups["v1"]["rps"] == 28.0
    assert ups["v1"]["endpoints"] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert ups["v1"]["health"]["127.0.0.1:9001"] == {"state": "unknown"}  # no worker yet

    rules = status["rules"]
    assert rules["digest"] == supervisor.snapshot.digest
    # a route an earlier one takes every request of: a warning, and said on the route
    assert rules["last_reload"] is None
    [warning] = rules["warnings"]
    assert "routes[3]: never used: route `hello` above matches every request" in warning
    assert rules["shadowed"] == [{"route": "hello-again", "by": "hello"}]
    assert again["shadowed_by"] == "hello" and orders["shadowed_by"] is None
    assert rules["workers"] == {"ready": 0, "running": 0}


def test_effective_weights_beside_the_files_and_the_moment_they_changed(
    supervisor: Supervisor,
) -> None:
    console = supervisor.console()
    console.look(50.0)
    assert not console.ring.marks
    supervisor.set_effective(supervisor.effective.with_weights("orders", {"v1": 75, "v1.1": 25}))
    console.look(60.0)
    console.look(61.0)  # once per change
    orders = console.status()["routes"][0]
    assert [(v["configured"], v["effective"]) for v in orders["versions"][:2]] == [
        (90.0, 75.0),
        (10.0, 25.0),
    ]
    [mark] = console.ring.marks
    assert (mark.at, mark.kind, mark.route) == (60.0, "weights", "orders")
    assert mark.text == "weights v1 90→75, v1.1 10→25"
    # a reload is marked for every route
    supervisor.last_reload = {"result": "failure", "trigger": "watch", "problems": ["x", "y"]}
    console.sample(65.0)
    console.look(70.0)
    console.sample(75.0)
    assert console.ring.marks[-1].route is None
    assert console.ring.marks[-1].text == "reload failed (watch): 2 problems; rules kept"
    series = console.series("static", 3600.0)
    assert series is not None
    assert [m["text"] for m in series["marks"]] == ["reload failed (watch): 2 problems; rules kept"]


def test_the_split_traffic_a_rollout_judges_beside_the_routes_traffic(
    supervisor: Supervisor,
) -> None:
    console = supervisor.console()
    w = WorkerMetrics()
    w.split_done("orders", "v1", False, 0.010)  # before the console's baseline
    supervisor.metrics.aggregator.update("w0", w.snapshot())
    console.sample(0.0)
    for _ in range(90):
        w.split_done("orders", "v1", False, 0.010)
    for i in range(10):
        w.split_done("orders", "v1.1", i < 2, 0.100)
    traffic(w, "orders", "v1", 90, 200, 0.010)
    traffic(w, "orders", "v1.1", 8, 200, 0.100)
    traffic(w, "orders", "v1.1", 2, 503, 0.100)
    traffic(w, "orders", "v2", 5, 200, 0.010)  # pinned: not judged
    supervisor.metrics.aggregator.update("w0", w.snapshot())
    console.sample(10.0)
    orders = console.status()["routes"][0]
    assert orders["rollout"] == {
        "phase": "Progressing",
        "canary": "v1.1",
        "stable": "v1",
        "step": 0,
        "steps": [10.0, 50.0, 100.0],
        "weight": 10.0,
        "since": orders["rollout"]["since"],
    }
    v1, v11, v2 = orders["versions"]
    assert v1["split"]["requests"] == 90 and v1["split"]["error_rate"] == 0.0
    assert v11["split"] == {
        "requests": 10,
        "rps": 1.0,
        "errors": 2,
        "error_rate": 20.0,
        # the rollout's histogram is finer than the upstream's: within ~5% of 100 ms
        "p50_ms": pytest.approx(100.0, rel=0.05),
        "p99_ms": pytest.approx(100.0, rel=0.05),
    }
    assert "split" not in v2 and v2["requests"] == 5
    assert "rollout" not in console.status()["routes"][1]


def test_series_per_version_with_gaps_where_there_was_no_traffic(supervisor: Supervisor) -> None:
    console = supervisor.console()
    w = WorkerMetrics()
    console.sample(0.0)
    traffic(w, "orders", "v1", 6, 200, 0.001)
    traffic(w, "orders", "v1.1", 2, 502, 0.001)
    supervisor.metrics.aggregator.update("w0", w.snapshot())
    console.sample(2.0)
    console.sample(4.0)  # a quiet interval
    series = console.series("orders", 60.0)
    assert series is not None
    assert series["t"] == [2.0, 4.0] and series["step"] == 2.0
    assert series["versions"]["v1"] == {
        "rps": [3.0, 0.0],
        "share": [75.0, None],
        "error_rate": [0.0, None],
    }
    assert series["versions"]["v1.1"]["error_rate"] == [100.0, None]
    assert series["versions"]["v2"]["share"] == [0.0, None]
    assert console.series("nope") is None


def test_pins_by_kind_with_counts(supervisor: Supervisor) -> None:
    orders = supervisor.console().status()["routes"][0]
    assert orders["pins_by_kind"] == {
        "users": 3,
        "headers": 1,
        "user_ranges": 2,
        "client_cidrs": 1,
        "user_percent": 1,
    }
    first, second, third = orders["pins"]
    assert first["to"] == "v2" and [k["kind"] for k in first["kinds"]] == ["users", "headers"]
    assert first["kinds"][0]["text"] == "3 user IDs" and first["kinds"][1]["text"] == "X-Beta"
    assert second["kinds"] == [{"kind": "user_ranges", "count": 2, "text": "2 ranges (110 IDs)"}]
    assert [k["text"] for k in third["kinds"]] == ["2.5% of user IDs", "1 network: 10.0.0.0/8"]


def test_pin_kinds_of_long_lists_name_a_few() -> None:
    snap = load_snapshot_text(
        """\
format: 1
upstreams: {a: {endpoints: ["127.0.0.1:1"]}}
user_id: [{header: U}]
routes:
  - name: r
    pins:
      - {to: a, user_suffixes: ["1", "2", "3", "4", "5", "6", "7"], user_pattern: "^x-"}
    to: a
""",
        "r.yaml",
    )
    [kinds] = [pin_kinds(p) for p in snap.routes[0].model.pins]
    assert kinds == [
        {"kind": "user_suffixes", "count": 7, "text": "7 suffixes: 1, 2, 3, 4, 5 and 2 more"},
        {"kind": "user_pattern", "count": 1, "text": "pattern ^x-"},
    ]
