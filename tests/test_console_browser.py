"""The console in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) in front of a real `grayroute serve` with an admin token, 50
routes, a rollout in progress and real traffic. One router and one browser for every
look, to keep it quick.

Set GRAYROUTE_UPDATE_SCREENSHOT=1 to write the screenshot it takes to docs/console.png
(the one docs/console.md shows); otherwise it goes to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from router.demo import RouterProcess

from conftest import ROOT, Serve

TOKEN = "console-browser-token"
NONE = "\u2013"  # what the page shows where there is no number (an en dash)
SERVICES = 48  # with orders and rest: 50 routes

RULES = """\
format: 1
upstreams:
  v1:   {{endpoints: ["{v1}"]}}
  v1.1: {{endpoints: ["{v11}"]}}
  v2:   {{endpoints: ["{v2}"]}}
user_id:
  - header: X-User-Id
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    pins:
      - {{to: v2, users: ["42", "10086"]}}
      - {{to: v2, user_ranges: [[900000, 999999]]}}
      - {{to: v2, headers: {{X-App-Version: "^3\\\\."}}}}
    split: {{v1: 100, v1.1: 0}}
    rollout:
      canary: v1.1
      stable: v1
      steps: [{steps}]
      interval: 3s
      min_requests: 3
      failures: 5
      gates:
        latency: {{quantile: 0.99, max_ratio: 3, min_increase: 500ms}}
{services}
  - name: rest
    to: v1
"""
SERVICE = """\
  - name: svc-{n:02d}
    match: {{path_prefix: /svc-{n:02d}/}}
    split: {{v1: 90, v1.1: 10}}
