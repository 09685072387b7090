"""Endpoint health: what a worker's pools report, the supervisor's merge, and /rules and
/metrics of a real `grayroute serve` with two workers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.health import HealthBoard, report_token, worker_report
from router.history import iso_utc

from conftest import Serve, poll

# -- the merge ---------------------------------------------------------------------------


def test_down_in_one_worker_is_down_and_active_wins() -> None:
    board = HealthBoard()
    board.update("w1", {"app": [["h:1", "up", 100.0], ["h:2", "passive", 250.0]]})
    board.update("w2", {"app": [["h:1", "up", 120.0], ["h:2", "active", 200.0]]})
    assert board.merged() == {
        "app": {
            "h:1": {"state": "up", "since": iso_utc(120.0), "workers_down": 0, "workers": 2},
            "h:2": {
                "state": "down",
                "by": "active",
                "since": iso_utc(200.0),
                "workers_down": 2,
                "workers": 2,
            },
        }
    }
    assert board.counts() == {"app": (1, 2)}
    board.update("w2", {"app": [["h:1", "up", 120.0], ["h:2", "up", 300.0]]})
    h2 = board.merged()["app"]["h:2"]
    assert (h2["state"], h2["by"], h2["workers_down"]) == ("down", "passive", 1)
    # The worker that saw it fail exits: what is left says up.
    board.retire("w1")
    assert board.merged()["app"]["h:2"] == {
        "state": "up",
        "since": iso_utc(300.0),
        "workers_down": 0,
        "workers": 1,
    }


def test_describe_lists_the_file_endpoints_first_and_unknown_until_reported() -> None:
    board = HealthBoard()
    assert board.describe("app", ["h:1"]) == {"h:1": {"state": "unknown"}}
    board.update("w1", {"app": [["h:9", "up", 1.0]]})  # e.g. an endpoint found by DNS
    assert list(board.describe("app", ["h:1"])) == ["h:1", "h:9"]
    assert board.counts() == {"app": (1, 1)}


def test_a_malformed_report_keeps_the_previous_one() -> None:
    board = HealthBoard()
    board.update("w1", {"app": [["h:1", "up", 1.0]]})
    board.update("w1", {"app": [["h:1", "sideways", 1.0]]})
    board.update("w1", {"app": [["h:1"]]})
    board.update("w1", {"app": 5})
    assert board.counts() == {"app": (1, 1)}


# -- what a worker reports ---------------------------------------------------------------


async def test_a_worker_reports_passive_and_active_states_with_their_times(
    switchable: Any, proxy: Any
) -> None:
    live, sick = await switchable("live"), await switchable("sick")
    dead = await switchable("dead")
    await dead.stop()
    sick.healthy = False
    rules = f"""
    format: 1
    upstreams:
      app:
        endpoints: ["127.0.0.1:{live.port}", "127.0.0.1:{dead.port}"]
      checked:
        endpoints: ["127.0.0.1:{sick.port}"]
        health_check: {{path: /healthz, interval: 50ms}}
    routes:
      - {{name: checked, match: {{path_prefix: /checked}}, to: checked}}
      - {{name: all, to: app}}
    """
    started = time.time()
    rp = await proxy(rules, fail_timeout=0.5)
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(2):  # round-robin: one of them goes to the dead endpoint
            assert (await client.get("/")).status_code == 200
    failed_at = time.time()

    def states() -> dict[str, list[list[Any]]]:
        return worker_report(rp.router.pools)

    report = states()
    (live_ep, live_state, live_since), (dead_ep, dead_state, dead_since) = report["app"]
    assert (live_ep, live_state) == (f"127.0.0.1:{live.port}", "up")
    assert started - 0.1 <= live_since <= failed_at  # up since the pool was made
    assert (dead_ep, dead_state) == (f"127.0.0.1:{dead.port}", "passive")
    assert started <= dead_since <= failed_at + 0.1

    async def sick_is_down() -> bool:
        return states()["checked"][0][1] == "active"

    await poll(sick_is_down)

    async def dead_is_up_again() -> list[Any] | None:
        row = states()["app"][1]
        return row if row[1] == "up" else None

    # After --fail-timeout the endpoint is tried again: up from the moment it ran out.
    row = await poll(dead_is_up_again)
    assert row[2] == pytest.approx(dead_since + 0.5, abs=0.05)
    sick.healthy = True

    async def sick_is_up() -> bool:
        return states()["checked"][0][1] == "up"

    await poll(sick_is_up)


async def test_the_report_token_moves_whenever_the_report_may_have(
    switchable: Any, proxy: Any
) -> None:
    live, dead = await switchable("live"), await switchable("dead")
    await dead.stop()
    rules = """
    format: 1
    upstreams:
      app: {{endpoints: [{endpoints}]}}
    routes:
      - {{name: all, to: app}}
    """
    both = f'"127.0.0.1:{live.port}", "127.0.0.1:{dead.port}"'
    rp = await proxy(rules.format(endpoints=both), fail_timeout=0.3)
    pools = rp.router.pools

    def token() -> list[Any]:
        return report_token(pools, time.monotonic())

    quiet = token()
    assert token() == quiet  # nothing happened: nothing to send
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(2):
            assert (await client.get("/")).status_code == 200
    failed = token()
    assert failed != quiet  # a passive down
    await asyncio.sleep(0.4)
    assert token() != failed  # it ran out, with no event of its own
    # The endpoints alone change (DNS): the pool is kept, the report must follow.
    rp.reload(rules.format(endpoints=f'"127.0.0.1:{live.port}"'))
    assert rp.router.pools["app"] is pools["app"]
    before = token()
    rp.reload(rules.format(endpoints=both))
    assert token() != before
    assert [row[0] for row in worker_report(pools)["app"]] == [
        f"127.0.0.1:{live.port}",
        f"127.0.0.1:{dead.port}",
    ]


# -- through the real router -------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))] = s.value
    return out


async def test_rules_and_metrics_show_each_endpoint_and_the_fallback(
    tmp_path: Path, switchable: Any, serve_router: Serve
) -> None:
    a, b, spare = await switchable("a"), await switchable("b"), await switchable("spare")
    dead = await switchable("dead")
    await dead.stop()
    b.healthy = False
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"""
format: 1
upstreams:
  app:
    endpoints: ["127.0.0.1:{a.port}", "127.0.0.1:{b.port}"]
    health_check: {{path: /healthz, interval: 100ms}}
    fallback: spare
  spare:
    endpoints: ["127.0.0.1:{spare.port}"]
  flaky:
    endpoints: ["127.0.0.1:{dead.port}"]
