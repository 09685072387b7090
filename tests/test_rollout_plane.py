"""Progressive rollouts end to end: `grayroute serve` with 2 workers, real upstreams that
fail or are slow as told, real traffic, intervals of a second or two; the admin API, the
CLI, the webhook, the audit log and a restart.

Each interval needs `min_requests` per version (40 unless a test says otherwise: enough
for the gates to tell a 30% failure rate from none); on a busy machine the traffic is
slower, intervals are NODATA and hold, and the tests wait longer, never judge on less."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from router.demo import RouterProcess

from conftest import PINNED, Backend, Serve, Traffic, poll, rollout_rules


def write_rules(tmp_path: Path, v1: Backend, v11: Backend, **block: Any) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(rollout_rules(v1, v11, **block))
    return path


async def rollout(router: RouterProcess, route: str = "orders") -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{router.admin_url}/rollouts/{route}")
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def post(router: RouterProcess, action: str, route: str = "orders") -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{router.admin_url}/rollouts/{route}/{action}")


def in_phase(router: RouterProcess, *phases: str) -> Callable[[], Any]:
    async def check() -> dict[str, Any] | None:
        found = await rollout(router)
        return found if found["phase"] in phases else None

    return check


async def metrics(router: RouterProcess) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{router.admin_url}/metrics")).text


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / ".grayroute-state" / "rules.yaml" / "audit.jsonl"
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [e for e in entries if e.get("action") == "rollout"]


async def send(router: RouterProcess, n: int) -> None:
    async with httpx.AsyncClient(base_url=router.url) as client:
        for i in range(n):
            await client.get("/orders", headers={"X-User-Id": str(i)})


# -- the cases -----------------------------------------------------------------------


async def test_a_failing_canary_is_rolled_back_told_and_stays_back_after_a_restart(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve, webhooks: Callable[[], Any]
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    v11.fail_ratio = 0.3  # 503 to 30% of its requests
    hook = await webhooks()
    rules = write_rules(tmp_path, v1, v11, hook=hook.url)
    router = await serve_router(rules, workers=2)
    async with Traffic(router.url):
        failed = await poll(in_phase(router, "Failed"), timeout=30)
    assert failed["weight"] == 0.0
    assert failed["reason"].startswith("rolled back: FAIL 2 of 2 in this step (error_rate")
    judged = failed["analysis"][0]["gates"]["error_rate"]
    assert judged["verdict"] == "FAIL" and judged["canary"] > 0.2 and judged["stable"] == 0.0
    # Nothing reaches the canary any more.
    reached = len(v11.seen)
    await send(router, 200)
    assert len(v11.seen) == reached
    # The webhook was told, the audit log says who did it, the metrics show it.
    await poll(lambda: asyncio.sleep(0, [p for p in hook.got if p["phase"] == "Failed"]))
    told = next(p for p in hook.got if p["phase"] == "Failed")
    assert told["route"] == "orders" and told["previous_phase"] == "Progressing"
    entries = audit(tmp_path)
    results = [e["result"] for e in entries]  # (Holding between: a NODATA at start)
    assert results[0] == "Progressing" and results[-1] == "Failed" and "Succeeded" not in results
    assert entries[-1]["user"] == "rollout-controller" and entries[-1]["weight"] == 0.0
    text = await metrics(router)
    assert 'grayroute_rollout_phase{phase="Failed",route="orders"} 1.0' in text
    assert 'grayroute_rollout_weight{route="orders",upstream="v1.1"} 0.0' in text
    assert (
        'grayroute_rollout_verdicts_total{gate="error_rate",route="orders",verdict="FAIL"}' in text
    )
    # After a restart it is still Failed at weight 0, and still nothing reaches the canary.
    await router.stop()
    router = await serve_router(rules, workers=2)
    again = await rollout(router)
    assert (again["phase"], again["weight"]) == ("Failed", 0.0)
    await send(router, 200)
    assert len(v11.seen) == reached


async def test_a_slower_canary_is_rolled_back(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    v11.delay = 0.120
    router = await serve_router(write_rules(tmp_path, v1, v11), workers=2)
    async with Traffic(router.url, concurrency=16):
        failed = await poll(in_phase(router, "Failed"), timeout=30)
    assert "latency" in failed["reason"]
    gate = failed["analysis"][0]["gates"]["latency"]
    # (the stable version's own p99 may be far above its 1-5 ms on a busy machine)
    assert gate["verdict"] == "FAIL" and gate["canary"] > max(gate["threshold"], 0.12)


async def test_a_healthy_canary_is_promoted_step_by_step_and_pinned_users_stay(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = write_rules(
        tmp_path, v1, v11, steps="[20, 50, 100]", interval="1500ms", min_requests=10
    )
    router = await serve_router(rules, workers=2)
    async with Traffic(router.url) as traffic:
        done = await poll(in_phase(router, "Succeeded", "Failed"), timeout=40)
        assert done["phase"] == "Succeeded", done
        assert (done["weight"], done["step"]) == (100.0, 2)
        before = len(v11.seen)
        await asyncio.sleep(0.5)
    assert len(v11.seen) > before  # split traffic is on the canary now
    steps = [(e["result"], e["step"], e["weight"]) for e in audit(tmp_path)]
    assert steps == [("Progressing", 0, 20.0), ("Progressing", 1, 50.0), ("Succeeded", 2, 100.0)]
    # Pinned users never took part: every answer they got came from the stable version.
    assert traffic.pinned_answers and set(traffic.pinned_answers) == {"v1"}
    assert not [s for s in v11.seen if dict(s["headers"]).get("X-User-Id") == PINNED]
    async with httpx.AsyncClient() as client:
        routes = (await client.get(f"{router.admin_url}/rules")).json()["routes"]
    assert routes[0]["split"] == {"v1": 100.0, "v1.1": 0.0}  # the file, never rewritten
    assert routes[0]["effective_split"] == {"v1": 0.0, "v1.1": 100.0}
    assert "rollout" in rules.read_text() and "{v1: 100, v1.1: 0}" in rules.read_text()


async def test_equal_error_rates_are_not_rolled_back(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    v1.fail_ratio = v11.fail_ratio = 0.05
    router = await serve_router(write_rules(tmp_path, v1, v11), workers=2)
    # No pinned requests: every request either version gets is judged, so each fails
    # exactly one request in twenty of those it answers.
    async with Traffic(router.url, pin_every=0):
        done = await poll(in_phase(router, "Succeeded", "Failed"), timeout=30)
    assert done["phase"] == "Succeeded", done
    rates = done["analysis"][0]["gates"]["error_rate"]
    assert rates["verdict"] == "PASS" and rates["stable"] > 0.0


async def test_no_traffic_holds_then_pauses_and_never_fails(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = write_rules(tmp_path, v1, v11, interval="300ms", max_nodata=4)
    router = await serve_router(rules, workers=2)
    held = await poll(in_phase(router, "Holding"), timeout=10)
    assert held["weight"] == 50.0 and held["failures"] == 0
    paused = await poll(in_phase(router, "Paused"), timeout=10)
    assert paused["reason"].startswith("NODATA 4 in a row") and paused["weight"] == 50.0
    verdicts = {i["verdict"] for i in paused["analysis"]}
    assert verdicts <= {"SKIP", "NODATA"}
    await asyncio.sleep(1.0)
    assert (await rollout(router))["phase"] == "Paused"


async def test_pause_resume_abort_retry_promote_over_the_admin_api_and_the_cli(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = write_rules(tmp_path, v1, v11, interval="60s")
    router = await serve_router(rules, workers=2)
    refused = await post(router, "resume")
    assert refused.status_code == 409
    assert (
        refused.json()["detail"] == "only a Paused rollout can be resumed; this one is Progressing"
    )
    paused = await post(router, "pause")
    assert paused.status_code == 200 and paused.json()["phase"] == "Paused"
    assert (await post(router, "pause")).status_code == 409
    resumed = await post(router, "resume")
    assert (resumed.json()["phase"], resumed.json()["step"]) == ("Progressing", 0)
    aborted = await post(router, "abort")
    assert (aborted.json()["phase"], aborted.json()["weight"]) == ("Aborted", 0.0)
    reached = len(v11.seen)
    await send(router, 100)
    assert len(v11.seen) == reached
    assert (await post(router, "retry")).json()["phase"] == "Progressing"
    await send(router, 100)
    assert len(v11.seen) > reached  # back at step 0: 50%
    assert (await post(router, "nope")).status_code in (404, 405)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{router.admin_url}/rollouts/nothing")).status_code == 404
        listed = (await client.get(f"{router.admin_url}/rollouts")).json()["rollouts"]
    assert [r["route"] for r in listed] == ["orders"]
    # The CLI: promote, then status; a refused action exits 1 and says why.
    admin = router.admin_url.removeprefix("http://")
    cli = [sys.executable, "-m", "router.cli", "rollout"]
    promoted = await asyncio.to_thread(
        subprocess.run,
        [*cli, "promote", "orders", "--admin", admin],
        capture_output=True,
        text=True,
    )
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith("orders: Succeeded since ")
    again = await asyncio.to_thread(
        subprocess.run,
        [*cli, "promote", "orders", "--admin", admin],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1
    assert "409: the rollout has already Succeeded" in again.stderr
    status = await asyncio.to_thread(
        subprocess.run, [*cli, "status", "--admin", admin, "--json"], capture_output=True, text=True
    )
    assert status.returncode == 0 and orjson.loads(status.stdout)["rollouts"][0]["weight"] == 100.0
    who = [(e["result"], e["trigger"], e["user"]) for e in audit(tmp_path)]
    assert who[1:5] == [
        ("Paused", "admin", "admin-api"),
        ("Progressing", "admin", "admin-api"),
        ("Aborted", "admin", "admin-api"),
        ("Progressing", "admin", "admin-api"),
    ]
    assert who[5][0] == "Succeeded" and who[5][2] not in ("admin-api", "rollout-controller")


async def test_the_admin_token_covers_the_rollouts(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = write_rules(tmp_path, v1, v11, interval="60s")
    router = await serve_router(rules, workers=1, args=("--admin-token", "s3cret"))
    assert (await post(router, "abort")).status_code == 401
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = router.admin_url.removeprefix("http://")
    cli = [sys.executable, "-m", "router.cli", "rollout", "abort", "orders", "--admin", admin]
    without = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True)
    assert without.returncode == 1 and "401" in without.stderr
    done = await asyncio.to_thread(
        subprocess.run, [*cli, "--token-file", str(token)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Aborted" in done.stdout


async def test_the_canary_falls_back_to_the_stable_version_and_that_counts_against_it(
    tmp_path: Path, backends: Callable[..., Any], serve_router: Serve
) -> None:
    (v1,) = await backends("v1")
    gone = Backend("v1.1")  # nothing listens there: every connection is refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone.port = s.getsockname()[1]
    router = await serve_router(write_rules(tmp_path, v1, gone), workers=2)
    async with Traffic(router.url, pin_every=0):
        failed = await poll(in_phase(router, "Failed"), timeout=30)
    assert failed["analysis"][0]["gates"]["error_rate"]["canary"] == 1.0
    text = await metrics(router)
    # The users never saw it: the stable version answered them (no `fallback:` in the file).
    assert 'grayroute_fallback_requests_total{fallback="v1",upstream="v1.1"}' in text
    assert 'status_class="5xx"' not in text