"""


async def test_the_console_in_a_browser(
    chromium: Callable[..., Any],
    backends: Callable[..., Any],
    serve_router: Serve,
    tmp_path: Path,
) -> None:
    v1, v11, v2 = await backends("v1", "v1.1", "v2")
    services = "".join(SERVICE.format(n=n) for n in range(1, SERVICES + 1))
    rules = tmp_path / "rules.yaml"
    steps = ", ".join(str(n) for n in range(5, 101, 5))  # 20 steps: 2 min at the least
    rules.write_text(
        RULES.format(
            v1=v1.endpoint, v11=v11.endpoint, v2=v2.endpoint, services=services, steps=steps
        )
    )
    router = await serve_router(rules, workers=2, args=("--admin-token", TOKEN))
    stop = asyncio.Event()
    traffic = asyncio.get_running_loop().create_task(_traffic(router, stop))
    try:
        driver = chromium()
        shot = await asyncio.to_thread(_look, driver, router, rules, tmp_path)
    finally:
        stop.set()
        await traffic
    _check_png(shot, driver_size=None)
    if os.environ.get("GRAYROUTE_UPDATE_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "console.png")


def test_the_screenshot_in_the_docs_is_a_png_of_the_page() -> None:
    docs = (ROOT / "docs" / "console.md").read_text()
    assert "![" in docs and "(console.png)" in docs
    _check_png(ROOT / "docs" / "console.png", driver_size=None)


async def _traffic(router: RouterProcess, stop: asyncio.Event) -> None:
    """About 60 requests a second over every route until `stop`, as real clients send."""
    rng = random.Random(7)
    async with httpx.AsyncClient(timeout=10.0) as client:
        while not stop.is_set():
            for _ in range(6):
                user = str(rng.randrange(1, 200_000))
                path = "/orders/1" if rng.random() < 0.6 else f"/svc-{rng.randrange(1, 49):02d}/x"
                if rng.random() < 0.05 and path != "/orders/1":
                    path += "?status=503"  # some failures (not where the rollout judges)
                with contextlib.suppress(httpx.HTTPError):
                    await client.get(router.url + path, headers={"X-User-Id": user})
            await asyncio.sleep(0.1)


# -- the looks (selenium calls block: run in a thread while the loop serves) --------------


def _look(driver: Any, router: RouterProcess, rules: Path, tmp_path: Path) -> Path:
    from selenium.webdriver.common.by import By

    driver.set_window_size(1280, 1500)
    driver.get(router.admin_url + "/")
    # the page loads without the token and asks for it; no data without it
    _wait(driver, lambda: driver.find_element(By.ID, "auth-banner").is_displayed())
    assert driver.find_elements(By.CSS_SELECTOR, "details.route") == []
    token = driver.find_element(By.ID, "token")
    token.send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    _wait(driver, lambda: _renders(driver) >= 1)
    assert not driver.find_element(By.ID, "auth-banner").is_displayed()
    kept = driver.execute_script("return sessionStorage.getItem('grayroute.console.token')")
    assert kept == TOKEN

    # 50 routes, collapsed but the one with a rollout in progress; the rules in force
    cards = driver.find_elements(By.CSS_SELECTOR, "details.route")
    assert len(cards) == SERVICES + 2
    assert driver.find_element(By.ID, "route-count").text == str(SERVICES + 2)
    digest = driver.find_element(By.CSS_SELECTOR, "#rules [data-field=digest]")
    assert digest.get_attribute("title") == router.ready["rules"]

    # that route: its versions side by side, numbers that move between two looks
    orders = driver.find_element(By.CSS_SELECTOR, "details[data-route=orders]")

    def opened() -> list[str]:
        return [c.get_attribute("data-route") for c in cards if c.get_attribute("open")]

    _wait(driver, lambda: opened() == ["orders"])

    def cell(version: str, field: str) -> str:
        css = f"tr[data-version='{version}'] td[data-field={field}]"
        return str(orders.find_element(By.CSS_SELECTOR, css).text)

    _wait(driver, lambda: cell("v1", "requests") not in (NONE, "0"))
    first = {f: cell("v1", f) for f in ("requests", "rps", "observed")}
    assert (cell("v1", "configured"), cell("v1.1", "configured")) == ("100.0%", "0.0%")
    assert cell("v2", "configured") == NONE  # only pins send there
    seen = _renders(driver)

    def moved() -> bool:
        return _renders(driver) >= seen + 2 and cell("v1", "requests") != first["requests"]

    _wait(driver, moved)
    assert int(cell("v1", "requests").replace(",", "")) > int(first["requests"].replace(",", ""))
    for version in ("v1", "v1.1"):
        assert cell(version, "p50").endswith(" ms") and cell(version, "p99").endswith(" ms")
        assert cell(version, "latency_samples") not in (NONE, "0")
    # its charts are drawn (uPlot canvases) with data points
    _wait(driver, lambda: len(orders.find_elements(By.CSS_SELECTOR, ".chart canvas")) == 2)
    pins = orders.find_element(By.CSS_SELECTOR, ".pins").text
    assert "users 2 user IDs" in pins and "user_ranges 1 range (100,000 IDs)" in pins
    assert "headers X-App-Version" in pins

    # the rollout: phase, step i/N, the canary's weight (the effective share of the
    # split), and the verdicts with their values, thresholds and sample counts
    def head() -> Any:
        return orders.find_element(By.CSS_SELECTOR, ".rollout-head")

    assert head().get_attribute("data-phase") in ("Progressing", "Holding")
    step = head().find_element(By.CSS_SELECTOR, "[data-field=step]").text
    assert re.fullmatch(r"step \d+/20 \(5% .* 100%\)", step), step

    def weight_in_force() -> bool:
        weight = head().find_element(By.CSS_SELECTOR, "[data-field=weight]").text
        return weight == cell("v1.1", "effective") and weight != "0.0%"

    _wait(driver, weight_in_force)
    assert "canary" in orders.find_element(By.CSS_SELECTOR, "tr[data-version='v1.1'] th").text
    assert "stable" in orders.find_element(By.CSS_SELECTOR, "tr[data-version='v1'] th").text

    def verdicts() -> list[list[str]]:
        return _table(driver, "details[data-route=orders] table.verdicts tbody tr", "td")

    # a judged interval: per gate its values, threshold, sample counts and verdict
    _wait(driver, lambda: any(len(row) >= 6 for row in verdicts()), timeout=60)
    gate_rows = [row for row in verdicts() if len(row) >= 6]
    assert {row[-6] for row in gate_rows} >= {"error_rate", "latency", "max_error_rate"}
    for row in gate_rows:  # gate, canary, stable, threshold, n canary / stable, verdict
        assert re.fullmatch(r"[\d,]+ / [\d,]+", row[-2]), row
        assert row[-1] in ("PASS", "FAIL", "NODATA"), row
    cohorts = _table(driver, "details[data-route=orders] table.cohorts tbody tr", "th, td")
    assert [row[0].split()[-1] for row in cohorts] == ["stable", "canary"]
    assert all(row[1] not in (NONE, "0") for row in cohorts)  # requests judged

    # the filter keeps the routes that match; the others are hidden, not gone
    box = driver.find_element(By.ID, "filter")
    box.send_keys("svc-1")
    _wait(driver, lambda: driver.find_element(By.ID, "route-count").text == f"10 of {SERVICES + 2}")
    shown = [c.get_attribute("data-route") for c in cards if c.is_displayed()]
    assert shown == [f"svc-{n}" for n in range(10, 20)]
    box.clear()
    box.send_keys(" ")  # an input event with nothing to filter by
    _wait(driver, lambda: driver.find_element(By.ID, "route-count").text == str(SERVICES + 2))

    # where does user 42 go? Each route's answer is `grayroute explain`'s on the same line
    answers = _where(driver, "42")
    assert len(answers) == SERVICES + 2
    said = _explain_cli(rules, [line for _, _, _, line in answers])
    for (route, upstream, reason, _), cli in zip(answers, said, strict=True):
        assert (route, upstream) == (cli["route"], cli["upstream"])
        assert reason.startswith(cli["reason"])
    assert answers[0][:3] == ("orders", "v2", "pin[0] users")
    # with a path: only the route it reaches (as in the screenshot)
    [(route, upstream, reason, _)] = _where(driver, "900017", path="/orders/17")
    assert (route, upstream, reason) == ("orders", "v2", "pin[1] user_ranges")

    # the screenshot, of the page as a person sees it
    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "console.png"
    assert driver.save_screenshot(str(shot))
    width, height = driver.execute_script(
        "return [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]"
    )
    _check_png(shot, driver_size=(int(width), int(height)))

    # pause: the rollout's phase changes, on the page and in the rollout API
    _act(driver, orders, "pause")
    _wait(driver, lambda: _phase(orders) == "Paused")
    assert _api_phase(router) == "Paused"
    # abort asks first: dismissed, nothing happens; accepted, the canary goes to 0
    _act(driver, orders, "abort", accept=False)
    time.sleep(1.0)
    assert _phase(orders) == "Paused" and _api_phase(router) == "Paused"
    _act(driver, orders, "abort", accept=True)
    _wait(driver, lambda: _phase(orders) == "Aborted")
    assert _api_phase(router) == "Aborted"
    _wait(driver, lambda: cell("v1.1", "effective") == "0.0%")
    buttons = orders.find_elements(By.CSS_SELECTOR, ".actions button")
    assert {b.get_attribute("data-action") for b in buttons if b.is_enabled()} == {"retry"}

    # a phone: one column, nothing wider than the screen but the tables' own scrolling
    driver.set_window_size(390, 844)
    _wait(driver, lambda: driver.execute_script("return innerWidth") <= 500)
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
    assert orders.find_element(By.CSS_SELECTOR, "summary").is_displayed()
    return shot


def _table(driver: Any, rows: str, cells: str) -> list[list[str]]:
    """The texts of a table's cells, read at once (the page re-renders every 3 s)."""
    script = (
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(r => [...r.querySelectorAll(arguments[1])].map(c => c.innerText.trim()))"
    )
    return [list(map(str, row)) for row in driver.execute_script(script, rows, cells)]