routes:
  - {{name: flaky, match: {{path_prefix: /flaky}}, to: flaky}}
  - {{name: all, to: app}}
"""
    )
    router = await serve_router(rules, workers=2, args=("--fail-timeout", "60"))
    ep_a, ep_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def rules_info() -> dict[str, Any]:
            info: dict[str, Any] = (await client.get(f"{router.admin_url}/rules")).json()
            return info

        async def b_down_in_both() -> dict[str, Any] | None:
            app = (await rules_info())["upstreams"]["app"]
            return app if app["health"][ep_b].get("workers_down") == 2 else None

        app = await poll(b_down_in_both)
        assert app["fallback"] == "spare"
        assert app["healthy_endpoints"] == 1
        assert app["health"][ep_a]["state"] == "up"
        b_health = app["health"][ep_b]
        assert (b_health["state"], b_health["by"], b_health["workers"]) == ("down", "active", 2)
        assert b_health["since"] >= iso_utc(time.time() - 30)

        # A refused connection in whichever worker took the request: down by passive.
        assert (await client.get(f"{router.url}/flaky")).status_code == 502
        ep_dead = f"127.0.0.1:{dead.port}"
        await poll(lambda: _state_is(rules_info, "flaky", ep_dead, "down"))
        flaky = (await rules_info())["upstreams"]["flaky"]
        dead_health = flaky["health"][ep_dead]
        assert (dead_health["by"], dead_health["workers_down"]) == ("passive", 1)
        assert flaky["fallback"] is None and flaky["healthy_endpoints"] == 0

        # Both endpoints of app down: the fallback answers, and it is counted.
        a.healthy = False
        await poll(lambda: _state_is(rules_info, "app", ep_a, "down", workers_down=2))
        answers = [await client.get(f"{router.url}/x") for _ in range(6)]
        assert [r.headers.get("X-Version") for r in answers] == ["spare"] * 6

        async def scraped() -> dict[tuple[str, ...], float] | None:
            m = samples((await client.get(f"{router.admin_url}/metrics")).text)
            key = ("grayroute_fallback_requests_total", "fallback=spare", "upstream=app")
            return m if m.get(key) == 6 else None

        m = await poll(scraped)
        assert m[("grayroute_upstream_healthy_endpoints", "upstream=app")] == 0
        assert m[("grayroute_upstream_endpoints", "upstream=app")] == 2
        assert m[("grayroute_upstream_healthy_endpoints", "upstream=spare")] == 1
        assert m[("grayroute_upstream_healthy_endpoints", "upstream=flaky")] == 0
        key = ("grayroute_requests_total", "route=all", "status_class=2xx", "upstream=spare")
        assert m[key] == 6
        assert a.requests == b.requests == 0

        # Healthy again: up in both workers, and traffic is back.
        a.healthy = b.healthy = True
        await poll(lambda: _state_is(rules_info, "app", ep_b, "up", workers_down=0))
        answers = [await client.get(f"{router.url}/x") for _ in range(4)]
        assert {r.headers.get("X-Version") for r in answers} <= {"a", "b"}


async def _state_is(
    rules_info: Any, upstream: str, endpoint: str, state: str, workers_down: int | None = None
) -> bool:
    entry = (await rules_info())["upstreams"][upstream]["health"][endpoint]
    return bool(
        entry["state"] == state and (workers_down is None or entry["workers_down"] == workers_down)
    )
