"""The console on a real `grayroute serve`: the page and its assets open, its JSON behind
the admin token, numbers that follow real traffic, and the assets found in an installed
wheel through importlib.resources."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router.console.web import assets
from router.demo import RouterProcess
from router.explain import explain_line
from router.rules import load_snapshot

from conftest import ROOT, Serve, poll

TOKEN = "console-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

RULES = """\
format: 1
upstreams:
  v1:   {{endpoints: ["{v1}"]}}
  v1.1: {{endpoints: ["{v11}"]}}
user_id:
  - header: X-User-Id
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    pins:
      - {{to: v1.1, users: ["42", "43"]}}
    split: {{v1: {w1}, v1.1: {w11}}}
  - name: rest
    to: v1
"""


async def test_console_on_a_real_router(
    backends: Callable[..., Any], serve_router: Serve, tmp_path: Path
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(v1=v1.endpoint, v11=v11.endpoint, w1=80, w11=20))
    router = await serve_router(rules, workers=2, args=("--admin-token", TOKEN))
    admin = router.admin_url
    async with httpx.AsyncClient(timeout=10.0) as client:
        # the page and its assets need no token; they hold no data
        page = await client.get(f"{admin}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert 'src="console/assets/console.js"' in page.text
        for name in ("console.js", "console.css", "uplot/uPlot.iife.min.js"):
            asset = await client.get(f"{admin}/console/assets/{name}")
            assert asset.status_code == 200 and asset.content == assets()[name][0]
        assert (await client.get(f"{admin}/console/assets/nothing.js")).status_code == 404
        assert (await client.get(f"{admin}/console/assets/../rules")).status_code in (401, 404)
        # the JSON needs it
        for path in ("/console/status", "/console/series?route=orders", "/console/where?user=1"):
            denied = await client.get(admin + path)
            assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"

        sent = await _traffic(client, router)
        orders_expected = sent["orders"]

        async def counted() -> dict[str, Any] | None:
            resp = await client.get(f"{admin}/console/status?window=600", headers=AUTH)
            assert resp.status_code == 200
            status: dict[str, Any] = resp.json()
            orders = status["routes"][0]
            if orders["requests"] != orders_expected or status["routes"][1]["requests"] != 30:
                return None
            return status

        status = await poll(counted, timeout=20)
        orders, rest = status["routes"]
        by_version = {v["upstream"]: v for v in orders["versions"]}
        assert set(by_version) == {"v1", "v1.1"}
        # what the upstreams received is what the console counted
        assert by_version["v1"]["requests"] + by_version["v1.1"]["requests"] == orders_expected
        assert by_version["v1.1"]["errors"] == 10 and by_version["v1"]["errors"] == 0
        assert by_version["v1"]["configured"] == 80.0 and by_version["v1.1"]["effective"] == 20.0
        observed = by_version["v1"]["observed"] + by_version["v1.1"]["observed"]
        assert observed == pytest.approx(100.0, abs=0.02)
        assert by_version["v1.1"]["latency_samples"] >= by_version["v1.1"]["requests"]
        assert by_version["v1"]["p50_ms"] is not None and by_version["v1"]["p99_ms"] >= 0
        assert rest["versions"][0]["requests"] == 30
        assert status["unrouted"]["requests"] == 0
        assert status["upstreams"]["v1"]["health"][v1.endpoint]["state"] in ("up", "unknown")
        assert status["rules"]["digest"] == router.ready["rules"]
        assert status["rules"]["workers"] == {"ready": 2, "running": 2}

        # a reload that changes the weights is marked on the route's charts
        rules.write_text(RULES.format(v1=v1.endpoint, v11=v11.endpoint, w1=50, w11=50))

        async def marked() -> list[dict[str, Any]] | None:
            resp = await client.get(f"{admin}/console/series?route=orders", headers=AUTH)
            marks: list[dict[str, Any]] = resp.json()["marks"]
            return marks if {m["kind"] for m in marks} == {"reload", "weights"} else None

        marks = await poll(marked, timeout=20)
        assert [m["text"] for m in marks if m["kind"] == "weights"] == [
            "weights v1 80→50, v1.1 20→50"
        ]
        series = (await client.get(f"{admin}/console/series?route=orders", headers=AUTH)).json()
        assert set(series["versions"]) == {"v1", "v1.1"}
        assert len(series["t"]) == len(series["versions"]["v1"]["share"]) > 0
        shares = [
            (a or 0) + (b or 0)
            for a, b in zip(
                series["versions"]["v1"]["share"], series["versions"]["v1.1"]["share"], strict=True
            )
        ]
        assert all(s == pytest.approx(100.0, abs=0.02) or s == 0 for s in shares)

        # where does a user go: explain's own answer, on the rules in force
        where = await client.get(f"{admin}/console/where?user=42", headers=AUTH)
        answers = {a["route"]: a for a in where.json()["answers"]}
        snapshot = load_snapshot(str(rules))
        for name in ("orders", "rest"):
            line = orjson.dumps(answers[name]["request"])
            assert answers[name]["answer"] == orjson.loads(explain_line(snapshot, line, why=True))
        assert answers["orders"]["answer"]["upstream"] == "v1.1"
        assert answers["orders"]["answer"]["reason"] == "pin[0] users"

        # bad input gets a clear 4xx
        for path, error in (
            ("/console/status?window=-1", "bad window"),
            ("/console/status?window=nan", "bad window"),
            ("/console/series", "no route"),
            ("/console/series?route=orders&seconds=x", "bad seconds"),
            ("/console/where", "no user"),
            ("/console/where?user=1&path=orders", "bad path"),
        ):
            resp = await client.get(admin + path, headers=AUTH)
            assert resp.status_code == 400 and resp.json()["error"] == error, path
        missing = await client.get(f"{admin}/console/series?route=gone", headers=AUTH)
        assert missing.status_code == 404 and "gone" in missing.json()["detail"]


async def _traffic(client: httpx.AsyncClient, router: RouterProcess) -> dict[str, int]:
    """Requests on both routes, a few of them answered 503 by v1.1 (the pinned users)."""
    orders = 0
    for i in range(200):
        resp = await client.get(f"{router.url}/orders/{i}", headers={"X-User-Id": f"u{i}"})
        assert resp.status_code == 200
        orders += 1
    for _ in range(10):
        resp = await client.get(f"{router.url}/orders/x?status=503", headers={"X-User-Id": "42"})
        assert resp.status_code == 503
        orders += 1
    for i in range(30):
        assert (await client.get(f"{router.url}/other/{i}")).status_code == 200
    return {"orders": orders, "rest": 30}


def test_an_installed_wheel_serves_the_same_assets(tmp_path: Path) -> None:
    """`pip install .` (not only an editable checkout) ships the page: the wheel holds
    every asset, and importlib.resources finds them in the installed copy."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for package in ("router", "lua_compat"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    dist = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    subprocess.run(
        [sys.executable, "-c", build, str(dist)],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = dist.glob("*.whl")
    shipped = set(assets())
    assert {"index.html", "console.js", "console.css", "uplot/uPlot.iife.min.js"} <= shipped
    assert "uplot/LICENSE" in shipped
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n.removeprefix("router/console/static/") for n in zf.namelist()}
        assert shipped <= in_wheel
        site = tmp_path / "site"
        zf.extractall(site)
    probe = (
        "import router.console, router.console.web as w, sys; "
        "print(router.console.__file__); print(sorted(w.assets()))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,  # not this checkout's directory, which would come first on sys.path
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    where, listed = out.splitlines()
    assert where.startswith(str(site))  # the installed copy, not this checkout
    assert set(orjson.loads(listed.replace("'", '"'))) == shipped