def _phase(card: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(card.find_element(By.CSS_SELECTOR, ".rollout-head").get_attribute("data-phase"))


def _act(driver: Any, card: Any, action: str, accept: bool | None = None) -> None:
    """Click a rollout button; `accept`: the answer to the confirmation it asks for."""
    from selenium.webdriver.common.by import By

    card.find_element(By.CSS_SELECTOR, f".actions button[data-action={action}]").click()
    if accept is None:
        return
    _wait(driver, lambda: driver.switch_to.alert)
    alert = driver.switch_to.alert
    assert "Abort the rollout of v1.1 on route orders" in alert.text
    if accept:
        alert.accept()
    else:
        alert.dismiss()


def _api_phase(router: RouterProcess) -> str:
    resp = httpx.get(
        f"{router.admin_url}/rollouts/orders",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10.0,
    )
    assert resp.status_code == 200
    return str(resp.json()["phase"])


def _where(driver: Any, user: str, path: str = "") -> list[tuple[str, str, str, bytes]]:
    """Ask the page; (route, upstream, reason, explain line) per answer row."""
    from selenium.webdriver.common.by import By

    before = driver.execute_script("return document.getElementById('where-result').innerHTML")
    for field, value in (("where-user", user), ("where-path", path)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "#where-form button[type=submit]").click()
    _wait(
        driver,
        lambda: driver.find_elements(By.CSS_SELECTOR, "#where-result tbody tr")
        and driver.execute_script("return document.getElementById('where-result').innerHTML")
        != before,
    )
    rows = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#where-result tbody tr"):
        code = row.find_element(By.CSS_SELECTOR, "details.line code")
        command = code.get_attribute("textContent")
        line = command.split("'", 1)[1].rsplit("'", 1)[0].encode()
        # the reason, then what each user-ID source gave (explain --why)
        why = row.find_element(By.CSS_SELECTOR, "[data-field=reason]").text
        reason, _, sources = why.partition("\n")
        assert sources == "header:X-User-Id: found", sources
        rows.append((row.get_attribute("data-route"), _upstream(row), reason, line))
    return rows


def _upstream(row: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(row.find_element(By.CSS_SELECTOR, "[data-field=upstream]").text)


def _explain_cli(rules: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "explain", str(rules)],
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return [orjson.loads(line) for line in out.splitlines()]


def _renders(driver: Any) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.renders || 0)"))


def _wait(driver: Any, condition: Callable[[], Any], timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail with what the page showed after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # an element re-rendered between two calls
            if condition():
                return
        time.sleep(0.1)
    body = driver.execute_script("return document.body.innerText")
    raise AssertionError(f"the page did not get there within {timeout} s; it shows:\n{body}")


def _check_png(path: Path, driver_size: tuple[int, int] | None) -> None:
    """A real PNG: its signature, its size (the browser window's, when known) and pixels
    that are not one flat colour (a blank or failed page would be)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if driver_size is not None:
        assert (width, height) == driver_size
    assert width >= 800 and height >= 600 and depth == 8 and colour in (2, 6)
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            chunks.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    pixels = zlib.decompress(b"".join(chunks))
    stride = 1 + width * (4 if colour == 6 else 3)
    assert len(pixels) == stride * height
    rows = {pixels[i * stride + 1 : (i + 1) * stride] for i in range(0, height, 7)}
    assert len(rows) > 20, "the screenshot is nearly one flat colour"
